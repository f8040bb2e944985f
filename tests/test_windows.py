"""Sliding-window layers (Mistral, Gemma-2's local layers) and soft-capped attention (Gemma-2).

A windowed layer keeps its last W tokens in a ring on the device whatever the policy, so its memory is
bounded by the window; the reference here is attention written out in float64 with the window's mask
over the whole sequence (tests/test_model_hf.py compares with HF transformers)."""
import math

import pytest
import torch

from errors import UsageError
from generate import generate, generate_many, prefill
from model import ModelArgs, Transformer
from attention import _written_out, attention
from planner import make_cache, plan_memory
from tests.test_offload import logits_of

POLICIES = {"none": {}, "layer": {}, "head": dict(group_size=1, resident=1)}  # head: single heads, one resident


def windowed_model(window=5, layers=(0, 2), seed=0, vocab_size=50, **variant):
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layer=3, n_head=4, n_kv_head=2, head_dim=8, intermediate_size=64,
                     vocab_size=vocab_size, max_seq_len=512, sliding_window=window, sliding_layers=list(layers),
                     **variant)
    model = Transformer(args).eval()
    for p in model.parameters():  # peaked attention, so a wrong window changes the logits
        torch.nn.init.normal_(p, std=0.3)
    return model


def cache_of(model, policy, max_len, batch=1):
    layout = dict(POLICIES[policy])
    if "resident" in layout:  # no more than the global layers have (none when every layer is windowed)
        layout["resident"] = min(layout["resident"], len(model.args.global_layers) * model.args.n_kv_head)
    plan = plan_memory(model.args, max_len, torch.float32, policy, "cpu", batch=batch, **layout)
    return make_cache(plan, model.args)


def attention_in_float64(q, k, v, scale, softcap, window):
    """Attention of q [B, Hq, T, D] over k/v [B, Hk, S, D], the queries being the last T keys, written
    out in float64: the soft cap on the scores, the causal mask and the window as one mask."""
    T, S = q.shape[2], k.shape[2]
    k, v = (t.double().repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = q.double() @ k.mT * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    i, j = torch.arange(S - T, S)[:, None], torch.arange(S)[None, :]
    seen = (j <= i) & (j > i - (window or S))
    return scores.masked_fill(~seen, -math.inf).softmax(-1) @ v


class Reference:
    """The cache interface over the whole sequence in one pass (attention_in_float64)."""

    def __init__(self, args):
        self.args = args

    def __call__(self, layer, q, k, v):
        a = self.args
        return attention_in_float64(q, k, v, a.attention_scale, a.attn_softcap, a.window(layer)).float()


VARIANTS = {
    "window": dict(),
    "every-layer-windowed": dict(layers=(0, 1, 2), window=4),
    "soft-capped": dict(attn_softcap=2.0, query_pre_attn_scalar=10.0),
    "soft-capped-window-1": dict(window=1, layers=(1,), attn_softcap=3.0),  # a query sees only itself
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_every_policy_and_chunking_attends_within_the_window(variant):
    """Chunks shorter and longer than the window, ending mid-window, and one token at a time: each
    position's logits are the reference's, and the policies agree bit for bit."""
    model = windowed_model(**VARIANTS[variant])
    tokens = torch.randint(0, 50, (2, 30), generator=torch.Generator().manual_seed(1))  # batch 2: rows apart
    ref = model(tokens, torch.arange(30), Reference(model.args))
    for chunk in (30, 7, 3, 1):
        got = {policy: logits_of(model, cache_of(model, policy, 30, batch=2), tokens, chunk, 0) for policy in POLICIES}
        for policy, logits in got.items():
            # fp32 sums against float64: ~3e-7 measured on logits up to ~3
            torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0, msg=f"{policy} chunk {chunk}")
            assert torch.equal(logits, got["none"]), (policy, chunk)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_a_windowed_layer_holds_the_window_whatever_the_context(policy):
    """The rings' bytes depend on the window, not on max_len (nor on the policy); the planner counts
    them apart, on the device, and the global layers' slots alone grow with the context."""
    model = windowed_model(window=8)
    a = model.args
    ring_bytes = 2 * len(a.sliding_layers) * 8 * a.n_kv_head * a.head_dim * 4  # K and V, W rows, fp32
    plans = {n: plan_memory(a, n, torch.float32, policy, "cpu", **POLICIES[policy]) for n in (100, 1000)}
    for n, plan in plans.items():
        cache = make_cache(plan, a)
        assert cache.windows.k.shape[2] == 8 and cache.windows.nbytes == plan.window_bytes == ring_bytes
        assert (cache.gpu_bytes, cache.host_bytes) == (plan.gpu_bytes, plan.host_bytes)
        assert plan.total_slots == len(a.global_layers) * a.n_kv_head == 2
        assert plan.kv_bytes == ring_bytes + n * a.kv_bytes_per_token(torch.float32)
        assert "sliding windows 2.00 KiB" in plan.describe()
    assert plans[1000].kv_bytes - plans[100].kv_bytes == 900 * 2 * 1 * 2 * 8 * 4  # one global layer grows
    # A window longer than the cache: the ring is no longer than the cache can ever hold.
    assert plan_memory(a, 5, torch.float32, policy, "cpu", **POLICIES[policy]).window_bytes == ring_bytes * 5 // 8


def test_on_a_gpu_budget_the_rings_come_first():
    a = windowed_model(window=64).args
    ring_bytes = 2 * 2 * 64 * 2 * 8 * 2  # 2 windowed layers, K and V, bf16
    slot = 4096 * 2 * 8 * 2  # a head of the global layer at 4096 tokens
    plan = plan_memory(a, 4096, torch.bfloat16, "head", "cuda", gpu_budget=ring_bytes + 2 * slot)
    # What the rings leave holds the global layer's two heads: all resident, nothing streams.
    assert (plan.window_bytes, plan.resident_slots, plan.store_bytes) == (ring_bytes, 2, 0)
    assert plan.gpu_bytes == ring_bytes + 2 * slot
    with pytest.raises(UsageError, match="cannot hold the two buffers"):  # a byte less: not even the buffers
        plan_memory(a, 4096, torch.bfloat16, "head", "cuda", gpu_budget=ring_bytes + 2 * slot - 1)
    with pytest.raises(UsageError, match="sliding-window layers need 8.00 KiB"):
        plan_memory(a, 4096, torch.bfloat16, "head", "cuda", gpu_budget=ring_bytes - 1)


def fresh_then(model, tokens):
    """The logits of a prefill of `tokens` into a new cache: what a cache cut back and continued must give."""
    return prefill(model, cache_of(model, "head", 40), tokens)


@torch.no_grad()
def test_truncate_keeps_what_the_window_still_holds_and_else_starts_over():
    model = windowed_model(window=6)
    ids = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(2)).tolist()[0]
    cache = cache_of(model, "head", 40)
    prefill(model, cache, ids)
    cache.truncate(19)  # the ring still has the 5 tokens before position 19
    assert cache.length == 19
    # Another token at 19: as if only ids[:19] had been stored (a decode step against a prefill: the
    # sums run in another order, a few ulps of logits near 1).
    torch.testing.assert_close(prefill(model, cache, [7]), fresh_then(model, ids[:19] + [7]), atol=1e-5, rtol=0)
    cache.truncate(10)  # overwritten: everything is forgotten, and the next prefill computes it all
    assert cache.length == 0
    assert torch.equal(prefill(model, cache, ids[:12]), fresh_then(model, ids[:12]))
    short = cache_of(model, "none", 5)  # a ring as long as the cache never wraps: any truncation keeps
    prefill(model, short, ids[:5])
    short.truncate(1)
    assert short.length == 1


@torch.no_grad()
def test_truncates_in_a_row_and_a_pass_cut_short_keep_only_what_the_rings_still_hold():
    """A ring remembers the newest position written: after truncate(19) it still has position 19's
    row, so a second step back (18) needs position 13, which is gone; a chunk that stored rows in some
    layers, then failed, leaves rows newer than the cache's length."""
    model = windowed_model(window=6)
    ids = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(2)).tolist()[0]
    cache = cache_of(model, "head", 40)
    prefill(model, cache, ids)
    cache.truncate(19)
    with pytest.raises(ValueError, match=r"keeps positions \[14, 19\) only; \[13, 19\)"):
        cache.read(0, 13, 19)  # slot 13 % 6 holds position 19
    cache.truncate(18)
    assert cache.length == 0  # as a direct truncate(18) would
    cache = cache_of(model, "head", 40)
    prefill(model, cache, ids[:12])

    def interrupt(*_):
        raise KeyboardInterrupt

    hook = model.layers[1].register_forward_pre_hook(interrupt)  # after layer 0's ring stored the chunk
    with pytest.raises(KeyboardInterrupt):
        prefill(model, cache, ids[12:20])
    hook.remove()
    assert cache.length == 12
    with pytest.raises(ValueError, match="sliding window"):  # used as is, the rings refuse
        prefill(model, cache, ids[12:13])
    cache.truncate(cache.length)  # what a chat session does after a failed turn: the cache starts over
    assert cache.length == 0 and torch.equal(prefill(model, cache, ids[:14]), fresh_then(model, ids[:14]))


@torch.no_grad()
def test_read_and_write_reach_the_positions_a_ring_holds():
    model = windowed_model(window=6)
    cache = cache_of(model, "layer", 40)
    prefill(model, cache, list(range(3, 23)))  # 20 positions: layer 0's ring holds [14, 20)
    k, v = cache.read(0, 14, 20)
    assert k.shape == (1, 2, 6, 8)
    with pytest.raises(ValueError, match=r"keeps positions \[14, 20\) only"):
        cache.read(0, 13, 20)
    other = cache_of(model, "none", 40)
    prefill(model, other, list(range(3, 23)))
    for layer in range(3):  # a copy written into another cache reads back the same, window or not
        start = 14 if model.args.window(layer) else 0
        other.write(layer, start, *cache.read(layer, start, 20))
        assert all(torch.equal(x, y) for x, y in zip(other.read(layer, start), cache.read(layer, start)))


@pytest.mark.parametrize("run", ["generate", "generate_many"])
def test_a_prompt_cache_is_refused_it_would_need_positions_the_rings_dropped(tmp_path, run):
    """Before any work, for one prompt and for many questions alike (the prefix is longer than the
    window of 5, so saving it would need positions the rings no longer hold)."""
    model, path = windowed_model(), tmp_path / "p.kv"
    with pytest.raises(UsageError, match="a prompt cache does not work yet with sliding-window layers"):
        if run == "generate":
            generate(model, list(range(1, 24)), 2, prompt_cache=path)
        else:
            generate_many(model, list(range(1, 24)), [[3, 4], [5]], 2, prompt_cache=path)
    assert not path.exists()


@pytest.mark.parametrize("variant", ["window", "soft-capped-window-1", "soft-capped-no-window"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_questions_decoded_together_answer_as_each_alone(policy, variant):
    """Each question's queries see the prefix's tokens within their window only (none at all once
    they are W tokens past it) and their own within it: the answers generate() gives each alone.
    The prefix (23 tokens) and some questions (up to 9) are longer than the window (5, or 1)."""
    kw = {"window": dict(), "soft-capped-window-1": dict(window=1, layers=(1,), attn_softcap=3.0),
          "soft-capped-no-window": dict(layers=(), attn_softcap=2.0, query_pre_attn_scalar=10.0)}[variant]
    model = windowed_model(**kw)
    g = torch.Generator().manual_seed(4)
    prefix = torch.randint(0, 50, (23,), generator=g).tolist()
    questions = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (1, 9, 4, 6)]
    answers = generate_many(model, prefix, questions, 12, offload=policy, prefill_chunk=4)
    for question, answer in zip(questions, answers):
        assert answer == generate(model, prefix + question, 12, offload=policy, prefill_chunk=4)
    assert len({tuple(a) for a in answers}) > 1  # answers that differ: equality would prove little otherwise


def test_written_out_attention_bounds_its_blocks_and_equals_the_reference(monkeypatch):
    """Soft-capped attention over several key blocks and query slices (tiny blocks), with rows that
    see no key of a block (the window, the causal mask): the reference's result."""
    import attention as kernels

    monkeypatch.setattr(kernels, "SHARED_BLOCK_BYTES", 4096)
    g = torch.Generator().manual_seed(3)
    B, Hq, Hk, T, S, D = 2, 4, 2, 40, 600, 8
    q = torch.randn(B, Hq, T, D, generator=g)
    k, v = torch.randn(B, Hk, S, D, generator=g), torch.randn(B, Hk, S, D, generator=g)
    for window in (None, 300, 7):
        got = attention(q, k, v, scale=0.2, softcap=1.5, window=window)
        ref = attention_in_float64(q, k, v, 0.2, 1.5, window)
        torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=0)  # fp32 sums of <= 600 terms
    out, lse = _written_out(torch.randn(1, 1, 3, D), torch.zeros(1, 1, 0, D), torch.zeros(1, 1, 0, D))
    assert torch.equal(out, torch.zeros(1, 1, 3, D)) and torch.isneginf(lse).all()  # no keys: weighs 0 in merge
