"""eval.py: bad requests refused before loading, shots kept out of the scored problems, the
routing matrices, resumable evaluations, several strategies compared on the same problems."""
import json
from dataclasses import replace

import pytest

import adapt
import config
import data
import eval as evaluation
import svf
from data import cls
from tiny import (CharTokenizer, ScoredEchoTask, random_expert, tiny_wrapped_model, toy_problems)


def test_eval_refuses_bad_requests_before_loading_anything():
    kw = dict(task="arc_easy", strategy="base", split="test", limit=4, seed=0, batch_size=4, max_new_tokens=0,
              workers=1, model="no/such/model", device="cpu", dtype="float32", threads=0, out="unused", shots=10,
              generations=1, population=2, per_layer=False, classify="likelihood", experts_dir="experts",
              adapter=None)
    with pytest.raises(SystemExit, match="--answer likelihood needs multiple-choice tasks"):
        evaluation.main(config.EvalConfig(**{**kw, "task": "arc_easy,gsm8k"}, answer="likelihood"))
    with pytest.raises(SystemExit, match="unknown task 'arc'"):
        evaluation.main(config.EvalConfig(**{**kw, "task": "arc"}))
    with pytest.raises(SystemExit, match="unknown strategy"):
        evaluation.main(config.EvalConfig(**{**kw, "strategy": "best"}))


# ----------------------------------------------------------------------------- few-shot
@pytest.mark.parametrize("task_name, source", [("humaneval", "test"), ("math", "test"), ("arc_challenge", "train"),
                                               ("gsm8k", "train")])
def test_shots_never_appear_among_the_scored_problems(task_name, source):
    problems = data.load(task_name, "test")
    shots, scored = adapt.pick_shots(task_name, "test", problems, 10, seed=0)
    assert len(shots) == 10 and len({s["id"] for s in shots}) == 10
    assert {s["id"] for s in shots} <= {p["id"] for p in data.load(task_name, source)}
    shot_questions = {cls.normalise(s["question"]) for s in shots}
    assert not {s["id"] for s in shots} & {p["id"] for p in scored}
    assert not shot_questions & {cls.normalise(p["question"]) for p in scored}
    if source == "test":
        assert len(scored) == len(problems) - 10
    assert adapt.pick_shots(task_name, "test", problems, 10, seed=0)[0] == shots  # seeded
    # with a --limit subset, eval.py draws same-split shots from the problems left out of it, so the
    # scored set is exactly the subset the other strategies score
    subset = evaluation.subset(problems, 50, 0)
    spare = [p for p in problems if p["id"] not in {q["id"] for q in subset}]
    shots, scored = adapt.pick_shots(task_name, "test", subset, 10, seed=0, spare=spare)
    assert not {s["id"] for s in shots} & {p["id"] for p in scored}
    assert not {cls.normalise(s["question"]) for s in shots} & {cls.normalise(p["question"]) for p in scored}
    assert {s["id"] for s in shots} <= {p["id"] for p in (spare if source == "test" else data.load(task_name, source))}
    assert len(scored) >= 48  # only a duplicate question text may leave the subset


def test_routing_confusion_matrices_count_each_question_once(tmp_path, monkeypatch):
    """eval.py --routing: per reader, rows are the true domains, columns the labels classify() reads."""
    model, tok = tiny_wrapped_model(), CharTokenizer()
    labels = ["math", "code", "reasoning"]
    toy = [{"id": f"cls/{i}", "question": f"question {i} " + "xyz"[i % 3] * (i % 5), "answer": labels[i % 3]}
           for i in range(12)]
    monkeypatch.setattr(cls, "cls_problems", lambda split: toy)
    z = {n: 1 + 3 * (v - 1) for n, v in random_expert(model, 0).items()}  # one that reads "code" here
    summary = evaluation.routing(model, tok, z, 0, 0, 4, tmp_path, "python eval.py --routing")
    questions = [p["question"] for p in toy]
    for strategy, read in (("prompt", adapt.classify(model, tok, questions)),
                           ("cls", adapt.classify(model, tok, questions, z=z))):
        got = summary[strategy]
        for t in labels:
            assert got["confusion"][t] == {label: sum(r == label and p["answer"] == t for r, p in zip(read, toy))
                                           for label in cls.LABELS}
        assert got["correct"] == sum(r == p["answer"] for r, p in zip(read, toy))
    assert summary["prompt"]["confusion"] != summary["cls"]["confusion"]  # the expert reads differently
    assert (tmp_path / "routing" / "summary.json").exists()


def test_several_strategies_are_compared_on_the_same_problems(tmp_path, monkeypatch, capsys):
    """eval.py --strategy base,expert:E evaluates both on the same problems and prints the paired
    difference, with the exact McNemar p worked here from the two responses.jsonl files."""
    import math
    class ParityTask(ScoredEchoTask):  # right when the reply opens with ")" on even ids only
        def score(self, problem, response):
            return (response[:1] == ")") == (int(problem["id"].split("/")[-1]) % 2 == 0)

    model, tok = tiny_wrapped_model(), CharTokenizer()
    monkeypatch.setitem(data.TASKS, "echo", ParityTask())
    monkeypatch.setitem(data.SPLITS, "echo", {"test": 12})
    monkeypatch.setattr(data, "load", lambda name, split: toy_problems(12))
    monkeypatch.setattr(evaluation, "load", lambda *a, **k: (model, tok))
    path = tmp_path / "e.safetensors"
    svf.Expert(random_expert(model, 1), {"targets": "mlp", "base_model": svf.model_fingerprint(model)}
               ).save(path)
    cfg = config.EvalConfig(task="echo", strategy=f"base,expert:{path}", batch_size=4,
                                workers=1, out=str(tmp_path / "out"))
    reads, real_read = [], svf.read_tensors
    monkeypatch.setattr(svf, "read_tensors", lambda p, *a, **k: reads.append(str(p))
                        or real_read(p, *a, **k))
    base, expert = evaluation.main(cfg)
    assert reads == [str(path)]  # each expert file is read once
    assert base["strategy"] == "base" and expert["strategy"] == f"expert:{path}" and base["n"] == 12
    read = lambda s: {json.loads(l)["id"]: json.loads(l)["correct"] for l in
                      (evaluation.task_folder(replace(cfg, strategy=s), "echo") / "responses.jsonl")
                      .read_text().splitlines()}
    a, b = read("base"), read(f"expert:{path}")
    assert set(a) == set(b) and len(a) == 12
    better = sum(b[i] and not a[i] for i in a)
    worse = sum(a[i] and not b[i] for i in a)
    n = better + worse
    p = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(better, worse) + 1)) / 2 ** n)
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("echo: ")][-1]
    assert n > 0  # the expert changes some verdicts: a difference to test
    assert f"({better} better, {worse} worse)" in line
    assert f"{100 * (better - worse) / 12:+.1f} points" in line
    assert (f"p = {p:.3f}" if p >= 0.001 else "p < 0.001") in line
