"""A Llama in one file: the model, its pretrained weights, and generation.

This is the base model that Transformer-Squared adapts (paper section 3: every weight
matrix W of this network is what SVF decomposes). It covers the Llama family: Llama 2
and 3 (with Llama 3.1/3.2 rope scaling), Mistral, TinyLlama, SmolLM/SmolLM2, and the
q/k/v biases of Qwen2. Read it top to bottom:

    ModelArgs -> RMSNorm -> rotary embeddings -> Attention (+ KVCache) -> FeedForward
    -> Block -> Transformer -> generation (sample, prefill, decode, generate)

Loading pretrained weights (GGUF files and Hugging Face folders) lives in checkpoint.py, and
scoring given replies in one packed forward pass (the trainer's and the classifiers') in replies.py.

    python model.py --prompt "The capital of France is" --max-new-tokens 16
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    dim: int = 576                    # width of the residual stream
    n_layers: int = 30                # number of transformer blocks
    n_heads: int = 9                  # query heads
    n_kv_heads: int = 3               # key/value heads (grouped-query attention when < n_heads)
    vocab_size: int = 49152
    hidden_dim: int = 1536            # inner width of the SwiGLU feed-forward
    head_dim: int = 0                 # 0: dim // n_heads (some models set it explicitly)
    norm_eps: float = 1e-5            # RMSNorm epsilon
    rope_theta: float = 10000.0       # base of the rotary frequencies
    rope_scaling: dict | None = None  # Llama 3.1-style {"rope_type": "llama3", "factor": ...} or "linear"
    max_seq_len: int = 2048           # context length: the rotary table and KV cache are this long
    tie_embeddings: bool = False      # output head shares the token embedding matrix (SmolLM2)
    attn_bias: bool = False           # q/k/v projections have biases (Qwen2)
    sliding_window: int | None = None  # Mistral v0.1: attend only to the last N tokens

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T + b, with two CPU kernel choices that only change the speed (bench.py measures both):

    - the few-row products of token-by-token decoding (2-32 rows) as w @ x^T: with MKL, x @ w^T
      runs 1.4-2.2x slower. The result is made contiguous again so attention keeps its fast path.
    - 16-bit products of 16 rows or more (prefill, batches) in float32: CPUs without bfloat16
      instructions (AVX2) run them 4-5x slower than float32. The weights stay 16-bit in memory,
      and both kernels accumulate in float32.
    """
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or rows == 1:
        return F.linear(x, w, b)
    if x.dtype in (torch.bfloat16, torch.float16) and rows >= 16:
        return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    if rows > 32 or torch.is_grad_enabled() and x.requires_grad:
        return F.linear(x, w, b)
    y = (w @ x.reshape(rows, -1).t()).t().contiguous().reshape(*x.shape[:-1], -1)  # (..., out)
    return y if b is None else y + b


class Linear(nn.Linear):
    """nn.Linear computed by linear() above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def project(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> torch.Tensor:
    """x through several linears that read it (q/k/v, or gate/up), their outputs side by side.

    Decoding one token makes many small matrix products, and every call has a fixed cost. So
    when no gradient is wanted and the layers are plain Linears, one product with their stacked
    weights serves them all (stacked() below). SVF and LoRA wrappers take the plain path.
    """
    if torch.is_grad_enabled() or any(type(layer) is not Linear for layer in layers):
        return torch.cat([layer(x) for layer in layers], dim=-1)
    return linear(x, *stacked(layers))


def stacked(layers: tuple[Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One matrix (and bias) whose row blocks are the layers' own weights.

    Built once by copying the weights into one buffer; each layer's weight then becomes a view of
    it, so no memory is doubled and in-place writes to either are seen by both. Built again when
    a weight is replaced (another tensor, dtype or device)."""
    w, b, where = layers[0].__dict__.get("stack", (None, None, ()))
    if where == tuple(layer.weight.data_ptr() for layer in layers):
        return w, b
    with torch.inference_mode(False):  # ordinary tensors: training may use these weights later
        w = side_by_side([layer.weight for layer in layers])
        b = None if layers[0].bias is None else side_by_side([layer.bias for layer in layers])
    # kept outside nn.Module's registries (not a parameter or buffer), with the weights' addresses
    layers[0].__dict__["stack"] = (w, b, tuple(layer.weight.data_ptr() for layer in layers))
    return w, b


def side_by_side(parts: list[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated along dim 0 into one buffer, each rebound to a view of its rows."""
    whole = torch.cat([p.detach() for p in parts])
    for p, view in zip(parts, whole.split([p.shape[0] for p in parts])):
        p.data = view
    return whole


class RMSNorm(nn.Module):
    """x / rms(x) * weight; the mean square is accumulated in float32 whatever the dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


# ----------------------------------------------------------------------------- rotary embeddings
# Each head's vector is split into two halves (x1, x2) and rotated pairwise: (x1_i, x2_i) by the
# angle pos * freq_i, giving (x1 cos - x2 sin, x2 cos + x1 sin). This is the Hugging Face
# ("rotate half") layout. llama.cpp uses the interleaved layout (x_2i, x_2i+1) instead and
# reorders q/k rows on conversion; checkpoint.py undoes that reordering, so one rotary function
# serves every checkpoint.

def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), with Llama 3.1 or linear context scaling. (head_dim // 2,)"""
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim)
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: leave high frequencies alone, divide low ones by `factor`, blend in between.
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    elif kind != "default":
        raise ValueError(f"unsupported rope scaling type {kind!r}: expected default, linear or llama3")
    return inv_freq.float()


def rope_tables(args: ModelArgs, inv_freq: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for every position, each (max_seq_len, head_dim), float32.

    The sin table carries the sign of the rotation: -sin on the first half, +sin on the second."""
    pos = torch.arange(args.max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(pos, inv_freq.to(device))            # (max_seq_len, head_dim // 2)
    sin = angles.sin()
    return torch.cat([angles.cos()] * 2, dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim) by per-position cos/sin (B, 1, T, head_dim):
    x cos + (x2, x1) sin, where (x2, x1) is x rolled by half a head and sin holds the signs."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


# ----------------------------------------------------------------------------- attention
class KVCache(nn.Module):
    """Keys and values of past positions, preallocated once: (B, n_kv_heads, max_len, head_dim)."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) at positions start..start+T; return everything up to there."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep these batch rows, in this order: finished sequences leave the batch, and a prompt
        prefilled once is copied for each of its samples."""
        self.k, self.v = self.k[rows], self.v[rows]


class Attention(nn.Module):
    """Grouped-query attention: n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q = Linear(args.dim, args.n_heads * args.head_dim, bias=args.attn_bias)
        self.k = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.attn_bias)
        self.v = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.attn_bias)
        self.o = Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, start: int = 0):
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv_heads
        qkv = project(x, (self.q, self.k, self.v)).view(B, T, H + 2 * Hkv, self.head_dim).transpose(1, 2)
        qk = apply_rope(qkv[:, :H + Hkv], cos, sin)          # queries and keys rotate alike
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]     # (B, heads, T, hd), heads = H or Hkv
        if cache is not None:
            k, v = cache.update(start, k, v)                 # (B, Hkv, start+T, hd)
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            q, k, v = q.float(), k.float(), v.float()  # CPU attention kernels are much slower in 16 bits
        # mask None means plain causal attention over T == S positions (or one query over all keys)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=Hkv != H).to(x.dtype)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = Linear(args.dim, args.hidden_dim, bias=False)
        self.up = Linear(args.dim, args.hidden_dim, bias=False)
        self.down = Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, (self.gate, self.up)).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_rope(rope_frequencies(args))

    def init_rope(self, inv_freq: torch.Tensor) -> None:
        """(Re)build the rotary tables on the model's device; not part of the checkpoint."""
        cos, sin = rope_tables(self.args, inv_freq, self.tok_embeddings.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def new_cache(self, batch: int, max_len: int) -> list[KVCache]:
        """One KVCache per layer; float32 on CPU, where attention is computed in float32."""
        a, w = self.args, self.tok_embeddings.weight
        dtype = torch.promote_types(w.dtype, torch.float32) if w.device.type == "cpu" else w.dtype
        return [KVCache(batch, max_len, a.n_kv_heads, a.head_dim, dtype, w.device) for _ in self.layers]

    def forward(self, tokens: torch.Tensor, pad: torch.Tensor | None = None,
                cache: list[KVCache] | None = None, start: int = 0, last: int | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens (B, T) sitting at cache slots start..start+T.

        pad (B,) counts the left-padding slots of each row: row b's real tokens begin at slot
        pad[b], so its position ids are slot - pad[b] and its padding is never attended to.
        last: compute logits for the last `last` positions only (the output head is the
        biggest matmul of a small model; prefill needs one position, the trainer the response).
        Without a cache this is the plain differentiable forward pass the trainer uses.
        """
        B, T = tokens.shape
        if start + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context length {self.args.max_seq_len}")
        slots = torch.arange(start, start + T, device=tokens.device)
        positions = slots.expand(B, T) if pad is None else (slots - pad[:, None]).clamp(min=0)
        window = self.args.sliding_window
        needs_mask = pad is not None or (start > 0 and T > 1) or window is not None
        mask = attention_mask(slots, pad, window) if needs_mask else None
        x = self.hidden(tokens, positions, mask, cache, start)
        return self.head(x if last is None else x[:, -last:])

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
               cache: list[KVCache] | None = None, start: int = 0) -> torch.Tensor:
        """The blocks: hidden states (B, T, dim) of tokens at the given position ids, attending
        where mask (B or 1, 1, T, S) is True (None: plain causal)."""
        cos = self.rope_cos[positions].unsqueeze(1).to(self.norm.weight.dtype)  # (B, 1, T, hd)
        sin = self.rope_sin[positions].unsqueeze(1).to(self.norm.weight.dtype)
        x = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, None if cache is None else cache[i], start)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and output layer: logits in float32 (or 64) for the softmax."""
        logits = self.output(self.norm(x))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


def attention_mask(slots: torch.Tensor, pad: torch.Tensor | None, window: int | None) -> torch.Tensor:
    """Boolean (B or 1, 1, T, S) mask: query slot i sees key slot j <= i that is not padding.

    A padding query sees itself only, so no row is empty (an all-False row gives NaN).
    """
    keys = torch.arange(int(slots[-1]) + 1, device=slots.device)
    q, k = slots[:, None], keys[None, :]                           # (T, 1), (1, S)
    mask = (k <= q)[None, None]                                    # (1, 1, T, S)
    if window:
        mask = mask & (k > q - window)
    if pad is not None:
        real = keys[None, :] >= pad[:, None]                       # (B, S): key is not padding
        mask = (mask & real[:, None, None, :]) | (k == q)[None, None]
    return mask


# ----------------------------------------------------------------------------- generation
@dataclass
class Completion:
    tokens: list[int]                                     # generated ids, including a final stop token
    text: str                                             # decoded, cut before any stop string
    logprobs: list[float] = field(default_factory=list)   # log p(token) under the model (temperature 1)
    finish: str = "length"                                # "stop" (EOS or stop string) or "length"


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """Next tokens (B,) from last-position logits (B, vocab): greedy at temperature 0, else nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p          # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align prompts of different lengths: tokens (B, T) and pad counts (B,)."""
    T = max(len(p) for p in prompts)
    tokens = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], device=device)
    pad = torch.tensor([T - len(p) for p in prompts], device=device)
    return tokens, pad


def generate_all(model: Transformer, tokenizer, prompts: list[list[int]], batch_size: int, desc: str = "generate",
                 on_batch=None, refill: bool = False, **kwargs) -> list[Completion]:
    """generate() over many prompts in batches of similar length (less padding), with a progress bar.
    Results come back in the prompts' order; kwargs go to generate(). on_batch(indices, completions),
    if given, sees each batch as it finishes (to save work as it is done). refill: run generate_many()
    instead, where a finished row takes the next waiting prompt (no on_batch there)."""
    if refill:
        if on_batch:
            raise ValueError("on_batch needs batches that finish together: refill has none")
        return generate_many(model, tokenizer, prompts, batch_size, desc, **kwargs)
    from tqdm import tqdm
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


@torch.inference_mode()
def generate(model: Transformer, tokenizer, prompts: list[list[int]], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, stop_strings: tuple[str, ...] = (),
             generator: torch.Generator | None = None) -> list[Completion]:
    """Continue every prompt (a list of token ids) in one batch: prefill, then decode one token at a time."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no prompt may be empty")
    device, ctx = model.tok_embeddings.weight.device, model.args.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest >= ctx:
        raise ValueError(f"prompt of {longest} tokens does not fit the context length {ctx}")
    max_new_tokens = min(max_new_tokens, ctx - longest)
    # identical prompts (a trainer's samples of one prompt) are prefilled once, then their rows copied
    distinct: dict[tuple[int, ...], int] = {}
    row_of = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    tokens, pad = left_pad([list(p) for p in distinct], tokenizer.pad_id, device)
    T = tokens.shape[1]
    pad = None if bool((pad == 0).all()) else pad
    cache = model.new_cache(len(distinct), T + max_new_tokens)
    logits = model(tokens, pad, cache, 0, last=1)[:, -1]       # prefill: the whole prompt at once
    if len(distinct) < len(prompts):
        copy = torch.tensor(row_of, device=device)
        logits, pad = logits[copy], None if pad is None else pad[copy]
        for layer_cache in cache:
            layer_cache.keep_rows(copy)
    B = len(prompts)
    out = [Completion([], "") for _ in prompts]
    rows = list(range(B))  # rows[i]: which prompt row i of the shrinking batch belongs to
    for step in range(max_new_tokens):
        next_tok = sample(logits, temperature, top_p, generator)
        next_lp = torch.log_softmax(logits, dim=-1).gather(-1, next_tok[:, None]).squeeze(-1)
        ids, lps = next_tok.tolist(), next_lp.tolist()            # one device sync per step
        alive = []
        for i, b in enumerate(rows):
            c = out[b]
            c.tokens.append(ids[i])
            c.logprobs.append(lps[i])
            if ids[i] in tokenizer.stop_ids or stop_strings and _hit_stop_string(c, tokenizer, stop_strings):
                c.finish = "stop"
            else:
                alive.append(i)
        if not alive or step == max_new_tokens - 1:
            break
        if len(alive) < len(rows):  # drop finished rows: later steps only compute the live ones
            keep = torch.tensor(alive, device=device)
            rows, next_tok = [rows[i] for i in alive], next_tok[keep]
            pad = None if pad is None else pad[keep]
            for layer_cache in cache:
                layer_cache.keep_rows(keep)
        logits = model(next_tok[:, None], pad, cache, T + step)[:, -1]  # decode one token
    for c in out:
        text = tokenizer.decode([t for t in c.tokens if t not in tokenizer.stop_ids])
        c.text = _cut_at_stop(text, stop_strings)
    return out


def _hit_stop_string(c: Completion, tokenizer, stop_strings) -> bool:
    tail = tokenizer.decode(c.tokens[-16:])  # a stop string a few characters long ends in the last tokens
    return any(s in tail for s in stop_strings)


def _cut_at_stop(text: str, stop_strings) -> str:
    cuts = [text.find(s) for s in stop_strings if s in text]
    return text[:min(cuts)] if cuts else text


# ----------------------------------------------------------------------------- many sequences: continuous batching
# generate() runs one batch to its end: a row that finishes leaves and the batch shrinks, so a batch
# of 32 samples whose longest runs 256 tokens ends with a few rows, each step as slow per token as
# the full batch's. generate_many keeps batch_size rows busy instead: a finished row takes the next
# waiting sequence at once (continuous batching, as vLLM does). Every row sits at its own position in
# one preallocated cache (RowCache), the prompt left-aligned at slot 0; a prompt is prefilled once
# and its keys and values copied into the rows of its samples; and each row's next token is drawn
# with one uniform number (draw) instead of torch.multinomial's one random number per vocabulary
# entry (at batch 64 and a 49,152-token vocabulary that was a third of a decode step).

def draw(weights: torch.Tensor, generator=None, block: int = 512) -> torch.Tensor:
    """Indices (B,) drawn from unnormalised non-negative weights (B, V) by inverting their CDF with one
    uniform number per row: first a block of `block` entries by the blocks' sums, then an entry within
    it, each running sum in float64 (one float32 running sum over 49,152 entries would round small
    probabilities away)."""
    B, V = weights.shape
    w = (F.pad(weights, (0, -V % block)) if V % block else weights).view(B, -1, block)  # (B, blocks, block)
    block_cdf = w.sum(-1).double().cumsum(-1)                                   # (B, blocks)
    u = torch.rand(B, 1, dtype=torch.float64, generator=generator, device=w.device) * block_cdf[:, -1:]
    j = first_above(block_cdf, u)
    u = u - torch.where(j > 0, block_cdf.gather(-1, (j - 1).clamp(min=0)), 0.0)   # what is left inside block j
    i = first_above(w[torch.arange(B, device=w.device), j[:, 0]].cumsum(-1, dtype=torch.float64), u)
    return (j * block + i).squeeze(-1)


def first_above(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose running sum cdf (B, n) exceeds u (B, 1): never an entry of zero
    weight. Where rounding leaves u at or past the total, the last entry with weight. (B, 1)"""
    return torch.minimum(torch.searchsorted(cdf, u, right=True), torch.searchsorted(cdf, cdf[:, -1:].contiguous()))


def sample_rows(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens (B,) from logits (B, vocab), and their log-probabilities at temperature 1 (B,).
    The distribution is sample()'s (greedy at temperature 0, else nucleus), drawn with draw().
    logits is overwritten: it is a decode step's biggest tensor, and no copy of it is made."""
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, (logits.gather(-1, tokens[:, None]) - torch.logsumexp(logits, -1, keepdim=True)).squeeze(-1)
    log_z = torch.logsumexp(logits, -1, keepdim=True) if temperature != 1 else None   # (B, 1)
    top = logits.amax(-1, keepdim=True)
    w = logits.sub_(top)
    w = (w if temperature == 1 else w.div_(temperature)).exp_()   # softmax(logits / T), unnormalised, in place
    if log_z is None:
        log_z = top + w.sum(-1, keepdim=True).log()
    if top_p < 1.0:
        kept, order = w.sort(dim=-1, descending=True)
        cum = kept.cumsum(-1, dtype=torch.float64)
        kept.masked_fill_(cum - kept > top_p * cum[:, -1:], 0.0)  # keep the smallest set reaching top_p
        tokens = order.gather(-1, draw(kept, generator)[:, None]).squeeze(-1)
    else:
        tokens = draw(w, generator)
    logit = top + temperature * w.gather(-1, tokens[:, None]).log()   # the weight is exp((logit - top) / T)
    return tokens, (logit - log_z).squeeze(-1)


@dataclass
class Rows:
    """Where the rows of a running batch are, shared by every layer's RowCache."""
    at: torch.Tensor                   # (B,) slot of each row's current token = tokens already cached
    end: int = 0                       # slots attended over this step: the largest live `at` + 1


class RowCache:
    """A KVCache whose rows are at positions of their own: the token of row b is written at slot
    rows.at[b]. What a row may see is the attention mask's business (generate_many builds it)."""

    def __init__(self, cache: KVCache, rows: Rows):
        self.k, self.v, self.rows = cache.k, cache.v, rows

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, 1, hd) at each row's own slot; return slots 0..end for every row."""
        B, n_kv, length, hd = self.k.shape
        # the flat index of (row b, head h, slot at[b]) in the cache seen as (B * n_kv * length, hd)
        where = ((torch.arange(B * n_kv, device=k.device) * length).view(B, n_kv) + self.rows.at[:, None]).view(-1)
        # the cache may be float32 under a bfloat16 model (on the CPU attention computes in float32)
        self.k.view(-1, hd).index_copy_(0, where, k.reshape(-1, hd).to(self.k.dtype))
        self.v.view(-1, hd).index_copy_(0, where, v.reshape(-1, hd).to(self.v.dtype))
        return self.k[:, :, :self.rows.end], self.v[:, :, :self.rows.end]

    def load(self, slots: torch.Tensor, prefix: KVCache) -> None:
        """Rows `slots` take a prefilled prompt's keys and values (1, n_kv, length, hd), at slots 0..length."""
        n = prefix.k.shape[2]
        self.k[slots, :, :n] = prefix.k
        self.v[slots, :, :n] = prefix.v

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.k, self.v = self.k[rows], self.v[rows]


@torch.inference_mode()
def generate_many(model: Transformer, tokenizer, prompts: list[list[int]], batch_size: int, desc: str = "generate",
                  max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                  stop_strings: tuple[str, ...] = (), generator: torch.Generator | None = None) -> list[Completion]:
    """generate_all()'s results (one Completion per prompt, in the prompts' order) by continuous
    batching: at most batch_size rows decode together, and a finished row takes the next waiting
    prompt. Each prompt stops as generate() alone would stop it (a stop token, a stop string, or
    max_new_tokens, capped by the context); sampling draws one uniform number per row and token."""
    from collections import Counter, deque
    from tqdm import tqdm
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_many needs at least one prompt, and no prompt may be empty")
    device, ctx = model.tok_embeddings.weight.device, model.args.max_seq_len
    if max(map(len, prompts)) >= ctx:
        raise ValueError(f"prompt of {max(map(len, prompts))} tokens does not fit the context length {ctx}")
    budget = [min(max_new_tokens, ctx - len(p)) for p in prompts]
    waiting = deque(sorted(range(len(prompts)), key=lambda i: len(prompts[i])))  # a prompt's samples side by side
    left = Counter(tuple(p) for p in prompts)                # samples of each prompt not yet started
    prefixes: dict[tuple[int, ...], tuple[list[KVCache], torch.Tensor]] = {}
    B = min(batch_size, len(prompts))
    rows = Rows(at=torch.zeros(B, dtype=torch.long, device=device))
    cache = [RowCache(c, rows) for c in model.new_cache(B, max(len(p) + n for p, n in zip(prompts, budget)))]
    out = [Completion([], "") for _ in prompts]
    who: list[int | None] = [None] * B                       # who[b]: the prompt that row b is generating
    tokens = torch.zeros(B, dtype=torch.long, device=device)  # each row's current token, fed next step
    bar = tqdm(total=len(prompts), desc=desc, leave=False)

    def prefix(p: tuple[int, ...], n: int) -> tuple[list[KVCache], torch.Tensor]:
        """The prompt's keys and values and its last logits (1, vocab), prefilled once for all its
        samples; n of them start now, and the last one to start frees it."""
        if p not in prefixes:
            c = model.new_cache(1, len(p))
            prefixes[p] = c, model(torch.tensor([p], device=device), None, c, 0, last=1)[:, -1]
        left[p] -= n
        return prefixes.pop(p) if left[p] == 0 else prefixes[p]

    def record(b: int, token: int, logprob: float) -> None:
        """Row b's new token; a finished row is emptied for the next prompt."""
        i = who[b]
        c = out[i]
        c.tokens.append(token)
        c.logprobs.append(logprob)
        if token in tokenizer.stop_ids or stop_strings and _hit_stop_string(c, tokenizer, stop_strings):
            c.finish = "stop"
        if c.finish == "stop" or len(c.tokens) >= budget[i]:
            who[b] = None
            bar.update(1)

    def fill() -> None:
        """Every empty row takes a waiting prompt: its prompt's cache, and its first token."""
        while waiting and None in who:
            groups: dict[tuple[int, ...], list[int]] = {}      # distinct prompt -> the rows starting it
            for b in [b for b, i in enumerate(who) if i is None][:len(waiting)]:
                who[b] = waiting.popleft()
                groups.setdefault(tuple(prompts[who[b]]), []).append(b)
            first = []
            for p, slots in groups.items():
                kv, logits = prefix(p, len(slots))
                for c, pc in zip(cache, kv):
                    c.load(torch.tensor(slots, device=device), pc)
                first.append(logits.expand(len(slots), -1))
            started = [b for slots in groups.values() for b in slots]
            rows.at[started] = torch.tensor([len(prompts[who[b]]) for b in started], device=device)
            tokens[started], lps = sample_rows(torch.cat(first), temperature, top_p, generator)
            for b, t, lp in zip(started, tokens[started].tolist(), lps.tolist()):
                if budget[who[b]] > 0:
                    record(b, t, lp)
                else:  # nothing to generate
                    who[b] = None
                    bar.update(1)

    fill()
    while any(i is not None for i in who):
        live = [b for b in range(len(who)) if who[b] is not None]
        if not waiting and len(live) <= 3 * len(who) // 4:  # nothing to refill with: drop the empty rows
            keep = torch.tensor(live, device=device)
            for c in cache:
                c.keep_rows(keep)
            rows.at, tokens, who = rows.at[keep], tokens[keep], [who[b] for b in live]
            live = list(range(len(live)))
        rows.end = int(rows.at[live].max()) + 1
        mask = (torch.arange(rows.end, device=device) <= rows.at[:, None])[:, None, None, :]  # (B, 1, 1, end)
        logits = model.head(model.hidden(tokens[:, None], rows.at[:, None], mask, cache))[:, -1]
        rows.at[live] += 1
        tokens, lps = sample_rows(logits, temperature, top_p, generator)
        for b, t, l in zip(live, *(x.tolist() for x in (tokens[live], lps[live]))):
            record(b, t, l)
        fill()
    bar.close()
    for c in out:
        c.text = _cut_at_stop(tokenizer.decode([t for t in c.tokens if t not in tokenizer.stop_ids]), stop_strings)
    return out


# ----------------------------------------------------------------------------- command line
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of every command line: the description's line breaks kept, every default shown but
    None (there the flag's help says what it means)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def main(prompt: str, max_new_tokens: int, chat: bool, model_path: str | None, device: str, dtype: str,
         temperature: float, top_p: float, seed: int) -> None:
    from checkpoint import load  # loading sits in checkpoint.py; imported here to keep the model readable
    from cli import fail
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    try:
        model, tokenizer = load(model_path, device=device, dtype=dtype)
    except (ValueError, FileNotFoundError) as e:  # a model file that is corrupt or not a Llama's: one line
        fail(str(e))
    print(f"loaded in {time.perf_counter() - t0:.1f}s")
    ids = tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat else tokenizer.encode(prompt, bos=tokenizer.add_bos)
    gen = torch.Generator(model.tok_embeddings.weight.device).manual_seed(seed)
    t0 = time.perf_counter()
    [c] = generate(model, tokenizer, [ids], max_new_tokens, temperature, top_p, generator=gen)
    dt = time.perf_counter() - t0
    print(("" if chat else prompt) + c.text)
    print(f"[{len(c.tokens)} tokens in {dt:.2f}s, {len(c.tokens) / dt:.1f} tok/s, finish={c.finish}]")


if __name__ == "__main__":
    import cli  # the flags' types: the command line's, not the model's
    p = argparse.ArgumentParser(description="Generate text with a pretrained Llama-family model.",
                                formatter_class=HelpFormatter)
    p.add_argument("--prompt", type=cli.non_empty, required=True,
                   help="text to continue (or the user message with --chat)")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=64, help="number of tokens to generate at most")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--model", dest="model_path", type=cli.model_path, default=None,
                   help="a .gguf file or a Hugging Face checkpoint folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", type=cli.device, default="auto", help="cpu, cuda, cuda:1, mps (auto: cuda if available)")
    p.add_argument("--dtype", choices=cli.DTYPES, default="auto",
                   help="float32, bfloat16 or float16 (auto: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--temperature", type=cli.non_negative_float, default=0.0, help="0 means greedy decoding")
    p.add_argument("--top-p", type=cli.probability, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=cli.seed, default=0, help="seed for sampling")
    main(**vars(p.parse_args()))
