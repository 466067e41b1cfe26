"""tokenizer.py against Hugging Face tokenizers/transformers on the same vocabularies and text.

The text is real: every string in the task files (data/**/*.jsonl.gz: questions, solutions, code),
a fixed sample of 2,000 of them, plus hand-written hard cases (unicode, digits, whitespace,
special tokens written in the text, contractions, code). Four kinds of checkpoint are compared:
the default SmolLM2 GGUF, SmolLM2's tokenizer.json (saved by transformers), a Llama-3-style
tokenizer.json trained here, and a Llama-2-style sentencepiece model trained here.
"""
import copy
import gzip
import json
import random
import unicodedata

import pytest
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

import checkpoint
from tokenizer import load_tokenizer

DATA_DIR = checkpoint.ROOT / "data"
SAMPLE_SIZE = 2_000  # of the task strings: enough to meet every kind of text, small enough to stay fast

HARD_CASES = [
    # whitespace: runs, tabs, newlines, leading and trailing, whitespace before digits, unusual spaces
    "", " ", "  ", "\n", "\t", "a", "Hello, world!", "Hello world  ", "  leading spaces", "trailing   ",
    "tabs\tand\t\ttabs", "line\nbreaks\n\n\nand\r\nwindows\r\n", "   \n   \n", "x\n\n  y", "a  1", "\n 1",
    "x =  42", "nbsp\u00a0here ideographic\u3000space", "odd\x1cseparators\x1d\x1e\x1f", "gap  \x1c  \x1f!\x1f? end",
    "next\x85line \u2028 \u2029 \u200b zero", "\x00null\x01\x7f", " " * 40 + "x", "\u2581already \u2581marked",
    # contractions
    "I'm sure they'll say it's fine, don't you think? We've seen it. I'd go.", "DON'T SHOUT, WE'LL SEE, IT'S",
    "'s 't 're 've 'm 'll 'd", "can'\u017f", "o'clock rock'n'roll",
    # unicode: accents, combining marks, CJK, other scripts, right-to-left, emoji, symbols
    "café naïve résumé façade Ångström", "e\u0301 combining a\u0308 and n\u0303", "Straße ÆØÅ ĳ Ǆ ǅ",
    "日本語のテキストとカタカナ ー", "你好，世界！这是一个测试。", "한국어 텍스트입니다", "Россия и Україна",
    "Ελληνικά κείμενα", "مرحبا بالعالم", "שלום עולם", "हिन्दी पाठ", "ไทย", "Emoji: 😀👍🏽🇺🇸 and ❤️ 👨‍👩‍👧‍👦",
    "math ∑ ∫ √ ≤ ≥ ∞ π ½ ² ³ Ⅻ", "\U0001F600" * 5,
    # digits
    "Numbers 12345 and 3.14159 and 1,000,000 and -7e-10", "1234567890123456789012345678901234567890",
    "٣٤٥ ١٢ digits ๓๔", "x=123abc456def7890", "2024-01-01T12:30:00Z", "$\\frac{1}{2}$ and \\boxed{42}",
    # long words
    "=" * 80, "a" * 300, "ab" * 100, "Self-adaptive LLMs: Transformer-Squared, or TransformerSquared",
    # special tokens written in the text, whole and broken
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", "text<|im_end|>more<|endoftext|>",
    "<|im_start|><|im_end|><|im_start|>", "broken <|im_start and im_end|> markers", "<s>[INST] hi [/INST]",
    "x <s> y </s> z", "<unk> unknown", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    # code with indentation
    "def f(x):\n    return x ** 2\n", "\tif (a && b) { return; }\n", "    # comment\n        y = [i for i in range(10)]\n",
    'print("hello")  # trailing comment   \n', "class A:\n\tdef __init__(self):\n\t\tpass\n",
]


# ----------------------------------------------------------------------------------------------
# Text

def strings_in(value) -> list[str]:
    """Every string inside a JSON value (records hold strings, lists of strings, dicts)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in strings_in(item)]
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings_in(item)]
    return []


@pytest.fixture(scope="module")
def strings() -> list[str]:
    found = set()
    for path in sorted(DATA_DIR.glob("**/*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                found.update(strings_in(json.loads(line)))
    # Fail rather than pass on nothing: the comparisons are only as good as the text they see.
    assert len(found) >= 1_000, f"only {len(found)} distinct strings in {DATA_DIR}/**/*.jsonl.gz; need 1,000"
    sample = random.Random(0).sample(sorted(found), min(SAMPLE_SIZE, len(found)))
    return sample + HARD_CASES


def assert_same_ids(ours, reference, strings: list[str], bos: bool):
    """Our ids equal the reference's on every string; the message shows the first difference."""
    bad = [s for s in strings if ours.encode(s, bos=bos) != reference.encode(s, add_special_tokens=bos)]
    assert not bad, (f"{len(bad)}/{len(strings)} strings differ, first {bad[0]!r}:\n"
                     f"ours {ours.encode(bad[0], bos=bos)}\nref  {reference.encode(bad[0], add_special_tokens=bos)}")


# ----------------------------------------------------------------------------------------------
# GGUF (the default model) and SmolLM2's tokenizer.json

@pytest.fixture(scope="module")
def hf_gguf():
    """transformers reading the same GGUF file: its own reader of the vocabulary, merges and ids."""
    path = checkpoint.check_default_model()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def hf_smollm2(hf_gguf):
    """The GGUF says `tokenizer.ggml.pre = smollm`: llama.cpp (and SmolLM2's own tokenizer.json) split
    every digit off before the GPT-2 regex. transformers' GGUF reader does not know "smollm" and keeps
    the plain GPT-2 regex, so we give it SmolLM2's real pre-tokenizer (see the test after next)."""
    tok = copy.deepcopy(hf_gguf)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    return tok


@pytest.fixture(scope="module")
def ours_gguf():
    return load_tokenizer(checkpoint.check_default_model())


def test_gguf_ids_match_hf(strings, ours_gguf, hf_smollm2):
    assert_same_ids(ours_gguf, hf_smollm2, strings, bos=False)


def test_gguf_special_tokens_match_hf(ours_gguf, hf_gguf):
    assert ours_gguf.vocab_size == len(hf_gguf) == 49152
    assert (ours_gguf.bos_id, ours_gguf.eos_id, ours_gguf.pad_id) == (
        hf_gguf.bos_token_id, hf_gguf.eos_token_id, hf_gguf.pad_token_id)
    assert ours_gguf.add_bos is False and hf_gguf.encode("Hi") == ours_gguf.encode("Hi", bos=ours_gguf.add_bos)
    assert ours_gguf.stop_ids == {hf_gguf.convert_tokens_to_ids("<|im_end|>")}


def test_gguf_differs_from_hf_gguf_reader_only_at_whitespace_before_digits(strings, ours_gguf, hf_gguf):
    """Where plain transformers disagrees with us, it is its GPT-2-only split gluing one space to a
    number ("a  1" -> 'a' 'Ġ' 'Ġ' '1' instead of 'a' 'ĠĠ' '1'), never anything else."""
    bad = [s for s in strings if ours_gguf.encode(s) != hf_gguf.encode(s, add_special_tokens=False)]
    assert all(space_before_number(s) for s in bad), [s for s in bad if not space_before_number(s)][:3]


def space_before_number(text: str) -> bool:
    return any(a.isspace() and unicodedata.category(b).startswith("N") for a, b in zip(text, text[1:]))


@pytest.fixture(scope="module")
def smollm2_json_dir(hf_smollm2, tmp_path_factory):
    """A checkpoint folder with SmolLM2's tokenizer.json, tokenizer_config.json and chat template."""
    folder = tmp_path_factory.mktemp("smollm2")
    hf_smollm2.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_json_dir(hf_gguf, tmp_path_factory):
    """The same vocabulary with a plain ByteLevel pre-tokenizer (the GPT-2 regex alone)."""
    folder = tmp_path_factory.mktemp("gpt2")
    hf_gguf.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------
# A Llama-3-style tokenizer.json and a Llama-2-style sentencepiece model, trained on the task text

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def llama3_json_dir(strings, tmp_path_factory):
    """Llama 3's layout: the split regex, then bytes; ignore_merges; special tokens after the vocabulary;
    <|begin_of_text|> added by the post-processor; eos <|end_of_text|>, turns end with <|eot_id|>."""
    bpe = HFTokenizer(models.BPE(ignore_merges=True))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2_000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(strings, trainer)
    # Llama 3's vocabulary holds whole words its merges cannot build; ignore_merges looks those up first.
    spec = json.loads(bpe.to_str())
    spec["model"]["vocab"]["ĠTransformerSquared"] = len(spec["model"]["vocab"])
    bpe = HFTokenizer.from_str(json.dumps(spec))
    bpe.add_special_tokens(LLAMA3_SPECIAL)
    bos = bpe.token_to_id("<|begin_of_text|>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", bos)])
    folder = tmp_path_factory.mktemp("llama3")
    bpe.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|end_of_text|>", "chat_template": LLAMA3_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def sentencepiece_dir(strings: list[str], folder, legacy: bool):
    """Llama 2's recipe in small: BPE, byte fallback, split digits, no normalization, 1,000 pieces."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(strings), model_prefix=str(folder / "tokenizer"), model_type="bpe", vocab_size=1_000,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=0.9999, max_sentence_length=1 << 20,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": legacy,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": LLAMA2_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=[False, True], ids=["llama2", "llama2-legacy"])
def llama2_dir(request, strings, tmp_path_factory):
    return sentencepiece_dir(strings, tmp_path_factory.mktemp("llama2"), legacy=request.param)


@pytest.fixture(scope="module", params=["smollm2", "gpt2", "llama3"])
def json_dir(request):
    return request.getfixturevalue(f"{request.param}_json_dir")


def test_tokenizer_json_ids_match_hf(strings, json_dir):
    ours, hf = load_tokenizer(json_dir), AutoTokenizer.from_pretrained(json_dir)
    assert (ours.vocab_size, ours.bos_id, ours.eos_id) == (len(hf), hf.bos_token_id, hf.eos_token_id)
    assert_same_ids(ours, hf, strings, bos=False)
    assert_same_ids(ours, hf, strings[:50], bos=ours.add_bos)  # with BOS where the checkpoint adds it (llama3)


def test_sentencepiece_ids_match_hf(strings, llama2_dir):
    """HF's LlamaTokenizer puts sentencepiece's dummy prefix ('▁' before the first word) only where its
    Metaspace pre-tokenizer does: not before text that already starts with a space (" hi" -> '▁hi', where
    sentencepiece alone gives '▁▁hi'), and with legacy=false not after an added token ("<s>hi" -> '<s>' 'hi').
    We follow HF; both only change text that starts with a space or follows a special token."""
    ours, hf = load_tokenizer(llama2_dir), AutoTokenizer.from_pretrained(llama2_dir)
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.add_bos) == (len(hf), hf.bos_token_id, hf.eos_token_id, True)
    assert_same_ids(ours, hf, strings, bos=True)
    assert_same_ids(ours, hf, strings, bos=False)
    for s in strings:  # decoding (no round trip here: sentencepiece drops the space it added at the start)
        ids = hf.encode(s)
        assert ours.decode(ids) == hf.decode(ids, clean_up_tokenization_spaces=False), s


# ----------------------------------------------------------------------------------------------
# Decoding

def test_byte_level_decode_round_trips(strings, ours_gguf, hf_gguf, llama3_json_dir):
    """decode(encode(s)) == s, except where s holds a byte the vocabulary lacks (SmolLM2 has no token for
    a few control bytes such as \\x1d; BPE without an unknown token drops them, in HF as in ours)."""
    vocab = hf_gguf.get_vocab()
    missing = {b for b, char in bytes_to_unicode().items() if char not in vocab}
    llama3 = load_tokenizer(llama3_json_dir)
    for s in strings:
        ids = ours_gguf.encode(s)
        assert ours_gguf.decode(ids) == hf_gguf.decode(ids, clean_up_tokenization_spaces=False)
        assert ours_gguf.decode(ids) == s or missing & set(s.encode("utf-8")), s
        assert llama3.decode(llama3.encode(s)) == s


def test_decode_partial_utf8_and_skip_special(ours_gguf):
    ids = ours_gguf.encode("😀!")
    assert len(ids) > 2  # the emoji's 4 bytes are spread over more than one token
    assert ours_gguf.decode(ids[:1]).startswith("\ufffd")
    assert ours_gguf.decode(ids) == "😀!"
    chat = ours_gguf.encode("<|im_start|>user\nHi<|im_end|>")
    assert ours_gguf.decode(chat, skip_special=True) == "user\nHi"


# ----------------------------------------------------------------------------------------------
# Chat templates

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "user", "content": "Write a function that adds two numbers.\n  Use Python. "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Solve x^2 = 4 <|im_end|> ünïcödé 😀"}],
]


@pytest.fixture(scope="module", params=["gguf", "llama3", "llama2"])
def chat_pair(request, hf_smollm2, ours_gguf, llama3_json_dir, strings, tmp_path_factory):
    if request.param == "gguf":
        return ours_gguf, hf_smollm2
    folder = llama3_json_dir if request.param == "llama3" else sentencepiece_dir(
        strings, tmp_path_factory.mktemp("llama2chat"), legacy=False)
    return load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(chat_pair, add_generation_prompt):
    ours, hf = chat_pair
    for messages in CONVERSATIONS:
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                     return_dict=False)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == text
        assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt) == ids


def test_stop_ids_come_from_the_template(llama3_json_dir, llama2_dir):
    llama3 = load_tokenizer(llama3_json_dir)
    assert llama3.stop_ids == {llama3.eos_id, llama3.encode("<|eot_id|>")[0]} and len(llama3.stop_ids) == 2
    llama2 = load_tokenizer(llama2_dir)
    assert llama2.stop_ids == {llama2.eos_id}


def test_template_extras_match_hf(ours_gguf, hf_gguf):
    """tojson (no HTML escaping), strftime_now and raise_exception, which transformers gives templates."""
    import jinja2

    template = "{{ messages | tojson }}|{{ strftime_now('%Y') }}|{% if add_generation_prompt %}go{% endif %}"
    messages = [{"role": "user", "content": "<b>&</b> \"é\""}]
    ours = copy.copy(ours_gguf)
    ours.chat_template = template
    assert ours.apply_chat_template(messages) == hf_gguf.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    ours.chat_template = "{{ raise_exception('no system role') }}"
    with pytest.raises(jinja2.TemplateError, match="no system role"):
        ours.apply_chat_template(messages)


# ----------------------------------------------------------------------------------------------
# Bad input

def write_gguf(path, tokenizer_model: str, pre: str):
    """A GGUF file holding nothing but the two keys that say which tokenizer it has."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unknown_tokenizers_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'xyz' in odd.gguf: expected gpt2"):
        load_tokenizer(write_gguf(tmp_path / "odd.gguf", "xyz", "smollm"))
    with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer 'qwen9' in qwen.gguf"):
        load_tokenizer(write_gguf(tmp_path / "qwen.gguf", "gpt2", "qwen9"))

    wordpiece = HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    (tmp_path / "bert").mkdir()
    wordpiece.save(str(tmp_path / "bert" / "tokenizer.json"))
    with pytest.raises(ValueError, match="unsupported tokenizer.json.*'WordPiece'"):
        load_tokenizer(tmp_path / "bert")

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="expected a .gguf file"):
        load_tokenizer(tmp_path / "notes.txt")
