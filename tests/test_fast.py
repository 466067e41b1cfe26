"""fast.py: the CPU speed path computes what model.py's plain path computes."""
import pytest
import torch
import torch.nn.functional as F

import fast
import model
from checkpoint import load_model
from model import generate
from test_model import make_hf_checkpoint
from tiny import StubTokenizer


@pytest.fixture
def plain():
    """The plain path for one test; the suite runs the speed path (conftest.py)."""
    fast.enable(False)
    yield
    fast.enable()


def test_enable_swaps_the_two_functions_and_back(plain):
    assert model.linear is F.linear and model.project is fast.PLAIN[1]
    fast.enable()
    assert model.linear is fast.linear and model.project is fast.project
    fast.enable(False)
    assert model.linear is F.linear


@pytest.mark.parametrize("rows", [1, 2, 7, 16, 32, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_linear_equals_f_linear(rows, dtype):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 64, generator=g).to(dtype)
    w, b = torch.randn(48, 64, generator=g).to(dtype), torch.randn(48, generator=g).to(dtype)
    expected = F.linear(x.double(), w.double(), b.double())
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(fast.linear(x, w, b).double(), expected, atol=tol, rtol=0.02)
    assert fast.linear(x, w, b).dtype == dtype and fast.linear(x, w, b).is_contiguous()


def test_both_paths_give_the_same_logits_and_greedy_tokens(tmp_path):
    make_hf_checkpoint("qwen2", tmp_path)  # q/k/v biases: stacked too
    m = load_model(tmp_path, device="cpu", dtype="float32")
    tokens = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    prompts = [[5, 17, 33, 2], [7, 7, 9, 11, 12, 3], [1]]
    with torch.no_grad():
        fast_logits = m(tokens)
    fast_out = generate(m, StubTokenizer(), prompts, 12)
    fast.enable(False)
    try:
        with torch.no_grad():
            plain_logits = m(tokens)
        plain_out = generate(m, StubTokenizer(), prompts, 12)
    finally:
        fast.enable()
    torch.testing.assert_close(fast_logits, plain_logits, atol=1e-5, rtol=0)
    assert [c.tokens for c in fast_out] == [c.tokens for c in plain_out]


def test_stacked_projections_follow_their_weights(tmp_path):
    """Inference runs q/k/v (and gate/up) as one matmul on stacked weights (model.project): the
    result equals the separate layers' (the gradient path), and tracks in-place edits, replaced
    weights and dtype changes; gradients still reach the weights afterwards."""
    make_hf_checkpoint("qwen2", tmp_path)  # q/k/v biases are stacked too
    model = load_model(tmp_path, device="cpu", dtype="float32").requires_grad_(True)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    attn = model.layers[0].attention

    def check():
        with torch.no_grad():
            fused = model(tokens)
        plain = model(tokens)  # grad enabled: each layer separately
        torch.testing.assert_close(fused, plain.detach(), atol=1e-5, rtol=0)
        return plain

    check()
    stack, bias, _ = attn.q.__dict__["stack"]
    # a view: no copy kept
    assert attn.k.weight.data_ptr() == stack[attn.q.weight.shape[0]].data_ptr()
    with torch.no_grad():
        attn.k.weight.mul_(1.5)                                   # in place: seen through the view
        model.layers[1].mlp.up.weight.add_(0.01)
    check()
    attn.v.weight = torch.nn.Parameter(torch.randn_like(attn.v.weight))  # replaced: stacked again
    gate = model.layers[1].mlp.gate
    gate.weight = torch.nn.Parameter(torch.randn_like(gate.weight))
    check()
    model.double()
    with torch.no_grad():
        assert model(tokens).dtype == torch.float64
    model.float()
    plain = check()
    plain.sum().backward()
    assert attn.q.weight.grad is not None and attn.q.weight.grad.abs().sum() > 0
