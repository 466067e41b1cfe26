"""Text <-> token ids for the checkpoints this project runs, and their chat templates.

This is the layer below model.py, not part of the paper's method. Three kinds of tokenizer
cover the models Transformer-Squared is tried on:

1. byte-level BPE stored in a GGUF file's metadata (llama.cpp's "gpt2" tokenizer: SmolLM2,
   Llama 3);
2. byte-level BPE in a Hugging Face tokenizer.json (SmolLM2, Llama 3), its split regexes read
   from the file;
3. a sentencepiece tokenizer.model (Llama 2, Mistral, TinyLlama), run by the sentencepiece
   package.

Each gives the ids Hugging Face's AutoTokenizer gives (tests/test_tokenizer.py checks that on
the task strings), and chat prompts come from the checkpoint's own jinja template, rendered as
transformers does. One deliberate difference: a GGUF names its split regexes in
`tokenizer.ggml.pre`; for SmolLM2 ("smollm") they split every digit off first, as in llama.cpp
and SmolLM2's own tokenizer.json. transformers' GGUF reader ignores that name, so it disagrees
with us where whitespace comes before a digit ("a  1").

    tok = load_tokenizer("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = tok.encode_chat([{"role": "user", "content": "What is 2 + 3?"}])
    text = tok.decode(ids)
"""
import functools
import json
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# ----------------------------------------------------------------------------------------------
# Split regexes. Before BPE, text is cut into words by regexes written for Oniguruma (the engine of
# HF tokenizers) and llama.cpp. They use classes like \p{L} (any letter) that Python's re lacks.

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DIGIT_SPLIT = r"\p{N}"  # every digit a word of its own

# What each GGUF `tokenizer.ggml.pre` stands for: the regexes llama.cpp applies, in order.
GGUF_SPLITS = {"gpt2": [GPT2_SPLIT], "smollm": [DIGIT_SPLIT, GPT2_SPLIT],
               "starcoder": [DIGIT_SPLIT, GPT2_SPLIT], "llama-bpe": [LLAMA3_SPLIT],
               "llama3": [LLAMA3_SPLIT], "llama-v3": [LLAMA3_SPLIT]}

# Oniguruma's \s. Python's \s also matches \x1c-\x1f, which would cut words where HF does not.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@functools.cache
def unicode_category_class(prefix: str) -> str:
    """Every code point whose general category starts with `prefix` ("L", "N", "Lu") as ranges
    for a [...] class. Built from unicodedata once (a pass over every code point), then cached."""
    ranges, first = [], None
    for code in range(sys.maxunicode + 2):  # one past the end closes the last range
        inside = code <= sys.maxunicode and unicodedata.category(chr(code)).startswith(prefix)
        if inside and first is None:
            first = code
        elif not inside and first is not None:
            ranges.append(f"\\U{first:08x}-\\U{code - 1:08x}")
            first = None
    return "".join(ranges)


def compile_split_regex(pattern: str) -> re.Pattern:
    """Compile an Oniguruma split regex with Python's re: \\p{X}, \\s and \\S become explicit
    classes. The rest these regexes use (\\r, \\n, (?i:...), (?!...)) means the same in both
    engines."""
    out, in_class = [], False
    for token in re.findall(r"\\p\{\w+\}|\\.|.", pattern, flags=re.DOTALL):
        if token.startswith("\\p{"):
            chars = unicode_category_class(token[3:-1])
        elif token in (r"\s", r"\S"):
            chars = WHITESPACE
        else:
            in_class = token == "[" or (in_class and token != "]")
            out.append(token)
            continue
        if token == r"\S":
            if in_class:
                raise ValueError(f"unsupported \\S inside [...] in split regex {pattern!r}")
            out.append(f"[^{chars}]")
        else:
            out.append(chars if in_class else f"[{chars}]")  # in [...] the ranges join the class
    return re.compile("".join(out))


def split_isolated(pattern: re.Pattern, text: str) -> list[str]:
    """Cut text into the regex's matches and the stretches between them (HF's "isolated"
    split)."""
    pieces, end = [], 0
    for match in pattern.finditer(text):
        pieces += [text[end:match.start()], match.group()]
        end = match.end()
    pieces.append(text[end:])
    return [piece for piece in pieces if piece]


# ----------------------------------------------------------------------------------------------
# Byte-level BPE (GPT-2): text is UTF-8 bytes, each byte spelled as one printable character, so
# that merges and vocabulary are plain strings. Printable Latin-1 stands for itself; the other 68
# bytes (controls, space, ...) take the characters from U+0100 on, in byte order: space is 'Ġ',
# '\n' is 'Ċ'.

_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
              *range(ord("®"), ord("ÿ") + 1)]
BYTE_TO_CHAR = {b: chr(b) for b in _PRINTABLE} | {
    b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in _PRINTABLE)}
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def byte_level_bytes(token: str) -> bytes:
    """The bytes a vocabulary entry stands for. As in HF's ByteLevel decoder, an entry with a
    character outside the byte alphabet (an added token written as plain text) stands for its own
    UTF-8."""
    if all(c in CHAR_TO_BYTE for c in token):
        return bytes(CHAR_TO_BYTE[c] for c in token)
    return token.encode("utf-8")


class ByteLevelBPE:
    """Plain text (holding no added token) -> ids: cut it into words, then merge each word's
    bytes."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], splits: list[str],
                 ignore_merges: bool = False, unk_id: int | None = None):
        self.vocab = vocab
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}  # lower: learned earlier
        self.splits = [compile_split_regex(s) for s in splits]
        self.ignore_merges = ignore_merges  # Llama 3: a word found in the vocabulary is one token
        self.unk_id = unk_id  # for a byte the vocabulary lacks; None drops it, as HF does
        self.cache: dict[str, list[int]] = {}  # words repeat a lot: remember each one's ids

    def __call__(self, text: str, at_start: bool = True) -> list[int]:
        words = [text]
        for pattern in self.splits:  # each regex cuts every piece the previous one left
            words = [piece for word in words for piece in split_isolated(pattern, word)]
        return [i for word in words for i in self.word_ids(word)]

    def word_ids(self, word: str) -> list[int]:
        if word not in self.cache:
            if len(self.cache) > 100_000:  # bound the memory of a long-running process
                self.cache.clear()
            symbols = "".join(BYTE_TO_CHAR[b] for b in word.encode("utf-8"))
            if self.ignore_merges and symbols in self.vocab:
                self.cache[word] = [self.vocab[symbols]]
            else:
                ids = [self.vocab.get(part, self.unk_id) for part in self.merge(list(symbols))]
                self.cache[word] = [i for i in ids if i is not None]
        return self.cache[word]

    def merge(self, parts: list[str]) -> list[str]:
        """Merge the adjacent pair of lowest rank (the leftmost on ties) until no pair has a
        rank."""
        while len(parts) > 1:
            pairs = enumerate(zip(parts, parts[1:]))
            rank, i = min((self.ranks.get(pair, sys.maxsize), i) for i, pair in pairs)
            if rank == sys.maxsize:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts


# ----------------------------------------------------------------------------------------------
# Sentencepiece (Llama 2, Mistral): the sentencepiece package encodes. Around it we do what
# HF's LlamaTokenizer does: added tokens are cut out first, then each chunk of text is encoded,
# with sentencepiece's "dummy prefix" (a space before the first word) only where HF's Metaspace
# puts it.

class SentencePieceText:
    """Plain text (holding no added token) -> ids, with HF's rules for the dummy prefix."""

    def __init__(self, model_file: Path, legacy: bool, add_prefix_space: bool):
        import sentencepiece  # only needed for these checkpoints

        proto = model_file.read_bytes()
        self.with_prefix = sentencepiece.SentencePieceProcessor(model_proto=proto)
        # A copy with normalizer_spec.add_dummy_prefix = false. Protobuf merges a message field
        # that appears twice, so appending field 3 (normalizer_spec) holding only its field 3
        # (add_dummy_prefix) = 0 changes that one flag and keeps the rest of the model.
        no_prefix = proto + b"\x1a\x02\x18\x00"
        self.without_prefix = sentencepiece.SentencePieceProcessor(model_proto=no_prefix)
        # True: every chunk between added tokens gets the prefix; False: only the first
        self.legacy = legacy
        self.add_prefix_space = add_prefix_space

    def __call__(self, text: str, at_start: bool = True) -> list[int]:
        # Metaspace adds no prefix to text that starts with a space (sentencepiece alone would).
        spaced = text.startswith((" ", "\u2581"))
        prefix = self.add_prefix_space and (self.legacy or at_start) and not spaced
        return (self.with_prefix if prefix else self.without_prefix).encode(text)

    def pieces(self) -> list[bytes]:
        """What each id decodes to: '▁' is a space, a byte piece like <0x0A> is that byte."""
        sp = self.with_prefix
        return [bytes([int(sp.id_to_piece(i)[3:5], 16)]) if sp.is_byte(i)
                else sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")
                for i in range(sp.get_piece_size())]


# ----------------------------------------------------------------------------------------------
# Chat templates: the checkpoint's own jinja template, sandboxed, with the extras that
# transformers gives templates (raise_exception, strftime_now, its tojson), so that the same
# prompt comes out.

def raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def tojson(value, ensure_ascii: bool = False, indent: int | None = None, separators=None,
           sort_keys=False) -> str:
    # jinja's own tojson escapes <, > and & for HTML; a prompt wants the characters themselves.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.cache
def compile_chat_template(source: str) -> jinja2.Template:
    # A template comes with a downloaded checkpoint: it runs sandboxed, cannot change its inputs.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


# ----------------------------------------------------------------------------------------------
# The tokenizer

@dataclass(frozen=True)
class AddedToken:
    """A token found whole in the text before anything else, like <|im_end|> (HF's AddedToken)."""
    content: str
    id: int
    special: bool = True  # a control token (bos, eos, turn markers): skip_special drops it
    lstrip: bool = False  # also swallow the whitespace on its left
    rstrip: bool = False  # ... or on its right


@dataclass
class Tokenizer:
    """Text <-> ids for one checkpoint; `load_tokenizer(path)` builds it.
    `encode_plain(text, at_start)` encodes text that holds no added token (at_start: the text
    begins the input)."""
    encode_plain: Callable[[str, bool], list[int]] = field(repr=False)
    pieces: list[bytes] = field(repr=False)      # what each id decodes to; one per vocabulary id
    added: list[AddedToken] = field(repr=False)  # tokens matched whole in the text
    eos_id: int
    bos_id: int | None = None
    pad_id: int | None = None    # None: eos_id
    unk_id: int | None = None
    add_bos: bool = False        # whether the checkpoint puts bos_id before every text by default
    chat_template: str | None = field(default=None, repr=False)
    strip_first_space: bool = False  # sentencepiece: decoding drops the dummy prefix's space
    stop_ids: set[int] = field(default_factory=set)  # given ones, eos and the end of turn (below)

    def __post_init__(self):
        self.pad_id = self.eos_id if self.pad_id is None else self.pad_id
        self.vocab_size = len(self.pieces)
        # HF takes the longest added token at the leftmost place: longer ones go first in the
        # regex, each in a group of its own so that match.lastindex says which token it was.
        self.added = sorted(self.added, key=lambda t: len(t.content), reverse=True)
        space = f"[{WHITESPACE}]*"
        self.added_regex = re.compile("|".join(
            (space if t.lstrip else "") + f"({re.escape(t.content)})" + (space if t.rstrip else "")
            for t in self.added) or "(?!)")  # (?!) never matches: no added tokens
        self.special_ids = {t.id for t in self.added if t.special}
        self.stop_ids = {self.eos_id, *self.stop_ids, *self.end_of_turn_ids()}

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Text -> ids. Added tokens written in the text (<|im_start|>, <s>) become those
        tokens, as in HF."""
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        start = 0
        for match in self.added_regex.finditer(text):
            if match.start() > start:
                ids += self.encode_plain(text[start:match.start()], start == 0)
            ids.append(self.added[match.lastindex - 1].id)
            start = match.end()
        if start < len(text):
            ids += self.encode_plain(text[start:], start == 0)
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Ids -> text. Tokens can end inside a UTF-8 character: bytes that do not decode become
        U+FFFD."""
        kept = (i for i in ids if not (skip_special and i in self.special_ids))
        data = b"".join(self.pieces[i] for i in kept)
        text = data.decode("utf-8", errors="replace")
        return text[1:] if self.strip_first_space and text.startswith(" ") else text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation, [{"role": "user", "content": "..."}, ...], with the
        checkpoint's template."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id,
               "pad_token": self.pad_id}
        special = {name: self.pieces[i].decode("utf-8", errors="replace")
                   for name, i in ids.items() if i is not None}
        return compile_chat_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
            documents=None, **special)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The ids of the rendered conversation, with no extra BOS: the template writes its own
        (as in HF)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))

    def end_of_turn_ids(self) -> set[int]:
        """The added token the template writes right after an assistant's reply: <|im_end|>,
        <|eot_id|>, </s>."""
        reply = "Reply-8d1f"
        turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}]
        try:
            text = self.apply_chat_template(turns, add_generation_prompt=False)
        except (ValueError, jinja2.TemplateError):  # no template, or one that wants other roles
            return set()
        after = text[text.rfind(reply) + len(reply):].lstrip()
        match = self.added_regex.match(after) if reply in text else None
        return {self.added[match.lastindex - 1].id} if match else set()


# ----------------------------------------------------------------------------------------------
# Loading

def load_gguf_tokenizer(path: Path, reader=None) -> Tokenizer:
    """Byte-level BPE from a GGUF file's metadata, under llama.cpp's key names.
    `reader`: a gguf.GGUFReader of the file already open (parsing the metadata is slow)."""
    import gguf  # only needed for GGUF files

    fields = (reader or gguf.GGUFReader(path)).fields

    def get(key: str, default=None):
        return fields[key].contents() if key in fields else default

    kind, pre = get("tokenizer.ggml.model"), get("tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r} in {path.name}: "
                         "expected gpt2 (byte-level BPE)")
    if pre not in GGUF_SPLITS:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} in {path.name}: "
                         f"known: {list(GGUF_SPLITS)}")
    tokens, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type", [])
    merges = [tuple(m.split(" ")) for m in get("tokenizer.ggml.merges")]
    # Token types 3 (control, like <|im_end|>) and 4 (user-defined) are matched whole in the
    # text. A "control" token spelled outside the byte alphabet is a converter's mislabel: HF
    # skips it, so do we.
    added = [AddedToken(t, i, special=ty == 3) for i, (t, ty) in enumerate(zip(tokens, types))
             if ty == 4 or (ty == 3 and all(c in CHAR_TO_BYTE for c in t))]
    eot = get("tokenizer.ggml.eot_token_id")
    return Tokenizer(
        encode_plain=ByteLevelBPE({t: i for i, t in enumerate(tokens)}, merges, GGUF_SPLITS[pre]),
        pieces=[byte_level_bytes(t) for t in tokens], added=added,
        eos_id=get("tokenizer.ggml.eos_token_id"), bos_id=get("tokenizer.ggml.bos_token_id"),
        pad_id=get("tokenizer.ggml.padding_token_id"),
        unk_id=get("tokenizer.ggml.unknown_token_id"),
        add_bos=bool(get("tokenizer.ggml.add_bos_token", False)),
        chat_template=get("tokenizer.chat_template"), stop_ids={eot} if eot is not None else set())


def pre_tokenizer_steps(spec: dict) -> list[dict]:
    """The steps of a tokenizer.json pre-tokenizer (a "Sequence" holds several)."""
    pre = spec.get("pre_tokenizer") or {}
    return pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]


def split_regexes(spec: dict) -> list[str]:
    """The split regexes of a byte-level tokenizer.json, in the order its pre-tokenizer applies
    them."""
    splits = []
    for step in pre_tokenizer_steps(spec):
        kind = step.get("type")
        if kind == "ByteLevel" and not step.get("add_prefix_space"):
            # HF's ByteLevel has GPT-2's regex built in
            splits += [GPT2_SPLIT] if step.get("use_regex", True) else []
        elif kind == "Split" and step["behavior"] == "Isolated" and not step.get("invert"):
            splits.append(step["pattern"].get("Regex") or re.escape(step["pattern"]["String"]))
        elif kind == "Digits":
            splits.append(DIGIT_SPLIT if step.get("individual_digits") else DIGIT_SPLIT + "+")
        else:
            raise ValueError(f"unsupported pre-tokenizer step in tokenizer.json: {step}")
    return splits


SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def special_token(config: dict, name: str) -> str | None:
    """A special token ("eos_token") as tokenizer_config.json writes it: a string or
    {"content": ...}."""
    value = config.get(name)
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer_json(folder: Path, spec: dict, config: dict) -> Tokenizer:
    """Byte-level BPE from a Hugging Face tokenizer.json, with the tokenizer_config.json beside
    it."""
    model = spec["model"]
    affixes = model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
    if spec.get("normalizer") or affixes:
        raise ValueError(f"unsupported tokenizer.json in {folder}: "
                         "it has a normalizer or word affixes")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    added = [AddedToken(t["content"], t["id"], t["special"], t["lstrip"], t["rstrip"])
             for t in spec["added_tokens"]]
    ids = model["vocab"] | {t.content: t.id for t in added}
    pieces = [b""] * (max(ids.values()) + 1)
    for token, i in ids.items():
        pieces[i] = byte_level_bytes(token)
    special = {name: ids.get(special_token(config, name)) for name in SPECIAL_TOKENS}
    if special["eos_token"] is None:
        raise ValueError(f"{folder}: tokenizer_config.json names no eos_token that is in "
                         "the vocabulary")
    # add_bos_token in tokenizer_config.json decides, as in HF; without it, the post-processor's
    # template does (Llama 3's puts <|begin_of_text|> first).
    post = spec.get("post_processor") or {}
    steps = post.get("processors", [post])  # a "Sequence" post-processor holds several
    template = next((step["single"] for step in steps
                     if step.get("type") == "TemplateProcessing"), [])
    starts_special = template and "SpecialToken" in template[0]
    first = ids[template[0]["SpecialToken"]["id"]] if starts_special else None
    if special["bos_token"] is None:
        special["bos_token"] = first
    return Tokenizer(
        encode_plain=ByteLevelBPE(model["vocab"], merges, split_regexes(spec),
                                  model.get("ignore_merges", False),
                                  ids.get(model.get("unk_token"))),
        pieces=pieces, added=added, eos_id=special["eos_token"], bos_id=special["bos_token"],
        pad_id=special["pad_token"], unk_id=special["unk_token"],
        add_bos=config.get("add_bos_token", first is not None),
        chat_template=chat_template(folder, config))


def load_sentencepiece(folder: Path, config: dict) -> Tokenizer:
    """A sentencepiece tokenizer.model, read as HF's LlamaTokenizer reads it (with its
    defaults)."""
    text = SentencePieceText(folder / "tokenizer.model", legacy=config.get("legacy", False),
                             add_prefix_space=config.get("add_prefix_space") is not False)
    sp, pieces = text.with_prefix, text.pieces()
    # Control pieces (<s>, </s>), <unk> and the config's added tokens are matched whole in the
    # text.
    added = {i: AddedToken(sp.id_to_piece(i), i)
             for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)}
    for i, t in config.get("added_tokens_decoder", {}).items():
        added[int(i)] = AddedToken(t["content"], int(i), t.get("special", True),
                                   t.get("lstrip", False), t.get("rstrip", False))
    pieces += [b""] * (max(added) + 1 - len(pieces))
    for t in added.values():
        pieces[t.id] = t.content.encode("utf-8")
    ids = {t.content: t.id for t in added.values()}

    def special(name: str, default: int) -> int | None:  # the config's token, else the model's
        content = special_token(config, name)
        if content:
            return ids.get(content, sp.piece_to_id(content))
        return default if default >= 0 else None

    return Tokenizer(
        encode_plain=text, pieces=pieces, added=list(added.values()),
        eos_id=special("eos_token", sp.eos_id()), bos_id=special("bos_token", sp.bos_id()),
        pad_id=special("pad_token", sp.pad_id()), unk_id=special("unk_token", sp.unk_id()),
        add_bos=config.get("add_bos_token", True), chat_template=chat_template(folder, config),
        strip_first_space=text.add_prefix_space)


def chat_template(folder: Path, config: dict) -> str | None:
    """The chat template: in tokenizer_config.json, or (newer transformers) in
    chat_template.jinja."""
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: take the default one
        template = next((t["template"] for t in template if t["name"] == "default"), None)
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a .gguf file or of a Hugging Face checkpoint folder. In a folder, a
    byte-level BPE tokenizer.json is used if there is one, else tokenizer.model;
    tokenizer_config.json (if any) gives the chat template, the special tokens and
    add_bos_token."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"cannot load a tokenizer from {path.name}: "
                             "expected a .gguf file or a folder")
        return load_gguf_tokenizer(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    if (path / "tokenizer.json").exists():
        spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        kind = spec["model"]["type"]
        if kind == "BPE" and any(s.get("type") == "ByteLevel" for s in pre_tokenizer_steps(spec)):
            return load_tokenizer_json(path, spec, config)
        if not (path / "tokenizer.model").exists():
            raise ValueError(f"unsupported tokenizer.json in {path}: model {kind!r} with "
                             f"pre-tokenizer {pre_tokenizer_steps(spec)[0].get('type')!r}; "
                             "expected byte-level BPE")
    if (path / "tokenizer.model").exists():
        return load_sentencepiece(path, config)
    raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")
