"""Tensor parallelism (tensor_parallel.py) on the CPU with gloo, as CI can run it: torchrun with 2 and 4
ranks gives one process's greedy tokens and answers, and its fp32 logits to rounding, for every policy
and chunking; every rank computes the same; the CLI prints once; a failing rank ends the group in one line.

The group runs tests/tp_worker.py (or generate.py) under `python -m torch.distributed.run`, each rank
a process of its own, as users run it; one process computes the reference here.
"""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import generate as G
from checkpoint import default_checkpoint
from convert_checkpoint import convert
from errors import UsageError
from model import ModelArgs, Transformer
from planner import fmt_bytes
from tensor_parallel import TensorParallel
from tests import tp_worker as W
from tests.test_cli import run_json

ROOT = Path(__file__).resolve().parent.parent
GROUP_TIMEOUT_S = 300  # a group that hangs fails the test instead of the suite

# A rank's model does one process's arithmetic except where the all-reduces finish the sums of
# attention's and the MLP's output projections: N partial sums added in another order than one matmul
# adds them, rounded once more each, and the differences carried through the later layers. So the
# bound is in ulps of the largest logit: measured over this model's 3 layers, 2 and 4 ranks, 3
# policies and chunks 3/16, at most 8.2e-6 on logits up to 7.2, about 10 ulps (fp32 eps x 7.2 is
# 8.6e-7); 64 ulps leave about six times that.
LOGIT_ULPS = 64


def assert_one_process_logits(got, expected):
    assert got.shape == expected.shape  # the whole vocabulary, not one rank's slice
    ulp = torch.finfo(torch.float32).eps * expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=LOGIT_ULPS * ulp)


def lively(args: ModelArgs) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(args)
    for p in model.parameters():  # larger than default init: peaked attention, tokens that vary
        torch.nn.init.normal_(p, std=0.25)
    return model


def write_checkpoint(out: Path, args: ModelArgs, tokenizer_from: Path | None = None) -> Path:
    out.mkdir()
    args.to_json(out / "config.json")
    save_file(lively(args).state_dict(), out / "model.safetensors")
    for f in tokenizer_from.glob("tokenizer*") if tokenizer_from else ():
        (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random Qwen2 from HF transformers (save_pretrained), converted by convert_checkpoint.py:
    8 query and 4 KV heads (2 and 4 ranks divide them), the q/k/v bias, an untied output, and a
    vocabulary of 101 that neither 2 nor 4 divides (the last rank's slice is padded)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                                      num_key_value_heads=4, vocab_size=101, max_position_embeddings=256,
                                      rope_theta=10000.0, tie_word_embeddings=False))
    with torch.no_grad():  # larger than default init: peaked attention, tokens that vary
        for name, p in hf.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.25)
    tmp = tmp_path_factory.mktemp("tp")
    hf.save_pretrained(tmp / "hf")
    return convert(tmp / "hf", tmp / "ckpt")


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    """For the CLI: the default model's tokenizer, tied embeddings, heads that 2 ranks divide."""
    args = ModelArgs(dim=48, n_layer=2, n_head=8, n_kv_head=4, head_dim=8, intermediate_size=96, vocab_size=49152,
                     max_seq_len=256, rope_base=10000.0, tie_word_embeddings=True)
    return write_checkpoint(tmp_path_factory.mktemp("tp") / "chat", args, default_checkpoint())


def torchrun(n: int, *argv, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                           *map(str, argv)], cwd=ROOT, env=env, input=stdin, capture_output=True, text=True,
                          timeout=GROUP_TIMEOUT_S)


@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def ranks(request, ckpt, tmp_path_factory):
    """What each rank of an N-rank group computed (tests/tp_worker.py), run once per N."""
    n, out = request.param, tmp_path_factory.mktemp(f"ranks{request.param}")
    r = torchrun(n, "tests/tp_worker.py", ckpt, out)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(out / f"rank{i}.pt", weights_only=False) for i in range(n)]


@pytest.fixture(scope="module")
def alone(ckpt):
    model, _ = G.load_model(ckpt)
    return model


def test_each_rank_holds_its_share_of_the_heads_mlp_and_vocabulary(ranks):
    n = len(ranks)
    shard = ranks[0]["shard_args"]
    assert (shard.n_head, shard.n_kv_head, shard.intermediate_size) == (8 // n, 4 // n, 96 // n)
    assert shard.vocab_size == -(-101 // n) and (shard.dim, shard.head_dim, shard.qkv_bias) == (64, 8, True)


def test_a_decode_step_is_two_all_reduces_per_layer_and_two_for_the_vocabulary(ranks):
    # What bench/NOTES.md item 12 counts: the embedding, attention and the MLP of each layer sum one
    # hidden state each (dim values), and the logits one padded vocabulary.
    n = len(ranks)
    assert ranks[0]["collectives"] == [64] + [64, 64] * 3 + [-(-101 // n) * n]


def test_every_rank_computes_the_same_logits_tokens_and_answers(ranks):
    for other in ranks[1:]:
        for key, value in ranks[0].items():
            same = torch.equal(value, other[key]) if isinstance(value, torch.Tensor) else value == other[key]
            assert same, key


@pytest.mark.parametrize("policy", W.POLICIES)
@pytest.mark.parametrize("chunk", W.CHUNKS)
def test_logits_are_one_process_logits_to_fp32_rounding(ranks, alone, policy, chunk):
    assert_one_process_logits(ranks[0][f"logits {policy} {chunk}"], W.logits_of(alone, policy, chunk))


@pytest.mark.parametrize("chunk", W.CHUNKS)
def test_the_policies_agree_bit_for_bit_in_a_group_as_in_one_process(ranks, chunk):
    # Each rank's caches do its heads' attention in the same calls (attention.attention), so the
    # all-reduces receive equal partial sums whatever the policy.
    none = ranks[0][f"logits none {chunk}"]
    for policy in ("layer", "head"):
        assert torch.equal(ranks[0][f"logits {policy} {chunk}"], none)


@pytest.mark.parametrize("policy", W.POLICIES)
def test_greedy_tokens_and_many_answers_are_one_process_ones(ranks, alone, policy):
    for chunk in W.CHUNKS:
        expected = G.generate(alone, W.PROMPT, 24, offload=policy, prefill_chunk=chunk)
        assert ranks[0][f"tokens {policy} {chunk}"] == expected
        assert len(set(expected)) > 2  # a model whose tokens vary, or equality would prove little
    answers = G.generate_many(alone, W.PROMPT[:29], W.QUESTIONS, 12, offload=policy, prefill_chunk=4)
    assert ranks[0][f"answers {policy}"] == answers


@pytest.mark.parametrize("speculate", ["lookup", "self"])
def test_speculative_decoding_in_a_group_gives_one_process_plain_tokens(ranks, alone, speculate):
    for policy in ("none", "head"):
        assert ranks[0][f"speculated {speculate} {policy}"] == G.generate(alone, W.PROMPT, 24, offload=policy)


def test_sampling_with_one_seed_draws_the_same_tokens_on_every_rank_as_in_one_process(ranks, alone):
    # Equal logits on every rank (the test above) and one seed: equal draws. One process's logits
    # differ in the last bits only, which moves a draw only when it falls that close to a boundary.
    expected = G.generate(alone, W.PROMPT, 24, temperature=1.0, seed=W.SEED)
    assert ranks[0]["sampled"] == expected and len(set(expected)) > 10


@pytest.fixture(scope="module")
def quantized_ckpts(tmp_path_factory):
    """A float checkpoint whose every linear takes int4 groups of 32 on each of 2 ranks (dim 64, MLP 128,
    4 query heads of 16), and its int4 copy converted with --quantize."""
    from tests.test_quantize import ARGS
    tmp = tmp_path_factory.mktemp("quantized")
    float_ckpt = write_checkpoint(tmp / "float", replace(ARGS, vocab_size=101))
    return float_ckpt, convert(float_ckpt, tmp / "int4", quantize="int4")


@pytest.mark.parametrize("weights", ["int8", "stored int4"])
def test_quantized_weights_shard_into_the_one_process_model(quantized_ckpts, weights, tmp_path):
    # int8 is quantized whole as it loads, then split: a row-parallel layer's ranks share each output
    # channel's one scale, so the group's model is one process's, and the logits agree to the
    # all-reduces' rounding as for float weights. A stored int4 checkpoint's scales and zeros are split
    # with their groups' columns.
    ckpt = quantized_ckpts[0] if weights == "int8" else quantized_ckpts[1]
    mode = "int8" if weights == "int8" else None
    r = torchrun(2, "tests/tp_worker.py", ckpt, tmp_path, mode or "stored")
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "rank0.pt", weights_only=False)
    alone = G.load_model(ckpt, weights=mode)[0]
    for policy in ("none", "head"):
        assert_one_process_logits(got[f"logits {policy}"], W.logits_of(alone, policy, 16))
        assert got[f"tokens {policy}"] == G.generate(alone, W.PROMPT, 24, offload=policy, prefill_chunk=16)


def test_a_shard_is_the_full_tensor_cut_by_heads_rows_and_columns(ckpt):
    # The shards of every rank, put back together the way the all-reduces combine them, are the
    # full model's tensors (wqkv: each rank's q, k and v heads; wo/w2: columns; w1/w3, vocabulary: rows).
    args = ModelArgs.from_json(ckpt / "config.json")
    with safe_open(ckpt / "model.safetensors", framework="pt") as f:
        full = {name: f.get_tensor(name) for name in f.keys()}
        for n in (2, 4):
            shards = [{name: TensorParallel(r, n, torch.device("cpu")).read_shard(f, name, args) for name in full}
                      for r in range(n)]
            q, kv = args.n_head * args.head_dim, args.n_kv_head * args.head_dim
            for name, whole in full.items():
                parts = [s[name] for s in shards]
                if ".wqkv." in name:
                    pieces = [p.split([q // n, kv // n, kv // n]) for p in parts]
                    rebuilt = torch.cat([torch.cat([p[i] for p in pieces]) for i in range(3)])
                elif name.endswith(("wo.weight", "w2.weight")):
                    rebuilt = torch.cat(parts, dim=1)
                elif name.endswith(("w1.weight", "w3.weight", "tok_embeddings.weight", "output.weight")):
                    rebuilt = torch.cat(parts)[:whole.shape[0]]
                else:
                    assert all(torch.equal(p, whole) for p in parts), name  # norms: whole on every rank
                    continue
                assert torch.equal(rebuilt, whole), (n, name)
            rows = -(-args.vocab_size // n)
            assert not shards[-1]["output.weight"][args.vocab_size - (n - 1) * rows:].any()  # the padding


@pytest.fixture(scope="module")
def gemma2_ckpt(tmp_path_factory):
    """A tiny random Gemma-2 from HF transformers, converted: sliding-window layers (window 5, shorter
    than the prompt), soft caps, sandwich norms; 4 KV heads and a vocabulary of 101 for 2 ranks."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    hf = Gemma2ForCausalLM(Gemma2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
                                        num_key_value_heads=4, head_dim=8, vocab_size=101, max_position_embeddings=256,
                                        query_pre_attn_scalar=8, sliding_window=5, attn_logit_softcapping=5.0,
                                        final_logit_softcapping=10.0))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.25)
    tmp = tmp_path_factory.mktemp("tp-gemma2")
    hf.save_pretrained(tmp / "hf")
    return convert(tmp / "hf", tmp / "ckpt")


def test_a_gemma2_group_with_sliding_windows_answers_as_one_process(gemma2_ckpt, tmp_path):
    """Each rank's rings hold its own heads; the norms after attention and the MLP see the summed
    outputs, and the final soft cap each rank's whole logits: one process's tokens and answers, logits
    to rounding."""
    r = torchrun(2, "tests/tp_worker.py", gemma2_ckpt, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "rank0.pt", weights_only=False)
    alone, _ = G.load_model(gemma2_ckpt)
    assert len(alone.args.sliding_layers) == 2 and got["shard_args"].sliding_layers == [0, 2]
    for policy in W.POLICIES:
        for chunk in W.CHUNKS:
            assert_one_process_logits(got[f"logits {policy} {chunk}"], W.logits_of(alone, policy, chunk))
            assert got[f"tokens {policy} {chunk}"] == G.generate(alone, W.PROMPT, 24, offload=policy,
                                                                 prefill_chunk=chunk)
        assert got[f"answers {policy}"] == G.generate_many(alone, W.PROMPT[:29], W.QUESTIONS, 12, offload=policy,
                                                           prefill_chunk=4)


def test_ranks_that_do_not_divide_the_kv_heads_are_refused_by_name():
    args = ModelArgs(dim=48, n_layer=2, n_head=9, n_kv_head=3, head_dim=8, intermediate_size=96, vocab_size=101)
    with pytest.raises(UsageError, match=r"2 tensor-parallel ranks must divide the model's KV heads, 3; run 1 or 3"):
        TensorParallel(0, 2, torch.device("cpu")).shard_args(args)


# --- the CLI under torchrun (the checkpoint borrows the default model's tokenizer) -----------------

@pytest.mark.default_model
def test_the_cli_prints_once_and_answers_as_one_process(chat_ckpt, capsys):
    argv = ["--checkpoint", chat_ckpt, "--max-new-tokens", "16", "--offload", "head", "--prefill-chunk", "8"]
    expected, _ = run_json([str(a) for a in argv], capsys)
    r = torchrun(2, "generate.py", *argv, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1  # rank 0's JSON alone: rank 1 printed nothing
    got = json.loads(lines[0])
    assert got["new_tokens"] == expected["new_tokens"]
    # The plan, the stats line and the JSON are rank 0's share, and say so: half the heads' KV each.
    assert r.stderr.count("plan per rank (2 ranks, each with 1/2 of the heads): head offload on the CPU") == 1
    assert (got["tp_ranks"], expected["tp_ranks"]) == (2, 1) and 2 * got["plan"]["kv_bytes"] == expected["plan"]["kv_bytes"]
    [stats] = [l for l in r.stderr.splitlines() if l.startswith("prompt ")]
    assert stats.endswith(f"KV {fmt_bytes(got['kv_bytes_cpu'])} in RAM (CPU run) per rank (2 ranks)")


@pytest.mark.slow
@pytest.mark.default_model
def test_the_embedded_model_in_three_ranks_answers_as_one_process(capsys):
    expected, _ = run_json([], capsys)  # the README's main job: "What is the capital of France?"
    r = torchrun(3, "generate.py", "--json")  # SmolLM2-135M has 3 KV heads: 3 ranks of one each
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["new_tokens"] == expected["new_tokens"] and "Paris" in got["text"]


@pytest.mark.default_model
def test_the_cli_answers_many_questions_read_from_stdin_as_one_process(chat_ckpt, capsys, tmp_path):
    (tmp_path / "doc.txt").write_text("A document about the capital of France. " * 8)
    questions = "What is it about?\nWhich city?\nWhy?\n"
    argv = ["--checkpoint", chat_ckpt, "--max-new-tokens", "10", "--prompt-file", tmp_path / "doc.txt"]
    (tmp_path / "qs.txt").write_text(questions)
    expected, _ = run_json([str(a) for a in [*argv, "--questions-file", tmp_path / "qs.txt"]], capsys)
    r = torchrun(2, "generate.py", *argv, "--questions-file", "-", "--json", stdin=questions)  # only rank 0 reads stdin
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["answers"] == expected["answers"]


@pytest.mark.default_model
def test_a_prompt_cache_is_one_file_per_rank_and_a_rank_without_its_file_costs_all_the_reuse(chat_ckpt, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("A long document that is prefilled once. " * 10)
    argv = ["generate.py", "--checkpoint", chat_ckpt, "--max-new-tokens", "8", "--prompt-file", doc,
            "--prompt-cache", tmp_path / "doc.kv", "--json"]
    first = torchrun(2, *argv, "--prompt", "First?")
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("doc.kv*")) == ["doc.kv.rank0-of-2", "doc.kv.rank1-of-2"]
    again = torchrun(2, *argv, "--prompt", "Second?")
    assert again.returncode == 0, again.stderr[-3000:]
    reused = json.loads(again.stdout.strip().splitlines()[-1])["reused_tokens"]
    assert reused > 50
    (tmp_path / "doc.kv.rank1-of-2").unlink()  # rank 1 must prefill everything, so rank 0 does too
    lost = torchrun(2, *argv, "--prompt", "Third?")
    assert lost.returncode == 0, lost.stderr[-3000:]
    assert json.loads(lost.stdout.strip().splitlines()[-1])["reused_tokens"] == 0


@pytest.mark.default_model
def test_the_compiled_decode_step_runs_in_a_group(chat_ckpt, capsys):
    argv = ["--checkpoint", chat_ckpt, "--max-new-tokens", "12", "--offload", "head"]
    expected, _ = run_json([str(a) for a in argv], capsys)
    r = torchrun(2, "generate.py", *argv, "--compile", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["new_tokens"] == expected["new_tokens"]


def test_sampling_without_a_seed_uses_rank_0s_random_seed_on_every_rank(tmp_path):
    # Ranks that drew different tokens would feed different ids into the same all-reduces: no error,
    # only a wrong answer. The CLI gives every rank rank 0's seed (tests/tp_seed.py writes each rank's).
    r = torchrun(2, "tests/tp_seed.py", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    seeds = [int((tmp_path / f"seed{rank}").read_text()) for rank in range(2)]
    assert seeds[0] == seeds[1]
    again = torchrun(2, "tests/tp_seed.py", tmp_path)
    assert again.returncode == 0 and int((tmp_path / "seed0").read_text()) != seeds[0]  # drawn afresh each run


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.default_model
def test_a_group_the_heads_cannot_be_split_over_is_refused_in_one_line(chat_ckpt):
    r = torchrun(3, "generate.py", "--checkpoint", chat_ckpt)
    assert r.returncode != 0 and r.stdout == ""
    assert error_lines(r.stderr) == ["error: 3 tensor-parallel ranks must divide the model's KV heads, 4; "
                                     "run 1, 2 or 4 ranks (torchrun --nproc-per-node)"]


@pytest.mark.default_model
def test_what_one_rank_cannot_fit_is_refused_on_all_in_one_line_before_loading(chat_ckpt):
    # tensor_parallel.agree: the same for the weights' check here and for each rank's KV plan.
    r = torchrun(2, "tests/tp_fault.py", "ram", "--checkpoint", chat_ckpt)  # rank 1 has 1 KiB of host RAM
    assert r.returncode != 0 and r.stdout == ""
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: rank 1: the weights in torch.float32 need "), r.stderr
    assert "rank 0" not in r.stderr.split("torch/distributed/elastic")[0]  # rank 0 refused with it, said nothing


@pytest.mark.default_model
def test_a_rank_that_fails_during_prefill_ends_every_rank_with_one_line(chat_ckpt):
    # tests/tp_fault.py is generate.py's CLI with rank 1's prefill raising after its first chunk, while
    # rank 0 waits in an all-reduce for it: the group must end (no hang) and say so once.
    r = torchrun(2, "tests/tp_fault.py", "prefill", "--checkpoint", chat_ckpt, "--prefill-chunk", "8")
    assert r.returncode != 0
    assert error_lines(r.stderr) == ["error: rank 1 failed: RuntimeError: injected fault in prefill"]
    ours = r.stderr.split("torch/distributed/elastic")[0]  # what the ranks printed before torchrun's report
    assert "Traceback" not in ours and "interrupted" not in ours  # rank 0, ended by rank 1, said nothing


@pytest.mark.cuda
@pytest.mark.default_model
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_over_nccl_answer_as_one_gpu(chat_ckpt, capsys):
    argv = ["--checkpoint", chat_ckpt, "--max-new-tokens", "16", "--offload", "head", "--device", "cuda",
            "--dtype", "float32"]
    expected, _ = run_json([str(a) for a in argv], capsys)
    r = torchrun(2, "generate.py", *argv, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["new_tokens"] == expected["new_tokens"]
