"""Turn saved runs into RESULTS.md and its plots: the paper's Tables 1 and 2 (section 4), from files only.

    python results.py                              # results/ -> RESULTS.md, results/plots/*.png
    python results.py --results runs --out runs/RESULTS.md

Reads what eval.py and train.py wrote (results/eval/<strategy>/<task>/summary.json and responses.jsonl,
results/eval/fewshot/<task>/fewshot.json, results/train/<run>/config.json and log.jsonl) and the metadata
of the shipped experts/*.safetensors and adapters/*.safetensors (read as JSON, without torch). A file
that is missing shows as "not run": nothing is re-computed from a model and no number is filled in.
Each method is compared with the base model on the same problems (paired by id) with an exact McNemar
test, so that a difference of a few problems is not reported as a gain. Plots need matplotlib (optional).
The analysis and history are written by hand after the HAND_WRITTEN line, which a rerun keeps.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import cli

ROOT = Path(__file__).resolve().parent
NAMES = {"gsm8k": "GSM8K", "mbpp": "MBPP", "arc_easy": "ARC-Easy",
         "arc_challenge": "ARC-Challenge", "humaneval": "HumanEval", "math": "MATH"}
TRAIN_TASKS = ["gsm8k", "mbpp", "arc_easy"]
NEAREST = {"arc_challenge": "arc_easy", "humaneval": "mbpp", "math": "gsm8k"}  # unseen task -> its domain's task
# Table columns: name -> eval folder under results/eval ({task}: the row's task, {near}: NEAREST[task])
TABLE1 = {"base": "base", "LoRA": "adapter-{task}", "SVF": "expert-{task}"}
TABLE2 = {"base": "base", "LoRA (nearest domain)": "adapter-{near}", "prompt": "prompt", "cls": "cls",
          "fewshot": "fewshot"}
LIKELIHOOD = "-likelihood"  # suffix of the eval folders whose answers were read by likelihood (ARC)
MULTIPLE_CHOICE = ("arc_easy", "arc_challenge")
# table rows: (task, reading); the multiple-choice tasks once more, read by likelihood
TABLE1_ROWS = [(t, "") for t in TRAIN_TASKS] + [(t, LIKELIHOOD) for t in TRAIN_TASKS if t in MULTIPLE_CHOICE]
TABLE2_ROWS = [(t, "") for t in NEAREST] + [(t, LIKELIHOOD) for t in NEAREST if t in MULTIPLE_CHOICE]
NOT_RUN = "not run"
# RESULTS.md ends in a section written by hand (analysis, history, measurement notes): whatever
# follows this line in the old file is written back as it was, so a rerun cannot erase it.
HAND_WRITTEN = "<!-- Written by hand below this line: python results.py keeps it as it is. -->"
NO_MATPLOTLIB = "plots skipped: matplotlib is not installed (pip install matplotlib)"


# ----------------------------------------------------------------------------- reading files

def read_json(path: Path) -> dict | None:
    """The JSON in path, or None when the file is missing or unreadable (a run still writing it)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict] | None:
    """One dict per non-empty line; a torn last line (a run still writing) is skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def safetensors_meta(path: Path) -> dict | None:
    """The "meta" JSON of a safetensors file, with "trainable" counted from the tensor shapes if absent.

    The format: an 8-byte little-endian header length, then a JSON header mapping each tensor name to
    its dtype, shape and offsets, and "__metadata__" to a dict of strings."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        meta = json.loads(header.get("__metadata__", {}).get("meta", "{}"))
    except (OSError, ValueError, struct.error):
        return None
    if "trainable" not in meta:
        meta["trainable"] = sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return meta


def hand_written(path: Path) -> str:
    """What follows the HAND_WRITTEN line of an existing RESULTS.md, or "" if it has none."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return ""
    _, found, kept = text.partition("\n" + HAND_WRITTEN + "\n")
    return kept if found else ""


def eval_run(results: Path, folder: str, task: str) -> dict | None:
    """summary.json of one evaluation (with "dir" added), or None if it was not run."""
    summary = read_json(results / "eval" / folder / task / "summary.json")
    if not isinstance(summary, dict) or not summary.get("n") or "correct" not in summary:
        return None  # missing, unreadable, or no problems scored
    return {**summary, "dir": results / "eval" / folder / task}


def train_runs(results: Path) -> list[dict]:
    """Every results/train/<run> with a config.json: name, config and its log (one dict per step)."""
    runs = []
    for cfg_path in sorted((results / "train").glob("*/config.json")):
        if (config := read_json(cfg_path)) is not None:
            runs.append({"name": cfg_path.parent.name, "config": config,
                         "log": read_jsonl(cfg_path.parent / "log.jsonl") or []})
    return runs


# ----------------------------------------------------------------------------- statistics and formatting

def mcnemar_p(better: int, worse: int) -> float:
    """Exact two-sided McNemar test: under "no difference" each discordant pair is a fair coin, so
    p = 2 P(Binomial(better + worse, 1/2) <= min(better, worse)), capped at 1."""
    n = better + worse
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(better, worse) + 1)) / 2 ** n)


def compare(name: str, base: dict | None, other: dict | None) -> str:
    """One method against the base model on the same problems, paired by id."""
    if base is None or other is None:
        return f"{name} vs base: {'base' if base is None else name} not run"
    a, b = ({r["id"]: bool(r.get("correct")) for r in read_jsonl(run["dir"] / "responses.jsonl") or [] if "id" in r}
            for run in (base, other))
    if not a or not b:
        return f"{name} vs base: not compared (responses.jsonl missing)"
    shared = set(a) & set(b)
    if not (set(b) <= set(a) or set(a) <= set(b)):
        return f"{name} vs base: different problem sets, not compared"
    # fewshot on a whole set (HumanEval) scores it less its shots: compare on the problems both scored
    on = "" if set(a) == set(b) else f" on the {len(shared)} problems both scored"
    better = sum(b[i] and not a[i] for i in shared)
    worse = sum(a[i] and not b[i] for i in shared)
    p = mcnemar_p(better, worse)
    return (f"{name} vs base{on}: {100 * (better - worse) / len(shared):+.1f} points ({better} better, {worse} worse), "
            f"McNemar p {'< 0.001' if p < 0.001 else f'= {p:.3f}'}" + (", within noise" if p >= 0.05 else ""))


def answers(run: dict) -> str:
    """The answer distribution, and what its most common answer would score if given every time: a gain
    that comes from answering one letter is not a gain."""
    dist = run["answer_distribution"]
    text = ", ".join(f"{k} {v}" for k, v in dist.items())
    top = next((k for k in dist if k != "(none)"), None)
    rows = read_jsonl(run["dir"] / "responses.jsonl") or []
    if top is None or not rows or "gold" not in rows[0]:
        return text
    return text + f" (answering {top} every time would score {sum(r.get('gold') == top for r in rows)}/{len(rows)})"


# Strategies whose results changed with records.CODE_VERSION 2 (the mixing rule, the first pass's input):
# their cells from older summaries are marked until they are run again.
CHANGED_IN_2 = ("prompt", "cls", "fewshot")
STALE = ("† made by the code before the correctness fixes of the mixing rule and the first pass "
         "(records.CODE_VERSION 1): to be run again")


def stale(run: dict | None) -> bool:
    return run is not None and run.get("strategy") in CHANGED_IN_2 and run.get("code_version", 1) < 2


def cell(run: dict | None) -> str:
    """"19.7% (118/600) [16.7, 23.0]": accuracy, counts and the 95% Wilson interval of summary.json
    (with † when the code that made it has since changed the strategy's results)."""
    if run is None:
        return NOT_RUN
    ci = " [{:.1f}, {:.1f}]".format(*(100 * x for x in run["ci95"])) if run.get("ci95") else ""
    return f"{100 * run['correct'] / run['n']:.1f}% ({run['correct']}/{run['n']}){ci}" + (" †" if stale(run) else "")


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def rel(path: Path, here: Path) -> str:
    """A path as RESULTS.md should link it: relative to the folder RESULTS.md is in."""
    return Path(os.path.relpath(path, here)).as_posix()


# ----------------------------------------------------------------------------- sections

def table(results: Path, rows: list[tuple[str, str]], columns: dict[str, str],
          extra: dict[str, list[str]]) -> list[str]:
    """A markdown table (rows: (task, reading) pairs, columns: methods), then per row the paired
    comparisons with the base model, the answer distribution of each cell that has one, and any extra
    lines. reading "" is generated answers; LIKELIHOOD reads the likeliest option (eval.py --answer
    likelihood), from the folders named with that suffix, and is compared with the base read alike."""
    runs = {(t, r): {c: eval_run(results, f.format(task=t, near=NEAREST.get(t, t)) + r, t) for c, f in columns.items()}
            for t, r in rows}
    lines = ["| task | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {row_name(*row)} | " + " | ".join(cell(runs[row][c]) for c in columns) + " |" for row in rows]
    for t, r in rows:
        found = runs[t, r]
        notes = [compare(c.split(" (")[0], found["base"], run) for c, run in found.items() if c != "base"]
        notes += [f"answers, {c}: {answers(run)}" for c, run in found.items() if run and run.get("answer_distribution")]
        lines += ["", f"**{row_name(t, r)}**", ""] + [f"- {n}" for n in notes + (extra.get(t, []) if not r else [])]
    return lines


def row_name(task: str, reading: str) -> str:
    return NAMES[task] + (" (by likelihood)" if reading == LIKELIHOOD else "")


def training_lines(task: str, experts: Path, adapters: Path, results: Path, runs: list[dict], here: Path) -> list[str]:
    """Trainable numbers of the shipped expert and adapter, and the wall time of the run that made each."""
    lines = []
    for label, method, folder in (("SVF", "svf", experts), ("LoRA", "lora", adapters)):
        path = folder / f"{task}.safetensors"
        meta = safetensors_meta(path)
        if meta is None:
            lines.append(f"{label}: {rel(path, here)} not found")
        else:
            best = (f", best validation {100 * meta['val_accuracy']:.1f}% at step {meta.get('step')}"
                    if meta.get("val_accuracy") is not None else "")
            lines.append(f"{label}: {meta['trainable']:,} trainable numbers ({rel(path, here)}{best})")
        found = [r for r in runs if r["config"].get("task") == task and r["config"].get("method", "svf") == method]
        if len(found) > 1 and meta and meta.get("config"):  # keep the run(s) with the settings the file names
            found = [r for r in found if all(r["config"].get(k) == v for k, v in meta["config"].items())] or found
        if not found:
            lines.append(f"{label} training time: no run of {task} with method {method} in {rel(results, here)}/train")
        for r in found:
            wall = sum(s.get("t_step", 0) + s.get("t_val", 0) for s in r["log"])
            lines.append(f"{label} training time: {duration(wall)} ({r['name']}: {sum(s.get('step', 0) > 0 for s in r['log'])} steps logged)")
    return lines


def routing_lines(results: Path) -> list[str]:
    """Prompt and cls dispatch: how often the first pass read the task's own domain, and its cost."""
    lines = ["| task | strategy | routing accuracy | experts chosen | first pass | second pass | first-pass share |",
             "|---|---|---|---|---|---|---|"]
    for strategy in ("prompt", "cls"):
        for t, r in TABLE2_ROWS:
            run = eval_run(results, strategy + r, t)
            if run is None:
                lines.append(f"| {row_name(t, r)} | {strategy} | {NOT_RUN} | | | | |")
                continue
            routed = run.get("routing_accuracy")
            chosen = ", ".join(f"{k} {v}" for k, v in (run.get("experts") or {}).items())
            t1, t2 = run.get("first_pass_s", 0), run.get("second_pass_s", 0)
            lines.append(f"| {row_name(t, r)} | {strategy} | {'-' if routed is None else f'{100 * routed:.1f}%'} | {chosen} "
                         f"| {duration(t1)} | {duration(t2)} | {f'{100 * t1 / t2:.1f}%' if t2 else '-'} |")
    return lines


def confusion_lines(results: Path) -> list[str]:
    """eval.py --routing: each first pass's labels on held-out questions of known domain."""
    run = read_json(results / "eval" / "routing" / "summary.json")
    if run is None:
        return [f"Confusion matrices on the training tasks' validation questions: {NOT_RUN} (python eval.py --routing)."]
    lines = [f"On the {run['n']} validation questions of the three training tasks (never trained on; "
             f"`{run.get('command')}`), rows the true domain, columns the label read:"]
    for strategy in ("prompt", "cls"):
        r = run[strategy]
        labels = list(next(iter(r["confusion"].values())))
        ci = "[{:.1f}, {:.1f}]".format(*(100 * x for x in r["ci95"]))
        lines += ["", f"{strategy}: {100 * r['accuracy']:.1f}% ({r['correct']}/{run['n']}) {ci} labelled with "
                      f"their domain, in {duration(r['seconds'])}", "",
                  "| true \\ read | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        lines += [f"| {t} | " + " | ".join(str(row[label]) for label in labels) + " |" for t, row in r["confusion"].items()]
    return lines


def fewshot_lines(results: Path) -> list[str]:
    """The CEM search of the fewshot strategy: its cost per generation and in total, and what it found."""
    lines = ["| task | generations | population | time per generation | total | best shot accuracy | alpha |",
             "|---|---|---|---|---|---|---|"]
    for t, r in TABLE2_ROWS:
        report = read_json(results / "eval" / ("fewshot" + r) / t / "fewshot.json")
        if report is None or not report.get("history"):
            lines.append(f"| {row_name(t, r)} | {NOT_RUN} | | | | | |")
            continue
        h, seconds = report["history"], [g["seconds"] for g in report["history"]]
        alpha = [a if isinstance(a, (int, float)) else sum(a) / len(a) for a in report["alpha"]]  # per layer: mean
        alphas = ", ".join(f"{n} {a:.2f}" for n, a in zip(report["experts"], alpha))
        lines.append(f"| {row_name(t, r)} | {len(h)} | {report.get('population')} | {duration(sum(seconds) / len(h))} | "
                     f"{duration(sum(seconds))} | {100 * report['best'][0]:.0f}% on {len(report.get('shots', []))} "
                     f"shots | {alphas}{' (mean over matrices)' if report.get('per_layer') else ''} |")
    return lines


def other_lines(results: Path) -> list[str]:
    """Every evaluation that no table shows (variants of an expert, other tasks), each against the base
    model on the same task, with its answer distribution."""
    shown = {(c.format(task=t) + r, t) for t, r in TABLE1_ROWS for c in TABLE1.values()}
    shown |= {(c.format(near=NEAREST[t]) + r, t) for t, r in TABLE2_ROWS for c in TABLE2.values()}
    lines = []
    for path in sorted((results / "eval").glob("*/*/summary.json")):
        folder, task = path.parent.parent.name, path.parent.name
        if (folder, task) in shown:
            continue
        run = eval_run(results, folder, task)
        if run is None:
            continue
        dist = f"; answers {answers(run)}" if run.get("answer_distribution") else ""
        # answers read by likelihood (eval.py --answer likelihood) are compared with the base model read alike
        base = "base" + LIKELIHOOD if folder.endswith(LIKELIHOOD) else "base"
        versus = "" if folder == base else f"; {compare(folder, eval_run(results, base, task), run)}"
        lines.append(f"- {folder} on {NAMES.get(task, task)}: {cell(run)}{versus}{dist}")
    return lines or ["- none"]


def command_lines(results: Path, runs: list[dict]) -> list[str]:
    lines = []
    for path in sorted((results / "eval").glob("*/*/summary.json")):
        s = read_json(path) or {}
        lines.append(f"- {path.parent.parent.name}/{path.parent.name}: n {s.get('n')}, seed {s.get('seed')}: "
                     f"`{s.get('command', 'no command recorded')}`")
    for r in runs:
        c = r["config"]
        lines.append(f"- train/{r['name']}: {c.get('steps')} steps, seed {c.get('seed')}: "
                     f"`{c.get('command', 'no command recorded')}`")
    return lines or [f"- {NOT_RUN}"]


def plots(results: Path, runs: list[dict], here: Path) -> list[str]:
    """Draw results/plots/train-<task>.png and cem-<task>.png; return their markdown links."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return [NO_MATPLOTLIB]
    folder, lines = results / "plots", []
    folder.mkdir(parents=True, exist_ok=True)
    for task in sorted({r["config"].get("task") for r in runs if r["log"]}):
        mine = [r for r in runs if r["config"].get("task") == task and r["log"]]
        panels = [("val_accuracy", "validation accuracy")] + [
            (key, label) for key, label in (("reward", "mean reward"), ("informative_share", "informative groups"),
                                            ("kl", "KL term"), ("loss", "loss"))
            if any(key in s for r in mine for s in r["log"])]
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
        for ax, (key, label) in zip(axes[0], panels):
            for i, r in enumerate(mine):  # one colour per run in every panel
                points = [(s["step"], s[key]) for s in r["log"] if s.get(key) is not None and s[key] == s[key]]
                if points:
                    how = f"{r['config'].get('method', 'svf')}/{r['config'].get('objective', 'reinforce')}"
                    ax.plot(*zip(*points), color=f"C{i}", marker="o", markersize=3 if key == "val_accuracy" else 1.5,
                            label=f"{r['name']} ({how})")
            ax.set(xlabel="step", ylabel=label, title=f"{task}: {label}")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
            if ax.get_lines():  # a run without validation leaves that panel empty
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / f"train-{task}.png", dpi=100)
        plt.close(fig)
        lines.append(f"![training curves of {task}]({rel(folder / f'train-{task}.png', here)})")
    for path in sorted((results / "eval").glob("fewshot*/*/fewshot.json")):
        history, task = (read_json(path) or {}).get("history"), path.parent.name + path.parent.parent.name.removeprefix("fewshot")
        if not history:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        gens = [g["generation"] for g in history]
        ax.plot(gens, [g["best"][0] for g in history], marker="o", label="best")
        ax.plot(gens, [g["population_mean"][0] for g in history], marker="o", label="population mean")
        ax.set(xlabel="CEM generation", ylabel="shot accuracy", title=f"{task}: few-shot CEM search")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / f"cem-{task}.png", dpi=100)
        plt.close(fig)
        lines.append(f"![CEM search on {task}]({rel(folder / f'cem-{task}.png', here)})")
    return lines or ["no training logs or CEM histories to plot"]


def plot_experts(experts: Path, folder: Path, here: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
    except ImportError:
        return [NO_MATPLOTLIB]
    folder.mkdir(parents=True, exist_ok=True)
    return expert_plots(experts, folder, here) or ["no SVF experts to draw"]


def expert_plots(experts: Path, folder: Path, here: Path) -> list[str]:
    """For each shipped SVF expert: a heatmap of z - 1 (rows: layers; columns: singular-value index, one
    panel per matrix kind), and the spectrum s before and s * z after for a few matrices when the base
    model's SVD is in svf's cache (an expert file holds z only). Returns the markdown links."""
    import matplotlib.pyplot as plt
    import torch
    from safetensors import SafetensorError, safe_open
    import svf
    lines = []
    for path in sorted(experts.glob("*.safetensors")):
        try:
            with safe_open(path, "pt") as f:
                z = {n: f.get_tensor(n) for n in f.keys()}
                meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        except (SafetensorError, OSError, ValueError) as e:  # truncated, corrupt or not a safetensors file
            cli.fail(f"{path}: not a readable expert file ({e})")
        if not z or not all(re.fullmatch(r"layers\.\d+\.\w+\.\w+", n) for n in z):
            continue  # a LoRA adapter (.A/.B) or not an expert file
        kinds = sorted({n.split(".", 2)[2] for n in z})                     # "mlp.down", "mlp.gate", ...
        layers = sorted({int(n.split(".")[1]) for n in z})
        dev = {k: torch.stack([z[f"layers.{i}.{k}"] - 1 for i in layers]) for k in kinds}   # (layers, r)
        lim = max(float(d.abs().max()) for d in dev.values()) or 1e-6
        fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.8), squeeze=False)
        for ax, k in zip(axes[0], kinds):
            im = ax.imshow(dev[k].numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.set(xlabel="singular value index (largest first)", ylabel="layer", title=f"{path.stem}: z - 1, {k}")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
        fig.savefig(folder / f"expert-{path.stem}-z.png", dpi=100)
        plt.close(fig)
        lines.append(f"![z - 1 of {path.stem}]({rel(folder / f'expert-{path.stem}-z.png', here)})")
        cache = svf.CACHE_DIR / f"{meta.get('base_model')}-{meta.get('targets', 'mlp')}-float32.safetensors"
        if not cache.exists():
            lines.append(f"(spectra of {path.stem}: the base model's SVD is not in {svf.CACHE_DIR}; run anything "
                         "that decomposes it, e.g. eval.py with an expert)")
            continue
        with safe_open(cache, "pt") as f:
            picks = [f"layers.{i}.{kinds[0]}" for i in (layers[0], layers[len(layers) // 2], layers[-1])]
            spectra = {n: f.get_tensor(f"{n}.s") for n in picks}
        fig, axes = plt.subplots(1, len(picks), figsize=(4.5 * len(picks), 3.2), squeeze=False)
        for ax, n in zip(axes[0], picks):
            ax.semilogy(spectra[n].numpy(), label="base s")
            ax.semilogy((spectra[n] * z[n]).numpy(), label="s * z", linestyle="--")
            ax.set(xlabel="index", ylabel="singular value", title=f"{path.stem}: {n}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / f"expert-{path.stem}-spectra.png", dpi=100)
        plt.close(fig)
        lines.append(f"![spectra of {path.stem}]({rel(folder / f'expert-{path.stem}-spectra.png', here)})")
    return lines


def main(results: str, out: str, experts: str, adapters: str) -> None:
    results_dir, out_path = Path(results), Path(out)
    here = out_path.resolve().parent
    runs = train_runs(results_dir)
    extra = {t: training_lines(t, Path(experts), Path(adapters), results_dir, runs, here) for t in TRAIN_TASKS}
    doc = [
        f"_Generated by `python results.py` from {rel(results_dir.resolve(), here)}/: do not edit by hand, "
        "rerun it; the section written by hand at the end is kept as it is._", "",
        "# Results", "",
        "Each cell: accuracy (correct/n) [95% Wilson interval, in %]. Under each table, every method against "
        "the base model on the same problems (paired by id; exact two-sided McNemar test on the problems "
        "where they disagree; p >= 0.05 is within noise).", "",
        "## Table 1: training tasks (held-out test splits)", "",
        *table(results_dir, TABLE1_ROWS, TABLE1, extra), "",
        "## Table 2: unseen tasks", "",
        "The LoRA baseline has no adaptation step, so its column is the adapter of the nearest training "
        "domain: " + ", ".join(f"{NAMES[t]} <- adapter-{d}" for t, d in NEAREST.items()) + ".", "",
        *table(results_dir, TABLE2_ROWS, TABLE2, {}), "",
        STALE, "",
        "## The first pass", "",
        "Prompt and cls dispatch: the share of problems labelled with the task's own domain, and the first "
        "pass's time as a share of the second (paper, Table 3).", "",
        *routing_lines(results_dir), "",
        *confusion_lines(results_dir), "",
        "Few-shot: the CEM search over the experts' mixing weights alpha on the task's shots.", "",
        *fewshot_lines(results_dir), "",
        "## Other evaluations", "",
        *other_lines(results_dir), "",
        "## How each number was made", "",
        *command_lines(results_dir, runs), "",
        "## Plots", "",
        *plots(results_dir, runs, here), "",
        "## What each expert changed", "",
        *plot_experts(Path(experts), results_dir / "plots", here), "",
    ]
    kept = hand_written(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(doc) + "\n" + HAND_WRITTEN + "\n" + kept, encoding="utf-8")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    p = cli.parser(__doc__)
    p.add_argument("--results", type=cli.existing_folder, default=str(ROOT / "results"),
                   help="folder that eval.py and train.py wrote into")
    p.add_argument("--out", type=cli.output_file, default=str(ROOT / "RESULTS.md"), help="the markdown file to write")
    p.add_argument("--experts", type=cli.existing_folder, default=str(ROOT / "experts"),
                   help="folder of the shipped SVF experts")
    p.add_argument("--adapters", type=cli.existing_folder, default=str(ROOT / "adapters"),
                   help="folder of the shipped LoRA adapters")
    main(**vars(p.parse_args()))
