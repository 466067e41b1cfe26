"""Run by tests/test_dist.py under torchrun: each rank checks dist.py and writes what it saw
to OUT/rank-R.json (not a test module: pytest does not collect it)."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dist  # noqa: E402

out = Path(sys.argv[1])
device = dist.init("auto")
if sys.argv[2:] == ["train"]:  # one training step: tests/test_dist.py compares world 2 with 1
    import train_step_check  # noqa: E402  (tests/train_step_check.py)
    train_step_check.run(out)
    dist.close()
    sys.exit(0)
seen = {"rank": dist.rank(), "world": dist.world(), "device": device, "main": dist.is_main()}

# shard + gather restores the order, for lengths shorter than, equal to and longer than world
seen["gathered"] = {n: dist.gather([x * 10 for x in dist.shard(list(range(n)))])
                    for n in (0, 1, 5, 8)}

# the sum of per-rank tensors, against the sum worked out here from the ranks' own formula
mine = [torch.full((3,), float(dist.rank() + 1)), torch.arange(4.0) * (dist.rank() + 1)]
dist.all_sum_(mine)
seen["summed"] = [t.tolist() for t in mine]
seen["count"] = dist.all_sum(float(dist.rank() + 2))

# a loss normalised by the global count, split over ranks, against one process on every row
g = torch.Generator().manual_seed(0)
w0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
rows = torch.randn(8, 3, generator=g, dtype=torch.float64)
targets = torch.randn(8, 4, generator=g, dtype=torch.float64)


def grad(idx: list[int], n_total: int) -> torch.Tensor:
    w = w0.clone().requires_grad_(True)
    loss = ((rows[idx] @ w.T - targets[idx]) ** 2).sum() / n_total
    loss.backward()
    return w.grad


idx = dist.shard(list(range(8)))
n_total = int(dist.all_sum(float(len(idx))))
split = grad(idx, n_total)
dist.all_sum_([split])
seen["grad_split"] = split.tolist()
seen["grad_one"] = grad(list(range(8)), 8).tolist()

(out / f"rank-{dist.rank()}.json").write_text(json.dumps(seen))
dist.close()
