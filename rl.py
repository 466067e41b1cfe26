"""Training SVF experts with REINFORCE and a KL penalty (paper section 3.1).

The objective, for prompts x and responses y sampled from the adapted model pi_z:

    J(z) = E[ log pi_z(y|x) * A(x, y) ] - lambda * KL(pi_z || pi_base)

A is the reward r = +1 (correct) / -1 (wrong), optionally minus a baseline computed from
the other samples of the same prompt (the paper uses none; see PAPER.md section 6).
pi_z is the policy that samples: softmax(logits / T) at the rollout temperature T, so the
log-probs are scored at T too (at T = 1 the score function would be another policy's, and the
gradient biased). Both terms are sums over a response's tokens, as in the paper's sequence-level
objective: log pi_z(y|x) = sum_t log pi_z(y_t|...), and the KL of the two sequence distributions
estimated on the sampled y by sum_t KL_t, each KL_t exact over the vocabulary between
softmax(logits_z / T) and softmax(logits_base / T). Both are averaged over the step's responses,
so lambda means what it means in the paper.

One step (train_step): rollout -> score -> advantages -> log-probs and KL with
gradients in z -> AdamW. train() adds validation, best-expert selection, logging and
an exactly resumable checkpoint.

The same loop trains the paper's baseline for comparison: a LoRA adapter (lora.py) instead of z
(--method lora), by next-token prediction on the reference responses (sft_step, --objective sft,
the paper's baseline) or by the same REINFORCE objective.
"""
from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import data
import lora
import svf
from engine import generate_all
from model import Transformer
from replies import option_logits, reply_logits, reply_logprobs


@dataclass
class TrainConfig:
    task: str = "gsm8k"
    method: str = "svf"            # svf (the paper's experts) or lora (the baseline it compares against)
    objective: str = "reinforce"   # reinforce (+ KL; the paper's SVF training) or sft (next-token prediction
                                   # on the task's reference responses; the paper's LoRA training)
    targets: str = "mlp"           # svf: which matrices get a z: mlp, attn or all
    lora_rank: int = 16            # lora: the paper's baseline is rank 16, alpha 32, dropout 0.05 on q and v
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: str = "qv"
    steps: int = 100               # optimiser steps
    batch_size: int = 8            # prompts per step
    samples: int = 4               # responses sampled per prompt
    temperature: float = 0.7       # rollout sampling temperature, > 0 (validation is greedy); the policy scored
    top_p: float = 1.0
    max_new_tokens: int = 0        # 0: the task's own default
    lr: float = 2e-3
    cosine: bool = False           # cosine-decay the learning rate to 0 over `steps`
    kl_coef: float = 0.1           # lambda on the sequence KL (summed over tokens), as the paper's {0, 0.1, 0.2, 0.3}
    baseline: str = "loo"          # none (paper), mean (group mean) or loo (leave-one-out, RLOO)
    rollout: str = "generate"      # generate (the paper) or options: multiple choice, act by option likelihood
    validation: str = "generate"   # generate: greedy answers, as eval.py reads them; options: the likeliest option
    clip: float = 1.0              # gradient-norm clipping
    micro_batch: int = 8           # sequences per forward/backward (gradient accumulation)
    micro_tokens: int = 4096       # and at most this many padded tokens (rows x longest row) in one: a
                                   # backward pass keeps ~1.4 MB per token on SmolLM2-135M (a longer row goes alone)
    gen_batch: int = 32            # sequences per generation batch
    dynamic_draws: int = 0         # dynamic sampling (DAPO): draw up to this many problems a step until batch_size
                                   # of them have rewards that differ, and train on those (0: off, every group)
    eval_every: int = 10           # validate every N steps (and at the end)
    val_limit: int = 100           # validation problems (0: all)
    seed: int = 0


# ----------------------------------------------------------------------------- the adapted weights
# The trainer adapts the model in one of two modes: training (the adapted weights are recomputed in
# every forward pass, so gradients reach the trainable tensors) and answering (composed once, no
# gradients). The tensors say which method they belong to: SVF's are one z per matrix (svf.py),
# LoRA's are A/B pairs (lora.py). None is the base model.

def is_lora(params: dict | None) -> bool:
    return params is not None and next(iter(params)).endswith((".A", ".B"))


def distance_from_base(params: dict) -> float:
    """How far the trainable tensors are from the base model, for the log: max |z - 1| for SVF,
    max |B| for LoRA (B = 0 is the base model whatever A is)."""
    if is_lora(params):
        return max(v.detach().abs().max().item() for n, v in params.items() if n.endswith(".B"))
    return max((v.detach() - 1).abs().max().item() for v in params.values())


def train_mode(model: Transformer, params: dict | None, generator: torch.Generator | None = None) -> None:
    """Differentiable forward passes with params; LoRA's dropout draws its masks from generator."""
    if params is None:
        svf.train_z(model, None)
        lora.train_ab(model, None)
    elif is_lora(params):
        lora.train_ab(model, params, generator)
    else:
        svf.train_z(model, params)


def answer_mode(model: Transformer, params: dict | None) -> None:
    """Answer (generate, validate) with params, composed once and without gradients."""
    if params is None:
        svf.use_expert(model, None)
        lora.use_adapter(model, None)
        return
    detached = {n: v.detach() for n, v in params.items()}
    (lora.use_adapter if is_lora(params) else svf.use_expert)(model, detached)


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


def at_base(params: dict) -> bool:
    """True when the trainable tensors are exactly the base model: z = 1 (SVF), B = 0 (LoRA)."""
    if is_lora(params):
        return all(bool((v == 0).all()) for n, v in params.items() if n.endswith(".B"))
    return all(bool((v == 1).all()) for v in params.values())


def skip_update(adv: torch.Tensor, kl_coef: float, params: dict) -> bool:
    """True when no term of the loss has a gradient: no advantage is non-zero, and the KL term is
    off or at its minimum (the tensors are the base model's, where the KL and its gradient are 0).
    Otherwise the KL term alone still pulls z back towards the base model, as lambda says."""
    return not bool((adv != 0).any()) and (not kl_coef or at_base(params))


def set_lr(opt: torch.optim.Optimizer, cfg: "TrainConfig", step: int) -> float:
    """The learning rate of a step: constant, or cosine-decayed to 0 over cfg.steps. Set directly
    (no scheduler object: a step that makes no update must not shift the schedule or warn)."""
    lr = cfg.lr * (0.5 * (1 + math.cos(math.pi * step / cfg.steps)) if cfg.cosine else 1.0)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def exact_kl(logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """KL(pi_z || pi_base) per token, summed over the whole vocabulary: (B, R).

    This direction penalises the adapted model for putting mass where the base model puts
    little (the official code computes KL(pi_base || pi_z), the reverse).
    """
    logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(base_logits, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def reinforce_loss(model: Transformer, z: dict, prompts: list[list[int]], samples: list[list[list[int]]],
                   adv: torch.Tensor, kl_coef: float, n_total: int, pad_id: int,
                   temperature: float = 1.0) -> tuple[torch.Tensor, dict]:
    """(-sum_i A_i log pi_z(y_i|x_i) + lambda sum_i sum_t KL_it) / N for one micro-batch.

    prompts: one per problem; samples: the responses of each (token lists); adv: one advantage per
    response, in the same order. pi_z = softmax(logits / temperature), the policy that sampled;
    both terms are sums over a response's tokens (see the module docstring). Dividing by n_total
    (all responses of the step) makes accumulated micro-batch gradients equal one big batch. Each
    prompt is computed once for all its samples (replies.reply_logits packs them into one row).
    LoRA's dropout is off: the scored network must be the one that sampled.
    """
    if temperature <= 0:
        raise ValueError("REINFORCE needs a sampling temperature > 0: a greedy rollout has no score function")
    if kl_coef:
        train_mode(model, None)  # the base model pi_base: z = 1, no gradients
        with torch.no_grad():
            base_logits = reply_logits(model, prompts, samples, pad_id)[0] / temperature
    train_mode(model, z)
    logits, targets, which = reply_logits(model, prompts, samples, pad_id)          # (N, vocab), (N,), (N,)
    logits = logits / temperature
    dev = logits.device
    n = sum(len(s) for s in samples)
    per_response = lambda per_token: torch.zeros(n, dtype=per_token.dtype, device=dev).index_add(0, which, per_token)
    token_logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    pg = -(adv.to(dev) * per_response(token_logp)).sum() / n_total
    kl = torch.zeros((), device=dev)
    if kl_coef:
        kl = exact_kl(logits, base_logits).sum() / n_total                        # summed over tokens, as pg
    return pg + kl_coef * kl, {"pg": pg.item(), "kl": kl.item()}


# ----------------------------------------------------------------------------- one step
def rollout(model, tokenizer, task, problems, cfg: TrainConfig, z, generator):
    """Sample cfg.samples responses per problem with the current expert (composed once, no grad)."""
    answer_mode(model, z)
    prompts = [tokenizer.encode_chat(task.messages(p)) for p in problems for _ in range(cfg.samples)]
    comps = generate_all(model, tokenizer, prompts, cfg.gen_batch, desc="rollout",
                         max_new_tokens=cfg.max_new_tokens or task.max_new_tokens, temperature=cfg.temperature,
                         top_p=cfg.top_p, stop_strings=tuple(task.stop), generator=generator, refill=True)
    answer_mode(model, None)
    return prompts, comps


def micro_batches(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped for forward/backward passes: rows of similar length together, at most max_rows
    rows and max_tokens padded tokens (rows x the longest) in each, so that memory stays bounded
    when one prompt is long (an MBPP prompt with its test data runs to 1,800 tokens)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):    # longest first: it sets the width
        g = groups[-1] if groups else None
        if g and len(g) < max_rows and (len(g) + 1) * lengths[g[0]] <= max_tokens:
            g.append(i)
        else:
            groups.append([i])
    return groups


def sample_groups(model, tokenizer, task, problems, cfg: TrainConfig, z, generator, more=None):
    """Roll out and score cfg.samples responses per problem: (problems, prompts, completions, rewards
    (problems, samples)) of the groups to train on, and the rewards of every problem drawn
    (drawn, samples). Dynamic sampling (DAPO; cfg.dynamic_draws > 0 and more() gives the next
    problems): draw more until cfg.batch_size groups have rewards that differ or dynamic_draws
    problems are drawn, and keep the informative groups only (a group whose rewards agree has no
    advantage under a baseline). Rare rewards need it: at 3% pass@1, 4 samples rarely disagree."""
    dynamic, S, rows = bool(cfg.dynamic_draws and more is not None), cfg.samples, []
    while True:
        prompts, comps = rollout(model, tokenizer, task, problems, cfg, z, generator)
        repeated = [p for p in problems for _ in range(S)]
        correct = task.score_many(repeated, [c.text for c in comps])
        rewards = (torch.tensor(correct, dtype=torch.float32) * 2 - 1).view(len(problems), S)   # +1 / -1
        rows += [(p, prompts[i * S:(i + 1) * S], comps[i * S:(i + 1) * S], rewards[i]) for i, p in enumerate(problems)]
        informative = [r for r in rows if r[3].std() > 0]
        if not dynamic or len(informative) >= cfg.batch_size or len(rows) >= cfg.dynamic_draws:
            break
        problems = more()[:cfg.dynamic_draws - len(rows)]
    drawn = torch.stack([r[3] for r in rows])
    rows = informative[:cfg.batch_size] if dynamic else rows
    rewards = torch.stack([r[3] for r in rows]) if rows else torch.zeros(0, S)
    return ([r[0] for r in rows], [q for r in rows for q in r[1]], [c for r in rows for c in r[2]], rewards, drawn)


def train_step(model, tokenizer, task, problems, z, opt, cfg: TrainConfig, generator, more=None) -> dict:
    """One step: rollout (with dynamic sampling when more() is given), advantages, loss, AdamW."""
    t0 = time.perf_counter()
    problems, prompts, comps, rewards, drawn = sample_groups(model, tokenizer, task, problems, cfg, z, generator, more)
    t1 = time.perf_counter()
    adv = advantages(rewards, cfg.baseline)                                             # (problems, samples)
    t2 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    parts = {"pg": 0.0, "kl": 0.0}
    # No term with a gradient (no advantage, and the KL off or at the base model): no update at all,
    # rather than AdamW scaling rounding noise up to a step of about lr (skip_update).
    skipped = skip_update(adv, cfg.kl_coef, z) or not len(problems)  # dynamic sampling may find no group
    kl_live = bool(cfg.kl_coef) and not at_base(z)
    # a response with zero advantage and no KL gradient contributes nothing: leave it out
    keep = [[s for s in range(cfg.samples) if not skipped and (adv[i, s] != 0 or kl_live)]
            for i in range(len(problems))]
    groups = [i for i in range(len(problems)) if keep[i]]
    per_micro = max(1, cfg.micro_batch // cfg.samples)                                  # problems per micro-batch
    width = [len(prompts[i * cfg.samples]) + sum(len(comps[i * cfg.samples + s].tokens) for s in keep[i])
             for i in groups]                                                # a problem's packed row
    for micro in micro_batches(width, per_micro, cfg.micro_tokens):
        idx = [groups[m] for m in micro]
        samples = [[comps[i * cfg.samples + s].tokens for s in keep[i]] for i in idx]
        loss, p = reinforce_loss(model, z, [prompts[i * cfg.samples] for i in idx], samples,
                                 torch.cat([adv[i, keep[i]] for i in idx]), cfg.kl_coef if kl_live else 0.0,
                                 len(comps), tokenizer.pad_id, cfg.temperature)
        loss.backward()
        parts = {k: parts[k] + p[k] for k in parts}
    train_mode(model, None)
    grad_norm = torch.nn.utils.clip_grad_norm_(list(z.values()), cfg.clip).item() if groups else 0.0
    t3 = time.perf_counter()
    if groups:
        opt.step()
    n_tokens = sum(len(c.tokens) for c in comps)
    agree = (rewards.std(1) == 0).float() if len(rewards) else torch.ones(1)
    return {"reward": rewards.mean().item() if len(rewards) else None,       # of the groups trained on (None: none)
            "accuracy": (rewards > 0).float().mean().item() if len(rewards) else None,
            "drawn_accuracy": (drawn > 0).float().mean().item(), **parts,       # of every sample drawn
            "grad_norm": grad_norm, "skipped": skipped, "z_dev": distance_from_base(z),
            "agree_share": agree.mean().item(),                                 # groups whose samples all agree
            "drawn": len(drawn), "groups": len(problems),
            "informative_share": int((drawn.std(1) > 0).sum()) / len(drawn),  # problems drawn whose rewards differ
            "tokens": n_tokens, "rollout_tok_s": n_tokens / (t1 - t0), "t_rollout": t1 - t0,
            "t_score": t2 - t1, "t_backward": t3 - t2, "t_step": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- multiple-choice variant
# For tasks whose answer is one of a few options (ARC, the classification expert), the action can
# be the option itself: pi_z(a|x) = softmax_a(log p_z(reply_a|x) / T), with reply_a the task's
# response for option a. Free generation lets a small model collapse onto a format it can't
# leave (PAPER.md section 6); here every sample is a well-formed answer, the gradient of
# log pi_z(a|x) is exact, and so is the KL between the two option distributions.

def option_step(model, tokenizer, task, problems, z, opt, cfg: TrainConfig, generator, more=None) -> dict:
    """One step of the multiple-choice variant: cfg.samples actions per problem sampled from pi_z,
    loss -A log pi_z(a|x) + lambda KL(pi_z || pi_base); cfg.micro_batch problems per forward pass."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    rewards_all, advs, parts = [], [], {"pg": 0.0, "kl": 0.0}
    T = max(cfg.temperature, 1e-3)
    for i in range(0, len(problems), cfg.micro_batch):
        group = problems[i:i + cfg.micro_batch]
        with torch.no_grad():
            train_mode(model, None)
            base = option_logits(model, tokenizer, task, group, T)
        train_mode(model, z)  # no LoRA dropout: the scored policy is the one that samples
        logits = option_logits(model, tokenizer, task, group, T)
        loss = 0.0
        for p, lz, lb in zip(group, logits, base):
            logpi = torch.log_softmax(lz, -1)
            actions = torch.multinomial(logpi.detach().exp(), cfg.samples, replacement=True, generator=generator)
            responses = task.option_responses(p)
            r = torch.tensor([task.score(p, responses[a]) for a in actions.tolist()], dtype=torch.float32) * 2 - 1
            adv = advantages(r[None], cfg.baseline)[0].to(logpi.device)                    # (samples,)
            advs.append(adv)
            kl = (logpi.exp() * (logpi - torch.log_softmax(lb, -1))).sum()
            pg = -(adv * logpi[actions]).sum() / (len(problems) * cfg.samples)
            loss = loss + pg + cfg.kl_coef * kl / len(problems)
            parts["pg"] += pg.item()
            parts["kl"] += kl.item() / len(problems)
            rewards_all.append(r)
        loss.backward()
    train_mode(model, None)
    skipped = skip_update(torch.cat(advs), cfg.kl_coef, z)  # no term with a gradient: no update, as in train_step
    grad_norm = 0.0 if skipped else torch.nn.utils.clip_grad_norm_(list(z.values()), cfg.clip).item()
    if not skipped:
        opt.step()
    opt.zero_grad(set_to_none=True)
    rewards = torch.stack(rewards_all)
    return {"reward": rewards.mean().item(), "accuracy": (rewards > 0).float().mean().item(), **parts,
            "grad_norm": grad_norm, "skipped": skipped,
            "z_dev": distance_from_base(z),
            "agree_share": (rewards.std(1) == 0).float().mean().item(), "t_step": time.perf_counter() - t0}


def option_accuracy(model, tokenizer, task, problems, z, batch: int = 16) -> float:
    """Validation of the variant: the option with the highest likelihood under z is the answer."""
    answer_mode(model, z)
    hits = 0
    with torch.no_grad():
        for i in range(0, len(problems), batch):
            group = problems[i:i + batch]
            for p, lp in zip(group, option_logits(model, tokenizer, task, group, 1.0)):
                hits += task.score(p, task.option_responses(p)[int(lp.argmax())])
    answer_mode(model, None)
    return hits / len(problems)


# ----------------------------------------------------------------------------- supervised variant
# The paper's LoRA baseline learns by next-token prediction on the tasks' reference responses
# (GSM8K solutions, MBPP code, ARC answers) instead of by reward.

def reference_tokens(tokenizer, task, problem: dict, end: list[int]) -> tuple[list[int], list[int]]:
    """The prompt's tokens and the reference response's, closed by the end-of-turn token `end`."""
    return tokenizer.encode_chat(task.messages(problem)), tokenizer.encode(task.reference_response(problem)) + end


def sft_step(model, tokenizer, task, problems, params, opt, cfg: TrainConfig, generator, more=None) -> dict:
    """One step of loss = mean over all reference tokens of -log p(y_t | x, y_<t), in micro-batches
    (each divided by the step's token count, so the accumulated gradient is that of one big batch)."""
    t0 = time.perf_counter()
    end = sorted(tokenizer.end_of_turn_ids())[:1] or [tokenizer.eos_id]  # so the model learns to stop
    pairs = [reference_tokens(tokenizer, task, p, end) for p in problems]
    n_tokens = sum(len(r) for _, r in pairs)
    opt.zero_grad(set_to_none=True)
    train_mode(model, params, generator)
    loss_sum = 0.0
    for micro in micro_batches([len(p) + len(r) for p, r in pairs], cfg.micro_batch, cfg.micro_tokens):
        prompts, responses = zip(*[pairs[i] for i in micro])
        logp = reply_logprobs(model, list(prompts), [[r] for r in responses], tokenizer.pad_id)  # [(1,), ...]
        loss = -torch.cat(logp).sum() / n_tokens
        loss.backward()
        loss_sum += loss.item()
    train_mode(model, None)
    grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.clip).item()
    opt.step()
    return {"loss": loss_sum, "tokens": n_tokens, "grad_norm": grad_norm, "t_step": time.perf_counter() - t0}


def batch_for_step(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the problems of a step: a seeded permutation per epoch, so no state is needed to resume."""
    per_epoch = max(n // batch_size, 1)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[k * batch_size:(k + 1) * batch_size].tolist()


def validate(model, tokenizer, task, problems, z, batch: int, max_new_tokens: int = 0) -> float:
    """Greedy accuracy of expert z on the validation problems (max_new_tokens 0: the task's own)."""
    answer_mode(model, z)
    prompts = [tokenizer.encode_chat(task.messages(p)) for p in problems]
    comps = generate_all(model, tokenizer, prompts, batch, desc="validate",
                         max_new_tokens=max_new_tokens or task.max_new_tokens, stop_strings=tuple(task.stop))
    answer_mode(model, None)
    return sum(task.score_many(problems, [c.text for c in comps])) / len(problems)


# ----------------------------------------------------------------------------- the loop
def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)  # a crash mid-write leaves the previous checkpoint intact


def setup(model: Transformer, cfg: TrainConfig) -> tuple[dict, dict, type]:
    """Attach the method's wrappers; return the trainable tensors at their start (the base model
    exactly), the metadata saved with them, and the file class (svf.Expert or lora.Adapter)."""
    meta = {"base_model": svf.model_fingerprint(model), "method": cfg.method, "task": cfg.task, "config": asdict(cfg)}
    if cfg.method == "svf":
        svf.attach(model, svf.decompose(model, cfg.targets))
        params = svf.ones(model)                                       # z = 1
        meta |= {"targets": cfg.targets, "parametrisation": "plain z, W' = U diag(s*z) V^T"}
        return {n: torch.nn.Parameter(v) for n, v in params.items()}, meta, svf.Expert
    if cfg.method == "lora":
        lcfg = lora.LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        lora.attach(model, lcfg)
        params = lora.init_params(model, cfg.seed)                     # B = 0
        meta |= {"lora": asdict(lcfg)}
        return {n: torch.nn.Parameter(v) for n, v in params.items()}, meta, lora.Adapter
    raise ValueError(f"unknown method {cfg.method!r}: choose svf or lora")


# Settings a resumed run may change: they split the same computation differently, nothing more.
RESUME_MAY_CHANGE = ("steps", "micro_batch", "micro_tokens")


def check_resume(saved: dict | None, cfg: TrainConfig, path: Path, log) -> None:
    """Refuse to resume a run under other settings (it would no longer be the run it says it is)."""
    if saved is None:
        log(f"{path} predates saved settings: cannot check that they are unchanged")
        return
    now = asdict(cfg)
    changed = [f"--{k.replace('_', '-')} {saved[k]} -> {now[k]}" for k in now
               if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
    if changed:
        raise ValueError(f"cannot resume {path} with other settings: {'; '.join(changed)} "
                         f"(only {', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_CHANGE)} may change)")


def train(model: Transformer, tokenizer, cfg: TrainConfig, out: Path, resume: bool = False, log=print,
          task=None, train_set: list[dict] | None = None, val_set: list[dict] | None = None):
    """Train an expert (or LoRA adapter) for cfg.task; writes out/{best,last}.safetensors, state.pt
    and log.jsonl, and returns the best one (an svf.Expert or a lora.Adapter).

    task, train_set and val_set default to data.TASKS[cfg.task] and its train/validation splits;
    the classification expert (adapt.py) passes its own.
    """
    from tqdm import tqdm
    task = task or data.TASKS[cfg.task]
    train_set = train_set if train_set is not None else data.load(cfg.task, "train")
    val_set = val_set if val_set is not None else data.load(cfg.task, "validation")
    val_set = val_set[:cfg.val_limit] if cfg.val_limit else val_set
    if cfg.objective not in ("reinforce", "sft"):
        raise ValueError(f"unknown objective {cfg.objective!r}: choose reinforce or sft")
    if cfg.rollout not in ("generate", "options"):
        raise ValueError(f"unknown rollout {cfg.rollout!r}: choose generate or options")
    if cfg.validation not in ("generate", "options"):
        raise ValueError(f"unknown validation {cfg.validation!r}: choose generate or options")
    if "options" in (cfg.rollout, cfg.validation) and not hasattr(task, "option_responses"):
        raise ValueError(f"task {cfg.task!r} has no options: --rollout/--validation options are for multiple choice")
    z, meta, File = setup(model, cfg)
    n_base = sum(p.numel() for p in model.parameters())
    meta["trainable"] = sum(v.numel() for v in z.values())
    what = f"SVF on '{cfg.targets}'" if cfg.method == "svf" else \
        f"LoRA rank {cfg.lora_rank} on '{cfg.lora_targets}'"
    log(f"{what}: {meta['trainable']:,} trainable numbers ({100 * meta['trainable'] / n_base:.3f}% "
        f"of the base model's {n_base:,})")
    log(f"sandbox: {data.sandbox.isolation() if task.domain == 'code' else 'not used'}")  # data/sandbox.py
    start_params = {n: v.detach().clone() for n, v in z.items()}
    # no weight decay: it would pull z towards 0 (not 1), and the paper's LoRA baseline names none
    opt = torch.optim.AdamW(z.values(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator(model.tok_embeddings.weight.device).manual_seed(cfg.seed)
    start, best, chunk = 0, -1.0, 0
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.pt"
    if resume and state_path.exists():
        st = torch.load(state_path, weights_only=True)
        if set(st["params"]) != set(z):
            raise ValueError(f"{state_path} holds another method's or targets' tensors than this configuration")
        check_resume(st.get("config"), cfg, state_path, log)
        with torch.no_grad():
            for n in z:
                z[n].copy_(st["params"][n])
        opt.load_state_dict(st["opt"]), gen.set_state(st["gen"])
        start, best = st["step"], st["best"]
        chunk = st.get("chunks", start)
        log(f"resumed from step {start} (best validation accuracy {best:.3f})")
    elif resume:
        log(f"nothing to resume in {out}: starting fresh")
    log_path = out / "log.jsonl"  # keep only the records of steps the checkpoint holds
    kept = [l for l in log_path.read_text().splitlines() if json.loads(l)["step"] <= start] \
        if start and log_path.exists() else []
    log_path.write_text("".join(l + "\n" for l in kept))

    def checkpoint(step: int) -> None:
        save_atomic({"params": {n: v.detach() for n, v in z.items()}, "opt": opt.state_dict(),
                     "gen": gen.get_state(), "step": step, "best": best, "chunks": chunk, "config": asdict(cfg)},
                    state_path)
        File({n: v.detach() for n, v in z.items()}, {**meta, "step": step}).save(out / "last.safetensors")

    step_fn = sft_step if cfg.objective == "sft" else train_step if cfg.rollout == "generate" else option_step
    val_fn = (lambda m, t, k, ps, z: validate(m, t, k, ps, z, cfg.gen_batch, cfg.max_new_tokens)) \
        if cfg.validation == "generate" \
        else option_accuracy
    def validation(params) -> dict:
        t0 = time.perf_counter()
        accuracy = val_fn(model, tokenizer, task, val_set, params)
        return {"val_accuracy": accuracy, "t_val": time.perf_counter() - t0}

    if start == 0 and cfg.eval_every:
        record = {"step": 0, **validation(None)}                         # the curve starts at the base model
        best = record["val_accuracy"]
        log(f"step 0 (base model): validation accuracy {best:.3f} on {len(val_set)} problems")
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        File(start_params, {**meta, "step": 0, "val_accuracy": best}).save(out / "best.safetensors")
    stop = {"asked": False}

    def next_problems() -> list[dict]:  # the data order: seeded chunks of batch_size, one or more a step
        nonlocal chunk
        idx = batch_for_step(len(train_set), chunk, cfg.batch_size, cfg.seed)
        chunk += 1
        return [train_set[i] for i in idx]

    def on_sigint(signum, frame):  # first Ctrl-C: finish the step, save, exit; second: exit now
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        log("\nCtrl-C: finishing this step and saving a checkpoint (press again to quit at once)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {cfg.task} ({cfg.method})")
        for step in bar:
            lr = set_lr(opt, cfg, step)
            stats = step_fn(model, tokenizer, task, next_problems(), z, opt, cfg, gen, more=next_problems)
            record = {"step": step + 1, "lr": lr, **stats}
            if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                record |= validation(z)
                if record["val_accuracy"] > best:
                    best = record["val_accuracy"]
                    File({n: v.detach() for n, v in z.items()},
                         {**meta, "step": step + 1, "val_accuracy": best}).save(out / "best.safetensors")
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            shown = {k: f"{stats[k]:+.2f}" for k in ("reward", "loss") if stats.get(k) is not None}
            bar.set_postfix(**shown, val=f"{record.get('val_accuracy', best):.2f}")
            checkpoint(step + 1)
            if stop["asked"]:
                log(f"saved a checkpoint at step {step + 1} in {out}; continue with --resume")
                raise SystemExit(130)
    finally:
        signal.signal(signal.SIGINT, previous)
    return File.load(out / ("best.safetensors" if cfg.eval_every else "last.safetensors"))
