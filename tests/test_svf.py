"""svf.py and rl.py: SVF composition, expert files, mixing, the REINFORCE+KL objective, resume."""
import json

import pytest
import torch

import data
import lora
import replies
import options
import rl
import svf
from model import ModelArgs, Transformer

TINY = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48, max_seq_len=64)


def tiny_model(dtype=torch.float64, seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TINY).to(dtype).eval().requires_grad_(False)


def tiny_batch(seed=0):
    """Two prompts, the first with two sampled responses and the second with one."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 64, (n,), generator=g).tolist() for n in (5, 9)]
    samples = [[torch.randint(2, 64, (n,), generator=g).tolist() for n in ns] for ns in ((4, 2), (6,))]
    return prompts, samples


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


def test_advantages():
    r = torch.tensor([[1.0, -1, -1, -1], [1, 1, 1, 1]])
    assert torch.equal(rl.advantages(r, "none"), r)
    assert torch.equal(rl.advantages(r, "mean"), torch.tensor([[1.5, -0.5, -0.5, -0.5], [0, 0, 0, 0]]))
    loo = rl.advantages(r, "loo")
    assert torch.allclose(loo[0], torch.tensor([2.0, -2 / 3, -2 / 3, -2 / 3])) and loo[1].abs().sum() == 0


def test_kl_is_zero_at_identity_positive_otherwise_and_matches_torch():
    lz, lb = torch.randn(3, 5, 64, dtype=torch.float64), torch.randn(3, 5, 64, dtype=torch.float64)
    assert rl.exact_kl(lb, lb).abs().max() < 1e-12
    kl = rl.exact_kl(lz, lb)
    ref = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=lz),
                                            torch.distributions.Categorical(logits=lb))
    torch.testing.assert_close(kl, ref)
    assert (kl > 0).all()
    reverse = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=lb),
                                                torch.distributions.Categorical(logits=lz))
    assert (kl - reverse).abs().max() > 1e-3  # the direction matters, and ours is KL(pi_z || pi_base)


def test_kl_term_of_the_loss_is_zero_at_z_one():
    model = tiny_model()
    svf.attach(model, svf.decompose(model, "mlp", cache=False))
    prompts, samples = tiny_batch()
    z = {n: v.requires_grad_() for n, v in svf.ones(model).items()}
    _, parts = rl.reinforce_loss(model, z, prompts, samples, torch.zeros(3, dtype=torch.float64), 0.5, 3, pad_id=0)
    assert abs(parts["kl"]) < 1e-12
    z = {n: (1 + 0.2 * torch.randn_like(v)).requires_grad_() for n, v in z.items()}
    _, parts = rl.reinforce_loss(model, z, prompts, samples, torch.zeros(3, dtype=torch.float64), 0.5, 3, pad_id=0)
    assert parts["kl"] > 1e-6


def test_reinforce_loss_equals_a_plain_computation():
    """The packed loss against one unpadded forward pass per (prompt, response), base and adapted."""
    model = tiny_model()
    svf.attach(model, svf.decompose(model, "mlp", cache=False))
    prompts, samples = tiny_batch(1)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    z = {n: 1 + 0.2 * torch.randn_like(v) for n, v in svf.ones(model).items()}
    T = 0.7
    loss, parts = rl.reinforce_loss(model, z, prompts, samples, adv, 0.3, 5, pad_id=0, temperature=T)
    pairs = [(p, r) for p, rs in zip(prompts, samples) for r in rs]
    pg = kl = 0.0
    with torch.no_grad():
        for a, (p, r) in zip(adv, pairs):
            row = torch.tensor([p + r])
            svf.use_expert(model, z)
            logp_z = torch.log_softmax(model(row)[0, len(p) - 1:-1] / T, -1)          # (len(r), vocab), at T
            svf.use_expert(model, None)
            logp_b = torch.log_softmax(model(row)[0, len(p) - 1:-1] / T, -1)
            pg -= a * logp_z.gather(-1, torch.tensor(r)[:, None]).sum() / 5
            kl += (logp_z.exp() * (logp_z - logp_b)).sum() / 5       # KL(pi_z || pi_base), summed over tokens
    torch.testing.assert_close(torch.tensor([parts["pg"], parts["kl"]], dtype=torch.float64),
                               torch.stack([pg, kl]).double(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss.double(), (pg + 0.3 * kl).double(), rtol=1e-9, atol=1e-12)


def test_the_score_function_has_mean_zero_under_the_policy_that_samples():
    """E_{y ~ pi_T}[grad log pi(y)] = 0 for the policy pi_T = softmax(logits / T) that draws the samples.
    One-token replies, every token of the vocabulary, each weighted by its probability at T (the exact
    expectation with a constant advantage, no baseline, no KL): the gradient must vanish. Scored at
    T = 1 instead (the old code), it is proportional to pi_0.7 - pi_1 and pushes z whatever the rewards."""
    model = tiny_model()
    svf.attach(model, svf.decompose(model, "mlp", cache=False))
    prompt, T = [5, 9, 17, 33], 0.7
    z = {n: (1 + 0.1 * torch.randn_like(v)).requires_grad_() for n, v in svf.ones(model).items()}
    svf.use_expert(model, z)
    with torch.no_grad():
        pi_T = torch.softmax(model(torch.tensor([prompt]))[0, -1] / T, -1)          # (vocab,)
    svf.use_expert(model, None)
    replies = [[[v] for v in range(TINY.vocab_size)]]
    loss, _ = rl.reinforce_loss(model, z, [prompt], replies, pi_T, 0.0, 1, pad_id=0, temperature=T)
    loss.backward()
    grad = torch.cat([v.grad for v in z.values()])
    assert grad.abs().max() < 1e-12, grad.abs().max()
    for v in z.values():
        v.grad = None
    wrong, _ = rl.reinforce_loss(model, z, [prompt], replies, pi_T, 0.0, 1, pad_id=0, temperature=1.0)
    wrong.backward()
    assert torch.cat([v.grad for v in z.values()]).abs().max() > 1e-4  # the other temperature's score function


def test_both_terms_sum_over_a_responses_tokens():
    """One reduction for the policy term and the KL: doubling a response's length doubles both
    (the KL used to be a per-token mean, so lambda was about L times weaker than the paper's)."""
    V = 16
    logits_z, logits_b = torch.randn(V, dtype=torch.float64), torch.randn(V, dtype=torch.float64)

    def fake_reply_logits(model, prompts, replies, pad_id, share_prefix=True):  # the same logits at every token
        n = [len(r) for rs in replies for r in rs]
        rows = logits_b if not svf.wrappers(model)["layers.0.mlp.up"].z is not None else logits_z
        targets = torch.tensor([t for rs in replies for r in rs for t in r])
        which = torch.repeat_interleave(torch.arange(len(n)), torch.tensor(n))
        return rows.expand(len(targets), V), targets, which

    model = tiny_model()
    svf.attach(model, svf.decompose(model, "mlp", cache=False))
    z = {n: 1.1 * v for n, v in svf.ones(model).items()}
    import unittest.mock
    with unittest.mock.patch.object(rl, "reply_logits", fake_reply_logits):
        short = rl.reinforce_loss(model, z, [[1, 2]], [[[3, 3, 3]]], torch.tensor([1.0]), 0.1, 1, 0, 0.8)[1]
        long = rl.reinforce_loss(model, z, [[1, 2]], [[[3] * 6]], torch.tensor([1.0]), 0.1, 1, 0, 0.8)[1]
    assert long["pg"] == pytest.approx(2 * short["pg"], rel=1e-12)
    assert long["kl"] == pytest.approx(2 * short["kl"], rel=1e-12)
    lp, lq = torch.log_softmax(logits_z / 0.8, -1), torch.log_softmax(logits_b / 0.8, -1)
    assert short["kl"] == pytest.approx(3 * (lp.exp() * (lp - lq)).sum().item(), rel=1e-12)  # KL at T, summed


def test_reinforce_gradient_matches_finite_differences():
    model = tiny_model()
    svf.attach(model, svf.decompose(model, "all", cache=False))
    prompts, samples = tiny_batch()
    adv = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    z0 = {n: 1 + 0.1 * torch.randn_like(v) for n, v in svf.ones(model).items()}

    def loss_at(z):
        return rl.reinforce_loss(model, z, prompts, samples, adv, 0.3, 3, pad_id=0, temperature=0.7)[0]

    z = {n: v.clone().requires_grad_() for n, v in z0.items()}
    loss_at(z).backward()
    eps = 1e-6
    for name in ["layers.0.attention.k", "layers.1.mlp.down"]:
        for i in (0, 3):
            plus = {n: v.clone() for n, v in z0.items()}
            minus = {n: v.clone() for n, v in z0.items()}
            plus[name][i] += eps
            minus[name][i] -= eps
            with torch.no_grad():
                fd = (loss_at(plus) - loss_at(minus)) / (2 * eps)
            assert abs(fd - z[name].grad[i]) < 1e-6 * max(1.0, abs(fd)), (name, i, fd, z[name].grad[i])


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


# ----------------------------------------------------------------------------- the trainer, end to end
class ToyTokenizer:
    """Ids are small numbers; enough of a tokenizer for the trainer's loop on a tiny random model."""
    pad_id, stop_ids = 0, {1}

    def encode_chat(self, messages):
        return [2] + [3 + ord(c) % 60 for c in messages[-1]["content"]]

    def decode(self, ids):
        return " ".join(map(str, ids))

    def encode(self, text):  # inverse of decode, for reference responses ("17" -> [17])
        return [int(t) for t in text.split()]

    def end_of_turn_ids(self):
        return {1}


class ToyTask(data.Task):
    """Reward when the response contains the problem's answer token: rare but not impossible."""
    name, domain, max_new_tokens, stop = "toy", "math", 5, []

    def messages(self, p):
        return [{"role": "user", "content": p["question"]}]

    def score(self, p, response):
        return p["answer"] in response.split()

    def score_many(self, problems, responses, workers=4):
        return [self.score(p, r) for p, r in zip(problems, responses)]

    def reference_response(self, p):
        return p["answer"]


def toy_problems(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"question": "q" * int(torch.randint(1, 6, (), generator=g)) + str(i),
             "answer": str(int(torch.randint(3, 64, (), generator=g)))} for i in range(n)]


def run_toy(out, steps, resume=False, interrupt_at=None, monkeypatch=None, **overrides):
    model = tiny_model(torch.float32)
    cfg = rl.TrainConfig(**{**dict(task="toy", targets="mlp", steps=steps, batch_size=2, samples=3, temperature=1.0,
                                   lr=0.05, kl_coef=0.1, baseline="none", micro_batch=4, gen_batch=6, eval_every=2,
                                   val_limit=0, seed=3), **overrides})
    owner, step_name = (lora, "sft_step") if cfg.objective == "sft" else (rl, "train_step")
    if interrupt_at is not None:  # a Ctrl-C arriving during step `interrupt_at`
        import os
        import signal
        real_step, calls = getattr(owner, step_name), []

        def step_then_ctrl_c(*args, **kwargs):
            calls.append(1)
            if len(calls) == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)
            return real_step(*args, **kwargs)
        monkeypatch.setattr(owner, step_name, step_then_ctrl_c)
    rl.train(model, ToyTokenizer(), cfg, out, resume=resume, log=lambda *a: None, task=ToyTask(),
             train_set=toy_problems(8, 0), val_set=toy_problems(4, 1))
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


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


def test_sft_lowers_the_loss_of_the_reference_responses(tmp_path, monkeypatch):
    records = run_toy(tmp_path / "sft", steps=12, method="lora", objective="sft", lora_rank=4, lora_dropout=0.0)
    losses = [r["loss"] for r in records if r["step"] > 0]                          # step 0: the base's validation
    first, last = (sum(losses[i:i + 4]) / 4 for i in (0, 8))  # epochs 1 and 3, same problems
    assert last < 0.8 * first, (first, last)


class ToyChoiceTask(ToyTask):
    """Multiple choice among three two-letter replies: the last one is always right."""
    def option_responses(self, p):
        return ["ab", "cd", "ef"]

    def score(self, p, response):
        return response == "ef"


def test_option_rollout_learns_the_rewarded_option(tmp_path, monkeypatch):
    monkeypatch.setattr(svf, "CACHE_DIR", tmp_path / "svd")
    model, tok, task = tiny_model(torch.float32), ToyTokenizer(), ToyChoiceTask()
    tok.encode = lambda text: [3 + ord(c) % 60 for c in text]
    svf.attach(model, svf.decompose(model, "mlp"))
    z = {n: torch.nn.Parameter(v) for n, v in svf.ones(model).items()}
    opt = torch.optim.AdamW(z.values(), lr=0.05, weight_decay=0.0)
    cfg = rl.TrainConfig(samples=4, temperature=1.0, kl_coef=0.0, baseline="loo", micro_batch=6)
    problems = toy_problems(4, 0)
    before = options.option_accuracy(model, tok, task, problems, None)
    p_right = lambda: torch.softmax(torch.stack(replies.option_logits(model, tok, task, problems, 1.0)), -1)[:, 2].mean().item()
    svf.train_z(model, None)
    with torch.no_grad():
        start = p_right()
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        stats = options.option_step(model, tok, task, problems, z, opt, cfg, g)
    svf.train_z(model, {n: v.detach() for n, v in z.items()})
    with torch.no_grad():
        end = p_right()
    svf.train_z(model, None)
    assert end > start + 0.05, (start, end)
    assert options.option_accuracy(model, tok, task, problems, z) >= before
    assert set(stats) >= {"reward", "accuracy", "kl", "grad_norm"}


class ToyNeverRightTask(ToyTask):
    """Every response is wrong: with a baseline, every advantage is zero."""
    def score(self, p, response):
        return False


@pytest.mark.parametrize("baseline,updates", [("loo", False), ("mean", False), ("none", True)])
def test_a_step_without_reward_signal_makes_no_update(baseline, updates, tmp_path, monkeypatch):
    monkeypatch.setattr(svf, "CACHE_DIR", tmp_path / "svd")
    model = tiny_model(torch.float32)
    svf.attach(model, svf.decompose(model, "mlp"))
    z = {n: torch.nn.Parameter(v) for n, v in svf.ones(model).items()}
    before = {n: v.detach().clone() for n, v in z.items()}
    opt = torch.optim.AdamW(z.values(), lr=0.05, weight_decay=0.0)
    cfg = rl.TrainConfig(samples=3, temperature=1.0, kl_coef=0.1, baseline=baseline, micro_batch=6, gen_batch=6)
    stats = rl.train_step(model, ToyTokenizer(), ToyNeverRightTask(), toy_problems(2, 0), z, opt, cfg,
                          torch.Generator().manual_seed(0))
    moved = max((z[n].detach() - before[n]).abs().max().item() for n in z)
    assert stats["reward"] == -1.0 and stats["skipped"] is not updates
    if updates:  # the paper's plain rewards (-1 for all) still push: the update is made
        assert moved > 1e-3 and stats["grad_norm"] > 0
    else:        # all advantages zero: z and AdamW's state are untouched
        assert moved == 0.0 and stats["grad_norm"] == 0.0 and not opt.state


def test_the_kl_term_still_pulls_z_back_when_every_advantage_is_zero(tmp_path, monkeypatch):
    """All rewards -1 with a baseline: no advantage, but z = 1.2 is not the base model, so the KL term
    has a gradient and the step must make it (it used to be skipped, so lambda hung on the rewards)."""
    monkeypatch.setattr(svf, "CACHE_DIR", tmp_path / "svd")
    model, tok, task = tiny_model(torch.float32), ToyTokenizer(), ToyNeverRightTask()
    svf.attach(model, svf.decompose(model, "mlp"))
    z = {n: torch.nn.Parameter(1.2 * v) for n, v in svf.ones(model).items()}
    opt = torch.optim.SGD(z.values(), lr=0.05)
    cfg = rl.TrainConfig(samples=3, temperature=1.0, kl_coef=0.1, baseline="loo", micro_batch=6, gen_batch=6,
                         clip=1e9)
    problems = toy_problems(2, 0)
    prompts, samples = tiny_batch()
    with torch.no_grad():  # the KL on fixed responses, before and after the step
        kl = lambda: rl.reinforce_loss(model, {n: v.detach() for n, v in z.items()}, prompts, samples,
                                       torch.zeros(3), 1.0, 3, 0, 1.0)[1]["kl"]
    before, dist = kl(), sum((v.detach() - 1).square().sum() for v in z.values())
    stats = rl.train_step(model, tok, task, problems, z, opt, cfg, torch.Generator().manual_seed(1))
    assert stats["reward"] == -1.0 and not stats["skipped"] and stats["grad_norm"] > 0 and stats["pg"] == 0
    assert sum((v.detach() - 1).square().sum() for v in z.values()) < dist   # towards z = 1
    assert kl() < before


def test_a_run_whose_steps_make_no_update_raises_no_warning(tmp_path, monkeypatch):
    """A skipped step used to step the lr scheduler without the optimiser: PyTorch warned on the
    first one, which every newcomer's GSM8K run met."""
    import warnings
    monkeypatch.setattr(svf, "CACHE_DIR", tmp_path / "svd")
    model = tiny_model(torch.float32)
    cfg = rl.TrainConfig(task="toy", steps=2, batch_size=2, samples=3, temperature=1.0, baseline="loo",
                         micro_batch=4, gen_batch=6, eval_every=0, cosine=True, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rl.train(model, ToyTokenizer(), cfg, tmp_path / "run", log=lambda *a: None, task=ToyNeverRightTask(),
                 train_set=toy_problems(4, 0), val_set=toy_problems(2, 1))
    records = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [True, True]
    assert [r["lr"] for r in records] == pytest.approx([cfg.lr, cfg.lr * 0.5])   # the schedule is the step's


def test_an_option_step_without_reward_signal_makes_no_update(tmp_path, monkeypatch):
    monkeypatch.setattr(svf, "CACHE_DIR", tmp_path / "svd")
    model, tok = tiny_model(torch.float32), ToyTokenizer()
    tok.encode = lambda text: [3 + ord(c) % 60 for c in text]
    task = ToyChoiceTask()
    task.score = lambda p, response: False
    svf.attach(model, svf.decompose(model, "mlp"))
    z = {n: torch.nn.Parameter(v) for n, v in svf.ones(model).items()}
    opt = torch.optim.AdamW(z.values(), lr=0.05, weight_decay=0.0)
    cfg = rl.TrainConfig(samples=4, temperature=1.0, kl_coef=0.1, baseline="loo", micro_batch=6)
    stats = options.option_step(model, tok, task, toy_problems(3, 0), z, opt, cfg, torch.Generator().manual_seed(0))
    assert stats["skipped"] and not opt.state
    assert all(torch.equal(v.detach(), torch.ones_like(v)) for v in z.values())


def test_micro_batches_bound_rows_and_padded_tokens():
    lengths = [5, 300, 40, 41, 2000, 39, 7, 300]
    groups = replies.micro_batches(lengths, max_rows=3, max_tokens=400)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # every row once
    for g in groups:
        assert len(g) <= 3 and (len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 400)
    assert [4] in groups  # the long row goes alone
    assert replies.micro_batches(lengths, 8, 10**9) == [sorted(range(8), key=lambda i: -lengths[i])]


@pytest.mark.parametrize("method,objective", [("lora", "sft"), ("svf", "reinforce")])
def test_splitting_the_backward_pass_by_tokens_changes_nothing(method, objective, tmp_path, monkeypatch):
    monkeypatch.setattr(svf, "CACHE_DIR", tmp_path / "svd")
    kw = dict(method=method, objective=objective, lora_rank=2, lora_dropout=0.0, micro_batch=6)  # 2 problems a pass
    whole = run_toy(tmp_path / "a", steps=3, **kw)
    split = run_toy(tmp_path / "b", steps=3, micro_tokens=1, **kw)  # every row in a pass of its own
    keys = ("loss",) if objective == "sft" else ("pg", "kl", "reward")
    for a, b in zip(whole[1:], split[1:]):
        assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], rel=1e-4, abs=1e-6)
    File = svf.Expert if method == "svf" else lora.Adapter
    a, b = File.load(tmp_path / "a" / "last.safetensors"), File.load(tmp_path / "b" / "last.safetensors")
    ta, tb = (a.z, b.z) if method == "svf" else (a.params, b.params)
    assert all(torch.allclose(ta[n], tb[n], atol=1e-5) for n in ta)


def test_lora_reinforce_scores_its_samples_without_dropout(tmp_path, monkeypatch):
    """The scored policy must be the one that sampled (the merged adapter, no dropout): with dropout on
    while scoring, the log-probs were those of a random sub-network."""
    monkeypatch.setattr(svf, "CACHE_DIR", tmp_path / "svd")
    model, tok = tiny_model(torch.float32), ToyTokenizer()
    lora.attach(model, lora.LoRAConfig(rank=2, dropout=0.5))
    g = torch.Generator().manual_seed(0)
    params = {n: torch.nn.Parameter(v + 0.3 * torch.randn(v.shape, generator=g)) for n, v in
              lora.init_params(model, 0).items()}
    seen = []
    real_loss = rl.reinforce_loss
    monkeypatch.setattr(rl, "reinforce_loss", lambda *a, **k: seen.append((a, k)) or real_loss(*a, **k))
    cfg = rl.TrainConfig(method="lora", samples=3, temperature=1.0, kl_coef=0.0, baseline="none", micro_batch=6,
                         gen_batch=6)
    stats = rl.train_step(model, tok, ToyTask(), toy_problems(2, 0), params,
                          torch.optim.SGD(params.values(), lr=0.0), cfg, torch.Generator().manual_seed(0))
    pg = 0.0
    lora.use_adapter(model, {n: v.detach() for n, v in params.items()})   # the network that generated
    with torch.no_grad():
        for (_, _, prompts, samples, adv, _, n_total, *_), _ in seen:
            pairs = [(p, r) for p, rs in zip(prompts, samples) for r in rs]
            for a, (p, r) in zip(adv, pairs):
                logp = torch.log_softmax(model(torch.tensor([p + r]))[0, len(p) - 1:-1], -1)
                pg -= a * logp.gather(-1, torch.tensor(r)[:, None]).sum().item() / n_total
    lora.use_adapter(model, None)
    assert stats["pg"] == pytest.approx(pg, rel=1e-5)


def test_validation_answers_within_max_new_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(svf, "CACHE_DIR", tmp_path / "svd")
    budgets = []
    real = rl.generate_all
    monkeypatch.setattr(rl, "generate_all", lambda *a, **k: budgets.append((k["desc"], k["max_new_tokens"]))
                        or real(*a, **k))
    run_toy(tmp_path / "run", steps=2, max_new_tokens=3)
    assert {b for _, b in budgets} == {3} and {d for d, _ in budgets} == {"rollout", "validate"}


def test_resume_refuses_other_settings_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(svf, "CACHE_DIR", tmp_path / "svd")
    run_toy(tmp_path / "run", steps=2)
    with pytest.raises(ValueError, match=r"--lr 0.05 -> 0.01; --kl-coef 0.1 -> 0.2"):
        run_toy(tmp_path / "run", steps=3, resume=True, lr=0.01, kl_coef=0.2)
    with pytest.raises(ValueError, match=r"--temperature 1.0 -> 0.7"):
        run_toy(tmp_path / "run", steps=3, resume=True, temperature=0.7)
    records = run_toy(tmp_path / "run", steps=3, resume=True, micro_tokens=64)   # more steps, another split: fine
    assert [r["step"] for r in records] == [0, 1, 2, 3]


def test_dynamic_sampling_trains_on_informative_groups_only(tmp_path, monkeypatch):
    """DAPO's dynamic sampling: draw problems until batch_size groups have rewards that differ (or the
    cap is reached); every kept group is informative, and the log says how many were drawn."""
    monkeypatch.setattr(svf, "CACHE_DIR", tmp_path / "svd")
    seen = []
    real = rl.reinforce_loss
    monkeypatch.setattr(rl, "reinforce_loss", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    records = run_toy(tmp_path / "run", steps=4, samples=4, baseline="loo", dynamic_draws=8, eval_every=0)
    assert all(r["drawn"] in (2, 4, 6, 8) and r["groups"] <= 2 for r in records)
    assert any(r["drawn"] > 2 for r in records) and any(r["groups"] > 0 for r in records)
    for r in records:
        assert r["informative_share"] * r["drawn"] >= r["groups"]
        if r["groups"]:
            assert r["agree_share"] == 0.0           # no group whose rewards all agree is trained on
        else:                                          # nothing informative under the cap: no update, said
            assert r["skipped"] and r["reward"] is None and 0 <= r["drawn_accuracy"] <= 1
    for adv in seen:                                   # each kept group has a non-zero advantage
        assert adv.view(-1, 4).abs().sum(1).min() > 0


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


@pytest.mark.parametrize("argv,want", [
    ([], {"samples": 16, "temperature": 1.0, "batch_size": 4, "dynamic_draws": 12, "max_new_tokens": 256}),
    (["--samples", "8", "--dynamic-draws", "0"], {"samples": 8, "dynamic_draws": 0, "temperature": 1.0}),
    (["--task", "arc_easy"], {"samples": 4, "temperature": 0.7, "batch_size": 8, "dynamic_draws": 0}),
    (["--method", "lora"], {"samples": 4, "dynamic_draws": 0, "objective": "sft"}),
])
def test_train_py_takes_each_tasks_own_defaults_unless_a_flag_says_otherwise(argv, want, monkeypatch, capsys):
    import runpy
    import sys
    import checkpoint

    def stop(*a, **k):
        raise SystemExit("stopped before loading")
    monkeypatch.setattr(checkpoint, "load", stop)
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit, match="stopped before loading"):
        runpy.run_path("train.py", run_name="__main__")
    out = capsys.readouterr().out
    config = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert {k: config[k] for k in want} == want
