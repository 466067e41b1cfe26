"""The README's "read the code" walk names functions as `module.name`: each must exist, so that a
renamed function cannot leave the guide pointing at nothing."""
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = "model|replies|checkpoint|tokenizer|svf|lora|rl|adapt|data|train|eval|results|bench|fetch"
FILE_ENDINGS = {"py", "txt", "json", "jsonl", "md", "png", "safetensors", "gguf", "model"}


def named_in_readme() -> set[str]:
    text = (ROOT / "README.md").read_text()
    found = re.findall(rf"`(?:[^`]*?\W)?((?:{MODULES})\.[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)", text)
    return {name for name in found if name.split(".")[1] not in FILE_ENDINGS}


def test_readme_names_exist():
    names = named_in_readme()
    assert len(names) >= 40, f"found only {len(names)} `module.name` references: is the pattern still right?"
    missing = []
    for name in sorted(names):
        module, *attrs = name.split(".")
        obj = importlib.import_module(module)
        for attr in attrs:
            obj = getattr(obj, attr, None)
            if obj is None:
                missing.append(name)
                break
    assert not missing, f"README names what the code does not have: {missing}"
