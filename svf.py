"""Singular Value Fine-tuning (SVF), paper section 3.1: experts are vectors that rescale
singular values.

Every adapted weight matrix is decomposed once, W = U diag(s) V^T (thin SVD, float32).
An expert is one vector z per matrix, the length of s, and the adapted weight is

    W' = U diag(s * z) V^T  =  W + U diag(s * (z - 1)) V^T

We compute the right-hand form: z = 1 gives back W bit for bit (not a float32 recomposition
of it), and the change is kept in float32 even when W is bfloat16, where a change of z by
1e-3 would otherwise round away (the adapted layers then compute in float32).

Parametrisation: the paper's plain scale z, initialised at 1. (The official code uses
sigmoid(raw) * max_mult with a nuclear-norm rescale and then mixes the raw pre-sigmoid
vectors, which is not the space it trained in.) Training, mixing and evaluation all
happen in this one space. The mixture of section 3.2 mixes the experts' changes,
z' = 1 + sum_k alpha_k (z_k - 1) (see mix): the paper's sum_k alpha_k z_k scales the whole
model by sum_k alpha_k when the experts are near 1, which the official code undoes with its
nuclear-norm rescale.

    svd = decompose(model, "mlp")          # cached on disk per base model
    attach(model, svd)                     # targets become SVFLinear wrappers (z = None: base)
    use_expert(model, expert.z)            # compose once (cache=True: kept per expert's contents)
    train_z(model, z)                      # differentiable in z only
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

import model as llama  # llama.linear: the model's one matrix product (fast.py may swap it)

TARGETS = {  # which matrices of each block SVF adapts; never embeddings, output head or norms
    "mlp": ("mlp.gate", "mlp.up", "mlp.down"),
    "attn": ("attention.q", "attention.k", "attention.v", "attention.o"),
}
TARGETS["all"] = TARGETS["attn"] + TARGETS["mlp"]
CACHE_HOME = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
CACHE_DIR = CACHE_HOME / "transformer-squared" / "svd"


def target_names(model: nn.Module, targets: str) -> list[str]:
    """Module names of the adapted linears, e.g. 'layers.0.mlp.gate'."""
    if targets not in TARGETS:
        raise ValueError(f"unknown targets {targets!r}: choose {', '.join(TARGETS)}")
    return [f"layers.{i}.{t}" for i in range(len(model.layers)) for t in TARGETS[targets]]


def fingerprint(model: nn.Module) -> str:
    """A short hash of the base weights (names, shapes, a strided sample of every tensor).

    The sample is rounded to bfloat16 first, so the same checkpoint loaded in float32 on a CPU
    or in bfloat16 on a GPU has the same fingerprint, and its experts fit both.
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        name = name.replace(".base.", ".")  # the same name before and after attach()
        sample = p.detach().flatten()[::997].to(torch.bfloat16).view(torch.int16).cpu()
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- decompose, compose
@dataclass
class SVD:
    U: torch.Tensor   # (m, r)
    s: torch.Tensor   # (r,)  singular values, descending
    Vh: torch.Tensor  # (r, n)


def delta(svd: SVD, z: torch.Tensor) -> torch.Tensor:
    """U diag(s * (z - 1)) V^T, the change z makes to W, as one (m, r) x (r, n) matmul; exactly 0
    at z = 1."""
    return (svd.U * (svd.s * (z - 1))) @ svd.Vh


def compose(w: torch.Tensor, svd: SVD, z: torch.Tensor) -> torch.Tensor:
    """W' = W + U diag(s * (z - 1)) V^T in float32 (float64 for a float64 W), whatever W's dtype."""
    return w.to(torch.promote_types(w.dtype, svd.s.dtype)) + delta(svd, z)


def decompose(model: nn.Module, targets: str = "mlp", cache: bool = True,
              cache_dir: Path | None = None) -> dict[str, SVD]:
    """Thin SVD (float32) of every target matrix, cached on disk per base model and dtype (keyed by
    its fingerprint and the weights' dtype, in cache_dir or else CACHE_DIR, outside the repo: the
    fingerprint is the same for a bfloat16 and a float32 load, their factors are not) and loaded
    from there next time."""
    from safetensors.torch import load_file, save_file
    names = target_names(model, targets)
    dtype = str(base_weight(model, names[0]).dtype).removeprefix("torch.")
    name = f"{fingerprint(model)}-{targets}-{dtype}.safetensors"
    path = Path(cache_dir or CACHE_DIR) / name if cache else None
    if path is not None and path.exists():
        flat = load_file(path, device=str(base_weight(model, names[0]).device))
        return {n: SVD(flat[f"{n}.U"], flat[f"{n}.s"], flat[f"{n}.Vh"]) for n in names}
    out = {}
    for n in tqdm(names, desc="SVD", leave=False):
        w = base_weight(model, n)
        # float32, or float64 for exact gradient tests
        w = w if w.dtype == torch.float64 else w.float()
        U, s, Vh = torch.linalg.svd(w, full_matrices=False)
        out[n] = SVD(U.contiguous(), s.contiguous(), Vh.contiguous())
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        flat = {f"{n}.{k}": getattr(d, k).cpu() for n, d in out.items() for k in ("U", "s", "Vh")}
        tmp = path.with_suffix(".tmp")
        save_file(flat, tmp)
        tmp.replace(path)  # atomic: a crash never leaves half a cache file
    return out


def base_weight(model: nn.Module, name: str) -> torch.Tensor:
    m = model.get_submodule(name)
    return m.base.weight if isinstance(m, SVFLinear) else m.weight


def count_params(svd: dict[str, SVD]) -> int:
    """Trainable numbers of an SVF expert: the sum of r = min(m, n) over adapted matrices."""
    return sum(d.s.numel() for d in svd.values())


# ----------------------------------------------------------------------------- the adapted layer
class SVFLinear(nn.Module):
    """Wraps a base nn.Linear: y = x W'^T + b, with W' from z (or the base W when z is None).

    Three modes: base (z None), inference (a merged W' composed once) and training (W'
    recomposed in every forward so that gradients reach z, and z only). W' is float32 (or
    float64): with a bfloat16 W the adapted layer computes in float32 and rounds its output once.
    """

    def __init__(self, base: nn.Linear, svd: SVD):
        super().__init__()
        self.base, self.svd = base, svd
        self.z: torch.Tensor | None = None
        self.merged: torch.Tensor | None = None
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # expert digest -> merged W'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged is None and self.z is None:
            return llama.linear(x, self.base.weight, self.base.bias)
        w = self.merged if self.merged is not None else compose(self.base.weight, self.svd, self.z)
        b = None if self.base.bias is None else self.base.bias.to(w.dtype)
        return llama.linear(x.to(w.dtype), w, b).to(x.dtype)


def attach(model: nn.Module, svd: dict[str, SVD]) -> None:
    """Replace each target linear by an SVFLinear wrapper (idempotent); the base model is
    unchanged."""
    for name, d in svd.items():
        parent, child = name.rsplit(".", 1)
        m = model.get_submodule(name)
        if not isinstance(m, SVFLinear):
            dev = m.weight.device
            svd = SVD(d.U.to(dev), d.s.to(dev), d.Vh.to(dev))
            setattr(model.get_submodule(parent), child, SVFLinear(m, svd))


def wrappers(model: nn.Module) -> dict[str, SVFLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SVFLinear)}


def ones(model: nn.Module) -> dict[str, torch.Tensor]:
    """The identity expert: z = 1 for every adapted matrix."""
    return {n: torch.ones_like(m.svd.s) for n, m in wrappers(model).items()}


def digest(z: dict[str, torch.Tensor]) -> str:
    """A hash of an expert's contents: the key of the composed weights kept by
    use_expert(cache=True)."""
    h = hashlib.sha256()
    for n in sorted(z):
        h.update(n.encode())
        h.update(z[n].detach().to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def use_expert(model: nn.Module, z: dict[str, torch.Tensor] | None, cache: bool = False,
               keep: int = 4) -> None:
    """Answer with expert z (None: the base model), composed once, without gradients. A matrix
    whose z is exactly 1 keeps the base layer itself. cache: keep the composed weights on the
    wrappers, keyed by z's contents, for the next use of the same z (the `keep` latest experts;
    each one costs a float32 copy of every adapted matrix)."""
    ws = wrappers(model)
    if z is not None:
        check_z(model, z)
    key = digest(z) if z is not None and cache else None
    for n, m in ws.items():
        m.z, m.merged = None, None
        if z is None or bool((z[n] == 1).all()):
            continue
        if key in m.cache:
            m.cache.move_to_end(key)
            m.merged = m.cache[key]
            continue
        with torch.no_grad():
            m.merged = compose(m.base.weight, m.svd, z[n].to(m.svd.s))
        if key is not None:
            m.cache[key] = m.merged
            while len(m.cache) > keep:
                m.cache.popitem(last=False)


def train_z(model: nn.Module, z: dict[str, torch.Tensor] | None) -> None:
    """Recompose W' from z in every forward (autograd flows into z); None goes back to the base."""
    if z is not None:
        check_z(model, z)
    for n, m in wrappers(model).items():
        # a view, not the Parameter itself: nn.Module would register a Parameter as the model's own
        m.z, m.merged = (None if z is None else z[n].view_as(z[n])), None


def check_z(model: nn.Module, z: dict[str, torch.Tensor]) -> None:
    ws = wrappers(model)
    if set(z) != set(ws):
        missing, extra = sorted(set(ws) - set(z)), sorted(set(z) - set(ws))
        raise ValueError(f"expert does not fit this model's adapted matrices: missing "
                         f"{missing[:3]}, extra {extra[:3]} (was it trained with other --targets?)")
    for n, m in ws.items():
        if z[n].shape != m.svd.s.shape:
            raise ValueError(f"expert vector {n} has shape {tuple(z[n].shape)}, expected "
                             f"{tuple(m.svd.s.shape)}")


# ----------------------------------------------------------------------------- mixing (section 3.2)
def mix(experts: list[dict[str, torch.Tensor]], alphas: torch.Tensor) -> dict[str, torch.Tensor]:
    """z' = 1 + sum_k alpha_k (z_k - 1): the experts' changes to the spectrum, mixed. alphas: (K,)
    one weight per expert, or (K, M) one per expert per matrix (M matrices in the experts' order).

    alpha = 0 is the base model and alpha = e_k expert k, whatever the experts; the paper's
    sum_k alpha_k z_k would give (sum_k alpha_k) W for experts near z = 1, a rescaled base model."""
    names = list(experts[0])
    if alphas.dim() == 1 and len(alphas) == len(experts):
        alphas = alphas[:, None].expand(len(experts), len(names))
    if alphas.shape != (len(experts), len(names)):
        raise ValueError(f"alphas of shape {tuple(alphas.shape)}: expected ({len(experts)},) or "
                         f"({len(experts)}, {len(names)})")
    return {n: 1 + sum(alphas[k, j] * (e[n] - 1) for k, e in enumerate(experts))
            for j, n in enumerate(names)}


# ----------------------------------------------------------------------------- expert files
def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """A safetensors file of float32 tensors with `meta` as JSON, written atomically: to a temporary
    file, then renamed over the target (lora.py's adapter files use it too)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({n: v.detach().float().cpu().contiguous() for n, v in tensors.items()}, tmp,
              metadata={"meta": json.dumps(meta)})
    tmp.replace(path)


def read_tensors(path: str | Path, what: str, model: nn.Module | None = None):
    """The tensors and meta of a file save_tensors wrote (`what` names it in errors); with `model`,
    refuse a file made for another base model (its meta's fingerprint)."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no {what} file {path}")
    try:  # a truncated, corrupt or foreign file: an error that names it, not the reader's traceback
        with safe_open(path, "pt") as f:
            tensors = {n: f.get_tensor(n) for n in f.keys()}
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable {what} file ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a {what} file of this project (its metadata is not a JSON "
                         "object)")
    if model is not None:
        check_base_model(meta, path, what, model)
    return tensors, meta


def check_base_model(meta: dict, path: Path, what: str, model: nn.Module) -> None:
    """Refuse a file made for another base model than `model` (its meta's fingerprint)."""
    if "base_model" not in meta:
        raise ValueError(f"{path}: not a {what} file of this project (its metadata names no base "
                         "model)")
    if meta.get("base_model") != model_fingerprint(model):
        raise ValueError(f"{path.name} was trained on base model {meta.get('base_model')}, but the "
                         f"loaded model is {model_fingerprint(model)}: {what}s only fit the model "
                         "they were trained on")


@dataclass
class Expert:
    z: dict[str, torch.Tensor]
    # base_model fingerprint, targets, task, config, val score...
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        save_tensors(path, self.z, self.meta)

    @staticmethod
    def load(path: str | Path, model: nn.Module | None = None) -> "Expert":
        """Read an expert; with `model`, refuse one made for another base model or other shapes."""
        expert = Expert(*read_tensors(path, "expert"))
        return expert if model is None else expert.fit(model, Path(path))

    def fit(self, model: nn.Module, path: Path) -> "Expert":
        """This expert on the model's device, read once: refuses one made for another base model
        (named by path) or for other shapes."""
        check_base_model(self.meta, path, "expert", model)
        dev = next(iter(wrappers(model).values())).svd.s.device
        self.z = {n: v.to(dev) for n, v in self.z.items()}
        check_z(model, self.z)
        return self


def model_fingerprint(model: nn.Module) -> str:
    """The base model's fingerprint, computed once and remembered on the model."""
    if not hasattr(model, "_svf_fingerprint"):
        model._svf_fingerprint = fingerprint(model)
    return model._svf_fingerprint


def save_adapted(path, model: nn.Module, z: dict[str, torch.Tensor], report: dict) -> Expert:
    """Save the z' of a few-shot search (adapt.fewshot's report) as an ordinary expert file,
    reusable with --strategy expert:PATH."""
    targets = next(t for t in TARGETS if set(target_names(model, t)) == set(z))
    meta = {"base_model": model_fingerprint(model), "targets": targets, "task": report["task"],
            "parametrisation": "plain z, W' = U diag(s*z) V^T",
            "fewshot": {k: report[k] for k in ("experts", "per_layer", "alpha", "best", "shots")}}
    expert = Expert(z, meta)
    expert.save(path)
    return expert
