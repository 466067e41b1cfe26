"""results.py: tables from a results tree written by eval.py's own writer (no model), McNemar by
hand, safetensors read by hand."""
import contextlib
import json
import math
import struct
import sys
from pathlib import Path
from unittest import mock

import pytest

import config
import results


class GivenTask:
    """A task whose answers are given: eval.py's writer asks it for the prompt and the extracted
    answer of each response (the verdicts are given too)."""

    def __init__(self, name: str, answers: list | None, n: int):
        self.name, self.answers = name, answers or [None] * n
        self.domain = "reasoning" if answers else "math"  # eval counts the answers of reasoning

    def messages(self, problem: dict) -> list[dict]:
        return [{"role": "user", "content": problem["question"]}]

    def extract(self, response: str, problem: dict) -> str | None:
        return self.answers[problem["index"]]


def write_summary(folder: Path, correct: list[bool], ids: list[str], answers: list | None = None,
                  **extra) -> None:
    """summary.json and responses.jsonl written by eval.py's own writer (summarise and
    write_results) for these verdicts; extra: what the passes not run here would have measured
    (first-pass time, routing)."""
    import records
    from completion import Completion
    n, task = len(correct), GivenTask(folder.name, answers, len(correct))
    problems = [{"id": i, "index": k, "question": f"question {i}", "answer": "gold"}
                for k, i in enumerate(ids)]
    completions = [Completion([5, 6], f"reply {i}") for i in ids]
    first = {"seconds": 0.0, "choice": ["base"] * n, "labels": [None] * n}
    cfg = config.EvalConfig(task=folder.name, strategy=folder.parent.name, limit=n)
    run = {"task": folder.name, "strategy": cfg.strategy, "answer": cfg.answer, "split": cfg.split,
           "limit": n, "seed": 0}
    command = f"python eval.py --task {folder.name} --strategy {folder.parent.name}"
    summary = records.summarise(task, problems, [], completions, correct, first, cfg, run,
                                60.0, 0.0, command, False) | extra
    folder.mkdir(parents=True)
    (folder / records.PARTIAL).touch()  # as during a run: the writer ends it
    records.write_results(folder, task, problems, completions, correct, first, summary)


def interval(tree: Path, folder: str) -> str:
    """The 95% interval saved in an evaluation's summary.json, as a table cell shows it."""
    lo, hi = json.loads((tree / "results" / "eval" / folder / "summary.json").read_text())["ci95"]
    return f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def write_safetensors(path: Path, shapes: dict[str, list[int]], meta: dict) -> None:
    """A float32 safetensors file written by hand: 8-byte little-endian header length, JSON header, zeros."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"meta": json.dumps(meta)}
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """GSM8K: base 10/40, SVF 16/40 on the same 40 ids (8 better, 2 worse); LoRA on other ids.
    ARC-Easy base only, with an answer distribution. One SVF training run of gsm8k, shipped files."""
    ev = tmp_path / "results" / "eval"
    ids = [f"q{i}" for i in range(40)]
    base = [i < 10 for i in range(40)]                    # q0..q9 right
    svf = [(i < 8) or (10 <= i < 18) for i in range(40)]  # loses q8, q9; gains q10..q17
    write_summary(ev / "base" / "gsm8k", base, ids)
    write_summary(ev / "expert-gsm8k" / "gsm8k", svf, ids)
    write_summary(ev / "adapter-gsm8k" / "gsm8k", base, [f"other{i}" for i in range(40)])
    write_summary(ev / "base" / "arc_easy", [True, False], ["a", "b"], answers=["C", "C"])
    run = tmp_path / "results" / "train" / "gsm8k-svf-mlp-seed0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"task": "gsm8k", "method": "svf", "objective": "reinforce",
                                                 "steps": 2, "lr": 0.002, "seed": 0,
                                                 "command": "python train.py --task gsm8k"}))
    (run / "log.jsonl").write_text(json.dumps({"step": 1, "reward": -0.5, "t_step": 100.0}) + "\n" +
                                   json.dumps({"step": 2, "reward": 0.0, "t_step": 140.0, "val_accuracy": 0.3,
                                               "t_val": 60.0}) + "\n")
    other = run.parent / "gsm8k-other-lr"  # same task and method, other settings: not the shipped expert's run
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"task": "gsm8k", "method": "svf", "lr": 0.01, "steps": 1,
                                                   "seed": 0, "command": "python train.py --lr 0.01"}))
    (other / "log.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5, "t_step": 7.0}) + "\n")
    write_summary(ev / "prompt" / "arc_challenge", [True, False, True, True], ["c1", "c2", "c3", "c4"],
                  routing_accuracy=0.75, first_pass_s=15.0, experts={"arc_easy": 3, "base": 1})
    fewshot = ev / "fewshot" / "arc_challenge"
    write_summary(fewshot, [True, True], ["c5", "c6"])
    (fewshot / "fewshot.json").write_text(json.dumps({
        "experts": ["gsm8k", "mbpp", "arc_easy"], "per_layer": False, "alpha": [0.1, 0.2, 0.7],
        "best": [0.8, -1.5], "shots": ["s1", "s2"], "population": 4,
        "history": [{"generation": g, "best": [0.5 + 0.1 * g, -1.5], "population_mean": [0.4, -2.0],
                     "seconds": 30.0} for g in (1, 2, 3)]}))
    write_safetensors(tmp_path / "experts" / "gsm8k.safetensors", {"a.z": [576], "b.z": [1536]},
                      {"task": "gsm8k", "method": "svf", "step": 2, "val_accuracy": 0.3, "trainable": 123456,
                       "config": {"task": "gsm8k", "method": "svf", "lr": 0.002}})
    write_safetensors(tmp_path / "adapters" / "gsm8k.safetensors", {"a.A": [16, 576], "a.B": [576, 16]},
                      {"task": "gsm8k", "method": "lora"})  # no "trainable": counted from the shapes
    return tmp_path


def make(tree: Path, plots: bool = False) -> str:
    """RESULTS.md of the tree; without plots unless asked (drawing takes a second a test)."""
    out = tree / "RESULTS.md"
    hide = contextlib.nullcontext() if plots else mock.patch.dict(sys.modules, {"matplotlib": None})
    with hide:  # a None in sys.modules makes `import matplotlib` raise ImportError
        results.main(results=str(tree / "results"), out=str(out), experts=str(tree / "experts"),
                     adapters=str(tree / "adapters"))
    return out.read_text()


def row(text: str, task: str) -> list[str]:
    """The cells of a table row (the first table that has the task)."""
    line = next(l for l in text.splitlines() if l.startswith(f"| {task} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_cells_show_counts_and_the_saved_interval(tree):
    text = make(tree)
    assert text.splitlines()[0].startswith("_Generated by `python results.py`")
    ten, sixteen = interval(tree, "base/gsm8k"), interval(tree, "expert-gsm8k/gsm8k")
    assert ten == "[14.2, 40.2]" and sixteen == "[26.3, 55.4]"  # Wilson, worked out by hand
    assert row(text, "GSM8K") == [f"25.0% (10/40) {ten}", f"25.0% (10/40) {ten}",
                                  f"40.0% (16/40) {sixteen}"]
    assert row(text, "ARC-Easy")[0] == f"50.0% (1/2) {interval(tree, 'base/arc_easy')}"
    assert "answers, base: C 2" in text


def test_missing_runs_show_not_run(tree):
    text = make(tree)
    assert row(text, "MBPP") == ["not run"] * 3
    assert row(text, "HumanEval") == ["not run"] * 5
    assert [c == "not run" for c in row(text, "ARC-Challenge")] == [True, True, False, True, False]
    assert row(text, "ARC-Easy")[1:] == ["not run"] * 2
    assert "%" not in "".join(row(text, "MATH"))
    empty = tree / "nothing"  # no results, experts or adapters at all
    empty.mkdir()
    assert "%" not in "".join(row(make(empty), "GSM8K"))


def test_mcnemar_matches_a_hand_computation(tree):
    hand = 2 * sum(math.comb(10, k) for k in range(3)) / 2 ** 10
    assert hand == 0.109375 and results.mcnemar_p(8, 2) == hand == results.mcnemar_p(2, 8)
    assert results.mcnemar_p(0, 0) == 1.0 and results.mcnemar_p(5, 5) == 1.0
    assert results.mcnemar_p(0, 10) == 2 / 2 ** 10
    text = make(tree)
    assert "SVF vs base: +15.0 points (8 better, 2 worse), McNemar p = 0.109, within noise" in text


def test_significant_difference_is_not_called_noise():
    assert results.mcnemar_p(20, 2) < 0.05  # 2 * (1 + 22 + 231) / 2^22
    assert results.mcnemar_p(20, 2) == 2 * (1 + 22 + 231) / 2 ** 22


def test_different_problem_sets_are_not_compared(tree):
    assert "LoRA vs base: different problem sets, not compared" in make(tree)


def test_a_scored_subset_is_compared_on_the_problems_both_scored(tree):
    # fewshot on a whole set scores it less its shots: base has c1..c4, fewshot c2..c4
    ev = tree / "results" / "eval"
    write_summary(ev / "base" / "humaneval", [False, False, False, True], ["c1", "c2", "c3", "c4"])
    write_summary(ev / "fewshot" / "humaneval", [True, True, False], ["c2", "c3", "c4"])
    text = make(tree)
    assert "fewshot vs base on the 3 problems both scored: +33.3 points (2 better, 1 worse), McNemar p = 1.000" in text


def test_evaluations_outside_the_tables_are_listed_against_base(tree):
    ev = tree / "results" / "eval"
    ids = [f"q{i}" for i in range(40)]
    write_summary(ev / "expert-gsm8k-sft" / "gsm8k", [i < 12 for i in range(40)], ids,
                  answers=["B"] * 30 + [None] * 10)
    rows = [json.loads(l) for l in (ev / "expert-gsm8k-sft" / "gsm8k" / "responses.jsonl").read_text().splitlines()]
    (ev / "expert-gsm8k-sft" / "gsm8k" / "responses.jsonl").write_text(  # gold B on 7 of the 40 problems
        "".join(json.dumps({**r, "gold": "B" if i < 7 else "C"}) + "\n" for i, r in enumerate(rows)))
    text = make(tree)
    line = next(l for l in text.splitlines() if l.startswith("- expert-gsm8k-sft on GSM8K:"))
    assert "expert-gsm8k-sft vs base: +5.0 points (2 better, 0 worse)" in line and "answers B 30, (none) 10 (answering B every time would score 7/40)" in line
    assert "- expert-gsm8k on GSM8K" not in text  # shown in Table 1 already


def test_likelihood_evaluations_are_compared_with_the_base_read_alike(tree):
    ev = tree / "results" / "eval"
    ids = [f"q{i}" for i in range(40)]
    write_summary(ev / "base-likelihood" / "gsm8k", [i < 20 for i in range(40)], ids)
    write_summary(ev / "expert-x-likelihood" / "gsm8k", [i < 26 for i in range(40)], ids)
    text = make(tree)
    line = next(l for l in text.splitlines() if l.startswith("- expert-x-likelihood on GSM8K:"))
    assert "expert-x-likelihood vs base: +15.0 points (6 better, 0 worse)" in line  # not the generative base's 12
    line = next(l for l in text.splitlines() if l.startswith("- base-likelihood on GSM8K:"))
    assert "vs base" not in line


def test_trainable_counts_from_metadata_or_shapes(tree):
    text = make(tree)
    assert "SVF: 123,456 trainable numbers" in text  # the metadata's count, not the shapes' 2,112
    assert "LoRA: 18,432 trainable numbers" in text  # 2 * 16 * 576 from the shapes
    assert results.safetensors_meta(tree / "adapters" / "gsm8k.safetensors")["trainable"] == 18432
    assert results.safetensors_meta(tree / "adapters" / "missing.safetensors") is None


def test_training_time_and_commands(tree):
    text = make(tree)
    assert "SVF training time: 5 min (gsm8k-svf-mlp-seed0: 2 steps logged)" in text  # 100 + 140 + 60 s
    assert "(gsm8k-other-lr" not in text  # the run whose settings the expert's metadata does not name
    assert "LoRA training time: no run of gsm8k" in text
    assert "`python train.py --task gsm8k`" in text
    assert "expert-gsm8k/gsm8k: n 40, seed 0: `python eval.py --task gsm8k --strategy expert-gsm8k`" in text


def test_plots_without_matplotlib(tree):
    text = make(tree, plots=False)
    assert results.NO_MATPLOTLIB in text
    assert not (tree / "results" / "plots").exists()


def test_plots_with_matplotlib(tree):
    pytest.importorskip("matplotlib")
    text = make(tree, plots=True)
    png = tree / "results" / "plots" / "train-gsm8k.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](results/plots/train-gsm8k.png)" in text


def test_first_pass_and_fewshot_tables(tree):
    text = make(tree)
    assert "| ARC-Challenge | prompt | 75.0% | arc_easy 3, base 1 | 15 s | 60 s | 25.0% |" in text
    assert "| ARC-Challenge | cls | not run |" in text
    assert "| ARC-Challenge | 3 | 4 | 30 s | 90 s | 80% on 2 shots | gsm8k 0.10, mbpp 0.20, arc_easy 0.70 |" in text
    assert "| MATH | not run |" in text
    assert "prompt vs base: base not run" in text


def test_cem_plot(tree):
    pytest.importorskip("matplotlib")
    text = make(tree, plots=True)
    assert (tree / "results" / "plots" / "cem-arc_challenge.png").read_bytes()[:4] == b"\x89PNG"
    assert "](results/plots/cem-arc_challenge.png)" in text


def test_multiple_choice_rows_read_by_likelihood(tree):
    """ARC read by likelihood is a row of its own, filled from the *-likelihood folders and compared
    with the base model read alike, not with the generative base."""
    ev, ids = tree / "results" / "eval", [f"c{i}" for i in range(20)]
    write_summary(ev / "base-likelihood" / "arc_challenge", [i < 5 for i in range(20)], ids)
    write_summary(ev / "prompt-likelihood" / "arc_challenge", [i < 8 for i in range(20)], ids,
                  routing_accuracy=0.5, first_pass_s=6.0, experts={"arc_easy": 10, "base": 10})
    fewshot = ev / "fewshot-likelihood" / "arc_challenge"
    write_summary(fewshot, [i < 4 for i in range(18)], ids[2:])
    (fewshot / "fewshot.json").write_text(json.dumps({
        "experts": ["gsm8k", "mbpp", "arc_easy"], "per_layer": False, "alpha": [0.0, 0.5, 1.0],
        "best": [0.6, -1.0], "shots": ["s1"], "population": 8,
        "history": [{"generation": 1, "best": [0.6, -1.0], "population_mean": [0.4, -2.0], "seconds": 12.0}]}))
    text = make(tree)
    row = next(l for l in text.splitlines() if l.startswith("| ARC-Challenge (by likelihood) | 25.0% (5/20)"))
    prompt, few = (interval(tree, f"{s}-likelihood/arc_challenge") for s in ("prompt", "fewshot"))
    assert f"| 40.0% (8/20) {prompt} | not run | 22.2% (4/18) {few} |" in row
    section = text.split("**ARC-Challenge (by likelihood)**")[1].split("**")[0]
    assert "prompt vs base: +15.0 points (3 better, 0 worse)" in section
    assert "fewshot vs base on the 18 problems both scored: +5.6 points (1 better, 0 worse)" in section
    assert "| ARC-Challenge (by likelihood) | prompt | 50.0% | arc_easy 10, base 10 | 6 s | 60 s | 10.0% |" in text
    assert "| ARC-Challenge (by likelihood) | 1 | 8 | 12 s | 12 s | 60% on 1 shots | gsm8k 0.00, mbpp 0.50, arc_easy 1.00 |" in text
    assert "- prompt-likelihood on" not in text and "- base-likelihood on ARC-Challenge" not in text  # in the table


def test_confusion_matrices_of_the_first_passes(tree):
    assert "Confusion matrices on the training tasks' validation questions: not run" in make(tree)
    folder = tree / "results" / "eval" / "routing"
    folder.mkdir(parents=True)
    rows = {"math": {"code": 0, "math": 3, "reasoning": 0, "other": 1}, "code": {"code": 4, "math": 0, "reasoning": 0, "other": 0}}
    folder.joinpath("summary.json").write_text(json.dumps({"n": 8, "command": "python eval.py --routing", **{
        s: {"correct": c, "accuracy": c / 8, "ci95": [0.3, 0.9], "confusion": rows, "seconds": 12.0}
        for s, c in (("prompt", 7), ("cls", 8))}}))
    text = make(tree)
    assert "prompt: 87.5% (7/8) [30.0, 90.0] labelled with their domain, in 12 s" in text
    assert "| true \\ read | code | math | reasoning | other |" in text
    assert "| math | 0 | 3 | 0 | 1 |" in text and "cls: 100.0% (8/8)" in text


def test_cells_made_before_a_fix_of_their_strategy_are_marked():
    import results
    old = {"strategy": "fewshot", "correct": 4, "n": 300, "ci95": [0.005, 0.034]}
    assert results.cell(old).endswith(" †")
    assert not results.cell({**old, "code_version": 2}).endswith("†")
    assert not results.cell({**old, "strategy": "base"}).endswith("†")   # the base model's cells did not change


def test_each_svf_expert_gets_a_picture_of_what_it_changed(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import results
    import svf
    import torch
    z = {f"layers.{i}.mlp.{k}": 1 + 0.01 * torch.randn(8) for i in range(3) for k in ("gate", "up", "down")}
    svf.Expert(z, {"base_model": "abc", "targets": "mlp"}).save(tmp_path / "experts" / "toy.safetensors")
    lora_like = {"layers.0.attention.q.A": torch.zeros(2, 4), "layers.0.attention.q.B": torch.zeros(4, 2)}
    svf.save_tensors(tmp_path / "experts" / "adapter.safetensors", lora_like, {})
    monkeypatch.setattr(svf, "CACHE_DIR", tmp_path / "cache")
    lines = results.plot_experts(tmp_path / "experts", tmp_path / "plots", tmp_path)
    assert (tmp_path / "plots" / "expert-toy-z.png").stat().st_size > 1000
    assert not (tmp_path / "plots" / "expert-adapter-z.png").exists()          # LoRA files are not SVF experts
    assert any("not in" in line for line in lines)                              # no SVD cache: spectra skipped, said
    from safetensors.torch import save_file
    (tmp_path / "cache").mkdir()
    save_file({f"{n}.s": torch.linspace(2, 0.1, 8) for n in z}, tmp_path / "cache" / "abc-mlp-float32.safetensors")
    results.plot_experts(tmp_path / "experts", tmp_path / "plots", tmp_path)
    assert (tmp_path / "plots" / "expert-toy-spectra.png").stat().st_size > 1000


def test_regenerating_keeps_the_hand_written_section_exactly(tree):
    first = make(tree)
    assert first.endswith("\n" + results.HAND_WRITTEN + "\n")  # nothing written by hand yet
    hand = ("# Analysis (written by hand)\n\nSVF: 46.8% → 57.0% †, p < 0.001  \n\n"
            "_Generated by `python results.py` from results/_ is only quoted here\n"
            "| task | base |\n|---|---|\n| GSM8K | not run |\n\n\n   indented, no newline at the end")
    out = tree / "RESULTS.md"
    out.write_text(first.replace("## Table 1", "## An old table 1") + hand, encoding="utf-8")
    ev, ids = tree / "results" / "eval", [f"q{i}" for i in range(40)]
    write_summary(ev / "base" / "mbpp", [i < 4 for i in range(40)], ids)  # a new run since
    text = make(tree)
    generated, hand_again = text.split("\n" + results.HAND_WRITTEN + "\n")
    assert hand_again == hand
    assert "An old table" not in generated and row(generated, "MBPP")[0].startswith("10.0% (4/40)")
    assert make(tree) == text  # and again
