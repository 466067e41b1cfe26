"""Batched generation for rollouts and evaluation: many prompts, many samples each.

model.generate runs one batch to its end: a finished row leaves and the batch shrinks, so
the last steps of a long sample run on a few rows, each step as slow per token as the full
batch's. generate_many keeps batch_size rows busy instead: a finished row takes the next
waiting prompt at once (continuous batching, as vLLM does). Every row sits at its own
position in one preallocated cache (RowCache), its prompt left-aligned at slot 0; a prompt
is prefilled once and its keys and values copied into the rows of its samples; and each
row's next token is drawn with one uniform number (draw) instead of torch.multinomial's
one random number per vocabulary entry.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from completion import Completion, add_token, finish_text
from model import KVCache, Transformer, check_prompts, generate


def generate_all(model: Transformer, tokenizer, prompts: list[list[int]], batch_size: int,
                 desc: str = "generate", on_batch=None, refill: bool = False,
                 **kwargs) -> list[Completion]:
    """model.generate over many prompts in batches of similar length (less padding), with a
    progress bar; results in the prompts' order; kwargs go to generate(). on_batch(indices,
    completions) sees each batch as it finishes (to save work as it is done). refill: run
    generate_many instead, where a finished row takes the next waiting prompt."""
    if refill:
        if on_batch:
            raise ValueError("on_batch needs batches that finish together: refill has none")
        return generate_many(model, tokenizer, prompts, batch_size, desc, **kwargs)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Completion | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, leave=False) as bar:
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            outs = generate(model, tokenizer, [prompts[j] for j in idx], **kwargs)
            for j, c in zip(idx, outs):
                out[j] = c
            if on_batch:
                on_batch(idx, outs)
            bar.update(len(idx))
    return out


# ----------------------------------------------------------------------------- sampling
def draw(weights: torch.Tensor, generator=None, block: int = 512) -> torch.Tensor:
    """Indices (B,) drawn from unnormalised non-negative weights (B, V) by inverting their CDF
    with one uniform number per row: first a block of `block` entries by the blocks' sums,
    then an entry within it. Running sums in float64: one float32 sum over a whole
    vocabulary would round small probabilities away."""
    B, V = weights.shape
    w = (F.pad(weights, (0, -V % block)) if V % block else weights).view(B, -1, block)
    block_cdf = w.sum(-1).double().cumsum(-1)                           # (B, blocks)
    u = torch.rand(B, 1, dtype=torch.float64, generator=generator, device=w.device)
    u = u * block_cdf[:, -1:]
    j = first_above(block_cdf, u)
    u = u - torch.where(j > 0, block_cdf.gather(-1, (j - 1).clamp(min=0)), 0.0)  # left in j
    inside = w[torch.arange(B, device=w.device), j[:, 0]].cumsum(-1, dtype=torch.float64)
    return (j * block + first_above(inside, u)).squeeze(-1)


def first_above(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose running sum cdf (B, n) exceeds u (B, 1): never an entry
    of zero weight. Where rounding leaves u at or past the total, the last entry with
    weight. (B, 1)"""
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous())
    return torch.minimum(torch.searchsorted(cdf, u, right=True), last)


def sample_rows(logits: torch.Tensor, temperature: float, top_p: float,
                generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens (B,) from logits (B, vocab) and their log-probabilities at temperature 1.
    The distribution is model.sample's (greedy at temperature 0, else nucleus), drawn with
    draw(). logits is overwritten: it is a decode step's biggest tensor, so no copy is made."""
    if temperature == 0:
        tokens = logits.argmax(-1)
        lse = torch.logsumexp(logits, -1, keepdim=True)
        return tokens, (logits.gather(-1, tokens[:, None]) - lse).squeeze(-1)
    log_z = torch.logsumexp(logits, -1, keepdim=True) if temperature != 1 else None  # (B, 1)
    top = logits.amax(-1, keepdim=True)
    w = logits.sub_(top)
    w = (w if temperature == 1 else w.div_(temperature)).exp_()  # softmax(logits / T) * const
    if log_z is None:
        log_z = top + w.sum(-1, keepdim=True).log()
    if top_p < 1.0:
        kept, order = w.sort(dim=-1, descending=True)
        cum = kept.cumsum(-1, dtype=torch.float64)
        kept.masked_fill_(cum - kept > top_p * cum[:, -1:], 0.0)  # smallest set reaching top_p
        tokens = order.gather(-1, draw(kept, generator)[:, None]).squeeze(-1)
    else:
        tokens = draw(w, generator)
    logit = top + temperature * w.gather(-1, tokens[:, None]).log()  # w = exp((logit - top) / T)
    return tokens, (logit - log_z).squeeze(-1)


# ----------------------------------------------------------------------------- the row cache
@dataclass
class Rows:
    """Where the rows of a running batch are, shared by every layer's RowCache."""
    at: torch.Tensor   # (B,) slot of each row's current token = tokens already cached
    end: int = 0       # slots attended over this step: the largest live `at` + 1


class RowCache:
    """A KVCache whose rows are at positions of their own: row b's token is written at slot
    rows.at[b]. What a row may see is the attention mask's business (Batch.step builds it)."""

    def __init__(self, cache: KVCache, rows: Rows):
        self.k, self.v, self.rows = cache.k, cache.v, rows

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, n_kv, 1, hd) at each row's own slot; return slots 0..end of every row."""
        B, n_kv, length, hd = self.k.shape
        # the flat index of (row b, head h, slot at[b]) in the cache seen as (B*n_kv*length, hd)
        heads = torch.arange(B * n_kv, device=k.device) * length
        where = (heads.view(B, n_kv) + self.rows.at[:, None]).view(-1)
        # the cache may be float32 under a 16-bit model (CPU attention computes in float32)
        self.k.view(-1, hd).index_copy_(0, where, k.reshape(-1, hd).to(self.k.dtype))
        self.v.view(-1, hd).index_copy_(0, where, v.reshape(-1, hd).to(self.v.dtype))
        return self.k[:, :, :self.rows.end], self.v[:, :, :self.rows.end]

    def load(self, slots: torch.Tensor, prefix: KVCache) -> None:
        """Rows `slots` take a prefilled prompt's keys and values (1, n_kv, length, hd)."""
        n = prefix.k.shape[2]
        self.k[slots, :, :n] = prefix.k
        self.v[slots, :, :n] = prefix.v

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.k, self.v = self.k[rows], self.v[rows]


# ----------------------------------------------------------------------------- continuous batching
class Batch:
    """The running state of generate_many: which prompt each row serves, and its cache."""

    def __init__(self, model: Transformer, tokenizer, prompts, batch_size: int, desc: str,
                 max_new_tokens: int, temperature: float, top_p: float, stop_strings, generator):
        self.model, self.tokenizer, self.prompts = model, tokenizer, prompts
        self.sampling = (temperature, top_p, generator)
        self.stop_strings = stop_strings
        self.device = device = model.tok_embeddings.weight.device
        ctx = model.args.max_seq_len
        self.budget = [min(max_new_tokens, ctx - len(p)) for p in prompts]
        # shortest first, so a prompt's samples sit side by side
        self.waiting = deque(sorted(range(len(prompts)), key=lambda i: len(prompts[i])))
        self.left = Counter(tuple(p) for p in prompts)  # samples of each prompt not yet started
        self.prefixes: dict[tuple[int, ...], tuple[list[KVCache], torch.Tensor]] = {}
        B = min(batch_size, len(prompts))
        self.rows = Rows(at=torch.zeros(B, dtype=torch.long, device=device))
        length = max(len(p) + n for p, n in zip(prompts, self.budget))
        self.cache = [RowCache(c, self.rows) for c in model.new_cache(B, length)]
        self.out = [Completion([], "") for _ in prompts]
        self.who: list[int | None] = [None] * B  # who[b]: the prompt that row b generates
        self.tokens = torch.zeros(B, dtype=torch.long, device=device)  # fed at the next step
        self.bar = tqdm(total=len(prompts), desc=desc, leave=False)

    def prefix(self, p: tuple[int, ...], n: int):
        """The prompt's keys and values and last logits (1, vocab), prefilled once for all its
        samples; n of them start now, and the last one to start frees it."""
        if p not in self.prefixes:
            c = self.model.new_cache(1, len(p))
            logits = self.model(torch.tensor([p], device=self.device), None, c, 0, last=1)
            self.prefixes[p] = c, logits[:, -1]
        self.left[p] -= n
        return self.prefixes.pop(p) if self.left[p] == 0 else self.prefixes[p]

    def record(self, b: int, token: int, logprob: float) -> None:
        """Row b's new token; a finished row is emptied for the next prompt."""
        i = self.who[b]
        stopped = add_token(self.out[i], token, logprob, self.tokenizer, self.stop_strings)
        if stopped or len(self.out[i].tokens) >= self.budget[i]:
            self.free(b)

    def free(self, b: int) -> None:
        self.who[b] = None
        self.bar.update(1)

    def fill(self) -> None:
        """Every empty row takes a waiting prompt: its prompt's cache, and its first token."""
        while self.waiting and None in self.who:
            groups: dict[tuple[int, ...], list[int]] = {}  # distinct prompt -> rows starting it
            for b in [b for b, i in enumerate(self.who) if i is None][:len(self.waiting)]:
                self.who[b] = self.waiting.popleft()
                groups.setdefault(tuple(self.prompts[self.who[b]]), []).append(b)
            first = []
            for p, slots in groups.items():
                kv, logits = self.prefix(p, len(slots))
                for c, pc in zip(self.cache, kv):
                    c.load(torch.tensor(slots, device=self.device), pc)
                first.append(logits.expand(len(slots), -1))
            started = [b for slots in groups.values() for b in slots]
            at = [len(self.prompts[self.who[b]]) for b in started]
            self.rows.at[started] = torch.tensor(at, device=self.device)
            self.tokens[started], lps = sample_rows(torch.cat(first), *self.sampling)
            for b, t, lp in zip(started, self.tokens[started].tolist(), lps.tolist()):
                if self.budget[self.who[b]] > 0:
                    self.record(b, t, lp)
                else:  # nothing to generate
                    self.free(b)

    def shrink(self, live: list[int]) -> list[int]:
        """Nothing left to refill with: drop the empty rows once a quarter of them is empty."""
        if self.waiting or len(live) > 3 * len(self.who) // 4:
            return live
        keep = torch.tensor(live, device=self.device)
        for c in self.cache:
            c.keep_rows(keep)
        self.rows.at, self.tokens = self.rows.at[keep], self.tokens[keep]
        self.who = [self.who[b] for b in live]
        return list(range(len(live)))

    def step(self) -> None:
        """One decode step over every row, each at its own slot; live rows record a token."""
        live = self.shrink([b for b in range(len(self.who)) if self.who[b] is not None])
        rows = self.rows
        rows.end = int(rows.at[live].max()) + 1
        mask = (torch.arange(rows.end, device=self.device) <= rows.at[:, None])[:, None, None, :]
        hidden = self.model.hidden(self.tokens[:, None], rows.at[:, None], mask, self.cache)
        logits = self.model.head(hidden)[:, -1]
        rows.at[live] += 1
        self.tokens, lps = sample_rows(logits, *self.sampling)
        for b, t, lp in zip(live, self.tokens[live].tolist(), lps[live].tolist()):
            self.record(b, t, lp)


@torch.inference_mode()
def generate_many(model: Transformer, tokenizer, prompts: list[list[int]], batch_size: int,
                  desc: str = "generate", max_new_tokens: int = 256, temperature: float = 0.0,
                  top_p: float = 1.0, stop_strings: tuple[str, ...] = (),
                  generator: torch.Generator | None = None) -> list[Completion]:
    """generate_all's results (one Completion per prompt, in order) by continuous batching: at
    most batch_size rows decode together, and a finished row takes the next waiting prompt.
    Each prompt stops as generate() alone would stop it (a stop token, a stop string, or
    max_new_tokens, capped by the context)."""
    check_prompts(model, prompts)
    batch = Batch(model, tokenizer, prompts, batch_size, desc, max_new_tokens, temperature,
                  top_p, stop_strings, generator)
    batch.fill()
    while any(i is not None for i in batch.who):
        batch.step()
        batch.fill()
    batch.bar.close()
    for c in batch.out:
        finish_text(c, tokenizer, stop_strings)
    return batch.out
