"""Our model equals HF transformers (the reference) through save_pretrained -> convert -> load_model."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from convert_checkpoint import convert
from generate import generate, load_model
from offload import StandardCache

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
COMMON = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, vocab_size=211,
              max_position_embeddings=256, rms_norm_eps=1e-5)

CONFIGS = {
    "llama-gqa-llama3-rope": lambda: transformers.LlamaConfig(
        **COMMON, num_attention_heads=8, num_key_value_heads=2, rope_theta=50000.0, rope_scaling=LLAMA3_ROPE),
    "mistral": lambda: transformers.MistralConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, sliding_window=None),
    "qwen2-qkv-bias": lambda: transformers.Qwen2Config(
        **COMMON, num_attention_heads=4, num_key_value_heads=1, rope_theta=1e6),
    "smollm2-like-tied": lambda: transformers.LlamaConfig(  # and head_dim != hidden / heads
        **{**COMMON, "hidden_size": 72}, num_attention_heads=6, num_key_value_heads=3, head_dim=16, rope_theta=1e5,
        tie_word_embeddings=True),
}
MODEL_CLASSES = {"mistral": "MistralForCausalLM", "qwen2-qkv-bias": "Qwen2ForCausalLM"}


@pytest.fixture(scope="module", params=list(CONFIGS))
def converted(request, tmp_path_factory):
    name = request.param
    torch.manual_seed(0)
    config = CONFIGS[name]()
    hf = getattr(transformers, MODEL_CLASSES.get(name, "LlamaForCausalLM"))(config).eval()
    with torch.no_grad():  # larger weights than the default init, so greedy choices are not near-ties
        for p in hf.parameters():
            p.normal_(0, 0.15)
    src = tmp_path_factory.mktemp(name) / "hf"
    hf.save_pretrained(src)
    out = convert(src, src.parent / "ours")
    model, _ = load_model(out, device="cpu", dtype=torch.float32)
    return hf, model


def test_logits_equal_hf(converted):
    hf, model = converted
    tokens = torch.randint(0, model.args.vocab_size, (1, 45))
    with torch.no_grad():
        ref = hf(tokens).logits
        ours = model(tokens, torch.arange(45), StandardCache(model.args, 1, 45, "cpu", torch.float32))
    assert (ours - ref).abs().max().item() <= 1e-4


def test_greedy_generate_equals_hf(converted):
    hf, model = converted
    prompt = torch.randint(0, model.args.vocab_size, (1, 17))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0,
                          attention_mask=torch.ones_like(prompt))[0, 17:].tolist()
    for policy, chunk in (("none", None), ("head", 5), ("layer", 3)):
        assert generate(model, prompt[0].tolist(), 20, offload=policy, prefill_chunk=chunk) == ref
