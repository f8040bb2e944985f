"""The offload caches' stream ordering, proven on the CPU (stream_model.py stands in for CUDA's streams).

The exactness tests of the other files run again here with every copy at the latest moment CUDA would
allow, then at the earliest, and every unordered access to the same bytes flagged: the same logits and
tokens, bit for bit, mean that each read of a buffer or a store waits for the copy that fills it and
each copy waits for the readers of what it overwrites. The mutation tests below delete one wait at a
time and show that each is needed: without it the logits are wrong, or a race is reported.
"""
import pytest
import torch

import test_many
import test_offload
import test_windows
from offload import HeadOffloadCache, LayerOffloadCache, StandardCache
from planner import make_cache
from prompt_cache import load_prompt_cache, save_prompt_cache
from stream_model import StreamModel, StreamRace
from test_offload import logits_of, tiny_model
from test_prompt_cache import LAYOUT_IDS, LAYOUTS, cpu_plan, filled, ids_of


@pytest.fixture(params=["latest", "earliest"])
def streams(request):
    with StreamModel(request.param) as model:
        yield model
    assert model.copies, "no cache streamed through the model: the test proved nothing"


# --- the exactness tests, under the model --------------------------------------------------------

@pytest.mark.parametrize("n_head,n_kv", [(6, 3), (4, 1)])
@pytest.mark.parametrize("chunk", [5, 64])
def test_every_policy_grouping_and_residency(streams, n_head, n_kv, chunk):
    test_offload.test_every_policy_and_grouping_equals_standard_bit_for_bit(n_head, n_kv, chunk)


def test_a_batch_of_two(streams):
    test_offload.test_batch_of_two_equals_standard()


@pytest.mark.parametrize("policy", ["layer", "head"])
def test_generate(streams, policy):
    test_offload.test_generate_greedy_tokens_match_standard(policy)


def test_read(streams):
    test_offload.test_read_gives_every_policy_the_same_rows()


def test_write(streams):
    test_offload.test_written_rows_decode_like_the_prefilled_cache()


def test_truncate(streams):
    test_offload.test_truncate_then_continue_equals_never_having_gone_there()


@pytest.mark.parametrize("layout", [1, 2, 3], ids=LAYOUT_IDS[1:4])
@torch.no_grad()
def test_a_prompt_cache_load_then_more_tokens(streams, layout, tmp_path):
    """Rows written into the stores from a file (write), then streamed by the next passes."""
    model, ids = tiny_model(6, 3), ids_of(100)
    source = filled(model, cpu_plan(model, "none"), ids, chunk=16)
    save_prompt_cache(source, tmp_path / "p.kv", model, ids)
    target = make_cache(cpu_plan(model, LAYOUTS[layout][0], **LAYOUTS[layout][1]), model.args)
    new_ids = ids[:70] + [(t + 1) % 97 for t in ids[70:90]]  # shares exactly 70 tokens with the file
    assert load_prompt_cache(target, tmp_path / "p.kv", model, new_ids) == (70, 100)
    source.truncate(70)
    rest = torch.tensor([new_ids[70:]])
    assert torch.equal(logits_of(model, target, rest, 16, 8, start=70), logits_of(model, source, rest, 16, 8, start=70))


def test_many_questions_over_a_shared_prefix(streams):
    test_many.test_every_policy_gives_the_same_logits_bit_for_bit()


@pytest.mark.parametrize("variant", ["window", "soft-capped-window-1"])
def test_sliding_windows(streams, variant):
    test_windows.test_every_policy_and_chunking_attends_within_the_window(variant)


# --- each wait is needed: delete one, and the model sees it -------------------------------------

def run_without(events_of, mode="latest", check_races=False, resident=1, tokens=37):
    """Prefill in chunks of 5 and 32 decode steps through a head cache (groups of 1 KV head of a 6:3
    GQA model) whose waits on `events_of(cache)` are deleted; returns (logits, the standard cache's)."""
    model = tiny_model(6, 3)
    args = model.args
    ids = torch.randint(0, args.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(3))
    ref = logits_of(model, StandardCache(args, 1, tokens + 32, "cpu", torch.float32), ids, 5, 32)
    with StreamModel(mode, check_races) as streams:
        cache = HeadOffloadCache(args, 1, tokens + 32, "cpu", torch.float32, group_size=1, resident=resident)
        streams.drop_waits_on(events_of(cache))
        return logits_of(model, cache, ids, 5, 32), ref


def test_unmutated_the_run_is_exact_and_race_free():
    got, ref = run_without(lambda cache: [], check_races=True)
    assert torch.equal(got, ref)


def test_attention_must_wait_for_its_buffers_copy():
    got, ref = run_without(lambda cache: cache.copied)
    assert not torch.equal(got, ref)  # attention read the buffer before its unit arrived: another unit's K/V


def test_a_buffer_is_refilled_only_after_its_new_rows_went_back():
    got, ref = run_without(lambda cache: cache.released)
    assert not torch.equal(got, ref)  # the prefetch overwrote the new rows before the D2H copy took them


def test_a_unit_is_copied_only_after_its_newest_rows_are_stored():
    # With a single streamed unit (8 of the 9 slots resident) the D2H of step t and the H2D for step
    # t + 1 are the same unit's, back to back: only `stored` orders them.
    got, ref = run_without(lambda cache: cache.stored, resident=8)
    assert not torch.equal(got, ref)


@pytest.mark.parametrize("mode", ["latest", "earliest"])
def test_a_copy_waits_for_the_attention_over_its_buffer(mode):
    # On the CPU the attention is done when the copy is issued, so the data cannot show this one:
    # the vector clocks do (on a GPU the prefetch would overwrite K/V that attention is still reading).
    with pytest.raises(StreamRace, match="no event orders them"):
        run_without(lambda cache: cache.attended, mode, check_races=True)


@torch.no_grad()
def test_reading_the_store_waits_for_the_write_back(monkeypatch):
    model = tiny_model(6, 3)
    args = model.args
    ids, other = torch.randint(0, args.vocab_size, (2, 1, 20), generator=torch.Generator().manual_seed(5))
    # The same passes as the cache's below (other chunkings would round differently): the first
    # 10 tokens, then `other` at positions 10..19.
    ref = StandardCache(args, 1, 20, "cpu", torch.float32)
    model(ids[:, :10], torch.arange(10), ref)
    model(other[:, :10], torch.arange(10, 20), ref)
    with StreamModel("latest", check_races=False):
        cache = LayerOffloadCache(args, 1, 20, "cpu", torch.float32)
        model(ids[:, :10], torch.arange(10), cache)
        model(ids[:, 10:], torch.arange(10, 20), cache)  # rows that are then taken back
        cache.truncate(10)
        model(other[:, :10], torch.arange(10, 20), cache)  # the last layer's new rows: their D2H still queued
        settle = cache._settle
        monkeypatch.setattr(cache, "_settle", lambda: None)
        assert not torch.equal(cache.read(2)[0], ref.read(2)[0])  # without it: the first pass's rows
        monkeypatch.setattr(cache, "_settle", settle)
        assert torch.equal(cache.read(2)[0], ref.read(2)[0])  # read() settles: the rows landed first
