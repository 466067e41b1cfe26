"""What an evaluation writes, and how an interrupted one is resumed from it.

While a task runs, OUT/STRATEGY/TASK/partial.jsonl grows by one JSON line per step done: the
run's settings first, one line per CEM generation (fewshot), the first pass once it is done,
then one line per answered problem. When the task is done, responses.jsonl (one line per
problem) and summary.json (counts, a Wilson interval, the two passes' times, the command)
replace it. results.py reads these files to write RESULTS.md.

first_pass and second_pass here are adapt's two passes wrapped so that each step is written as
it is done, and read back instead of done again when the run is resumed.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import adapt
import data
import svf
from cli import fail
from completion import Completion
from config import EvalConfig



# The version of the code that makes a summary: raised when a fix changes what a strategy gives,
# so that results.py can mark the cells made before it. 2: few-shot mixes the experts' changes,
# and the first pass reads the question asked with a classification expert trained on it.
CODE_VERSION = 2


# ----------------------------------------------------------------------------- while a task runs
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


# ----------------------------------------------------------------------------- the two passes, saved as they go
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


# ----------------------------------------------------------------------------- when it is done
def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (sensible at 0 and at small counts)."""
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


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
