"""CUDA paths of the offload policies (skipped without a GPU): exact tokens, bounded memory, no host syncs."""
import pytest
import torch

from generate import decode_step, generate, sample
from model import ModelArgs, Transformer, rope_inv_freq
from offload import HeadOffloadCache, LayerOffloadCache, StandardCache
from planner import GiB, make_cache, plan_memory

pytestmark = pytest.mark.cuda


def random_model(args, dtype=torch.bfloat16, std=0.02):
    with torch.device("meta"):  # straight to `dtype` on the GPU: no fp32 copy first (32 GB for 8B)
        model = Transformer(args).to(dtype)
    model = model.to_empty(device="cuda").eval()
    model.inv_freq = rope_inv_freq(args).cuda()  # fp32, as load_model leaves it
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def test_bf16_greedy_tokens_identical_to_standard_on_gpu():
    args = ModelArgs(dim=256, n_layer=4, n_head=8, n_kv_head=2, head_dim=32, intermediate_size=512,
                     vocab_size=1000, max_seq_len=4096)
    torch.manual_seed(0)
    model = random_model(args, std=0.05)
    prompt = torch.randint(0, args.vocab_size, (1500,)).tolist()
    ref = generate(model, prompt, 64, offload="none", prefill_chunk=512)
    assert generate(model, prompt, 64, offload="layer", prefill_chunk=512) == ref
    for budget in (0.0005, 0.001, None):  # all streamed, 3 of 8 slots resident, all resident
        assert generate(model, prompt, 64, offload="head", prefill_chunk=512, gpu_kv_budget=budget) == ref
    # Compiled against compiled: inductor fuses bf16 ops without eager's intermediate rounding.
    assert (generate(model, prompt, 64, offload="head", prefill_chunk=512, gpu_kv_budget=0.0005, compile=True)
            == generate(model, prompt, 64, offload="none", prefill_chunk=512, compile=True))


@torch.no_grad()
def test_fp32_logits_match_standard_on_gpu():
    args = ModelArgs(dim=128, n_layer=3, n_head=6, n_kv_head=3, head_dim=32, intermediate_size=256,
                     vocab_size=500, max_seq_len=2048)
    torch.manual_seed(1)
    model = random_model(args, dtype=torch.float32, std=0.1)
    tokens = torch.randint(0, args.vocab_size, (1, 700), device="cuda")

    def run(cache):
        out = [model(tokens[:, s:s + 256], torch.arange(s, min(s + 256, 700), device="cuda"), cache)
               for s in range(0, 700, 256)]
        for i in range(8):
            out.append(model(tokens[:, i:i + 1], torch.tensor([700 + i], device="cuda"), cache))
        return torch.cat(out, 1)

    ref = run(StandardCache(args, 1, 708, "cuda", torch.float32))
    for cache in (LayerOffloadCache(args, 1, 708, "cuda", torch.float32),
                  HeadOffloadCache(args, 1, 708, "cuda", torch.float32, group_size=1, resident=4),
                  HeadOffloadCache(args, 1, 708, "cuda", torch.float32, group_size=2, resident=0)):
        assert (run(cache) - ref).abs().max().item() <= 1e-4  # TF32-free fp32 kernels may still reorder sums


@torch.no_grad()
def test_read_write_truncate_across_pinned_store_resident_slots_and_copy_stream():
    args = ModelArgs(dim=128, n_layer=3, n_head=6, n_kv_head=3, head_dim=32, intermediate_size=256,
                     vocab_size=500, max_seq_len=2048)
    torch.manual_seed(2)
    model = random_model(args, dtype=torch.float32, std=0.1)
    tokens = torch.randint(0, args.vocab_size, (1, 300), device="cuda")
    source = StandardCache(args, 1, 400, "cuda", torch.float32)
    model(tokens, torch.arange(300, device="cuda"), source)
    token, pos = tokens[:, :1], torch.tensor([300], device="cuda")
    expected = model(token, pos, source)
    source.truncate(300)
    for cache in (HeadOffloadCache(args, 1, 400, "cuda", torch.float32, group_size=1, resident=4),
                  HeadOffloadCache(args, 1, 400, "cuda", torch.float32, group_size=2, resident=0),
                  LayerOffloadCache(args, 1, 400, "cuda", torch.float32)):
        for layer in range(args.n_layer):
            k, v = source.read(layer)
            cache.write(layer, 0, k.cpu(), v)  # from host memory and from the device
        for layer in range(args.n_layer):  # copies only: bit for bit
            assert all(torch.equal(a, b) for a, b in zip(cache.read(layer), source.read(layer)))
        assert (model(token, pos, cache) - expected).abs().max().item() <= 1e-4  # as in the fp32 test above
        # That step prefetched the next step's first unit at 301 rows; truncating must drop it.
        cache.truncate(200)
        model(tokens[:, 200:], torch.arange(200, 300, device="cuda"), cache)
        assert (model(token, pos, cache) - expected).abs().max().item() <= 1e-4  # another chunking: rounding


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@torch.no_grad()
def test_decode_issues_no_host_synchronization(temperature):
    """Greedy and sampled (the exponential race: torch.multinomial would check its input on the host)."""
    args = ModelArgs(dim=256, n_layer=4, n_head=8, n_kv_head=4, head_dim=32, intermediate_size=512,
                     vocab_size=1000, max_seq_len=4096)
    model = random_model(args)
    cache = HeadOffloadCache(args, 1, 2048, "cuda", torch.bfloat16, group_size=1, resident=3)
    model(torch.zeros(1, 1000, dtype=torch.long, device="cuda"), torch.arange(1000, device="cuda"), cache)
    token, pos = torch.zeros(1, 1, dtype=torch.long, device="cuda"), torch.tensor([1000], device="cuda")
    generator = torch.Generator("cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
    try:
        for _ in range(16):
            token = sample(decode_step(model, token, pos, cache), temperature, 50, generator)
            pos += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert cache.length == 1016


@torch.no_grad()
def test_gpu_memory_does_not_grow_with_context_under_head_offload():
    """Llama-3-8B shape: peak GPU memory stays within weights + KV budget + a fixed amount, at 32K and 128K."""
    args = ModelArgs.from_name("Meta-Llama-3-8B")
    args.max_seq_len = 1 << 20
    model = random_model(args)
    weights = sum(p.nbytes for p in model.parameters())
    budget = 2 * GiB
    peaks = {}
    for context in (32_768, 131_072):
        plan = plan_memory(args, context + 16, torch.bfloat16, "head", gpu_budget=budget)
        cache = HeadOffloadCache(args, 1, plan.max_len, "cuda", torch.bfloat16, plan.group_size, plan.resident_slots)
        cache.length = context - 1024  # the stored prefix is arbitrary: memory does not depend on its values
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        model(torch.zeros(1, 1024, dtype=torch.long, device="cuda"),
              torch.arange(context - 1024, context, device="cuda"), cache, last_only=True)
        token, pos = torch.zeros(1, 1, dtype=torch.long, device="cuda"), torch.tensor([context], device="cuda")
        for _ in range(8):
            token = decode_step(model, token, pos, cache).argmax(-1, keepdim=True)
            pos += 1
        torch.cuda.synchronize()
        peaks[context] = torch.cuda.max_memory_allocated()
        assert plan.gpu_bytes <= budget
        assert peaks[context] <= weights + budget + 1.5 * GiB, (context, peaks[context] / GiB)
        del cache
    assert peaks[131_072] - peaks[32_768] <= 256 * 2**20  # beyond the budget, nothing grows with context


@torch.no_grad()
def test_a_prompt_cache_moves_between_gpu_layouts_and_the_cpu(tmp_path):
    """Written from a head cache with resident slots and a pinned store, loaded bit for bit into the
    standard cache, a streamed-only head cache and a CPU cache; reuse answers as the cold run does."""
    from generate import prefill
    from planner import make_cache
    from prompt_cache import load_prompt_cache, save_prompt_cache

    args = ModelArgs(dim=256, n_layer=4, n_head=8, n_kv_head=2, head_dim=32, intermediate_size=512,
                     vocab_size=1000, max_seq_len=4096)
    torch.manual_seed(0)
    model = random_model(args, std=0.05)
    ids = torch.randint(0, args.vocab_size, (1200,)).tolist()
    layout = dict(policy="head", dtype=torch.bfloat16, device="cuda", group_size=1)
    source = make_cache(plan_memory(args, 1300, resident=3, **layout), args)
    prefill(model, source, ids, chunk=512)
    save_prompt_cache(source, tmp_path / "p.kv", model, ids)
    targets = [plan_memory(args, 1300, torch.bfloat16, "none", "cuda"), plan_memory(args, 1300, resident=0, **layout),
               plan_memory(args, 1300, torch.bfloat16, "none", "cpu")]
    for plan in targets:
        cache = make_cache(plan, args)
        assert load_prompt_cache(cache, tmp_path / "p.kv", model, ids) == (1199, 1200)
        for layer in range(args.n_layer):
            for a, b in zip(source.read(layer, 0, 1199, device="cpu"), cache.read(layer, device="cpu")):
                assert torch.equal(a, b)
    # 1024 shared tokens: the rest starts where the cold run's third chunk does (bf16 rounds too coarsely
    # to ask for the same tokens across different chunk boundaries).
    question = ids[:1024] + [(t + 1) % args.vocab_size for t in ids[1024:1074]]
    assert generate(model, question, 32, offload="head", gpu_kv_budget=0.001, prefill_chunk=512,
                    prompt_cache=tmp_path / "p.kv") == generate(model, question, 32, offload="head",
                                                                  gpu_kv_budget=0.001, prefill_chunk=512)


@torch.no_grad()
def test_many_questions_answer_as_each_alone_on_gpu():
    """generate_many with the document streamed from pinned memory (some heads resident) and with all
    of it resident: in fp32 each answer is the one-question answer."""
    from generate import generate_many

    args = ModelArgs(dim=128, n_layer=3, n_head=8, n_kv_head=2, head_dim=32, intermediate_size=256,
                     vocab_size=500, max_seq_len=4096)
    torch.manual_seed(2)
    model = random_model(args, dtype=torch.float32, std=0.1)
    prefix = torch.randint(0, args.vocab_size, (1500,)).tolist()
    questions = [torch.randint(0, args.vocab_size, (n,)).tolist() for n in (3, 17, 1, 40)]
    for budget in (0.002, None):  # 3 of 6 slots resident and one-head groups streamed; everything resident
        stats = {}
        answers = generate_many(model, prefix, questions, 24, offload="head", gpu_kv_budget=budget,
                                prefill_chunk=512, stats=stats)
        assert answers == [generate(model, prefix + q, 24, offload="head", gpu_kv_budget=budget, prefill_chunk=512)
                           for q in questions]
        assert stats["plan"]["resident_slots"] == (3 if budget else 6) and stats["decode_tok_s"] > 0


@torch.no_grad()
def test_sliding_windows_and_soft_caps_on_gpu_match_the_cpu():
    """Gemma-2's variants on CUDA: the rings on the device (never streamed), the written-out soft-capped
    kernel; every policy's fp32 logits within 1e-4 of the CPU's (other kernels, other sum orders), and
    the rings' memory the plan's."""
    from tests.test_offload import logits_of
    from tests.test_windows import Reference, windowed_model

    cpu = windowed_model(window=64, layers=(0, 2), attn_softcap=5.0, final_softcap=10.0, query_pre_attn_scalar=12.0)
    model = windowed_model(window=64, layers=(0, 2), attn_softcap=5.0, final_softcap=10.0,
                           query_pre_attn_scalar=12.0).cuda()
    tokens = torch.randint(0, cpu.args.vocab_size, (1, 300), generator=torch.Generator().manual_seed(0))
    ref = cpu(tokens, torch.arange(300), Reference(cpu.args))
    for policy, layout in (("none", {}), ("layer", {}), ("head", dict(group_size=1, resident=1))):
        plan = plan_memory(model.args, 300, torch.float32, policy, "cuda", **layout)
        cache = make_cache(plan, model.args)
        assert cache.windows.k.is_cuda and cache.gpu_bytes == plan.gpu_bytes
        got = logits_of(model, cache, tokens.cuda(), 100, 0).cpu()
        assert (got - ref).abs().max().item() <= 1e-4, policy


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 8, 300])
def test_quantized_linears_on_gpu_compute_dequantized_weights_times_input(mode, rows):
    # tinygemm (int4) and dequantize-and-matmul (int8) in bf16: each dequantized weight and the output
    # may be rounded to bf16 (2^-8 each), the sums run in fp32: 2^-7 of sum |x w| bounds both.
    import quantize as Q
    torch.manual_seed(2)
    parts = Q.quantize(torch.randn(256, 512), mode)
    for name in ("scales", "zeros"):
        if name in parts:
            parts[name] = parts[name].bfloat16().float()  # as the layer holds them
    layer = Q.quantized_linear(mode, parts, None, torch.device("cuda"), torch.bfloat16)
    x = torch.randn(rows, 512, device="cuda").bfloat16()
    w = Q.dequantize(parts).cuda()
    want = x.float() @ w.T
    assert ((layer(x).float() - want).abs() <= 2 ** -7 * (x.float().abs() @ w.abs().T)).all()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_weights_on_gpu_every_policy_gives_the_standard_caches_tokens(mode, tmp_path):
    from safetensors.torch import save_file

    from checkpoint import load_model
    args = ModelArgs(dim=256, n_layer=4, n_head=8, n_kv_head=2, head_dim=32, intermediate_size=512,
                     vocab_size=1000, max_seq_len=4096)
    torch.manual_seed(0)
    model = Transformer(args)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    args.to_json(tmp_path / "config.json")
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    model, _ = load_model(tmp_path, device="cuda", dtype=torch.bfloat16, weights=mode)
    prompt = torch.randint(0, args.vocab_size, (1500,)).tolist()
    ref = generate(model, prompt, 48, offload="none", prefill_chunk=512)
    assert len(set(ref)) > 2
    assert generate(model, prompt, 48, offload="layer", prefill_chunk=512) == ref
    for budget in (0.0005, None):
        assert generate(model, prompt, 48, offload="head", prefill_chunk=512, gpu_kv_budget=budget) == ref
