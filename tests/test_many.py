"""Many questions over one shared prefix: each answer is the one-question answer, for every policy, chunking,
batch and question length; stopped questions leave the batch; what cannot fit is refused before work."""
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attention
import generate as G
import offload
import planner
from attention import merge, shared_attention
from errors import UsageError
from generate import decode_many, generate, generate_many, prefill, prefill_questions
from model import ModelArgs, Transformer
from offload import StandardCache
from planner import GiB, make_cache, plan_memory
from shared_prefix import SharedPrefixCache
from tests.test_cli_errors import run_in_process
from tests.test_offload import tiny_model
from tests.test_prompt_cache import LAYOUT_IDS, LAYOUTS, ids_of

# A question's attention here is two softmaxes merged by log-sum-exp, in fp32; alone, it is one SDPA
# call over the whole sequence: the same sums in another order. The largest logit difference measured
# over 3 models x 3 GQA ratios x chunks 3/16/64 x B = 1/3/8 x 11 steps was 1.2e-6 on logits of
# magnitude up to 1.8 (a few ulps); 1e-5 allows about ten times that.
LOGIT_ATOL = 1e-5


def questions_of(lengths, seed=1, vocab=97):
    return [ids_of(n, seed=seed + i, vocab=vocab) for i, n in enumerate(lengths)]


def prefix_cache(model, policy, max_len, **layout):
    args = model.args
    if layout:
        return make_cache(plan_memory(args, max_len, torch.float32, "head", "cpu", **layout), args)
    return make_cache(planner.plan_cache(args, max_len, torch.float32, "cpu", policy), args)


@torch.no_grad()
def shared_logits(model, cache, prefix, questions, forced, chunk):
    """The logits of every question: after its own tokens, then after each of the `forced` tokens
    [B, n] fed to all questions together; [B, n + 1, vocab]."""
    prefill(model, cache, prefix, chunk=chunk)
    together = SharedPrefixCache(cache, [len(q) for q in questions], forced.shape[1])
    out = [prefill_questions(model, together, questions, chunk)]
    for t in range(forced.shape[1]):
        out.append(model(forced[:, t:t + 1], together.positions(1), together)[:, -1])
    return torch.stack(out, dim=1)


@torch.no_grad()
def alone_logits(model, prefix, question, forced, chunk):
    """The same for one question on its own, in the standard cache: [n + 1, vocab]."""
    ids = prefix + question
    cache = StandardCache(model.args, 1, len(ids) + len(forced), "cpu", torch.float32)
    out = [prefill(model, cache, ids, chunk=chunk)[0]]
    for t, token in enumerate(forced):
        out.append(model(torch.tensor([[token]]), torch.tensor([len(ids) + t]), cache)[0, -1])
    return torch.stack(out)


# --- exactness ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", range(len(LAYOUTS)), ids=LAYOUT_IDS)
@pytest.mark.parametrize("chunk", [4, 16, 64])
def test_logits_equal_each_question_alone_within_fp32_rounding(layout, chunk):
    model, prefix = tiny_model(6, 3), ids_of(50)
    questions = questions_of([1, 7, 19, 3, 12])
    forced = torch.randint(0, 97, (5, 9), generator=torch.Generator().manual_seed(3))
    policy, extra = LAYOUTS[layout]
    got = shared_logits(model, prefix_cache(model, policy, 50, **extra), prefix, questions, forced, chunk)
    for i, question in enumerate(questions):
        torch.testing.assert_close(got[i], alone_logits(model, prefix, question, forced[i].tolist(), chunk),
                                   atol=LOGIT_ATOL, rtol=0)


def test_every_policy_gives_the_same_logits_bit_for_bit():
    """On the CPU the prefix is attended one KV head per call whatever the policy groups (as in
    test_offload): the same arithmetic on the same values."""
    model, prefix, questions = tiny_model(6, 3), ids_of(40), questions_of([2, 9, 5])
    forced = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(4))
    results = [shared_logits(model, prefix_cache(model, policy, 40, **extra), prefix, questions, forced, 16)
               for policy, extra in LAYOUTS]
    for name, got in zip(LAYOUT_IDS[1:], results[1:]):
        assert torch.equal(got, results[0]), name


@pytest.mark.parametrize("policy", ["none", "layer", "head"])
@pytest.mark.parametrize("n_questions", [1, 2, 5, 8])
def test_each_answer_is_the_one_question_answer_also_when_some_stop_early(policy, n_questions):
    model, prefix = tiny_model(6, 3), ids_of(60)
    questions = questions_of([1 + (7 * i) % 13 for i in range(n_questions)])
    alone = [generate(model, prefix + q, 16, offload=policy, prefill_chunk=16) for q in questions]
    stop = (alone[0][4],)  # the first question stops at its fifth token; others may too, or never
    alone = [generate(model, prefix + q, 16, offload=policy, prefill_chunk=16, stop_ids=stop) for q in questions]
    stats = {}
    answers = generate_many(model, prefix, questions, 16, offload=policy, prefill_chunk=16, stop_ids=stop,
                            stats=stats)
    assert answers == alone
    assert len(answers[0]) <= 5 and stats["answer_tokens"] == [len(a) for a in alone]
    assert stats["prefix_tokens"] == 60 and stats["question_tokens"] == [len(q) for q in questions]


def test_a_stopped_question_leaves_the_batch():
    """Each decode step runs on the questions still answering: the rows of a step shrink as they stop."""
    model, prefix, questions = tiny_model(4, 2), ids_of(30), questions_of([3, 5, 4])
    alone = [generate(model, prefix + q, 12, offload="none") for q in questions]
    stop = {alone[0][2], alone[1][6]}
    lengths = [len(generate(model, prefix + q, 12, offload="none", stop_ids=stop)) for q in questions]
    rows = []
    forward = model.forward
    model.forward = lambda tokens, *a, **kw: (rows.append(tokens.shape[0]), forward(tokens, *a, **kw))[1]
    generate_many(model, prefix, questions, 12, offload="none", stop_ids=stop)
    decode_rows = rows[2:]  # after the prefix's and the questions' prefill passes
    assert decode_rows == [sum(n > step + 1 for n in lengths) for step in range(len(decode_rows))]
    assert decode_rows[-1] < 3


@st.composite
def setups(draw):
    n_kv = draw(st.integers(1, 3))
    args = ModelArgs(dim=24, n_layer=draw(st.integers(1, 3)), n_head=n_kv * draw(st.integers(1, 3)), n_kv_head=n_kv,
                     head_dim=draw(st.sampled_from([4, 8])), intermediate_size=32, vocab_size=61, max_seq_len=128,
                     rope_base=draw(st.sampled_from([100.0, 10000.0])), qkv_bias=draw(st.booleans()))
    layout = dict(group_size=draw(st.integers(1, n_kv)), resident=draw(st.integers(0, args.n_layer * n_kv)))
    lengths = draw(st.lists(st.integers(1, 15), min_size=1, max_size=5))
    return (args, layout, draw(st.integers(1, 40)), lengths, draw(st.integers(1, 20)), draw(st.integers(0, 8)),
            draw(st.integers(0, 2**16)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setups())
def test_any_shapes_give_each_question_its_own_logits(setup):
    args, layout, prefix_len, lengths, chunk, n_forced, seed = setup
    torch.manual_seed(seed)
    model = Transformer(args).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    prefix, questions = ids_of(prefix_len, seed, vocab=61), questions_of(lengths, seed, vocab=61)
    forced = torch.randint(0, 61, (len(lengths), n_forced))
    cache = make_cache(plan_memory(args, prefix_len, torch.float32, "head", "cpu", **layout), args)
    got = shared_logits(model, cache, prefix, questions, forced, chunk)
    for i, question in enumerate(questions):
        torch.testing.assert_close(got[i], alone_logits(model, prefix, question, forced[i].tolist(), chunk),
                                   atol=LOGIT_ATOL, rtol=0)


def test_ctrl_c_keeps_the_answers_so_far_and_frees_the_caches():
    import gc
    model, prefix, questions = tiny_model(4, 2), ids_of(30), questions_of([3, 5])
    seen, stats = [], {}

    def on_token(question, token):
        seen.append((question, token))
        if len(seen) == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_many(model, prefix, questions, 20, offload="head", on_token=on_token, stats=stats)
    gc.collect()
    assert stats["interrupted"] and sum(stats["answer_tokens"]) == 7 and len(offload._CACHES) == 0


# --- the attention pieces -------------------------------------------------------------------------

@pytest.mark.parametrize("attend", [shared_attention, attention._shared_attention], ids=["per-kv-head", "one-call"])
def test_shared_attention_and_merge_equal_one_softmax_over_both_parts(attend, monkeypatch):
    """Prefix part + own part, merged, equal SDPA over both: with several key blocks (a tiny block
    size), GQA, B sequences; per KV head as on the CPU, and in one call as on CUDA."""
    monkeypatch.setattr(attention, "SHARED_BLOCK_BYTES", 4096)  # blocks of 256 keys (1000 take four), 2-4 queries
    blocks = []
    over_key_blocks = attention._over_key_blocks

    def recorded(rows, k, v, keys, *variant):
        blocks.append((rows.shape[2], keys))
        assert 4 * rows.shape[:3].numel() * min(keys, k.shape[2]) <= 4096  # fp32 scores in bounds
        return over_key_blocks(rows, k, v, keys, *variant)

    monkeypatch.setattr(attention, "_over_key_blocks", recorded)
    g = torch.Generator().manual_seed(0)
    B, Hq, Hk, T, S, R, D = 3, 6, 2, 2, 1000, 5, 8
    q = torch.randn(B, Hq, T, D, generator=g)
    k, v = torch.randn(1, Hk, S, D, generator=g), torch.randn(1, Hk, S, D, generator=g)
    k_own, v_own = (torch.randn(B, Hk, R, D, generator=g).repeat_interleave(Hq // Hk, dim=1) for _ in range(2))
    out_prefix, lse_prefix = attend(q, k, v)
    scores = q @ k_own.mT * D ** -0.5
    merged, lse = merge(out_prefix, lse_prefix, torch.softmax(scores, -1) @ v_own, scores.logsumexp(-1))
    keys = torch.cat([k.expand(B, -1, -1, -1).repeat_interleave(Hq // Hk, dim=1), k_own], dim=2)
    values = torch.cat([v.expand(B, -1, -1, -1).repeat_interleave(Hq // Hk, dim=1), v_own], dim=2)
    # fp32 sums over 1005 keys in another order: differences of a few ulps of outputs near 1
    torch.testing.assert_close(merged, F.scaled_dot_product_attention(q, keys, values), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, (q @ keys.mT * D ** -0.5).logsumexp(-1), atol=1e-5, rtol=1e-6)
    assert len(blocks) > 1 and all(keys == attention.MIN_BLOCK_KEYS for _, keys in blocks)  # queries were sliced


def test_keep_moves_rows_down_in_place():
    model = tiny_model(4, 2)
    cache = StandardCache(model.args, 1, 10, "cpu", torch.float32)
    prefill(model, cache, ids_of(10))
    together = SharedPrefixCache(cache, [3, 1, 2, 3], room=4)
    prefill_questions(model, together, questions_of([3, 1, 2, 3]))
    before_k, storage, allocated = together.k.clone(), together.k.untyped_storage().data_ptr(), together.nbytes
    together.keep([1, 3])
    assert together.batch == 2 and together.first.tolist() == [2, 0] and together.nbytes == allocated
    assert torch.equal(together.k, before_k[:, [1, 3]]) and together.k.untyped_storage().data_ptr() == storage
    assert together.positions(1).tolist() == [[10 + 1], [10 + 3]]  # each after its own question
    with pytest.raises(ValueError, match="ascending"):
        together.keep([1, 0])


def test_decode_many_refuses_more_tokens_than_the_cache_holds():
    model = tiny_model(4, 2)
    cache = StandardCache(model.args, 1, 10, "cpu", torch.float32)
    prefill(model, cache, ids_of(10))
    together = SharedPrefixCache(cache, [2, 3], room=3)
    logits = prefill_questions(model, together, questions_of([2, 3]))
    with pytest.raises(UsageError, match="room for 4 more tokens"):
        next(decode_many(model, together, logits, 5))


# --- refused before work --------------------------------------------------------------------------

@pytest.mark.parametrize("prefix,questions,words", [
    ([], [[1]], "share no prefix"), ([1, 2], [], "no questions"), ([1, 2], [[3], []], "question 2 has no tokens"),
    ([1] * 250, [[2] * 3, [2] * 6], "the longest question take 256 tokens")])
def test_questions_that_cannot_be_answered_are_refused(prefix, questions, words):
    with pytest.raises(UsageError, match=words):
        generate_many(tiny_model(4, 2), prefix, questions, 4)


def test_questions_whose_caches_do_not_fit_are_refused_before_any_allocation(monkeypatch):
    model = tiny_model(4, 2)
    one = model.args.kv_bytes_per_token(torch.float32) * (10 + 20)  # a question's own KV: 10 tokens + 20 new
    monkeypatch.setattr(planner, "host_available_bytes", lambda: 8 * one - 1)
    monkeypatch.setattr(offload.StandardCache, "__init__", lambda *a: pytest.fail("allocated before refusing"))
    with pytest.raises(UsageError, match="decoding 8 questions together needs") as e:
        generate_many(model, ids_of(30), questions_of([10] * 8), 21, offload="none")
    assert e.value.options == ("max_new_tokens",)


def test_on_a_gpu_the_questions_are_refused_only_for_what_they_need_themselves(monkeypatch):
    """The GPU plan sets aside the larger of one prefix chunk's activations and the questions' own KV plus
    their pass; the questions' refusal names them only when they are what does not fit."""
    args, dtype = ModelArgs.from_name("Llama-3.1-8B"), torch.bfloat16
    questions = (16, 100, 63)
    own, question_pass = planner.question_bytes(args, dtype, *questions, 8192)
    prefix_chunk = planner.activation_reserve(args, dtype, 8192)
    assert own + question_pass < prefix_chunk  # so the two failures below are told apart

    def plan(free):
        monkeypatch.setattr(planner, "gpu_free_bytes", lambda device: free)
        return planner.plan_cache(args, 131072, dtype, "cuda", "head", None, 8192, questions=questions)

    with pytest.raises(UsageError, match="decoding 16 questions together needs"):
        plan(own + question_pass - 1)
    with pytest.raises(UsageError) as e:
        plan(prefix_chunk - 1)
    assert "questions" not in str(e.value)
    assert plan(prefix_chunk + 2 * GiB).gpu_bytes <= 2 * GiB


# --- the CLI --------------------------------------------------------------------------------------

DOCUMENT = "The mill at Elder Ford ground 300 sacks of grain in 1700 and 307 in 1701; three cats kept the granary."
QUESTIONS = ["How many sacks in 1701?", "", "How many cats were there?", "What is ground at the mill?"]


@pytest.mark.default_model
def test_cli_answers_each_question_as_a_run_with_prompt_would(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    (tmp_path / "qs.txt").write_text("\n".join(QUESTIONS) + "\n")  # a blank line is no question
    base = ["--checkpoint", str(tiny_ckpt), "--prompt-file", str(tmp_path / "doc.txt"), "--max-new-tokens", "6"]

    def run(*extra):
        r = run_in_process(G.cli, [*base, *extra], capsys)
        assert r.returncode == 0, r.stderr
        return r

    many = json.loads(run("--questions-file", str(tmp_path / "qs.txt"), "--json").stdout.strip().splitlines()[-1])
    asked = [q for q in QUESTIONS if q]
    assert [a["question"] for a in many["answers"]] == asked
    for answer in many["answers"]:
        alone = json.loads(run("--prompt", answer["question"], "--json").stdout.strip().splitlines()[-1])
        assert answer["new_tokens"] == alone["new_tokens"] and answer["text"] == alone["text"]
    assert many["answer_tokens"] == [len(a["new_tokens"]) for a in many["answers"]]
    assert many["prefix_tokens"] > len(DOCUMENT) // 8 and many["decode_tok_s"] > 0

    text = run("--questions-file", str(tmp_path / "qs.txt"))
    for i, question in enumerate(asked):
        assert f"Q{i + 1}: {question}\nA{i + 1}: " in text.stdout
    assert "3 questions over a shared prefix" in text.stderr

    kv = tmp_path / "doc.kv"
    first = run("--questions-file", str(tmp_path / "qs.txt"), "--prompt-cache", str(kv), "--json")
    again = run("--questions-file", str(tmp_path / "qs.txt"), "--prompt-cache", str(kv), "--json")
    first, again = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (first, again))
    assert kv.exists() and first["reused_tokens"] == 0 and again["reused_tokens"] == many["prefix_tokens"] - 1
    assert [a["new_tokens"] for a in again["answers"]] == [a["new_tokens"] for a in many["answers"]]
