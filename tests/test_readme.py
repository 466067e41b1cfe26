"""The README teaches by pointing into the code: every `module.name` it names must exist, and
its reading order must list the files that are there, so that a move cannot leave the guide
pointing at nothing."""
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

# The reading order, one line per file, as the README lists it.
READING_ORDER = [
    "model.py", "completion.py", "fast.py", "engine.py", "generate.py", "tokenizer.py", "checkpoint.py",
    "svf.py", "replies.py", "config.py", "rl.py", "methods.py", "resume.py", "options.py", "lora.py", "loop.py", "adapt.py", "data/",
    "train.py", "eval.py", "experts.py", "records.py", "results.py", "bench.py", "cli.py", "dist.py",
    "data/sandbox.py",
]
# Our modules; a backticked `module.name` of one of them is a reference to check.
MODULES = [f.removesuffix(".py").removesuffix("/") for f in READING_ORDER if f != "data/sandbox.py"] + ["fetch"]
# The modules the README cites by name: those whose names stay put while files are moved.
CITED = {"checkpoint", "config", "data", "lora", "loop", "replies", "rl", "svf", "tokenizer"}
FILE_ENDINGS = {"py", "txt", "json", "jsonl", "md", "png", "safetensors", "gguf", "model"}


def named_in_readme() -> set[str]:
    pattern = rf"`(?:[^`]*?\W)?((?:{'|'.join(MODULES)})\.[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"
    found = re.findall(pattern, README)
    return {name for name in found if name.split(".")[1] not in FILE_ENDINGS}


def reading_order() -> list[str]:
    section = README.split("## Reading order\n")[1].split("\n## ")[0]
    return re.findall(r"^\d+\. `([^`]+)`: ", section, flags=re.M)


def test_readme_cites_exactly_the_stable_modules():
    assert {name.split(".")[0] for name in named_in_readme()} == CITED


def test_readme_names_exist():
    missing = []
    for name in sorted(named_in_readme()):
        module, *attrs = name.split(".")
        obj = importlib.import_module(module)
        for attr in attrs:
            obj = getattr(obj, attr, None)
            if obj is None:
                missing.append(name)
                break
    assert not missing, f"README names what the code does not have: {missing}"


def test_reading_order_is_the_planned_layout():
    assert reading_order() == READING_ORDER


def test_every_file_of_the_reading_order_exists():
    assert [f for f in READING_ORDER if not (ROOT / f).exists()] == []
