"""Benchmarks: speed and memory of the model and of SVF training, each beside a peer from the same run.

Three sections, one per issue:

    model  (issue "foundation")  loading, greedy decoding at batch 1 and 16, prefill, the machine's
                                 memory-bandwidth ceiling for decoding, a bfloat16 CPU mode and peak
                                 memory, side by side with Hugging Face transformers on the same GGUF
    svf    (issue "trainer")     the SVD of the adapted matrices and its cache, switching experts, one
                                 REINFORCE step split into phases (paper section 3.1) against its floor:
                                 plain generation plus one forward/backward pass of the base model
    adapt  (issue "adaptation")  the first pass (classifying a question) against the second (answering
                                 it) on each unseen task, with and without the shared prefix; switching
                                 between the shipped experts

Every figure is printed beside a peer measured in the same run, with the ratio between them, so the
ratios stay meaningful on a busy machine (the 1-minute load average is printed at start and end).
A timing is the best of --reps rounds, the contenders taking turns within a round; decoding speed is
(N - 1) new tokens over time(N tokens) - time(1 token), which leaves the prefill out. Peak memory is
the high-water mark (VmHWM) of a fresh interpreter per measurement.

    python bench.py --quick                       # small sizes: ~10 minutes on a busy 2-core machine
    python bench.py --json results/bench.json     # the full run: ~25 minutes there
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import data
import fetch
import rl
import svf
from model import HelpFormatter, ModelArgs, Transformer, generate, generate_all, left_pad
from replies import common_prefix
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent
GB = 1e9


@dataclass
class Sizes:
    reps: int = 2              # rounds of each timing; the best round counts
    decode_tokens: int = 64    # new tokens of the decode-speed runs (batch 1 and 16)
    prefill_rows: int = 4      # prefill: one forward of rows x length tokens
    prefill_len: int = 128
    agree_prompts: int = 256   # task prompts of the bfloat16-vs-float32 agreement (batch 16)
    agree_tokens: int = 32     # new tokens compared per prompt
    mem_tokens: int = 256      # new tokens of the peak-memory runs (batch 16)
    train_prompts: int = 4     # one REINFORCE step: prompts x samples x new tokens, on gsm8k train
    train_samples: int = 4
    train_tokens: int = 64
    adapt_questions: int = 32  # per unseen task: first pass (classification) and second pass (answers)


FULL = Sizes()
QUICK = Sizes(reps=1, decode_tokens=16, agree_prompts=16, agree_tokens=16, mem_tokens=64, train_prompts=2,
              train_tokens=32, adapt_questions=8)


# ----------------------------------------------------------------------------- measuring and reporting
def race(contenders: dict, reps: int) -> dict[str, float]:
    """Best wall time of each contender over `reps` rounds; within a round they take turns, so a
    burst of background load hits all of them alike."""
    best = {k: math.inf for k in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


class Report:
    """Rows of (figure, value, peer, peer value, ratio, target); printed as a table, saved as JSON."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, section: str, name: str, value: float, unit: str, peer: str, peer_value: float,
            target: str = "", ok: bool | None = None, lower_is_better: bool = False) -> float:
        ratio = value / peer_value if peer_value else float("nan")
        self.rows.append(dict(section=section, name=name, value=value, unit=unit, peer=peer, peer_value=peer_value,
                              ratio=ratio, lower_is_better=lower_is_better, target=target, ok=ok))
        return ratio

    def print(self, section: str) -> None:
        rows = [r for r in self.rows if r["section"] == section]
        print(f"\n{'figure':<48}{'ours':>9} {'unit':<6} {'peer':<32}{'peer':>9} {'ratio':>9}  target")
        for r in rows:
            verdict = "" if r["ok"] is None else ("PASS" if r["ok"] else "FAIL")
            print(f"{r['name']:<48}{fmt(r['value']):>9} {r['unit']:<6} {r['peer']:<32}{fmt(r['peer_value']):>9} "
                  f"{fmt(r['ratio']) + 'x':>9}  {r['target']} {verdict}")


def fmt(x: float) -> str:
    if x != x:
        return "-"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def load_average() -> float:
    return os.getloadavg()[0]


START = time.perf_counter()


def stage(what: str) -> None:
    """A progress line: some stages take minutes on a small CPU."""
    print(f"  [{time.perf_counter() - START:5.0f} s, load {load_average():.1f}] {what}", flush=True)


# ----------------------------------------------------------------------------- shared helpers
def without_stops(tokenizer):
    """A copy of the tokenizer with no stop tokens: generation always runs the full count."""
    tok = copy.copy(tokenizer)
    tok.stop_ids = set()
    return tok


def task_prompts(tokenizer, n: int, tasks: tuple[str, ...] = ("gsm8k",), split: str = "test") -> list[list[int]]:
    """The first n chat prompts, taken round-robin from the tasks' split (the same list every run)."""
    pools = [(data.TASKS[t], data.load(t, split)) for t in tasks]
    prompts = []
    for i in range(n):
        task, problems = pools[i % len(pools)]
        prompts.append(tokenizer.encode_chat(task.messages(problems[i // len(pools)])))
    return prompts


def load_transformers(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()


@torch.inference_mode()
def hf_generate(hf, prompts: list[list[int]], n: int, pad_id: int) -> torch.Tensor:
    """transformers' greedy generate, left-padded like ours, forced to exactly n new tokens: (B, n)."""
    tokens, pad = left_pad(prompts, pad_id, "cpu")
    mask = (torch.arange(tokens.shape[1])[None] >= pad[:, None]).long()
    out = hf.generate(input_ids=tokens, attention_mask=mask, do_sample=False, min_new_tokens=n,
                      max_new_tokens=n, pad_token_id=pad_id)
    return out[:, tokens.shape[1]:]


def weight_bytes_per_token(model) -> int:
    """Bytes a batch-1 decode step reads: every parameter once (a tied head once), one embedding row."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() lists tied ones once
    emb = model.tok_embeddings.weight
    if emb is not model.output.weight:
        total -= emb.numel() * emb.element_size()
    return total + emb.shape[1] * emb.element_size()


def matvec_bandwidth(w: torch.Tensor, reps: int = 10, rounds: int = 5) -> float:
    """Bytes per second that W @ x (one vector, the kernel model.Linear uses) reaches on w."""
    x = torch.randn(1, w.shape[1], dtype=w.dtype)
    for _ in range(3):
        w @ x.t()
    best = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            w @ x.t()
        best = min(best, (time.perf_counter() - t0) / reps)
    return w.numel() * w.element_size() / best


def kernel_times(w: torch.Tensor, rows: int, reps: int) -> dict[str, float]:
    """Seconds per product of `rows` vectors with float32 w: F.linear(x, W), (W @ x^T)^T, and the
    latter with w and x in bfloat16."""
    x = torch.randn(rows, w.shape[1])
    w16, x16 = w.bfloat16(), x.bfloat16()
    n = max(1, int(2e8 // (w.numel() * w.element_size())))  # ~200 MB of float32 weights per timed call
    loop = lambda f: (lambda: [f() for _ in range(n)])
    t = race({"linear": loop(lambda: F.linear(x, w)), "wx": loop(lambda: (w @ x.t()).t()),
              "wx_bf16": loop(lambda: (w16 @ x16.t()).t())}, reps + 2)
    return {k: v / n for k, v in t.items()}


@torch.inference_mode()  # as generate() runs
def decode_step_time(model, reps: int, steps: int = 20) -> float:
    """Seconds per batch-1 decode step (one token, with a cache) after a 32-token prefill."""
    x = torch.zeros(1, 32, dtype=torch.long)
    cache = model.new_cache(1, 32 + steps)
    model(x, None, cache, 0, last=1)
    run = lambda: [model(x[:, :1], None, cache, 32 + i) for i in range(steps)]
    return race({"t": run}, reps + 1)["t"] / steps


def high_water() -> int:
    """Peak resident memory of this process, in bytes: VmHWM of its own address space.

    Not getrusage's ru_maxrss: Linux carries that across fork and exec, so a child started by a
    big parent reports the parent's peak.
    """
    status = Path("/proc/self/status")
    if status.exists():
        return next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines()
                    if line.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def resident() -> int:
    """Resident memory of this process now, in bytes (0 where /proc is missing)."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("VmRSS:")), 0)


def peak_child(kind: str, batch: int, new_tokens: int, threads: int, svd_cache: str | None = None) -> None:
    """Run in a fresh interpreter by peak_memory(): load, generate batch x new_tokens, print RSS figures.

    kind: "imports" (python, torch and our modules only), "ours", "transformers", or "svf" (ours with
    the MLP matrices decomposed, wrapped and an expert composed: the setting of a rollout).
    """
    torch.set_num_threads(threads)

    out = {"imports": high_water()}
    if kind != "imports":
        path = fetch.check_default_model()
        tok = load_tokenizer(path)
        prompts = task_prompts(tok, batch)
        if kind == "transformers":
            hf = load_transformers(path)
            out["loaded"], out["resident_loaded"] = high_water(), resident()
            hf_generate(hf, prompts, new_tokens, tok.pad_id)
        else:
            model = checkpoint.load_model(path, "cpu", "float32")
            if kind == "svf":
                svf.attach(model, svf.decompose(model, "mlp", cache_dir=svd_cache))
                svf.use_expert(model, {n: 1.01 * v for n, v in svf.ones(model).items()})  # an expert: z = 1 keeps the base layers
            out["loaded"], out["resident_loaded"] = high_water(), resident()
            generate(model, without_stops(tok), prompts, new_tokens)
    out["peak"] = high_water()
    print(json.dumps(out))


def peak_memory(kinds: list[str], batch: int, new_tokens: int, threads: int, svd_cache: str | None = None) -> dict:
    """Peak-memory figures (bytes) of fresh interpreters running peak_child(), one per kind.
    They run side by side: a high-water mark does not depend on speed, and the wait is shorter."""
    procs = {}
    for kind in kinds:
        kw = dict(kind=kind, batch=batch, new_tokens=new_tokens, threads=threads, svd_cache=svd_cache)
        procs[kind] = subprocess.Popen([sys.executable, "-c", f"import bench; bench.peak_child(**{kw!r})"], cwd=ROOT,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env={**os.environ, "TQDM_DISABLE": "1"})
    out = {}
    for kind, p in procs.items():
        stdout, stderr = p.communicate()
        if p.returncode:
            raise RuntimeError(f"peak-memory child {kind} failed:\n{stderr[-2000:]}")
        out[kind] = json.loads(stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------- section 1: the model
def bench_model(rep: Report, S: Sizes, threads: int, figures: dict) -> None:
    sec = "model"
    path = fetch.check_default_model()
    path.read_bytes()  # warm the page cache: both loaders then read from memory
    tok = load_tokenizer(path)
    stage("loading: ours and transformers")
    load_times = race({"ours": lambda: checkpoint.load_model(None, "cpu", "float32"),
                       "transformers": lambda: load_transformers(path)}, 1)
    m32, _ = checkpoint.load(None, "cpu", "float32")
    m16, _ = checkpoint.load(None, "cpu", "bfloat16")
    hf = load_transformers(path)
    rep.add(sec, "load model (s)", load_times["ours"], "s", "transformers from_pretrained", load_times["transformers"],
            lower_is_better=True)

    # The batch-1 ceiling: weight bytes per token over the bandwidth a matrix-vector product reaches.
    bw32 = matvec_bandwidth(m32.output.weight.detach())
    bw16 = matvec_bandwidth(m16.output.weight.detach())
    bytes32, bytes16 = weight_bytes_per_token(m32), weight_bytes_per_token(m16)
    figures["bandwidth"] = {"matvec_GBps_float32": bw32 / GB, "matvec_GBps_bfloat16": bw16 / GB,
                            "weight_bytes_per_token_float32": bytes32, "weight_bytes_per_token_bfloat16": bytes16}

    # Greedy decoding, forced to the full count: no stop tokens for ours, min_new_tokens for transformers.
    free = without_stops(tok)
    prompts16 = task_prompts(tok, 16)
    outputs = {}

    def contenders(prompts, n, with_bf16):
        c = {"ours": lambda: outputs.__setitem__("ours", generate(m32, free, prompts, n)),
             "transformers": lambda: outputs.__setitem__("hf", hf_generate(hf, prompts, n, tok.pad_id))}
        if with_bf16:
            c["ours bf16"] = lambda: generate(m16, free, prompts, n)
        return c

    N = S.decode_tokens
    for B in (1, 16):
        stage(f"greedy decoding, batch {B}")
        prompts = prompts16[:B]
        race(contenders(prompts, 2, B == 1), 1)  # warm-up: first-call costs out of the timings
        t1 = race(contenders(prompts, 1, B == 1), S.reps)
        tn = race(contenders(prompts, N, B == 1), S.reps)
        tps = {k: B * (N - 1) / max(tn[k] - t1[k], 1e-9) for k in tn}
        figures[f"decode_batch{B}"] = {"tok_s": tps, "seconds_1_token": t1, f"seconds_{N}_tokens": tn}
        target = 1.1 if B == 1 else 1.2
        rep.add(sec, f"decode tok/s, batch {B}, float32", tps["ours"], "tok/s", "transformers float32",
                tps["transformers"], f">= {target}x", tps["ours"] >= target * tps["transformers"])
        same = [o.tokens[:first_stop(o.tokens, tok)] == h[:first_stop(o.tokens, tok)].tolist()
                for o, h in zip(outputs["ours"], outputs["hf"])]
        figures[f"decode_batch{B}"]["same_tokens_as_transformers"] = sum(same) / len(same)
        rep.add(sec, f"  rows with transformers' greedy tokens", sum(same) / len(same), "share",
                "all rows", 1.0)
        if B == 1:
            rep.add(sec, "decode tok/s, batch 1, bfloat16", tps["ours bf16"], "tok/s", "transformers float32",
                    tps["transformers"], ">= 2x", tps["ours bf16"] >= 2 * tps["transformers"])
            rep.add(sec, "  float32 against the machine's ceiling", tps["ours"], "tok/s", "matvec bandwidth / bytes",
                    bw32 / bytes32)
            rep.add(sec, "  bfloat16 against the machine's ceiling", tps["ours bf16"], "tok/s",
                    "matvec bandwidth / bytes", bw16 / bytes16)

    stage("prefill")
    # Prefill: one forward of rows x length real tokens, with a cache, logits of the last position only.
    stream = [t for p in task_prompts(tok, 4 * S.prefill_rows) for t in p]
    x = torch.tensor(stream[:S.prefill_rows * S.prefill_len]).view(S.prefill_rows, S.prefill_len)

    @torch.inference_mode()
    def prefill(m):
        m(x, None, m.new_cache(*x.shape), 0, last=1)

    @torch.inference_mode()
    def hf_prefill():
        hf(input_ids=x, use_cache=True, logits_to_keep=1)

    prefill(m32), prefill(m16), hf_prefill()
    t = race({"ours": lambda: prefill(m32), "transformers": hf_prefill, "ours bf16": lambda: prefill(m16)},
             S.reps + 1)
    pps = {k: x.numel() / v for k, v in t.items()}
    figures["prefill_tok_s"] = pps
    name = f"prefill tok/s, {S.prefill_rows}x{S.prefill_len} tokens"
    rep.add(sec, name + ", float32", pps["ours"], "tok/s", "transformers float32", pps["transformers"])
    rep.add(sec, name + ", bfloat16", pps["ours bf16"], "tok/s", "ours float32", pps["ours"])

    stage("kernels and overhead")
    # The kernel model.Linear picks for few rows, on the shapes of the head and of an MLP matrix
    # (3.5 MB: it stays in the L3 cache when timed alone, so its row shows compute, not memory, speed).
    for label, w, rows in (("head 49152x576, 1 row", m32.output.weight, 1),
                           ("head 49152x576, 16 rows", m32.output.weight, 16),
                           ("mlp.up 1536x576, 16 rows", m32.layers[0].mlp.up.weight, 16)):
        k = kernel_times(w.detach(), rows, S.reps)
        figures.setdefault("kernels_seconds", {})[label] = k
        rep.add(sec, f"W @ x^T, {label} (ms)", k["wx"] * 1e3, "ms", "F.linear(x, W)", k["linear"] * 1e3,
                lower_is_better=True)
        rep.add(sec, f"  same in bfloat16 (ms)", k["wx_bf16"] * 1e3, "ms", "W @ x^T float32", k["wx"] * 1e3,
                lower_is_better=True)

    # What a decode step costs besides its matmuls: the same blocks, heads and ops with tiny matrices.
    a = m32.args
    tiny = Transformer(ModelArgs(dim=72, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                                 vocab_size=256, hidden_dim=128, max_seq_len=128)).eval()
    overhead = decode_step_time(tiny, S.reps)
    figures["dispatch_overhead_seconds_per_step"] = overhead
    rep.add(sec, f"overhead per decode step ({a.n_layers}-layer tiny model)", overhead * 1e3, "ms",
            "ours float32 batch-1 step (ms)", 1e3 / figures["decode_batch1"]["tok_s"]["ours"], lower_is_better=True)

    stage(f"bfloat16 against float32: logits, then {S.agree_prompts} greedy answers")
    # bfloat16 against float32: logits on a few prompts, greedy answers on many.
    few = task_prompts(tok, 4, ("gsm8k", "arc_easy", "mbpp", "math"))
    with torch.inference_mode():
        diffs = {"bf16": 0.0, "hf": 0.0, "scale": 0.0}
        for p in few:
            ids = torch.tensor([p])
            ref = m32(ids)
            diffs["bf16"] = max(diffs["bf16"], (m16(ids) - ref).abs().max().item())
            diffs["hf"] = max(diffs["hf"], (hf(input_ids=ids).logits - ref).abs().max().item())
            diffs["scale"] = max(diffs["scale"], ref.abs().max().item())
    figures["logit_max_abs_diff"] = diffs
    rep.add(sec, "logit max |bf16 - f32|, 4 prompts", diffs["bf16"], "", "max |f32 logit|", diffs["scale"],
            lower_is_better=True)
    rep.add(sec, "logit max |transformers f32 - ours f32|", diffs["hf"], "", "max |f32 logit|", diffs["scale"],
            lower_is_better=True)
    agree = task_prompts(tok, S.agree_prompts, ("gsm8k", "arc_easy", "arc_challenge", "mbpp", "humaneval", "math"))
    answers, secs = {}, {}
    for name, m in (("f32", m32), ("bf16", m16)):
        t0 = time.perf_counter()
        answers[name] = generate_all(m, tok, agree, 16, desc=name, max_new_tokens=S.agree_tokens)
        secs[name] = time.perf_counter() - t0
    pairs = list(zip(answers["f32"], answers["bf16"]))
    exact = sum(a.tokens == b.tokens for a, b in pairs) / len(pairs)
    first = sum(a.tokens[0] == b.tokens[0] for a, b in pairs) / len(pairs)
    gen_tps = {k: sum(len(c.tokens) for c in v) / secs[k] for k, v in answers.items()}
    figures["bf16_agreement"] = {"prompts": len(pairs), "tokens": S.agree_tokens, "exact": exact,
                                 "first_token": first, "tok_s": gen_tps}
    rep.add(sec, f"bf16 = f32, all {S.agree_tokens} tokens, {len(pairs)} prompts", exact, "share",
            "f32 = f32 (by definition)", 1.0)
    rep.add(sec, f"bf16 = f32, first token, {len(pairs)} prompts", first, "share", "f32 = f32 (by definition)", 1.0)
    rep.add(sec, "task prompts, batch 16, bfloat16", gen_tps["bf16"], "tok/s", "ours float32", gen_tps["f32"])
    del m16, hf
    bench_memory(rep, S, threads, figures)


def bench_memory(rep: Report, S: Sizes, threads: int, figures: dict) -> None:
    """Peak memory of batch-16 generation, ours and transformers, each in a fresh interpreter."""
    sec = "model"
    stage("peak memory (fresh interpreters)")
    mem = peak_memory(["imports", "ours", "transformers"], 16, S.mem_tokens, threads)
    figures["peak_memory_bytes"] = mem
    rep.add(sec, f"peak RSS, batch 16 x {S.mem_tokens} tokens (GB)", mem["ours"]["peak"] / GB, "GB",
            "transformers float32", mem["transformers"]["peak"] / GB, "< 1.5 GB", mem["ours"]["peak"] < 1.5 * GB,
            lower_is_better=True)
    rep.add(sec, "  of which after loading (GB)", mem["ours"]["loaded"] / GB, "GB", "transformers float32",
            mem["transformers"]["loaded"] / GB, lower_is_better=True)
    rep.add(sec, "  of which python + torch imports (GB)", mem["imports"]["peak"] / GB, "GB",
            "ours peak", mem["ours"]["peak"] / GB, lower_is_better=True)


def first_stop(tokens: list[int], tok) -> int:
    """Length of the prefix before the first stop token (ours runs past it, transformers may not)."""
    return next((i for i, t in enumerate(tokens) if t in tok.stop_ids), len(tokens))


# ----------------------------------------------------------------------------- section 2: SVF training
def unwrap(model) -> None:
    """Put the base linears back in place of svf's wrappers (the bare base model again)."""
    for name, m in svf.wrappers(model).items():
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, m.base)


def forward_backward(model, prompts, comps, pad_id: int, micro_batch: int, targets: str) -> None:
    """One differentiable forward and backward pass of the base model on the rollout's sequences,
    with gradients on the adapted base matrices (what SVF's gradient also has to compute)."""
    weights = [model.get_submodule(n).weight for n in svf.target_names(model, targets)]
    for w in weights:
        w.requires_grad_(True)
    for i in range(0, len(prompts), micro_batch):  # plain rows, prompt + response, left-padded
        rows = [p + c.tokens for p, c in zip(prompts[i:i + micro_batch], comps[i:i + micro_batch])]
        R = max(len(c.tokens) for c in comps[i:i + micro_batch])
        tokens, pad = left_pad(rows, pad_id, "cpu")
        logits = model(tokens, pad, last=R + 1)[:, :-1]                                   # (b, R, vocab)
        mask = torch.tensor([[j >= R - len(c.tokens) for j in range(R)] for c in comps[i:i + micro_batch]])
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, -R:, None]).squeeze(-1) * mask
        (-logp.sum() / len(prompts)).backward()
    for w in weights:
        w.grad = None
        w.requires_grad_(False)


def bench_svf(rep: Report, S: Sizes, threads: int, seed: int, figures: dict, memory: dict) -> None:
    sec = "svf"
    stage("svf: load, decompose")
    t0 = time.perf_counter()
    model, tok = checkpoint.load(None, "cpu", "float32")
    t_load = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        svd = svf.decompose(model, "mlp", cache_dir=cache)
        t_svd = time.perf_counter() - t0
        t0 = time.perf_counter()
        svf.decompose(model, "mlp", cache_dir=cache)
        t_cached = time.perf_counter() - t0
        rep.add(sec, f"decompose {len(svd)} MLP matrices (SVD)", t_svd, "s", "model load", t_load, lower_is_better=True)
        rep.add(sec, "load cached decomposition", t_cached, "s", "decompose", t_svd, lower_is_better=True)

        stage("svf: switching experts")
        # Switching experts: a new expert composes W' = W + U diag(s(z-1)) V^T for every matrix; a cached one does not.
        svf.attach(model, svd)
        g = torch.Generator().manual_seed(seed)
        experts = [{n: 1 + 0.01 * torch.randn(v.shape, generator=g) for n, v in svf.ones(model).items()}
                   for _ in range(S.reps + 1)]
        t_new = min(race({"new": lambda e=e, k=k: svf.use_expert(model, e, cache=True)}, 1)["new"]
                    for k, e in enumerate(experts))
        t_hit = race({"hit": lambda: svf.use_expert(model, experts[-1], cache=True)},
                     5)["hit"]
        svf.use_expert(model, None)
        for m in svf.wrappers(model).values():
            m.cache.clear()  # free the composed weights
        rep.add(sec, "switch expert, new (recompose)", t_new, "s", "model load", t_load, lower_is_better=True)
        rep.add(sec, "switch expert, cached key", t_hit * 1e3, "ms", "switch, new (ms)", t_new * 1e3,
                lower_is_better=True)

        # One REINFORCE step against its floor. At the first step z = 1, so with the same seed the floor's
        # plain generation samples (nearly) the same sequences as the step's rollout.
        cfg = rl.TrainConfig(task="gsm8k", batch_size=S.train_prompts, samples=S.train_samples,
                             max_new_tokens=S.train_tokens, gen_batch=16, micro_batch=8, seed=seed)
        task = data.TASKS[cfg.task]
        problems = data.load(cfg.task, "train")[:cfg.batch_size]
        prompts = [tok.encode_chat(task.messages(p)) for p in problems for _ in range(cfg.samples)]
        stage("svf: floor (plain generation, forward/backward), then one training step")
        # One round only: a step takes minutes on a small CPU.
        unwrap(model)
        t0 = time.perf_counter()
        comps = generate_all(model, tok, prompts, cfg.gen_batch, desc="floor", max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_p=cfg.top_p, stop_strings=tuple(task.stop),
                             generator=torch.Generator().manual_seed(seed))
        t1 = time.perf_counter()
        forward_backward(model, prompts, comps, tok.pad_id, cfg.micro_batch, cfg.targets)
        f = {"t_generate": t1 - t0, "t_forward_backward": time.perf_counter() - t1,
             "tokens": sum(len(c.tokens) for c in comps)}
        f["t_total"] = f["t_generate"] + f["t_forward_backward"]
        svf.attach(model, svd)
        z = {n: torch.nn.Parameter(v) for n, v in svf.ones(model).items()}
        opt = torch.optim.AdamW(z.values(), lr=cfg.lr, weight_decay=0.0)
        s = rl.train_step(model, tok, task, problems, z, opt, cfg, torch.Generator().manual_seed(seed))
        s["t_optimizer"] = s["t_step"] - s["t_rollout"] - s["t_score"] - s["t_backward"]
        figures["train_step"], figures["floor"] = s, f
        n = f"{cfg.batch_size}x{cfg.samples}x{cfg.max_new_tokens}"
        rep.add(sec, f"step {n}: rollout (s)", s["t_rollout"], "s", "plain generation", f["t_generate"],
                lower_is_better=True)
        rep.add(sec, f"step {n}: scoring (s)", s["t_score"], "s", "whole step", s["t_step"], lower_is_better=True)
        rep.add(sec, f"step {n}: log-probs + KL + backward (s)", s["t_backward"], "s", "base forward/backward",
                f["t_forward_backward"], lower_is_better=True)
        rep.add(sec, f"step {n}: optimizer (s)", s["t_optimizer"], "s", "whole step", s["t_step"],
                lower_is_better=True)
        rep.add(sec, f"step {n}: whole step (s)", s["t_step"], "s", "floor: generation + fwd/bwd", f["t_total"],
                lower_is_better=True)
        rep.add(sec, "rollout tok/s", s["rollout_tok_s"], "tok/s", "plain generation tok/s",
                f["tokens"] / f["t_generate"])
        rep.add(sec, "rollout tokens (sampled)", s["tokens"], "tok", "plain generation tokens", f["tokens"])

        stage("svf: peak memory (fresh interpreters)")
        mem = peak_memory(["svf"] + ([] if "ours" in memory else ["ours"]), 16, S.mem_tokens, threads, cache)
        mem, base = mem["svf"], memory.get("ours") or mem["ours"]
        figures["peak_memory_bytes"] = {"svf": mem, "ours": base}
        rep.add(sec, f"peak RSS, expert, batch 16 x {S.mem_tokens} (GB)", mem["peak"] / GB, "GB",
                "base model, same generation", base["peak"] / GB, lower_is_better=True)


# ----------------------------------------------------------------------------- section 3: adaptation
def bench_adapt(rep: Report, S: Sizes, figures: dict) -> None:
    """Paper Table 3: the first pass's cost as a share of the second pass's, per unseen task.

    The first pass is adapt.classify's: one forward pass per question scoring the four replies
    "\\boxed{label}" (replies.reply_logprobs); `cls` runs the same pass with z_c composed in (a switch,
    timed below), so both strategies cost alike. Its prompts all begin with the same system prompt,
    which reply_logits computes once per batch; the peer computes every row in full. The second
    pass answers the same questions by greedy generation with the task's own token budget."""
    import adapt
    sec = "adapt"
    stage("adapt: load the model and the shipped experts")
    model, tok = checkpoint.load(None, "cpu", "float32")
    batch = 16
    for name in ("arc_challenge", "humaneval", "math"):
        task = data.TASKS[name]
        problems = data.load(name, "test")[:S.adapt_questions]
        questions = [task.messages(p)[-1]["content"] for p in problems]   # what eval.py's first pass reads
        prompts = [tok.encode_chat(adapt.classify_messages(q)) for q in questions]

        def first_pass(share: bool, qs: list[str] = questions) -> None:  # the prompt strategy's first pass
            adapt.classify(model, tok, qs, None, batch, share_prefix=share)

        stage(f"adapt: {name}, {len(prompts)} questions: first pass, shared prefix and in full")
        first_pass(True, questions[:4]), first_pass(False, questions[:4])   # warm-up: the first call pays allocations
        t = race({"shared": lambda: first_pass(True), "full": lambda: first_pass(False)}, S.reps)
        stage(f"adapt: {name}: second pass (greedy, up to {task.max_new_tokens} new tokens)")
        answers = [tok.encode_chat(task.messages(p)) for p in problems]
        t0 = time.perf_counter()
        comps = generate_all(model, tok, answers, batch, desc="second pass", max_new_tokens=task.max_new_tokens,
                             stop_strings=tuple(task.stop))
        t_second = time.perf_counter() - t0
        n = len(problems)
        figures[name] = {"questions": n, "first_pass_shared_s": t["shared"], "first_pass_full_s": t["full"],
                         "second_pass_s": t_second, "second_pass_tokens": sum(len(c.tokens) for c in comps),
                         "shared_tokens": common_prefix(prompts), "prompt_tokens": sum(map(len, prompts)) / n}
        rep.add(sec, f"{name}: first pass (s/question)", t["shared"] / n, "s", "every row in full (s/q)",
                t["full"] / n, lower_is_better=True)
        rep.add(sec, f"{name}: first pass / second pass", t["shared"] / t_second, "", "in full / second pass",
                t["full"] / t_second, lower_is_better=True, target="paper: 0.13-0.47")

    stage("adapt: switching between the shipped experts")
    import eval as evaluate
    names = evaluate.DOMAIN_EXPERTS + ["cls"]
    experts = evaluate.load_experts(model, evaluate.resolve_experts(names, ROOT / "experts"))
    t_new = race({n: lambda n=n: svf.use_expert(model, experts[n], cache=True) for n in names}, 1)
    t_hit = race({n: lambda n=n: svf.use_expert(model, experts[n], cache=True) for n in names}, 5)
    svf.use_expert(model, None)
    new, hit = sum(t_new.values()) / len(names), sum(t_hit.values()) / len(names)
    figures["switch_s"] = {"new": t_new, "cached": t_hit}
    rep.add(sec, "switch to an expert, composed anew (s)", new, "s", "second pass of math (s)",
            figures["math"]["second_pass_s"], lower_is_better=True)
    rep.add(sec, "switch to an expert, cached (ms)", hit * 1e3, "ms", "composed anew (ms)", new * 1e3,
            lower_is_better=True)


# ----------------------------------------------------------------------------- command line
def main(section: str, threads: int, quick: bool, agree_prompts: int | None, json_out: str | None, seed: int) -> None:
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    torch.set_num_threads(threads)
    try:  # transformers chats about generation flags; the figures are what matter here
        import transformers
        transformers.logging.set_verbosity_error()
        hf_version = transformers.__version__
    except ImportError:
        raise SystemExit("bench.py compares with Hugging Face transformers: pip install -r requirements-test.txt")
    S = QUICK if quick else FULL
    if agree_prompts:
        S = Sizes(**{**asdict(S), "agree_prompts": agree_prompts})
    config = {"section": section, "threads": threads, "quick": quick, "seed": seed, "sizes": asdict(S)}
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
               "transformers": hf_version, "python": platform.python_version(), "load_avg_start": load_average()}
    print(f"bench.py  {json.dumps(config)}")
    machine["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "")
    print(f"machine   {os.cpu_count()} cores, torch {torch.__version__}, transformers {hf_version}, "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={machine['OMP_WAIT_POLICY'] or 'unset'}; "
          f"1-minute load average at start {machine['load_avg_start']:.2f}")
    if machine["load_avg_start"] > 0.5:
        print("          the machine is busy: read the ratios, each against a peer of this same run, not the "
              "absolute figures" + ("; spinning OpenMP threads make a busy machine noisier: "
                                   "OMP_WAIT_POLICY=PASSIVE helps" if not machine["OMP_WAIT_POLICY"] else ""))
    rep, figures = Report(), {}
    t0 = time.perf_counter()
    if section in ("model", "all"):
        figures["model"] = {}
        bench_model(rep, S, threads, figures["model"])
        rep.print("model")
    if section == "memory":
        figures["model"] = {}
        bench_memory(rep, S, threads, figures["model"])
        rep.print("model")
    if section in ("svf", "all"):
        figures["svf"] = {}
        bench_svf(rep, S, threads, seed, figures["svf"], figures.get("model", {}).get("peak_memory_bytes", {}))
        rep.print("svf")
    if section in ("adapt", "all"):
        figures["adapt"] = {}
        bench_adapt(rep, S, figures["adapt"])
        rep.print("adapt")
    machine["load_avg_end"], machine["seconds"] = load_average(), time.perf_counter() - t0
    targets = [r for r in rep.rows if r["ok"] is not None]
    if targets:
        print("\ntargets: " + ", ".join(f"{r['name']} {r['target']}: {'PASS' if r['ok'] else 'FAIL'}"
                                        for r in targets))
    print(f"\n1-minute load average at end {machine['load_avg_end']:.2f}; {machine['seconds']:.0f} s in all")
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps({"config": config, "machine": machine, "rows": rep.rows,
                                              "figures": figures}, indent=1, default=float))
        print(f"wrote {json_out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description="Speed and memory of the model and of SVF training, beside peers measured in the same run "
                    "(Hugging Face transformers, the plain base model).",
        formatter_class=HelpFormatter)
    p.add_argument("--section", choices=("model", "memory", "svf", "adapt", "all"), default="all",
                   help="model: loading, decoding, prefill, bfloat16, memory (issue 'foundation'); "
                        "memory: only the peak-memory part of model (3 min); "
                        "svf: decomposition, expert switching, one training step (issue 'trainer'); "
                        "adapt: first pass against second pass per unseen task, switching experts (issue "
                        "'adaptation')")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (also for the memory subprocesses)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes for development (one round per timing, fewer tokens and prompts; see QUICK "
                        "in this file) instead of the full run's (FULL)")
    p.add_argument("--agree-prompts", type=int, default=None,
                   help=f"task prompts for the bfloat16-vs-float32 greedy agreement (None: {FULL.agree_prompts}, "
                        f"or {QUICK.agree_prompts} with --quick)")
    p.add_argument("--json", dest="json_out", metavar="OUT", default=None,
                   help="also write every figure, the config and the machine's load average to this JSON file")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds python, numpy and torch (and the training step's sampling)")
    main(**vars(p.parse_args()))
