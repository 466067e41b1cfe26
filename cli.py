"""What every command line shares (train.py, eval.py, generate.py, bench.py, results.py,
fetch.py, python -m data): one parser and help formatter, flags built from a config
dataclass (option, add_options), argparse types that refuse a bad value with a message
naming the problem, and fail(), the one-line exit for a bad input file.

A bad flag or file ends the command with status 2 and no traceback: argparse prints its usage
line and `PROG: error: argument --FLAG: ...`, fail() prints `error: ...`. Tracebacks are left
for bugs. Standard library only (results.py runs without torch; device() imports it when used).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

# --dtype's choices (auto: float32 on CPU, bfloat16 on CUDA)
DTYPES = ("auto", "float32", "bfloat16", "float16")


class BadInput(SystemExit):
    """What fail() raises: exit status 2; str() is the message, for tests and callers that catch
    it."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return f"error: {self.message}"


def fail(message: str) -> NoReturn:
    """End the command on a bad input: `error: MESSAGE` as one line on stderr, exit status 2
    (argparse's)."""
    message = " ".join(message.split())  # one line, whatever the message held
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise BadInput(message)


# ----------------------------------------------------------------------------- parsers
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of every command line: the description's line breaks kept, every default shown but
    None (there the flag's help says what it means)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parser(description: str) -> argparse.ArgumentParser:
    """The one ArgumentParser every script starts from."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def option(default: Any, help: str, type: Callable | None = None,
           choices: tuple | None = None) -> Any:
    """A config dataclass field that is also a command-line flag: its default is written once, here,
    and add_options() turns it into --the-field-name with this help, type and choices."""
    return dataclasses.field(default=default, metadata=dict(help=help, type=type, choices=choices))


def add_options(p: argparse.ArgumentParser, config: type, defaults: dict | None = None,
                notes: dict | None = None) -> None:
    """One flag per field of the dataclass `config` that was declared with option(): a bool is a
    switch (--name), anything else takes a value. defaults overrides a field's default on the
    command line only (None: the command fills it in later); notes adds to a field's help (what
    that None means)."""
    defaults, notes = defaults or {}, notes or {}
    for f in dataclasses.fields(config):
        if "help" not in f.metadata:
            continue
        flag, default = "--" + f.name.replace("_", "-"), defaults.get(f.name, f.default)
        text = f.metadata["help"] + notes.get(f.name, "")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action="store_true", help=text)
        else:
            p.add_argument(flag, default=default, type=f.metadata["type"],
                           choices=f.metadata["choices"], help=text)


def add_device_options(p: argparse.ArgumentParser) -> None:
    """--device and --dtype, as every command that loads the model takes them."""
    p.add_argument("--device", type=device, default="auto",
                   help="cpu, cuda, cuda:N or mps (auto: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="float32, bfloat16 or float16 (auto: float32 on CPU, bfloat16 on CUDA)")


# ----------------------------------------------------------------------------- argparse types
# Each takes the flag's text and returns its value, or raises ArgumentTypeError; argparse then
# prints
# "argument --FLAG: MESSAGE" and exits with status 2.
def _number(text: str, kind: type) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        wanted = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    if (n := _number(text, int)) < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return n


def non_negative_int(text: str) -> int:
    if (n := _number(text, int)) < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return n


def seed(text: str) -> int:
    """numpy's seeds are 0 ... 2**32 - 1."""
    if not 0 <= (n := _number(text, int)) < 2 ** 32:
        raise argparse.ArgumentTypeError(f"a seed is an integer from 0 to 2**32 - 1, got {text}")
    return n


def positive_float(text: str) -> float:
    if not (x := _number(text, float)) > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return x


def non_negative_float(text: str) -> float:
    if not (x := _number(text, float)) >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return x


def probability(text: str) -> float:
    """In (0, 1]: a nucleus (top-p) threshold."""
    if not 0 < (x := _number(text, float)) <= 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1, got {text}")
    return x


def fraction(text: str) -> float:
    """In [0, 1): a dropout rate."""
    if not 0 <= (x := _number(text, float)) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and less than 1, got {text}")
    return x


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def existing_folder(text: str) -> str:
    if not Path(text).is_dir():
        why = "not a folder" if Path(text).exists() else "no such folder"
        raise argparse.ArgumentTypeError(f"{text}: {why}")
    return text


def model_path(text: str) -> str:
    """A .gguf file or a Hugging Face checkpoint folder (what is inside is checked where it is
    read)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    if not (path.is_dir() or path.suffix == ".gguf"):
        raise argparse.ArgumentTypeError(f"{text}: expected a .gguf file or a Hugging Face "
                                         "checkpoint folder")
    return text


def _writable_below(path: Path, text: str) -> None:
    """The nearest existing folder above path can be written to (the command makes the rest)."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot write into {parent}")


def output_folder(text: str) -> str:
    """A folder the command writes into: an existing folder, or one it can make."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    _writable_below(path, text)
    return text


def output_file(text: str) -> str:
    """A file the command writes: not a folder, and its folder exists or can be made."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    _writable_below(path, text)
    return text


def device(text: str) -> str:
    """auto, cpu, cuda, cuda:N or mps, refused when this machine has no such device."""
    if text == "auto":
        return text
    import torch
    try:
        dev = torch.device(text)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: choose auto, cpu, cuda, "
                                         "cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA GPU that torch can "
                                         "use (try cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise argparse.ArgumentTypeError(f"{text}: this machine has {n} CUDA GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine (try cpu "
                                         "or auto)")
    return text
