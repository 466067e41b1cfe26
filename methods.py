"""The two ways the trainer adapts the model: SVF (the paper) and the LoRA baseline.

The model runs in one of two modes: training (the adapted weights are recomputed in every
forward pass, so gradients reach the trainable tensors) and answering (composed once, no
gradients). What the tensors are, one z per matrix (svf.py) or A/B pairs (lora.py), is the
method, chosen once from the config's `method` by `setup`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

import lora
import svf
from config import TrainConfig
from model import Transformer



@dataclass(frozen=True)
class Method:
    name: str
    train: Callable[..., None]         # (model, params, generator=None): differentiable
    answer: Callable[..., None]        # (model, params): composed once, no gradients
    distance: Callable[[dict], float]  # how far params are from the base model, for the log
    at_base: Callable[[dict], bool]    # params are exactly the base model
    File: type                         # the file it is saved as


def base_mode(model: Transformer) -> None:
    """The base model pi_base, whichever wrappers are attached."""
    svf.train_z(model, None)
    lora.train_ab(model, None)


def detached(params: dict) -> dict:
    return {n: v.detach() for n, v in params.items()}


SVF = Method("svf", lambda m, z, generator=None: svf.train_z(m, z),
             lambda m, z: svf.use_expert(m, detached(z)),
             lambda z: max((v.detach() - 1).abs().max().item() for v in z.values()),
             lambda z: all(bool((v == 1).all()) for v in z.values()), svf.Expert)
# LoRA's base model is B = 0, whatever A is
LORA = Method("lora", lora.train_ab, lambda m, p: lora.use_adapter(m, detached(p)),
              lambda p: max(v.detach().abs().max().item() for n, v in p.items()
                            if n.endswith(".B")),
              lambda p: all(bool((v == 0).all()) for n, v in p.items() if n.endswith(".B")),
              lora.Adapter)
METHODS = {"svf": SVF, "lora": LORA}


def answer_mode(model: Transformer, params: dict | None, method: Method = SVF) -> None:
    """Answer with params (None: the base model), composed once and without gradients."""
    if params is None:
        svf.use_expert(model, None)
        lora.use_adapter(model, None)
    else:
        method.answer(model, params)


def setup(model: Transformer, cfg: TrainConfig) -> tuple[dict, dict, Method]:
    """Attach the method's wrappers; return the trainable tensors at their start (exactly the
    base model), the metadata saved with them, and the method."""
    meta = {"base_model": svf.model_fingerprint(model), "method": cfg.method, "task": cfg.task,
            "config": asdict(cfg)}
    if cfg.method == "svf":
        svf.attach(model, svf.decompose(model, cfg.targets))
        params = svf.ones(model)                                       # z = 1
        meta |= {"targets": cfg.targets, "parametrisation": "plain z, W' = U diag(s*z) V^T"}
    elif cfg.method == "lora":
        lcfg = lora.LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        lora.attach(model, lcfg)
        params = lora.init_params(model, cfg.seed)                     # B = 0
        meta |= {"lora": asdict(lcfg)}
    else:
        raise ValueError(f"unknown method {cfg.method!r}: choose svf or lora")
    return {n: torch.nn.Parameter(v) for n, v in params.items()}, meta, METHODS[cfg.method]
