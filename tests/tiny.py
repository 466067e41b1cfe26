"""What the tests share: tiny random models, stub tokenizers and toy tasks.

A tokenizer, as the project's code uses it (tokenizer.Tokenizer is the real one):
    pad_id, stop_ids               padding id; ids that end a completion
    encode(text) -> ids            the reply or reference text alone
    decode(ids) -> text            what generation returns as text
    encode_chat(messages) -> ids   a prompt in the chat template
    end_of_turn_ids() -> set       what the supervised objective closes a reference with
The stubs below each implement what their tests call, no more: CharTokenizer one id per
character (text round-trips), ToyTokenizer ids as decimal numbers, StubTokenizer decode only.
"""
import json

import torch

import config
import data
import loop
import lora
import rl
import svf
from model import ModelArgs, Transformer

TINY = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48, max_seq_len=64)
# the adaptation tests' prompts are characters: a longer context
TINY_WIDE = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48,
                      max_seq_len=512)
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;?!'\"()[]{}\\/+-*=<>_\n#"  # 62 symbols: ids 2..63



class StubTokenizer:
    """Only what generation needs from a tokenizer, for tiny random models (ids are numbers);
    id 1 stops unless the test names other stop ids."""
    pad_id = 0

    def __init__(self, stop_ids=(1,)):
        self.stop_ids = set(stop_ids)

    def decode(self, ids):
        return " ".join(map(str, ids))


class CharTokenizer:
    """One id per character, enough for tiny random models: 0 pads, 1 stops, 2.. are CHARS."""
    pad_id, stop_ids = 0, {1}

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return [2 + CHARS.index(c) if c in CHARS else 2 for c in text.lower()]

    def decode(self, ids: list[int]) -> str:
        return "".join(CHARS[i - 2] for i in ids if i >= 2)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>")


# ----------------------------------------------------------------------------- the trainer, end to end
class ToyTokenizer:
    """Ids are small numbers; enough of a tokenizer for the trainer's loop on a tiny random model."""
    pad_id, stop_ids = 0, {1}

    def encode_chat(self, messages):
        return [2] + [3 + ord(c) % 60 for c in messages[-1]["content"]]

    def decode(self, ids):
        return " ".join(map(str, ids))

    def encode(self, text):  # inverse of decode, for reference responses ("17" -> [17])
        return [int(t) for t in text.split()]

    def end_of_turn_ids(self):
        return {1}


def tiny_model(dtype=torch.float64, seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TINY).to(dtype).eval().requires_grad_(False)


def tiny_wrapped_model(seed=0) -> Transformer:
    """A float64 model with SVF wrappers on its MLP, for the adaptation tests."""
    torch.manual_seed(seed)
    model = Transformer(TINY_WIDE).double().eval().requires_grad_(False)
    svf.attach(model, svf.decompose(model, "mlp", cache_dir=None))
    return model


def tiny_batch(seed=0):
    """Two prompts, the first with two sampled responses and the second with one."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 64, (n,), generator=g).tolist() for n in (5, 9)]
    samples = [[torch.randint(2, 64, (n,), generator=g).tolist() for n in ns] for ns in ((4, 2), (6,))]
    return prompts, samples


def random_expert(model, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: 1 + 0.5 * torch.randn(v.shape, generator=g, dtype=v.dtype) for n, v in svf.ones(model).items()}


def toy_problems(n: int) -> list[dict]:
    letters = "abc"
    return [{"id": f"toy/{i}", "question": f"question {i}: say {letters[i % 3]}", "answer": letters[i % 3]}
            for i in range(n)]


def toy_train_problems(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"question": "q" * int(torch.randint(1, 6, (), generator=g)) + str(i),
             "answer": str(int(torch.randint(3, 64, (), generator=g)))} for i in range(n)]


class EchoTask(data.Task):
    """A toy task for tiny models: the answer is right when the reply holds the problem's letter."""
    name, domain, max_new_tokens, stop = "echo", "other", 6, []

    def prompt(self, problem: dict) -> str:
        return problem["question"]

    def score(self, problem: dict, response: str) -> bool:
        return problem["answer"] in response

    def reference_response(self, problem: dict) -> str:
        return f"the answer is {problem['answer']}"


class ChoiceTask(EchoTask):
    """Multiple choice for tiny models: three one-word options, the problem's letter marks the right one."""
    def option_messages(self, problem: dict) -> list[dict]:
        return [{"role": "user", "content": "pick: " + problem["question"]}]

    def option_responses(self, problem: dict) -> list[str]:
        return ["x" + problem["answer"], "yy", "zzz"]


# ----------------------------------------------------------------------------- an interrupted evaluation
class ScoredEchoTask(EchoTask):
    """EchoTask with what eval.py's scoring asks of a task."""
    def extract(self, response: str, problem: dict | None = None) -> str | None:
        return next((c for c in response if c in "abc"), None)

    def score_many(self, problems, responses, workers=1):
        return [self.score(p, r) for p, r in zip(problems, responses)]


class ToyTask(data.Task):
    """Reward when the response contains the problem's answer token: rare but not impossible."""
    name, domain, max_new_tokens, stop = "toy", "math", 5, []

    def messages(self, p):
        return [{"role": "user", "content": p["question"]}]

    def score(self, p, response):
        return p["answer"] in response.split()

    def score_many(self, problems, responses, workers=4):
        return [self.score(p, r) for p, r in zip(problems, responses)]

    def reference_response(self, p):
        return p["answer"]


def run_toy(out, steps, resume=False, interrupt_at=None, monkeypatch=None, **overrides):
    model = tiny_model(torch.float32)
    cfg = config.TrainConfig(**{**dict(task="toy", targets="mlp", steps=steps, batch_size=2, samples=3, temperature=1.0,
                                   lr=0.05, kl_coef=0.1, baseline="none", micro_batch=4, gen_batch=6, eval_every=2,
                                   val_limit=0, seed=3), **overrides})
    owner, step_name = (lora, "sft_step") if cfg.objective == "sft" else (rl, "train_step")
    if interrupt_at is not None:  # a Ctrl-C arriving during step `interrupt_at`
        import os
        import signal
        real_step, calls = getattr(owner, step_name), []

        def step_then_ctrl_c(*args, **kwargs):
            calls.append(1)
            if len(calls) == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)
            return real_step(*args, **kwargs)
        monkeypatch.setattr(owner, step_name, step_then_ctrl_c)
    loop.train(model, ToyTokenizer(), cfg, out, resume=resume, log=lambda *a: None, task=ToyTask(),
             train_set=toy_train_problems(8, 0), val_set=toy_train_problems(4, 1))
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
