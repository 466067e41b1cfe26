"""A Hugging Face folder laid out as Llama-3.1-8B-Instruct's, without its 16 GB of weights (issue 20).

The test writes the real config.json (every field of Meta's file; only the sizes shrunk: 3 layers of width
512, and a vocabulary of a small BPE plus Llama 3.1's 256 special tokens, the ids that follow from it), a
Llama 3 tokenizer.json (its split regex, byte-level BPE with ignore_merges, <|begin_of_text|> added by the
post-processor) with the Instruct tokenizer_config.json, generation_config.json, and bfloat16 weights under
the real tensor names in four shards named by model.safetensors.index.json, one layer split across two,
as Meta's are. checkpoint.load reads the folder as a user's would: the sharded index, the Llama 3.1 rope
scaling and the tokenizer together, each checked against transformers reading the same folder.
"""
import copy
import json

import pytest
import torch

import checkpoint
import data
from model import ModelArgs, generate, rope_frequencies
from test_tokenizer import LLAMA3_SPLIT, LLAMA3_TEMPLATE

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Llama 3.1's special tokens, in its order: they follow the 128,000 BPE tokens (here, the small BPE's)
SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
            "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
           + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])
SHRUNK = {"hidden_size": 512, "intermediate_size": 1792, "num_hidden_layers": 3, "num_attention_heads": 4,
          "num_key_value_heads": 1}  # head_dim 128, grouped-query attention 4:1, FFN 3.5 x width: as the 8B's


def llama31_config(vocab: int) -> dict:
    """Meta's config.json of Llama-3.1-8B-Instruct, the sizes shrunk and the token ids following the vocabulary."""
    first = vocab - len(SPECIAL)  # <|begin_of_text|>: 128000 in the real vocabulary of 128256
    return {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": first, "eos_token_id": [first + 1, first + 8, first + 9], "hidden_act": "silu",
            "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
            "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
            "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256} | SHRUNK | \
        {"vocab_size": vocab}


def write_tokenizer(folder) -> int:
    """Llama 3's tokenizer.json recipe on the project's task text; returns the vocabulary size."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as HFTokenizer
    text = [p["question"] for task in ("gsm8k", "arc_easy", "mbpp") for p in data.load(task, "train")[:300]]
    bpe = HFTokenizer(models.BPE(ignore_merges=True))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=1000, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.add_special_tokens(SPECIAL)
    bos = bpe.token_to_id("<|begin_of_text|>")
    assert bos == bpe.get_vocab_size() - len(SPECIAL)
    bpe.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    bpe.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "chat_template": LLAMA3_TEMPLATE, "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>", "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return bpe.get_vocab_size()


def write_weights(folder, config: dict, stray: bool = True) -> None:
    """Random bfloat16 weights under the real names, in 4 shards with Meta's file names and index."""
    import transformers as tf
    from safetensors.torch import save_file
    torch.manual_seed(0)
    ref = tf.LlamaForCausalLM(tf.LlamaConfig(**config))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.05)
    tensors = {n: p.detach().to(torch.bfloat16).contiguous() for n, p in ref.state_dict().items()}
    names, shards, weight_map = list(tensors), 4, {}
    per = -(-len(names) // shards)
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = names[k * per:(k + 1) * per]
        save_file({n: tensors[n] for n in part}, folder / file, metadata={"format": "pt"})
        weight_map |= {n: file for n in part}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}, indent=2))
    if stray:  # left over from another export: the index does not name it, so a loader must not read it
        save_file({"model.layers.0.mlp.extra_proj.weight": torch.zeros(2, 2)}, folder / "model-stale.safetensors")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("Llama-3.1-8B-Instruct")
    vocab = write_tokenizer(path)
    config = llama31_config(vocab)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    first = config["bos_token_id"]
    (path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": first, "do_sample": True, "eos_token_id": [first + 1, first + 8, first + 9],
        "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.43.0.dev0"}))
    write_weights(path, config)
    return path


@pytest.fixture(scope="module")
def hf(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(folder))


def chat(tok) -> list[int]:
    return tok.encode_chat([{"role": "system", "content": "You are a careful assistant."},
                            {"role": "user", "content": data.load("gsm8k", "test")[0]["question"]}])


def test_the_config_is_read_as_llama_3_1_8b_with_its_rope_scaling(folder):
    args = checkpoint.hf_args(json.loads((folder / "config.json").read_text()), folder)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    assert args == ModelArgs(dim=512, n_layers=3, n_heads=4, n_kv_heads=1, vocab_size=vocab, hidden_dim=1792,
                             head_dim=128, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=checkpoint.MAX_CONTEXT,
                             rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                           "original_max_position_embeddings": 8192, "rope_type": "llama3"})
    # at the real width the same file gives the 8B model's shape
    real = checkpoint.hf_args({**json.loads((folder / "config.json").read_text()), "hidden_size": 4096,
                               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                               "num_key_value_heads": 8, "vocab_size": 128256}, folder)
    assert (real.head_dim, real.n_kv_heads, real.hidden_dim, real.vocab_size) == (128, 8, 14336, 128256)


def test_the_tokenizer_is_llama_3s_and_matches_transformers(folder, hf):
    tok, ref = checkpoint.load(folder, device="cpu", dtype="float32")[1], hf[1]
    first = json.loads((folder / "config.json").read_text())["bos_token_id"]
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (ref.bos_token_id, ref.eos_token_id, len(ref)) == \
        (first, first + 9, first + len(SPECIAL))                          # <|eot_id|> ends an Instruct reply
    assert first + 9 in tok.stop_ids and tok.add_bos
    texts = [p["question"] for p in data.load("gsm8k", "test")[:20]] + ["def f(x):\n    return x ** 2\n",
                                                                         "Ünïcödé  spaces\t\tand 12345 digits"]
    for t in texts:
        assert tok.encode(t, bos=True) == ref.encode(t), t
    messages = [{"role": "system", "content": "You are a careful assistant."}, {"role": "user", "content": texts[0]}]
    want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert chat(tok) == list(want["input_ids"] if hasattr(want, "keys") else want)


@pytest.mark.parametrize("device", DEVICES)
def test_sharded_bfloat16_folder_loads_and_matches_transformers(folder, hf, device):
    model, tok = checkpoint.load(folder, device=device, dtype="float32")  # the stray shard was not read
    ids = chat(tok)
    assert len(ids) > 64
    x = torch.tensor([ids])
    with torch.no_grad():
        want = hf[0](x).logits
        got = model(x.to(device)).cpu()
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 1e-4, err
        # the comparison sees the rope scaling: without it the same weights are far off transformers
        model.init_rope(rope_frequencies(ModelArgs(**{**vars(model.args), "rope_scaling": None})))
        unscaled = ((model(x.to(device)).cpu() - want).abs().max() / want.abs().max()).item()
        assert unscaled > 100 * max(err, 1e-6), unscaled
    model = checkpoint.load_model(folder, device=device, dtype="float32")
    free = copy.copy(tok)
    free.stop_ids = set()  # forced to the full count, as min_new_tokens forces transformers
    [c] = generate(model, free, [ids], 12)
    out = hf[0].generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, min_new_tokens=12,
                         max_new_tokens=12, pad_token_id=tok.pad_id)
    assert c.tokens == out[0, len(ids):].tolist()


def test_the_index_decides_which_shards_are_read(folder, tmp_path):
    """Without the index the stray file is read and refused by name: the index really is the path taken."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-{k:05d}-of-00004.safetensors" for k in (1, 2, 3, 4)]
    layers_in = {}
    for name, file in index["weight_map"].items():
        if name.startswith("model.layers."):
            layers_in.setdefault(name.split(".")[2], set()).add(file)
    assert any(len(files) > 1 for files in layers_in.values())           # a layer split across two shards
    for f in folder.iterdir():
        if f.name != "model.safetensors.index.json":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mlp.extra_proj.weight'"):
        checkpoint.load_model(tmp_path, device="cpu", dtype="float32")
