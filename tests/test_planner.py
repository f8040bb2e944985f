"""The memory planner: adaptive grouping, residency, refusals that say what fits, and plans that caches obey."""
import pytest
import torch

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
