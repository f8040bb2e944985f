"""Our model equals HF transformers (the reference) through save_pretrained -> convert -> load_model,
for every family we convert, with every cache policy and prefill chunks that straddle the sliding
windows (the windows here are shorter than the prompts)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from convert_checkpoint import convert
from generate import generate, load_model
from tests.test_offload import logits_of
from tests.test_windows import cache_of

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
COMMON = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, vocab_size=211,
              max_position_embeddings=256, rms_norm_eps=1e-5)

CONFIGS = {  # name: (HF class, config)
    "llama-gqa-llama3-rope": ("LlamaForCausalLM", lambda: transformers.LlamaConfig(
        **COMMON, num_attention_heads=8, num_key_value_heads=2, rope_theta=50000.0, rope_scaling=LLAMA3_ROPE)),
    "mistral": ("MistralForCausalLM", lambda: transformers.MistralConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, sliding_window=None)),
    "mistral-window-7": ("MistralForCausalLM", lambda: transformers.MistralConfig(  # every layer windowed
        **COMMON, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, sliding_window=7)),
    "qwen2-qkv-bias": ("Qwen2ForCausalLM", lambda: transformers.Qwen2Config(
        **COMMON, num_attention_heads=4, num_key_value_heads=1, rope_theta=1e6)),
    "qwen3-qk-norm": ("Qwen3ForCausalLM", lambda: transformers.Qwen3Config(  # head_dim != hidden / heads
        **COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=24, rope_theta=1e6)),
    "qwen3-window-6-from-layer-1": ("Qwen3ForCausalLM", lambda: transformers.Qwen3Config(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6,
        use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "gemma2": ("Gemma2ForCausalLM", lambda: transformers.Gemma2Config(  # local layers 0 and 2, global 1 and 3
        **{**COMMON, "num_hidden_layers": 4}, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        query_pre_attn_scalar=24, sliding_window=9, attn_logit_softcapping=5.0, final_logit_softcapping=10.0)),
    "smollm2-like-tied": ("LlamaForCausalLM", lambda: transformers.LlamaConfig(  # and head_dim != hidden / heads
        **{**COMMON, "hidden_size": 72}, num_attention_heads=6, num_key_value_heads=3, head_dim=16, rope_theta=1e5,
        tie_word_embeddings=True)),
}
WINDOWED = {"mistral-window-7": 3, "qwen3-window-6-from-layer-1": 2, "gemma2": 2}  # name: sliding layers


@pytest.fixture(scope="module", params=list(CONFIGS))
def converted(request, tmp_path_factory):
    name = request.param
    cls, config = CONFIGS[name]
    torch.manual_seed(0)
    hf = getattr(transformers, cls)(config()).eval()
    with torch.no_grad():  # larger weights than the default init, so greedy choices are not near-ties
        for p in hf.parameters():
            p.normal_(0, 0.15)
    src = tmp_path_factory.mktemp(name) / "hf"
    hf.save_pretrained(src)
    out = convert(src, src.parent / "ours")
    model, _ = load_model(out, device="cpu", dtype=torch.float32)
    assert len(model.args.sliding_layers) == WINDOWED.get(name, 0)
    return hf, model


def chunked_logits(model, policy, tokens, chunk):
    """Every position's logits, prefilled `chunk` tokens at a time into a cache of `policy` (head
    offload streaming single heads, one slot resident: the layout that exercises the most)."""
    return logits_of(model, cache_of(model, policy, tokens.shape[1]), tokens, chunk, 0)


@torch.no_grad()
def test_logits_equal_hf(converted):
    hf, model = converted
    tokens = torch.randint(0, model.args.vocab_size, (1, 45))
    ref = hf(tokens).logits
    ours = {(policy, chunk): chunked_logits(model, policy, tokens, chunk)
            for policy in ("none", "layer", "head") for chunk in (45, 4, 1)}
    for key, logits in ours.items():
        # fp32 with sums in other orders (our kernels, HF's eager/SDPA): ~1e-6 measured on logits near 1
        assert (logits - ref).abs().max().item() <= 1e-4, key
        # The policies do the same arithmetic for the same chunking: bit for bit.
        assert torch.equal(logits, ours[("none", key[1])]), key


def test_greedy_generate_equals_hf(converted):
    hf, model = converted
    prompt = torch.randint(0, model.args.vocab_size, (1, 17))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0,
                          attention_mask=torch.ones_like(prompt))[0, 17:].tolist()
    for policy, chunk in (("none", None), ("head", 5), ("layer", 3)):
        assert generate(model, prompt[0].tolist(), 24, offload=policy, prefill_chunk=chunk) == ref, policy
