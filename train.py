"""Train an SVF expert with REINFORCE + KL (paper section 3.1) on one task, or the LoRA baseline.

    python train.py --task gsm8k                      # the math expert, default model, CPU
    python train.py --task arc_easy --steps 60 --kl-coef 0.2 --out runs/arc
    python train.py --task arc_easy --rollout options # multiple choice: act by option likelihood
    python train.py --task cls --rollout options      # the expert of eval.py --strategy cls
    python train.py --task gsm8k --resume             # continue an interrupted run
    python train.py --task gsm8k --method lora        # the LoRA baseline, on the solutions
    python train.py --task gsm8k --method lora --objective reinforce   # LoRA with SVF's objective

Writes into --out: best.safetensors (the expert or adapter with the best validation accuracy),
last.safetensors, state.pt (to resume), log.jsonl (one line per step), config.json.
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

import cli
import data
import dist
import fast
import loop
from checkpoint import load
from cli import fail
from config import TrainConfig, check as check_settings
from data import cls

TRAIN_TASKS = TrainConfig.__dataclass_fields__["task"].metadata["choices"]
# Flags whose default is the task's (data.Task.train_defaults), else TrainConfig's.
PER_TASK = ("samples", "temperature", "batch_size", "dynamic_draws", "max_new_tokens")
DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def config(**flags) -> TrainConfig:
    """The flags with the defaults filled in: the task's own for PER_TASK (REINFORCE on free
    generation with SVF), then TrainConfig's; and the paper's pairings of method and
    objective."""
    task_defaults = data.TASKS[flags["task"]].train_defaults if flags["task"] in data.TASKS else {}
    own = flags["method"] == "svf" and flags["objective"] in (None, "reinforce") \
        and flags["rollout"] == "generate"
    for k in PER_TASK:
        if flags[k] is None:
            flags[k] = task_defaults[k] if own and k in task_defaults else DEFAULTS[k]
    if flags["objective"] is None:  # the paper's pairing: SVF by reward, LoRA by prediction
        flags["objective"] = "reinforce" if flags["method"] == "svf" else "sft"
    if flags["validation"] is None:
        flags["validation"] = "options" if flags["task"] == "cls" else "generate"
    return TrainConfig(**flags)


def check_state(state: Path) -> None:
    """A state that cannot be read is named before the model is loaded."""
    try:
        saved = torch.load(state, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a bad file fails torch.load in many ways
        fail(f"{state} cannot be read by torch.load ({type(e).__name__}): truncated or not a "
             "state saved by train.py; delete it to start the run again")
    if not isinstance(saved, dict) or "params" not in saved:
        fail(f"{state} is not a training state saved by train.py; delete it to start again")


def main(model: str | None, out: str | None, resume: bool, device: str, dtype: str,
         threads: int, **flags) -> None:
    device = dist.init(device)  # under torchrun: this rank's device and the process group
    cfg = config(**flags)
    try:
        check_settings(cfg, has_options=cfg.task in ("arc_easy", "cls"))
    except ValueError as e:
        fail(str(e))
    fast.enable()  # the CPU speed path (fast.py)
    if threads:
        torch.set_num_threads(threads)
    seed_everything(cfg.seed)
    what = f"svf-{cfg.targets}" if cfg.method == "svf" else \
        f"lora-{cfg.lora_targets}-r{cfg.lora_rank}"
    if cfg.objective != ("reinforce" if cfg.method == "svf" else "sft"):
        what += f"-{cfg.objective}"
    out_dir = Path(out or f"runs/{cfg.task}-{what}-seed{cfg.seed}")
    if resume and (out_dir / "state.pt").exists():
        check_state(out_dir / "state.pt")
    saved = {**asdict(cfg), "model": model or "default (SmolLM2-135M-Instruct)",
             "out": str(out_dir), "device": device, "dtype": dtype,
             "command": "python " + " ".join(sys.argv)}
    print(json.dumps(saved, indent=2))
    try:
        net, tokenizer = load(model, device=device, dtype=dtype)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    extra = {}
    if cfg.task == "cls":  # the classification expert (paper 3.2 b): the training tasks' questions
        extra = dict(task=cls.CLS_TASK, train_set=cls.cls_problems("train", seed=cfg.seed),
                     val_set=cls.cls_problems("validation"))
    try:
        expert = loop.train(net, tokenizer, cfg, out_dir, resume=resume, **extra)
    except ValueError as e:  # a resume under other settings, another method's state: one line
        fail(str(e))
    if cfg.eval_every:
        print(f"best validation accuracy {expert.meta['val_accuracy']:.3f} at step "
              f"{expert.meta['step']}: {out_dir / 'best.safetensors'}")
    else:
        print(f"no validation (--eval-every 0); the expert after step {expert.meta['step']}: "
              f"{out_dir / 'last.safetensors'}")
    dist.close()  # every rank leaves the process group together


def per_task(key: str) -> str:
    """The tasks' own defaults of a flag, for --help: 'gsm8k 16, mbpp 16'."""
    return ", ".join(f"{t} {data.TASKS[t].train_defaults[key]}" for t in TRAIN_TASKS
                     if t in data.TASKS and key in data.TASKS[t].train_defaults) or "none"


if __name__ == "__main__":
    p = cli.parser(__doc__)
    notes = {k: f" (default: the task's, {per_task(k)}; else {DEFAULTS[k]})" for k in PER_TASK}
    notes["validation"] = " (default: generate; options for cls)"
    filled_in = dict.fromkeys(PER_TASK + ("objective", "validation"))  # None: config() fills them
    cli.add_options(p, TrainConfig, defaults=filled_in, notes=notes)
    p.add_argument("--model", type=cli.model_path, default=None,
                   help="a .gguf file or Hugging Face folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", type=cli.output_folder, default=None,
                   help="output folder (default: runs/TASK-svf-TARGETS-seedSEED, "
                        "runs/TASK-lora-TARGETS-rRANK-seedSEED)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/state.pt; refused when a setting other than --steps, "
                        "--micro-batch or --micro-tokens differs from the saved run's")
    cli.add_device_options(p)
    p.add_argument("--threads", type=cli.non_negative_int, default=0,
                   help="CPU threads for torch (0: torch's default)")
    main(**vars(p.parse_args()))
