"""One rl.train_step on fixed samples, run by tests/dist_worker.py in one process or under
torchrun: z after the step and the logged figures go to OUT/train-W-R.json."""
import json
from pathlib import Path

import torch

import config
import dist
import methods
import rl
import svf
from completion import Completion
from tiny import ToyTask, ToyTokenizer, tiny_model, toy_train_problems


def fixed_rollout(model, tokenizer, task, problems, cfg, z, generator):
    """The same responses for a problem whatever the rank: ids from the problem's own seed, and
    the answer token in some of them, so that rewards differ within a group."""
    prompts, comps = [], []
    for p in problems:
        g = torch.Generator().manual_seed(sum(map(ord, p["question"])))
        for s in range(cfg.samples):
            ids = torch.randint(2, 64, (3 + s,), generator=g).tolist()
            if s % 2 == 0:
                ids[-1] = int(p["answer"])
            prompts.append(tokenizer.encode_chat(task.messages(p)))
            comps.append(Completion(ids, tokenizer.decode(ids), [0.0] * len(ids)))
    return prompts, comps


def run(out: Path) -> None:
    model = tiny_model(torch.float32)
    cfg = config.TrainConfig(task="toy", steps=1, batch_size=8, samples=3, temperature=0.8, lr=0.05,
                         kl_coef=0.1, baseline="loo", micro_batch=3, gen_batch=6)
    z, _, _ = methods.setup(model, cfg)
    with torch.no_grad():  # start away from z = 1, so that the KL term is live
        for n, v in z.items():
            v.mul_(1 + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)))
    rl.rollout = fixed_rollout
    opt = torch.optim.AdamW(z.values(), lr=cfg.lr, weight_decay=0.0)
    stats = rl.train_step(model, ToyTokenizer(), ToyTask(), toy_train_problems(8, 0), z, opt, cfg,
                          torch.Generator().manual_seed(0))
    figures = {k: stats[k] for k in ("reward", "accuracy", "pg", "kl", "grad_norm", "skipped",
                                     "groups", "drawn", "tokens", "informative_share")}
    (out / f"train-{dist.world()}-{dist.rank()}.json").write_text(json.dumps(
        {"stats": figures, "z": {n: v.detach().tolist() for n, v in z.items()}}))
    svf.use_expert(model, None)
