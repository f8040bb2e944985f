"""Speculative decoding is exact: the tokens greedy decoding gives one by one, for every policy, drafter
and k; logits within fp32 rounding of plain decoding's; the target's distribution when sampling.

Plain decoding and a verification pass are different computations (one query, or k + 1 with a mask;
one row through a linear layer, or a few), so their logits agree to fp32 rounding, not bit for bit; the
policies, given the same passes, agree bit for bit (test_offload.py says why).
"""
import json


import pytest
import torch

import generate as G
import sampling
from model import ModelArgs, Transformer
from offload import StandardCache
from planner import make_cache, plan_cache
from sampling import accept_sampled
from speculative import SINKS, DraftCache, DraftLength, LookupDrafter, make_drafter
from tests.test_cli_errors import run_in_process
from tests.test_offload import tiny_model

PROMPT = [(7 * i + 3) % 97 for i in range(30)] + [5, 6, 7, 8, 9] * 4  # a repeat, for lookup to find


def gemma_like(seed=0):
    """Sliding windows of 6 on half the layers, soft caps on the scores and the logits."""
    torch.manual_seed(seed)
    args = ModelArgs(dim=48, n_layer=4, n_head=4, n_kv_head=2, head_dim=8, intermediate_size=96, vocab_size=97,
                     max_seq_len=256, rope_base=10000.0, attn_softcap=5.0, final_softcap=3.0, sliding_window=6,
                     sliding_layers=[0, 2], sandwich_norm=True, norm_offset=1.0, mlp_activation="gelu_tanh")
    model = Transformer(args).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.25)
    return model


MODELS = {"llama": lambda: tiny_model(4, 2), "gemma-2-like": gemma_like}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("offload", ["none", "layer", "head"])
@pytest.mark.parametrize("speculate,window", [("lookup", 512), ("self", 512), ("self", 12), ("draft", 16),
                                              ("another draft", 512)])
def test_greedy_tokens_are_plain_decodings_for_every_policy_drafter_and_k(name, offload, speculate, window):
    """The draft models: the target's weights over their own small cache (drafts kept and rejected), and
    an unrelated one (its drafts rejected: every pass takes its drafts back)."""
    model = MODELS[name]()
    draft = {"draft": MODELS[name](), "another draft": tiny_model(4, 1, n_layer=2, seed=3)}.get(speculate)
    plain = G.generate(model, PROMPT, 60, offload=offload, prefill_chunk=7)
    assert len(set(plain)) > 5  # tokens that vary, or equality would prove little
    accepted = 0
    for k in (1, 3, 8):
        stats = {}
        out = G.generate(model, PROMPT, 60, offload=offload, prefill_chunk=7, speculate=None if draft else speculate,
                         speculate_k=k, draft_model=draft, draft_window=window, stats=stats)
        assert out == plain, k
        assert stats["verify_passes"] < 60 and stats["drafted_tokens"] >= stats["accepted_tokens"]
        assert stats["tokens_per_pass"] == pytest.approx((len(out) - 1) / stats["verify_passes"])
        accepted += stats["accepted_tokens"]
    if speculate != "another draft":
        assert accepted > 0  # drafts were kept, and rejected (the passes < tokens above): both paths ran


class Recorder:
    """The model, keeping every pass: the tokens fed, their positions and their logits (a row each)."""

    def __init__(self, model):
        self.model, self.passes = model, []

    def __call__(self, tokens, input_pos, cache, **kwargs):
        out = self.model(tokens, input_pos, cache, **kwargs)
        self.passes.append((tokens[0].tolist(), input_pos.tolist(), out[0]))
        return out


def plain_and_speculated(model, offload, speculate, n=40, k=4, window=512):
    """The passes of plain decoding and of speculative decoding of n tokens after PROMPT, and the tokens."""
    runs = []
    for drafting in (False, True):
        cache = make_cache(plan_cache(model.args, 128, torch.float32, "cpu", offload, rollback=k), model.args)
        logits, recorder = G.prefill(model, cache, PROMPT), Recorder(model)
        if drafting:
            drafter = make_drafter(speculate, model, cache, k, window, 0.0, None, None, None, 1)
            tokens = list(G.speculative_decode(recorder, cache, logits, n, PROMPT, drafter, k))
        else:
            tokens = list(G.decode(recorder, cache, logits, n))
        runs.append((recorder.passes, tokens))
    return runs


@pytest.mark.parametrize("speculate", ["lookup", "self"])
def test_logits_of_accepted_positions_are_plain_decodings_to_fp32_rounding(speculate):
    (plain, tokens), (speculated, same) = plain_and_speculated(tiny_model(4, 2), "head", speculate)
    assert same == tokens
    reference = {positions[0]: rows[0] for _, positions, rows in plain}
    sequence, checked = PROMPT + tokens, 0
    for fed, positions, rows in speculated:
        for i, position in enumerate(positions):
            if fed[:i + 1] != sequence[positions[0]:position + 1]:
                break  # a rejected draft: its row and the later ones are not kept
            # The same position's logits (|logits| ~ 10 here) from another sum order: a (k + 1)-token pass
            # (a masked SDPA call, the weight-on-the-left product) against a one-token step, each op
            # within a few fp32 ulps; through three layers the difference stays below 1e-4 (~1e-5 measured).
            if position in reference:
                assert torch.allclose(rows[i], reference[position], rtol=0, atol=1e-4), position
                checked += 1
    assert checked == len(reference)  # every decode position was verified, in some pass


@pytest.mark.parametrize("speculate", ["lookup", "self"])
def test_the_policies_verify_bit_for_bit_alike(speculate):
    model = tiny_model(6, 3)
    (_, _), (none, tokens) = plain_and_speculated(model, "none", speculate)
    for offload in ("layer", "head"):
        (_, _), (passes, same) = plain_and_speculated(model, offload, speculate)
        assert same == tokens and len(passes) == len(none)
        for (fed, positions, rows), (fed0, positions0, rows0) in zip(passes, none):
            assert fed == fed0 and positions == positions0 and torch.equal(rows, rows0)


# --- sampling: the target's distribution -------------------------------------------------------

def within_5_sigma(counts: torch.Tensor, p: torch.Tensor, n: int):
    """Each count within 5 binomial standard deviations of n * p (a false alarm about once in 10^6 per cell)."""
    sigma = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 5 * sigma + 1e-9).all(), (counts / n, p)


@pytest.mark.parametrize("drafts", [1, 2])
@pytest.mark.parametrize("point_mass", [False, True])
def test_the_acceptance_rule_draws_from_the_target_whatever_the_draft(drafts, point_mass):
    """q far from p (a rule that kept every draft would draw from q, and fail here by > 50 sigma)."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0], [0.1, 0.2, 0.3, 0.4, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.05, 0.05, 0.1, 0.4, 0.4], [0.4, 0.3, 0.2, 0.1, 0.0]])[:drafts]
    n, generator = 20000, torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    for _ in range(n):
        if point_mass:  # a deterministic draft (lookup): always token 3
            xs, dist = [3] * drafts, None
        else:
            xs, dist = [int(torch.multinomial(q[i], 1, generator=generator)) for i in range(drafts)], q
        first = accept_sampled(p[:drafts + 1], xs, dist, generator)[0]
        counts[first] += 1
    within_5_sigma(counts, p[0], n)


@pytest.mark.parametrize("speculate", ["lookup", "self"])
def test_the_first_sampled_tokens_are_distributed_as_plain_samplings(speculate):
    """The joint distribution of the first two new tokens (the second from a verification pass) over
    many seeds, against the model's own: P(t1) P(t2 | t1), top-3 at temperature 1."""
    model, temperature, top_k, n = tiny_model(4, 2), 1.0, 3, 2000
    cache = StandardCache(model.args, 1, 128, "cpu", torch.float32)
    logits = G.prefill(model, cache, PROMPT)
    L = cache.length
    exact = {}
    p1 = sampling.probabilities(logits[0], temperature, top_k)
    for t1 in p1.nonzero()[:, 0].tolist():
        with torch.no_grad():
            after = model(torch.tensor([[t1]]), torch.tensor([L]), cache)[0, -1]
        cache.truncate(L)
        p2 = sampling.probabilities(after, temperature, top_k)
        for t2 in p2.nonzero()[:, 0].tolist():
            exact[t1, t2] = float(p1[t1] * p2[t2])
    counts = dict.fromkeys(exact, 0)
    for seed in range(n):
        generator = torch.Generator().manual_seed(seed)
        drafter = make_drafter(speculate, model, cache, 2, SINKS + 2, temperature, top_k, generator, None, 1)
        t1, t2 = G.speculative_decode(model, cache, logits, 2, PROMPT, drafter, 2, temperature, top_k, generator)
        counts[t1, t2] += 1
        cache.truncate(L)
    keys = sorted(exact)
    within_5_sigma(torch.tensor([float(counts[k]) for k in keys]), torch.tensor([exact[k] for k in keys]), n)


# --- the drafters -------------------------------------------------------------------------------

def test_lookup_proposes_what_followed_the_longest_recent_match():
    drafter = LookupDrafter()
    assert drafter.propose([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2)[0] == [7, 8]  # the latest of two 3-grams
    assert drafter.propose([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 1, 2, 3, 4, 5, 6, 2, 3], 3)[0] == [4, 5, 6]  # grown ids
    assert LookupDrafter().propose([5, 1, 2, 6, 2], 4)[0] == [6, 2]  # no 3- or 2-gram: the 1-gram "2"
    assert LookupDrafter().propose([1, 2, 3, 4], 4)[0] == []         # nothing repeats: no drafts


def test_the_draft_length_backs_off_while_drafts_fail_and_comes_back():
    length = DraftLength(8)
    length.update(8, 0)
    assert length.next() == 4  # halved
    for k in (4, 2, 1):
        length.update(k, 0)
    assert [length.next() for _ in range(2)] == [0, 1]  # at 0: one pass without drafts, then 1 draft again
    length.update(1, 0)
    assert [length.next() for _ in range(3)] == [0, 0, 1]  # failing again: a pause twice as long
    length.update(1, 1)
    assert length.next() == 2  # all kept: doubled
    length.update(2, 1)
    assert length.next() == 2  # some kept: as it was
    length.update(2, 0), length.update(1, 0)
    assert [length.next() for _ in range(2)] == [0, 1]  # the pause was reset by the pass that kept all


def test_a_draft_cache_past_its_rows_attends_over_the_sinks_and_the_recent_tokens():
    """After its rows move down, a draft query sees exactly the SINKS first and the last positions kept."""
    model = tiny_model(4, 2)
    args, window, k = model.args, SINKS + 6, 2
    cache = DraftCache(args, window, room=3, device="cpu", dtype=torch.float32)
    keys = torch.randn(40, 1, 2, 1, 8)  # per position: [B, n_kv, T=1, D]
    q = torch.randn(1, 4, 1, 8)
    for position in range(40):
        for layer in range(args.n_layer):
            out = cache(layer, q, keys[position], keys[position])
    assert cache.offset > 0
    seen = [p for p in range(40) if p < SINKS or p >= 40 - (cache.length - cache.offset - SINKS)]
    assert len(seen) - SINKS >= window - SINKS  # at least the window's recent tokens
    kv = torch.cat([keys[p] for p in seen], dim=2)
    from attention import attention
    assert torch.allclose(out, attention(q, kv, kv, scale=args.attention_scale), atol=1e-6)


# --- reuse of a cache: chat turns, the prompt cache; the CLI ------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_each_chat_turn_speculates_the_tokens_of_a_plain_turn(name):
    """generate() continuing one cache turn after turn (as -i does), the cache planned with room to take
    drafts back; a cut-back conversation (the last answer token not fed) included."""
    model, k = MODELS[name](), 3
    cache = make_cache(plan_cache(model.args, 220, torch.float32, "cpu", "head", rollback=k), model.args)
    ids = list(PROMPT)
    for turn in range(3):
        ids += [(11 * i + turn) % 97 for i in range(5 + turn)]
        answer = G.generate(model, ids, 20, cache=cache, speculate="self", speculate_k=k, draft_window=16,
                            prefill_chunk=16)
        assert answer == G.generate(model, ids, 20, offload="head", prefill_chunk=16)
        ids += answer[:-1]
        cache.truncate(min(cache.length, len(ids)))


def test_a_cache_without_room_to_take_drafts_back_is_refused():
    model = gemma_like()
    cache = make_cache(plan_cache(model.args, 220, torch.float32, "cpu", "head"), model.args)
    with pytest.raises(G.UsageError, match="plan it with rollback=3"):
        G.generate(model, PROMPT, 5, cache=cache, speculate="lookup", speculate_k=3)


def test_a_reused_prompt_cache_speculates_the_same_tokens(tmp_path):
    model, file = tiny_model(4, 2), tmp_path / "p.kv"
    plain = G.generate(model, PROMPT, 30, offload="head")
    first, second = {}, {}
    assert G.generate(model, PROMPT, 30, offload="head", prompt_cache=file, speculate="self", stats=first) == plain
    assert G.generate(model, PROMPT, 30, offload="head", prompt_cache=file, speculate="self", stats=second) == plain
    assert first["reused_tokens"] == 0 and second["reused_tokens"] == len(PROMPT) - 1


def test_without_speculation_the_stats_say_so_and_nothing_is_drafted():
    stats = {}
    model = tiny_model(4, 2)
    assert G.generate(model, PROMPT, 10, stats=stats) == G.generate(model, PROMPT, 10)
    assert {k: stats[k] for k in ("speculate", "speculate_k", "verify_passes", "drafted_tokens", "accepted_tokens",
                                  "tokens_per_pass")} == dict.fromkeys(("speculate", "speculate_k", "verify_passes",
                                                                       "drafted_tokens", "accepted_tokens",
                                                                       "tokens_per_pass"))


@pytest.mark.default_model
def test_the_cli_speculates_the_plain_answer_and_reports_its_passes(tiny_ckpt, tmp_path, capsys):
    """lookup, self and a draft checkpoint (another random model with the same tokenizer), each against
    the plain answer; the --json fields and the stats line."""
    from safetensors.torch import save_file
    import shutil

    draft = tmp_path / "draft"
    shutil.copytree(tiny_ckpt, draft)
    args = ModelArgs.from_json(draft / "config.json")
    torch.manual_seed(1)
    save_file(Transformer(args).state_dict(), draft / "model.safetensors")
    run = lambda *flags: run_in_process(G.cli, ["--checkpoint", str(tiny_ckpt), "--json", "--max-new-tokens", "24",
                                               "--prompt", "one two three one two three one two", *flags], capsys)
    plain = json.loads(run().stdout)
    assert plain["speculate"] is None and plain["tokens_per_pass"] is None
    for flags, kind in ((["--speculate", "lookup"], "lookup"), (["--speculate", "self", "--speculate-k", "3"], "self"),
                        (["--draft-checkpoint", str(draft), "--draft-window", "64"], "draft")):
        r = run(*flags)
        out = json.loads(r.stdout)
        assert r.returncode == 0 and out["new_tokens"] == plain["new_tokens"], kind
        assert out["speculate"] == kind and out["verify_passes"] >= 1
        assert out["tokens_per_pass"] == pytest.approx((len(out["new_tokens"]) - 1) / out["verify_passes"])
        assert f"tokens per pass, {kind} drafts" in r.stderr
