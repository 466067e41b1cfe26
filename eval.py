"""Evaluate the model on the paper's tasks (section 4), with or without self-adaptation.

    python eval.py --task gsm8k --strategy base --limit 200
    python eval.py --task all --strategy base
    python eval.py --task arc_easy --strategy expert:arc_easy  # experts/arc_easy.safetensors
    python eval.py --strategy prompt        # the unseen tasks: the base model picks the expert
    python eval.py --strategy cls           # ... the classification expert picks it
    python eval.py --strategy fewshot       # ... CEM mixes the experts on 10 shots
    python eval.py --task gsm8k --adapter gsm8k   # the LoRA baseline (adapters/gsm8k.safetensors)
    python eval.py --routing                # the first passes' confusion matrices
    python eval.py --task arc_challenge --answer likelihood --strategy base,cls  # paired

Strategies (paper section 3.2, see adapt.py). A first pass decides the expert of each problem,
a second pass answers, grouped by expert:
    base            z = 1 (no adaptation)
    expert:NAME     one expert for every problem (experts/NAME.safetensors, or a .safetensors path)
    prompt          the base model classifies each question as code/math/reasoning/other;
                    the label picks mbpp/gsm8k/arc_easy, "other" the base model
    cls             the same, read by the classification expert experts/cls.safetensors
    fewshot         z' = sum_k alpha_k z_k over the three experts, alpha searched by CEM on
                    --shots problems of the task (then left out of the scored problems)
--adapter NAME evaluates a LoRA adapter (adapters/NAME.safetensors or a path) like an expert:
every problem is answered with it; results go to --out/adapter-NAME/<task>/.

--answer likelihood (ARC): no generation; the answer is the option whose text is likeliest as
the reply to the bare question (the usual cloze evaluation of ARC, and what the options rollout
of rl.py trains). Results go to --out/<strategy>-likelihood/<task>/.

For each task: batched generation (a progress bar), scoring, and a one-line summary with
accuracy, correct/total, a 95% Wilson interval and the time. Every prompt, response,
extracted answer, verdict and the expert that answered (with the first pass's label) is
written as JSONL, the summary (with first- and second-pass times) as JSON, into
--out/<strategy>/<task>/ (the folder is printed); fewshot adds fewshot.json (alpha, shots,
the CEM history) and fewshot.safetensors (the adapted z', usable as --strategy expert:PATH).
While a task runs, its first pass and each batch of answers are saved to partial.jsonl there;
after an interruption, the same command with --resume goes on from them.
"""
from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import adapt
import cli
import fast
import data
import results
import svf
from checkpoint import load
from cli import fail
from config import EvalConfig
from data import cls
from experts import (EXPERTS_DIR, check_adapter, experts_needed, load_adapter, load_experts,
                     read_experts, resolve_experts)
from records import (PARTIAL, first_pass, resume_from, second_pass, summarise, summary_line, wilson,
                     write_results)

def subset(problems: list[dict], limit: int, seed: int) -> list[dict]:
    """A seeded random subset of `limit` problems (all when limit is 0), in the file's order."""
    if not limit or limit >= len(problems):
        return problems
    keep = sorted(random.Random(seed).sample(range(len(problems)), limit))
    return [problems[i] for i in keep]


def task_folder(cfg: EvalConfig, task_name: str) -> Path:
    """OUT/STRATEGY/TASK, with -likelihood after the strategy when answers are read so."""
    folder = cfg.strategy.replace(":", "-").replace("/", "_")
    folder += "-likelihood" if cfg.answer == "likelihood" else ""
    return Path(cfg.out) / folder / task_name


def task_problems(cfg: EvalConfig, task_name: str) -> tuple[list[dict], list[dict]]:
    """The scored problems (a seeded subset) and, for fewshot, its shots: from outside the scored
    subset when possible, so that the scored problems are base's."""
    every = data.load(task_name, cfg.split)
    problems = subset(every, cfg.limit, cfg.seed)
    if cfg.strategy != "fewshot":
        return problems, []
    scored = {p["id"] for p in problems}
    spare = [p for p in every if p["id"] not in scored]
    return adapt.pick_shots(task_name, cfg.split, problems, cfg.shots, cfg.seed, spare)


def run_key(cfg: EvalConfig, task_name: str, model) -> dict:
    """What makes two runs the same evaluation, so that --resume continues only the same one."""
    fewshot = {"shots": cfg.shots, "generations": cfg.generations, "population": cfg.population,
               "per_layer": cfg.per_layer}
    return {"task": task_name, "strategy": cfg.strategy, "answer": cfg.answer, "split": cfg.split,
            "limit": cfg.limit, "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens,
            "base_model": svf.model_fingerprint(model),
            **(fewshot if cfg.strategy == "fewshot" else {}),
            **({"classify": cfg.classify} if cfg.strategy in ("prompt", "cls") else {})}


def evaluate_task(model, tokenizer, task_name: str, loaded: dict[str, dict], cfg: EvalConfig,
                  command: str) -> dict:
    """Both passes over one task's problems, resumable; writes responses.jsonl and summary.json
    into OUT/STRATEGY/TASK/ and returns the summary."""
    task = data.TASKS[task_name]
    problems, shot_problems = task_problems(cfg, task_name)
    out = task_folder(cfg, task_name)
    out.mkdir(parents=True, exist_ok=True)
    run = run_key(cfg, task_name, model)
    if cfg.resume and (out / "summary.json").exists() and not (out / PARTIAL).exists():
        done = json.loads((out / "summary.json").read_text())
        if done.get("run") == run:
            print(f"{task_name}: already evaluated in {out} (--resume)", flush=True)
            return done
    first, saved, searched = resume_from(out / PARTIAL, run, cfg.resume)
    resumed = first is not None or bool(searched)
    first, experts = first_pass(model, tokenizer, task, problems, shot_problems, loaded, cfg,
                                out, first, searched)
    choice = first["choice"]
    if resumed:
        saved_n = sum(1 for i, p in enumerate(problems) if p["id"] in saved
                      and saved[p["id"]]["expert"] == choice[i])
        print(f"{task_name}: resumed in {out}: "
              + (f"{len(searched)} CEM generations, " if searched else "")
              + f"{saved_n} of {len(problems)} answers were saved", flush=True)
    completions, second_s, _ = second_pass(model, tokenizer, task, problems, experts, choice,
                                           saved, cfg, out)
    t0 = time.perf_counter()
    verdicts = task.score_many(problems, [c.text for c in completions], workers=cfg.workers)
    scoring_s = time.perf_counter() - t0
    summary = summarise(task, problems, shot_problems, completions, verdicts, first, cfg, run,
                        second_s, scoring_s, command, resumed)
    write_results(out, task, problems, completions, verdicts, first, summary)
    print(summary_line(summary, out), flush=True)
    return summary


def routing(model, tokenizer, cls_z: dict, limit: int, seed: int, batch_size: int, out_dir: Path,
            command: str) -> dict:
    """How the two first passes label questions whose domain is known: the validation questions of
    the three training tasks (the classification expert never trained on them), read by the base
    model (prompt) and by the classification expert (cls). A confusion matrix per reader, rows the
    true domain, columns the label read; written to OUT/routing/summary.json."""
    problems = subset(cls.cls_problems("validation"), limit, seed)
    questions, truth = [p["question"] for p in problems], [p["answer"] for p in problems]
    summary = {"n": len(problems), "split": "validation", "limit": limit, "seed": seed,
               "command": command}
    lengths = adapt.reply_lengths(tokenizer)
    summary["reply_tokens"] = dict(zip(cls.LABELS, lengths.int().tolist()))
    for strategy, z in (("prompt", None), ("cls", cls_z)):
        t0 = time.perf_counter()
        logp = adapt.label_logprobs(model, tokenizer, questions, z, batch_size)
        seconds = time.perf_counter() - t0
        for reduce in ("sum", "mean"):  # the first pass reads the sum; the mean for comparison
            labels = adapt.read_labels(logp, lengths, reduce)
            correct = sum(label == t for label, t in zip(labels, truth))
            confusion = {t: {label: sum(l == label and tt == t for l, tt in zip(labels, truth))
                             for label in cls.LABELS} for t in dict.fromkeys(truth)}
            key = strategy if reduce == "sum" else f"{strategy}-mean"
            n = len(problems)
            summary[key] = {"correct": correct, "accuracy": correct / n, "reduce": reduce,
                            "ci95": wilson(correct, n), "confusion": confusion, "seconds": seconds}
            print(f"{key}: {correct}/{n} labelled with their domain ({correct / n:.1%})")
            print("  true \\ read " + "".join(f"{label:>10s}" for label in cls.LABELS))
            for t, row in confusion.items():
                print(f"  {t:12s}" + "".join(f"{row[label]:10d}" for label in cls.LABELS))
    out = out_dir / "routing"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"-> {out}", flush=True)
    return summary


def check(cfg: EvalConfig) -> list[str]:
    """Every rule the settings must keep, in one place; returns the tasks to evaluate."""
    tasks = list(data.SPLITS) if cfg.task == "all" else data.UNSEEN if cfg.task == "unseen" \
        else cfg.task.split(",")
    for t in tasks:
        if t not in data.SPLITS:
            fail(f"unknown task {t!r} (--task); choose from {', '.join(data.SPLITS)}, all or "
                 "unseen")
        if cfg.split not in data.SPLITS[t]:
            fail(f"task {t!r} has no split {cfg.split!r} (--split; it has "
                 f"{', '.join(data.SPLITS[t])})")
    if cfg.answer == "likelihood" and any(not hasattr(data.TASKS[t], "option_responses")
                                          for t in tasks):
        fail("--answer likelihood needs multiple-choice tasks (arc_easy, arc_challenge)")
    if cfg.strategy == "fewshot" and min(cfg.shots, cfg.generations, cfg.population) < 1:
        fail("--shots, --generations and --population must be positive")
    if cfg.adapter and cfg.strategy != "base":
        fail("--adapter evaluates a LoRA adapter on its own; it goes with --strategy base only")
    return tasks


def main(cfg: EvalConfig) -> list[dict]:
    tasks = check(cfg)
    if cfg.adapter:
        check_adapter(cfg.adapter)
    strategies = cfg.strategy.split(",")
    try:
        needed = ["cls"] if cfg.routing else list(dict.fromkeys(
            n for s in strategies for n in experts_needed(s)))
    except ValueError as err:
        fail(str(err))
    paths = resolve_experts(needed, Path(cfg.experts_dir or EXPERTS_DIR))  # before the model
    experts = read_experts(paths)  # ... also a corrupt expert file
    fast.enable()  # the CPU speed path (fast.py)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    command = "python " + " ".join(sys.argv)
    try:
        net, tokenizer = load(cfg.model, device=cfg.device, dtype=cfg.dtype)
    except (ValueError, FileNotFoundError) as e:  # a model file that is corrupt or not a Llama's
        fail(str(e))
    loaded = load_experts(net, paths, experts)
    if cfg.routing:
        return [routing(net, tokenizer, loaded["cls"], cfg.limit, cfg.seed, cfg.batch_size,
                        Path(cfg.out), command)]
    if cfg.adapter:
        cfg = replace(cfg, strategy=f"adapter:{cfg.adapter}")
        loaded[cfg.strategy] = load_adapter(net, cfg.adapter)
    try:
        done = [evaluate_task(net, tokenizer, t, loaded, replace(cfg, strategy=s), command)
                for s in strategies for t in tasks]
    except KeyboardInterrupt:
        raise SystemExit(f"\ninterrupted: the answers given so far are kept in "
                         f"{cfg.out}/.../{PARTIAL}; run the same command with --resume to go on")
    for s in strategies[1:]:  # each strategy against the first, on the same problems
        for t in tasks:
            first, other = (task_folder(replace(cfg, strategy=x), t) for x in (strategies[0], s))
            print(f"{t}: " + results.compare(s, {"dir": first}, {"dir": other})
                  .replace("vs base", f"vs {strategies[0]}"), flush=True)
    return done


if __name__ == "__main__":
    p = cli.parser(__doc__)
    cli.add_options(p, EvalConfig)
    main(EvalConfig(**vars(p.parse_args())))
