"""The peer: Hugging Face transformers' offloaded KV cache on the same shape, decode s/token.

transformers is a benchmark peer only (never a run-time dependency of this project), imported here alone.
Its offloaded cache (what `generate(..., cache_implementation="offloaded")` builds) keeps whole
layers in CPU RAM, prefetches layer l+1 while layer l computes, and copies each layer back after
appending the new token: every step moves the whole KV to the GPU and back.
"""
import math
import time

import torch

from bench.harness import WARMUP_STEPS, attempt, fmt_tokens, timed


def _model(transformers, args, device, dtype, max_len):
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.n_layer, num_attention_heads=args.n_head, num_key_value_heads=args.n_kv_head,
        head_dim=args.head_dim, rms_norm_eps=args.norm_eps, rope_theta=args.rope_base, max_position_embeddings=max_len,
        tie_word_embeddings=args.tie_word_embeddings, attention_bias=args.qkv_bias)
    with torch.device(device):  # weights made on the device in the target dtype, as for our model
        model = transformers.LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def _offloaded_cache(transformers, config, offload: bool):
    if not offload:  # CPU (dry run): the same code path without the CUDA streams offloading needs
        return transformers.DynamicCache(config=config)
    try:
        return transformers.DynamicCache(config=config, offloading=True)  # transformers >= 4.56
    except TypeError:
        return transformers.OffloadedCache()


@torch.no_grad()
def _decode(model, transformers, args, device, dtype, L, target_s, max_steps):
    """Fill an offloaded cache with L - steps random positions, then time real decode steps."""
    max_steps = min(max_steps, L // 4)
    start = L - WARMUP_STEPS - 1 - max_steps
    t0 = time.perf_counter()
    cache = _offloaded_cache(transformers, model.config, device.type == "cuda")
    block = min(1024, start)
    for layer in range(args.n_layer):  # update() offloads each layer as a real prefill would
        k, v = (torch.randn(1, args.n_kv_head, block, args.head_dim, device=device, dtype=dtype)
                .repeat(1, 1, math.ceil(start / block), 1)[:, :, :start] for _ in range(2))
        cache.update(k, v, layer)
    fill_s = time.perf_counter() - t0
    token = torch.randint(0, args.vocab_size, (1, 1), device=device)

    def steps(n):
        nonlocal token
        for _ in range(n):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

    steps(WARMUP_STEPS)
    _, probe = timed(device, lambda: steps(1))
    n = min(max_steps, max(3, math.ceil(target_s / max(probe, 1e-6))))
    _, seconds = timed(device, lambda: steps(n))
    return dict(s_per_token=seconds / n, steps=n, fill_s=fill_s, mid=start + WARMUP_STEPS + 1 + n / 2,
                offloaded=device.type == "cuda")


def hf_decode_rows(args, device, dtype, contexts, clock, h2d_gbps, target_s, max_steps, estimate) -> list[dict]:
    try:
        import transformers
    except ImportError:
        clock.log("hf: transformers is not installed; peer skipped")
        return []
    clock.log(f"hf: building LlamaForCausalLM (transformers {transformers.__version__}) with random weights")
    model = _model(transformers, args, device, dtype, max(contexts) + 64)
    rows = []
    for L in contexts:
        base = dict(policy="hf_offloaded", config="hf_offloaded", context=L, resident_heads=0,
                    transformers=transformers.__version__)
        if not clock.allows(estimate(L)):
            rows.append(dict(base, s_per_token=None, pcie_util=None, error="skipped: time budget"))
            continue
        clock.log(f"hf_offloaded decode at {fmt_tokens(L)}")
        r = attempt(device, lambda: _decode(model, transformers, args, device, dtype, L, target_s, max_steps))
        s, mid = r.pop("s_per_token", None), r.pop("mid", None)
        # The whole KV crosses PCIe once per step (plus the copy back), as for our layer offload.
        moved = mid * args.kv_bytes_per_token(dtype) if mid else None
        util = moved / (h2d_gbps * 1e9) / s if s and h2d_gbps and r.get("offloaded") else None
        rows.append(dict(base, s_per_token=s, pcie_util=util, **r))
    del model
    return rows
