"""svf.py: SVF composition, the decomposition cache, expert files, mixing."""

import pytest
import torch

import svf
from model import ModelArgs, Transformer
from tiny import tiny_model


def test_compose_with_ones_is_the_weight_and_count():
    model = tiny_model()
    svd = svf.decompose(model, "all", cache=False)
    for name, d in svd.items():
        w = svf.base_weight(model, name)
        assert torch.equal(svf.compose(w, d, torch.ones_like(d.s)), w)  # the delta form: exactly W
        z = 1 + 0.3 * torch.randn_like(d.s)
        torch.testing.assert_close(svf.compose(w, d, z), (d.U * (d.s * z)) @ d.Vh, atol=1e-12, rtol=0)
    # per layer: q 32x32, k 16x32, v 16x32, o 32x32 -> 32+16+16+32; gate, up 48x32 and down 32x48 -> 3*32
    assert svf.count_params(svd) == 2 * (32 + 16 + 16 + 32 + 3 * 32)


def test_targets_never_touch_embeddings_head_or_norms():
    model = tiny_model()
    names = svf.target_names(model, "all")
    assert all(".attention." in n or ".mlp." in n for n in names)
    with pytest.raises(ValueError, match="unknown targets 'ffn'"):
        svf.target_names(model, "ffn")


def test_decomposition_cache_roundtrip(tmp_path):
    model = tiny_model(torch.float32)
    first = svf.decompose(model, "mlp", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    second = svf.decompose(model, "mlp", cache_dir=tmp_path)
    for n in first:
        assert torch.equal(first[n].U, second[n].U) and torch.equal(first[n].s, second[n].s)


def test_use_expert_matches_training_composition_and_base():
    model = tiny_model()
    tokens = torch.randint(0, 64, (2, 7))
    base = model(tokens)
    svf.attach(model, svf.decompose(model, "all", cache=False))
    svf.use_expert(model, svf.ones(model))
    torch.testing.assert_close(model(tokens), base, atol=1e-10, rtol=0)
    z = {n: 1 + 0.3 * torch.randn_like(v) for n, v in svf.ones(model).items()}
    svf.use_expert(model, z, cache=True)
    merged = model(tokens)
    svf.train_z(model, z)
    torch.testing.assert_close(model(tokens), merged)
    svf.use_expert(model, None)
    torch.testing.assert_close(model(tokens), base)
    assert (merged - base).abs().max() > 1e-3  # the expert really changes the model


def test_z_one_is_the_base_model_bit_for_bit_answering_and_training():
    """W' = W + U diag(s (z - 1)) V^T: at z = 1 the change is exactly 0 (U diag(s z) V^T recomposed
    W only to float32 rounding, so step 0's "expert" was not the base model and near-ties flipped)."""
    model = tiny_model(torch.float32)
    tokens = torch.randint(0, 64, (2, 9))
    base = model(tokens)
    svf.attach(model, svf.decompose(model, "all", cache=False))
    svf.use_expert(model, svf.ones(model))
    assert torch.equal(model(tokens), base)
    z = {n: torch.nn.Parameter(v) for n, v in svf.ones(model).items()}
    svf.train_z(model, z)
    with torch.enable_grad():
        out = model(tokens)
        out.square().sum().backward()
    svf.train_z(model, None)
    assert torch.equal(out.detach(), base)
    assert all(v.grad is not None and v.grad.abs().max() > 0 for v in z.values())  # and z still learns


def test_bfloat16_keeps_a_small_change_of_z():
    """With z = 1 + 1e-3 randn, most elements of a bfloat16 W' = round(W + delta) are W again, so a
    bfloat16 model answered as the base model while the gradients assumed it did not. The adapted
    layer's change of output must be what float32 arithmetic says (up to rounding its output once)."""
    torch.manual_seed(0)
    args = ModelArgs(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=512, max_seq_len=64)
    model = Transformer(args).to(torch.bfloat16).eval().requires_grad_(False)
    svf.attach(model, svf.decompose(model, "mlp", cache=False))
    layer = model.layers[0].mlp.up
    x = torch.randn(64, 256).to(torch.bfloat16)
    base = layer(x).float()
    z = {n: 1 + 1e-3 * torch.randn_like(v) for n, v in svf.ones(model).items()}
    want = x.float() @ svf.delta(layer.svd, z["layers.0.mlp.up"]).T                  # (64, 512), float32
    for use in (lambda: svf.use_expert(model, z), lambda: svf.train_z(model, z)):
        use()
        got = layer(x).float() - base
        slope = (got * want).sum() / (want * want).sum()     # 1 when the change survives, 0 when rounded away
        assert 0.9 < slope < 1.1, slope.item()
        assert (got - want).abs().max() <= base.abs().max() * 2 ** -7   # within one rounding of the output
    svf.use_expert(model, None)


def test_the_svd_cache_keeps_dtypes_apart(tmp_path):
    """The fingerprint rounds to bfloat16, so a float32 and a bfloat16 load of one checkpoint share it;
    their factors must not be shared (whichever ran first used to define U, s, V for both)."""
    f32 = tiny_model(torch.float32)
    b16 = tiny_model(torch.float32).to(torch.bfloat16)
    assert svf.fingerprint(f32) == svf.fingerprint(b16)
    svf.decompose(f32, "mlp", cache_dir=tmp_path)
    cached = svf.decompose(b16, "mlp", cache_dir=tmp_path)
    fresh = svf.decompose(b16, "mlp", cache=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    for n in fresh:
        assert torch.equal(cached[n].s, fresh[n].s)
    assert any(not torch.equal(cached[n].s, svf.decompose(f32, "mlp", cache=False)[n].s) for n in fresh)


def test_mix_of_one_expert_and_identical_experts():
    model = tiny_model()
    svf.attach(model, svf.decompose(model, "mlp", cache=False))
    a = {n: torch.rand_like(v) for n, v in svf.ones(model).items()}
    b = {n: torch.rand_like(v) for n, v in svf.ones(model).items()}
    for n, v in svf.mix([a, b], torch.tensor([1.0, 0.0], dtype=torch.float64)).items():
        assert torch.equal(v, a[n])
    for n, v in svf.mix([a, a, a], torch.full((3,), 1 / 3, dtype=torch.float64)).items():
        torch.testing.assert_close(v, a[n])
    per_matrix = torch.zeros(2, len(a), dtype=torch.float64)
    per_matrix[0, ::2], per_matrix[1, 1::2] = 1.0, 1.0  # even matrices from a, odd from b
    mixed = svf.mix([a, b], per_matrix)
    for j, n in enumerate(a):
        assert torch.equal(mixed[n], (a if j % 2 == 0 else b)[n])
    with pytest.raises(ValueError, match="alphas of shape"):
        svf.mix([a, b], torch.ones(3))


def test_a_mixture_of_experts_at_z_one_is_the_base_model_for_every_alpha():
    """z' = sum_k alpha_k z_k gave (sum_k alpha_k) * W when every expert is z = 1: most CEM candidates
    were the base model rescaled. Mixing the changes, z' = 1 + sum_k alpha_k (z_k - 1), keeps the scale."""
    model = tiny_model(torch.float32)
    tokens = torch.randint(0, 64, (2, 7))
    base = model(tokens)
    svf.attach(model, svf.decompose(model, "mlp", cache=False))
    ones = [svf.ones(model) for _ in range(3)]
    g = torch.Generator().manual_seed(0)
    for alpha in (torch.rand(3, generator=g), torch.rand(3, generator=g), torch.ones(3), torch.zeros(3)):
        mixed = svf.mix(ones, alpha)
        assert all(torch.equal(v, torch.ones_like(v)) for v in mixed.values())
        svf.use_expert(model, mixed)
        assert torch.equal(model(tokens), base)
    a = {n: 1 + 0.2 * torch.randn_like(v) for n, v in svf.ones(model).items()}
    half = svf.mix([a, ones[0]], torch.tensor([0.5, 0.9]))  # half of a's change, none of the base "expert"'s
    assert all(torch.allclose(half[n], 1 + 0.5 * (a[n] - 1)) for n in a)
    svf.use_expert(model, None)


def test_expert_file_reloads_bit_exactly_and_refuses_other_models(tmp_path):
    model = tiny_model(torch.float32)
    svf.attach(model, svf.decompose(model, "mlp", cache=False))
    z = {n: torch.rand_like(v) for n, v in svf.ones(model).items()}
    meta = {"base_model": svf.model_fingerprint(model), "targets": "mlp", "task": "gsm8k"}
    svf.Expert(z, meta).save(tmp_path / "e.safetensors")
    back = svf.Expert.load(tmp_path / "e.safetensors", model)
    assert back.meta == meta and all(torch.equal(back.z[n], z[n]) for n in z)
    assert (tmp_path / "e.safetensors").stat().st_size < 10_000  # only z and metadata, no base weights
    other = tiny_model(torch.float32, seed=1)
    svf.attach(other, svf.decompose(other, "mlp", cache=False))
    with pytest.raises(ValueError, match="trained on base model"):
        svf.Expert.load(tmp_path / "e.safetensors", other)
    attn = tiny_model(torch.float32)
    svf.attach(attn, svf.decompose(attn, "attn", cache=False))
    with pytest.raises(ValueError, match="other --targets"):
        svf.Expert.load(tmp_path / "e.safetensors", attn)


@pytest.mark.real
def test_real_model_z_one_equals_base(real):
    model, tok = real
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "What is 12 times 7?"}])])
    with torch.no_grad():
        base = model(ids)
        svf.attach(model, svf.decompose(model, "all"))
        svf.use_expert(model, svf.ones(model))
        adapted = model(ids)
        svf.use_expert(model, None)
    assert torch.equal(adapted, base)  # z = 1 is the base model bit for bit, not a recomposition of it




