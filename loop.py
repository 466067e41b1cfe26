"""The training loop around one step (paper section 3.1, and the LoRA baseline's): the data
order, the step of the chosen objective (rl.train_step, options.option_step, lora.sft_step),
validation every N steps keeping the best expert, the log, and a checkpoint after every step
(resume.py) that --resume continues exactly.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import data
import dist
import lora
import options
import rl
from config import TrainConfig, check
from engine import generate_all
from methods import SVF, Method, answer_mode, detached, setup
from model import Transformer
from resume import Interrupt, Run, load_checkpoint, save_checkpoint


def validate(model, tokenizer, task, problems, z, batch: int, max_new_tokens: int = 0,
             method: Method = SVF) -> float:
    """Greedy accuracy of z on the validation problems (max_new_tokens 0: the task's own)."""
    answer_mode(model, z, method)
    prompts = [tokenizer.encode_chat(task.messages(p)) for p in problems]
    comps = generate_all(model, tokenizer, prompts, batch, desc="validate",
                         max_new_tokens=max_new_tokens or task.max_new_tokens,
                         stop_strings=tuple(task.stop))
    answer_mode(model, None)
    return sum(task.score_many(problems, [c.text for c in comps])) / len(problems)


def set_lr(opt: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> float:
    """Constant, or cosine-decayed to 0 over cfg.steps. Set directly, with no scheduler object:
    a step that makes no update must not shift the schedule."""
    lr = cfg.lr * (0.5 * (1 + math.cos(math.pi * step / cfg.steps)) if cfg.cosine else 1.0)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def batch_for_step(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The problems of a data chunk: a seeded permutation per epoch, so resuming needs no state."""
    per_epoch = max(n // batch_size, 1)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[k * batch_size:(k + 1) * batch_size].tolist()


def step_function(cfg: TrainConfig) -> Callable[..., dict]:
    """The step of cfg's objective and rollout: rl.train_step, options.option_step or
    lora.sft_step."""
    if cfg.objective == "sft":
        return lora.sft_step
    if cfg.objective != "reinforce":
        raise ValueError(f"unknown objective {cfg.objective!r}: choose reinforce or sft")
    return rl.train_step if cfg.rollout == "generate" else options.option_step


def validation(model, tokenizer, task, problems, params, cfg: TrainConfig,
               method: Method) -> dict:
    t0 = time.perf_counter()
    if cfg.validation == "generate":
        accuracy = validate(model, tokenizer, task, problems, params, cfg.gen_batch,
                            cfg.max_new_tokens, method)
    else:
        accuracy = options.option_accuracy(model, tokenizer, task, problems, params,
                                           method=method)
    return {"val_accuracy": accuracy, "t_val": time.perf_counter() - t0}


def train(model: Transformer, tokenizer, cfg: TrainConfig, out: Path, resume: bool = False,
          log=print, task=None, train_set: list[dict] | None = None,
          val_set: list[dict] | None = None):
    """Train an expert (or LoRA adapter) for cfg.task; writes out/{best,last}.safetensors,
    state.pt and log.jsonl, and returns the best (an svf.Expert or a lora.Adapter).
    task and the sets default to data.TASKS[cfg.task] and its splits; cls passes its own."""
    task = task or data.TASKS[cfg.task]
    train_set = train_set if train_set is not None else data.load(cfg.task, "train")
    val_set = val_set if val_set is not None else data.load(cfg.task, "validation")
    val_set = val_set[:cfg.val_limit] if cfg.val_limit else val_set
    check(cfg, hasattr(task, "option_responses"))
    step_fn = step_function(cfg)
    z, meta, method = setup(model, cfg)
    n_base, meta["trainable"] = (sum(p.numel() for p in model.parameters()),
                                 sum(v.numel() for v in z.values()))
    what = f"SVF on '{cfg.targets}'" if cfg.method == "svf" else \
        f"LoRA rank {cfg.lora_rank} on '{cfg.lora_targets}'"
    log(f"{what}: {meta['trainable']:,} trainable numbers "
        f"({100 * meta['trainable'] / n_base:.3f}% of the base model's {n_base:,})")
    log(f"sandbox: {data.sandbox.isolation() if task.domain == 'code' else 'not used'}")
    # no weight decay: it would pull z towards 0 (not 1), and the paper's LoRA baseline has none
    # each rank its own sampling stream; rank 0's is the one-process stream
    gen = torch.Generator(model.tok_embeddings.weight.device)
    run = Run(z, torch.optim.AdamW(z.values(), lr=cfg.lr, weight_decay=0.0),
              gen.manual_seed(cfg.seed + 7919 * dist.rank()))
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        load_checkpoint(run, cfg, out, log)
    elif dist.is_main():
        (out / "log.jsonl").write_text("")

    def write(record: dict) -> None:  # rank 0 keeps the log
        if dist.is_main():
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def keep_best(step: int) -> None:
        if dist.is_main():
            method.File(detached(z), {**meta, "step": step, "val_accuracy": run.best}).save(
                out / "best.safetensors")

    def next_problems() -> list[dict]:  # the data order: seeded chunks, one or more a step
        run.chunk += 1
        return [train_set[i] for i in batch_for_step(len(train_set), run.chunk - 1,
                                                      cfg.batch_size, cfg.seed)]

    if run.step == 0 and cfg.eval_every:  # the curve starts at the base model
        record = {"step": 0, **validation(model, tokenizer, task, val_set, None, cfg, method)}
        run.best = record["val_accuracy"]
        log(f"step 0 (base model): validation accuracy {run.best:.3f} on {len(val_set)} problems")
        write(record)
        keep_best(0)
    with Interrupt(log) as interrupt:
        bar = tqdm(range(run.step, cfg.steps), initial=run.step, total=cfg.steps,
                   desc=f"train {cfg.task} ({cfg.method})")
        for step in bar:
            lr = set_lr(run.opt, cfg, step)
            stats = step_fn(model, tokenizer, task, next_problems(), z, run.opt, cfg, run.gen,
                            more=next_problems)
            record, run.step = {"step": step + 1, "lr": lr, **stats}, step + 1
            if cfg.eval_every and (run.step % cfg.eval_every == 0 or run.step == cfg.steps):
                record |= validation(model, tokenizer, task, val_set, z, cfg, method)
                if record["val_accuracy"] > run.best:
                    run.best = record["val_accuracy"]
                    keep_best(run.step)
            write(record)
            shown = {k: f"{stats[k]:+.2f}" for k in ("reward", "loss") if stats.get(k) is not None}
            bar.set_postfix(**shown, val=f"{record.get('val_accuracy', run.best):.2f}")
            save_checkpoint(run, cfg, meta, method, out)
            if interrupt.asked:
                log(f"saved a checkpoint at step {run.step} in {out}; continue with --resume")
                raise SystemExit(130)
    dist.barrier()  # rank 0 has written the files
    best = out / ("best.safetensors" if cfg.eval_every else "last.safetensors")
    return method.File.load(best)
