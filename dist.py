"""More than one process: the torch.distributed layer that train.py and eval.py will run on.

Under `torchrun --nproc-per-node N`, each process reads its RANK, WORLD_SIZE and LOCAL_RANK
from the environment torchrun sets and joins one process group: NCCL on GPUs (one per
process), gloo on CPUs. Without those variables nothing is started, and every function here
is the one-process identity, so `python train.py` runs exactly as it always has.

The few calls the trainer and the evaluation need:
    shard(items)          this rank's share, every world()-th item from rank()
    gather(mine)          every rank's share back in the original order, on every rank
    all_sum_(tensors)     summed over ranks in place (gradients divided by a global count)
    all_sum(x)            a number summed over ranks (token and response counts)
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as td

TIMEOUT = datetime.timedelta(minutes=10)  # a rank that never arrives fails, never hangs


def launched() -> bool:
    """True under torchrun (or anything that sets the same variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str = "auto") -> str:
    """Join the process group torchrun describes and return the device this rank uses:
    cuda:LOCAL_RANK with NCCL when GPUs are there (and `device` allows it), else the CPU with
    gloo. Outside torchrun: no group, and `device` as given."""
    if not launched() or active():
        return device
    local = int(os.environ.get("LOCAL_RANK", 0))
    gpu = torch.cuda.is_available() and device in ("auto", "cuda")
    if gpu:
        torch.cuda.set_device(local)
    td.init_process_group("nccl" if gpu else "gloo", timeout=TIMEOUT)
    return f"cuda:{local}" if gpu else ("cpu" if device == "auto" else device)


def active() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if active() else 0


def world() -> int:
    return td.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 writes the files (checkpoints, logs, responses, summaries); the others do not."""
    return rank() == 0


def shard(items: list) -> list:
    """Every world()-th item, from rank(): strided, so that shards differ in length by one at
    most and gather() can put them back in order."""
    return items[rank()::world()]


def gather(mine: list) -> list:
    """The shards of every rank, in the order shard() took them from."""
    if not active():
        return list(mine)
    parts: list = [None] * world()
    td.all_gather_object(parts, list(mine))
    out = [None] * sum(len(p) for p in parts)
    for r, part in enumerate(parts):
        out[r::world()] = part
    return out


def all_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum tensors over ranks in place, in one flat buffer (one message, not one per tensor)."""
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    td.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def all_sum(x: float) -> float:
    """A number summed over ranks (in float64, so counts stay exact)."""
    if not active():
        return x
    t = torch.tensor([x], dtype=torch.float64)
    td.all_reduce(t)
    return t.item()


def barrier() -> None:
    if active():
        td.barrier()


def close() -> None:
    """Leave the group together: a rank that tears down its gloo connections while another
    still sends on them aborts the other ("terminate called without an active exception")."""
    if active():
        td.barrier()
        td.destroy_process_group()
