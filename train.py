"""Train an SVF expert with REINFORCE + KL (paper section 3.1) on one task, or the LoRA baseline.

    python train.py --task gsm8k                      # the math expert, default model, CPU
    python train.py --task arc_easy --steps 60 --kl-coef 0.2 --out runs/arc
    python train.py --task arc_easy --rollout options # multiple choice: act by option likelihood
    python train.py --task cls --rollout options      # the classification expert of eval.py --strategy cls
    python train.py --task gsm8k --resume             # continue an interrupted run
    python train.py --task gsm8k --method lora        # the LoRA baseline: next-token prediction on the solutions
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
import fast
import data
import rl
import svf
from checkpoint import load
from cli import fail

TRAIN_TASKS = ("gsm8k", "mbpp", "arc_easy", "cls")  # cls: the classification expert of adapt.py


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Flags whose default is the task's (data.Task.train_defaults), else rl.TrainConfig's.
PER_TASK = ("samples", "temperature", "batch_size", "dynamic_draws", "max_new_tokens")


def main(model: str | None, out: str | None, resume: bool, device: str, dtype: str, threads: int, **kwargs) -> None:
    task_defaults = data.TASKS[kwargs["task"]].train_defaults if kwargs["task"] in data.TASKS else {}
    if kwargs["method"] == "svf" and kwargs["objective"] in (None, "reinforce") and kwargs["rollout"] == "generate":
        for k in PER_TASK:
            if kwargs[k] is None and k in task_defaults:
                kwargs[k] = task_defaults[k]
    defaults = {f.name: f.default for f in fields(rl.TrainConfig)}
    kwargs = {k: defaults[k] if k in PER_TASK and v is None else v for k, v in kwargs.items()}
    if kwargs["objective"] is None:  # the paper's pairing: SVF by reward, LoRA by next-token prediction
        kwargs["objective"] = "reinforce" if kwargs["method"] == "svf" else "sft"
    if kwargs["validation"] is None:
        kwargs["validation"] = "options" if kwargs["task"] == "cls" else "generate"
    cfg = rl.TrainConfig(**kwargs)
    if cfg.task not in TRAIN_TASKS:
        fail(f"unknown training task {cfg.task!r}; choose one of {', '.join(TRAIN_TASKS)}")
    for flag, value in (("--rollout", cfg.rollout), ("--validation", cfg.validation)):
        if value == "options" and cfg.task not in ("arc_easy", "cls"):
            fail(f"{flag} options needs a multiple-choice task (arc_easy, cls), not {cfg.task!r}")
    if cfg.method == "lora" and (cfg.lora_rank < 1 or not 0 <= cfg.lora_dropout < 1):
        fail("--lora-rank must be positive and --lora-dropout in [0, 1)")
    if cfg.objective == "sft" and cfg.rollout == "options":
        fail("--rollout options is a way of sampling for --objective reinforce, not sft")
    if cfg.objective == "reinforce" and cfg.rollout == "generate" and not cfg.temperature > 0:
        fail("--temperature must be > 0 for REINFORCE (the log-probs are scored at the "
             "temperature that sampled; a greedy rollout has none)")
    if cfg.dynamic_draws < 0 or 0 < cfg.dynamic_draws < cfg.batch_size:
        fail("--dynamic-draws must be 0 (off) or at least --batch-size")
    if cfg.baseline == "loo" and cfg.samples < 2 and cfg.objective == "reinforce":
        fail("--baseline loo needs --samples 2 or more")
    if min(cfg.steps, cfg.batch_size, cfg.samples, cfg.micro_batch, cfg.micro_tokens, cfg.gen_batch) < 1:
        fail("--steps, --batch-size, --samples, --micro-batch, --micro-tokens and --gen-batch "
             "must be positive")
    fast.enable()  # the CPU speed path (fast.py)
    if threads:
        torch.set_num_threads(threads)
    seed_everything(cfg.seed)
    what = f"svf-{cfg.targets}" if cfg.method == "svf" else f"lora-{cfg.lora_targets}-r{cfg.lora_rank}"
    if cfg.objective != ("reinforce" if cfg.method == "svf" else "sft"):
        what += f"-{cfg.objective}"
    out_dir = Path(out or f"runs/{cfg.task}-{what}-seed{cfg.seed}")
    state = out_dir / "state.pt"
    if resume and state.exists():  # a state that cannot be read: named before the model is loaded
        try:
            saved = torch.load(state, weights_only=True)
        except Exception as e:  # noqa: BLE001 -- torch.load fails on a bad file in many ways (zip, pickle, EOF)
            fail(f"{state} cannot be read by torch.load ({type(e).__name__}): truncated or not a state saved by "
                 "train.py; delete it to start the run again")
        if not isinstance(saved, dict) or "params" not in saved:
            fail(f"{state} is not a training state saved by train.py; delete it to start the run again")
    config = {**asdict(cfg), "model": model or "default (SmolLM2-135M-Instruct)", "out": str(out_dir),
              "device": device, "dtype": dtype, "command": "python " + " ".join(sys.argv)}
    print(json.dumps(config, indent=2))
    try:
        net, tokenizer = load(model, device=device, dtype=dtype)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    extra = {}
    if cfg.task == "cls":  # the classification expert (paper 3.2 b): questions of the three training tasks
        import adapt
        extra = dict(task=adapt.CLS_TASK, train_set=adapt.cls_problems("train", seed=cfg.seed),
                     val_set=adapt.cls_problems("validation"))
    try:
        expert = rl.train(net, tokenizer, cfg, out_dir, resume=resume, **extra)
    except ValueError as e:  # a resume under other settings, a state of another method: named, not a traceback
        fail(str(e))
    if cfg.eval_every:
        print(f"best validation accuracy {expert.meta['val_accuracy']:.3f} at step {expert.meta['step']}: "
              f"{out_dir / 'best.safetensors'}")
    else:
        print(f"no validation (--eval-every 0); the expert after step {expert.meta['step']}: {out_dir / 'last.safetensors'}")


def per_task(key: str) -> str:
    """The tasks' own defaults of a flag, for --help: 'gsm8k 16, mbpp 16'."""
    return ", ".join(f"{t} {data.TASKS[t].train_defaults[key]}" for t in TRAIN_TASKS
                     if t in data.TASKS and key in data.TASKS[t].train_defaults) or "none"


if __name__ == "__main__":
    p = cli.parser(__doc__)
    defaults = {f.name: f.default for f in fields(rl.TrainConfig)}
    p.add_argument("--task", default="gsm8k", choices=TRAIN_TASKS, help="task to train the expert on")
    p.add_argument("--model", type=cli.model_path, default=None,
                   help="a .gguf file or Hugging Face folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--method", default=defaults["method"], choices=["svf", "lora"],
                   help="svf: an expert vector z (the paper); lora: the LoRA baseline it is compared against")
    p.add_argument("--objective", default=None, choices=["reinforce", "sft"],
                   help="reinforce: REINFORCE + KL on the task's reward; sft: next-token prediction on the reference "
                        "responses (default: reinforce for svf, sft for lora, as in the paper)")
    p.add_argument("--targets", default="mlp", choices=list(svf.TARGETS), help="svf: matrices that get a z vector")
    p.add_argument("--lora-rank", type=cli.positive_int, default=defaults["lora_rank"], help="lora: rank r")
    p.add_argument("--lora-alpha", type=cli.positive_float, default=defaults["lora_alpha"],
                   help="lora: scale alpha (delta = alpha/r B A)")
    p.add_argument("--lora-dropout", type=cli.fraction, default=defaults["lora_dropout"],
                   help="lora: dropout on the adapter's input")
    p.add_argument("--lora-targets", default=defaults["lora_targets"], choices=["qv", "attn", "mlp", "all"],
                   help="lora: matrices that get an adapter")
    p.add_argument("--steps", type=cli.positive_int, default=defaults["steps"], help="optimiser steps")
    task_says = lambda k: f" (default: the task's, {per_task(k)}; else {defaults[k]})"
    p.add_argument("--batch-size", type=cli.positive_int, default=None,
                   help="prompts per step (with --dynamic-draws: groups with differing rewards wanted per step, "
                        "drawn in chunks of this many prompts)" + task_says("batch_size"))
    p.add_argument("--samples", type=cli.positive_int, default=None,
                   help="responses sampled per prompt" + task_says("samples"))
    p.add_argument("--temperature", type=cli.positive_float, default=None,
                   help="rollout temperature (> 0); the log-probs are scored at it" + task_says("temperature"))
    p.add_argument("--dynamic-draws", type=cli.non_negative_int, default=None,
                   help="dynamic sampling (DAPO): draw up to this many prompts a step until --batch-size of them "
                        "have rewards that differ, and train on those (0: off)" + task_says("dynamic_draws"))
    p.add_argument("--top-p", type=cli.probability, default=defaults["top_p"], help="rollout nucleus threshold")
    p.add_argument("--max-new-tokens", type=cli.non_negative_int, default=None,
                   help="tokens per rollout and validation answer, 0: the task's answer budget" + task_says("max_new_tokens"))
    p.add_argument("--lr", type=cli.positive_float, default=defaults["lr"], help="AdamW learning rate on z")
    p.add_argument("--cosine", action="store_true", help="cosine-decay the learning rate to 0")
    p.add_argument("--kl-coef", type=cli.non_negative_float, default=defaults["kl_coef"],
                   help="lambda of the KL(pi_z || pi_base) penalty on whole responses (the per-token exact KL summed "
                        "over the response, as the paper's lambda)")
    p.add_argument("--baseline", default=defaults["baseline"], choices=["none", "mean", "loo"],
                   help="subtracted from the reward: none (paper), group mean, or leave-one-out mean")
    p.add_argument("--rollout", default=defaults["rollout"], choices=["generate", "options"],
                   help="generate: sample free responses (the paper); options: multiple-choice tasks (arc_easy, cls) "
                        "act by sampling one option from the softmax of the options' log-likelihoods")
    p.add_argument("--validation", default=None, choices=["generate", "options"],
                   help="how validation reads an answer: generate (greedy replies, as eval.py does; the default) "
                        "or options (the likeliest option; the default for cls, whose first pass reads labels so)")
    p.add_argument("--clip", type=cli.positive_float, default=defaults["clip"], help="gradient-norm clipping")
    p.add_argument("--micro-batch", type=cli.positive_int, default=defaults["micro_batch"],
                   help="sequences per backward pass (with --rollout options: problems, each packed with its options)")
    p.add_argument("--micro-tokens", type=cli.positive_int, default=defaults["micro_tokens"],
                   help="at most this many padded tokens (rows x longest row) per backward pass, which bounds "
                        "memory; a longer row goes alone")
    p.add_argument("--gen-batch", type=cli.positive_int, default=defaults["gen_batch"],
                   help="sequences per generation batch")
    p.add_argument("--eval-every", type=cli.non_negative_int, default=defaults["eval_every"],
                   help="validate every N steps and at the end (0: never; then only last.safetensors)")
    p.add_argument("--val-limit", type=cli.non_negative_int, default=defaults["val_limit"],
                   help="validation problems (0: all)")
    p.add_argument("--out", type=cli.output_folder, default=None,
                   help="output folder (default: runs/TASK-svf-TARGETS-seedSEED, "
                        "runs/TASK-lora-TARGETS-rRANK-seedSEED)")
    p.add_argument("--seed", type=cli.seed, default=defaults["seed"],
                   help="seeds python, numpy, torch and the data order")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt; refused when a setting other than --steps, --micro-batch or "
                        "--micro-tokens differs from the saved run's")
    p.add_argument("--device", type=cli.device, default="auto",
                   help="cpu, cuda, cuda:N or mps (auto: cuda if available)")
    p.add_argument("--dtype", choices=cli.DTYPES, default="auto",
                   help="float32, bfloat16 or float16 (auto: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--threads", type=cli.non_negative_int, default=0, help="CPU threads for torch (0: torch's default)")
    main(**vars(p.parse_args()))
