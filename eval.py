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
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import adapt
import cli
import fast
import data
import lora
import results
import svf
from checkpoint import load
from cli import fail, option
from data import cls
from model import Completion

UNSEEN = ["arc_challenge", "humaneval", "math"]
EXPERTS_DIR = Path(__file__).resolve().parent / "experts"  # the experts shipped with the repo
ADAPTERS_DIR = Path(__file__).resolve().parent / "adapters"  # the shipped LoRA baselines
DOMAIN_EXPERTS = adapt.DOMAIN_EXPERTS  # gsm8k (math), mbpp (code), arc_easy (reasoning)


@dataclass
class EvalConfig:
    task: str = option("unseen", f"a task ({', '.join(data.SPLITS)}), several joined by commas, "
                       f"'all', or 'unseen' ({', '.join(UNSEEN)})")
    strategy: str = option("base", "base, prompt, cls, fewshot or expert:NAME (see above); "
                           "several joined by commas are evaluated on the same problems and "
                           "compared with the first (paired, McNemar)")
    split: str = option("test", "split to evaluate")
    limit: int = option(0, "a seeded random subset of this many problems (0: all)",
                        cli.non_negative_int)
    seed: int = option(0, "seed of the subset and of everything random", cli.seed)
    batch_size: int = option(16, "prompts per generation batch", cli.positive_int)
    max_new_tokens: int = option(0, "0: each task's own budget", cli.non_negative_int)
    workers: int = option(4, "parallel sandboxes for code tasks", cli.positive_int)
    experts_dir: str | None = option(None, "where expert NAME is NAME.safetensors (gsm8k, mbpp, "
                                     "arc_easy, cls; default: the repository's experts/)",
                                     cli.existing_folder)
    classify: str = option("likelihood", "prompt/cls: score the four replies \\boxed{label} by "
                           "likelihood, or generate one and parse it",
                           choices=("likelihood", "generate"))
    adapter: str | None = option(None, "evaluate a LoRA adapter: NAME (adapters/NAME.safetensors)"
                                 " or a .safetensors path (default: none)")
    answer: str = option("generate", "generate: greedy replies, parsed; likelihood: ARC only, the "
                         "option likeliest as the reply to the bare question, no generation",
                         choices=("generate", "likelihood"))
    resume: bool = option(False, "go on with an interrupted evaluation of the same settings: keep "
                          "its first pass and the answers it saved "
                          "(OUT/STRATEGY/TASK/partial.jsonl), skip tasks already done")
    routing: bool = option(False, "instead of a task: label the training tasks' validation "
                           "questions with the prompt and the cls first pass, and write their "
                           "confusion matrices to OUT/routing/ (--limit: a subset)")
    shots: int = option(10, "fewshot: problems used to fit alpha, then left out",
                        cli.positive_int)
    generations: int = option(10, "fewshot: CEM generations (the paper used 50-100; 10 keeps a "
                              "CPU run short)", cli.positive_int)
    population: int = option(32, "fewshot: CEM samples per generation", cli.positive_int)
    per_layer: bool = option(False, "fewshot: one alpha per expert per matrix, as the official "
                             "code (else one per expert)")
    model: str | None = option(None, "a .gguf file or Hugging Face folder (default: "
                               "SmolLM2-135M-Instruct)", cli.model_path)
    device: str = option("auto", "cpu, cuda, cuda:N or mps (auto: cuda if available)", cli.device)
    dtype: str = option("auto", "float32, bfloat16 or float16 (auto: float32 on CPU)",
                        choices=cli.DTYPES)
    threads: int = option(0, "CPU threads for torch (0: torch's choice)", cli.non_negative_int)
    out: str = option("runs/eval", "results go to OUT/STRATEGY/TASK/", cli.output_folder)


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


# The version of the code that makes a summary: raised when a fix changes what a strategy gives,
# so that results.py can mark the cells made before it. 2: few-shot mixes the experts' changes,
# and the first pass reads the question asked with a classification expert trained on it.
CODE_VERSION = 2


# ----------------------------------------------------------------------------- resuming
PARTIAL = "partial.jsonl"  # in a task's output folder while its evaluation is unfinished


def resume_from(path: Path, run: dict, resume: bool):
    """What an interrupted run of this same evaluation saved in path: its first pass (None if it
    did not finish it), its answers by problem id, and the few-shot search's finished
    generations. Without resume, or with nothing saved, path starts anew.

    The file's JSON lines: {"run": settings} first, one {"cem": ...} per CEM generation
    (fewshot), then {"first_pass": ...} once that is done, then one {"answer": ...} per problem
    as its batch is done. A line cut short by the interruption is dropped."""
    if not (resume and path.exists()):
        path.write_text(json.dumps({"run": run}) + "\n")
        return None, {}, []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    saved = records[0].get("run", {}) if records else {}
    if saved != run:
        differ = sorted(k for k in run.keys() | saved.keys() if saved.get(k) != run.get(k))
        fail(f"{path} holds an evaluation with other settings ({', '.join(differ)}); "
             "run without --resume to start it again")
    path.write_text("".join(json.dumps(r) + "\n" for r in records))  # without a cut-off last line
    first = next((r["first_pass"] for r in records if "first_pass" in r), None)
    return (first, {r["answer"]["id"]: r["answer"] for r in records if "answer" in r},
            [r["cem"] for r in records if "cem" in r])


def append_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


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


def first_pass(model, tokenizer, task, problems, shot_problems, loaded, cfg: EvalConfig,
               out: Path, first: dict | None, searched: list[dict]):
    """adapt.first_pass, saved to partial.jsonl as it goes; or, resumed, what it saved (and
    few-shot's z' from its file). Returns the first pass's record and the experts."""
    if first is not None:
        experts = adapt.strategy_experts(cfg.strategy, loaded)
        if cfg.strategy == "fewshot":
            experts = {adapt.fewshot_name(task): svf.Expert.load(out / "fewshot.safetensors",
                                                                 model).z}
        return first, experts
    t0 = time.perf_counter()
    choice, experts, labels = adapt.first_pass(
        model, tokenizer, task, problems, cfg.strategy, loaded, shot_problems, cfg.generations,
        cfg.population, cfg.per_layer, cfg.classify, cfg.batch_size, cfg.seed, out, cfg.answer,
        searched, lambda stats: append_line(out / PARTIAL, {"cem": stats}))
    # with the time of the search's earlier part, when it was resumed
    seconds = time.perf_counter() - t0 + sum(h["seconds"] for h in searched)
    first = {"seconds": seconds, "choice": choice, "labels": labels}
    append_line(out / PARTIAL, {"first_pass": first})
    return first, experts


def second_pass(model, tokenizer, task, problems, experts, choice, saved, cfg: EvalConfig,
                out: Path) -> tuple[list[Completion], float, int]:
    """adapt.second_pass for the problems an interrupted run did not answer, each batch saved
    to partial.jsonl as it is done. Returns the completions, their seconds and how many were
    saved before."""
    completions: list[Completion | None] = [None] * len(problems)
    seconds = 0.0
    for i, p in enumerate(problems):
        r = saved.get(p["id"])
        if r is not None and r["expert"] == choice[i]:
            completions[i] = Completion(r["tokens"], r["text"], finish=r["finish"])
            seconds += r["seconds"]
    todo = [i for i, c in enumerate(completions) if c is None]
    last = [time.perf_counter()]

    def keep(js: list[int], outs: list[Completion]) -> None:  # each batch, with its time
        now = time.perf_counter()
        each, last[0] = (now - last[0]) / len(js), now
        for j, c in zip(js, outs):
            i = todo[j]
            completions[i] = c
            append_line(out / PARTIAL, {"answer": {
                "id": problems[i]["id"], "expert": choice[i], "text": c.text, "tokens": c.tokens,
                "finish": c.finish, "seconds": each}})

    t0 = time.perf_counter()
    adapt.second_pass(model, tokenizer, task, [problems[i] for i in todo], experts,
                      [choice[i] for i in todo], cfg.batch_size, cfg.max_new_tokens, cfg.answer,
                      on_batch=keep)
    return completions, seconds + time.perf_counter() - t0, len(problems) - len(todo)


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


def summarise(task, problems, shot_problems, completions, verdicts, first, cfg: EvalConfig,
              run: dict, second_s: float, scoring_s: float, command: str, resumed: bool) -> dict:
    """summary.json: the counts, the interval, the two passes' times, and how it was made."""
    extracted = [task.extract(c.text, p) for p, c in zip(problems, completions)]
    correct, n, labels = sum(verdicts), len(problems), first["labels"]
    answers = Counter("(none)" if e is None else e for e in extracted)
    classified = cfg.strategy in ("prompt", "cls")
    return {
        "task": run["task"], "strategy": cfg.strategy,
        "answer": cfg.answer, "split": cfg.split, "n": n, "correct": correct,
        "accuracy": correct / n, "ci95": list(wilson(correct, n)),
        "no_answer": answers.get("(none)", 0),
        "answer_distribution": dict(answers.most_common(8)) if task.domain == "reasoning" else None,
        "experts": dict(Counter(first["choice"])),
        "labels": dict(Counter(labels)) if classified else None,
        # the share of labels that name the task's own domain
        "routing_accuracy": sum(l == task.domain for l in labels) / n if classified else None,
        "shots": [s["id"] for s in shot_problems] or None,
        "first_pass_s": first["seconds"], "second_pass_s": second_s, "scoring_s": scoring_s,
        # paper Table 3: the first pass as a share of the second
        "first_pass_share": first["seconds"] / second_s,
        "generated_tokens": sum(len(c.tokens) for c in completions), "limit": cfg.limit,
        "seed": cfg.seed, "command": command, "resumed": resumed, "run": run,
        "code_version": CODE_VERSION,
        "sandbox": data.sandbox.isolation() if task.domain == "code" else None,  # where code ran
    }


def write_results(out: Path, task, problems, completions, verdicts, first, summary) -> None:
    """responses.jsonl (one line per problem) and summary.json; partial.jsonl is then done."""
    with open(out / "responses.jsonl", "w") as f:
        for p, c, v, ch, lab in zip(problems, completions, verdicts, first["choice"],
                                    first["labels"]):
            f.write(json.dumps({
                "id": p["id"], "expert": ch, "label": lab,
                "prompt": task.messages(p)[-1]["content"], "response": c.text,
                "extracted": task.extract(c.text, p), "gold": p.get("answer"), "correct": v,
                "finish": c.finish, "tokens": len(c.tokens)}) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / PARTIAL).unlink()  # finished: responses.jsonl and summary.json hold everything


def summary_line(s: dict, out: Path) -> str:
    """The one line a finished task prints: accuracy, interval, times, where the files are."""
    lo, hi = s["ci95"]
    shown = s["strategy"] + (" (likelihood)" if s["answer"] == "likelihood" else "")
    dist = f"  answers {s['answer_distribution']}" if s["answer_distribution"] else ""
    routed = f"  experts {s['experts']}" if s["labels"] is not None else ""
    return (f"{s['task']:14s} {shown:12s} accuracy {s['accuracy']:6.1%}  {s['correct']}/{s['n']}  "
            f"95% CI [{lo:.1%}, {hi:.1%}]  no answer {s['no_answer']}  "
            f"first pass {s['first_pass_s']:.0f}s, second {s['second_pass_s']:.0f}s  "
            f"-> {out}{dist}{routed}")


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


def load_adapter(model, name: str) -> dict:
    """A LoRA adapter's A/B tensors (adapters/NAME.safetensors or a path), attached to the model."""
    path = Path(name) if name.endswith(".safetensors") else ADAPTERS_DIR / f"{name}.safetensors"
    try:
        return lora.Adapter.load(path, model).params
    except (ValueError, FileNotFoundError) as e:
        fail(f"{e} (train one: python train.py --task TASK --method lora)")


def check(cfg: EvalConfig) -> list[str]:
    """Every rule the settings must keep, in one place; returns the tasks to evaluate."""
    tasks = list(data.SPLITS) if cfg.task == "all" else UNSEEN if cfg.task == "unseen" \
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


def main(cfg: EvalConfig) -> list[dict]:
    tasks = check(cfg)
    if cfg.adapter:
        check_adapter(cfg.adapter)
    strategies = cfg.strategy.split(",")
    try:
        needed = ["cls"] if cfg.routing else list(dict.fromkeys(
            n for s in strategies for n in adapt.experts_needed(s)))
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
