"""Wrong invocations of generate.py and convert_checkpoint.py: non-zero exit, one line on stderr, no traceback.

The sweep calls each CLI's entry point in this process (an exception escaping it fails the test, as a
traceback would); two cases also run as real processes, to prove the scripts behave the same there.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convert_checkpoint
import generate

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.default_model  # the tiny checkpoint borrows the default model's tokenizer


def variant(tiny_ckpt, tmp_path, change):
    """A copy of the tiny checkpoint with one thing broken by `change(dir)`."""
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, d)
    change(d)
    return d


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_config(d, **fields):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **fields}))


def other_vocabulary(d):
    """A special token of another name: a tokenizer that gives some text other ids."""
    spec = json.loads((d / "tokenizer.json").read_text())
    token = next(t for t in spec["added_tokens"] if t["content"] == "<gh_stars>")
    token["content"] = "<stars>"
    (d / "tokenizer.json").write_text(json.dumps(spec))


# (id, argv builder taking (tiny checkpoint, tmp dir), expected words in the message)
GENERATE_CASES = [
    ("missing-checkpoint", lambda c, t: ["--checkpoint", str(t / "nope")], "does not exist"),
    ("empty-dir", lambda c, t: ["--checkpoint", str(t)], "no config.json"),
    ("checkpoint-is-a-weights-file", lambda c, t: ["--checkpoint", str(c / "model.safetensors")],
     "is a safetensors weights file, not a model"),
    ("hub-id-offline", lambda c, t: ["--checkpoint", "no-such-org/no-such-model"], "no-such-org/no-such-model"),
    ("no-weights", lambda c, t: ["--checkpoint", str(variant(c, t, lambda d: (d / "model.safetensors").unlink()))],
     "no model.safetensors"),
    ("garbage-weights", lambda c, t: ["--checkpoint", str(variant(
        c, t, lambda d: (d / "model.safetensors").write_bytes(b"not a safetensors file")))], "corrupt"),
    ("truncated-weights", lambda c, t: ["--checkpoint", str(variant(
        c, t, lambda d: truncate(d / "model.safetensors")))], "corrupt"),
    ("config-shape-mismatch", lambda c, t: ["--checkpoint", str(variant(
        c, t, lambda d: edit_config(d, intermediate_size=80)))], "layers.0.feed_forward.w1.weight"),
    ("config-not-json", lambda c, t: ["--checkpoint", str(variant(
        c, t, lambda d: (d / "config.json").write_text("{dim: 3")))], "not a valid config"),
    ("config-unknown-key", lambda c, t: ["--checkpoint", str(variant(
        c, t, lambda d: edit_config(d, attention_sinks=4)))], "unknown config keys"),
    ("config-bad-heads", lambda c, t: ["--checkpoint", str(variant(
        c, t, lambda d: edit_config(d, n_kv_head=3)))], "not a multiple"),
    ("no-tokenizer", lambda c, t: ["--checkpoint", str(variant(
        c, t, lambda d: [f.unlink() for f in d.glob("tokenizer*")]))], "no tokenizer"),
    ("empty-prompt", lambda c, t: ["--checkpoint", str(c), "--prompt", ""], "prompt is empty"),
    ("blank-prompt", lambda c, t: ["--checkpoint", str(c), "--prompt", " \n\t"], "prompt is empty"),
    ("prompt-file-missing", lambda c, t: ["--checkpoint", str(c), "--prompt-file", str(t / "none.txt")],
     "does not exist"),
    ("prompt-file-not-utf8", lambda c, t: ["--checkpoint", str(c), "--prompt-file", str(
        (t / "latin1.txt", (t / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1")))[0])], "not UTF-8"),
    ("prompt-file-is-dir", lambda c, t: ["--checkpoint", str(c), "--prompt-file", str(t)], "cannot read"),
    ("prompt-file-blank", lambda c, t: ["--checkpoint", str(c), "--prompt-file", str(
        (t / "blank.txt", (t / "blank.txt").write_text(" \n"))[0])], "blank.txt holds only whitespace"),
    ("prompt-file-empty-with-a-question", lambda c, t: ["--checkpoint", str(c), "--prompt", "What is it?", "--prompt-file",
                                                       str((t / "e.txt", (t / "e.txt").write_text(""))[0])],
     "the prompt file"),  # not "the prompt is empty": the question is not (the file's name: below)
    ("prompt-file-nul-bytes", lambda c, t: ["--checkpoint", str(c), "--prompt-file", str(
        (t / "nul.txt", (t / "nul.txt").write_bytes(b"\0" * 3000))[0])], "nul.txt is not text: it holds NUL bytes"),
    ("prompt-too-long", lambda c, t: ["--checkpoint", str(c), "--prompt", "word " * 300], "max_seq_len"),
    ("prompt-beyond-ctx-size", lambda c, t: ["--checkpoint", str(c), "--prompt", "word " * 30, "--ctx-size", "20"],
     "ctx_size is 20"),
    ("ctx-size-beyond-model", lambda c, t: ["--checkpoint", str(c), "--ctx-size", "1000"], "exceeds the model's"),
    ("ctx-size-zero", lambda c, t: ["--ctx-size", "0"], "must be >= 1"),
    ("weights-unknown", lambda c, t: ["--checkpoint", str(c), "--weights", "int3"], "invalid choice: 'int3'"),
    ("weights-other-than-stored", lambda c, t: ["--checkpoint", str(convert_checkpoint.convert(c, t / "q", quantize="int8")),
                                                "--weights", "int4"], "holds int8 weights, not int4"),
    ("interactive-ctx-beyond-model", lambda c, t: ["--checkpoint", str(c), "-i", "--ctx-size", "1000"],
     "exceeds the model's"),
    ("interactive-opening-from-stdin", lambda c, t: ["-i", "--prompt-file", "-"], "stdin carries the turns"),
    ("questions-with-prompt", lambda c, t: ["--questions-file", "qs.txt", "--prompt", "hi"],
     "--prompt does not combine with --questions-file"),
    ("questions-interactive", lambda c, t: ["--questions-file", "qs.txt", "-i"], "one question at a time"),
    ("questions-ctx-size", lambda c, t: ["--questions-file", "qs.txt", "--ctx-size", "99"], "--ctx-size does not"),
    ("questions-compile", lambda c, t: ["--questions-file", "qs.txt", "--compile"], "--compile does not"),
    ("questions-and-document-from-stdin", lambda c, t: ["--questions-file", "-", "--prompt-file", "-"],
     "cannot both read stdin"),
    ("questions-file-missing", lambda c, t: ["--checkpoint", str(c), "--questions-file", str(t / "none.txt")],
     "questions file"),
    ("questions-file-blank", lambda c, t: ["--checkpoint", str(c), "--questions-file", str(
        (t / "blank.txt", (t / "blank.txt").write_text("\n \n"))[0])], "blank.txt holds only whitespace"),
    ("questions-too-long", lambda c, t: ["--checkpoint", str(c), "--questions-file", str(
        (t / "qs.txt", (t / "qs.txt").write_text("word " * 300))[0])], "the longest question"),
    ("prompt-cache-ro-alone", lambda c, t: ["--prompt-cache-ro"], "only with a prompt cache"),
    ("prompt-cache-is-dir", lambda c, t: ["--prompt-cache", str(t)], "is a directory"),
    ("prompt-cache-dir-missing", lambda c, t: ["--prompt-cache", str(t / "no" / "p.kv")], "not a directory"),
    ("max-new-tokens-zero", lambda c, t: ["--max-new-tokens", "0"], "must be >= 1"),
    ("max-new-tokens-negative", lambda c, t: ["--max-new-tokens", "-3"], "must be >= 1"),
    ("max-new-tokens-text", lambda c, t: ["--max-new-tokens", "many"], "expected an integer"),
    ("max-new-tokens-float", lambda c, t: ["--max-new-tokens", "2.5"], "expected an integer"),
    ("temperature-negative", lambda c, t: ["--temperature", "-1"], "must be >= 0"),
    ("temperature-nan", lambda c, t: ["--temperature", "nan"], "must be >= 0"),
    ("temperature-text", lambda c, t: ["--temperature", "hot"], "expected a number"),
    ("top-k-zero", lambda c, t: ["--top-k", "0"], "must be >= 1"),
    ("prefill-chunk-zero", lambda c, t: ["--prefill-chunk", "0"], "must be >= 1"),
    ("budget-negative", lambda c, t: ["--gpu-kv-budget", "-1"], "must be >= 0"),
    ("budget-without-cuda", lambda c, t: ["--checkpoint", str(c), "--offload", "head", "--gpu-kv-budget", "0.5"],
     "needs a CUDA device"),
    ("kv-exceeds-host-ram", lambda c, t: ["--checkpoint", str(variant(c, t, lambda d: edit_config(
        d, max_seq_len=10**12))), "--max-new-tokens", str(10**11)], "tokens would fit"),
    ("seed-text", lambda c, t: ["--seed", "abc"], "invalid int"),
    ("unknown-dtype", lambda c, t: ["--dtype", "float64"], "invalid choice"),
    ("unknown-offload", lambda c, t: ["--offload", "disk"], "invalid choice"),
    ("unknown-flag", lambda c, t: ["--turbo"], "unrecognized arguments"),
    ("compile-cuda-graphs", lambda c, t: ["--compile", "reduce-overhead"], "replays CUDA graphs, which skip"),
    ("compile-unknown-mode", lambda c, t: ["--compile", "fast"], "is not a torch.compile mode"),
    ("speculate-k-zero", lambda c, t: ["--speculate", "lookup", "--speculate-k", "0"], "must be >= 1"),
    ("speculate-unknown", lambda c, t: ["--speculate", "oracle"], "invalid choice"),
    ("draft-window-below-the-sinks", lambda c, t: ["--speculate", "self", "--draft-window", "3"],
     "at least the 4 sink tokens"),
    ("speculate-compile", lambda c, t: ["--speculate", "lookup", "--compile"], "passes of k + 1 tokens"),
    ("speculate-questions", lambda c, t: ["--speculate", "self", "--questions-file", "qs.txt"],
     "does not combine with --questions-file"),
    ("speculate-and-draft", lambda c, t: ["--speculate", "self", "--draft-checkpoint", str(c)], "its own drafter"),
    ("draft-missing", lambda c, t: ["--checkpoint", str(c), "--draft-checkpoint", str(t / "nope")], "does not exist"),
    ("draft-another-vocabulary", lambda c, t: ["--checkpoint", str(c), "--draft-checkpoint", str(variant(
        c, t, other_vocabulary))], "has another vocabulary than the model"),
    ("draft-without-tokenizer", lambda c, t: ["--checkpoint", str(c), "--draft-checkpoint", str(variant(
        c, t, lambda d: [f.unlink() for f in d.glob("tokenizer*")]))], "has no tokenizer files"),
    ("draft-cannot-fit", lambda c, t: ["--checkpoint", str(c), "--draft-checkpoint", str(variant(
        c, t, lambda d: edit_config(d, intermediate_size=10**11)))], "the weights in torch.float32 need"),
    ("cuda-without-gpu", lambda c, t: ["--device", "cuda"], "CUDA is not available"),
    ("unknown-device", lambda c, t: ["--device", "tpu9"], "unknown device"),
]

HF_LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
                   "vocab_size": 100, "max_position_embeddings": 64, "rms_norm_eps": 1e-5}

CONVERT_CASES = [
    ("src-missing", lambda t: [str(t / "nope"), "--out", str(t / "out")], "does not exist"),
    ("src-without-weights", lambda t: [str((t / "hf", (t / "hf").mkdir(), (t / "hf" / "config.json").write_text(
        json.dumps(HF_LLAMA_CONFIG)))[0]), "--out", str(t / "out")], "weights"),
    ("unsupported-architecture", lambda t: [str((t / "hf", (t / "hf").mkdir(), (t / "hf" / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"]})))[0]), "--out", str(t / "out")], "GPT2LMHeadModel"),
    ("junk-gguf", lambda t: [str((t / "m.gguf", (t / "m.gguf").write_bytes(b"GGUF junk"))[0]), "--out", str(t / "out")],
     "gguf"),
    ("hub-id-offline", lambda t: ["no-such-org/no-such-model", "--out", str(t / "out")], "no-such-org/no-such-model"),
    ("no-out", lambda t: [str(t)], "--out"),
]


def run(script, argv, **kw):
    return subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120, **kw)


def run_in_process(entry, argv, capsys):
    """(exit code, stdout, stderr) of a CLI entry point called here."""
    code = 0
    try:
        entry(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def assert_one_line_error(r, words):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, r.stderr
    assert words.lower() in lines[0].lower(), lines[0]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("case", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate_bad_input(case, tiny_ckpt, tmp_path, capsys):
    _, argv, words = case
    r = run_in_process(generate.cli, argv(tiny_ckpt, tmp_path), capsys)
    assert_one_line_error(r, words)
    assert r.stdout == ""


@pytest.mark.parametrize("case", CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES])
def test_convert_bad_input(case, tmp_path, capsys):
    _, argv, words = case
    r = run_in_process(convert_checkpoint.main, argv(tmp_path), capsys)
    assert_one_line_error(r, words)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_errors_point_at_the_flags_that_fix_them(tiny_ckpt, capsys):
    """The Python API names its arguments; the CLI turns them into flags."""
    r = run_in_process(generate.cli, ["--checkpoint", str(tiny_ckpt), "--gpu-kv-budget", "1"], capsys)
    assert_one_line_error(r, "(see --gpu-kv-budget)")


def test_the_real_scripts_behave_the_same(tiny_ckpt, tmp_path):
    """The fixture is valid, so the failures above come from the one thing each case breaks; and the
    scripts, run as processes, fail in one line with exit 1."""
    r = run("generate.py", ["--checkpoint", str(tiny_ckpt), "--prompt", "hello", "--max-new-tokens", "3"])
    assert r.returncode == 0, r.stderr
    r = run("generate.py", ["--checkpoint", str(tmp_path / "nope")])
    assert_one_line_error(r, "does not exist")
    assert r.returncode == 1 and r.stdout == ""
    r = run("convert_checkpoint.py", [str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert_one_line_error(r, "does not exist")


def test_an_empty_prompt_file_is_named_not_the_prompt(tiny_ckpt, tmp_path, capsys):
    empty = tmp_path / "e.txt"
    empty.write_text("")
    r = run_in_process(generate.cli, ["--checkpoint", str(tiny_ckpt), "--prompt-file", str(empty), "--prompt", "Why?"],
                       capsys)
    assert_one_line_error(r, f"error: the prompt file {empty} is empty (see --prompt-file)")


def test_a_prompt_cache_path_that_holds_the_users_data_is_refused_and_left_as_it_was(tiny_ckpt, tmp_path, capsys):
    """The prompt cache is written after the answer: a path that holds anything but a prompt cache is
    refused before any work, and the file there is byte-identical afterwards."""
    from safetensors.torch import save_file
    book, questions, foreign = tmp_path / "book.txt", tmp_path / "qs.txt", tmp_path / "other.safetensors"
    book.write_text("A block is a unit of storage. " * 20)
    questions.write_text("What is a block?\n")
    save_file({"x": torch.zeros(3)}, foreign)
    weights = tiny_ckpt / "model.safetensors"
    document = ["--prompt-file", str(book), "--prompt", "What is a block?"]
    cases = [  # (arguments, the file at stake, the words of the one error line)
        ([*document, "--prompt-cache", str(book)], book, f"the prompt cache {book} is the file of --prompt-file"),
        (["--prompt-file", str(book), "--questions-file", str(questions), "--prompt-cache", str(questions)], questions,
         "is the file of --questions-file"),
        ([*document, "--prompt-cache", str(weights)], weights, f"is a file of --checkpoint {tiny_ckpt}"),
        (["--prompt-cache", str(book)], book, f"{book} exists and is not a prompt cache (not a safetensors file)"),
        (["--prompt-cache", str(foreign)], foreign, "is not a prompt cache (a safetensors file of other tensors)"),
        (["--prompt-cache", str(foreign), "--prompt-cache-ro"], foreign, "is not a prompt cache"),
    ]
    for argv, victim, words in cases:
        before = victim.read_bytes()
        r = run_in_process(generate.cli, ["--checkpoint", str(tiny_ckpt), *argv], capsys)
        assert_one_line_error(r, words)
        assert r.stdout == "" and "plan:" not in r.stderr  # refused before any work
        assert victim.read_bytes() == before


def test_a_prompt_past_the_context_says_where_it_came_from_the_limit_and_what_to_do(tiny_ckpt, tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text("word " * 300)
    r = run_in_process(generate.cli, ["--checkpoint", str(tiny_ckpt), "--prompt-file", str(book), "--prompt", "Why?"],
                       capsys)
    assert_one_line_error(r, f"error: the prompt file {book} with the question of --prompt has ")
    assert_one_line_error(r, f"but {tiny_ckpt} has a context of 256 tokens (its max_seq_len) for the prompt and the "
                             f"answer together: shorten the text, or use a checkpoint with a longer context "
                             f"(see --checkpoint)")
    r = run_in_process(generate.cli, ["--checkpoint", str(tiny_ckpt), "-i", "--prompt-file", str(book)], capsys)
    assert_one_line_error(r, f"error: the opening, the prompt file {book}, has ")
