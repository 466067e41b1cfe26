"""Every command line explains every flag: each option has a help text, and --help shows no
meaningless "(default: None)". The parsers are built inside each script's __main__ block, so the
script is run as __main__ with parse_args replaced by a function that hands the parser back."""
import argparse
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["generate.py", "train.py", "eval.py", "bench.py", "results.py", "fetch.py", "data/__main__.py"]


class Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def parser_of(script: str, monkeypatch) -> argparse.ArgumentParser:
    def grab(self, *args, **kwargs):
        raise Parsed(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    monkeypatch.setattr("sys.argv", [script])
    with pytest.raises(Parsed) as caught:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    return caught.value.parser


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help(script, monkeypatch):
    parser = parser_of(script, monkeypatch)
    options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert options, f"{script}: no options found"
    missing = [a.dest for a in options if not (a.help or "").strip()]
    assert not missing, f"{script}: options without help: {missing}"
    text = parser.format_help()
    assert "(default: None)" not in text, f"{script}: --help shows '(default: None)'"
    assert parser.description and parser.description.strip(), f"{script}: no description"


def test_add_options_makes_one_flag_per_option_field():
    import dataclasses
    import cli

    @dataclasses.dataclass
    class Config:
        count: int = cli.option(3, "how many", cli.positive_int)
        loud: bool = cli.option(False, "a switch")
        kind: str = cli.option("a", "which one", choices=("a", "b"))
        internal: int = 1  # not an option(): no flag

    p = cli.parser("test")
    cli.add_options(p, Config, defaults={"kind": None}, notes={"kind": " (default: the first)"})
    assert vars(p.parse_args([])) == {"count": 3, "loud": False, "kind": None}
    assert vars(p.parse_args(["--count", "5", "--loud", "--kind", "b"])) == {"count": 5, "loud": True, "kind": "b"}
    with pytest.raises(SystemExit):
        p.parse_args(["--count", "0"])
    with pytest.raises(SystemExit):
        p.parse_args(["--internal", "2"])
    text = p.format_help()
    assert "how many (default: 3)" in text and "which one (default: the first)" in text
