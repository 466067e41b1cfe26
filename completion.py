"""What a generation returns, and when it stops: a Completion grows a token at a time until a
stop token (EOS, end of turn) or one of the task's stop strings; its text is then cut there."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Completion:
    tokens: list[int]                      # generated ids, including a final stop token
    text: str                              # decoded, cut before any stop string
    logprobs: list[float] = field(default_factory=list)  # log p(token), temperature 1
    finish: str = "length"                 # "stop" (EOS or stop string) or "length"


def add_token(c: Completion, token: int, logprob: float, tokenizer, stop_strings) -> bool:
    """Append a token; True when it ends the completion (a stop token or a stop string)."""
    c.tokens.append(token)
    c.logprobs.append(logprob)
    if token in tokenizer.stop_ids:
        c.finish = "stop"
    elif stop_strings:  # a short stop string ends in the last few tokens
        tail = tokenizer.decode(c.tokens[-16:])
        c.finish = "stop" if any(s in tail for s in stop_strings) else c.finish
    return c.finish == "stop"


def finish_text(c: Completion, tokenizer, stop_strings) -> None:
    """The completion's text: its tokens but stop tokens, cut before the first stop string."""
    text = tokenizer.decode([t for t in c.tokens if t not in tokenizer.stop_ids])
    cuts = [text.find(s) for s in stop_strings if s in text]
    c.text = text[:min(cuts)] if cuts else text
