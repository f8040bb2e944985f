"""What a newcomer meets first: chat by default, stdin, any checkpoint kind, --help, the README's example
and those of docs/python.md."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import checkpoint
import cli
import generate as G
from tokenizer import load_tokenizer
from tests.test_cli_errors import run_in_process

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.default_model]
QUESTION = "What is the capital of France?"


def run_json(argv, capsys):
    r = run_in_process(G.cli, [*argv, "--json"], capsys)
    assert r.returncode == 0, r.stderr
    [line] = r.stdout.splitlines()  # the JSON object is all there is on stdout
    return json.loads(line), r.stderr


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(checkpoint.default_checkpoint())


def test_chat_is_the_default_when_the_checkpoint_has_a_template(tokenizer, capsys):
    """An instruct model given a bare prompt ends its turn at once: a custom --prompt gave an empty answer."""
    out, _ = run_json(["--prompt", QUESTION, "--max-new-tokens", "12"], capsys)
    templated = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}]))
    assert out["prompt_tokens"] == len(templated) and "Paris" in out["text"]
    raw, _ = run_json(["--prompt", QUESTION, "--max-new-tokens", "2", "--no-chat"], capsys)
    assert raw["prompt_tokens"] == len(tokenizer.encode(QUESTION))
    same, _ = run_json(["--prompt", QUESTION, "--max-new-tokens", "12", "--chat"], capsys)  # still accepted
    assert same["new_tokens"] == out["new_tokens"]


def test_prompt_file_dash_reads_stdin(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(QUESTION.encode())))
    out, _ = run_json(["--prompt-file", "-", "--max-new-tokens", "12"], capsys)
    assert "Paris" in out["text"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("caf\xe9".encode("latin-1"))))
    r = run_in_process(G.cli, ["--prompt-file", "-"], capsys)
    assert r.returncode == 1 and r.stderr.strip().endswith("stdin is not UTF-8 text (see --prompt-file)")


def test_a_prompt_files_trailing_newline_is_not_part_of_the_chat_turn(tmp_path, monkeypatch, capsys):
    """`echo QUESTION | generate.py --prompt-file -` once answered in French: the newline that ends the
    file went into the chat turn (38 prompt tokens instead of 37)."""
    by_flag, _ = run_json(["--prompt", QUESTION, "--max-new-tokens", "8"], capsys)
    (tmp_path / "q.txt").write_text(QUESTION + "\n")
    by_file, _ = run_json(["--prompt-file", str(tmp_path / "q.txt"), "--max-new-tokens", "8"], capsys)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f"{QUESTION}\n\n".encode())))
    by_stdin, _ = run_json(["--prompt-file", "-", "--max-new-tokens", "8"], capsys)
    assert by_file["prompt_tokens"] == by_stdin["prompt_tokens"] == by_flag["prompt_tokens"]
    assert by_file["new_tokens"] == by_stdin["new_tokens"] == by_flag["new_tokens"] and "Paris" in by_stdin["text"]


def test_an_hf_model_dir_runs_directly_converted_once(tmp_path, monkeypatch, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM
    monkeypatch.setenv("HEADINFER_CACHE", str(tmp_path / "cache"))
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                                      max_position_embeddings=128))
    hf.save_pretrained(tmp_path / "hf")
    for f in checkpoint.default_checkpoint().glob("tokenizer*"):  # the ids of our tokenizer fit its vocab
        shutil.copy(f, tmp_path / "hf")
    argv = ["--checkpoint", str(tmp_path / "hf"), "--prompt", "hello", "--max-new-tokens", "3"]
    first, err = run_json(argv, capsys)
    assert "converting" in err and len(first["new_tokens"]) == 3
    again, err = run_json(argv, capsys)
    assert "converting" not in err and again["new_tokens"] == first["new_tokens"]


def test_help_gives_every_flag_a_line_and_its_default(capsys):
    r = run_in_process(cli.parse_args, ["--help"], capsys)
    assert r.returncode == 0
    flags = [a for a in cli.build_parser()._actions if a.option_strings and a.dest != "help"]
    for action in flags:
        assert action.help and "default" in action.help, action.option_strings
        assert action.option_strings[0] in r.stdout
    assert r.stdout.count("default") >= len(flags)


def test_the_readme_python_examples_run_and_print_clean_text(capsys, tmp_path, monkeypatch):
    """The first once printed `... Paris.<|im_end|>`: decode now leaves control tokens out. The second
    continues the first with the pieces (plan, cache, prefill, decode); the third saves and loads a
    prompt cache: run twice, the second run loads all but the last prompt token; the fourth decodes
    speculatively; the last two answer questions together."""
    readme = (ROOT / "README.md").read_text()
    [example] = re.findall(r"```python\n(.*?)```", readme, re.S)
    examples = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "python.md").read_text(), re.S)
    assert len(examples) == 6 and examples[0] == example  # the README's, then the pieces in docs/python.md
    monkeypatch.chdir(tmp_path)  # book.kv is written here
    namespace = {}
    for example in examples[:2]:
        exec(compile(example, "README.md", "exec"), namespace)
        out = capsys.readouterr().out
        assert "Paris" in out and "<|" not in out
    for expected in (0, len(namespace["ids"]) - 1):
        exec(compile(examples[2], "README.md", "exec"), namespace)
        assert namespace["reused"] == expected and (tmp_path / "book.kv").exists()
    exec(compile(examples[3], "README.md", "exec"), namespace)  # speculative decoding: plain decoding's tokens
    assert namespace["tokens"] == G.generate(namespace["model"], namespace["ids"], 64)
    for example in examples[4:]:  # generate_many, then its pieces: the same answers, each the one alone
        exec(compile(example, "README.md", "exec"), namespace)
    ns = namespace
    assert ns["again"] == ns["answers"] == [G.generate(ns["model"], ns["doc"] + q, 64, stop_ids=ns["tokenizer"].stop_ids)
                                            for q in ns["questions"]]


def test_json_is_the_only_stdout_and_help_and_docs_say_so(tiny_ckpt, capsys):
    """--help said "as the last stdout line", as though the answer were printed before it."""
    out, _ = run_json(["--checkpoint", str(tiny_ckpt), "--prompt", "hi", "--max-new-tokens", "3"], capsys)
    assert len(out["new_tokens"]) == 3
    [help_text] = [a.help for a in cli.build_parser()._actions if "--json" in a.option_strings]
    assert "the only output on stdout" in help_text and "last" not in help_text
    [row] = [l for l in (ROOT / "docs" / "cli.md").read_text().splitlines() if l.startswith("| `--json`")]
    assert "the only output on stdout" in row


def test_every_stderr_line_starts_on_a_line_of_its_own_when_both_streams_share_one(tiny_ckpt, tmp_path, monkeypatch):
    """Under 2>&1 the saved-cache note once glued onto the answer: "...their namespaceprompt cache ..."."""
    words = load_tokenizer(tiny_ckpt).encode("their namespace")  # an answer that ends mid-line
    real_decode = G.decode
    monkeypatch.setattr(G, "decode", lambda *a, **kw: (w for w, _ in zip(words, real_decode(*a, **kw))))
    both = io.StringIO()
    monkeypatch.setattr(sys, "stdout", both)
    monkeypatch.setattr(sys, "stderr", both)
    (tmp_path / "doc.txt").write_text("A document. " * 10)
    G.cli(["--checkpoint", str(tiny_ckpt), "--prompt-file", str(tmp_path / "doc.txt"), "--prompt", "Why?",
           "--prompt-cache", str(tmp_path / "doc.kv"), "--max-new-tokens", str(len(words))])
    lines = both.getvalue().splitlines()
    assert lines[-3:-1] == ["their namespace", f"prompt cache {tmp_path / 'doc.kv'}: {lines[-2].split(': ')[1]}"]
    assert lines[-2].endswith(" s)") and " tokens saved (" in lines[-2]
    assert lines[-1].startswith("prompt ") and ", prefill " in lines[-1]  # the stats line


def test_the_words_say_what_happened(tiny_ckpt, capsys):
    """One token is "1 new token"; a seed that draws nothing says so; a CPU run's plan and stats speak
    of RAM, not of streaming to a GPU it does not have."""
    r = run_in_process(G.cli, ["--checkpoint", str(tiny_ckpt), "--prompt", "hi", "--max-new-tokens", "1",
                               "--offload", "head", "--seed", "3"], capsys)
    assert r.returncode == 0, r.stderr
    assert "note: --seed has no effect: decoding is greedy at --temperature 0" in r.stderr
    [plan] = [l for l in r.stderr.splitlines() if l.startswith("plan")]
    assert plan.startswith("plan: head offload on the CPU") and "streamed" not in plan and "GPU" not in plan
    [stats] = [l for l in r.stderr.splitlines() if l.startswith("prompt ")]
    assert ", 1 new token;" in stats and "GPU" not in stats and "in RAM (CPU run)" in stats
    r = run_in_process(G.cli, ["--checkpoint", str(tiny_ckpt), "--prompt", "hi", "--max-new-tokens", "1",
                               "--temperature", "0.7", "--seed", "3"], capsys)
    assert r.returncode == 0 and "--seed has no effect" not in r.stderr


def test_the_readmes_python_example_runs_from_the_repository_root_or_with_it_on_pythonpath(tmp_path):
    """The modules are flat files with plain names (model, cli, errors): the README says where the
    example runs, and it runs there: from the root, and from anywhere with the root on PYTHONPATH."""
    readme = (ROOT / "README.md").read_text()
    [example] = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert re.search(r"Run it in the repository root \(.*typed into `python` started there\), or\s+from anywhere "
                     r"with the repository on `PYTHONPATH`", readme)
    script = tmp_path / "example.py"
    script.write_text(example)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    runs = [dict(args=[sys.executable, "-"], input=example, cwd=ROOT, env=env),  # python started in the root
            dict(args=[sys.executable, str(script)], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)})]
    for run in runs:
        r = subprocess.run(**run, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "Paris" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "No module named 'generate'" in r.stderr  # a script elsewhere, though started in the root: as the README says


def test_the_readmes_first_screen_gives_the_embedded_models_context():
    """A long-context tool whose default model reads 8K tokens says so before a newcomer tries a book."""
    context = json.loads((checkpoint.default_checkpoint() / "config.json").read_text())["max_seq_len"]
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:12])
    assert f"{context:,}-token context" in first_screen
