"""Shared fixtures: the real default model is loaded once per test session."""
import pytest
import torch

import fast

torch.set_num_threads(2)
fast.enable()  # the tests run the speed path the command lines run; test_fast.py compares both


@pytest.fixture(scope="session")
def real():
    """(model, tokenizer) of the default SmolLM2-135M-Instruct GGUF, float32 on CPU."""
    from checkpoint import load
    return load(None, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def hf_real():
    """The Hugging Face `transformers` reference model and tokenizer loaded from the same GGUF file."""
    import checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = checkpoint.check_default_model()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok
