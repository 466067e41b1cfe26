"""Training SVF experts with REINFORCE and a KL penalty (paper section 3.1).

The objective, for prompts x and responses y sampled from the adapted model pi_z:

    J(z) = E[ log pi_z(y|x) * A(x, y) ] - lambda * KL(pi_z || pi_base)

A is the reward r = +1 (correct) / -1 (wrong), optionally minus a baseline computed from
the other samples of the same prompt (the paper uses none). pi_z is the policy that
samples, softmax(logits / T) at the rollout temperature T, so the log-probs are scored at
T too: at T = 1 the score function would be another policy's and the gradient biased. Both
terms are sums over a response's tokens, as in the paper's sequence-level objective; the
sequence KL is estimated on the sampled y as sum_t KL_t, each KL_t exact over the
vocabulary. Both are averaged over the step's responses, so lambda means the paper's.

Read top to bottom: advantages, exact_kl, reinforce_loss, rollout with dynamic sampling, and
train_step. The settings are config.py, the loop around the step loop.py; what is trained
(SVF's z or the LoRA baseline's A and B) is methods.py; the multiple-choice rollout is
options.py, and the LoRA baseline's supervised objective lora.sft_step.
"""
from __future__ import annotations

import time

import torch

import dist
from config import TrainConfig
from engine import generate_all
from methods import METHODS, SVF, Method, answer_mode, base_mode
from model import Transformer
from replies import micro_batches, reply_logits


# ----------------------------------------------------------------------------- the objective
def advantages(rewards: torch.Tensor, baseline: str) -> torch.Tensor:
    """rewards (prompts, samples) -> advantages of the same shape."""
    if baseline == "none":
        return rewards
    S = rewards.shape[1]
    if baseline == "mean":
        return rewards - rewards.mean(1, keepdim=True)
    if baseline == "loo":  # mean of the *other* samples: unbiased (Kool et al., RLOO)
        if S < 2:
            raise ValueError("baseline 'loo' needs at least 2 samples per prompt")
        return rewards - (rewards.sum(1, keepdim=True) - rewards) / (S - 1)
    raise ValueError(f"unknown baseline {baseline!r}: choose none, mean or loo")


def skip_update(adv: torch.Tensor, kl_coef: float, params: dict, method: Method = SVF) -> bool:
    """True when no term of the loss has a gradient: no advantage is non-zero, and the KL is off
    or at its minimum (params are the base model's, where the KL and its gradient are 0).
    Otherwise the KL term alone still pulls z back towards the base model, as lambda says."""
    return not bool((adv != 0).any()) and (not kl_coef or method.at_base(params))


def exact_kl(logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """KL(pi_z || pi_base) per token, summed over the whole vocabulary: (B, R).

    This direction penalises the adapted model for putting mass where the base model puts
    little (the official code computes KL(pi_base || pi_z), the reverse)."""
    logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(base_logits, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def reinforce_loss(model: Transformer, z: dict, prompts: list[list[int]],
                   samples: list[list[list[int]]], adv: torch.Tensor, kl_coef: float,
                   n_total: int, pad_id: int, temperature: float = 1.0,
                   method: Method = SVF) -> tuple[torch.Tensor, dict]:
    """(-sum_i A_i log pi_z(y_i|x_i) + lambda sum_i sum_t KL_it) / N for one micro-batch.

    prompts: one per problem; samples: the responses of each (token lists); adv: one advantage
    per response, in order. pi_z = softmax(logits / temperature), the policy that sampled.
    Dividing by n_total (all responses of the step) makes accumulated micro-batch gradients
    equal one big batch's. LoRA's dropout is off: the scored network must be the one that
    sampled."""
    if temperature <= 0:
        raise ValueError("REINFORCE needs a sampling temperature > 0: a greedy rollout has no "
                         "score function")
    if kl_coef:
        base_mode(model)
        with torch.no_grad():
            base_logits = reply_logits(model, prompts, samples, pad_id)[0] / temperature
    method.train(model, z)
    logits, targets, which = reply_logits(model, prompts, samples, pad_id)  # (N, V), (N,), (N,)
    logits = logits / temperature
    dev = logits.device
    n = sum(len(s) for s in samples)
    token_logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    per_response = torch.zeros(n, dtype=token_logp.dtype, device=dev).index_add(0, which,
                                                                                token_logp)
    pg = -(adv.to(dev) * per_response).sum() / n_total
    kl = torch.zeros((), device=dev)
    if kl_coef:
        kl = exact_kl(logits, base_logits).sum() / n_total  # summed over tokens, as pg
    return pg + kl_coef * kl, {"pg": pg.item(), "kl": kl.item()}


# ----------------------------------------------------------------------------- one step
def rollout(model, tokenizer, task, problems, cfg: TrainConfig, z, generator):
    """cfg.samples responses per problem with the current expert (composed once, no grad)."""
    answer_mode(model, z, METHODS[cfg.method])
    prompts = [tokenizer.encode_chat(task.messages(p)) for p in problems
               for _ in range(cfg.samples)]
    comps = generate_all(model, tokenizer, prompts, cfg.gen_batch, desc="rollout",
                         max_new_tokens=cfg.max_new_tokens or task.max_new_tokens,
                         temperature=cfg.temperature, top_p=cfg.top_p,
                         stop_strings=tuple(task.stop), generator=generator, refill=True)
    answer_mode(model, None)
    return prompts, comps


def sample_groups(model, tokenizer, task, problems, cfg: TrainConfig, z, generator, more=None):
    """Roll out and score cfg.samples responses per problem: (problems, prompts, completions,
    rewards (problems, samples)) of the groups to train on, and the rewards of every problem
    drawn. Dynamic sampling (DAPO; cfg.dynamic_draws > 0 and more() gives the next problems):
    draw until cfg.batch_size groups have rewards that differ or dynamic_draws problems are
    drawn, and keep those only: a group whose rewards agree has no advantage under a
    baseline, and with rare rewards most groups agree."""
    dynamic, S, rows = bool(cfg.dynamic_draws and more is not None), cfg.samples, []
    while True:
        prompts, comps = rollout(model, tokenizer, task, problems, cfg, z, generator)
        repeated = [p for p in problems for _ in range(S)]
        correct = task.score_many(repeated, [c.text for c in comps])
        rewards = (torch.tensor(correct, dtype=torch.float32) * 2 - 1).view(len(problems), S)
        rows += [(p, prompts[i * S:(i + 1) * S], comps[i * S:(i + 1) * S], rewards[i])
                 for i, p in enumerate(problems)]
        informative = [r for r in rows if r[3].std() > 0]
        if not dynamic or len(informative) >= cfg.batch_size or len(rows) >= cfg.dynamic_draws:
            break
        problems = more()[:cfg.dynamic_draws - len(rows)]
    drawn = torch.stack([r[3] for r in rows])
    rows = informative[:cfg.batch_size] if dynamic else rows
    rewards = torch.stack([r[3] for r in rows]) if rows else torch.zeros(0, S)
    return ([r[0] for r in rows], [q for r in rows for q in r[1]],
            [c for r in rows for c in r[2]], rewards, drawn)


def train_step(model, tokenizer, task, problems, z, opt, cfg: TrainConfig, generator,
               more=None) -> dict:
    """One step: rollout (dynamic sampling when more() is given), advantages, loss, AdamW."""
    method, S = METHODS[cfg.method], cfg.samples
    t0 = time.perf_counter()
    problems = dist.shard(problems)  # this rank's share: all of them in one process
    problems, prompts, comps, rewards, drawn = sample_groups(model, tokenizer, task, problems,
                                                             cfg, z, generator, more)
    t1 = time.perf_counter()
    adv = advantages(rewards, cfg.baseline)                              # (problems, samples)
    t2 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    parts = {"pg": 0.0, "kl": 0.0}
    # No term with a gradient: no update at all, rather than AdamW scaling rounding noise up
    # to a step of about lr. Dynamic sampling may also find no group.
    skipped = skip_update(adv, cfg.kl_coef, z, method) or not len(problems)
    skipped = dist.all_sum(float(not skipped)) == 0  # the whole step's decision, not a rank's
    n_total = dist.all_sum(len(comps))  # the step's responses over every rank
    kl_live = bool(cfg.kl_coef) and not method.at_base(z)
    # a response with zero advantage and no KL gradient contributes nothing: leave it out
    keep = [[s for s in range(S) if not skipped and (adv[i, s] != 0 or kl_live)]
            for i in range(len(problems))]
    groups = [i for i in range(len(problems)) if keep[i]]
    width = [len(prompts[i * S]) + sum(len(comps[i * S + s].tokens) for s in keep[i])
             for i in groups]                                            # a problem's packed row
    for micro in micro_batches(width, max(1, cfg.micro_batch // S), cfg.micro_tokens):
        idx = [groups[m] for m in micro]
        samples = [[comps[i * S + s].tokens for s in keep[i]] for i in idx]
        loss, p = reinforce_loss(model, z, [prompts[i * S] for i in idx], samples,
                                 torch.cat([adv[i, keep[i]] for i in idx]),
                                 cfg.kl_coef if kl_live else 0.0, n_total, tokenizer.pad_id,
                                 cfg.temperature, method)
        loss.backward()
        parts = {k: parts[k] + p[k] for k in parts}
    base_mode(model)
    update = dist.all_sum(len(groups)) > 0
    if dist.world() > 1:  # every rank adds its part of the gradient (0 where it had no group)
        for v in z.values():
            v.grad = torch.zeros_like(v) if v.grad is None else v.grad
        dist.all_sum_([v.grad for v in z.values()])
        rewards, drawn, parts, problems = gathered(rewards, drawn, parts, problems, S)
    grad_norm = torch.nn.utils.clip_grad_norm_(list(z.values()), cfg.clip).item() if update else 0.0
    t3 = time.perf_counter()
    if update:
        opt.step()
    n_tokens = int(dist.all_sum(sum(len(c.tokens) for c in comps)))
    any_group = len(rewards) > 0
    agree = (rewards.std(1) == 0).float() if any_group else torch.ones(1)
    return {"reward": rewards.mean().item() if any_group else None,  # of the groups trained on
            "accuracy": (rewards > 0).float().mean().item() if any_group else None,
            "drawn_accuracy": (drawn > 0).float().mean().item(), **parts,  # of every sample drawn
            "grad_norm": grad_norm, "skipped": skipped, "z_dev": method.distance(z),
            "agree_share": agree.mean().item(),         # groups whose samples all agree
            "drawn": len(drawn), "groups": len(problems),
            "informative_share": int((drawn.std(1) > 0).sum()) / len(drawn),
            "tokens": n_tokens, "rollout_tok_s": n_tokens / (t1 - t0), "t_rollout": t1 - t0,
            "t_score": t2 - t1, "t_backward": t3 - t2, "t_step": time.perf_counter() - t0}


def gathered(rewards, drawn, parts, problems, S: int):
    """The step's rewards, loss parts and groups over every rank, for the log."""
    rows = lambda t: torch.stack(r) if (r := dist.gather(list(t))) else torch.zeros(0, S)
    return (rows(rewards), rows(drawn), {k: dist.all_sum(v) for k, v in parts.items()},
            dist.gather(problems))
