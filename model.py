"""A Llama in one file: the model and generation (paper section 3: every weight matrix W of
this network is what SVF decomposes).

It covers the Llama family: Llama 2 and 3 (with Llama 3.1/3.2 rope scaling), Mistral,
TinyLlama, SmolLM/SmolLM2, and the q/k/v biases of Qwen2. Read it top to bottom:

    ModelArgs -> RMSNorm -> rotary embeddings -> Attention (+ KVCache) -> FeedForward
    -> Block -> Transformer -> generation (sample, prefill, decode_one, generate)

Loading pretrained weights lives in checkpoint.py, the CPU speed path in fast.py, batched
generation for many prompts in engine.py, and the command line in generate.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from completion import Completion, add_token, finish_text


@dataclass
class ModelArgs:
    dim: int = 576                    # width of the residual stream
    n_layers: int = 30                # number of transformer blocks
    n_heads: int = 9                  # query heads
    n_kv_heads: int = 3               # key/value heads (grouped-query attention when fewer)
    vocab_size: int = 49152
    hidden_dim: int = 1536            # inner width of the SwiGLU feed-forward
    head_dim: int = 0                 # 0: dim // n_heads (some models set it explicitly)
    norm_eps: float = 1e-5            # RMSNorm epsilon
    rope_theta: float = 10000.0       # base of the rotary frequencies
    rope_scaling: dict | None = None  # Llama 3.1 {"rope_type": "llama3", ...} or "linear"
    max_seq_len: int = 2048           # context length: rotary table and KV cache length
    tie_embeddings: bool = False      # output head shares the token embeddings (SmolLM2)
    attn_bias: bool = False           # q/k/v projections have biases (Qwen2)
    sliding_window: int | None = None  # Mistral v0.1: attend only to the last N tokens

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of "
                             f"n_kv_heads={self.n_kv_heads}")


# Every matrix product of the model, and of svf.py's and lora.py's wrappers, is model.linear;
# the layers that read the same input (q/k/v, gate/up) are run by model.project. Both are plain
# torch here; fast.enable() swaps in CPU-tuned versions, so the speed path is one visible call.
linear = F.linear


def project(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> torch.Tensor:
    """x through several layers that read it, their outputs side by side."""
    return torch.cat([layer(x) for layer in layers], dim=-1)


class Linear(nn.Linear):
    """nn.Linear computed by model.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """x / rms(x) * weight; the mean square is accumulated in float32 whatever the dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


# ----------------------------------------------------------------------------- rotary embeddings
# Each head's vector is split into halves (x1, x2), rotated pairwise by the angle pos * freq_i:
# (x1 cos - x2 sin, x2 cos + x1 sin), the Hugging Face ("rotate half") layout. llama.cpp
# interleaves the pairs instead; checkpoint.py undoes its q/k row order, so one rotary serves all.

def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), with Llama 3.1 or linear scaling. (head_dim // 2,)"""
    i = torch.arange(0, args.head_dim, 2, dtype=torch.float64)
    inv_freq = 1.0 / args.rope_theta ** (i / args.head_dim)
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between
        factor, lo = scaling["factor"], scaling["low_freq_factor"]
        hi = scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    elif kind != "default":
        raise ValueError(f"unsupported rope scaling type {kind!r}: "
                         "expected default, linear or llama3")
    return inv_freq.float()


def rope_tables(args: ModelArgs, inv_freq: torch.Tensor, device=None):
    """cos and signed sin for every position, each (max_seq_len, head_dim), float32; the sin
    table carries the rotation's sign: -sin on the first half, +sin on the second."""
    pos = torch.arange(args.max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(pos, inv_freq.to(device))            # (max_seq_len, head_dim // 2)
    sin = angles.sin()
    return torch.cat([angles.cos()] * 2, dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, hd) by per-position cos/sin (B, 1, T, hd): x cos + (x2, x1) sin,
    where (x2, x1) is x rolled by half a head and sin holds the signs."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


# ----------------------------------------------------------------------------- attention
class KVCache(nn.Module):
    """Keys and values of past positions, preallocated once: (B, n_kv, max_len, head_dim)."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, n_kv, T, hd) at slots start..start+T; return everything up to there."""
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
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim = (
            args.n_heads, args.n_kv_heads, args.head_dim)
        self.q = Linear(args.dim, H * hd, bias=args.attn_bias)
        self.k = Linear(args.dim, Hkv * hd, bias=args.attn_bias)
        self.v = Linear(args.dim, Hkv * hd, bias=args.attn_bias)
        self.o = Linear(H * hd, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, start: int = 0):
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv_heads
        qkv = project(x, (self.q, self.k, self.v)).view(B, T, H + 2 * Hkv, self.head_dim)
        qkv = qkv.transpose(1, 2)
        qk = apply_rope(qkv[:, :H + Hkv], cos, sin)       # queries and keys rotate alike
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(start, k, v)              # (B, Hkv, start+T, hd)
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            q, k, v = q.float(), k.float(), v.float()  # CPU attention is slow in 16 bits
        # mask None: plain causal over T == S positions (or one query over all keys)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           is_causal=mask is None and T > 1,
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
        return [KVCache(batch, max_len, a.n_kv_heads, a.head_dim, dtype, w.device)
                for _ in self.layers]

    def forward(self, tokens: torch.Tensor, pad: torch.Tensor | None = None,
                cache: list[KVCache] | None = None, start: int = 0,
                last: int | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens (B, T) sitting at cache slots start..start+T.

        pad (B,) counts each row's left padding: row b's real tokens begin at slot pad[b], so
        its position ids are slot - pad[b] and its padding is never attended to. last: logits
        of the last `last` positions only (the output head is a small model's biggest matmul).
        Without a cache this is the plain differentiable forward pass the trainer uses.
        """
        B, T = tokens.shape
        if start + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context length "
                             f"{self.args.max_seq_len}")
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


def attention_mask(slots: torch.Tensor, pad: torch.Tensor | None, window: int | None):
    """Boolean (B or 1, 1, T, S) mask: query slot i sees key slot j <= i that is not padding.
    A padding query sees itself only, so no row is empty (an all-False row gives NaN)."""
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
# (what a generation returns, and when it stops, is completion.py)
def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator=None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, vocab): greedy at temperature 0, else nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align prompts of different lengths: tokens (B, T) and pad counts (B,)."""
    T = max(len(p) for p in prompts)
    tokens = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], device=device)
    pad = torch.tensor([T - len(p) for p in prompts], device=device)
    return tokens, pad


def check_prompts(model: Transformer, prompts: list[list[int]]) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generation needs at least one prompt, and no prompt may be empty")
    longest, ctx = max(len(p) for p in prompts), model.args.max_seq_len
    if longest >= ctx:
        raise ValueError(f"prompt of {longest} tokens does not fit the context length {ctx}")


def prefill(model: Transformer, prompts: list[list[int]], max_new_tokens: int, pad_id: int):
    """The whole prompts at once into a new cache: last logits (B, vocab), pad counts (or
    None), the cache. Identical prompts (a trainer's samples of one prompt) are computed once
    and their rows copied."""
    device = model.tok_embeddings.weight.device
    distinct: dict[tuple[int, ...], int] = {}
    row_of = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    tokens, pad = left_pad([list(p) for p in distinct], pad_id, device)
    pad = None if bool((pad == 0).all()) else pad
    cache = model.new_cache(len(distinct), tokens.shape[1] + max_new_tokens)
    logits = model(tokens, pad, cache, 0, last=1)[:, -1]
    if len(distinct) < len(prompts):
        copy = torch.tensor(row_of, device=device)
        logits, pad = logits[copy], None if pad is None else pad[copy]
        for layer_cache in cache:
            layer_cache.keep_rows(copy)
    return logits, pad, cache


def decode_one(model: Transformer, tokens: torch.Tensor, pad, cache, slot: int) -> torch.Tensor:
    """One new token (B,) per row at cache slot `slot`: the next logits (B, vocab)."""
    return model(tokens[:, None], pad, cache, slot)[:, -1]


@torch.inference_mode()
def generate(model: Transformer, tokenizer, prompts: list[list[int]], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, stop_strings: tuple[str, ...] = (),
             generator: torch.Generator | None = None) -> list[Completion]:
    """Continue every prompt (token ids) in one batch: prefill, then one token at a time."""
    check_prompts(model, prompts)
    device, T = model.tok_embeddings.weight.device, max(len(p) for p in prompts)
    max_new_tokens = min(max_new_tokens, model.args.max_seq_len - T)
    logits, pad, cache = prefill(model, prompts, max_new_tokens, tokenizer.pad_id)
    out = [Completion([], "") for _ in prompts]
    rows = list(range(len(prompts)))  # rows[i]: the prompt that row i of the batch continues
    for step in range(max_new_tokens):
        next_tok = sample(logits, temperature, top_p, generator)
        next_lp = torch.log_softmax(logits, dim=-1).gather(-1, next_tok[:, None]).squeeze(-1)
        ids, lps = next_tok.tolist(), next_lp.tolist()  # one device sync per step
        alive = [i for i, b in enumerate(rows) if not add_token(out[b], ids[i], lps[i],
                                                                tokenizer, stop_strings)]
        if not alive or step == max_new_tokens - 1:
            break
        if len(alive) < len(rows):  # drop finished rows: later steps compute live ones only
            keep = torch.tensor(alive, device=device)
            for layer_cache in cache:
                layer_cache.keep_rows(keep)
            rows, next_tok = [rows[i] for i in alive], next_tok[keep]
            pad = None if pad is None else pad[keep]
        logits = decode_one(model, next_tok, pad, cache, T + step)
    for c in out:
        finish_text(c, tokenizer, stop_strings)
    return out
