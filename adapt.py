"""Self-adaptation at inference time (paper section 3.2): two passes, three ways to choose z.

First pass: look at the prompt and decide the expert vector z. Second pass: answer the
prompt with W' = U diag(s * z) V^T (second_pass, grouped by expert). The first pass is one of:

a. prompt   classify(..., z=None): the base model reads CLASSIFY_SYSTEM and the question and
            names a category, code, math, reasoning or other; dispatch() maps it to an expert
            (LABEL_TO_EXPERT). "other" or no label means the base model, z = None (= 1).
b. cls      classify(..., z=z_c): the same prompt, read with the classification expert z_c, an
            SVF expert trained by loop.train on CLS_TASK (questions from the three training
            splits, labelled by domain: cls_problems; reward +1 for the right label).
c. fewshot  fewshot(): mix the experts' changes, z' = 1 + sum_k alpha_k (z_k - 1) (svf.mix, which
            keeps the model's scale where the paper's sum_k alpha_k z_k does not), and search alpha
            with the cross-entropy method (cem) on k shots of the new task (fewshot_objective:
            accuracy of greedy answers, ties broken by the mean per-token log-likelihood of the
            shots' reference answers: the official code uses the model's own correct answers, which
            a small model rarely has, so its ties would go unbroken).
            pick_shots draws the shots and removes them from the problems that are scored.

The first pass reads a label by likelihood: of the four replies "\\boxed{code}", ...
"\\boxed{other}" it takes the likeliest (replies.reply_logprobs, the prompt computed once), the
reply the classification expert is trained to raise. The paper parses a generated reply
instead (method="generate", parse_label), which SmolLM2-135M does not write.

Fixes to the official code (the paper's known pitfalls): "other" really resets to the base
model; the classification expert never sees an evaluation question; mixing happens in the space
z was trained in (svf.mix on plain z), and a mixture of near-identity experts is the base
model, not a rescaled one.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import data
import lora
import replies
import svf
from completion import Completion
from data.cls import CLS_TASK, DOMAIN_EXPERTS, LABEL_TO_EXPERT, LABELS, classify_messages, normalise, parse_label
from engine import generate_all
from model import Transformer, generate
from replies import reply_logprobs

# ----------------------------------------------------------------------------- first pass: classify
@torch.inference_mode()
def label_logprobs(model: Transformer, tokenizer, questions: list[str], z: dict | None = None,
                   batch_size: int = 16, share_prefix: bool = True) -> torch.Tensor:
    """log p(reply | question) of the four replies "\\boxed{label}" (LABELS order) under the base
    model (z None) or expert z, summed over each reply's tokens: (questions, 4). share_prefix:
    compute the system prompt every question shares once per batch (False: every row in full)."""
    svf.use_expert(model, z)  # composed once for the whole batch
    try:
        prompts = [tokenizer.encode_chat(classify_messages(q)) for q in questions]
        # similar lengths side by side: less padding
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        replies = [tokenizer.encode(r) for r in CLS_TASK.option_responses()]
        out = torch.zeros(len(prompts), len(LABELS), dtype=torch.float64)
        for i in tqdm(range(0, len(order), batch_size), desc="classify", leave=False):
            idx = order[i:i + batch_size]
            logp = reply_logprobs(model, [prompts[j] for j in idx], [replies] * len(idx),
                                  tokenizer.pad_id, share_prefix)
            out[idx] = torch.stack(logp).double().cpu()
    finally:
        svf.use_expert(model, None)
    return out


def reply_lengths(tokenizer) -> torch.Tensor:
    """Tokens of each reply "\\boxed{label}": "reasoning" takes one more than the others."""
    lengths = [len(tokenizer.encode(r)) for r in CLS_TASK.option_responses()]
    return torch.tensor(lengths, dtype=torch.float64)


def read_labels(logp: torch.Tensor, lengths: torch.Tensor, reduce: str = "sum") -> list[str]:
    """The likeliest label of each row of label_logprobs: by the reply's log-probability summed
    over its tokens (reduce "sum"), or by its per-token mean ("mean"). The sum penalises
    "reasoning" by its one token more, but the mean over-corrects: read by the base model, it
    sends most math to reasoning (eval.py --routing reports both; RESULTS.md has the figures)."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"unknown reduce {reduce!r}: choose mean or sum")
    scores = logp / lengths if reduce == "mean" else logp
    return [LABELS[k] for k in scores.argmax(1).tolist()]


@torch.inference_mode()
def classify(model: Transformer, tokenizer, questions: list[str], z: dict | None = None,
             batch_size: int = 16, method: str = "likelihood", share_prefix: bool = True,
             reduce: str = "sum") -> list[str]:
    """A label from LABELS for every question, read by the base model (z None) or by expert z.

    method "likelihood": the likeliest reply "\\boxed{label}" (reduce, see read_labels: as the
    classification expert's options policy scores them); "generate": a greedy reply, parsed by
    parse_label, and "other" when it names no category."""
    if method == "likelihood":
        return read_labels(label_logprobs(model, tokenizer, questions, z, batch_size, share_prefix),
                           reply_lengths(tokenizer), reduce)
    if method != "generate":
        raise ValueError(f"unknown method {method!r}: choose likelihood or generate")
    svf.use_expert(model, z)
    try:
        prompts = [tokenizer.encode_chat(classify_messages(q)) for q in questions]
        labels = []
        for i in tqdm(range(0, len(prompts), batch_size), desc="classify", leave=False):
            outs = generate(model, tokenizer, prompts[i:i + batch_size], CLS_TASK.max_new_tokens)
            labels += [parse_label(c.text) or "other" for c in outs]
    finally:
        svf.use_expert(model, None)
    return labels


def dispatch(labels: list[str | None]) -> list[str]:
    """The expert that answers each problem: the label's expert, else "base" (z = None, the base
    model). The official code keeps the previous expert loaded for "other"."""
    return [LABEL_TO_EXPERT.get(label, "base") for label in labels]


# ----------------------------------------------------------------------------- few-shot: CEM
# (accuracy, mean log-likelihood of the correct answers): compared in that order
Score = tuple[float, float]


def cem(objective: Callable[[torch.Tensor], Score], dim: int, population: int = 32,
        elite_ratio: float = 0.2, generations: int = 10, init_mean: float | None = None,
        init_std: float = 0.5, clamp: tuple[float, float] = (0.0, 1.0), seed: int = 0,
        history: list[dict] | None = None,
        on_generation: Callable[[dict], None] | None = None) -> tuple[torch.Tensor, list[dict]]:
    """Maximise objective(alpha) over alpha in [0, 1]^dim; returns the best alpha and the stats
    of each generation.

    Each generation samples `population` alphas from a diagonal Gaussian (clamped), evaluates
    them and the previous best again, refits mean and std on the top elite_ratio, and keeps the
    best. Scores are tuples, so ties on accuracy go to the higher log-likelihood. init_mean
    None: 1 / dim. history: the generations an interrupted search (same settings) finished; the
    search goes on from them exactly. on_generation(stats) sees each generation as it ends.
    """
    g = torch.Generator().manual_seed(seed)
    mean = torch.full((dim,), 1 / dim if init_mean is None else init_mean, dtype=torch.float64)
    std = torch.full((dim,), init_std, dtype=torch.float64)
    n_elite = max(1, round(population * elite_ratio))
    best: torch.Tensor | None = None
    history = list(history or [])
    for _ in history:  # replay the draws of the generations done: the generator goes on from there
        torch.randn(population, dim, generator=g, dtype=torch.float64)
    if history:
        mean, std, best = (torch.tensor(history[-1][k], dtype=torch.float64)
                           for k in ("alpha_mean", "alpha_std", "best_alpha"))
    # one tick per objective call: a call can take minutes (the k shots are answered anew)
    per_generation = population + 1
    bar = tqdm(total=generations * per_generation - 1,
               initial=max(len(history) * per_generation - 1, 0),
               desc="CEM", unit="candidate", leave=False)
    for gen in range(len(history), generations):
        t0 = time.perf_counter()
        noise = torch.randn(population, dim, generator=g, dtype=torch.float64)
        samples = (mean + std * noise).clamp(*clamp)
        # the previous best is evaluated again
        candidates = list(samples) + ([] if best is None else [best])
        scores = []
        for a in candidates:
            scores.append(tuple(objective(a)))
            bar.update(1)
        order = sorted(range(len(candidates)), key=lambda i: scores[i], reverse=True)
        elites = torch.stack([candidates[i] for i in order[:n_elite]])  # (n_elite, dim)
        mean, std = elites.mean(0), elites.std(0, unbiased=False)
        best = candidates[order[0]]
        population_mean = [sum(s[k] for s in scores) / len(scores) for k in range(2)]
        history.append({"generation": gen + 1, "best": list(scores[order[0]]),
                        "population_mean": population_mean, "alpha_mean": mean.tolist(),
                        "alpha_std": std.tolist(), "best_alpha": best.tolist(),
                        "seconds": time.perf_counter() - t0})
        if on_generation:
            on_generation(history[-1])
        bar.set_postfix(generation=f"{gen + 1}/{generations}", acc=f"{scores[order[0]][0]:.2f}",
                        loglik=f"{scores[order[0]][1]:.3f}")
    bar.close()
    return best, history


def pick_shots(task_name: str, split: str, problems: list[dict], k: int, seed: int,
               spare: list[dict] | None = None) -> tuple[list[dict], list[dict]]:
    """k seeded shots for task_name, and `problems` (the problems to score) without them.

    The shots come from the task's train split when it has one and that is not the split evaluated
    (ARC-Challenge); else from `spare`, problems of the evaluated split that are not scored, when
    it holds k (a --limit subset of MATH); else from the scored problems themselves (all of
    HumanEval). Either way no shot, by id or by question text, stays among the problems scored."""
    if "train" in data.SPLITS[task_name] and split != "train":
        source, pool = "train", data.load(task_name, "train")
    else:
        source, pool = split, spare if spare and len(spare) >= k else problems
    if k > len(pool):
        raise ValueError(f"{k} shots asked, but {task_name} {source} has {len(pool)} problems")
    shots = random.Random(seed).sample(pool, k)
    ids, questions = {s["id"] for s in shots}, {normalise(s["question"]) for s in shots}
    rest = [p for p in problems if p["id"] not in ids and normalise(p["question"]) not in questions]
    return shots, rest


def fewshot_objective(model: Transformer, tokenizer, task: data.Task, shots: list[dict],
                      experts: list[dict], per_layer: bool = False,
                      answer: str = "generate") -> Callable[[torch.Tensor], Score]:
    """objective(alpha) -> (accuracy on the shots, mean log-likelihood of their correct answers),
    for z' = svf.mix(experts, alpha) = 1 + sum_k alpha_k (z_k - 1). alpha: (K,), or (K * M,)
    with per_layer (one weight per expert per matrix, M matrices). Weights are composed once per
    alpha, not cached.

    answer="generate": greedy answers, and the per-token log-likelihood of the reference
    responses. answer="likelihood" (multiple choice, as eval.py --answer likelihood): the
    likeliest option is the answer, and the tie-breaker is log p(correct option) under the
    softmax over the options; one forward pass per alpha, no generation."""
    prompts = [tokenizer.encode_chat(task.messages(p)) for p in shots]
    references = [tokenizer.encode(task.reference_response(p)) for p in shots]
    K, M = len(experts), len(experts[0])

    def generated() -> Score:
        outs = generate(model, tokenizer, prompts, task.max_new_tokens,
                        stop_strings=tuple(task.stop))
        accuracy = sum(task.score_many(shots, [c.text for c in outs])) / len(shots)
        return accuracy, replies.mean_loglik(model, prompts, references, tokenizer.pad_id)

    def by_likelihood() -> Score:
        right, logp = 0, 0.0
        for p, lp in zip(shots, replies.option_logits(model, tokenizer, task, shots, 1.0)):
            correct = [task.score(p, r) for r in task.option_responses(p)]
            right += correct[int(lp.argmax())]
            logp += torch.log_softmax(lp.float(), -1)[correct.index(True)].item()
        return right / len(shots), logp / len(shots)

    read = by_likelihood if answer == "likelihood" else generated

    @torch.inference_mode()
    def objective(alpha: torch.Tensor) -> Score:
        alphas = alpha.view(K, M) if per_layer else alpha
        svf.use_expert(model, svf.mix(experts, alphas.float()))
        try:
            return read()
        finally:
            svf.use_expert(model, None)

    return objective


def fewshot(model: Transformer, tokenizer, task: data.Task, shots: list[dict],
            experts: dict[str, dict], per_layer: bool = False, generations: int = 10,
            population: int = 32, seed: int = 0, answer: str = "generate",
            history: list[dict] | None = None,
            on_generation: Callable[[dict], None] | None = None):
    """The adapted z' for a task, and a report: expert names, the best alpha, the shots' ids and
    the CEM history (for eval.py to save as JSON).

    Cost: population + 1 objective calls per generation (population in the first), each a
    greedy generation of the k shots plus a forward pass over their references. The paper ran
    50-100 generations; fewer keep a CPU run short. history, on_generation: see cem()."""
    names, zs = list(experts), list(experts.values())
    K, M = len(zs), len(zs[0])
    objective = fewshot_objective(model, tokenizer, task, shots, zs, per_layer, answer)
    alpha, history = cem(objective, K * M if per_layer else K, population, generations=generations,
                         init_mean=1 / K, seed=seed, history=history, on_generation=on_generation)
    alphas = alpha.view(K, M) if per_layer else alpha
    report = {"task": task.name, "experts": names, "per_layer": per_layer, "answer": answer,
              "alpha": alphas.tolist(), "best": history[-1]["best"],
              "shots": [s["id"] for s in shots], "population": population, "history": history}
    return svf.mix(zs, alphas.float()), report


# ----------------------------------------------------------------------------- the two passes
# A strategy names its experts (strategy_experts); the first pass chooses one per problem
# (first_pass: a label read by the base model or the cls expert, or few-shot's mixture), and the
# second pass answers each problem with its choice, grouped by expert (second_pass).
def strategy_experts(strategy: str, loaded: dict[str, dict]) -> dict[str, dict | None]:
    """The experts a strategy's second pass answers with, by name (None: the base model);
    fewshot's z' is made by its first pass."""
    if strategy == "base":
        return {"base": None}
    if strategy.startswith("expert:"):
        name = strategy.split(":", 1)[1]
        return {name: loaded[name]}
    if strategy.startswith("adapter:"):
        return {strategy: loaded[strategy]}
    if strategy in ("prompt", "cls"):
        return {**{n: loaded[n] for n in DOMAIN_EXPERTS}, "base": None}
    return {}


def fewshot_name(task) -> str:
    """fewshot's z' by name; the name holds the task, so that answer()'s cache of composed weights
    never mixes tasks up."""
    return f"fewshot-{task.name}"


def first_pass(model, tokenizer, task, problems: list[dict], strategy: str, loaded: dict[str, dict],
               shot_problems: list[dict], generations: int, population: int, per_layer: bool,
               read_by: str, batch_size: int, seed: int, out: Path, how: str = "generate",
               searched: list[dict] | None = None, on_generation=None):
    """Decide the expert of every problem: (choice, experts, labels). choice[i] names it,
    experts maps names to z (None: the base model); labels[i] is the category the classifier
    read (prompt, cls), else None. fewshot: the search goes on from the generations in
    `searched`, and on_generation(stats) sees each new one."""
    labels: list[str | None] = [None] * len(problems)
    experts = strategy_experts(strategy, loaded)
    if strategy in ("prompt", "cls"):
        # the question asked, not the task's instructions
        questions = [p["question"] for p in problems]
        labels = classify(model, tokenizer, questions,
                          loaded["cls"] if strategy == "cls" else None, batch_size, read_by)
        return dispatch(labels), experts, labels
    if strategy != "fewshot":  # one expert (or the base model, or an adapter) for every problem
        [name] = experts
        return [name] * len(problems), experts, labels
    name = fewshot_name(task)
    domain = {n: loaded[n] for n in DOMAIN_EXPERTS}
    z, report = fewshot(model, tokenizer, task, shot_problems, domain, per_layer, generations,
                        population, seed, how, searched, on_generation)
    (out / "fewshot.json").write_text(json.dumps(report, indent=2) + "\n")
    svf.save_adapted(out / "fewshot.safetensors", model, z, report)
    means = torch.tensor(report["alpha"]).reshape(len(report["experts"]), -1).mean(1).tolist()
    alpha = ", ".join(f"{n} {a:.2f}" for n, a in zip(report["experts"], means))
    print(f"{task.name}: few-shot alpha ({'mean over matrices: ' if per_layer else ''}{alpha}), "
          f"shot accuracy {report['best'][0]:.0%}, log-likelihood {report['best'][1]:.3f}",
          flush=True)
    return [name] * len(problems), {name: z}, labels


def second_pass(model, tokenizer, task, problems: list[dict], experts: dict[str, dict | None],
                choice: list[str], batch_size: int, max_new_tokens: int, how: str = "generate",
                on_batch=None) -> list[Completion]:
    """Answer each problem with the expert chosen for it, grouped by expert so that
    each expert's weights are composed once and its problems are generated in batches
    (how="likelihood": the likeliest option is the answer, see replies.choose_options).
    on_batch(indices into problems, completions) sees each batch as it is done."""
    completions = [None] * len(problems)
    for name in sorted(set(choice)):
        idx = [i for i, c in enumerate(choice) if c == name]
        if name.startswith("adapter:"):
            lora.use_adapter(model, experts[name])
        else:
            svf.use_expert(model, experts[name], cache=True)
        done = None if on_batch is None else lambda js, outs: on_batch([idx[j] for j in js], outs)
        if how == "likelihood":
            outs = replies.choose_options(model, tokenizer, task, [problems[i] for i in idx],
                                          batch_size, f"{task.name} [{name}, likelihood]", done)
        else:
            prompts = [tokenizer.encode_chat(task.messages(problems[i])) for i in idx]
            outs = generate_all(model, tokenizer, prompts, batch_size, desc=f"{task.name} [{name}]",
                                on_batch=done, stop_strings=tuple(task.stop),
                                max_new_tokens=max_new_tokens or task.max_new_tokens)
        for i, c in zip(idx, outs):
            completions[i] = c
    svf.use_expert(model, None)
    lora.use_adapter(model, None)
    return completions
