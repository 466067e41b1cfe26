"""Benchmarks: speed and memory of the model and of SVF training, each beside a peer from the same run.

One section per issue:

    model  (issue "foundation")  loading, greedy decoding at batch 1 and 16, prefill, the machine's
                                 memory-bandwidth ceiling for decoding, a bfloat16 CPU mode and peak
                                 memory, side by side with Hugging Face transformers on the same GGUF
    svf    (issue "trainer")     the SVD of the adapted matrices and its cache, switching experts, one
                                 REINFORCE step split into phases (paper section 3.1) against its floor:
                                 plain generation plus one forward/backward pass of the base model
    adapt  (issue "adaptation")  the first pass (classifying a question) against the second (answering
                                 it) on each unseen task, with and without the shared prefix; switching
                                 between the shipped experts
    scale  (issue 20, GPU only)  Llama-3-8B's shape in bfloat16 with seeded random weights, beside
                                 transformers on the same tensors: greedy decoding at batch 1/64/256, a
                                 compiled decode step, prefill, the SVD of the 96 MLP matrices, one SVF
                                 REINFORCE step against its floor, the two passes; peak GPU memory of each
                                 (`make bench-scale`; tests/test_bench_scale.py runs it tiny on the CPU)

Every figure is printed beside a peer measured in the same run, with the ratio between them, so the
ratios stay meaningful on a busy machine (the 1-minute load average is printed at start and end).
A timing is the best of --reps rounds, the contenders taking turns within a round; decoding speed is
(N - 1) new tokens over time(N tokens) - time(1 token), which leaves the prefill out. Peak memory is
the high-water mark (VmHWM) of a fresh interpreter per measurement.

    python bench.py --quick                       # small sizes, for development
    python bench.py --json results/bench.json     # the full run
"""
from __future__ import annotations

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
import cli
import config
import data
from data import cls
import fast
import rl
import svf
from engine import generate_all, generate_many
from fast import stacked
from model import ModelArgs, Transformer, generate, left_pad
from replies import common_prefix, micro_batches
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
    """Bytes per second that W @ x (one vector, the kernel fast.linear uses) reaches on w."""
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
        path = checkpoint.check_default_model()
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
    path = checkpoint.check_default_model()
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
    # The kernel fast.linear picks for few rows, on the shapes of the head and of an MLP matrix
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
        cfg = config.TrainConfig(task="gsm8k", batch_size=S.train_prompts, samples=S.train_samples,
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
        prompts = [tok.encode_chat(cls.classify_messages(q)) for q in questions]

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
    from experts import DOMAIN_EXPERTS, load_experts, resolve_experts
    names = DOMAIN_EXPERTS + ["cls"]
    experts = load_experts(model, resolve_experts(names, ROOT / "experts"))
    t_new = race({n: lambda n=n: svf.use_expert(model, experts[n], cache=True) for n in names}, 1)
    t_hit = race({n: lambda n=n: svf.use_expert(model, experts[n], cache=True) for n in names}, 5)
    svf.use_expert(model, None)
    new, hit = sum(t_new.values()) / len(names), sum(t_hit.values()) / len(names)
    figures["switch_s"] = {"new": t_new, "cached": t_hit}
    rep.add(sec, "switch to an expert, composed anew (s)", new, "s", "second pass of math (s)",
            figures["math"]["second_pass_s"], lower_is_better=True)
    rep.add(sec, "switch to an expert, cached (ms)", hit * 1e3, "ms", "composed anew (ms)", new * 1e3,
            lower_is_better=True)


# ----------------------------------------------------------------------------- section 5: rollouts
# Issue 16 item 2: a rollout engine near the machine's limit. A trainer's rollout (GSM8K train prompts x 16
# samples at temperature 1, 256 new tokens) at batch 32, 64 and 128: engine.generate_many against today's
# generate_all, transformers' sampling generate at the same batch, and a ceiling measured in the same run. At
# these batches decoding is bound by arithmetic, not memory, so the ceiling is the model's own matrix products:
# each distinct shape (q/k/v and gate/up stacked as fast.project runs them, o, down, the output head) timed
# alone at that batch with the faster of two kernels, summed over a decode step; tokens/s at most batch over
# that. It leaves out attention, norms and sampling, so 100% of it is out of reach.
@dataclass
class RolloutSizes:
    batches: tuple[int, ...] = (32, 64, 128)
    new_tokens: int = 256          # every sample runs the full count (no stop tokens): the same work for all
    samples: int = 16              # samples per prompt: a batch holds batch / samples GSM8K train prompts
    temperature: float = 1.0
    workload_batch: int = 64       # then a rollout with its stops (end of turn, "\nQuestion:"), where finished
    workload_prompts: int = 8      # rows are refilled: workload_prompts x samples sequences


ROLLOUT_FULL = RolloutSizes()
ROLLOUT_QUICK = RolloutSizes(batches=(32, 64), new_tokens=32, workload_batch=32, workload_prompts=4)


def matmul_ceiling(model, batch: int, reps: int = 3) -> dict:
    """The seconds one decode step's matrix products take at `batch` rows: each distinct shape timed alone on
    its own weights (the faster of F.linear(x, W) and W @ x^T), times how often a step runs it. Also the same
    products once each in the model's order, on every layer's own weights, with those kernels."""
    def shapes(layer):
        a, m = layer.attention, layer.mlp
        return [stacked((a.q, a.k, a.v))[0], a.o.weight, stacked((m.gate, m.up))[0], m.down.weight]
    first = shapes(model.layers[0]) + [model.output.weight]
    counts = [len(model.layers)] * 4 + [1]
    best, kernel = 0.0, []
    for w, n in zip(first, counts):
        w, x = w.detach(), torch.randn(batch, w.shape[1])
        k = max(1, round(4e9 / (2 * batch * w.numel())))   # ~4 GFLOP per timing
        t = race({"linear": lambda: [F.linear(x, w) for _ in range(k)],
                  "wx": lambda: [w @ x.t() for _ in range(k)]}, reps)
        kernel.append(min(t, key=t.get))
        best += n * min(t.values()) / k
    order = [(w.detach(), kernel[j]) for layer in model.layers for j, w in enumerate(shapes(layer))]
    order.append((model.output.weight.detach(), kernel[-1]))
    xs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w, _ in order}
    run = lambda: [F.linear(xs[w.shape[1]], w) if k == "linear" else w @ xs[w.shape[1]].t() for w, k in order]
    in_order = race({"t": run}, reps)["t"]
    flops = 2 * batch * sum(w.numel() for w, _ in order)
    return {"seconds_per_step": best, "seconds_per_step_in_order": in_order, "gflops": flops / best / 1e9,
            "gflops_in_order": flops / in_order / 1e9, "tok_s": batch / best, "tok_s_in_order": batch / in_order,
            "kernels": dict(zip(["qkv", "o", "gate_up", "down", "output"], kernel))}


@torch.inference_mode()
def hf_sample(hf, prompts: list[list[int]], n: int, pad_id: int, temperature: float, seed: int) -> torch.Tensor:
    """transformers' sampling generate (no top-k, no top-p), left-padded like ours, exactly n new tokens: (B, n)."""
    torch.manual_seed(seed)
    tokens, pad = left_pad(prompts, pad_id, "cpu")
    mask = (torch.arange(tokens.shape[1])[None] >= pad[:, None]).long()
    out = hf.generate(input_ids=tokens, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0,
                      top_p=1.0, min_new_tokens=n, max_new_tokens=n, pad_token_id=pad_id)
    return out[:, tokens.shape[1]:]


def bench_rollout(rep: Report, R: RolloutSizes, seed: int, figures: dict) -> None:
    sec = "rollout"
    figures["sizes"] = asdict(R)
    path = checkpoint.check_default_model()
    stage("rollout: load ours and transformers")
    model, tok = checkpoint.load(None, "cpu", "float32")
    hf = load_transformers(path)
    free, task, N, T = without_stops(tok), data.TASKS["gsm8k"], R.new_tokens, R.temperature
    problems = data.load("gsm8k", "train")
    prompts_for = lambda n: [tok.encode_chat(task.messages(problems[i // R.samples])) for i in range(n)]
    gen = lambda: torch.Generator().manual_seed(seed)
    contenders = lambda prompts, B, n: {
        "generate": lambda: generate_all(model, free, prompts, B, desc="generate", max_new_tokens=n,
                                         temperature=T, generator=gen()),
        "ours": lambda: generate_many(model, free, prompts, B, desc="ours", max_new_tokens=n, temperature=T,
                                      generator=gen()),
        "transformers": lambda: hf_sample(hf, prompts, n, tok.pad_id, T, seed)}
    race(contenders(prompts_for(4), 4, 4), 1)  # warm-up: first-call costs out of the timings
    for B in R.batches:
        stage(f"rollout: batch {B}, {B // R.samples} prompts x {R.samples} samples x {N} tokens: the ceiling")
        ceiling = matmul_ceiling(model, B)
        stage(f"rollout: batch {B}: generate_all, generate_many, transformers")
        t = race(contenders(prompts_for(B), B, N), 1)
        tps = {k: B * N / v for k, v in t.items()}
        figures[f"batch{B}"] = {"tok_s": tps, "seconds": t, "ceiling": ceiling, "load": load_average()}
        name = f"batch {B}: rollout tok/s"
        rep.add(sec, f"{name} vs today's generate", tps["ours"], "tok/s", "generate_all (today)", tps["generate"],
                ">= 2x", tps["ours"] >= 2 * tps["generate"])
        rep.add(sec, f"{name} vs transformers", tps["ours"], "tok/s", "transformers generate, sampling",
                tps["transformers"], ">= 1.5x", tps["ours"] >= 1.5 * tps["transformers"])
        rep.add(sec, f"{name} vs ceiling", tps["ours"], "tok/s", f"ceiling ({ceiling['gflops']:.0f} GFLOP/s)",
                ceiling["tok_s"], ">= 0.5x", tps["ours"] >= 0.5 * ceiling["tok_s"])
        rep.add(sec, f"batch {B}: ceiling, products in model order", ceiling["tok_s_in_order"], "tok/s",
                "ceiling, each shape alone", ceiling["tok_s"])
        rep.add(sec, f"batch {B}: today's generate vs ceiling", tps["generate"], "tok/s", "ceiling", ceiling["tok_s"])

    # A rollout as the trainer runs it: stops on, rows end at different steps, and generate_all's batches shrink
    # while generate_many refills them.
    B, prompts = R.workload_batch, prompts_for(R.workload_prompts * R.samples)
    stage(f"rollout: {len(prompts)} sequences with their stops, batch {B}")
    out = {}
    kw = dict(max_new_tokens=N, temperature=T, stop_strings=tuple(task.stop))
    t = race({"generate": lambda: out.__setitem__("generate", generate_all(model, tok, prompts, B, generator=gen(), **kw)),
              "ours": lambda: out.__setitem__("ours", generate_many(model, tok, prompts, B, generator=gen(), **kw))}, 1)
    n = {k: sum(len(c.tokens) for c in v) for k, v in out.items()}
    tps = {k: n[k] / t[k] for k in t}
    figures["with_stops"] = {"batch": B, "sequences": len(prompts), "tokens": n, "seconds": t, "tok_s": tps}
    rep.add(sec, f"with stops, batch {B}: rollout tok/s", tps["ours"], "tok/s", "generate_all (today)",
            tps["generate"], ">= 2x", tps["ours"] >= 2 * tps["generate"])
    rep.add(sec, f"with stops: mean new tokens per sequence", n["ours"] / len(prompts), "tok", "generate_all",
            n["generate"] / len(prompts))



# ----------------------------------------------------------------------------- section 4: the paper's scale (GPU)
# Issue 20: a Llama-3-8B-shaped model in bfloat16 on one GPU, beside transformers on the same weights. There are
# no real weights to bring, so both run transformers' own seeded initialisation: for speed and memory that is the
# same work. Every part also runs at a tiny shape on the CPU (tests/test_bench_scale.py), so a GPU session runs
# this one command and nothing else can fail on a typo.
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
LLAMA3_8B = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
                      norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE, max_seq_len=4096)


@dataclass
class ScaleSizes:
    decode_batches: tuple[int, ...] = (1, 64, 256)  # greedy decoding, ours against transformers' generate
    decode_tokens: int = 256          # new tokens of each decoding run
    prompt_len: int = 128             # random prompt tokens of the decoding and compiled-step runs
    prefill_rows: int = 8             # prefill: one forward pass of rows x length tokens
    prefill_len: int = 1024
    pass_questions: int = 16          # per unseen task: the first pass (classify) and the second (answer)
    pass_batch: int = 16
    second_pass_tokens: int = 0       # new tokens of a second-pass answer (0: the task's own budget)
    svd_matrices: int = 3             # MLP matrices decomposed for the timing (layer 0's gate, up, down); the
                                      # others reuse their factors (same shapes, same cost); >= all: svf.decompose
    train_prompts: int = 16           # one SVF REINFORCE step: prompts x samples x new tokens (64 x 256)
    train_samples: int = 4
    train_tokens: int = 256
    compile_backend: str = "inductor"  # torch.compile backend of the compiled decode step ("": skip that part)
    compile_batches: tuple[int, ...] = (1, 64)
    compile_steps: int = 64
    reps: int = 1                     # rounds of each timing; the best round counts
    budget_s: float = 330.0           # a part not started by then is skipped (its entry says so): ~6 min in all


SCALE = ScaleSizes()


class SyntheticTokenizer:
    """Ids for a model that has no tokenizer (random weights): one id per `chars` characters (Llama 3's
    tokenizer makes about 4 of English text), so prompts are as long as the real ones, the same text always
    gives the same ids and a shared system prompt stays shared. Nothing stops generation: every answer runs
    to its token budget."""
    pad_id, stop_ids, chars = 0, set(), 4

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return [1 + self.digest(text[i:i + self.chars]) % (self.vocab_size - 1)
                for i in range(0, len(text), self.chars)]

    @staticmethod
    def digest(chunk: str) -> int:  # the same in every run (Python's hash() of a str is not)
        h = 0
        for c in chunk:
            h = h * 131 + ord(c)
        return h

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode("".join(f"<{m['role']}>\n\n{m['content']}<eot>" for m in messages) + "<assistant>\n\n")

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


@dataclass
class Scale:
    """What the parts share: the two models on the same weights, the tokenizer, sizes and device."""
    args: ModelArgs
    S: ScaleSizes
    device: torch.device
    dtype: torch.dtype
    seed: int
    tok: SyntheticTokenizer
    model: Transformer | None = None
    hf: object = None
    svd: dict | None = None       # the factors scale_svd made, for scale_step
    floor: dict | None = None     # scale_floor's figures, scale_step's peer


def sync(device) -> None:
    """Wait for the GPU: a timing must include the kernels queued before it ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn, device):
    """fn, then sync(device)."""
    def run():
        fn()
        sync(device)
    return run


def memory_mark(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def memory_peak(device) -> dict:
    """GPU: the peak of allocated (and reserved) memory since memory_mark. CPU: the process's high-water mark,
    which is never reset (so only the first part's is its own)."""
    if device.type == "cuda":
        return {"peak_allocated_GB": torch.cuda.max_memory_allocated(device) / GB,
                "peak_reserved_GB": torch.cuda.max_memory_reserved(device) / GB}
    return {"process_peak_rss_GB": high_water() / GB}


def hf_llama(args: ModelArgs, device, dtype, seed: int):
    """transformers' LlamaForCausalLM of this shape, built on the device in `dtype` with its own seeded
    initialisation (normal, std 0.02; norms 1)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=args.dim, intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
                         num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
                         vocab_size=args.vocab_size, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                         rope_scaling=args.rope_scaling, max_position_embeddings=131072, tie_word_embeddings=False)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocated in bfloat16 at once: not 32 GB of float32 first
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return hf.eval().requires_grad_(False)


def ours_on(hf, args: ModelArgs) -> Transformer:
    """Our Transformer on transformers' tensors (no copy), renamed through checkpoint.HF_NAMES as a loaded
    folder is, checked and assigned as checkpoint.load_model does."""
    from model import rope_frequencies
    tensors = {checkpoint.rename(n, checkpoint.HF_NAMES, "transformers"): w for n, w in hf.state_dict().items()}
    with torch.device("meta"):
        model = Transformer(args)
    checkpoint.check_tensors(model, tensors, "transformers")
    model.load_state_dict(tensors, strict=True, assign=True)
    model.init_rope(rope_frequencies(args))
    return model.eval().requires_grad_(False)


def share_weights(hf, model: Transformer) -> None:
    """Point transformers' parameters at ours. Our first forward pass copied q/k/v and gate/up into stacked
    buffers (fast.stacked); without this both copies would stay (9 GB at 8B)."""
    ours = dict(model.named_parameters())
    for n, p in hf.named_parameters():
        p.data = ours[checkpoint.rename(n, checkpoint.HF_NAMES, "transformers")].data


@torch.inference_mode()
def hf_greedy(hf, x: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' greedy generate from unpadded prompts x (B, T), forced to exactly n new tokens: (B, n)."""
    out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, min_new_tokens=n,
                      max_new_tokens=n, pad_token_id=0)
    return out[:, x.shape[1]:]


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """How far two greedy decodings of the same prompts agree: tokens before each row's first difference (after
    it the contexts differ), as a share of all tokens, and the share of rows equal throughout."""
    first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
             for x, y in zip(ours, theirs)]
    return {"same_prefix_share": sum(first) / sum(len(x) for x in ours),
            "rows_equal": sum(f == len(x) == len(y) for f, x, y in zip(first, ours, theirs)) / len(ours)}


def scale_build(rep: Report, sc: Scale) -> dict:
    from model import rope_frequencies
    t0 = time.perf_counter()
    sc.hf = hf_llama(sc.args, sc.device, sc.dtype, sc.seed)
    t_hf = time.perf_counter() - t0
    sc.model = ours_on(sc.hf, sc.args)
    with torch.inference_mode():
        sc.model(torch.ones(1, 1, dtype=torch.long, device=sc.device))  # stacks q/k/v and gate/up
    share_weights(sc.hf, sc.model)
    params = sum(p.numel() for p in sc.model.parameters())
    bytes_ = sum(p.numel() * p.element_size() for p in sc.model.parameters())
    # the same rotary frequencies (Llama 3.1 scaling: the low ones divided by 8) in both, whatever this version
    # of transformers makes of the config
    theirs = getattr(sc.hf.model.rotary_emb, "inv_freq", None)
    ours = rope_frequencies(sc.args).to(sc.device)
    rope_diff = ((ours - theirs.float()).abs() / ours).max().item() if theirs is not None else float("nan")
    rep.add("scale", "parameters (billions)", params / 1e9, "B", "weights (GB)", bytes_ / GB)
    return {"parameters": params, "weight_GB": bytes_ / GB, "transformers_init_s": t_hf,
            "rope_inv_freq_max_rel_diff": rope_diff}


def scale_decode(rep: Report, sc: Scale) -> dict:
    """Greedy decoding of random prompts, forced to the full count (the synthetic tokenizer has no stop token,
    min_new_tokens for transformers): (N - 1) new tokens over time(N tokens) - time(1 token), per row."""
    S, dev, N, out = sc.S, sc.device, sc.S.decode_tokens, {}
    g = torch.Generator().manual_seed(sc.seed)
    for B in S.decode_batches:
        prompts = torch.randint(1, sc.args.vocab_size, (B, S.prompt_len), generator=g)
        x, rows = prompts.to(dev), prompts.tolist()
        got, peaks = {}, {}

        def contenders(n: int) -> dict:
            def measured(name, fn):
                def run():
                    memory_mark(dev)
                    got[name] = fn()
                    peaks[name] = memory_peak(dev)
                return synced(run, dev)
            return {"ours": measured("ours", lambda: generate(sc.model, sc.tok, rows, n)),
                    "transformers": measured("transformers", lambda: hf_greedy(sc.hf, x, n))}

        stage(f"scale: greedy decoding, batch {B}")
        race(contenders(2), 1)  # warm-up
        t1 = race(contenders(1), S.reps)
        tn = race(contenders(N), S.reps)
        tps = {k: B * (N - 1) / max(tn[k] - t1[k], 1e-9) for k in tn}
        agree = agreement([c.tokens for c in got["ours"]], got["transformers"].tolist())
        out[f"batch{B}"] = {"tok_s": tps, "seconds_1_token": t1, f"seconds_{N}_tokens": tn, **agree,
                            f"peak_memory_{N}_tokens": peaks}
        rep.add("scale", f"decode tok/s, batch {B}", tps["ours"], "tok/s", "transformers generate",
                tps["transformers"])
        rep.add("scale", f"  greedy tokens before the first difference", agree["same_prefix_share"], "share",
                "all tokens", 1.0)
    return out


def scale_prefill(rep: Report, sc: Scale) -> dict:
    """One forward pass of rows x length random tokens into a KV cache, last-position logits only."""
    S, dev = sc.S, sc.device
    x = torch.randint(1, sc.args.vocab_size, (S.prefill_rows, S.prefill_len),
                      generator=torch.Generator().manual_seed(sc.seed)).to(dev)
    logits = {}

    @torch.inference_mode()
    def ours():
        logits["ours"] = sc.model(x, None, sc.model.new_cache(*x.shape), 0, last=1)[:, -1]

    @torch.inference_mode()
    def theirs():
        logits["transformers"] = sc.hf(input_ids=x, use_cache=True, logits_to_keep=1).logits[:, -1].float()

    race({"ours": synced(ours, dev), "transformers": synced(theirs, dev)}, 1)  # warm-up
    t = race({"ours": synced(ours, dev), "transformers": synced(theirs, dev)}, S.reps + 1)
    tps = {k: x.numel() / v for k, v in t.items()}
    a, b = logits["ours"], logits["transformers"]
    out = {"tok_s": tps, "seconds": t, "logits_max_abs_diff": (a - b).abs().max().item(),
           "logits_max_abs": b.abs().max().item(), "argmax_equal": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}
    rep.add("scale", f"prefill tok/s, {S.prefill_rows}x{S.prefill_len} tokens", tps["ours"], "tok/s",
            "transformers forward", tps["transformers"])
    rep.add("scale", "  last logits max |ours - transformers|", out["logits_max_abs_diff"], "", "max |logit|",
            out["logits_max_abs"], lower_is_better=True)
    return out


def scale_passes(rep: Report, sc: Scale) -> dict:
    """Paper Table 3 at 8B: the first pass (adapt.classify, the prompt strategy's: one packed forward pass per
    batch) against the second (greedy answers to the task's token budget; a random model never stops early, so
    this is the second pass's upper bound) on the unseen tasks' own prompts, at the lengths Llama 3 gives them."""
    import adapt
    S, dev, out = sc.S, sc.device, {}
    for name in data.UNSEEN:
        task = data.TASKS[name]
        problems = data.load(name, "test")[:S.pass_questions]
        questions = [task.messages(p)[-1]["content"] for p in problems]   # what eval.py's first pass reads
        answers = [sc.tok.encode_chat(task.messages(p)) for p in problems]
        n_new = S.second_pass_tokens or task.max_new_tokens
        done = {}

        def first(qs: list[str] = questions) -> None:
            adapt.classify(sc.model, sc.tok, qs, None, S.pass_batch)

        def second() -> None:
            done["comps"] = generate_all(sc.model, sc.tok, answers, S.pass_batch, desc="second pass",
                                         max_new_tokens=n_new, stop_strings=tuple(task.stop))

        synced(lambda: first(questions[:2]), dev)()  # warm-up: the first call pays allocations
        stage(f"scale: {name}, {len(problems)} questions: first pass, then second (up to {n_new} new tokens)")
        t = race({"first": synced(first, dev)}, S.reps)
        t["second"] = race({"second": synced(second, dev)}, 1)["second"]
        comps = done["comps"]
        prompts = [sc.tok.encode_chat(cls.classify_messages(q)) for q in questions]
        out[name] = {"questions": len(problems), "first_pass_s": t["first"], "second_pass_s": t["second"],
                     "first_pass_prompt_tokens": sum(map(len, prompts)) / len(prompts),
                     "second_pass_prompt_tokens": sum(map(len, answers)) / len(answers),
                     "second_pass_tokens": sum(len(c.tokens) for c in comps),
                     "shared_tokens": common_prefix(prompts)}
        rep.add("scale", f"{name}: first pass / second pass", t["first"] / t["second"], "", "paper: 0.13-0.47", 1.0,
                lower_is_better=True)
    return out


def scale_svd(rep: Report, sc: Scale) -> dict:
    """The SVD of the MLP matrices: seconds (as svf.decompose computes it: float32, thin) and the bytes of
    U, s and V^T in float32 and in bfloat16, beside the matrices' own. Decomposing all 96 of Llama-3-8B takes
    minutes, so by default a sample is timed and the rest reuse its factors for the training step."""
    model, dev, S = sc.model, sc.device, sc.S
    names = svf.target_names(model, "mlp")
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    numbers = sum(m * min(m, k) + min(m, k) + min(m, k) * k for m, k in shapes.values())  # U (m, r), s, V^T (r, n)
    base = sum(model.get_submodule(n).weight.numel() * model.get_submodule(n).weight.element_size() for n in names)
    out = {"matrices": len(names), "factors_float32_GB": numbers * 4 / GB, "factors_bfloat16_GB": numbers * 2 / GB,
           "matrices_GB": base / GB}
    torch.linalg.svd(torch.randn(64, 64, device=dev))  # warm-up: the first call sets up the solver
    before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    if S.svd_matrices >= len(names):
        sync(dev)
        t0 = time.perf_counter()
        sc.svd = svf.decompose(model, "mlp", cache=False)  # not cached: 29 GB of factors at 8B
        sync(dev)
        seconds, sample = time.perf_counter() - t0, names
        out |= {"decomposed": len(names), "seconds_all": seconds, "seconds_per_matrix": seconds / len(names)}
    else:
        sample = names[:S.svd_matrices]
        for n in names:  # and one matrix of every shape not sampled yet
            if shapes[n] not in {shapes[m] for m in sample}:
                sample.append(n)
        times, factors = [], {}
        for n in sample:
            w = model.get_submodule(n).weight
            sync(dev)
            t0 = time.perf_counter()
            U, s, Vh = torch.linalg.svd(w.float(), full_matrices=False)  # as svf.decompose computes it
            sync(dev)
            times.append(time.perf_counter() - t0)
            factors[n] = svf.SVD(U.contiguous(), s.contiguous(), Vh.contiguous())
        # the others: copies of sampled factors of their shape (memory of their own, the same cost to use)
        like = {}
        for n in sample:
            like.setdefault(shapes[n], factors[n])
        sc.svd = {n: factors.get(n) or svf.SVD(like[shapes[n]].U.clone(), like[shapes[n]].s.clone(),
                                               like[shapes[n]].Vh.clone()) for n in names}
        per = sum(times) / len(times)
        out |= {"decomposed": len(sample), "seconds_per_matrix": per, "seconds_all_estimated": per * len(names),
                "seconds_sample": times}
    if dev.type == "cuda":
        out["factors_held_GB_measured"] = (torch.cuda.memory_allocated(dev) - before) / GB
    # how well the factors give W back (one sampled matrix), kept in float32 and rounded to bfloat16: a change
    # of z smaller than the bfloat16 error would be lost under it
    n = sample[0]
    w, d = model.get_submodule(n).weight.float(), sc.svd[n]
    err = lambda U, s, Vh: ((U.float() * s.float()) @ Vh.float() - w).norm().item() / w.norm().item()
    out["relative_error_float32_factors"] = err(d.U, d.s, d.Vh)
    out["relative_error_bfloat16_factors"] = err(d.U.bfloat16(), d.s.bfloat16(), d.Vh.bfloat16())
    total = out.get("seconds_all", out.get("seconds_all_estimated"))
    rep.add("scale", f"SVD of {len(names)} MLP matrices (s{'' if 'seconds_all' in out else ', estimated'})", total,
            "s", "seconds per matrix", out["seconds_per_matrix"], lower_is_better=True)
    rep.add("scale", "  U, s, V^T in float32 (GB)", out["factors_float32_GB"], "GB", "the matrices (GB)",
            out["matrices_GB"], lower_is_better=True)
    rep.add("scale", "  U, s, V^T in bfloat16 (GB)", out["factors_bfloat16_GB"], "GB", "the matrices (GB)",
            out["matrices_GB"], lower_is_better=True)
    return out


def scale_train_setup(sc: Scale):
    """The trainer's configuration and GSM8K prompts of one step: prompts x samples x new tokens, with the
    exact KL (kl_coef 0.1) and no baseline (the paper's), so the random model's rewards still make an update."""
    S = sc.S
    cfg = config.TrainConfig(task="gsm8k", batch_size=S.train_prompts, samples=S.train_samples,
                         max_new_tokens=S.train_tokens, gen_batch=S.train_prompts * S.train_samples, baseline="none",
                         seed=sc.seed)
    task = data.TASKS[cfg.task]
    problems = data.load(cfg.task, "train")[:cfg.batch_size]
    return cfg, task, problems


def scale_floor(rep: Report, sc: Scale) -> dict:
    """The step's floor on the bare model: plain generation of the same rollouts, then one forward and backward
    pass over their tokens, packed as the trainer packs them (a prompt once, then its samples: replies.reply_logits),
    with gradients on the matrices SVF adapts."""
    from replies import reply_logits
    cfg, task, problems = scale_train_setup(sc)
    model, dev = sc.model, sc.device
    unwrap(model)
    prompts = [sc.tok.encode_chat(task.messages(p)) for p in problems for _ in range(cfg.samples)]
    done = {}

    def generation() -> None:  # as the step's rollout samples: same temperature, same seed
        done["comps"] = generate_all(model, sc.tok, prompts, cfg.gen_batch, desc="floor",
                                     max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                     top_p=cfg.top_p, stop_strings=tuple(task.stop),
                                     generator=torch.Generator(dev).manual_seed(sc.seed))

    t_gen = race({"g": synced(generation, dev)}, 1)["g"]
    comps, gen_peak = done["comps"], memory_peak(dev)
    weights = [model.get_submodule(n).weight for n in svf.target_names(model, cfg.targets)]
    firsts = prompts[::cfg.samples]
    samples = [[c.tokens for c in comps[i:i + cfg.samples]] for i in range(0, len(comps), cfg.samples)]
    widths = [len(p) + sum(map(len, s)) for p, s in zip(firsts, samples)]

    def forward_backward():
        for micro in micro_batches(widths, max(1, cfg.micro_batch // cfg.samples), cfg.micro_tokens):
            logits, targets, _ = reply_logits(model, [firsts[i] for i in micro], [samples[i] for i in micro],
                                              sc.tok.pad_id)
            (-torch.log_softmax(logits, -1).gather(-1, targets[:, None]).sum() / len(comps)).backward()

    for w in weights:
        w.requires_grad_(True)
    try:
        t_fb = race({"fb": synced(forward_backward, dev)}, 1)["fb"]
    finally:
        for w in weights:
            w.grad = None
            w.requires_grad_(False)
    tokens = sum(len(c.tokens) for c in comps)
    return {"rollouts": len(comps), "tokens": tokens, "t_generate": t_gen, "t_forward_backward": t_fb,
            "t_total": t_gen + t_fb, "generate_tok_s": tokens / t_gen, "peak_memory_generation": gen_peak}


def scale_step(rep: Report, sc: Scale) -> dict:
    """One REINFORCE step of the trainer (rl.train_step: rollout, scoring, log-probs and exact KL with gradients
    in z, AdamW) on SVF experts of the 96 MLP matrices."""
    cfg, task, problems = scale_train_setup(sc)
    model, dev = sc.model, sc.device
    svf.attach(model, sc.svd)
    try:
        # a step in mid-training: z off 1, so that the rollout composes an expert and the exact KL is computed
        g = torch.Generator().manual_seed(sc.seed)
        z = {n: torch.nn.Parameter(v + 1e-3 * torch.randn(v.shape, generator=g).to(v))
             for n, v in svf.ones(model).items()}
        opt = torch.optim.AdamW(z.values(), lr=cfg.lr, weight_decay=0.0)
        s = {}
        synced(lambda: s.update(rl.train_step(model, sc.tok, task, problems, z, opt, cfg,
                                              torch.Generator(dev).manual_seed(sc.seed))), dev)()
    finally:
        unwrap(model)
        sc.svd = None  # the factors are not needed after this part
    s["t_optimizer"] = s["t_step"] - s["t_rollout"] - s["t_score"] - s["t_backward"]
    floor, n = sc.floor, f"{cfg.batch_size}x{cfg.samples}x{cfg.max_new_tokens}"
    if floor:
        rep.add("scale", f"SVF step {n}: whole step (s)", s["t_step"], "s", "floor: generation + fwd/bwd",
                floor["t_total"], lower_is_better=True)
        rep.add("scale", f"  rollout (s)", s["t_rollout"], "s", "plain generation", floor["t_generate"],
                lower_is_better=True)
        rep.add("scale", f"  log-probs + KL + backward (s)", s["t_backward"], "s", "base forward/backward",
                floor["t_forward_backward"], lower_is_better=True)
    return s


@torch.inference_mode()
def decode_step_seconds(sc: Scale, B: int, steps: int, blocks: list | None = None) -> float:
    """Seconds per decode step at batch B, after an eager prefill of random prompts into the model's KV cache;
    blocks: the steps run through these (compiled) blocks instead of the model's own. Each step feeds its argmax
    back without waiting for the GPU, so the time is the larger of launching the step and running it."""
    model, dev, T = sc.model, sc.device, sc.S.prompt_len
    x = torch.randint(1, sc.args.vocab_size, (B, T), generator=torch.Generator().manual_seed(B)).to(dev)
    cache = model.new_cache(B, T + steps)
    tok = model(x, None, cache, 0, last=1)[:, -1].argmax(-1, keepdim=True)
    own = list(model.layers)
    for i, block in enumerate(blocks or own):
        model.layers[i] = block
    try:
        run = synced(lambda: [tok.copy_(model(tok, None, cache, T + i)[:, -1].argmax(-1, keepdim=True))
                              for i in range(steps)], dev)
        return race({"t": run}, 1)["t"] / steps
    finally:
        for i, block in enumerate(own):
            model.layers[i] = block


def scale_compile(rep: Report, sc: Scale) -> dict:
    """gpt-fast's idea: torch.compile one decode step (each block compiled once and reused by all 32: dynamic
    shapes, since a step reads a growing slice of the preallocated KV cache; no CUDA graphs), against eager.
    Optional: a compile failure is recorded as a note, not an error."""
    S = sc.S
    if not S.compile_backend:
        return {"not_run": "compile_backend is empty"}
    unwrap(sc.model)
    out = {"backend": S.compile_backend, "mode": "default, dynamic=True, per block"}
    try:
        blocks = [torch.compile(b, dynamic=True, backend=S.compile_backend) for b in sc.model.layers]
        for B in S.compile_batches:
            decode_step_seconds(sc, B, 2)  # warm-up
            eager = decode_step_seconds(sc, B, S.compile_steps)
            t0 = time.perf_counter()
            decode_step_seconds(sc, B, 2, blocks)  # compiles (once for batch 1, once for the others)
            t_compile = time.perf_counter() - t0
            compiled = decode_step_seconds(sc, B, S.compile_steps, blocks)
            out[f"batch{B}"] = {"eager_step_s": eager, "compiled_step_s": compiled, "compile_s": t_compile}
            rep.add("scale", f"compiled decode step, batch {B} (ms)", compiled * 1e3, "ms", "eager step (ms)",
                    eager * 1e3, lower_is_better=True)
    except Exception as e:  # noqa: BLE001 -- optional part: any failure of the compiler is a note
        out["note"] = f"torch.compile failed, part skipped: {type(e).__name__}: {str(e)[:1500]}"
    return out


def bench_scale(rep: Report, figures: dict, args: ModelArgs = LLAMA3_8B, S: ScaleSizes = SCALE, device="cuda",
                dtype=torch.bfloat16, seed: int = 0, save=None) -> None:
    """All parts in order, each timed with its peak memory and saved (save()) as soon as it ends, so a run cut
    short keeps what it measured. A part that fails records its error and the next one runs."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("bench.py --section scale compares with Hugging Face transformers: pip install transformers")
    device = torch.device(device)
    sc = Scale(args, S, device, dtype, seed, SyntheticTokenizer(args.vocab_size))
    figures["config"] = {"args": asdict(args), "sizes": asdict(S), "dtype": str(dtype).removeprefix("torch."),
                         "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    # the floor before the SVD: its peak memory is the bare model's, without the factors the step holds
    parts = [("build", scale_build), ("decode", scale_decode), ("prefill", scale_prefill),
             ("passes", scale_passes), ("floor", scale_floor), ("svd", scale_svd), ("svf_step", scale_step),
             ("compile", scale_compile)]
    start = time.perf_counter()
    for name, part in parts:
        if sc.model is None and name != "build" or time.perf_counter() - start > S.budget_s:
            figures[name] = {"not_run": "the model was not built" if sc.model is None else
                             f"not started: {S.budget_s:.0f} s of the budget were spent"}
            continue
        stage(f"scale: {name}")
        memory_mark(device)
        t0 = time.perf_counter()
        try:
            figures[name] = part(rep, sc)
        except Exception as e:  # noqa: BLE001 -- one failed part (out of memory, say) must not lose the others
            import traceback
            traceback.print_exc()
            figures[name] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
            import gc
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        figures[name] |= {"seconds": time.perf_counter() - t0, **memory_peak(device)}
        if name == "floor" and "error" not in figures[name]:
            sc.floor = figures[name]
        if save:
            save()
    peak = lambda f: f.get("peak_allocated_GB", f.get("process_peak_rss_GB", float("nan")))
    if "t_step" in figures.get("svf_step", {}) and sc.floor:
        rep.add("scale", "SVF step: peak memory (GB)", peak(figures["svf_step"]), "GB", "floor's peak (GB)",
                peak(figures["floor"]), lower_is_better=True)


# ----------------------------------------------------------------------------- command line
def bench_sandbox(rep: Report, figures: dict, workers: int = 4) -> None:
    """Programs per second on the MBPP reference solutions in each isolation mode this machine
    has; the peer is the process-only mode. mbpp/123 is left out: its reference alone takes
    ~6 s of CPU, so the run would time that one program instead of the sandbox."""
    from concurrent.futures import ThreadPoolExecutor

    from data import sandbox
    mbpp = data.TASKS["mbpp"]
    problems = [p for split in data.SPLITS["mbpp"] for p in data.load("mbpp", split)
                if p["id"] != "mbpp/123"]
    jobs = [(mbpp.program(p, mbpp.reference_response(p)), p["tests"]) for p in problems]
    modes = [sandbox.PROCESS_ONLY] + ([sandbox.NAMESPACES]
                                      if sandbox.isolation() == sandbox.NAMESPACES else [])
    for mode in modes:
        stage(f"sandbox: {len(jobs)} MBPP reference solutions, {mode}, {workers} workers")
        began = time.monotonic()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda job: sandbox.run_once(
                *job, timeout=60, memory_mb=1024, namespaces=mode == sandbox.NAMESPACES), jobs))
        wall = time.monotonic() - began
        seconds = sorted(r.seconds for r in results)
        figures[mode] = {"programs_per_s": len(jobs) / wall, "passed": sum(r.passed for r in results),
                         "programs": len(jobs), "median_ms": 1000 * seconds[len(seconds) // 2]}
    base = figures[sandbox.PROCESS_ONLY]["programs_per_s"]
    for mode in modes:
        f = figures[mode]
        rep.add("sandbox", f"{mode}: programs/s ({f['passed']}/{f['programs']} passed)",
                f["programs_per_s"], "prog/s", "process only", base)


def main(section: str, threads: int, quick: bool, agree_prompts: int | None, json_out: str | None,
         seed: int) -> None:
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    torch.set_num_threads(threads)
    fast.enable()  # the speed path the command lines run
    try:  # transformers chats about generation flags; the figures are what matter here
        import transformers
        transformers.logging.set_verbosity_error()
        hf_version = transformers.__version__
    except ImportError:
        raise SystemExit("bench.py compares with Hugging Face transformers: "
                         "pip install -r requirements-test.txt")
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
    if section in ("rollout", "all"):
        figures["rollout"] = {}
        bench_rollout(rep, ROLLOUT_QUICK if quick else ROLLOUT_FULL, seed, figures["rollout"])
        rep.print("rollout")
    if section in ("sandbox", "all"):
        figures["sandbox"] = {}
        bench_sandbox(rep, figures["sandbox"])
        rep.print("sandbox")
    if section == "scale":  # not in "all": it needs a CUDA GPU (and writes its JSON as it goes: $OUT by default)
        if not torch.cuda.is_available():
            raise SystemExit("bench.py --section scale needs a CUDA GPU (tests/test_bench_scale.py runs it at a tiny "
                             "shape on the CPU)")
        json_out = json_out or (os.environ.get("OUT") and str(Path(os.environ["OUT"]) / "bench-scale.json"))
        machine["gpu"], figures["scale"] = torch.cuda.get_device_name(), {}

        def save() -> None:
            if json_out:
                Path(json_out).parent.mkdir(parents=True, exist_ok=True)
                Path(json_out).write_text(json.dumps({"config": config, "machine": machine, "rows": rep.rows,
                                                      "figures": figures, "partial": True}, indent=1, default=float))
        bench_scale(rep, figures["scale"], seed=seed, save=save)
        rep.print("scale")
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
    p = cli.parser("Speed and memory of the model and of SVF training, beside peers measured in\n"
                   "the same run (Hugging Face transformers, the plain base model).")
    sections = ("model", "memory", "svf", "adapt", "rollout", "sandbox", "scale", "all")
    p.add_argument("--section", choices=sections, default="all",
                   help="model: loading, decoding, prefill, bfloat16, memory (issue 'foundation'); "
                        "memory: only the peak-memory part of model; "
                        "svf: decomposition, expert switching, one training step (issue 'trainer'); "
                        "adapt: first pass against second pass per unseen task, switching experts "
                        "(issue 'adaptation'); rollout: generate_many against generate_all, "
                        "transformers and the matrix-product ceiling at batch 32, 64, 128 (issue "
                        "16); sandbox: MBPP reference solutions per second in each isolation mode; "
                        "scale: Llama-3-8B's shape in bfloat16 on a CUDA GPU beside "
                        "transformers, not part of all (issue 20)")
    p.add_argument("--threads", type=cli.positive_int, default=2,
                   help="torch CPU threads (also for the memory subprocesses)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes for development (one round per timing, fewer tokens and "
                        "prompts; see QUICK in this file) instead of the full run's (FULL)")
    p.add_argument("--agree-prompts", type=cli.positive_int, default=None,
                   help="task prompts for the bfloat16-vs-float32 greedy agreement "
                        f"(None: {FULL.agree_prompts}, or {QUICK.agree_prompts} with --quick)")
    p.add_argument("--json", dest="json_out", metavar="OUT", type=cli.output_file, default=None,
                   help="also write every figure, the config and the machine's load average to "
                        "this JSON file")
    p.add_argument("--seed", type=cli.seed, default=0,
                   help="seeds python, numpy and torch (and the training step's sampling)")
    args = p.parse_args()
    if args.section == "scale" and not torch.cuda.is_available():
        p.error("--section scale needs a CUDA GPU (tests/test_bench_scale.py runs it at a tiny "
                "shape on the CPU)")
    main(**vars(args))
