"""generate.py, the command line that tries the model on a prompt: what it prints is
model.generate's continuation, it seeds its sampling, and importing the model pulls in
neither the loader nor the command line (the old model.py <-> checkpoint.py cycle)."""
import subprocess
import sys
from pathlib import Path

import pytest

import generate as command
from model import generate

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"


@pytest.fixture
def loaded(real, monkeypatch):
    """generate.main on the session's model: loading it again for each run is the slow part
    (test_runs_as_a_command loads it as a user does)."""
    monkeypatch.setattr(command, "load", lambda path, device, dtype: real)
    return real


def run(capsys, **flags) -> tuple[str, str, str]:
    """generate.main with the command line's defaults: the load line, the text, the stats line."""
    kw = dict(prompt=PROMPT, max_new_tokens=8, chat=False, model_path=None, device="cpu",
              dtype="float32", temperature=0.0, top_p=1.0, seed=0)
    command.main(**{**kw, **flags})
    loaded, rest = capsys.readouterr().out.split("\n", 1)
    text, stats = rest.rstrip("\n").rsplit("\n", 1)
    return loaded, text, stats


def test_importing_the_model_loads_nothing_else_of_ours():
    ours = "{'checkpoint', 'cli', 'engine', 'fast', 'fetch', 'tokenizer'}"
    code = f"import sys, model; print(sorted({ours} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.real
def test_prints_the_prompt_and_the_greedy_continuation(loaded, capsys):
    model, tok = loaded
    [want] = generate(model, tok, [tok.encode(PROMPT, bos=tok.add_bos)], 8)
    loaded, text, stats = run(capsys)
    assert loaded.startswith("loaded in ")
    assert text == PROMPT + want.text
    assert stats.startswith(f"[{len(want.tokens)} tokens in ") and f"finish={want.finish}" in stats


@pytest.mark.real
def test_chat_wraps_the_prompt_in_the_template(loaded, capsys):
    model, tok = loaded
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    [want] = generate(model, tok, [ids], 12)
    _, text, _ = run(capsys, prompt="What is the capital of France?", chat=True, max_new_tokens=12)
    assert text == want.text  # the reply alone: the template is not echoed


@pytest.mark.real
def test_the_seed_repeats_a_sample(loaded, capsys):
    sample = lambda seed: run(capsys, temperature=1.0, top_p=0.9, seed=seed, max_new_tokens=12)[1]
    assert sample(3) == sample(3)


@pytest.mark.real
def test_runs_as_a_command():
    p = subprocess.run([sys.executable, "generate.py", "--prompt", PROMPT, "--max-new-tokens", "8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[1].startswith(PROMPT)
