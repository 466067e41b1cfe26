"""Evaluate the model on the paper's tasks (section 4), with or without self-adaptation.

    python eval.py --task gsm8k --strategy base --limit 200
    python eval.py --task all --strategy base
    python eval.py --task arc_easy --strategy expert:arc_easy      # a shipped expert (experts/arc_easy.safetensors)
    python eval.py --strategy fewshot                               # the unseen tasks, few-shot adaptation

For each task: batched generation (a progress bar), scoring, and a one-line summary with
accuracy, correct/total, a 95% Wilson interval and the time. Every prompt, response,
extracted answer and verdict is written as JSONL, the summary as JSON, into
--out/<strategy>/<task>/ (the folder is printed).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import data
import svf
from checkpoint import load
from model import generate_all

UNSEEN = ["arc_challenge", "humaneval", "math"]
EXPERTS_DIR = Path(__file__).resolve().parent / "experts"  # the experts shipped with the repo


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (sensible at 0 and at small counts)."""
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def subset(problems: list[dict], limit: int, seed: int) -> list[dict]:
    """A seeded random subset of `limit` problems (all when limit is 0), in the file's order."""
    if not limit or limit >= len(problems):
        return problems
    keep = sorted(random.Random(seed).sample(range(len(problems)), limit))
    return [problems[i] for i in keep]


def resolve_expert(name: str) -> Path:
    path = Path(name)
    if path.suffix != ".safetensors":
        path = EXPERTS_DIR / f"{name}.safetensors"
    if not path.exists():
        shipped = sorted(p.stem for p in EXPERTS_DIR.glob("*.safetensors"))
        raise SystemExit(f"error: no expert {name!r} (looked for {path}); shipped experts: {', '.join(shipped) or 'none'}")
    return path


def answer(model, tokenizer, task, problems: list[dict], experts: dict[str, dict | None], choice: list[str],
           batch_size: int, max_new_tokens: int) -> list:
    """Second pass: answer each problem with the expert chosen for it, grouped by expert so that
    each expert's weights are composed once and its problems are generated in batches."""
    completions = [None] * len(problems)
    for name in sorted(set(choice)):
        idx = [i for i, c in enumerate(choice) if c == name]
        svf.use_expert(model, experts[name], key=name)
        prompts = [tokenizer.encode_chat(task.messages(problems[i])) for i in idx]
        outs = generate_all(model, tokenizer, prompts, batch_size, desc=f"{task.name} [{name}]",
                            max_new_tokens=max_new_tokens or task.max_new_tokens, stop_strings=tuple(task.stop))
        for i, c in zip(idx, outs):
            completions[i] = c
    svf.use_expert(model, None)
    return completions


def evaluate_task(model, tokenizer, task_name: str, strategy: str, split: str, limit: int, seed: int,
                  batch_size: int, max_new_tokens: int, workers: int, out_dir: Path, command: str) -> dict:
    task = data.TASKS[task_name]
    problems = subset(data.load(task_name, split), limit, seed)
    t0 = time.perf_counter()
    if strategy == "base":
        experts, choice, first_pass = {"base": None}, ["base"] * len(problems), 0.0
    elif strategy.startswith("expert:"):
        name = strategy.split(":", 1)[1]
        expert = svf.Expert.load(resolve_expert(name))
        svf.attach(model, svf.decompose(model, expert.meta.get("targets", "mlp")))
        expert = svf.Expert.load(resolve_expert(name), model)
        experts, choice, first_pass = {name: expert.z}, [name] * len(problems), 0.0
    else:
        raise SystemExit(f"error: unknown strategy {strategy!r}; choose base or expert:NAME")
    t1 = time.perf_counter()
    completions = answer(model, tokenizer, task, problems, experts, choice, batch_size, max_new_tokens)
    t2 = time.perf_counter()
    verdicts = task.score_many(problems, [c.text for c in completions], workers=workers)
    t3 = time.perf_counter()
    extracted = [task.extract(c.text, p) for p, c in zip(problems, completions)]
    correct, n = sum(verdicts), len(problems)
    lo, hi = wilson(correct, n)
    answers = Counter("(none)" if e is None else e for e in extracted)
    summary = {
        "task": task_name, "strategy": strategy, "split": split, "n": n, "correct": correct,
        "accuracy": correct / n, "ci95": [lo, hi], "no_answer": answers.get("(none)", 0),
        "answer_distribution": dict(answers.most_common(8)) if task.domain == "reasoning" else None,
        "first_pass_s": t1 - t0, "second_pass_s": t2 - t1, "scoring_s": t3 - t2,
        "generated_tokens": sum(len(c.tokens) for c in completions), "limit": limit, "seed": seed,
        "command": command,
    }
    out = out_dir / strategy.replace(":", "-").replace("/", "_") / task_name
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "responses.jsonl", "w") as f:
        for p, c, e, v, ch in zip(problems, completions, extracted, verdicts, choice):
            f.write(json.dumps({"id": p["id"], "expert": ch, "prompt": task.messages(p)[-1]["content"],
                                "response": c.text, "extracted": e, "gold": p.get("answer"), "correct": v,
                                "finish": c.finish, "tokens": len(c.tokens)}) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    dist = f"  answers {summary['answer_distribution']}" if summary["answer_distribution"] else ""
    print(f"{task_name:14s} {strategy:12s} accuracy {correct / n:6.1%}  {correct}/{n}  95% CI [{lo:.1%}, {hi:.1%}]  "
          f"no answer {summary['no_answer']}  time {t3 - t0:.0f}s  -> {out}{dist}", flush=True)
    return summary


def main(task: str, strategy: str, split: str, limit: int, seed: int, batch_size: int, max_new_tokens: int,
         workers: int, model: str | None, device: str, dtype: str, threads: int, out: str) -> list[dict]:
    tasks = list(data.SPLITS) if task == "all" else UNSEEN if task == "unseen" else task.split(",")
    for t in tasks:
        if t not in data.SPLITS:
            raise SystemExit(f"error: unknown task {t!r}; choose from {', '.join(data.SPLITS)}, all or unseen")
        if split not in data.SPLITS[t]:
            raise SystemExit(f"error: task {t!r} has no split {split!r} (it has {', '.join(data.SPLITS[t])})")
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    command = "python " + " ".join(sys.argv)
    try:
        net, tokenizer = load(model, device=device, dtype=dtype)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    return [evaluate_task(net, tokenizer, t, strategy, split, limit, seed, batch_size, max_new_tokens, workers,
                          Path(out), command) for t in tasks]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="unseen",
                   help=f"a task ({', '.join(data.SPLITS)}), several joined by commas, 'all', or 'unseen' "
                        f"({', '.join(UNSEEN)}) (default: unseen)")
    p.add_argument("--strategy", default="base", help="base (z = 1) or expert:NAME (default: base)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--limit", type=int, default=0, help="a seeded random subset of this many problems (default: 0, all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and of everything random (default: 0)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default: 16)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: each task's own budget (default: 0)")
    p.add_argument("--workers", type=int, default=4, help="parallel sandboxes for code tasks (default: 4)")
    p.add_argument("--model", default=None, help="a .gguf file or Hugging Face folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto, cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16 (default: auto, float32 on CPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: 0, torch's choice)")
    p.add_argument("--out", default="runs/eval", help="results go to OUT/STRATEGY/TASK/ (default: runs/eval)")
    main(**vars(p.parse_args()))
