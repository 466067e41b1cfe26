"""Imports go one way: the graph of our modules, read from their source with every import
counted (those inside functions too, which only hide a cycle), has no cycle, and the model
knows nothing of SVF, training or tasks."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def our_modules() -> dict[str, Path]:
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    for p in (ROOT / "data").glob("*.py"):
        mods["data" if p.stem == "__init__" else f"data.{p.stem}"] = p
    return mods


def imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """Our modules that `path` imports anywhere in its source."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: only data/ uses packages
                base = "data" + (f".{base}" if base else "")
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    me = "data" if path.name == "__init__.py" else (
        f"data.{path.stem}" if path.parent.name == "data" else path.stem)
    return {m for m in found if m in mods and m != me}


def graph() -> dict[str, set[str]]:
    mods = our_modules()
    return {m: imports(p, mods) for m, p in mods.items()}


def cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, or None: depth-first search with the path on a stack."""
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(u: str, path: list[str]) -> list[str] | None:
        state[u] = 1
        for v in sorted(g[u]):
            if state.get(v) == 1:
                return path[path.index(v):] + [v]
            if v not in state and (found := visit(v, path + [v])):
                return found
        state[u] = 2
        return None

    for m in sorted(g):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_the_search_finds_a_cycle_worked_by_hand():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_our_imports_have_no_cycle():
    g = graph()
    assert {"model", "rl", "loop", "adapt", "eval", "train", "data", "data.tasks"} <= set(g)
    assert cycle(g) is None


def test_the_model_imports_only_what_a_generation_returns():
    assert graph()["model"] == {"completion"}
    assert graph()["completion"] == set()
