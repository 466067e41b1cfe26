"""experts.py: expert files found, read once and checked, with errors that name them."""
import pytest
import torch

import experts
import svf
from cli import BadInput
from tiny import random_expert, tiny_wrapped_model


def save(path, model, seed, targets="mlp"):
    meta = {"targets": targets, "base_model": svf.model_fingerprint(model), "task": "toy"}
    svf.Expert(random_expert(model, seed), meta).save(path)
    return path


def test_missing_experts_are_named_with_how_to_make_them_and_what_is_there(tmp_path):
    save(tmp_path / "mine.safetensors", tiny_wrapped_model(), 0)
    with pytest.raises(BadInput) as e:
        experts.resolve_experts(["gsm8k", "mine", "other"], tmp_path)
    message = str(e.value)
    assert str(tmp_path / "gsm8k.safetensors") in message and "python train.py --task gsm8k" in message
    assert str(tmp_path / "other.safetensors") in message and "--task other" not in message
    assert "experts in" in message and message.endswith("mine")


def test_load_experts_gives_each_file_its_z_and_refuses_mixed_targets(tmp_path):
    model = tiny_wrapped_model()
    paths = {"a": save(tmp_path / "a.safetensors", model, 1), "b": save(tmp_path / "b.safetensors", model, 2)}
    loaded = experts.load_experts(model, paths)
    for name, path in paths.items():
        want = svf.read_tensors(path, "expert")[0]
        assert set(loaded[name]) == set(want)
        assert all(torch.equal(loaded[name][n], want[n].to(loaded[name][n].dtype)) for n in want)
    meta = {"targets": "attn", "base_model": svf.model_fingerprint(model)}
    svf.save_tensors(tmp_path / "c.safetensors", {"layers.0.attention.q": torch.ones(4)}, meta)
    with pytest.raises(BadInput, match="adapt different matrices"):
        experts.load_experts(model, {**paths, "c": tmp_path / "c.safetensors"})
