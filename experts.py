"""The expert and adapter files an evaluation needs, found and read with errors that name them.

An expert NAME is experts/NAME.safetensors (or a .safetensors path); a LoRA adapter NAME is
adapters/NAME.safetensors. Every file is read and checked before the model is loaded, so a
missing, corrupt or mismatched file stops the run at once, not after minutes of loading.
"""
from __future__ import annotations

from pathlib import Path

import lora
import svf
from cli import fail
from data.cls import DOMAIN_EXPERTS  # gsm8k (math), mbpp (code), arc_easy (reasoning)

EXPERTS_DIR = Path(__file__).resolve().parent / "experts"  # the experts shipped with the repo
ADAPTERS_DIR = Path(__file__).resolve().parent / "adapters"  # the shipped LoRA baselines


def experts_needed(strategy: str) -> list[str]:
    """The expert files a strategy reads."""
    if strategy == "base":
        return []
    if strategy.startswith("expert:"):
        return [strategy.split(":", 1)[1]]
    if strategy in ("prompt", "fewshot"):
        return DOMAIN_EXPERTS
    if strategy == "cls":
        return DOMAIN_EXPERTS + ["cls"]
    raise ValueError(f"unknown strategy {strategy!r} (--strategy): choose base, prompt, cls, "
                     "fewshot or expert:NAME")


def resolve_experts(names: list[str], experts_dir: Path) -> dict[str, Path]:
    """name -> file of each expert (NAME.safetensors in experts_dir, or a .safetensors path); an
    error that names every missing file."""
    paths = {n: Path(n) if n.endswith(".safetensors") else experts_dir / f"{n}.safetensors"
             for n in names}
    hint = " (train it: python train.py --task {}, then copy its best.safetensors there)"
    missing = [f"{p}" + (hint.format(n) if n in DOMAIN_EXPERTS + ["cls"] else "")
               for n, p in paths.items() if not p.exists()]
    if missing:
        there = sorted(p.stem for p in experts_dir.glob("*.safetensors"))
        fail(f"missing expert file(s): {'; '.join(missing)}; "
             f"experts in {experts_dir}: {', '.join(there) or 'none'}")
    return paths


def read_experts(paths: dict[str, Path]) -> dict[str, svf.Expert]:
    """name -> each expert file, read once (before the model is loaded: a file that is corrupt,
    not a safetensors file or a LoRA adapter is an error that names it)."""
    try:
        experts = {n: svf.Expert.load(p) for n, p in paths.items()}
    except ValueError as e:
        fail(str(e))
    for n, expert in experts.items():
        if "lora" in expert.meta:
            fail(f"{paths[n]} is a LoRA adapter, not an SVF expert: evaluate it with "
                 f"--adapter {paths[n]}")
    return experts


def load_experts(model, paths: dict[str, Path],
                 experts: dict[str, svf.Expert] | None = None) -> dict[str, dict]:
    """name -> z of each expert, after wrapping the matrices they adapt (all must agree)."""
    if not paths:
        return {}
    experts = experts or read_experts(paths)
    targets = {n: e.meta.get("targets", "mlp") for n, e in experts.items()}
    if len(set(targets.values())) > 1:
        fail(f"these experts adapt different matrices and cannot be used together: {targets}")
    svf.attach(model, svf.decompose(model, next(iter(targets.values()))))
    loaded = {}
    for n, p in paths.items():
        try:
            loaded[n] = experts[n].fit(model, p).z
        except ValueError as e:  # made for another base model, or for other matrices' shapes
            fail(f"expert {n} does not fit the loaded model: {e}")
    return loaded


def load_adapter(model, name: str) -> dict:
    """A LoRA adapter's A/B tensors (adapters/NAME.safetensors or a path), attached to the model."""
    path = Path(name) if name.endswith(".safetensors") else ADAPTERS_DIR / f"{name}.safetensors"
    try:
        return lora.Adapter.load(path, model).params
    except (ValueError, FileNotFoundError) as e:
        fail(f"{e} (train one: python train.py --task TASK --method lora)")


def check_adapter(adapter: str) -> None:
    """A missing or corrupt adapter file, named before the model is loaded."""
    path = Path(adapter) if adapter.endswith(".safetensors") \
        else ADAPTERS_DIR / f"{adapter}.safetensors"
    if not path.is_file():
        fail(f"no adapter {path} (--adapter; train one: python train.py --task TASK --method lora)")
    try:
        meta = lora.Adapter.load(path).meta
    except ValueError as e:
        fail(str(e))
    if "lora" not in meta:
        fail(f"{path} is not a LoRA adapter (no 'lora' config in its metadata); an SVF expert "
             f"goes with --strategy expert:{path}")
