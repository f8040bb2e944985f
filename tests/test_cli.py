"""What a newcomer meets first: chat by default, stdin, any checkpoint kind, --help, the README's example
and those of docs/python.md."""
import io
import json
import re
import shutil
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
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


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
    prompt cache: run twice, the second run loads all but the last prompt token; the last two answer
    questions together."""
    readme = (ROOT / "README.md").read_text()
    [example] = re.findall(r"```python\n(.*?)```", readme, re.S)
    examples = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "python.md").read_text(), re.S)
    assert len(examples) == 5 and examples[0] == example  # the README's, then the pieces in docs/python.md
    monkeypatch.chdir(tmp_path)  # book.kv is written here
    namespace = {}
    for example in examples[:2]:
        exec(compile(example, "README.md", "exec"), namespace)
        out = capsys.readouterr().out
        assert "Paris" in out and "<|" not in out
    for expected in (0, len(namespace["ids"]) - 1):
        exec(compile(examples[2], "README.md", "exec"), namespace)
        assert namespace["reused"] == expected and (tmp_path / "book.kv").exists()
    for example in examples[3:]:  # generate_many, then its pieces: the same answers, each the one alone
        exec(compile(example, "README.md", "exec"), namespace)
    ns = namespace
    assert ns["again"] == ns["answers"] == [G.generate(ns["model"], ns["doc"] + q, 64, stop_ids=ns["tokenizer"].stop_ids)
                                            for q in ns["questions"]]
