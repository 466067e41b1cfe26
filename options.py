"""The multiple-choice rollout: REINFORCE where the action is one of the task's options.

For tasks whose answer is one of a few options (ARC, the classification expert of paper
section 3.2), the action can be the option itself: pi_z(a|x) = softmax_a(log p_z(reply_a|x)
/ T), with reply_a the task's response for option a. Free generation lets a small model
collapse onto a format it cannot leave; here every sample is a well-formed answer, the
gradient of log pi_z(a|x) is exact, and so is the KL between the two option distributions.
The objective is rl.py's (paper section 3.1) with this policy.
"""
from __future__ import annotations

import time

import torch

from config import TrainConfig
from methods import METHODS, SVF, Method, answer_mode, base_mode
from replies import option_logits
from rl import advantages, skip_update


def option_step(model, tokenizer, task, problems, z, opt, cfg: TrainConfig, generator,
                more=None) -> dict:
    """One step: cfg.samples actions per problem sampled from pi_z, loss -A log pi_z(a|x) +
    lambda KL(pi_z || pi_base); cfg.micro_batch problems per forward pass."""
    method = METHODS[cfg.method]
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    rewards_all, advs, parts = [], [], {"pg": 0.0, "kl": 0.0}
    T, n = max(cfg.temperature, 1e-3), len(problems)
    for i in range(0, n, cfg.micro_batch):
        group = problems[i:i + cfg.micro_batch]
        with torch.no_grad():
            base_mode(model)
            base = option_logits(model, tokenizer, task, group, T)
        method.train(model, z)  # no LoRA dropout: the scored policy is the one that samples
        logits = option_logits(model, tokenizer, task, group, T)
        loss = 0.0
        for p, lz, lb in zip(group, logits, base):
            logpi = torch.log_softmax(lz, -1)
            actions = torch.multinomial(logpi.detach().exp(), cfg.samples, replacement=True,
                                        generator=generator)
            responses = task.option_responses(p)
            r = torch.tensor([task.score(p, responses[a]) for a in actions.tolist()],
                             dtype=torch.float32) * 2 - 1
            adv = advantages(r[None], cfg.baseline)[0].to(logpi.device)       # (samples,)
            advs.append(adv)
            kl = (logpi.exp() * (logpi - torch.log_softmax(lb, -1))).sum()
            pg = -(adv * logpi[actions]).sum() / (n * cfg.samples)
            loss = loss + pg + cfg.kl_coef * kl / n
            parts["pg"] += pg.item()
            parts["kl"] += kl.item() / n
            rewards_all.append(r)
        loss.backward()
    base_mode(model)
    skipped = skip_update(torch.cat(advs), cfg.kl_coef, z, method)  # as in rl.train_step
    grad_norm = 0.0 if skipped else torch.nn.utils.clip_grad_norm_(list(z.values()),
                                                                   cfg.clip).item()
    if not skipped:
        opt.step()
    opt.zero_grad(set_to_none=True)
    rewards = torch.stack(rewards_all)
    return {"reward": rewards.mean().item(), "accuracy": (rewards > 0).float().mean().item(),
            **parts, "grad_norm": grad_norm, "skipped": skipped, "z_dev": method.distance(z),
            "agree_share": (rewards.std(1) == 0).float().mean().item(),
            "t_step": time.perf_counter() - t0}


def option_accuracy(model, tokenizer, task, problems, z, batch: int = 16,
                    method: Method = SVF) -> float:
    """Validation: the option with the highest likelihood under z is the answer."""
    answer_mode(model, z, method)
    hits = 0
    with torch.no_grad():
        for i in range(0, len(problems), batch):
            group = problems[i:i + batch]
            for p, lp in zip(group, option_logits(model, tokenizer, task, group, 1.0)):
                hits += task.score(p, task.option_responses(p)[int(lp.argmax())])
    answer_mode(model, None)
    return hits / len(problems)
