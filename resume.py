"""What a training run saves, and how it goes on after an interruption.

A checkpoint (state.pt) holds everything the next step depends on: the trainable tensors,
AdamW's state, each rank's sampling generator, the step, the best validation accuracy, the
data chunks drawn and the settings. Resuming from it gives exactly the run that was never
interrupted; resuming under other settings is refused, since it would be another run.
"""
from __future__ import annotations

import json
import signal
from dataclasses import asdict, dataclass
from pathlib import Path


import torch

import dist
from config import TrainConfig
from methods import Method, detached



@dataclass
class Run:
    """What a checkpoint holds, so that a resumed run goes on exactly as an uninterrupted one."""
    params: dict
    opt: torch.optim.Optimizer
    gen: torch.Generator
    step: int = 0
    best: float = -1.0
    chunk: int = 0      # data chunks drawn so far: dynamic sampling draws more than one a step


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)  # a crash mid-write leaves the previous checkpoint intact


def save_checkpoint(run: Run, cfg: TrainConfig, meta: dict, method: Method, out: Path) -> None:
    """state.pt and last.safetensors, written by rank 0 (with every rank's generator)."""
    gens = dist.gather([run.gen.get_state()])
    if not dist.is_main():
        return
    state = {"params": detached(run.params), "opt": run.opt.state_dict(), "gen": gens[0],
             "step": run.step, "best": run.best, "chunks": run.chunk, "config": asdict(cfg)}
    if len(gens) > 1:
        state["gens"] = gens
    save_atomic(state, out / "state.pt")
    method.File(detached(run.params), {**meta, "step": run.step}).save(out / "last.safetensors")


# Settings a resumed run may change: they split the same computation differently, nothing more.
RESUME_MAY_CHANGE = ("steps", "micro_batch", "micro_tokens")


def check_resume(saved: dict | None, cfg: TrainConfig, path: Path, log) -> None:
    """Refuse to resume a run under other settings: it would no longer be the run it says."""
    if saved is None:
        log(f"{path} predates saved settings: cannot check that they are unchanged")
        return
    now = asdict(cfg)
    changed = [f"--{k.replace('_', '-')} {saved[k]} -> {now[k]}" for k in now
               if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
    if changed:
        may = ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE)
        raise ValueError(f"cannot resume {path} with other settings: {'; '.join(changed)} "
                         f"(only {may} may change)")


def load_checkpoint(run: Run, cfg: TrainConfig, out: Path, log) -> None:
    """Continue from out/state.pt, and keep only the log records of the steps it holds."""
    path = out / "state.pt"
    if path.exists():
        st = torch.load(path, weights_only=True)
        if set(st["params"]) != set(run.params):
            raise ValueError(f"{path} holds another method's or targets' tensors than this "
                             "configuration")
        check_resume(st.get("config"), cfg, path, log)
        with torch.no_grad():
            for n, v in run.params.items():
                v.copy_(st["params"][n])
        gens = st.get("gens", [st["gen"]])
        if len(gens) != dist.world():
            raise ValueError(f"{path} was saved by {len(gens)} process(es), not {dist.world()}: "
                             "resume with the same number")
        run.opt.load_state_dict(st["opt"]), run.gen.set_state(gens[dist.rank()])
        run.step, run.best, run.chunk = st["step"], st["best"], st.get("chunks", st["step"])
        log(f"resumed from step {run.step} (best validation accuracy {run.best:.3f})")
    else:
        log(f"nothing to resume in {out}: starting fresh")
    log_path = out / "log.jsonl"
    kept = [line for line in log_path.read_text().splitlines()
            if json.loads(line)["step"] <= run.step] if run.step and log_path.exists() else []
    if dist.is_main():
        log_path.write_text("".join(line + "\n" for line in kept))


class Interrupt:
    """Ctrl-C during training: the first finishes the step and saves, a second quits at once."""

    def __init__(self, log):
        self.log, self.asked = log, False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.on_sigint)
        return self

    def on_sigint(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        self.log("\nCtrl-C: finishing this step and saving a checkpoint "
                 "(press again to quit at once)")

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)
