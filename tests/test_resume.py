"""resume.py: a run interrupted by Ctrl-C and resumed is the run that never stopped."""
import json

import pytest
import torch

import lora
import svf
from tiny import run_toy

TIMING = ("rollout_tok_s", "t_rollout", "t_score", "t_backward", "t_step", "t_val")


@pytest.mark.parametrize("method,objective", [("svf", "reinforce"), ("lora", "sft"), ("lora", "reinforce")])
def test_resumed_run_equals_uninterrupted_run(method, objective, tmp_path, monkeypatch):
    monkeypatch.setattr(svf, "CACHE_DIR", tmp_path / "svd")
    kw = dict(method=method, objective=objective, lora_rank=2, lora_dropout=0.1)  # dropout: its masks must resume too
    straight = run_toy(tmp_path / "a", steps=5, **kw)
    with pytest.raises(SystemExit):
        run_toy(tmp_path / "b", steps=5, interrupt_at=2, monkeypatch=monkeypatch, **kw)
    monkeypatch.undo()
    monkeypatch.setattr(svf, "CACHE_DIR", tmp_path / "svd")
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]  # the base model's validation, then stopped after finishing step 2
    resumed = run_toy(tmp_path / "b", steps=5, resume=True, **kw)
    strip = lambda recs: [{k: v for k, v in r.items() if k not in TIMING} for r in recs]
    assert strip(resumed) == strip(straight)
    assert any(r.get("grad_norm", 0) > 0 for r in straight)  # it really trained
    File = svf.Expert if method == "svf" else lora.Adapter
    a, b = File.load(tmp_path / "a" / "last.safetensors"), File.load(tmp_path / "b" / "last.safetensors")
    tensors = (lambda f: f.z) if method == "svf" else (lambda f: f.params)
    assert all(torch.equal(tensors(a)[n], tensors(b)[n]) for n in tensors(a))
    moved = [(v - 1).abs().max() for v in a.z.values()] if method == "svf" else \
        [v.abs().max() for n, v in a.params.items() if n.endswith(".B")]  # z starts at 1, B at 0
    assert max(moved) > 1e-4
    if objective == "reinforce":  # the log's distance from the base model is the method's own
        assert straight[-1]["z_dev"] == pytest.approx(max(moved).item(), rel=1e-6)


def test_resume_refuses_other_settings_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(svf, "CACHE_DIR", tmp_path / "svd")
    run_toy(tmp_path / "run", steps=2)
    with pytest.raises(ValueError, match=r"--lr 0.05 -> 0.01; --kl-coef 0.1 -> 0.2"):
        run_toy(tmp_path / "run", steps=3, resume=True, lr=0.01, kl_coef=0.2)
    with pytest.raises(ValueError, match=r"--temperature 1.0 -> 0.7"):
        run_toy(tmp_path / "run", steps=3, resume=True, temperature=0.7)
    records = run_toy(tmp_path / "run", steps=3, resume=True, micro_tokens=64)   # more steps, another split: fine
    assert [r["step"] for r in records] == [0, 1, 2, 3]


def test_a_resumed_dynamic_sampling_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    monkeypatch.setattr(svf, "CACHE_DIR", tmp_path / "svd")
    kw = dict(samples=4, baseline="loo", dynamic_draws=8)
    straight = run_toy(tmp_path / "a", steps=4, **kw)
    with pytest.raises(SystemExit):
        run_toy(tmp_path / "b", steps=4, interrupt_at=2, monkeypatch=monkeypatch, **kw)
    monkeypatch.undo()
    monkeypatch.setattr(svf, "CACHE_DIR", tmp_path / "svd")
    resumed = run_toy(tmp_path / "b", steps=4, resume=True, **kw)
    strip = lambda recs: [{k: v for k, v in r.items() if k not in TIMING} for r in recs]
    assert strip(resumed) == strip(straight)
