"""The opt-in CPU speed path: the same products as model.py, computed faster on CPUs.

    import fast; fast.enable()     # what train.py, eval.py, generate.py and bench.py do

model.py computes every matrix product with model.linear and reads q/k/v (and gate/up)
through model.project, both plain torch. enable() replaces the two with the versions below
and stops glibc from fragmenting the heap; they change the speed only, never the math (up to
float rounding: tests/test_fast.py checks both paths agree). bench.py times each choice.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn as nn
import torch.nn.functional as F

import model

PLAIN = (model.linear, model.project)


def enable(on: bool = True) -> None:
    """Switch the speed path on (or back off: the tests compare both)."""
    model.linear, model.project = (linear, project) if on else PLAIN
    if on:
        pin_malloc_threshold()


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T + b, with two CPU kernel choices:

    - the few-row products of token-by-token decoding (2-32 rows) as w @ x^T, which MKL runs
      faster than x @ w^T; the result is made contiguous again for attention's fast path.
    - 16-bit products of 16 rows or more (prefill, batches) in float32: CPUs without bfloat16
      instructions (AVX2) are much slower in 16 bits. The weights stay 16-bit in memory.
    """
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or rows == 1:
        return F.linear(x, w, b)
    if x.dtype in (torch.bfloat16, torch.float16) and rows >= 16:
        return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    if rows > 32 or torch.is_grad_enabled() and x.requires_grad:
        return F.linear(x, w, b)
    y = (w @ x.reshape(rows, -1).t()).t().contiguous().reshape(*x.shape[:-1], -1)
    return y if b is None else y + b


def project(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> torch.Tensor:
    """model.project as one product with the layers' stacked weights (stacked() below).

    Decoding one token makes many small products, each with a fixed cost, so one serves all
    when no gradient is wanted and the layers are plain model.Linears; SVF and LoRA wrappers
    take the plain path."""
    if torch.is_grad_enabled() or any(type(layer) is not model.Linear for layer in layers):
        return torch.cat([layer(x) for layer in layers], dim=-1)
    return linear(x, *stacked(layers))


def stacked(layers: tuple[model.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One matrix (and bias) whose row blocks are the layers' own weights.

    Built once by copying the weights into one buffer; each layer's weight then becomes a view
    of it, so no memory is doubled and in-place writes to either are seen by both. Built again
    when a weight is replaced (another tensor, dtype or device)."""
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


def pin_malloc_threshold(size: int = 1 << 20) -> None:
    """Stop glibc from raising its mmap threshold each time a large block is freed (it rises
    to the block's size). Stacking frees many such blocks (the separate q/k/v and gate/up
    weights); with the threshold raised, later temporaries come from the heap and fragment it,
    and generation peaks higher. Elsewhere than on glibc this does nothing."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, size)  # -3: M_MMAP_THRESHOLD (malloc.h)
    except (OSError, AttributeError):
        pass
