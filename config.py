"""The settings of a run, each field a flag with its help text: TrainConfig for train.py (paper
section 3.1, and its LoRA baseline) with check, the rules they keep, and EvalConfig for eval.py
(sections 3.2 and 4)."""
from __future__ import annotations

from dataclasses import dataclass

import cli
import data
import dist
import svf
from cli import option


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


@dataclass
class EvalConfig:
    task: str = option("unseen", f"a task ({', '.join(data.SPLITS)}), several joined by commas, "
                       f"'all', or 'unseen' ({', '.join(data.UNSEEN)})")
    strategy: str = option("base", "base, prompt, cls, fewshot or expert:NAME (see eval.py --help); "
                           "several joined by commas are evaluated on the same problems and "
                           "compared with the first (paired, McNemar)")
    split: str = option("test", "split to evaluate")
    limit: int = option(0, "a seeded random subset of this many problems (0: all)",
                        cli.non_negative_int)
    seed: int = option(0, "seed of the subset and of everything random", cli.seed)
    batch_size: int = option(16, "prompts per generation batch", cli.positive_int)
    max_new_tokens: int = option(0, "0: each task's own budget", cli.non_negative_int)
    workers: int = option(4, "parallel sandboxes for code tasks", cli.positive_int)
    experts_dir: str | None = option(None, "where expert NAME is NAME.safetensors (gsm8k, mbpp, "
                                     "arc_easy, cls; default: the repository's experts/)",
                                     cli.existing_folder)
    classify: str = option("likelihood", "prompt/cls: score the four replies \\boxed{label} by "
                           "likelihood, or generate one and parse it",
                           choices=("likelihood", "generate"))
    adapter: str | None = option(None, "evaluate a LoRA adapter: NAME (adapters/NAME.safetensors)"
                                 " or a .safetensors path (default: none)")
    answer: str = option("generate", "generate: greedy replies, parsed; likelihood: ARC only, the "
                         "option likeliest as the reply to the bare question, no generation",
                         choices=("generate", "likelihood"))
    resume: bool = option(False, "go on with an interrupted evaluation of the same settings: keep "
                          "its first pass and the answers it saved "
                          "(OUT/STRATEGY/TASK/partial.jsonl), skip tasks already done")
    routing: bool = option(False, "instead of a task: label the training tasks' validation "
                           "questions with the prompt and the cls first pass, and write their "
                           "confusion matrices to OUT/routing/ (--limit: a subset)")
    shots: int = option(10, "fewshot: problems used to fit alpha, then left out",
                        cli.positive_int)
    generations: int = option(10, "fewshot: CEM generations (the paper used 50-100; 10 keeps a "
                              "CPU run short)", cli.positive_int)
    population: int = option(32, "fewshot: CEM samples per generation", cli.positive_int)
    per_layer: bool = option(False, "fewshot: one alpha per expert per matrix, as the official "
                             "code (else one per expert)")
    model: str | None = option(None, "a .gguf file or Hugging Face folder (default: "
                               "SmolLM2-135M-Instruct)", cli.model_path)
    device: str = option("auto", "cpu, cuda, cuda:N or mps (auto: cuda if available)", cli.device)
    dtype: str = option("auto", "float32, bfloat16 or float16 (auto: float32 on CPU)",
                        choices=cli.DTYPES)
    threads: int = option(0, "CPU threads for torch (0: torch's choice)", cli.non_negative_int)
    out: str = option("runs/eval", "results go to OUT/STRATEGY/TASK/", cli.output_folder)
