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

Read top to bottom: the config, advantages, exact_kl, reinforce_loss, rollout with dynamic
sampling, train_step, and the loop. What is trained (SVF's z or the LoRA baseline's A and B)
is methods.py; the checkpoint and Ctrl-C are resume.py; the multiple-choice rollout is
options.py; the LoRA baseline's supervised objective is lora.sft_step.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import cli
import data
import dist
import lora
import svf
from cli import option
from engine import generate_all
from methods import METHODS, SVF, Method, answer_mode, base_mode, detached, setup
from model import Transformer
from replies import micro_batches, reply_logits
from resume import Interrupt, Run, load_checkpoint, save_checkpoint


@dataclass
class TrainConfig:
    task: str = option("gsm8k", "task to train the expert on (cls: the classification expert "
                       "of paper section 3.2)", choices=("gsm8k", "mbpp", "arc_easy", "cls"))
    method: str = option("svf", "svf: an expert vector z (the paper); lora: the LoRA baseline "
                         "it is compared against", choices=("svf", "lora"))
    objective: str = option("reinforce", "reinforce: REINFORCE + KL on the task's reward; sft: "
                            "next-token prediction on the reference responses (default: "
                            "reinforce for svf, sft for lora, as in the paper)",
                            choices=("reinforce", "sft"))
    targets: str = option("mlp", "svf: matrices that get a z vector", choices=tuple(svf.TARGETS))
    lora_rank: int = option(16, "lora: rank r (the paper's baseline: 16)", cli.positive_int)
    lora_alpha: float = option(32.0, "lora: scale alpha (delta = alpha/r B A)", cli.positive_float)
    lora_dropout: float = option(0.05, "lora: dropout on the adapter's input", cli.fraction)
    lora_targets: str = option("qv", "lora: matrices that get an adapter",
                               choices=("qv", "attn", "mlp", "all"))
    steps: int = option(100, "optimiser steps", cli.positive_int)
    batch_size: int = option(8, "prompts per step (with --dynamic-draws: groups with differing "
                             "rewards wanted per step, drawn in chunks of this many prompts)",
                             cli.positive_int)
    samples: int = option(4, "responses sampled per prompt", cli.positive_int)
    temperature: float = option(0.7, "rollout temperature (> 0); the log-probs are scored at it",
                                cli.positive_float)
    top_p: float = option(1.0, "rollout nucleus threshold", cli.probability)
    max_new_tokens: int = option(0, "tokens per rollout and validation answer (0: the task's "
                                 "answer budget)", cli.non_negative_int)
    lr: float = option(2e-3, "AdamW learning rate", cli.positive_float)
    cosine: bool = option(False, "cosine-decay the learning rate to 0 over --steps")
    kl_coef: float = option(0.1, "lambda of the KL(pi_z || pi_base) penalty on whole responses "
                            "(the per-token exact KL summed over the response)",
                            cli.non_negative_float)
    baseline: str = option("loo", "subtracted from the reward: none (paper), group mean, or "
                           "leave-one-out mean (RLOO)", choices=("none", "mean", "loo"))
    rollout: str = option("generate", "generate: sample free responses (the paper); options: "
                          "multiple-choice tasks act by sampling one option (options.py)",
                          choices=("generate", "options"))
    validation: str = option("generate", "how validation reads an answer: generate (greedy "
                             "replies, as eval.py) or options (the likeliest option; the "
                             "default for cls)", choices=("generate", "options"))
    clip: float = option(1.0, "gradient-norm clipping", cli.positive_float)
    micro_batch: int = option(8, "sequences per backward pass (with --rollout options: "
                              "problems, each packed with its options)", cli.positive_int)
    micro_tokens: int = option(4096, "at most this many padded tokens (rows x longest row) per "
                               "backward pass, which bounds memory; a longer row goes alone",
                               cli.positive_int)
    gen_batch: int = option(32, "sequences per generation batch", cli.positive_int)
    dynamic_draws: int = option(0, "dynamic sampling (DAPO): draw up to this many prompts a step "
                                "until --batch-size of them have rewards that differ, and train "
                                "on those (0: off)", cli.non_negative_int)
    eval_every: int = option(10, "validate every N steps and at the end (0: never; then only "
                             "last.safetensors)", cli.non_negative_int)
    val_limit: int = option(100, "validation problems (0: all)", cli.non_negative_int)
    seed: int = option(0, "seeds python, numpy, torch and the data order", cli.seed)


def check(cfg: TrainConfig, has_options: bool) -> None:
    """Every rule the settings must keep, in one place: ValueError naming the flag."""
    for name in ("method", "objective", "rollout", "validation", "baseline", "targets"):
        choices = TrainConfig.__dataclass_fields__[name].metadata["choices"]
        if getattr(cfg, name) not in choices:
            raise ValueError(f"unknown {name} {getattr(cfg, name)!r}: choose "
                             f"{', '.join(choices)}")
    if cfg.objective == "sft" and cfg.rollout == "options":
        raise ValueError("--rollout options is a way of sampling for --objective reinforce, "
                         "not sft")
    for flag, value in (("--rollout", cfg.rollout), ("--validation", cfg.validation)):
        if value == "options" and not has_options:
            raise ValueError(f"{flag} options needs a multiple-choice task (arc_easy, cls), "
                             f"not {cfg.task!r}")
    if cfg.objective == "reinforce" and cfg.rollout == "generate" and not cfg.temperature > 0:
        raise ValueError("--temperature must be > 0 for REINFORCE (the log-probs are scored at "
                         "the temperature that sampled; a greedy rollout has none)")
    if cfg.dynamic_draws < 0 or 0 < cfg.dynamic_draws < cfg.batch_size:
        raise ValueError("--dynamic-draws must be 0 (off) or at least --batch-size")
    if cfg.baseline == "loo" and cfg.samples < 2 and cfg.objective == "reinforce":
        raise ValueError("--baseline loo needs --samples 2 or more")
    if cfg.method == "lora" and (cfg.lora_rank < 1 or not 0 <= cfg.lora_dropout < 1):
        raise ValueError("--lora-rank must be positive and --lora-dropout in [0, 1)")
    if dist.world() > 1 and (cfg.dynamic_draws or cfg.rollout != "generate"
                             or cfg.objective != "reinforce"):
        raise ValueError("under torchrun, training is REINFORCE on generated rollouts without "
                         "dynamic sampling for now (--dynamic-draws 0)")
    sizes = (cfg.steps, cfg.batch_size, cfg.samples, cfg.micro_batch, cfg.micro_tokens,
             cfg.gen_batch)
    if min(sizes) < 1:
        raise ValueError("--steps, --batch-size, --samples, --micro-batch, --micro-tokens and "
                         "--gen-batch must be positive")


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


def set_lr(opt: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> float:
    """Constant, or cosine-decayed to 0 over cfg.steps. Set directly, with no scheduler object:
    a step that makes no update must not shift the schedule."""
    lr = cfg.lr * (0.5 * (1 + math.cos(math.pi * step / cfg.steps)) if cfg.cosine else 1.0)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


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


def validate(model, tokenizer, task, problems, z, batch: int, max_new_tokens: int = 0,
             method: Method = SVF) -> float:
    """Greedy accuracy of z on the validation problems (max_new_tokens 0: the task's own)."""
    answer_mode(model, z, method)
    prompts = [tokenizer.encode_chat(task.messages(p)) for p in problems]
    comps = generate_all(model, tokenizer, prompts, batch, desc="validate",
                         max_new_tokens=max_new_tokens or task.max_new_tokens,
                         stop_strings=tuple(task.stop))
    answer_mode(model, None)
    return sum(task.score_many(problems, [c.text for c in comps])) / len(problems)


# ----------------------------------------------------------------------------- the loop
def batch_for_step(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The problems of a data chunk: a seeded permutation per epoch, so resuming needs no state."""
    per_epoch = max(n // batch_size, 1)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[k * batch_size:(k + 1) * batch_size].tolist()


def step_function(cfg: TrainConfig) -> Callable[..., dict]:
    import options
    if cfg.objective == "sft":
        return lora.sft_step
    if cfg.objective != "reinforce":
        raise ValueError(f"unknown objective {cfg.objective!r}: choose reinforce or sft")
    return train_step if cfg.rollout == "generate" else options.option_step


def validation(model, tokenizer, task, problems, params, cfg: TrainConfig,
               method: Method) -> dict:
    import options
    t0 = time.perf_counter()
    if cfg.validation == "generate":
        accuracy = validate(model, tokenizer, task, problems, params, cfg.gen_batch,
                            cfg.max_new_tokens, method)
    else:
        accuracy = options.option_accuracy(model, tokenizer, task, problems, params,
                                           method=method)
    return {"val_accuracy": accuracy, "t_val": time.perf_counter() - t0}


def train(model: Transformer, tokenizer, cfg: TrainConfig, out: Path, resume: bool = False,
          log=print, task=None, train_set: list[dict] | None = None,
          val_set: list[dict] | None = None):
    """Train an expert (or LoRA adapter) for cfg.task; writes out/{best,last}.safetensors,
    state.pt and log.jsonl, and returns the best (an svf.Expert or a lora.Adapter).
    task and the sets default to data.TASKS[cfg.task] and its splits; cls passes its own."""
    task = task or data.TASKS[cfg.task]
    train_set = train_set if train_set is not None else data.load(cfg.task, "train")
    val_set = val_set if val_set is not None else data.load(cfg.task, "validation")
    val_set = val_set[:cfg.val_limit] if cfg.val_limit else val_set
    check(cfg, hasattr(task, "option_responses"))
    step_fn = step_function(cfg)
    z, meta, method = setup(model, cfg)
    n_base, meta["trainable"] = (sum(p.numel() for p in model.parameters()),
                                 sum(v.numel() for v in z.values()))
    what = f"SVF on '{cfg.targets}'" if cfg.method == "svf" else \
        f"LoRA rank {cfg.lora_rank} on '{cfg.lora_targets}'"
    log(f"{what}: {meta['trainable']:,} trainable numbers "
        f"({100 * meta['trainable'] / n_base:.3f}% of the base model's {n_base:,})")
    log(f"sandbox: {data.sandbox.isolation() if task.domain == 'code' else 'not used'}")
    # no weight decay: it would pull z towards 0 (not 1), and the paper's LoRA baseline has none
    # each rank its own sampling stream; rank 0's is the one-process stream
    gen = torch.Generator(model.tok_embeddings.weight.device)
    run = Run(z, torch.optim.AdamW(z.values(), lr=cfg.lr, weight_decay=0.0),
              gen.manual_seed(cfg.seed + 7919 * dist.rank()))
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        load_checkpoint(run, cfg, out, log)
    elif dist.is_main():
        (out / "log.jsonl").write_text("")

    def write(record: dict) -> None:  # rank 0 keeps the log
        if dist.is_main():
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def keep_best(step: int) -> None:
        if dist.is_main():
            method.File(detached(z), {**meta, "step": step, "val_accuracy": run.best}).save(
                out / "best.safetensors")

    def next_problems() -> list[dict]:  # the data order: seeded chunks, one or more a step
        run.chunk += 1
        return [train_set[i] for i in batch_for_step(len(train_set), run.chunk - 1,
                                                      cfg.batch_size, cfg.seed)]

    if run.step == 0 and cfg.eval_every:  # the curve starts at the base model
        record = {"step": 0, **validation(model, tokenizer, task, val_set, None, cfg, method)}
        run.best = record["val_accuracy"]
        log(f"step 0 (base model): validation accuracy {run.best:.3f} on {len(val_set)} problems")
        write(record)
        keep_best(0)
    with Interrupt(log) as interrupt:
        bar = tqdm(range(run.step, cfg.steps), initial=run.step, total=cfg.steps,
                   desc=f"train {cfg.task} ({cfg.method})")
        for step in bar:
            lr = set_lr(run.opt, cfg, step)
            stats = step_fn(model, tokenizer, task, next_problems(), z, run.opt, cfg, run.gen,
                            more=next_problems)
            record, run.step = {"step": step + 1, "lr": lr, **stats}, step + 1
            if cfg.eval_every and (run.step % cfg.eval_every == 0 or run.step == cfg.steps):
                record |= validation(model, tokenizer, task, val_set, z, cfg, method)
                if record["val_accuracy"] > run.best:
                    run.best = record["val_accuracy"]
                    keep_best(run.step)
            write(record)
            shown = {k: f"{stats[k]:+.2f}" for k in ("reward", "loss") if stats.get(k) is not None}
            bar.set_postfix(**shown, val=f"{record.get('val_accuracy', run.best):.2f}")
            save_checkpoint(run, cfg, meta, method, out)
            if interrupt.asked:
                log(f"saved a checkpoint at step {run.step} in {out}; continue with --resume")
                raise SystemExit(130)
    dist.barrier()  # rank 0 has written the files
    best = out / ("best.safetensors" if cfg.eval_every else "last.safetensors")
    return method.File.load(best)
