"""The memory planner: adaptive grouping, residency, refusals that say what fits, and plans that caches obey."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from errors import UsageError
from model import ModelArgs
from planner import GiB, make_cache, plan_cache, plan_memory

LLAMA3_8B = ModelArgs.from_name("Meta-Llama-3-8B")
TINY = ModelArgs(dim=32, n_layer=3, n_head=4, n_kv_head=2, head_dim=8, intermediate_size=64, vocab_size=50,
                 max_seq_len=512)


def test_kv_bytes_per_token_llama3_8b():
    assert LLAMA3_8B.kv_bytes_per_token(torch.bfloat16) == 128 * 1024  # 2 * 32 layers * 8 heads * 128 * 2 bytes


def test_plan_everything_resident_when_it_fits():
    plan = plan_memory(LLAMA3_8B, 32_768, torch.bfloat16, "head", gpu_budget=8 * GiB)
    assert plan.resident_slots == plan.total_slots and plan.store_bytes == 0 and plan.buffer_bytes == 0
    assert plan.gpu_bytes == plan.kv_bytes == 4 * GiB and plan.host_bytes == 0


def test_plan_adaptive_grouping_shrinks_groups_as_context_grows():
    sizes = [plan_memory(LLAMA3_8B, n, torch.bfloat16, "head", gpu_budget=4 * GiB).group_size
             for n in (100_000, 500_000, 1_000_000, 4_000_000)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 8 and sizes[-1] == 1


def test_plan_at_1m_tokens_keeps_gpu_kv_within_budget():
    budget = 2 * GiB
    plan = plan_memory(LLAMA3_8B, 1 << 20, torch.bfloat16, "head", gpu_budget=budget)
    assert plan.kv_bytes == 128 * GiB
    assert plan.gpu_bytes <= budget
    assert plan.gpu_bytes + plan.host_bytes == plan.kv_bytes + plan.buffer_bytes
    slot = 2 * (1 << 20) * 128 * 2  # K and V of one head for 1M tokens in bf16: 512 MiB
    # A quarter of 2 GiB cannot hold two 1-head buffers, so groups are single heads (1 GiB of
    # buffers), and the other 1 GiB keeps two slots resident.
    assert plan.group_size == 1 and plan.buffer_bytes == 2 * slot and plan.resident_slots == 2


def test_refusals_say_what_fits_in_api_terms():
    """The API names its own arguments (options), never a CLI flag; the CLI adds the flags."""
    cases = [
        (dict(max_len=4_000_000, policy="head", gpu_budget=GiB // 4), "would fit", ("gpu_kv_budget",)),
        (dict(max_len=1_000_000, policy="head", gpu_budget=2 * GiB, host_available=64 * GiB),
         "at most about .* tokens would fit", ()),
        (dict(max_len=1_000_000, policy="none", gpu_budget=16 * GiB), "head offload", ("offload",)),
    ]
    for kw, words, options in cases:
        with pytest.raises(UsageError, match=words) as e:
            plan_memory(LLAMA3_8B, dtype=torch.bfloat16, **kw)
        assert e.value.options == options and "--" not in str(e.value)
        assert all(f"--{o.replace('_', '-')}" in e.value.with_flags() for o in options)


def test_a_cpu_plan_counts_every_kv_byte_as_host_ram_and_none_as_gpu():
    host = 8 * GiB  # the standard cache at 128K is 16 GiB
    on_gpu = plan_memory(LLAMA3_8B, 131_072, torch.bfloat16, "none", device="cuda", host_available=host)
    assert on_gpu.gpu_bytes == 16 * GiB and on_gpu.host_bytes == 0
    with pytest.raises(UsageError, match="at most about 65536 tokens would fit"):
        plan_memory(LLAMA3_8B, 131_072, torch.bfloat16, "none", device="cpu", host_available=host)
    cpu = plan_memory(LLAMA3_8B, 1024, torch.bfloat16, "head", device="cpu", group_size=1, resident=3)
    assert cpu.gpu_bytes == 0 and cpu.host_bytes == cpu.kv_bytes + cpu.buffer_bytes
    assert "host RAM" in cpu.describe() and "GPU" not in cpu.describe()
    assert cpu.as_dict()["gpu_bytes"] == 0 and cpu.as_dict()["dtype"] == "bfloat16"


@pytest.mark.parametrize("policy,overrides", [("none", {}), ("layer", {}), ("head", dict(group_size=1, resident=2)),
                                              ("head", dict(group_size=2, resident=0))])
def test_make_cache_builds_what_the_plan_says(policy, overrides):
    plan = plan_memory(TINY, 100, torch.float32, policy, device="cpu", batch=3, **overrides)
    cache = make_cache(plan, TINY)
    assert (cache.batch, cache.max_len, cache.dtype, cache.device.type) == (3, 100, torch.float32, "cpu")
    assert (cache.gpu_bytes, cache.host_bytes, cache.store_bytes) == (plan.gpu_bytes, plan.host_bytes, plan.store_bytes)
    assert cache.read(0)[0].shape == (3, TINY.n_kv_head, 0, TINY.head_dim)


def test_plan_cache_refuses_a_gpu_budget_without_cuda():
    """On the CPU a budget has nothing to limit; silently ignoring it would mislead."""
    with pytest.raises(UsageError, match="needs a CUDA device") as e:
        plan_cache(TINY, 100, torch.float32, "cpu", "head", gpu_kv_budget=1.0)
    assert e.value.options == ("gpu_kv_budget",)
    assert plan_cache(TINY, 100, torch.float32, "cpu", "head").group_size == 1  # CPU: every head streams


@pytest.mark.parametrize("layout,words", [
    (dict(resident=10), "resident must be a whole number from 0 to the 6"),  # TINY: 3 layers x 2 KV heads
    (dict(resident=-1), "resident must be"),
    (dict(resident=2.5), "resident must be"),
    (dict(group_size=3), "group_size must be a whole number from 1 to the model's 2 KV heads"),
    (dict(group_size=0), "group_size must be"),
])
def test_a_layout_the_model_cannot_have_is_refused_up_front(layout, words):
    """resident=10 of 6 slots once gave a plan with a negative store (and make_cache clamped, so plan
    and cache disagreed); a group larger than the KV heads failed later with a plain ValueError."""
    with pytest.raises(UsageError, match=words):
        plan_memory(TINY, 64, torch.float32, "head", "cpu", group_size=layout.get("group_size"),
                    resident=layout.get("resident"))


@pytest.mark.parametrize("policy", ["none", "layer", "head"])
def test_a_decode_step_outside_no_grad_gives_the_same_logits(policy):
    """Called outside torch.no_grad(), the layer and head caches raised 'a view ... modified inplace'."""
    from generate import decode_step, prefill
    from tests.test_offload import tiny_model

    model = tiny_model(4, 2)
    logits = []
    for grad in (False, True):
        cache = make_cache(plan_cache(model.args, 40, torch.float32, "cpu", policy), model.args)
        prefill(model, cache, list(range(1, 20)), chunk=8)
        with torch.set_grad_enabled(grad):
            logits.append(decode_step(model, torch.tensor([[3]]), torch.tensor([19]), cache))
    assert torch.equal(logits[0], logits[1].detach())


# --- activations: the plan's figure bounds what a prefill pass allocates -----------------------------

class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors that ops create and that are still alive, and their peak; the
    model runs on the meta device, so a real shape at a real chunk costs no memory and no time."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t._base is None and not any(t is i for i in inputs):
                    self.add(t)
        return out

    def add(self, t):
        n = t.untyped_storage().nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self.free, n)

    def free(self, n):
        self.live -= n


class FlashAttentionCache:
    """What a CUDA cache's attention allocates for a pass, on the meta device: the flash kernel's
    output and fp32 log-sum-exp, a window's mask, a soft cap's fp32 key blocks (attention.py's bound);
    the KV itself is the plan's other part. (Meta SDPA would take the math path: T x S scores.)"""

    def __init__(self, args):
        self.args, self.length = args, 0

    def __call__(self, layer, q, k, v):
        from attention import SHARED_BLOCK_BYTES
        B, H, T, D = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(B, H, T, device=q.device)
        window = self.args.window(layer)
        mask = torch.empty(T, T + window - 1, dtype=torch.bool, device=q.device) if window else None
        blocks = (torch.empty(3 * SHARED_BLOCK_BYTES, dtype=torch.uint8, device=q.device)
                  if self.args.attn_softcap else None)
        del lse, mask, blocks
        return torch.cat([out[:, :1], out[:, 1:]], dim=1)  # head groups' outputs are concatenated


def peak_of_a_pass(args, dtype, chunk):
    from model import Transformer, rope_inv_freq
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    model.inv_freq = rope_inv_freq(args).to("meta")
    counter = LiveBytes()
    with torch.no_grad(), counter:
        model(torch.zeros(1, chunk, dtype=torch.long, device="meta"), torch.arange(chunk, device="meta"),
              FlashAttentionCache(args), last_only=True)
    return counter.peak


@pytest.mark.parametrize("name", ["Meta-Llama-3-8B", "Qwen2.5-7B", "Gemma-2-9B", "Llama-3.2-1B", "SmolLM2-135M"])
@pytest.mark.parametrize("chunk", [512, 8192])
def test_the_plans_activation_figure_bounds_what_a_pass_allocates(name, chunk):
    from planner import activation_bytes
    args = ModelArgs.from_name(name)
    measured = peak_of_a_pass(args, torch.bfloat16, chunk)
    figure = activation_bytes(args, torch.bfloat16, chunk)
    assert measured <= figure, (measured, figure)
    assert figure <= 2 * measured  # a bound, not a guess: within 2x (Llama-3-8B at 8K: 0.93 of 1.44 GiB)


def fake_gpu(monkeypatch, gib, weights):
    import planner
    monkeypatch.setattr(planner, "gpu_free_bytes", lambda device: int(gib * GiB) - weights)
    monkeypatch.setattr(planner, "host_available_bytes", lambda: 4096 * GiB)


def test_at_1m_tokens_on_a_24_gib_gpu_the_plan_bounds_gpu_memory_beyond_weights(monkeypatch):
    from bench.harness import meta_weights_bytes
    weights = meta_weights_bytes(LLAMA3_8B, torch.bfloat16)
    fake_gpu(monkeypatch, 24, weights)
    plan = plan_cache(LLAMA3_8B, 1 << 20, torch.bfloat16, "cuda", "head")
    assert plan.prefill_chunk == 8192  # the default chunk fits
    assert plan.gpu_bytes_beyond_weights <= 24 * GiB - weights
    assert peak_of_a_pass(LLAMA3_8B, torch.bfloat16, plan.prefill_chunk) <= plan.activation_bytes


def test_a_context_whose_buffers_need_the_room_gets_a_smaller_chunk(monkeypatch):
    """8M tokens of Llama-3-8B: one head's two buffers are 8 GiB, which an 8K chunk's activations do
    not leave free on a 24 GiB GPU; the planner takes the largest chunk that does, and a chunk given
    by the user is kept (and refused if it does not fit)."""
    from bench.harness import meta_weights_bytes
    weights = meta_weights_bytes(LLAMA3_8B, torch.bfloat16)
    fake_gpu(monkeypatch, 24, weights)
    plan = plan_cache(LLAMA3_8B, 8 << 20, torch.bfloat16, "cuda", "head")
    assert plan.prefill_chunk == 2048 and plan.buffer_bytes == 8 * GiB
    assert plan.gpu_bytes_beyond_weights <= 24 * GiB - weights
    with pytest.raises(UsageError, match="cannot hold the two buffers"):
        plan_cache(LLAMA3_8B, 8 << 20, torch.bfloat16, "cuda", "head", prefill_chunk=8192)
