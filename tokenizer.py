"""Tokenizers behind one small interface, plus chat templates.

Backends, picked by `load_tokenizer(dir)` from the files HF ships:
- byte-level BPE from `tokenizer.json` (GPT-2 style: SmolLM2, Qwen2/2.5, Llama-3 HF repos), run by tiktoken;
- tiktoken-format `tokenizer.model` (Llama-3 as Meta ships it), run by tiktoken;
- sentencepiece `tokenizer.model` (Llama-2, Mistral, Gemma).
`tokenizer_files_from_gguf` writes the HF files for a GGUF's embedded tokenizer (used by convert_checkpoint.py):
tokenizer.json for byte-level BPE, a sentencepiece tokenizer.model rebuilt from the GGUF's pieces otherwise.

Special tokens written literally in the text encode to their own id, as HF does for added tokens: that is
how chat prompts work. `decode` leaves out control tokens (<|im_end|>, </s>, ...) unless asked to keep them,
so generated ids decode to the text a user reads. To print while generating, use `tokenizer.decode_stream()`.
"""

import base64
import functools
import json
import re
import struct
import unicodedata
from datetime import datetime
from pathlib import Path

import jinja2.ext
import regex  # tiktoken depends on it; it knows \p{L}-style classes, unlike re
import tiktoken
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Split regexes as HF's tokenizers and tiktoken know them (and llama.cpp's pre-tokenizer list).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

# Meta's Llama-3 tokenizer.model holds only the 128000 ranks; these 256 special tokens follow them.
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>",
    "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
    "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]

# Tokens that end a turn or a document in the families we know; all of them stop generation.
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<end_of_turn>")


class Tokenizer:
    """The common part: special tokens in text, BOS, stop ids, chat template, streaming decode.
    Public attributes: `special_tokens` ({text: id}), `control_ids` (the special tokens that are markup, not
    text: all of them unless the tokenizer says otherwise), `bos_id`, `eos_id`, `bos_token`, `eos_token` (None
    when absent), `add_bos` (encode's default), `stop_ids` (set), `chat_template` (Jinja source or None).
    Backends implement `_encode_plain(text, after_special)` (text holding no special token) and `_decode(ids)`."""

    def __init__(self, special_tokens: dict[str, int], bos: str | None, eos: str | None, add_bos: bool,
                 control_ids: set[int] | None = None):
        self.special_tokens = special_tokens
        self.control_ids = set(special_tokens.values()) if control_ids is None else control_ids
        # Longest first, so a special token that starts another can't cut it short (HF matches leftmost-longest).
        names = sorted(special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, names))) if names else None
        self.bos_token, self.eos_token, self.add_bos = bos, eos, add_bos
        self.bos_id = self.token_id(bos) if bos else None
        self.eos_id = self.token_id(eos) if eos else None
        self.stop_ids = set()
        self.chat_template = None

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """Token ids of `text`. `bos` None means the tokenizer's own default (tokenizer_config.json), except
        that text already starting with the BOS token (a rendered chat template) gets no second one."""
        if bos is None:
            bos = self.add_bos and not (self.bos_token and text.startswith(self.bos_token))
        if bos and self.bos_id is None:
            raise ValueError("this tokenizer has no BOS token")
        ids = [self.bos_id] if bos else []
        pos = 0
        for m in self._special_re.finditer(text) if self._special_re else ():
            ids += self._encode_plain(text[pos:m.start()], after_special=pos > 0)
            ids.append(self.special_tokens[m.group()])
            pos = m.end()
        return ids + self._encode_plain(text[pos:], after_special=pos > 0)

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """The text of `ids`; control tokens are left out unless skip_special=False (HF's default)."""
        return self._decode([i for i in ids if i not in self.control_ids] if skip_special else ids)

    def token_id(self, token: str) -> int:
        """The id of one token given as text (a special token or any text that encodes to one id)."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        ids = self._encode_plain(token)
        if len(ids) != 1:
            raise ValueError(f"{token!r} is not a single token of this tokenizer")
        return ids[0]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role", "content"}]) with the model's Jinja chat template, as HF does.
        Templates often start with the BOS text; `encode` then adds no second BOS."""
        if not self.chat_template:  # a base model: the prompt is just what the user said last
            return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def decode_stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns ids that arrive a few at a time into text to print. It decodes everything so far and returns
    what is new; a character whose UTF-8 bytes are split over tokens decodes to U+FFFD until its last byte
    arrives, so trailing U+FFFD is held back (a real U+FFFD shows once the next text comes)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def add(self, ids: list[int]) -> str:
        self.ids += ids
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        new = text[len(self.text):]
        self.text = text
        return new


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE on tiktoken. tiktoken returns ranks as ids, so the ranks are the token ids: that
    reproduces HF's merge priority when ids grow with merge order (checked when loading tokenizer.json)."""

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str,
                 normalization: str | None = None, **kw):
        self.enc = tiktoken.Encoding("bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
        self.normalization = normalization
        # HF drops the bytes its vocab lacks (SmolLM2 has no token for a few control bytes) from each piece,
        # and the bytes on either side may then merge. tiktoken can't do that, so such text takes a slower path.
        self._missing = bytes(b for b in range(256) if bytes([b]) not in ranks)
        self._split = regex.compile(pattern) if self._missing else None
        super().__init__(special_tokens, **kw)

    def _encode_plain(self, text: str, after_special: bool = False) -> list[int]:
        if self.normalization:
            text = unicodedata.normalize(self.normalization, text)
        if not self._missing or len(raw := text.encode()) == len(raw.translate(None, self._missing)):
            return self.enc.encode_ordinary(text)
        pieces = (p.encode().translate(None, self._missing) for p in self._split.findall(text))
        return [i for p in pieces if p for i in self.enc._encode_single_piece(p)]  # BPE of one piece, no split

    def _decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab


class SentencePieceTokenizer(Tokenizer):
    """sentencepiece `tokenizer.model` (Llama-2, Mistral, Gemma). Control pieces (<s>, </s>, Mistral v3's
    [INST]...) and <unk> are the special tokens; sentencepiece encodes the text between them (and matches
    user-defined pieces itself)."""

    def __init__(self, path: Path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        special = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())
                   if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self._special_ids = {i: s for s, i in special.items()}
        self._dummy_prefix = self.sp.encode("a", out_type=str)[0].startswith("▁")
        # bos_id() and eos_id() are -1 when the model has no such token.
        bos, eos = (self.sp.id_to_piece(i) if i >= 0 else None for i in (self.sp.bos_id(), self.sp.eos_id()))
        super().__init__(special, bos=bos, eos=eos, add_bos=True)

    def _encode_plain(self, text: str, after_special: bool = False) -> list[int]:
        # sentencepiece (Llama-2, Mistral) starts all it encodes with a dummy-prefix space. After a special
        # token a real space stands in for it, as in the reference encoders: Mistral's "[INST] hi" is
        # [INST] ▁hi (mistral-common), while Llama-2's "<s>[INST]" is <s> ▁[INST] (Meta's code). HF's legacy
        # mode would give [INST] ▁ ▁hi.
        if self._dummy_prefix and after_special and text.startswith(" ") and len(text) > 1:
            text = text[1:]
        return self.sp.encode(text) if text else []

    def _decode(self, ids: list[int]) -> str:
        # sentencepiece drops control ids: write them out and decode the runs between them (each run loses
        # its first space, the dummy prefix or the space that stood in for it).
        out, run = [], []
        for i in ids:
            if i in self._special_ids:
                out += [self.sp.decode(run), self._special_ids[i]]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()


# Text that touches most kinds of token: words, numbers, code, punctuation, accents, other scripts, emoji.
VOCABULARY_PROBE = ("The quick brown fox jumps over 13 lazy dogs; déjà vu, naïve café. def f(x): return x**2 # "
                    "{'a': [1, 2.5e-3]}\n\t東京は日本の首都です。Привет, мир! 🙂 <tag attr=\"v\">&amp;</tag>")


def same_vocabulary(a: Tokenizer, b: Tokenizer, samples: int = 4096) -> bool:
    """Whether two tokenizers give text the same ids (a draft model's must be its target's): the same
    special tokens, the same ids for a probe text, and the same text for ids spread over the vocabulary."""
    if a.special_tokens != b.special_tokens or a.encode(VOCABULARY_PROBE) != b.encode(VOCABULARY_PROBE):
        return False
    n = min(a.vocab_size, b.vocab_size)
    ids = [i for i in range(0, n, max(1, n // samples)) if i not in a.control_ids]
    return all(_piece(a, i) == _piece(b, i) for i in ids)


def _piece(tokenizer: Tokenizer, i: int) -> str | None:
    try:
        return tokenizer.decode([i], skip_special=False)
    except (KeyError, IndexError, ValueError):  # an id the vocabulary skips
        return None


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer in a checkpoint dir, or None when it has no tokenizer files."""
    path = Path(path)
    tok = _load_backend(path)
    if tok is None:
        return None
    config = _read_json(path / "tokenizer_config.json")
    # tokenizer_config.json has the last word over the backend's own defaults.
    if config.get("add_bos_token") is not None:
        tok.add_bos = bool(config["add_bos_token"])
    for kind in ("bos", "eos"):
        token = config.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token:
            setattr(tok, f"{kind}_token", token)
            setattr(tok, f"{kind}_id", tok.token_id(token))
    gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    if tok.eos_id is None and gen_eos:
        tok.eos_id = gen_eos[0]
    ends = [tok.special_tokens[t] for t in END_TOKENS if t in tok.special_tokens]
    tok.stop_ids = {i for i in (tok.eos_id, *gen_eos, *ends) if i is not None}
    tok.chat_template = _chat_template(path, config)
    return tok


def _load_backend(path: Path) -> Tokenizer | None:
    json_file, model_file = path / "tokenizer.json", path / "tokenizer.model"
    if json_file.exists():
        spec = json.loads(json_file.read_text(encoding="utf-8"))
        decoder = (spec.get("decoder") or {}).get("type")
        if decoder == "ByteLevel":
            return _bpe_from_tokenizer_json(spec)
        # Llama-2/Mistral HF repos ship a sentencepiece-style tokenizer.json next to tokenizer.model.
        if not model_file.exists():
            raise ValueError(f"{json_file}: only byte-level BPE is supported (its decoder is {decoder})")
    if not model_file.exists():
        return None
    if _is_tiktoken_file(model_file):
        ranks = {base64.b64decode(tok): int(rank)
                 for tok, rank in (line.split() for line in model_file.read_bytes().splitlines() if line)}
        special = {s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIAL_TOKENS)}
        return TiktokenTokenizer(ranks, special, LLAMA3_PATTERN,
                                 bos="<|begin_of_text|>", eos="<|end_of_text|>", add_bos=True)
    return SentencePieceTokenizer(model_file)


def _is_tiktoken_file(path: Path) -> bool:
    """tiktoken files are text lines `base64 rank`; a sentencepiece model is a binary protobuf."""
    with open(path, "rb") as f:
        fields = f.readline(1024).split()
    try:
        return len(fields) == 2 and int(fields[1]) >= 0 and bool(base64.b64decode(fields[0], validate=True))
    except ValueError:  # binascii.Error is a ValueError too
        return False


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to the printable characters that stand for them in tokenizer.json:
    printable Latin-1 bytes stand for themselves, the other 68 for U+0100 onwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


# str.translate table from tokenizer.json's characters back to Latin-1 characters, i.e. to the raw bytes.
_UNICODE_TO_LATIN1 = {ord(u): b for b, u in _bytes_to_unicode().items()}


def _bpe_from_tokenizer_json(spec: dict) -> TiktokenTokenizer:
    model = spec["model"]
    if (model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")):
        options = {k: v for k, v in model.items() if k not in ("vocab", "merges")}
        raise ValueError(f"unsupported tokenizer.json model {json.dumps(options)}")
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    added_ids = set(added.values())
    ranks = {t.translate(_UNICODE_TO_LATIN1).encode("latin-1"): i
             for t, i in model["vocab"].items() if i not in added_ids}
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; HF the pair that comes
    # first in `merges`. Ranks = ids give HF's order only if the ids of merge results grow with it.
    last = -1
    for merge in model["merges"]:
        i = model["vocab"]["".join(merge.split(" ") if isinstance(merge, str) else merge)]
        if i < last:
            raise ValueError("tokenizer.json merges are not in token id order; this is not supported")
        last = i
    bos = _template_bos(spec.get("post_processor"))
    control = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}  # the rest decode as text
    return TiktokenTokenizer(ranks, added, _split_pattern(spec.get("pre_tokenizer")),
                             _normalization(spec.get("normalizer")), bos=bos, eos=None, add_bos=bos is not None,
                             control_ids=control)


def _split_pattern(pre: dict | None) -> str:
    """tiktoken's split regex for the pre_tokenizer of a tokenizer.json."""
    steps = pre["pretokenizers"] if pre and pre["type"] == "Sequence" else [pre]
    kinds = [s and s["type"] for s in steps]
    last = steps[-1] or {}
    if kinds[-1] == "ByteLevel" and not last.get("add_prefix_space"):
        if kinds == ["ByteLevel"] and last.get("use_regex", True):
            return GPT2_PATTERN
        if kinds == ["Digits", "ByteLevel"] and last.get("use_regex", True):
            # Digits isolates digits (one by one, or runs), then the GPT-2 regex splits the text between
            # them. One regex does both: no other branch can take a digit, and at the end of the text
            # between digits `\s+(?!\S)` sees the end, so it must also accept a digit after the spaces.
            # ("a  1": two stages give "a", "  ", "1"; the plain GPT-2 regex would give "a", " ", " 1".)
            digits = r"\p{N}" if steps[0].get("individual_digits") else r"\p{N}+"
            return digits + "|" + GPT2_PATTERN.replace(r" ?\p{N}+|", "").replace(r"(?!\S)", r"(?![^\s\p{N}])")
        split = steps[0]
        if (kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True) and "Regex" in split["pattern"]
                and split.get("behavior") == "Isolated" and not split.get("invert")):
            # tiktoken drops text its regex doesn't match; HF keeps each gap between matches as a piece.
            return "{0}|(?:(?!{0})[\\s\\S])+".format(split["pattern"]["Regex"])
    raise ValueError(f"unsupported tokenizer.json pre_tokenizer {json.dumps(pre)}")


def _normalization(normalizer: dict | None) -> str | None:
    if normalizer is None:
        return None
    if normalizer["type"] in ("NFC", "NFD", "NFKC", "NFKD"):
        return normalizer["type"]
    raise ValueError(f"unsupported tokenizer.json normalizer {json.dumps(normalizer)}")


def _template_bos(post: dict | None) -> str | None:
    """The special token a TemplateProcessing post-processor puts before the text (Llama-3's BOS)."""
    for p in post.get("processors", [post]) if post else ():
        if p["type"] == "TemplateProcessing" and "SpecialToken" in p["single"][0]:
            return p["single"][0]["SpecialToken"]["id"]
    return None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _chat_template(path: Path, config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = {t["name"]: t["template"] for t in template}.get("default")
    if template is None and (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    return template or _read_json(path / "chat_template.json").get("chat_template")


@functools.lru_cache
def _compile_template(template: str) -> jinja2.Template:
    """The environment HF's apply_chat_template renders in (sandboxed, trim/lstrip blocks, its helpers)."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


# GGUF `tokenizer.ggml.pre` -> tokenizer.json pre_tokenizer (names and regexes as in llama.cpp's list).
def _byte_level(use_regex):
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(pattern):
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}, _byte_level(False)]}


GGUF_LLAMA3 = ("llama-bpe", "llama3", "llama-v3")
GGUF_PRE_TOKENIZERS = {
    "gpt2": _byte_level(True),
    "default": _byte_level(True),
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _byte_level(True)]},
    "qwen2": _split(QWEN2_PATTERN),
    **{name: _split(LLAMA3_PATTERN) for name in GGUF_LLAMA3},
}
# tokenizer.ggml.token_type values: sentencepiece's piece types (1 normal, 5 unused).
GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_BYTE = 2, 3, 4, 6


def tokenizer_files_from_gguf(reader_or_path, out_dir: str | Path) -> None:
    """Write the HF tokenizer files equivalent to a GGUF's embedded tokenizer, for `load_tokenizer`: a
    `tokenizer.json` for byte-level BPE (`tokenizer.ggml.model` "gpt2"), the sentencepiece `tokenizer.model`
    for a sentencepiece vocabulary ("llama": Llama-2, Mistral, Gemma), and a `tokenizer_config.json`."""
    import gguf

    reader = reader_or_path if isinstance(reader_or_path, gguf.GGUFReader) else gguf.GGUFReader(reader_or_path)

    def field(name, default=None):
        return reader.fields[f"tokenizer.{name}"].contents() if f"tokenizer.{name}" in reader.fields else default

    model, pre = field("ggml.model"), field("ggml.pre", "default")
    if model not in ("gpt2", "llama"):
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported "
                         "(only 'gpt2', byte-level BPE, and 'llama', sentencepiece)")
    if model == "gpt2" and pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(GGUF_PRE_TOKENIZERS)})")
    tokens, types = field("ggml.tokens"), field("ggml.token_type")
    ids = {key: field(f"ggml.{gguf_key}_token_id")
           for key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    named = {f"{key}_token": tokens[i] for key, i in ids.items() if i is not None}
    # Unless the file says, llama.cpp puts BOS first for a sentencepiece vocabulary but not for a BPE one.
    add_bos = bool(field("ggml.add_bos_token", model == "llama"))
    config = {"add_bos_token": add_bos, "add_eos_token": bool(field("ggml.add_eos_token", False)),
              "clean_up_tokenization_spaces": False, **named}
    if field("chat_template") is not None:
        config["chat_template"] = field("chat_template")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model == "gpt2":
        spec = _tokenizer_json_from_gguf(tokens, types, ids, named, add_bos, pre, field("ggml.merges"))
        (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    else:
        scores = field("ggml.scores", [0.0] * len(tokens))  # llama.cpp's default too
        (out_dir / "tokenizer.model").write_bytes(_sentencepiece_model(
            tokens, scores, types, ids, add_dummy_prefix=bool(field("ggml.add_space_prefix", True))))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")


def _tokenizer_json_from_gguf(tokens, types, ids, named, add_bos, pre, merges) -> dict:
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] == GGUF_CONTROL}
             for i, t in enumerate(tokens) if types[i] in (GGUF_CONTROL, GGUF_USER_DEFINED)]
    post = None
    if add_bos:  # how tokenizer.json itself says "put BOS first"
        bos = named["bos_token"]
        first = {"SpecialToken": {"id": bos, "type_id": 0}}
        post = {"type": "TemplateProcessing", "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [first, {"Sequence": {"id": "A", "type_id": 0}},
                         first, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [ids["bos"]], "tokens": [bos]}}}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": GGUF_PRE_TOKENIZERS[pre], "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  # llama.cpp, like HF, takes a Llama-3 piece that is a whole token as is.
                  "ignore_merges": pre in GGUF_LLAMA3,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }


# llama.cpp's SPM tokenizer and sentencepiece's BPE model run the same algorithm on these files: spaces become ▁ (and
# a ▁ goes first when add_space_prefix), user-defined pieces are taken whole (control pieces too, by llama.cpp and by
# Tokenizer.encode), the rest is split into characters; the adjacent pair whose concatenation is the piece of
# highest score merges (the leftmost on ties) until no pair is a piece; a character outside the vocab becomes its
# UTF-8 bytes as <0xXX> pieces. Where they differ:
# - llama.cpp puts a space before the text after every special token, not only at the start of the text
#   (SentencePieceTokenizer._encode_plain does what the reference encoders do instead);
# - llama.cpp keeps a merge that made an unused piece, sentencepiece splits it back into its two parts;
# - without byte pieces llama.cpp looks each byte up as a one-character token (and fails without one), sentencepiece
#   writes <unk>;
# - a file without BOS or EOS ids means ids 1 and 2 to llama.cpp, the pieces <s> and </s> to sentencepiece (the
#   same tokens in Llama-2 and Mistral).
def _sentencepiece_model(tokens, scores, types, ids, add_dummy_prefix: bool) -> bytes:
    """A sentencepiece `tokenizer.model` (a serialized ModelProto, field numbers from sentencepiece_model.proto)
    holding a GGUF's sentencepiece vocabulary. Written by hand: protobuf is not a dependency."""
    # sentencepiece wants exactly one unknown piece. A GGUF may have none (llama.cpp's converter makes <unk> a
    # control piece when tokenizer_config.json calls it special, as Llama-2's, Mistral's and Gemma's do) or several
    # (llama.cpp's own phi-3 vocab GGUF pads with unknown [PAD<n>] pieces). So the file's <unk> (else its first
    # unknown piece, else llama.cpp's default, 0) is the unknown piece, and other unknown pieces become control
    # ones, which llama.cpp too takes whole in text.
    unk = ids["unk"] if ids["unk"] is not None else types.index(GGUF_UNKNOWN) if GGUF_UNKNOWN in types else 0
    types = [GGUF_UNKNOWN if i == unk else GGUF_CONTROL if k == GGUF_UNKNOWN else k for i, k in enumerate(types)]
    ids = {**ids, "unk": unk}
    # llama.cpp's converter writes the ▁ in user-defined pieces as a space (for Gemma); sentencepiece matches
    # those pieces in the text after its spaces became ▁.
    pieces = [_proto_message((1, t.replace(" ", "▁") if k == GGUF_USER_DEFINED else t), (2, float(s)), (3, k))
              for t, s, k in zip(tokens, scores, types)]
    trainer = _proto_message(
        (3, 2),  # model_type BPE
        (35, GGUF_BYTE in types),  # byte_fallback, which sentencepiece wants exactly when there are byte pieces
        *((number, -1 if ids[k] is None else ids[k]) for number, k in ((40, "unk"), (41, "bos"), (42, "eos"),
                                                                        (43, "pad"))),
        # sentencepiece finds these tokens by name (<s>, </s>, <unk>, <pad> if unnamed), not by the ids above.
        *((number, tokens[ids[k]]) for number, k in ((45, "unk"), (46, "bos"), (47, "eos"), (48, "pad"))
          if ids[k] is not None))
    # name, add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces: text as is but spaces as ▁
    normalizer = _proto_message((1, "identity"), (3, add_dummy_prefix), (4, False), (5, True))
    return b"".join(_proto_field(1, p) for p in pieces) + _proto_field(2, trainer) + _proto_field(3, normalizer)


def _proto_message(*fields) -> bytes:
    return b"".join(_proto_field(number, value) for number, value in fields)


def _proto_field(number: int, value) -> bytes:
    """One protobuf field: bool or int as a varint, float as fixed32, str or bytes (a message) length-delimited."""
    if isinstance(value, float):
        return _proto_varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, int):  # bools too
        return _proto_varint(number << 3) + _proto_varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _proto_varint(number << 3 | 2) + _proto_varint(len(data)) + data


def _proto_varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # a negative int32 goes as its 64-bit two's complement, as protobuf writes it
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))
