"""torch.compile of the decode step: the same tokens as eager, one graph, no recompiles as context grows."""
import pytest
import torch
import torch._dynamo

from errors import UsageError
from generate import compiled_decode_step, generate
from offload import HeadOffloadCache, StandardCache
from tests.test_offload import tiny_model


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("policy", ["none", "head", "layer"])
def test_compiled_decode_gives_eager_tokens_without_recompiling(policy, capsys):
    model = tiny_model(6, 3)
    prompt = torch.randint(0, model.args.vocab_size, (23,)).tolist()
    eager = generate(model, prompt, 24, offload=policy)
    # Any recompile (a new context length, a new cache in the next call) would raise here.
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert generate(model, prompt, 24, offload=policy, compile=True, progress=True) == eager
        assert "compiling the decode step" in capsys.readouterr().err  # seconds of silence, explained
        assert generate(model, prompt[:11], 30, offload=policy, compile=True) == generate(model, prompt[:11], 30, offload=policy)


@torch.no_grad()
def test_compiled_step_has_no_graph_break():
    model = tiny_model(4, 2)
    args = model.args
    for cache in (StandardCache(args, 1, 16, "cpu", torch.float32),
                  HeadOffloadCache(args, 1, 16, "cpu", torch.float32, 1, 2)):
        explanation = torch._dynamo.explain(compiled_decode_step()._torchdynamo_orig_callable)(
            model, torch.tensor([[3]]), torch.tensor([0]), cache)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_compiled_decode_of_windowed_soft_capped_layers_gives_eager_tokens():
    """The rings' slot (position mod W) and the soft caps stay inside the opaque attention op: no
    recompile as the ring wraps."""
    from tests.test_windows import windowed_model

    model = windowed_model(window=5, attn_softcap=2.0, final_softcap=5.0)
    prompt = torch.randint(0, model.args.vocab_size, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    eager = generate(model, prompt, 20, offload="head")
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert generate(model, prompt, 20, offload="head", compile=True) == eager


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_modes_are_refused_before_any_work(mode):
    """A CUDA-graph replay runs the captured kernels only: the cache's copies, events and position
    (host code behind the attention op) would not run, and every step would attend at the captured
    position. Refused up front, on any device."""
    model = tiny_model(4, 2)
    with pytest.raises(UsageError, match=f"compile mode '{mode}' replays CUDA graphs"):
        generate(model, list(range(1, 12)), 4, compile=mode)
