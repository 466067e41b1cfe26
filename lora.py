"""LoRA (Hu et al. 2021), the baseline Transformer-Squared compares SVF against (paper section 4).

Every adapted weight matrix W (out, in) gets a low-rank update, trained while W stays frozen:

    W' = W + (alpha / r) B A        A: (r, in), B: (out, r)

A starts random and B at zero, so a fresh adapter is the base model exactly. The paper's
baseline used r = 16, alpha = 32 and dropout 0.05 on the query and value projections; that
is the default here. Same shape of code as svf.py, so the trainer can drive either:

    attach(model, LoRAConfig())            # targets become LoRALinear wrappers (A None: base)
    params = init_params(model, seed)      # {"layers.0.attention.q.A": (r, in), "...B": (out, r)}
    train_ab(model, params, generator)     # differentiable in A and B, dropout from `generator`
    use_adapter(model, adapter.params)     # merged W' composed once: no extra cost per token
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

import model as llama  # llama.linear: the model's one matrix product (fast.py may swap it)
import svf
from replies import micro_batches, reply_logprobs
from svf import read_tensors, save_tensors

TARGETS = {  # which matrices of each block LoRA adapts; never embeddings, output head or norms
    "qv": ("attention.q", "attention.v"),
    "attn": ("attention.q", "attention.k", "attention.v", "attention.o"),
    "mlp": ("mlp.gate", "mlp.up", "mlp.down"),
}
TARGETS["all"] = TARGETS["attn"] + TARGETS["mlp"]


@dataclass
class LoRAConfig:
    rank: int = 16          # r: the rank of the update B A
    # the update is scaled by alpha / r, so changing r keeps its size comparable
    alpha: float = 32.0
    dropout: float = 0.05   # dropout on the adapter's input only (the base path never sees it)
    targets: str = "qv"     # a key of TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def target_names(model: nn.Module, targets: str) -> list[str]:
    """Module names of the adapted linears, e.g. 'layers.0.attention.q'."""
    if targets not in TARGETS:
        raise ValueError(f"unknown LoRA targets {targets!r}: choose {', '.join(TARGETS)}")
    return [f"layers.{i}.{t}" for i in range(len(model.layers)) for t in TARGETS[targets]]


# ----------------------------------------------------------------------------- the adapted layer
class LoRALinear(nn.Module):
    """Wraps a base linear (model.Linear / nn.Linear): y = base(x) + scale * dropout(x) A^T B^T.

    Three modes: base (A None), training (the low-rank path computed beside the frozen base in
    every forward, so gradients reach A and B only; dropout when p > 0 and a generator is set)
    and inference (the merged W + scale B A composed once, no dropout).
    """

    def __init__(self, base: nn.Linear, rank: int, scale: float, p: float):
        super().__init__()
        self.base, self.rank, self.scale, self.p = base, rank, scale, p
        # plain tensors, not Parameters: the model's parameters stay the base model's alone
        self.A: torch.Tensor | None = None        # (rank, in)
        self.B: torch.Tensor | None = None        # (out, rank)
        self.merged: torch.Tensor | None = None   # (out, in)
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged is not None:
            return llama.linear(x, self.merged, self.base.bias)
        y = llama.linear(x, self.base.weight, self.base.bias)
        if self.A is None:
            return y
        # the small path in the adapter's float32 (or float64) even under a bfloat16 base, as in
        # PEFT
        h = x.to(torch.promote_types(x.dtype, self.A.dtype))
        if self.p > 0 and self.generator is not None:
            # an explicit generator, not nn.Dropout: a resumed run restores its state and draws the
            # same masks
            keep = torch.rand(h.shape, generator=self.generator, device=h.device) >= self.p
            h = h * keep / (1 - self.p)
        # (..., rank) then (..., out)
        delta = llama.linear(llama.linear(h, self.A.to(h.dtype)), self.B.to(h.dtype))
        return y + (self.scale * delta).to(y.dtype)


def attach(model: nn.Module, cfg: LoRAConfig) -> None:
    """Replace each target linear by a LoRALinear wrapper (idempotent); the base model is
    unchanged."""
    for name in target_names(model, cfg.targets):
        m = model.get_submodule(name)
        if isinstance(m, LoRALinear):
            # the scale belongs to the trained A and B: silently changing it would change the
            # adapter
            if (m.rank, m.scale) != (cfg.rank, cfg.scale):
                raise ValueError(f"{name} already carries LoRA rank {m.rank}, scale {m.scale}; "
                                 f"this config asks rank {cfg.rank}, scale {cfg.scale} "
                                 "(alpha / rank): use a fresh model")
            # dropout only matters in training, so it may follow the newest config
            m.p = cfg.dropout
        elif isinstance(m, nn.Linear):  # model.Linear is one
            parent, child = name.rsplit(".", 1)
            wrapped = LoRALinear(m, cfg.rank, cfg.scale, cfg.dropout)
            setattr(model.get_submodule(parent), child, wrapped)
        else:
            raise ValueError(f"{name} is already wrapped by {type(m).__name__}: LoRA wraps plain "
                             "linears only, not another adapter (SVF and LoRA cannot adapt the "
                             "same matrix)")


def wrappers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def init_params(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fresh adapter: A kaiming-uniform (a = sqrt(5), as nn.Linear and PEFT), B zeros, so B A = 0.

    Drawn on the CPU from its own generator, then moved: the same seed gives the same A on every
    device.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in wrappers(model).items():
        w = m.base.weight  # (out, in)
        A = torch.empty(m.rank, w.shape[1])
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)  # U(-1/sqrt(in), 1/sqrt(in))
        out[f"{n}.A"] = A.to(w.device)
        out[f"{n}.B"] = torch.zeros(w.shape[0], m.rank, device=w.device)
    return out


def count_params(model: nn.Module) -> int:
    """Trainable numbers of a LoRA adapter: rank * (in + out) summed over adapted matrices."""
    return sum(m.rank * sum(m.base.weight.shape) for m in wrappers(model).values())


def train_ab(model: nn.Module, params: dict[str, torch.Tensor] | None,
             generator: torch.Generator | None = None) -> None:
    """Compute the low-rank path from A and B in every forward (autograd flows into them); None:
    the base.

    generator (on the model's device) draws the dropout masks; without one there is no dropout.
    """
    if params is not None:
        check_params(model, params)
    for n, m in wrappers(model).items():
        m.merged, m.generator = None, (None if params is None else generator)
        # views, not the Parameters themselves: nn.Module would register a Parameter as the model's
        # own
        m.A = None if params is None else params[f"{n}.A"].view_as(params[f"{n}.A"])
        m.B = None if params is None else params[f"{n}.B"].view_as(params[f"{n}.B"])


def use_adapter(model: nn.Module, params: dict[str, torch.Tensor] | None) -> None:
    """Answer with the merged weights W + scale B A, composed once in float32 (or float64) and
    stored in the base weight's dtype; None goes back to the base."""
    if params is not None:
        check_params(model, params)
    for n, m in wrappers(model).items():
        m.A, m.B, m.generator, m.merged = None, None, None, None
        if params is not None:
            w = m.base.weight
            dt = torch.promote_types(w.dtype, torch.float32)
            with torch.no_grad():
                # (out, rank) @ (rank, in)
                delta = params[f"{n}.B"].to(dt) @ params[f"{n}.A"].to(dt)
                m.merged = (w.to(dt) + m.scale * delta).to(w.dtype)


def check_params(model: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Same keys and shapes as the attached wrappers, else a ValueError naming the first
    offender."""
    want = {}
    for n, m in wrappers(model).items():
        out_f, in_f = m.base.weight.shape
        want[f"{n}.A"], want[f"{n}.B"] = (m.rank, in_f), (out_f, m.rank)
    if set(params) != set(want):
        missing, extra = sorted(set(want) - set(params)), sorted(set(params) - set(want))
        raise ValueError(f"LoRA adapter does not fit this model's adapted matrices: missing "
                         f"{missing[:3]}, extra {extra[:3]} (was it trained with other "
                         "--lora-targets?)")
    for k, shape in want.items():
        if tuple(params[k].shape) != shape:
            raise ValueError(f"LoRA tensor {k} has shape {tuple(params[k].shape)}, expected "
                             f"{shape} "
                             "(was it trained with another --lora-rank?)")


# ----------------------------------------------------------------------------- adapter files
@dataclass
class Adapter:
    params: dict[str, torch.Tensor]
    # base_model fingerprint, lora (asdict(LoRAConfig)), task, config, val score...
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        save_tensors(path, self.params, self.meta)

    @staticmethod
    def load(path: str | Path, model: nn.Module | None = None) -> "Adapter":
        """Read an adapter; with `model`, refuse another base model, attach LoRA as the adapter was
        trained (meta["lora"]) and refuse other shapes."""
        path = Path(path)
        params, meta = read_tensors(path, "LoRA adapter", model)
        adapter = Adapter(params, meta)
        if model is not None:
            if "lora" not in meta:
                raise ValueError(f"{path.name} has no 'lora' config in its metadata: is it an "
                                 "SVF expert?")
            # idempotent; refuses a different rank or scale
            attach(model, LoRAConfig(**meta["lora"]))
            dev = next(iter(wrappers(model).values())).base.weight.device
            adapter.params = {k: v.to(dev) for k, v in params.items()}
            check_params(model, adapter.params)
        return adapter


# ----------------------------------------------------------------------------- supervised objective
# The paper's LoRA baseline learns by next-token prediction on the tasks' reference responses
# (GSM8K solutions, MBPP code, ARC answers) instead of by reward. The same step can train an
# SVF expert (--method svf --objective sft), for comparison.

def reference_tokens(tokenizer, task, problem: dict, end: list[int]):
    """The prompt's tokens and the reference response's, closed by the end-of-turn token."""
    return (tokenizer.encode_chat(task.messages(problem)),
            tokenizer.encode(task.reference_response(problem)) + end)


def sft_step(model, tokenizer, task, problems, params, opt, cfg, generator, more=None) -> dict:
    """One step of loss = mean over all reference tokens of -log p(y_t | x, y_<t), in
    micro-batches each divided by the step's token count, so that the accumulated gradient is
    one big batch's. cfg is a config.TrainConfig; its method says what params are."""
    t0 = time.perf_counter()
    end = sorted(tokenizer.end_of_turn_ids())[:1] or [tokenizer.eos_id]  # learn to stop
    pairs = [reference_tokens(tokenizer, task, p, end) for p in problems]
    n_tokens = sum(len(r) for _, r in pairs)
    opt.zero_grad(set_to_none=True)
    if cfg.method == "lora":
        train_ab(model, params, generator)  # dropout on, drawn from generator
    else:
        svf.train_z(model, params)
    loss_sum = 0.0
    lengths = [len(p) + len(r) for p, r in pairs]
    for micro in micro_batches(lengths, cfg.micro_batch, cfg.micro_tokens):
        prompts, responses = zip(*[pairs[i] for i in micro])
        logp = reply_logprobs(model, list(prompts), [[r] for r in responses], tokenizer.pad_id)
        loss = -torch.cat(logp).sum() / n_tokens
        loss.backward()
        loss_sum += loss.item()
    svf.train_z(model, None)
    train_ab(model, None)
    grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.clip).item()
    opt.step()
    return {"loss": loss_sum, "tokens": n_tokens, "grad_norm": grad_norm,
            "t_step": time.perf_counter() - t0}
