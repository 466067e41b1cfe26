"""bench.py --section scale end to end at a tiny shape on the CPU (issue 20), so that the GPU run at
Llama-3-8B's shape is one command that cannot fail on a typo. In float32 our greedy tokens and prefill
logits must equal transformers' on the same weights (the section's own comparison)."""
import json
from dataclasses import replace

import pytest
import torch

import bench
import data
from model import ModelArgs

# Llama-3-8B's proportions in small: grouped-query attention 4:1, FFN 3.5 x dim, Llama 3.1 rope scaling
TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=512, hidden_dim=224, norm_eps=1e-5,
                 rope_theta=500000.0, rope_scaling=bench.LLAMA31_ROPE, max_seq_len=2048)
SIZES = bench.ScaleSizes(decode_batches=(1, 3), decode_tokens=6, prompt_len=8, prefill_rows=2, prefill_len=32,
                         pass_questions=2, pass_batch=2, second_pass_tokens=4, svd_matrices=2, train_prompts=2,
                         train_samples=2, train_tokens=6, compile_backend="eager", compile_batches=(1, 2),
                         compile_steps=3, budget_s=600)


def test_the_llama3_8b_shape_is_the_papers_model():
    a = bench.LLAMA3_8B
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.hidden_dim, a.vocab_size, a.head_dim) == \
        (4096, 32, 32, 8, 14336, 128256, 128)
    assert a.rope_theta == 500000.0 and a.rope_scaling["rope_type"] == "llama3" and a.rope_scaling["factor"] == 8.0
    with torch.device("meta"):
        n = sum(p.numel() for p in bench.Transformer(a).parameters())
    assert 8.0e9 < n < 8.1e9  # Llama-3-8B: 8.03 billion parameters
    s = bench.SCALE
    assert s.decode_batches == (1, 64, 256) and s.decode_tokens == 256
    assert (s.prefill_rows, s.prefill_len) == (8, 1024)
    assert s.train_prompts * s.train_samples == 64 and s.train_tokens == 256


def test_synthetic_tokenizer_gives_stable_ids_and_keeps_a_shared_prefix():
    tok = bench.SyntheticTokenizer(512)
    a = tok.encode_chat([{"role": "system", "content": "x" * 40}, {"role": "user", "content": "question one"}])
    b = tok.encode_chat([{"role": "system", "content": "x" * 40}, {"role": "user", "content": "another"}])
    assert a[:10] == b[:10] and a != b and all(0 < i < 512 for i in a + b)
    assert tok.encode("abcdefgh") == tok.encode("abcdefgh") and len(tok.encode("a" * 401)) == 101


def test_scale_section_runs_end_to_end_at_a_tiny_shape(tmp_path):
    rep, figures, path = bench.Report(), {}, tmp_path / "bench-scale.json"
    saves = []

    def save():
        saves.append(1)
        path.write_text(json.dumps({"rows": rep.rows, "figures": figures}, default=float))

    bench.bench_scale(rep, figures, TINY, SIZES, device="cpu", dtype=torch.float32, seed=0, save=save)
    parts = ("build", "decode", "prefill", "passes", "svd", "floor", "svf_step", "compile")
    assert [p for p in parts if "error" in figures[p] or "not_run" in figures[p]] == [], figures
    assert "note" not in figures["compile"], figures["compile"]
    assert len(saves) == len(parts) and json.loads(path.read_text())["figures"]["svf_step"]["tokens"] > 0

    b = figures["build"]
    assert b["parameters"] == sum(p.numel() for p in bench.Transformer(TINY).parameters())
    assert b["rope_inv_freq_max_rel_diff"] < 1e-6                # transformers read the same Llama 3.1 scaling
    for B in SIZES.decode_batches:                                # float32: ours is transformers, token for token
        d = figures["decode"][f"batch{B}"]
        assert d["same_prefix_share"] == 1.0 and d["rows_equal"] == 1.0
        assert d["tok_s"]["ours"] > 0 and d["tok_s"]["transformers"] > 0
    p = figures["prefill"]
    assert p["logits_max_abs_diff"] < 1e-4 * max(1.0, p["logits_max_abs"]) and p["argmax_equal"] == 1.0

    for name in data.UNSEEN:
        f = figures["passes"][name]
        assert f["questions"] == 2 and f["second_pass_tokens"] == 2 * SIZES.second_pass_tokens
        assert f["first_pass_s"] > 0 and f["second_pass_s"] > 0 and f["shared_tokens"] > 20

    s = figures["svd"]                                            # U (m, r), s (r), V^T (r, n), r = min(m, n)
    m, n = TINY.hidden_dim, TINY.dim
    per_layer = 2 * (m * n + n + n * n) + (n * n + n + n * m)      # gate, up: (224, 64); down: (64, 224)
    assert s["factors_float32_GB"] * bench.GB == pytest.approx(TINY.n_layers * per_layer * 4)
    assert s["factors_bfloat16_GB"] == pytest.approx(s["factors_float32_GB"] / 2)
    assert s["decomposed"] == 3                                   # 2 asked, and down's shape sampled too
    assert s["relative_error_float32_factors"] < 1e-5
    assert s["relative_error_float32_factors"] < s["relative_error_bfloat16_factors"] < 0.05

    fl, st = figures["floor"], figures["svf_step"]
    rollouts = SIZES.train_prompts * SIZES.train_samples
    assert fl["rollouts"] == rollouts and fl["tokens"] == st["tokens"] == rollouts * SIZES.train_tokens
    assert st["grad_norm"] > 0 and st["kl"] != 0 and not st["skipped"]  # an update, with the exact KL computed
    assert all(isinstance(v, float) for v in (st["t_rollout"], st["t_backward"], fl["t_forward_backward"]))

    for B in SIZES.compile_batches:
        c = figures["compile"][f"batch{B}"]
        assert c["eager_step_s"] > 0 and c["compiled_step_s"] > 0
    assert len(list(bench.Transformer(TINY).layers)) == TINY.n_layers
    assert {r["section"] for r in rep.rows} == {"scale"}


def test_a_failing_part_is_recorded_and_the_others_still_run(monkeypatch):
    def broken(rep, sc):
        raise RuntimeError("out of memory, say")
    monkeypatch.setattr(bench, "scale_prefill", broken)
    tiny = replace(SIZES, decode_batches=(1,), compile_backend="", pass_questions=1)
    figures = {}
    bench.bench_scale(bench.Report(), figures, TINY, tiny, device="cpu", dtype=torch.float32)
    assert figures["prefill"]["error"] == "RuntimeError: out of memory, say"
    assert "tok_s" in figures["decode"]["batch1"] and "t_step" in figures["svf_step"]
    assert figures["compile"]["not_run"]


def test_scale_section_refuses_to_run_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(section="scale", threads=2, quick=False, agree_prompts=None, json_out=None, seed=0)


def test_the_command_line_runs_the_section_and_writes_its_json_to_out(monkeypatch, tmp_path):
    """bench.main's dispatch as the GPU session runs it (`OUT` set, no --json), with the GPU faked and the
    section at the tiny shape: the JSON lands in $OUT/bench-scale.json, complete."""
    real = bench.bench_scale
    tiny = replace(SIZES, decode_batches=(2,), compile_backend="", pass_questions=1)
    monkeypatch.setattr(bench, "bench_scale", lambda rep, figures, seed, save: real(
        rep, figures, TINY, tiny, device="cpu", dtype=torch.float32, seed=seed, save=save))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a fake GPU")
    monkeypatch.setenv("OUT", str(tmp_path))
    bench.main(section="scale", threads=2, quick=False, agree_prompts=None, json_out=None, seed=0)
    doc = json.loads((tmp_path / "bench-scale.json").read_text())
    assert doc["machine"]["gpu"] == "a fake GPU" and "partial" not in doc
    scale = doc["figures"]["scale"]
    assert scale["decode"]["batch2"]["same_prefix_share"] == 1.0 and scale["svf_step"]["tokens"] > 0
    assert {r["section"] for r in doc["rows"]} == {"scale"}
