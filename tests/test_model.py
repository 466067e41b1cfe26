"""model.py and checkpoint.py against Hugging Face `transformers` on the same weights."""
import json

import numpy as np
import pytest
import torch

import checkpoint
from checkpoint import load_model
from model import generate
from replies import common_prefix, reply_logprobs
from tiny import StubTokenizer

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Which of these is a mammal? (A) shark (B) dolphin (C) trout (D) octopus",
]


# ----------------------------------------------------------------------------- tiny HF checkpoints
def tiny_config(kind: str):
    import transformers as tf
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                  rms_norm_eps=1e-5)
    if kind == "llama3":  # GQA, untied output, Llama 3.1 rope scaling
        return tf.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 32})
    if kind == "llama":  # plain: what the GGUF test writes
        return tf.LlamaConfig(**common, tie_word_embeddings=False)
    if kind == "llama-linear":
        return tf.LlamaConfig(**common, tie_word_embeddings=True,
                              rope_scaling={"rope_type": "linear", "factor": 2.0})
    if kind == "mistral":  # sliding window shorter than the test sequence
        return tf.MistralConfig(**common, sliding_window=8, tie_word_embeddings=False)
    if kind == "qwen2":  # q/k/v biases, tied output
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    raise ValueError(kind)


def make_hf_checkpoint(kind: str, folder, shard: bool = False):
    import transformers as tf
    torch.manual_seed(0)
    config = tiny_config(kind)
    config._attn_implementation = "eager"
    ref = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random biases and norm weights, so a mix-up of either would show
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5, 0.2) if "norm" in name else p.normal_(0, 0.5)
    ref.save_pretrained(folder, max_shard_size="60KB" if shard else "5GB")
    return ref


@pytest.mark.parametrize("kind", ["llama3", "llama-linear", "mistral", "qwen2"])
def test_tiny_hf_checkpoint_matches_transformers(kind, tmp_path):
    ref = make_hf_checkpoint(kind, tmp_path, shard=kind == "llama3")
    if kind == "llama3":
        assert (tmp_path / "model.safetensors.index.json").exists()  # the sharded path is exercised
    ours = load_model(tmp_path, device="cpu", dtype="float32")
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(tokens) - ref(tokens).logits).abs().max().item()
    assert diff < 1e-4, f"{kind}: max |logit difference| {diff}"


def test_forward_without_cache_has_gradients(tmp_path):
    make_hf_checkpoint("llama3", tmp_path)
    model = load_model(tmp_path, device="cpu", dtype="float32").requires_grad_(True)
    tokens = torch.randint(0, 128, (2, 10))
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    grad = model.layers[0].mlp.gate.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_kv_cache_decoding_equals_full_recomputation(tmp_path):
    make_hf_checkpoint("llama3", tmp_path)
    model = load_model(tmp_path, device="cpu", dtype="float32")
    prompt = [5, 17, 33, 2, 99, 64]
    [c] = generate(model, StubTokenizer(), [prompt], 20)
    full = torch.tensor([prompt + c.tokens])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(full), -1)[0]
    positions = range(len(prompt) - 1, len(prompt) - 1 + len(c.tokens))
    expected = [logprobs[p, t].item() for p, t in zip(positions, c.tokens)]
    greedy = [logprobs[p].argmax().item() for p in positions]
    assert c.tokens == greedy
    np.testing.assert_allclose(c.logprobs, expected, atol=1e-4)


# mistral: a sliding window shorter than the rows
@pytest.mark.parametrize("kind", ["llama3", "mistral"])
def test_packed_reply_logprobs_equal_one_plain_forward_per_reply(kind, tmp_path):
    make_hf_checkpoint(kind, tmp_path)
    model = load_model(tmp_path, device="cpu", dtype="float32").requires_grad_(True)
    prompts = [[5, 17, 33, 2, 99, 64, 8, 1, 4], [7, 7]]
    replies = [[[3, 4, 5, 6], [9], [10, 11, 12, 13, 14, 15, 16]], [[20, 21], [22, 23, 24]]]
    got = reply_logprobs(model, prompts, replies, pad_id=0)
    torch.stack([g.sum() for g in got]).sum().backward()
    got_grad = model.layers[0].mlp.up.weight.grad.clone()
    model.zero_grad()
    want = []
    for p, rs in zip(prompts, replies):  # independent: one unpadded, plainly causal row per reply
        for r in rs:
            logp = torch.log_softmax(model(torch.tensor([p + r]))[0, len(p) - 1:-1], -1)
            want.append(logp.gather(-1, torch.tensor(r)[:, None]).sum())
    torch.stack(want).sum().backward()
    torch.testing.assert_close(torch.cat(got), torch.stack(want), atol=1e-4, rtol=0)
    torch.testing.assert_close(got_grad, model.layers[0].mlp.up.weight.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama3", "mistral"])
def test_shared_prompt_prefix_is_computed_once_and_changes_nothing(kind, tmp_path):
    """Without gradients reply_logits computes the prompts' common prefix once (a KV cache every row
    reads); the log-probs must equal one plain forward pass per reply, here with a prefix longer
    than Mistral's sliding window, and a prompt that is the prefix plus one token."""
    make_hf_checkpoint(kind, tmp_path)
    model = load_model(tmp_path, device="cpu", dtype="float32")
    prefix = list(range(30, 42))
    prompts = [prefix + [5, 17, 33], prefix + [7], prefix + [9, 8, 7, 6, 5, 4]]
    replies = [[[3, 4, 5, 6], [9]], [[20, 21], [22, 23, 24], [25]], [[10, 11, 12, 13, 14, 15, 16]]]
    assert common_prefix(prompts) == len(prefix)
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2       # every prompt keeps a token of its own
    with torch.no_grad():
        got = torch.cat(reply_logprobs(model, prompts, replies, pad_id=0))
        in_full = torch.cat(reply_logprobs(model, prompts, replies, pad_id=0, share_prefix=False))
        want = []
        for p, rs in zip(prompts, replies):
            for r in rs:
                logp = torch.log_softmax(model(torch.tensor([p + r]))[0, len(p) - 1:-1], -1)
                want.append(logp.gather(-1, torch.tensor(r)[:, None]).sum())
    torch.testing.assert_close(got, torch.stack(want), atol=1e-4, rtol=0)
    torch.testing.assert_close(in_full, torch.stack(want), atol=1e-4, rtol=0)


def test_left_padded_batch_equals_each_prompt_alone_tiny(tmp_path):
    make_hf_checkpoint("mistral", tmp_path)  # sliding window and padding together
    model = load_model(tmp_path, device="cpu", dtype="float32")
    prompts = [[3, 4, 5], [7] * 11, [9, 8, 7, 6, 5, 4, 3, 2, 10, 11, 12, 13, 14, 15], [3, 4, 5],
               [7] * 11]
    batch = generate(model, StubTokenizer(), prompts, 12)  # the repeated prompts are prefilled once
    for p, c in zip(prompts, batch):
        [alone] = generate(model, StubTokenizer(), [p], 12)
        assert c.tokens == alone.tokens
        np.testing.assert_allclose(c.logprobs, alone.logprobs, atol=1e-4)


def test_sampling_is_seedable(tmp_path):
    make_hf_checkpoint("llama3", tmp_path)
    model = load_model(tmp_path, device="cpu", dtype="float32")
    run = lambda seed: generate(model, StubTokenizer(), [[5, 6, 7]] * 3, 10, temperature=1.0,
                                top_p=0.9,
                                generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


# ----------------------------------------------------------------------------- tiny GGUF files
def permute_like_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The reordering llama.cpp's converter applies to q/k rows (pairs the two rotary halves)."""
    halves = w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
    return halves.swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, ref, quant: str):
    """Write a tiny Llama as llama.cpp would: GGUF names, permuted q/k, the given tensor type."""
    import gguf
    from gguf.quants import quantize
    cfg = ref.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    for name, t in ref.state_dict().items():
        a = t.float().numpy()
        if name.startswith("model.layers."):
            i, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            gname = f"blk.{i}.{parts[rest]}.weight"
        else:
            gname = names[name]
        if gname.endswith("attn_q.weight"):
            a = permute_like_llama_cpp(a, cfg.num_attention_heads)
        if gname.endswith("attn_k.weight"):
            a = permute_like_llama_cpp(a, cfg.num_key_value_heads)
        if a.ndim == 2 and quant != "F32":
            w.add_tensor(gname, quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("quant", ["F32", "F16", "Q8_0", "Q4_1"])
def test_tiny_gguf_unpermutes_and_matches_transformers(quant, tmp_path):
    import transformers as tf
    ref = make_hf_checkpoint("llama", tmp_path / "hf")
    write_tiny_gguf(tmp_path / "tiny.gguf", ref, quant)
    ours = load_model(tmp_path / "tiny.gguf", device="cpu", dtype="float32")
    tokens = torch.randint(0, 128, (1, 16))
    if quant == "F32":  # exact weights: compare with the original model itself
        hf = ref
    else:  # quantized: compare with transformers' own reading of the same file
        hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf",
                                                     dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 1e-4, f"{quant}: max |logit difference| {diff}"


# ----------------------------------------------------------------------------- bad input
def test_truncated_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(checkpoint.check_default_model().read_bytes()[:2_000_000])
    with pytest.raises(ValueError, match="cut.gguf.*truncated or corrupt"):
        load_model(bad)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    make_hf_checkpoint("llama3", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor.*layers\.1\.mlp\.up\.weight"):
        load_model(tmp_path)


def test_extra_and_misshaped_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file
    make_hf_checkpoint("llama3", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({**tensors, "model.layers.0.mlp.extra.weight": torch.zeros(2)},
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected tensor.*mlp.extra.weight"):
        load_model(tmp_path)
    tensors["model.norm.weight"] = torch.ones(63)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"norm.weight has shape \(63,\), expected \(64,\)"):
        load_model(tmp_path)


def test_unknown_architecture_is_named(tmp_path):
    make_hf_checkpoint("llama3", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown architecture model_type='gpt2'"):
        load_model(tmp_path)


def test_prompt_longer_than_context_is_a_clear_error(tmp_path):
    make_hf_checkpoint("llama3", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["max_position_embeddings"] = 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_model(tmp_path)
    with pytest.raises(ValueError, match="prompt of 20 tokens does not fit the context length 16"):
        generate(model, StubTokenizer(), [list(range(2, 22))], 4)


def test_missing_default_model_says_how_to_fetch(tmp_path):
    with pytest.raises(SystemExit, match="missing; run `make setup`"):
        checkpoint.check_default_model(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"x" * 2_000_000)
    with pytest.raises(SystemExit, match="corrupt"):
        checkpoint.check_default_model(tmp_path / "bad.gguf")


# ----------------------------------------------------------------------------- the real model
@pytest.mark.real
def test_real_model_logits_match_transformers(real, hf_real):
    model, _ = real
    ref, ref_tok = hf_real
    worst = 0.0
    for text in PROMPTS:
        ids = torch.tensor([ref_tok.encode(text)])
        with torch.no_grad():
            worst = max(worst, (model(ids) - ref(ids).logits).abs().max().item())
    print(f"max |logit difference| vs transformers over {len(PROMPTS)} prompts: {worst:.2e}")
    assert worst < 2e-4


@pytest.mark.real
def test_real_model_left_padded_batch_equals_each_prompt_alone(real):
    model, tok = real
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    batch = generate(model, tok, prompts, 24)
    for p, c in zip(prompts, batch):
        [alone] = generate(model, tok, [p], 24)
        assert c.tokens == alone.tokens, (c.text, alone.text)


@pytest.mark.real
def test_real_model_answers_sensibly(real):
    model, tok = real
    question = [{"role": "user", "content": "What is the capital of France?"}]
    [c] = generate(model, tok, [tok.encode_chat(question)], 24)
    assert "Paris" in c.text
