"""options.py: the multiple-choice rollout learns, and makes no update without a signal."""

import torch

import config
import options
import replies
import svf
from tiny import (ToyTask, ToyTokenizer, tiny_model, toy_train_problems)


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
    cfg = config.TrainConfig(samples=4, temperature=1.0, kl_coef=0.0, baseline="loo", micro_batch=6)
    problems = toy_train_problems(4, 0)
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


def test_an_option_step_without_reward_signal_makes_no_update(tmp_path, monkeypatch):
    monkeypatch.setattr(svf, "CACHE_DIR", tmp_path / "svd")
    model, tok = tiny_model(torch.float32), ToyTokenizer()
    tok.encode = lambda text: [3 + ord(c) % 60 for c in text]
    task = ToyChoiceTask()
    task.score = lambda p, response: False
    svf.attach(model, svf.decompose(model, "mlp"))
    z = {n: torch.nn.Parameter(v) for n, v in svf.ones(model).items()}
    opt = torch.optim.AdamW(z.values(), lr=0.05, weight_decay=0.0)
    cfg = config.TrainConfig(samples=4, temperature=1.0, kl_coef=0.1, baseline="loo", micro_batch=6)
    stats = options.option_step(model, tok, task, toy_train_problems(3, 0), z, opt, cfg, torch.Generator().manual_seed(0))
    assert stats["skipped"] and not opt.state
    assert all(torch.equal(v.detach(), torch.ones_like(v)) for v in z.values())
