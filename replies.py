"""Scoring given replies: log p(reply | prompt) for several replies of each prompt, in one
forward pass.

The trainer's REINFORCE loss and KL (paper section 3.1) score the sampled responses this way; the
multiple-choice rollout, the first pass of the adaptive strategies (section 3.2) and the
likelihood reading of ARC score a task's fixed replies (options, labels). A prompt and all its
replies share one packed row, so the prompt is computed once, not once per reply.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from completion import Completion
from model import Transformer, attention_mask


def common_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt shares (a system prompt), leaving each at least one."""
    n = min(len(p) for p in prompts) - 1
    for i in range(max(n, 0)):
        if any(p[i] != prompts[0][i] for p in prompts):
            return i
    return max(n, 0)


def micro_batches(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped for forward/backward passes: rows of similar length together, at most
    max_rows rows and max_tokens padded tokens (rows x the longest) in each, so that memory stays
    bounded when one prompt is long (code prompts with their tests run long)."""
    groups: list[list[int]] = []
    # longest first: it sets the width
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        g = groups[-1] if groups else None
        if g and len(g) < max_rows and (len(g) + 1) * lengths[g[0]] <= max_tokens:
            g.append(i)
        else:
            groups.append([i])
    return groups


def reply_logits(model: Transformer, prompts: list[list[int]], replies: list[list[list[int]]],
                 pad_id: int, share_prefix: bool = True):
    """The logits that predict every token of every reply of every prompt, in one forward pass.

    Each prompt and its replies are packed into one row, [prompt, reply_1, ..., reply_L]: every
    reply sits at the position ids right after the prompt and attends to the prompt and to itself
    only (a tree-shaped mask), so the prompt is computed once rather than once per reply. Returns
    logits (N, vocab) for the N reply tokens, their targets (N,) and the reply each belongs to (N,),
    replies numbered in order over all prompts. Differentiable: the trainer's losses use it.

    Without gradients, the leading tokens all prompts share (the first pass's instructions, a
    chat template's default system prompt) are computed once for the batch, into a KV cache that
    every row then reads: slots 0..S-1 hold the shared tokens, the rows' own tokens follow
    (share_prefix False: every row in full, for comparison).
    """
    dev = model.tok_embeddings.weight.device
    S = common_prefix(prompts) if share_prefix and not torch.is_grad_enabled() else 0
    # picks: (row, index that predicts, target, reply number)
    rows, pos, seg, picks = [], [], [], []
    n_reply = 0
    for b, (p, rs) in enumerate(zip(prompts, replies)):
        toks, ps, sg = list(p[S:]), list(range(S, len(p))), [0] * (len(p) - S)
        for j, r in enumerate(rs, 1):
            for t, tok in enumerate(r):
                picks.append((b, len(p) - S - 1 if t == 0 else len(toks) - 1, tok, n_reply))
                toks.append(tok)
                ps.append(len(p) + t)
                sg.append(j)
            n_reply += 1
        rows.append(toks)
        pos.append(ps)
        seg.append(sg)
    T, B = max(len(r) for r in rows), len(rows)
    fill = lambda xs, v: torch.tensor([x + [v] * (T - len(x)) for x in xs], device=dev)
    # right padding: segment -1
    tokens, positions, segment = fill(rows, pad_id), fill(pos, 0), fill(seg, -1)
    shared = torch.arange(S, device=dev).expand(B, S)
    key_pos = torch.cat([shared, positions], 1)                                     # (B, S+T)
    key_seg = torch.cat([torch.zeros_like(shared), segment], 1)
    # slots
    q, k = torch.arange(S, S + T, device=dev)[:, None], torch.arange(S + T, device=dev)[None, :]
    sq, sk = segment[:, :, None], key_seg[:, None, :]  # (B, T, 1), (B, 1, S+T)
    mask = (k <= q)[None] & (sk >= 0) & ((sk == 0) | (sk == sq))
    if model.args.sliding_window:
        mask &= positions[:, :, None] - key_pos[:, None, :] < model.args.sliding_window
    mask |= (k == q)[None]  # padding sees itself
    cache = None
    if S:
        cache = model.new_cache(1, S + T)
        window = model.args.sliding_window
        causal = attention_mask(shared[0], None, window) if window else None
        model.hidden(torch.tensor([prompts[0][:S]], device=dev), shared[:1], causal, cache, 0)
        for c in cache:
            c.keep_rows(torch.zeros(B, dtype=torch.long, device=dev))             # one copy per row
    h = model.hidden(tokens, positions, mask[:, None], cache, S)                 # (B, T, dim)
    b, at, target, reply = (torch.tensor(c, device=dev) for c in zip(*picks))
    return model.head(h[b, at]), target, reply  # only the N rows needed


def reply_logprobs(model: Transformer, prompts: list[list[int]], replies: list[list[list[int]]],
                   pad_id: int, share_prefix: bool = True) -> list[torch.Tensor]:
    """log p(reply | prompt) of every reply of every prompt: one (L_b,) tensor per prompt b."""
    logits, target, reply = reply_logits(model, prompts, replies, pad_id, share_prefix)
    logp = torch.log_softmax(logits, -1).gather(-1, target[:, None]).squeeze(-1)   # (N,)
    n = sum(len(rs) for rs in replies)
    sums = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add(0, reply, logp)
    return list(sums.split([len(rs) for rs in replies]))


@torch.no_grad()
def mean_loglik(model: Transformer, prompts: list[list[int]], responses: list[list[int]],
                pad_id: int, micro_batch: int = 4) -> float:
    """Mean over responses of the per-token mean log p(response | prompt). Micro-batches bound the
    (tokens, vocab) logits in memory (a MATH solution is hundreds of tokens)."""
    means = []
    for i in range(0, len(prompts), micro_batch):
        rs = responses[i:i + micro_batch]
        logp = reply_logprobs(model, prompts[i:i + micro_batch], [[r] for r in rs], pad_id)
        means += [lp.item() / max(len(r), 1) for lp, r in zip(logp, rs)]
    return sum(means) / len(means)


def option_policy(tokenizer, task, problem: dict) -> tuple[list[int], list[list[int]]]:
    """The prompt's tokens and the tokens of each option's response."""
    return (tokenizer.encode_chat(task.option_messages(problem)),
            [tokenizer.encode(r) for r in task.option_responses(problem)])


def option_logits(model: Transformer, tokenizer, task, problems: list[dict],
                  temperature: float) -> list[torch.Tensor]:
    """log p(reply_a | prompt) / T for every option a of every problem, differentiable in z.
    One packed forward pass: each prompt is computed once, not once per option."""
    prompts, replies = zip(*[option_policy(tokenizer, task, p) for p in problems])
    logp = reply_logprobs(model, list(prompts), list(replies), tokenizer.pad_id)
    return [lp / temperature for lp in logp]


@torch.inference_mode()
def choose_options(model, tokenizer, task, problems: list[dict], batch_size: int, desc: str = "",
                   on_batch=None) -> list[Completion]:
    """The option whose reply has the highest log-likelihood (summed over its tokens) under the
    current weights; its text is the response, scored like a generated one."""
    outs = []
    for i in tqdm(range(0, len(problems), batch_size), desc=desc, leave=False):
        group = problems[i:i + batch_size]
        logits = option_logits(model, tokenizer, task, group, 1.0)
        chosen = [Completion([], task.option_responses(p)[int(lp.argmax())], finish="likelihood")
                  for p, lp in zip(group, logits)]
        outs += chosen
        if on_batch:
            on_batch(list(range(i, i + len(group))), chosen)
    return outs
