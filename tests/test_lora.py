"""lora.py: the LoRA baseline's wrapper, merge, gradients, dropout, adapter files."""
import copy
from dataclasses import asdict

import pytest
import torch

import lora
import svf
from model import Transformer
from tiny import tiny_model

def tokens(seed=0):
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


def attached(targets: str, rank: int = 4) -> Transformer:
    model = tiny_model(torch.float32)
    lora.attach(model, lora.LoRAConfig(rank=rank, targets=targets))
    return model


def random_params(model, seed=1, dtype=torch.float64):
    """Non-zero A and B (a trained adapter, not a fresh one), big enough to move the logits."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.3 * torch.randn(v.shape, generator=g, dtype=dtype) for k, v in lora.init_params(model).items()}


def test_fresh_adapter_is_the_base_model():
    model = tiny_model(torch.float32)
    x = tokens()
    base = model(x)
    fp = svf.fingerprint(model)
    lora.attach(model, lora.LoRAConfig(rank=4, targets="all"))
    params = lora.init_params(model, seed=0)
    a = params["layers.0.attention.q.A"]
    assert a.dtype == torch.float32 and a.abs().max() > 0 and a.abs().max() <= 32 ** -0.5  # U(-1/sqrt(in), ..)
    assert all(torch.equal(v, lora.init_params(model, seed=0)[k]) for k, v in params.items())
    assert not torch.equal(a, lora.init_params(model, seed=1)["layers.0.attention.q.A"])
    lora.train_ab(model, {k: torch.nn.Parameter(v) for k, v in params.items()})
    assert torch.equal(model(x), base)
    assert svf.fingerprint(model) == fp  # A and B never become the model's own parameters
    lora.use_adapter(model, params)
    assert torch.equal(model(x), base)
    lora.use_adapter(model, None)
    assert torch.equal(model(x), base)


def test_merged_and_unmerged_match_a_hand_merged_model():
    model = tiny_model()
    x = tokens()
    cfg = lora.LoRAConfig(rank=4, alpha=8.0, targets="qv")
    by_hand = copy.deepcopy(model)
    lora.attach(model, cfg)
    params = random_params(model)
    for i, layer in enumerate(by_hand.layers):  # W' = W + (alpha / r) B A, written out independently
        for m, name in ((layer.attention.q, "q"), (layer.attention.v, "v")):
            B, A = params[f"layers.{i}.attention.{name}.B"], params[f"layers.{i}.attention.{name}.A"]
            m.weight.copy_(m.weight + 2.0 * torch.mm(B, A))
    expected = by_hand(x)
    lora.use_adapter(model, params)
    merged = model(x)
    lora.train_ab(model, params)  # no generator: no dropout
    unmerged = model(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-10, rtol=0)
    torch.testing.assert_close(merged, expected, atol=1e-10, rtol=0)
    lora.train_ab(model, None)
    assert (merged - model(x)).abs().max() > 1e-2  # the adapter really changes the model


def test_bfloat16_base_merged_and_unmerged_agree():
    model = tiny_model(torch.bfloat16)
    lora.attach(model, lora.LoRAConfig(rank=4, targets="attn"))
    params = random_params(model, dtype=torch.float32)
    k = lora.wrappers(model)["layers.0.attention.k"]
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    A, B = params["layers.0.attention.k.A"].double(), params["layers.0.attention.k.B"].double()
    exact = x.double() @ (k.base.weight.double() + k.scale * B @ A).T
    lora.use_adapter(model, params)
    assert k.merged.dtype == torch.bfloat16
    merged = k(x)
    lora.train_ab(model, params)
    unmerged = k(x)  # the small path runs in float32 and is cast back
    assert merged.dtype == unmerged.dtype == torch.bfloat16
    torch.testing.assert_close(merged.double(), exact, atol=0.05, rtol=0.02)
    torch.testing.assert_close(unmerged.double(), exact, atol=0.05, rtol=0.02)


def test_gradients_reach_a_and_b_only_and_match_finite_differences():
    model = tiny_model()
    x = tokens()
    lora.attach(model, lora.LoRAConfig(rank=4, targets="all"))
    params = {k: torch.nn.Parameter(v) for k, v in random_params(model).items()}

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(x)[:, :-1].reshape(-1, 64), x[:, 1:].reshape(-1))

    lora.train_ab(model, params)
    loss().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in params.values())
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    name, eps = "layers.1.attention.v.B", 1e-6
    for idx in [(0, 0), (5, 3)]:
        with torch.no_grad():
            params[name][idx] += eps
            up = loss()
            params[name][idx] -= 2 * eps
            down = loss()
            params[name][idx] += eps
        torch.testing.assert_close(((up - down) / (2 * eps)).item(), params[name].grad[idx].item(), rtol=1e-6, atol=1e-9)


def test_dropout_comes_from_the_generator_and_only_in_training():
    model = tiny_model()
    x = tokens()
    lora.attach(model, lora.LoRAConfig(rank=4, dropout=0.5, targets="qv"))
    params = random_params(model)
    lora.train_ab(model, params)
    plain = model(x)
    lora.train_ab(model, params, torch.Generator().manual_seed(3))
    first = model(x)
    assert (first - plain).abs().max() > 1e-3
    g = torch.Generator().manual_seed(3)
    lora.train_ab(model, params, g)
    assert torch.equal(model(x), first)  # seeded alike: the same masks
    state = g.get_state()
    second = model(x)
    assert not torch.equal(second, first)  # a fresh mask each forward
    g.set_state(state)  # a resumed run restores the generator and draws the same masks again
    assert torch.equal(model(x), second)
    lora.use_adapter(model, params)
    torch.testing.assert_close(model(x), plain, atol=1e-10, rtol=0)
    # kept inputs are scaled by 1 / (1 - p), so on average the dropped-out delta is the plain delta
    q = lora.wrappers(model)["layers.0.attention.q"]
    lora.train_ab(model, params, torch.Generator().manual_seed(0))
    h = torch.randn(1, 32, dtype=torch.float64).expand(20000, 32)
    delta = q(h) - q.base(h)
    lora.train_ab(model, params)
    plain_delta = (q(h[:1]) - q.base(h[:1]))[0]
    assert (delta.mean(0) - plain_delta).norm() < 0.05 * plain_delta.norm()  # without the 1 / (1 - p): 0.5


def test_adapter_file_reloads_bit_exactly_and_refuses_other_models(tmp_path):
    model = tiny_model(torch.float32)
    cfg = lora.LoRAConfig(rank=4, targets="qv")
    lora.attach(model, cfg)
    params = random_params(model, dtype=torch.float32)
    meta = {"base_model": svf.model_fingerprint(model), "lora": asdict(cfg), "task": "gsm8k", "val_accuracy": 0.5}
    path = tmp_path / "a.safetensors"
    lora.Adapter(params, meta).save(path)
    assert not (tmp_path / "a.safetensors.tmp").exists()
    assert path.stat().st_size < 20_000  # A, B and metadata only, no base weights
    fresh = tiny_model(torch.float32)  # not attached yet: load attaches as the adapter was trained
    back = lora.Adapter.load(path, fresh)
    assert back.meta == meta and set(back.params) == set(params)
    assert all(torch.equal(back.params[k], v) for k, v in params.items())
    assert set(lora.wrappers(fresh)) == set(lora.wrappers(model))
    with pytest.raises(ValueError, match="adapters only fit the model they were trained on"):
        lora.Adapter.load(path, tiny_model(torch.float32, seed=1))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        lora.Adapter.load(tmp_path / "missing.safetensors")
    rank8 = tiny_model(torch.float32)
    lora.attach(rank8, lora.LoRAConfig(rank=8, targets="qv"))
    with pytest.raises(ValueError, match="already carries LoRA rank 8"):
        lora.Adapter.load(path, rank8)
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.q\.A has shape \(4, 32\), expected \(8, 32\).*--lora-rank"):
        lora.check_params(rank8, params)
    with pytest.raises(ValueError, match=r"missing \['layers\.0\.attention\.k\.A'.*--lora-targets"):
        lora.use_adapter(attached("attn"), params)


def test_count_params_by_hand():
    # q 32x32, k 16x32, v 16x32, o 32x32; gate, up 48x32, down 32x48 (out x in); two layers
    assert lora.count_params(attached("qv", rank=4)) == 2 * 4 * ((32 + 32) + (16 + 32))
    assert lora.count_params(attached("all", rank=4)) == 2 * 4 * (64 + 48 + 48 + 64 + 3 * (48 + 32))
    model = attached("mlp", rank=3)
    assert lora.count_params(model) == sum(v.numel() for v in lora.init_params(model).values()) == 2 * 3 * 3 * 80


def test_targets_attach_is_idempotent_and_refuses_other_wrappers():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown LoRA targets 'ffn'"):
        lora.target_names(model, "ffn")
    lora.attach(model, lora.LoRAConfig(targets="qv"))
    before = lora.wrappers(model)
    lora.attach(model, lora.LoRAConfig(targets="qv"))
    assert lora.wrappers(model) == before and len(before) == 4
    assert all(".attention.q" in n or ".attention.v" in n for n in before)
    with pytest.raises(ValueError, match="already carries LoRA rank 16"):
        lora.attach(model, lora.LoRAConfig(rank=8, targets="qv"))
    svf.attach(model, svf.decompose(model, "mlp", cache=False))
    with pytest.raises(ValueError, match="layers.0.mlp.gate is already wrapped by SVFLinear"):
        lora.attach(model, lora.LoRAConfig(targets="mlp"))
