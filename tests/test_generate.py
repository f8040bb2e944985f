"""generate() is prefill + decode over a planned cache; the pieces work on a cache that outlives one call;
the stats count only what was timed; loading takes every kind of checkpoint and fails in one line."""
import shutil

import pytest
import torch

import generate as G
import run
from checkpoint import resolve_checkpoint
from errors import UsageError
from generate import decode, generate, load_model, prefill
from planner import default_prefill_chunk, make_cache, plan_cache
from tests.test_offload import tiny_model


class ClockedModel(torch.nn.Module):
    """A model whose every forward pass takes exactly one second of a fake clock (and no other time)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.args, self.tok_embeddings = model, model.args, model.tok_embeddings
        self.now = 0.0

    def forward(self, *args, **kw):
        self.now += 1.0
        return self.model(*args, **kw)


@pytest.mark.parametrize("n", [2, 3, 4, 11])
def test_stats_count_only_timed_steps(n, monkeypatch):
    """`--max-new-tokens 3` once reported 7659 tok/s and 4 twice the real rate: the rate counted a step
    that ran before its clock started. Here every step is one second, so every rate must be 1.0."""
    model = ClockedModel(tiny_model(4, 2))
    monkeypatch.setattr(run, "perf_counter", lambda: model.now)
    stats = {}
    ids = generate(model, list(range(20)), n, offload="head", prefill_chunk=8, stats=stats)
    assert len(ids) == n
    assert stats["prefill_s"] == 3.0  # three chunks
    assert stats["first_step_s"] == 1.0
    assert stats["decode_tok_s"] == (1.0 if n > 2 else None)  # n - 2 steps after the first, one second each


def test_generate_is_prefill_then_decode_over_a_planned_cache():
    model = tiny_model(6, 3)
    prompt = torch.randint(0, model.args.vocab_size, (40,)).tolist()
    expected = generate(model, prompt, 20, offload="head", prefill_chunk=16)
    plan = plan_cache(model.args, 60, torch.float32, "cpu", "head", prefill_chunk=16)
    cache = make_cache(plan, model.args)
    got = list(decode(model, cache, prefill(model, cache, prompt, chunk=16), 20))
    assert got == expected
    assert cache.length == 40 + 19  # every token but the last was fed back


def test_a_cache_holds_what_was_yielded_when_the_caller_stops_early():
    model = tiny_model(4, 2)
    cache = make_cache(plan_cache(model.args, 50, torch.float32, "cpu", "layer"), model.args)
    steps = decode(model, cache, prefill(model, cache, list(range(10))), 30)
    taken = [next(steps) for _ in range(6)]
    assert len(taken) == 6 and cache.length in (10 + 5, 10 + 6)  # the prompt, then all yielded but maybe the last


def test_the_next_turn_continues_the_same_cache():
    """prefill appends: a conversation prefilled turn by turn equals the whole text prefilled at once."""
    model = tiny_model(6, 3)
    turns = [torch.randint(0, model.args.vocab_size, (n,)).tolist() for n in (16, 8, 13)]
    plan = plan_cache(model.args, 64, torch.float32, "cpu", "head")
    whole, by_turn = make_cache(plan, model.args), make_cache(plan, model.args)
    expected = prefill(model, whole, sum(turns, []), chunk=8)
    for turn in turns:
        logits = prefill(model, by_turn, turn, chunk=8)  # turn lengths 16, 8: the same 8-token chunks
    assert torch.equal(logits, expected) and by_turn.length == whole.length == 37


def test_decode_refuses_more_tokens_than_the_cache_holds():
    model = tiny_model(4, 2)
    cache = make_cache(plan_cache(model.args, 12, torch.float32, "cpu", "none"), model.args)
    logits = prefill(model, cache, list(range(10)))
    with pytest.raises(UsageError, match="room for 3 more tokens") as e:
        next(decode(model, cache, logits, 4))
    assert e.value.options == ("max_new_tokens",)


def test_long_prefill_shows_progress(monkeypatch, capsys):
    monkeypatch.setattr(G, "PROGRESS_DELAY_S", 0.0)  # the bar waits this long before it shows
    model = tiny_model(4, 2)
    generate(model, list(range(90)), 2, offload="none", prefill_chunk=30, progress=True)
    err = capsys.readouterr().err
    assert "prefill" in err and "90/90" in err and "plan:" in err


def test_the_cpu_prefill_chunk_is_small_enough_to_show_progress():
    """On the CPU a chunk of a few hundred tokens takes seconds; the CUDA default (8192) would take minutes."""
    assert default_prefill_chunk("cpu") <= 1024 < default_prefill_chunk("cuda")


def test_ctrl_c_in_the_callers_code_frees_the_cache():
    import gc

    import offload
    model = tiny_model(4, 2)
    seen = []

    def on_token(t):
        seen.append(t)
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(model, list(range(12)), 30, offload="head", on_token=on_token)
    gc.collect()
    assert len(seen) == 4 and len(offload._CACHES) == 0


# --- loading --------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_load_model_on_cuda_without_cuda_is_one_clear_error():
    with pytest.raises(UsageError, match="CUDA is not available") as e:
        load_model(None, device="cuda")
    assert "\n" not in str(e.value) and e.value.options == ("device",)


def test_hf_dir_and_gguf_are_converted_once_into_the_cache(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf")
    from tests.test_convert import TINY, tiny_hf, write_gguf  # transformers and gguf: the references
    monkeypatch.setenv("HEADINFER_CACHE", str(tmp_path / "cache"))
    tiny_hf("llama").save_pretrained(tmp_path / "hf")
    write_gguf(tmp_path / "tiny.gguf", tiny_hf("llama"), {})
    for source in (tmp_path / "hf", tmp_path / "tiny.gguf"):
        model, tokenizer = load_model(source)
        assert "converting" in capsys.readouterr().err
        assert model.args.dim == TINY["hidden_size"] and tokenizer is None
        load_model(str(source))  # the second time it loads the converted copy
        assert "converting" not in capsys.readouterr().err
    hf_copy = resolve_checkpoint(tmp_path / "hf")
    assert hf_copy.parent == tmp_path / "cache"
    # A source changed in place is converted again, into a new copy.
    shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "hf" / "extra.json")
    assert resolve_checkpoint(tmp_path / "hf") != hf_copy


def test_a_file_that_is_not_a_model_says_what_it_is(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(UsageError, match="is a safetensors weights file, not a model"):
        load_model(tmp_path / "model.safetensors")


# --- sampling: the softmax's distribution, and nothing that waits for the device --------------------

def test_sampling_draws_from_the_softmax_of_the_top_k():
    logits = torch.tensor([2.0, 1.5, 0.0, -1.0, 3.0, -0.5])
    temperature, top_k, n = 0.8, 4, 200_000
    draws = G.sample(logits.expand(n, -1), temperature, top_k, torch.Generator().manual_seed(0))[:, 0]
    counts = torch.bincount(draws, minlength=6).double()
    kept = logits >= logits.topk(top_k).values[-1]
    p = torch.softmax((logits / temperature).masked_fill(~kept, float("-inf")), -1).double()
    assert counts[~kept].sum() == 0  # outside the top k: never
    # Each count is Binomial(n, p_i): within 5 standard deviations with probability 1 - 6e-7 per token
    # (the seed is fixed, so the test is deterministic; the bound says it is not tuned to this seed).
    sigma = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 5 * sigma).all(), (counts / n, p)


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    model = tiny_model(4, 2)
    prompt = list(range(1, 30))
    runs = [generate(model, prompt, 24, offload="head", temperature=1.5, seed=s, prefill_chunk=8) for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


HOST_READS = {"_local_scalar_dense", "multinomial", "nonzero", "masked_select", "equal", "is_nonzero"}


@pytest.mark.parametrize("offload", ["none", "layer", "head"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_decode_step_reads_nothing_from_the_device_on_the_host(offload, temperature):
    """On a GPU any of these ops stalls the host until the device has caught up (torch.multinomial
    checks its input there), so the one-step-late token read would wait for every step: none may
    run in a decode step, sampling included. Recorded on the CPU from the ops themselves."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model = tiny_model(4, 2)
    cache = make_cache(plan_cache(model.args, 40, torch.float32, "cpu", offload), model.args)
    logits = prefill(model, cache, list(range(1, 20)), chunk=8)
    token, generator = G.sample(logits, temperature, 5, None), torch.Generator().manual_seed(0)
    with Ops() as ops:
        for i in range(3):
            token = G.sample(G.decode_step(model, token, torch.tensor([19 + i]), cache), temperature, 5, generator)
    assert "addmm" in ops.seen or "mm" in ops.seen  # the recorder saw the step
    assert not ops.seen & HOST_READS
