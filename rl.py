"""Training SVF experts with REINFORCE and a KL penalty (paper section 3.1).

The objective, for prompts x and responses y sampled from the adapted model pi_z:

    J(z) = E[ log pi_z(y|x) * A(x, y) ] - lambda * KL(pi_z || pi_base)

A is the reward r = +1 (correct) / -1 (wrong), optionally minus a baseline computed from
the other samples of the same prompt (the paper uses none; see PAPER.md section 6).
The KL is exact: both models' full next-token distributions on every response token.

One step (train_step): rollout -> score -> advantages -> log-probs and KL with
gradients in z -> AdamW. train() adds validation, best-expert selection, logging and
an exactly resumable checkpoint.
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
import svf
from model import Transformer, generate_all, left_pad


@dataclass
class TrainConfig:
    task: str = "gsm8k"
    targets: str = "mlp"           # which matrices get a z: mlp, attn or all
    steps: int = 100               # optimiser steps
    batch_size: int = 8            # prompts per step
    samples: int = 4               # responses sampled per prompt
    temperature: float = 0.7       # rollout sampling temperature (validation is greedy)
    top_p: float = 1.0
    max_new_tokens: int = 0        # 0: the task's own default
    lr: float = 2e-3
    cosine: bool = False           # cosine-decay the learning rate to 0 over `steps`
    kl_coef: float = 0.1           # lambda; the paper picks from {0, 0.1, 0.2, 0.3}
    baseline: str = "loo"          # none (paper), mean (group mean) or loo (leave-one-out, RLOO)
    rollout: str = "generate"      # generate (the paper) or options: multiple choice, act by option likelihood
    clip: float = 1.0              # gradient-norm clipping
    micro_batch: int = 8           # sequences per forward/backward (gradient accumulation)
    gen_batch: int = 32            # sequences per generation batch
    eval_every: int = 10           # validate every N steps (and at the end)
    val_limit: int = 100           # validation problems (0: all)
    seed: int = 0


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


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Left-padded prompt+response rows, their pad counts, and a mask of response tokens.

    Rows end together, so the responses occupy the last R slots: tokens (B, L), pad (B,),
    targets (B, R) the response tokens right-aligned, mask (B, R) True where a token is real.
    """
    tokens, pad = left_pad([p + r for p, r in zip(prompts, responses)], pad_id, "cpu")
    R = max(len(r) for r in responses)
    targets = tokens[:, -R:]
    mask = torch.tensor([[j >= R - len(r) for j in range(R)] for r in responses])
    return tokens, pad, targets, mask


def response_logits(model: Transformer, tokens, pad, R: int) -> torch.Tensor:
    """Logits that predict the last R tokens of each row: (B, R, vocab)."""
    dev = model.tok_embeddings.weight.device
    return model(tokens.to(dev), pad.to(dev), last=R + 1)[:, :-1]


def exact_kl(logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """KL(pi_z || pi_base) per token, summed over the whole vocabulary: (B, R).

    This direction penalises the adapted model for putting mass where the base model puts
    little (the official code computes KL(pi_base || pi_z), the reverse).
    """
    logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(base_logits, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def reinforce_loss(model: Transformer, z: dict, tokens, pad, targets, mask, adv: torch.Tensor,
                   kl_coef: float, n_total: int) -> tuple[torch.Tensor, dict]:
    """-sum_i A_i * log pi_z(y_i|x_i) / N  +  lambda * (mean KL per response token) for one micro-batch.

    The sequence log-prob is the sum over its tokens (the plain REINFORCE estimator). Dividing by
    n_total (all sequences of the step) makes accumulated micro-batch gradients equal one big batch.
    """
    dev = model.tok_embeddings.weight.device
    targets, mask, adv = targets.to(dev), mask.to(dev), adv.to(dev)
    R = targets.shape[1]
    kl = torch.zeros((), device=dev)
    if kl_coef:
        svf.train_z(model, None)  # the base model pi_base: z = 1, no gradients
        with torch.no_grad():
            base_logits = response_logits(model, tokens, pad, R)
    svf.train_z(model, z)
    logits = response_logits(model, tokens, pad, R)
    token_logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1) * mask
    pg = -(adv * token_logp.sum(1)).sum() / n_total
    if kl_coef:
        kl_tok = exact_kl(logits, base_logits) * mask
        kl = (kl_tok.sum(1) / mask.sum(1).clamp(min=1)).sum() / n_total  # mean per token, mean over sequences
    return pg + kl_coef * kl, {"pg": pg.item(), "kl": kl.item()}


# ----------------------------------------------------------------------------- one step
def rollout(model, tokenizer, task, problems, cfg: TrainConfig, z, generator):
    """Sample cfg.samples responses per problem with the current expert (composed once, no grad)."""
    svf.use_expert(model, {n: v.detach() for n, v in z.items()})
    prompts = [tokenizer.encode_chat(task.messages(p)) for p in problems for _ in range(cfg.samples)]
    comps = generate_all(model, tokenizer, prompts, cfg.gen_batch, desc="rollout",
                         max_new_tokens=cfg.max_new_tokens or task.max_new_tokens, temperature=cfg.temperature,
                         top_p=cfg.top_p, stop_strings=tuple(task.stop), generator=generator)
    svf.use_expert(model, None)
    return prompts, comps


def train_step(model, tokenizer, task, problems, z, opt, cfg: TrainConfig, generator) -> dict:
    t0 = time.perf_counter()
    prompts, comps = rollout(model, tokenizer, task, problems, cfg, z, generator)
    t1 = time.perf_counter()
    repeated = [p for p in problems for _ in range(cfg.samples)]
    correct = task.score_many(repeated, [c.text for c in comps])
    rewards = torch.tensor(correct, dtype=torch.float32) * 2 - 1                       # +1 / -1
    adv = advantages(rewards.view(len(problems), cfg.samples), cfg.baseline).flatten()
    t2 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    parts = {"pg": 0.0, "kl": 0.0}
    keep = [i for i in range(len(comps)) if adv[i] != 0 or cfg.kl_coef]  # zero advantage, no KL: no gradient
    for i in range(0, len(keep), cfg.micro_batch):
        idx = keep[i:i + cfg.micro_batch]
        tokens, pad, targets, mask = pack([prompts[j] for j in idx], [comps[j].tokens for j in idx], tokenizer.pad_id)
        loss, p = reinforce_loss(model, z, tokens, pad, targets, mask, adv[idx], cfg.kl_coef, len(comps))
        loss.backward()
        parts = {k: parts[k] + p[k] for k in parts}
    svf.train_z(model, None)
    grad_norm = torch.nn.utils.clip_grad_norm_(list(z.values()), cfg.clip).item() if keep else 0.0
    t3 = time.perf_counter()
    if keep:
        opt.step()
    n_tokens = sum(len(c.tokens) for c in comps)
    groups = rewards.view(len(problems), cfg.samples)
    return {"reward": rewards.mean().item(), "accuracy": sum(correct) / len(correct), **parts,
            "grad_norm": grad_norm, "z_dev": max((v.detach() - 1).abs().max().item() for v in z.values()),
            "agree_share": (groups.std(1) == 0).float().mean().item(),  # prompts whose samples all agree
            "tokens": n_tokens, "rollout_tok_s": n_tokens / (t1 - t0), "t_rollout": t1 - t0,
            "t_score": t2 - t1, "t_backward": t3 - t2, "t_step": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- multiple-choice variant
# For tasks whose answer is one of a few options (ARC, the classification expert), the action can
# be the option itself: pi_z(a|x) = softmax_a(log p_z(reply_a|x) / T), with reply_a the task's
# response for option a. Free generation lets a small model collapse onto a format it can't
# leave (PAPER.md section 6); here every sample is a well-formed answer, the gradient of
# log pi_z(a|x) is exact, and so is the KL between the two option distributions.

def option_logits(model: Transformer, prompts, replies, pad_id: int, temperature: float) -> torch.Tensor:
    """log p(reply | prompt) / T for each (prompt, reply) pair: (N,), differentiable in z."""
    tokens, pad, targets, mask = pack(prompts, replies, pad_id)
    logits = response_logits(model, tokens, pad, targets.shape[1])
    dev = logits.device
    logp = torch.log_softmax(logits, -1).gather(-1, targets.to(dev)[..., None]).squeeze(-1)
    return (logp * mask.to(dev)).sum(1) / temperature


def option_policy(tokenizer, task, problem: dict) -> tuple[list[int], list[list[int]]]:
    """The prompt's tokens and the tokens of each option's response."""
    return tokenizer.encode_chat(task.messages(problem)), [tokenizer.encode(r) for r in task.option_responses(problem)]


def option_step(model, tokenizer, task, problems, z, opt, cfg: TrainConfig, generator) -> dict:
    """One step of the multiple-choice variant: per problem one forward over all its options,
    cfg.samples actions sampled from pi_z, loss -A log pi_z(a|x) + lambda KL(pi_z || pi_base)."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    rewards_all, parts = [], {"pg": 0.0, "kl": 0.0}
    T = max(cfg.temperature, 1e-3)
    per_micro = max(1, cfg.micro_batch // len(task.option_responses(problems[0])))  # problems per micro-batch
    for i in range(0, len(problems), per_micro):
        group = problems[i:i + per_micro]
        pairs = [option_policy(tokenizer, task, p) for p in group]
        prompts = [pr for pr, replies in pairs for _ in replies]
        replies = [r for _, rs in pairs for r in rs]
        sizes = [len(rs) for _, rs in pairs]
        with torch.no_grad():
            svf.train_z(model, None)
            base = option_logits(model, prompts, replies, tokenizer.pad_id, T).split(sizes)
        svf.train_z(model, z)
        logits = option_logits(model, prompts, replies, tokenizer.pad_id, T).split(sizes)
        loss = 0.0
        for p, lz, lb in zip(group, logits, base):
            logpi = torch.log_softmax(lz, -1)
            actions = torch.multinomial(logpi.detach().exp(), cfg.samples, replacement=True, generator=generator)
            responses = task.option_responses(p)
            r = torch.tensor([task.score(p, responses[a]) for a in actions.tolist()], dtype=torch.float32) * 2 - 1
            adv = advantages(r[None], cfg.baseline)[0].to(logpi.device)                    # (samples,)
            kl = (logpi.exp() * (logpi - torch.log_softmax(lb, -1))).sum()
            pg = -(adv * logpi[actions]).sum() / (len(problems) * cfg.samples)
            loss = loss + pg + cfg.kl_coef * kl / len(problems)
            parts["pg"] += pg.item()
            parts["kl"] += kl.item() / len(problems)
            rewards_all.append(r)
        loss.backward()
    svf.train_z(model, None)
    grad_norm = torch.nn.utils.clip_grad_norm_(list(z.values()), cfg.clip).item()
    opt.step()
    rewards = torch.stack(rewards_all)
    return {"reward": rewards.mean().item(), "accuracy": (rewards > 0).float().mean().item(), **parts,
            "grad_norm": grad_norm, "z_dev": max((v.detach() - 1).abs().max().item() for v in z.values()),
            "agree_share": (rewards.std(1) == 0).float().mean().item(), "t_step": time.perf_counter() - t0}


def option_accuracy(model, tokenizer, task, problems, z) -> float:
    """Validation of the variant: the option with the highest likelihood under z is the answer."""
    svf.use_expert(model, None if z is None else {n: v.detach() for n, v in z.items()})
    hits = 0
    with torch.no_grad():
        for p in problems:
            prompt, replies = option_policy(tokenizer, task, p)
            best = int(option_logits(model, [prompt] * len(replies), replies, tokenizer.pad_id, 1.0).argmax())
            hits += task.score(p, task.option_responses(p)[best])
    svf.use_expert(model, None)
    return hits / len(problems)


def batch_for_step(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the problems of a step: a seeded permutation per epoch, so no state is needed to resume."""
    per_epoch = max(n // batch_size, 1)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[k * batch_size:(k + 1) * batch_size].tolist()


def validate(model, tokenizer, task, problems, z, batch: int) -> float:
    """Greedy accuracy of expert z on the validation problems."""
    svf.use_expert(model, None if z is None else {n: v.detach() for n, v in z.items()})
    prompts = [tokenizer.encode_chat(task.messages(p)) for p in problems]
    comps = generate_all(model, tokenizer, prompts, batch, desc="validate",
                         max_new_tokens=task.max_new_tokens, stop_strings=tuple(task.stop))
    svf.use_expert(model, None)
    return sum(task.score_many(problems, [c.text for c in comps])) / len(problems)


# ----------------------------------------------------------------------------- the loop
def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)  # a crash mid-write leaves the previous checkpoint intact


def train(model: Transformer, tokenizer, cfg: TrainConfig, out: Path, resume: bool = False, log=print,
          task=None, train_set: list[dict] | None = None, val_set: list[dict] | None = None) -> svf.Expert:
    """Train an expert for cfg.task; writes out/{best,last}.safetensors, state.pt and log.jsonl.

    task, train_set and val_set default to data.TASKS[cfg.task] and its train/validation splits;
    the classification expert (adapt.py) passes its own.
    """
    from tqdm import tqdm
    task = task or data.TASKS[cfg.task]
    train_set = train_set if train_set is not None else data.load(cfg.task, "train")
    val_set = val_set if val_set is not None else data.load(cfg.task, "validation")
    val_set = val_set[:cfg.val_limit] if cfg.val_limit else val_set
    svd = svf.decompose(model, cfg.targets)
    svf.attach(model, svd)
    meta = {"base_model": svf.model_fingerprint(model), "targets": cfg.targets, "task": cfg.task,
            "parametrisation": "plain z, W' = U diag(s*z) V^T", "config": asdict(cfg)}
    z = {n: torch.nn.Parameter(v) for n, v in svf.ones(model).items()}
    opt = torch.optim.AdamW(z.values(), lr=cfg.lr, weight_decay=0.0)  # decay would pull z towards 0, not 1
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)) if cfg.cosine else 1.0)
    gen = torch.Generator(model.tok_embeddings.weight.device).manual_seed(cfg.seed)
    start, best = 0, -1.0
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.pt"
    if resume and state_path.exists():
        st = torch.load(state_path, weights_only=True)
        with torch.no_grad():
            for n in z:
                z[n].copy_(st["z"][n])
        opt.load_state_dict(st["opt"]), sched.load_state_dict(st["sched"]), gen.set_state(st["gen"])
        start, best = st["step"], st["best"]
        log(f"resumed from step {start} (best validation accuracy {best:.3f})")
    elif resume:
        log(f"nothing to resume in {out}: starting fresh")
    log_path = out / "log.jsonl"  # keep only the records of steps the checkpoint holds
    kept = [l for l in log_path.read_text().splitlines() if json.loads(l)["step"] <= start] if log_path.exists() else []
    log_path.write_text("".join(l + "\n" for l in kept))

    def checkpoint(step: int) -> None:
        save_atomic({"z": {n: v.detach() for n, v in z.items()}, "opt": opt.state_dict(), "sched": sched.state_dict(),
                     "gen": gen.get_state(), "step": step, "best": best}, state_path)
        svf.Expert({n: v.detach() for n, v in z.items()}, {**meta, "step": step}).save(out / "last.safetensors")

    if cfg.rollout not in ("generate", "options"):
        raise ValueError(f"unknown rollout {cfg.rollout!r}: choose generate or options")
    if cfg.rollout == "options" and not hasattr(task, "option_responses"):
        raise ValueError(f"task {cfg.task!r} has no options: --rollout options is for multiple-choice tasks")
    step_fn = train_step if cfg.rollout == "generate" else option_step
    val_fn = (lambda m, t, k, ps, z: validate(m, t, k, ps, z, cfg.gen_batch)) if cfg.rollout == "generate" \
        else option_accuracy
    if start == 0 and cfg.eval_every:
        best = val_fn(model, tokenizer, task, val_set, None)
        log(f"step 0 (base model): validation accuracy {best:.3f} on {len(val_set)} problems")
        svf.Expert(svf.ones(model), {**meta, "step": 0, "val_accuracy": best}).save(out / "best.safetensors")
    stop = {"asked": False}

    def on_sigint(signum, frame):  # first Ctrl-C: finish the step, save, exit; second: exit now
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        log("\nCtrl-C: finishing this step and saving a checkpoint (press again to quit at once)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {cfg.task}")
        for step in bar:
            problems = [train_set[i] for i in batch_for_step(len(train_set), step, cfg.batch_size, cfg.seed)]
            stats = step_fn(model, tokenizer, task, problems, z, opt, cfg, gen)
            sched.step()
            record = {"step": step + 1, "lr": sched.get_last_lr()[0], **stats}
            if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                record["val_accuracy"] = val_fn(model, tokenizer, task, val_set, z)
                if record["val_accuracy"] > best:
                    best = record["val_accuracy"]
                    svf.Expert({n: v.detach() for n, v in z.items()},
                               {**meta, "step": step + 1, "val_accuracy": best}).save(out / "best.safetensors")
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(reward=f"{stats['reward']:+.2f}", acc=f"{stats['accuracy']:.2f}",
                            val=f"{record.get('val_accuracy', best):.2f}")
            checkpoint(step + 1)
            if stop["asked"]:
                log(f"saved a checkpoint at step {step + 1} in {out}; continue with --resume")
                raise SystemExit(130)
    finally:
        signal.signal(signal.SIGINT, previous)
    return svf.Expert.load(out / "best.safetensors")
