"""rl.py (paper section 3.1): advantages, the exact KL, the REINFORCE loss against plain
computations and finite differences, train_step, dynamic sampling (resuming: test_resume.py)."""
import json

import pytest
import torch

import config
import loop
import lora
import rl
import svf
from tiny import (TINY, ToyTask, ToyTokenizer, run_toy, tiny_batch, tiny_model, toy_train_problems)

# timing fields: the only ones a resumed run may log differently
TIMING = ("rollout_tok_s", "t_rollout", "t_score", "t_backward", "t_step", "t_val")


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


def test_sft_lowers_the_loss_of_the_reference_responses(tmp_path, monkeypatch):
    records = run_toy(tmp_path / "sft", steps=12, method="lora", objective="sft", lora_rank=4, lora_dropout=0.0)
    losses = [r["loss"] for r in records if r["step"] > 0]                          # step 0: the base's validation
    first, last = (sum(losses[i:i + 4]) / 4 for i in (0, 8))  # epochs 1 and 3, same problems
    assert last < 0.8 * first, (first, last)


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
    cfg = config.TrainConfig(samples=3, temperature=1.0, kl_coef=0.1, baseline=baseline, micro_batch=6, gen_batch=6)
    stats = rl.train_step(model, ToyTokenizer(), ToyNeverRightTask(), toy_train_problems(2, 0), z, opt, cfg,
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
    cfg = config.TrainConfig(samples=3, temperature=1.0, kl_coef=0.1, baseline="loo", micro_batch=6, gen_batch=6,
                         clip=1e9)
    problems = toy_train_problems(2, 0)
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
    cfg = config.TrainConfig(task="toy", steps=2, batch_size=2, samples=3, temperature=1.0, baseline="loo",
                         micro_batch=4, gen_batch=6, eval_every=0, cosine=True, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loop.train(model, ToyTokenizer(), cfg, tmp_path / "run", log=lambda *a: None, task=ToyNeverRightTask(),
                 train_set=toy_train_problems(4, 0), val_set=toy_train_problems(2, 1))
    records = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [True, True]
    assert [r["lr"] for r in records] == pytest.approx([cfg.lr, cfg.lr * 0.5])   # the schedule is the step's


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
    cfg = config.TrainConfig(method="lora", samples=3, temperature=1.0, kl_coef=0.0, baseline="none", micro_batch=6,
                         gen_batch=6)
    stats = rl.train_step(model, tok, ToyTask(), toy_train_problems(2, 0), params,
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
    seen = lambda *a, **k: budgets.append((k["desc"], k["max_new_tokens"])) or real(*a, **k)
    monkeypatch.setattr(rl, "generate_all", seen)  # the rollout
    monkeypatch.setattr(loop, "generate_all", seen)  # validation
    run_toy(tmp_path / "run", steps=2, max_new_tokens=3)
    assert {b for _, b in budgets} == {3} and {d for d, _ in budgets} == {"rollout", "validate"}


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


