"""records.py: what an evaluation writes, an interrupted one resumed from it, the interval."""
import json

import pytest

import adapt
import config
import data
import eval as evaluation
import records
from data import cls
from tiny import CharTokenizer, ScoredEchoTask, random_expert, tiny_wrapped_model, toy_problems


def test_wilson_interval_matches_published_values():
    """The Wilson score intervals of Newcombe (1998), Statistics in Medicine 17, Table II,
    method 3, for his four examples, to the 4 decimals printed there."""
    cases = {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611),
             (1, 29): (0.0061, 0.1718)}
    for (k, n), (lo, hi) in cases.items():
        got = records.wilson(k, n)
        assert abs(got[0] - lo) < 5e-5 and abs(got[1] - hi) < 5e-5, (k, n, got)
    assert records.wilson(0, 0) == (0.0, 0.0)


def evaluate(model, tokenizer, task_name, loaded, command, out_dir, resume=False, **settings):
    """eval.evaluate_task with the settings of an EvalConfig."""
    cfg = config.EvalConfig(**settings, out=str(out_dir), resume=resume)
    return evaluation.evaluate_task(model, tokenizer, task_name, loaded, cfg, command)


def test_an_interrupted_evaluation_resumes_where_it_stopped(tmp_path, monkeypatch):
    import engine  # generate_all calls generate through engine
    model, tok = tiny_wrapped_model(), CharTokenizer()
    monkeypatch.setitem(data.TASKS, "echo", ScoredEchoTask())
    monkeypatch.setattr(data, "load", lambda name, split: toy_problems(7))
    kw = dict(model=model, tokenizer=tok, task_name="echo", strategy="base", loaded={}, split="test", limit=0,
              seed=0, batch_size=2, max_new_tokens=0, workers=1, command="test", shots=10, generations=1,
              population=2, per_layer=False, classify="likelihood")
    straight = evaluate(**kw, out_dir=tmp_path / "a")
    real_generate, calls = engine.generate, []

    def generate_then_interrupt(*args, stop_after=None, **kwargs):  # Ctrl-C during the third batch
        calls.append(len(args[2]))
        if stop_after is not None and len(calls) > stop_after:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)
    monkeypatch.setattr(engine, "generate", lambda *a, **k: generate_then_interrupt(*a, stop_after=2, **k))
    with pytest.raises(KeyboardInterrupt):
        evaluate(**kw, out_dir=tmp_path / "b")
    partial = tmp_path / "b" / "base" / "echo" / records.PARTIAL
    with open(partial, "a") as f:
        f.write('{"answer": {"id": "toy/6", "exp')  # a line cut short as the process died
    with pytest.raises(SystemExit, match="other settings \\(limit\\)"):
        evaluate(**{**kw, "limit": 5}, out_dir=tmp_path / "b", resume=True)
    calls.clear()
    monkeypatch.setattr(engine, "generate", generate_then_interrupt)
    resumed = evaluate(**kw, out_dir=tmp_path / "b", resume=True)
    assert sum(calls) == 3  # only the 3 problems the interrupted run had not answered
    assert not partial.exists() and resumed["resumed"] and not straight["resumed"]
    read = lambda d: [json.loads(l) for l in (d / "base" / "echo" / "responses.jsonl").read_text().splitlines()]
    assert read(tmp_path / "b") == read(tmp_path / "a")
    assert {k: resumed[k] for k in ("n", "correct", "generated_tokens")} == \
        {k: straight[k] for k in ("n", "correct", "generated_tokens")}
    calls.clear()  # once finished, --resume skips the task
    assert evaluate(**kw, out_dir=tmp_path / "b", resume=True) == resumed and not calls


def test_a_fewshot_evaluation_interrupted_in_its_search_resumes_it(tmp_path, monkeypatch):
    model, tok = tiny_wrapped_model(), CharTokenizer()
    monkeypatch.setitem(data.TASKS, "echo", ScoredEchoTask())
    monkeypatch.setitem(data.SPLITS, "echo", {"test": 7})
    monkeypatch.setattr(data, "load", lambda name, split: toy_problems(7))
    loaded = {n: random_expert(model, i) for i, n in enumerate(cls.DOMAIN_EXPERTS)}
    kw = dict(model=model, tokenizer=tok, task_name="echo", strategy="fewshot", loaded=loaded, split="test",
              limit=0, seed=0, batch_size=4, max_new_tokens=0, workers=1, command="test", shots=2, generations=3,
              population=2, per_layer=False, classify="likelihood")
    straight = evaluate(**kw, out_dir=tmp_path / "a")
    real_generate, calls, interrupted = adapt.generate, [], []

    def generate_then_interrupt(*args, **kwargs):  # the search's 4th candidate (generation 2), once
        calls.append(1)
        if len(calls) == 4 and not interrupted:
            interrupted.append(1)
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)
    monkeypatch.setattr(adapt, "generate", generate_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        evaluate(**kw, out_dir=tmp_path / "b")
    calls.clear()
    resumed = evaluate(**kw, out_dir=tmp_path / "b", resume=True)
    assert len(calls) == 3 + 3  # generations 2 and 3 only (2 samples and the previous best each)
    report = lambda d: json.loads((d / "fewshot" / "echo" / "fewshot.json").read_text())
    strip = lambda r: {**r, "history": [{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]]}
    assert strip(report(tmp_path / "b")) == strip(report(tmp_path / "a"))
    read = lambda d: (d / "fewshot" / "echo" / "responses.jsonl").read_text()
    assert read(tmp_path / "b") == read(tmp_path / "a") and resumed["resumed"] and not straight["resumed"]
