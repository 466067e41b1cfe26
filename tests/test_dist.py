"""dist.py on gloo with two real processes started by torchrun, and the one-process identity
without it. The processes run under a timeout that fails the test, so CI never hangs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist

WORKER = Path(__file__).resolve().parent / "dist_worker.py"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(out)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the two ranks did not finish in 240 s: {e.stdout}\n{e.stderr}")
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


def test_each_rank_knows_its_place(two_ranks):
    assert [(s["rank"], s["world"], s["main"], s["device"]) for s in two_ranks] == \
        [(0, 2, True, "cpu"), (1, 2, False, "cpu")]


def test_shard_then_gather_restores_the_order(two_ranks):
    for s in two_ranks:
        assert s["gathered"] == {str(n): [x * 10 for x in range(n)] for n in (0, 1, 5, 8)}


def test_sums_over_ranks_are_the_sums_worked_by_hand(two_ranks):
    for s in two_ranks:  # rank r holds (r + 1) * ...: summed over r = 0, 1 that is 3 * ...
        assert s["summed"] == [[3.0] * 3, [0.0, 3.0, 6.0, 9.0]]
        assert s["count"] == 2 + 3


def test_a_globally_normalised_loss_split_over_ranks_has_one_process_gradient(two_ranks):
    for s in two_ranks:
        torch.testing.assert_close(torch.tensor(s["grad_split"]), torch.tensor(s["grad_one"]),
                                   rtol=1e-12, atol=1e-12)


def test_without_torchrun_everything_is_the_one_process_identity(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert not dist.launched() and dist.init("cpu") == "cpu" and not dist.active()
    assert (dist.rank(), dist.world(), dist.is_main()) == (0, 1, True)
    items = list(range(7))
    assert dist.shard(items) == items and dist.gather(items) == items
    t = torch.arange(3.0)
    dist.all_sum_([t])
    assert t.tolist() == [0.0, 1.0, 2.0] and dist.all_sum(2.5) == 2.5


def run_worker(out: Path, nproc: int | None) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parent.parent), str(WORKER.parent)])
    launch = [sys.executable] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    try:
        done = subprocess.run(launch + [str(WORKER), str(out), "train"], env=env,
                              capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the training step did not finish in 240 s: {e.stdout}\n{e.stderr}")
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_training_step_on_two_ranks_equals_one_process_on_the_same_samples(tmp_path):
    """8 problems: 4 on each of two ranks, against all 8 in one process, the samples fixed (so
    that sampling cannot differ): the same z after the step and the same logged figures."""
    run_worker(tmp_path, None)
    run_worker(tmp_path, 2)
    one = json.loads((tmp_path / "train-1-0.json").read_text())
    for r in range(2):
        two = json.loads((tmp_path / f"train-2-{r}.json").read_text())
        for n in one["z"]:
            torch.testing.assert_close(torch.tensor(two["z"][n]), torch.tensor(one["z"][n]),
                                       rtol=1e-5, atol=1e-6)
        for k, v in one["stats"].items():
            assert two["stats"][k] == (pytest.approx(v, rel=1e-5) if isinstance(v, float) else v), k
    assert one["stats"]["groups"] == 8 and not one["stats"]["skipped"]
    assert 0 < one["stats"]["accuracy"] < 1 and one["stats"]["kl"] > 0  # both terms live
