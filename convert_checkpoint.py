"""Convert a Hugging Face checkpoint (local dir or hub repo id) or a GGUF file into our
checkpoint dir: config.json (the ModelArgs fields), model.safetensors (our tensor names, q/k rows in
HF's rotate-half RoPE layout) and the tokenizer files. See docs/checkpoint-format.md.

    python convert_checkpoint.py meta-llama/Llama-3.1-8B-Instruct --out checkpoints/llama3.1-8b
    python convert_checkpoint.py meta-llama/Llama-3.1-8B-Instruct --out checkpoints/llama3.1-8b-int8 --quantize int8

--quantize int8|int4 stores the blocks' linear layers quantized (quantize.py), so that a large model is
quantized once, not at every load; a converted checkpoint can be given as the source for this. A GGUF's
Q4_0, Q4_1 and Q4_K tensors become int4 weights as they are (their blocks are int4 groups of 32).
"""
import argparse
import json
import math
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

import quantize as quant
from errors import ArgumentParser, UsageError
from model import ModelArgs, Transformer


class ConversionError(UsageError):
    """A source that cannot be converted, or an output that cannot be written. Its message is always one line."""

    def __init__(self, message, options=()):
        super().__init__(" ".join(str(message).split()), options)


HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                    "Gemma2ForCausalLM")
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2")
DEFAULT_HEAD_DIM = {"Qwen3ForCausalLM": 128, "Gemma2ForCausalLM": 256}  # transformers' when config.json has none
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")  # what we dequantize
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}  # torch -> safetensors
SAFETENSORS_DTYPES = {v: k for k, v in DTYPES.items()}
FILE_DTYPES = {**DTYPES, torch.int8: "I8", torch.uint8: "U8"}  # what we write, quantized weights too

# Our tensor names -> the source tensors they are made of (q, k, v are fused into wqkv).
HF_NAMES = {
    "tok_embeddings.weight": ["model.embed_tokens.weight"],
    "layers.{}.attention_norm.weight": ["model.layers.{}.input_layernorm.weight"],
    "layers.{}.attention.wqkv.weight": ["model.layers.{}.self_attn.q_proj.weight",
                                        "model.layers.{}.self_attn.k_proj.weight",
                                        "model.layers.{}.self_attn.v_proj.weight"],
    "layers.{}.attention.wqkv.bias": ["model.layers.{}.self_attn.q_proj.bias",
                                      "model.layers.{}.self_attn.k_proj.bias",
                                      "model.layers.{}.self_attn.v_proj.bias"],
    "layers.{}.attention.wo.weight": ["model.layers.{}.self_attn.o_proj.weight"],
    "layers.{}.ffn_norm.weight": ["model.layers.{}.post_attention_layernorm.weight"],
    "layers.{}.feed_forward.w1.weight": ["model.layers.{}.mlp.gate_proj.weight"],
    "layers.{}.feed_forward.w3.weight": ["model.layers.{}.mlp.up_proj.weight"],
    "layers.{}.feed_forward.w2.weight": ["model.layers.{}.mlp.down_proj.weight"],
    "layers.{}.attention.q_norm.weight": ["model.layers.{}.self_attn.q_norm.weight"],
    "layers.{}.attention.k_norm.weight": ["model.layers.{}.self_attn.k_norm.weight"],
    "norm.weight": ["model.norm.weight"],
    "output.weight": ["lm_head.weight"],
}
# Gemma-2 names its four norms differently: its post_attention_layernorm follows attention (a
# sandwich norm), where Llama's is the norm before the MLP.
HF_GEMMA2_NAMES = {**HF_NAMES,
                   "layers.{}.post_attention_norm.weight": ["model.layers.{}.post_attention_layernorm.weight"],
                   "layers.{}.ffn_norm.weight": ["model.layers.{}.pre_feedforward_layernorm.weight"],
                   "layers.{}.post_ffn_norm.weight": ["model.layers.{}.post_feedforward_layernorm.weight"]}
GGUF_NAMES = {
    "tok_embeddings.weight": ["token_embd.weight"],
    "layers.{}.attention_norm.weight": ["blk.{}.attn_norm.weight"],
    "layers.{}.attention.wqkv.weight": ["blk.{}.attn_q.weight", "blk.{}.attn_k.weight", "blk.{}.attn_v.weight"],
    "layers.{}.attention.wqkv.bias": ["blk.{}.attn_q.bias", "blk.{}.attn_k.bias", "blk.{}.attn_v.bias"],
    "layers.{}.attention.wo.weight": ["blk.{}.attn_output.weight"],
    "layers.{}.ffn_norm.weight": ["blk.{}.ffn_norm.weight"],
    "layers.{}.feed_forward.w1.weight": ["blk.{}.ffn_gate.weight"],
    "layers.{}.feed_forward.w3.weight": ["blk.{}.ffn_up.weight"],
    "layers.{}.feed_forward.w2.weight": ["blk.{}.ffn_down.weight"],
    "layers.{}.attention.q_norm.weight": ["blk.{}.attn_q_norm.weight"],
    "layers.{}.attention.k_norm.weight": ["blk.{}.attn_k_norm.weight"],
    "layers.{}.post_attention_norm.weight": ["blk.{}.post_attention_norm.weight"],
    "layers.{}.post_ffn_norm.weight": ["blk.{}.post_ffw_norm.weight"],
    "norm.weight": ["output_norm.weight"],
    "output.weight": ["output.weight"],
}


@dataclass
class Source:
    config: dict                             # our ModelArgs fields
    names: dict                              # HF_NAMES or GGUF_NAMES
    meta: dict                               # source tensor name -> (shape, torch dtype or type name)
    load: Callable[[str], torch.Tensor]      # source tensor name -> tensor, in our layout
    ignore: set                              # source tensors we may safely drop
    write_tokenizer: Callable[[Path], None]  # writes the tokenizer files into a dir
    load_int4: Callable[[str, int], dict | None] = lambda name, group_size: None  # a tensor's int4 form as stored


# ---------------------------------------------------------------- Hugging Face checkpoints

def hf_config(hf: dict) -> dict:
    arch = (hf.get("architectures") or ["(none)"])[0]
    if arch not in HF_ARCHITECTURES:
        raise ConversionError(f"unsupported architecture {arch} (supported: {', '.join(HF_ARCHITECTURES)})")
    # transformers < 5 writes rope_theta + rope_scaling; transformers 5 folds both into rope_parameters
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        rope_scaling = None
    elif rope_type == "llama3":
        rope_scaling = {"type": "llama3", **{k: rope[k] for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
    else:
        raise ConversionError(f"unsupported rope scaling type {rope_type!r} (supported: llama3)")
    n_head = hf["num_attention_heads"]
    config = {
        "dim": hf["hidden_size"],
        "n_layer": hf["num_hidden_layers"],
        "n_head": n_head,
        "n_kv_head": hf.get("num_key_value_heads") or n_head,
        "head_dim": hf.get("head_dim") or DEFAULT_HEAD_DIM.get(arch) or hf["hidden_size"] // n_head,
        "intermediate_size": hf["intermediate_size"],
        "vocab_size": hf["vocab_size"],
        "norm_eps": hf["rms_norm_eps"],
        "rope_base": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "rope_scaling": rope_scaling,
        "qkv_bias": arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias")),
        "qk_norm": arch == "Qwen3ForCausalLM",
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", arch == "Gemma2ForCausalLM")),
        "max_seq_len": hf["max_position_embeddings"],
        **sliding_windows(hf),
    }
    if arch == "Gemma2ForCausalLM":
        activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if activation != "gelu_pytorch_tanh":
            raise ConversionError(f"unsupported Gemma-2 activation {activation!r} (supported: gelu_pytorch_tanh)")
        config.update(gemma2_config(hf["hidden_size"], hf.get("query_pre_attn_scalar", 256),  # transformers' defaults
                                    hf.get("attn_logit_softcapping", 50.0), hf.get("final_logit_softcapping", 30.0)))
    return config


def gemma2_config(dim: int, query_pre_attn_scalar: float, attn_softcap: float | None,
                  final_softcap: float | None) -> dict:
    """What sets Gemma-2 apart from Llama (Gemma Team, arXiv 2408.00118, Sec. 2), as ModelArgs fields."""
    return {"embedding_scale": dim ** 0.5, "norm_offset": 1.0, "sandwich_norm": True, "mlp_activation": "gelu_tanh",
            "query_pre_attn_scalar": query_pre_attn_scalar, "attn_softcap": attn_softcap,
            "final_softcap": final_softcap}


def sliding_windows(hf: dict) -> dict:
    """The sliding window and the layers that use it: config.layer_types where transformers writes it
    (transformers >= 4.53), else each family's rule as transformers applies it to older configs
    (every hub Gemma-2): Gemma-2's even layers, Qwen's layers from max_window_layers on, Mistral's all."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if not window or window >= hf["max_position_embeddings"]:  # a window as long as the context is none
        return {"sliding_window": None, "sliding_layers": []}
    n, arch = hf["num_hidden_layers"], hf["architectures"][0]
    if hf.get("layer_types"):
        layers = [i for i, t in enumerate(hf["layer_types"]) if t == "sliding_attention"]
    elif arch == "Gemma2ForCausalLM":
        layers = list(range(0, n, 2))
    elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        layers = list(range(hf.get("max_window_layers", 28), n))
    else:
        layers = list(range(n))
    return {"sliding_window": window if layers else None, "sliding_layers": layers}


def open_hf_dir(path: Path) -> Source:
    if not (path / "config.json").is_file():
        raise ConversionError(f"{path} has no config.json (expected a Hugging Face model dir)")
    try:
        hf = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise ConversionError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    if hf.get("quantization_config"):  # GPTQ, AWQ, bitsandbytes, FP8: their tensors are not a float model's
        method = hf["quantization_config"].get("quant_method", "quantized")
        raise ConversionError(f"{path} is already quantized ({method}); give the unquantized model (--quantize "
                              f"int8 or int4 quantizes it here)", ("checkpoint",))
    try:
        config = hf_config(hf)
    except KeyError as e:
        raise ConversionError(f"{path / 'config.json'} lacks {e}") from None

    meta, loaders = {}, {}
    shards = sorted(path.glob("model*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            if not (path / shard).is_file():
                raise ConversionError(f"{path / shard} is missing (listed in {index.name})")
    if shards:
        for shard in shards:
            try:
                f = safe_open(shard, framework="pt")
            except Exception as e:  # safetensors raises its own error types for truncated/garbled files
                raise ConversionError(f"{shard} is not a valid safetensors file: {e}") from None
            meta |= safetensors_meta(f)
            loaders |= dict.fromkeys(f.keys(), f)
        load = lambda name: loaders[name].get_tensor(name)
    else:
        state = {}
        for shard in sorted(path.glob("pytorch_model*.bin")):
            try:  # mmap: tensors are read from disk when used, not all at once
                state.update(torch.load(shard, map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:
                raise ConversionError(f"{shard} is not a loadable PyTorch checkpoint: {e}") from None
        if not state:
            raise ConversionError(f"{path} has no model*.safetensors or pytorch_model*.bin weights")
        meta = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
        load = state.__getitem__

    ignore = {name for name in meta if name.endswith("rotary_emb.inv_freq")}  # old checkpoints saved a buffer
    if config["tie_word_embeddings"]:
        ignore.add("lm_head.weight")  # some checkpoints store the tied copy anyway
    names = HF_GEMMA2_NAMES if config.get("sandwich_norm") else HF_NAMES
    return Source(config, names, meta, load, ignore, tokenizer_files_of(path))


def safetensors_meta(f) -> dict:
    """Each tensor of a safetensors file (safe_open) -> (shape, torch dtype or safetensors type name)."""
    slices = {name: f.get_slice(name) for name in f.keys()}
    return {name: (tuple(s.get_shape()), SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype()))
            for name, s in slices.items()}


def tokenizer_files_of(path: Path) -> Callable[[Path], None]:
    """A Source's write_tokenizer for a dir that holds tokenizer files as HF ships them: copies them."""
    def write_tokenizer(out: Path):
        for name in TOKENIZER_FILES:
            if (path / name).is_file():
                shutil.copy(path / name, out / name)
    return write_tokenizer


def download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    # model*.safetensors, not *.safetensors: Mistral repos also ship consolidated.safetensors (2x download)
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "model*.safetensors", "tokenizer.model"]))
        if not any(path.glob("model*.safetensors")):
            path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "pytorch_model*.bin", "tokenizer.model"]))
    except (OSError, ValueError) as e:  # hub errors (not found, offline, gated, bad id) derive from these
        raise ConversionError(f"{repo_id} is not a local path, and downloading it from the Hugging Face hub "
                              f"failed: {str(e).strip().splitlines()[0]}") from None
    return path


# ---------------------------------------------------------------- GGUF files

def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """GGUF q/k rows are in the interleaved (Meta) RoPE layout: llama.cpp applied the inverse of the
    permutation HF's converter applies to Meta weights. Applying HF's permutation restores rotate-half:
    row 2j+a of a head (pair j, element a) goes to row a*head_dim/2 + j."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def open_gguf(path: Path) -> Source:
    import gguf  # only GGUF sources need it
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on files that are not GGUF
        raise ConversionError(f"{path} is not a readable GGUF file: {e}") from None

    def field(key, default=None):
        if key in reader.fields:
            return reader.fields[key].contents()
        if default is None:
            raise ConversionError(f"{path} lacks metadata {key}")
        return default

    arch = field("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ConversionError(f"unsupported GGUF architecture {arch} (supported: {', '.join(GGUF_ARCHITECTURES)})")
    scaling = field(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ConversionError(f"unsupported GGUF rope scaling type {scaling!r}")

    tensors = {t.name: t for t in reader.tensors}
    # 9.999999747378752e-06 -> 1e-05: the float32 metadata value, written as its shortest decimal
    f32 = lambda x: float(str(np.float32(x)))
    n_head, dim = field(f"{arch}.attention.head_count"), field(f"{arch}.embedding_length")
    n_kv_head = field(f"{arch}.attention.head_count_kv", n_head)
    n_layer = field(f"{arch}.block_count")
    head_dim = field(f"{arch}.attention.key_length", field(f"{arch}.rope.dimension_count", dim // n_head))
    config = {
        "dim": dim,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_kv_head": n_kv_head,
        "head_dim": head_dim,
        "intermediate_size": field(f"{arch}.feed_forward_length"),
        "vocab_size": field(f"{arch}.vocab_size", 0) or len(field("tokenizer.ggml.tokens")),
        "norm_eps": f32(field(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_base": f32(field(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        # Llama-3.1's frequency scaling, as llama.cpp stores it: one divisor per rotated pair.
        "rope_freq_factors": (gguf_f32(tensors["rope_freqs.weight"]).flatten().tolist()
                              if "rope_freqs.weight" in tensors else None),
        "qkv_bias": "blk.0.attn_q.bias" in tensors,
        "qk_norm": "blk.0.attn_q_norm.weight" in tensors,
        "tie_word_embeddings": "output.weight" not in tensors,
        "max_seq_len": field(f"{arch}.context_length"),
    }
    if arch == "gemma2":
        # llama.cpp writes no query_pre_attn_scalar: it scales by head_dim ** -0.5, except for the 27B
        # model (46 layers), whose scalar is dim / n_head (as in HF's configs of the three sizes).
        scalar = dim // n_head if n_layer == 46 else head_dim
        config.update(gemma2_config(dim, scalar, field("gemma2.attn_logit_softcapping", 50.0),
                                    field("gemma2.final_logit_softcapping", 30.0)),
                      sliding_window=field("gemma2.attention.sliding_window"),
                      sliding_layers=list(range(0, n_layer, 2)))  # the even layers are local, as in HF
    else:
        config.update(sliding_window=None, sliding_layers=[])

    # GGUF lists dims innermost first; dequantized data is [rows, cols] like torch
    meta = {name: (tuple(int(d) for d in reversed(t.shape)),
                   torch.float32 if t.tensor_type.name in GGUF_TYPES else t.tensor_type.name)
            for name, t in tensors.items()}

    def rows_in_our_order(name, w):
        if arch == "llama" and ".attn_q." in name:  # only llama's q/k rows are permuted (the others use NeoX RoPE)
            return unpermute(w, n_head)
        if arch == "llama" and ".attn_k." in name:
            return unpermute(w, n_kv_head)
        return w

    def load(name):
        w = rows_in_our_order(name, gguf_f32(tensors[name]).reshape(meta[name][0]))
        if arch == "gemma2" and name.endswith("norm.weight"):
            # llama.cpp stores Gemma's norms as 1 + weight; we keep HF's weight (config norm_offset).
            # y - 1 is exact in fp32 for y in [0.5, 2] (Sterbenz), so 1 + (y - 1) gives y back.
            w = w - 1
        return w

    def write_tokenizer(out: Path):
        if "tokenizer.ggml.model" in reader.fields:
            from tokenizer import tokenizer_files_from_gguf
            try:
                tokenizer_files_from_gguf(reader, out)
            except ValueError as e:  # a tokenizer kind tokenizer.py does not support
                raise ConversionError(f"{path}: {e}") from None

    def load_int4(name, group_size):
        if group_size != GGUF_INT4_GROUP or tensors[name].tensor_type.name not in GGUF_INT4:
            return None
        parts = gguf_int4(tensors[name], meta[name][0])
        q = rows_in_our_order(name, quant.unpack_int4(parts["weight"]))
        return {"weight": quant.pack_int4(q), "scales": rows_in_our_order(name, parts["scales"]),
                "zeros": rows_in_our_order(name, parts["zeros"])}

    return Source(config, GGUF_NAMES, meta, load, {"rope_freqs.weight"}, write_tokenizer, load_int4)


def gguf_f32(t) -> torch.Tensor:
    """A GGUF tensor's values in fp32 (dequantized), flat or [rows, cols]."""
    import gguf
    return torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type))


GGUF_INT4, GGUF_INT4_GROUP = ("Q4_0", "Q4_1", "Q4_K"), 32  # blocks (sub-blocks for Q4_K) of 32 4-bit values


def gguf_int4(t, shape) -> dict:
    """A Q4_0, Q4_1 or Q4_K tensor in our stored int4 form (quantize.py), each 32-value block a group:
    w = (q - 8) * scale + zero. llama.cpp's blocks decode as Q4_0 d * (q - 8); Q4_1 d * q + m;
    Q4_K (d * sc_j) * q - dmin * m_j per 32-value sub-block j of 256 (6-bit sc_j, m_j). So the scale
    is d (d * sc_j) and the zero 0, m + 8 d, 8 d sc_j - dmin m_j: the same values (up to the fp32
    rounding of the zero), and no float weight in between."""
    import gguf
    rows, cols = shape
    kind = t.tensor_type.name
    blocks = np.asarray(t.data).view(np.uint8).reshape(rows * cols // (256 if kind == "Q4_K" else 32), -1)
    f16 = lambda b: torch.from_numpy(b.copy().view(np.float16).astype(np.float32))
    if kind == "Q4_K":
        d, dmin = f16(blocks[:, 0:2]), f16(blocks[:, 2:4])
        sc, m = (torch.from_numpy(x.astype(np.float32)) for x in gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16]))
        packed = torch.from_numpy(blocks[:, 16:].copy()).reshape(-1, 4, 1, 32)  # 4 x 32 bytes: sub-blocks 2c, 2c+1
        q = torch.cat([packed & 15, packed >> 4], dim=2).reshape(-1, 256)
        scales, zeros = d * sc, 8 * d * sc - dmin * m
    else:
        d = f16(blocks[:, 0:2])
        packed = torch.from_numpy(blocks[:, -16:].copy())  # values 0-15 in the low nibbles, 16-31 in the high
        q = torch.cat([packed & 15, packed >> 4], dim=1)
        scales, zeros = d, f16(blocks[:, 2:4]) + 8 * d if kind == "Q4_1" else torch.zeros_like(d)
    return {"weight": quant.pack_int4(q.reshape(rows, cols)), "scales": scales.reshape(rows, cols // 32),
            "zeros": zeros.reshape(rows, cols // 32)}


# ---------------------------------------------------------------- our own converted checkpoints

def stored_weights(f, path) -> tuple | None:
    """What a checkpoint's model.safetensors (`f`, safe_open) holds: (mode, group size) for quantized
    weights (its metadata says), None for float ones."""
    meta = f.metadata() or {}
    mode = meta.get("weights")
    if mode is None:
        return None
    if mode not in quant.WEIGHTS:
        raise ConversionError(f"{path} holds {mode} weights, which this version cannot load")
    return mode, int(meta.get("group_size", quant.GROUP_SIZE))


def open_converted(path: Path) -> Source:
    """One of our checkpoint dirs as a source: its float weights to be quantized (--quantize)."""
    try:
        args = ModelArgs.from_json(path / "config.json")
        f = safe_open(path / "model.safetensors", framework="pt")
    except Exception as e:
        raise ConversionError(f"{path} is not a valid converted checkpoint: {e}") from None
    stored = stored_weights(f, path / "model.safetensors")
    if stored is not None:
        raise ConversionError(f"{path} is already quantized ({stored[0]} weights); it loads as such, and "
                              f"requantizing rounded weights would round them twice: give the original", ("quantize",))
    with torch.device("meta"):  # our names map to themselves, wqkv stored fused
        templates = {re.sub(r"layers\.\d+\.", "layers.{}.", k): [re.sub(r"layers\.\d+\.", "layers.{}.", k)]
                     for k in Transformer(args).state_dict()}
    return Source(json.loads((path / "config.json").read_text()), templates, safetensors_meta(f), f.get_tensor,
                  set(), tokenizer_files_of(path))


# ---------------------------------------------------------------- writing our checkpoint

def expected_shapes(c: dict) -> dict:
    """Our tensor name -> shapes of the source parts it is made of, as the config implies."""
    d, hd, hidden, vocab = c["dim"], c["head_dim"], c["intermediate_size"], c["vocab_size"]
    q, kv = c["n_head"] * hd, c["n_kv_head"] * hd
    shapes = {"tok_embeddings.weight": [(vocab, d)]}
    for i in range(c["n_layer"]):
        p = f"layers.{i}."
        shapes[p + "attention_norm.weight"] = [(d,)]
        shapes[p + "attention.wqkv.weight"] = [(q, d), (kv, d), (kv, d)]
        if c["qkv_bias"]:
            shapes[p + "attention.wqkv.bias"] = [(q,), (kv,), (kv,)]
        shapes[p + "attention.wo.weight"] = [(d, q)]
        if c.get("qk_norm"):
            shapes[p + "attention.q_norm.weight"] = shapes[p + "attention.k_norm.weight"] = [(hd,)]
        if c.get("sandwich_norm"):
            shapes[p + "post_attention_norm.weight"] = shapes[p + "post_ffn_norm.weight"] = [(d,)]
        shapes[p + "ffn_norm.weight"] = [(d,)]
        shapes[p + "feed_forward.w1.weight"] = [(hidden, d)]
        shapes[p + "feed_forward.w3.weight"] = [(hidden, d)]
        shapes[p + "feed_forward.w2.weight"] = [(d, hidden)]
    shapes["norm.weight"] = [(d,)]
    if not c["tie_word_embeddings"]:
        shapes["output.weight"] = [(vocab, d)]
    return shapes


def plan_tensors(src: Source) -> dict:
    """Our tensor name -> (shape, dtype, source parts). Checks every name, shape and dtype up front,
    so a bad checkpoint fails in seconds rather than after writing most of it."""
    plan = {}
    for name, part_shapes in expected_shapes(src.config).items():
        layer = re.match(r"layers\.(\d+)\.(.*)", name)
        templates = src.names["layers.{}." + layer[2]] if layer else src.names[name]
        parts = [t.format(layer[1]) if layer else t for t in templates]
        if len(parts) == 1 < len(part_shapes):  # a converted checkpoint's wqkv: q, k and v stored fused
            part_shapes = [(sum(s[0] for s in part_shapes), *part_shapes[0][1:])]
        for part, shape in zip(parts, part_shapes):
            if part not in src.meta:
                raise ConversionError(f"missing tensor {part}")
            if src.meta[part][0] != shape:
                raise ConversionError(f"tensor {part} has shape {list(src.meta[part][0])}, "
                                      f"but the config implies {list(shape)}")
            if src.meta[part][1] not in DTYPES:
                raise ConversionError(f"tensor {part} has unsupported type {src.meta[part][1]}")
        shape = (sum(s[0] for s in part_shapes), *part_shapes[0][1:])
        plan[name] = (shape, src.meta[parts[0]][1], parts)
    used = {part for _, _, parts in plan.values() for part in parts}
    unknown = sorted(set(src.meta) - used - src.ignore)
    if unknown:  # e.g. an o_proj bias: dropping it silently would give a different model
        raise ConversionError(f"tensor {unknown[0]} is not supported by this converter")
    return plan


def tensors_to_write(plan: dict, src: Source, mode: str | None, group_size: int) -> dict:
    """name -> (shape, dtype, load) of each tensor model.safetensors holds: plan's, with the blocks' linear
    layers in their stored quantized form when `mode` is int8 or int4 (quantize.py)."""
    layers = {f"{name}.weight" for name in quant.quantized_layers(_meta_model(src.config))} if mode else set()
    tensors = {}
    for name, (shape, dtype, parts) in plan.items():
        if name in layers:
            tensors.update(quantized_tensors(name.removesuffix(".weight"), shape, parts, src, mode, group_size))
        else:
            tensors[name] = (shape, dtype, lambda parts=parts: torch.cat([src.load(p) for p in parts]))
    return tensors


def quantized_tensors(layer: str, shape, parts: list[str], src: Source, mode: str, group_size: int) -> dict:
    """A linear layer's stored parts (weight, scales[, zeros]), quantized once when the first is written.
    Each source part of a fused wqkv is quantized alone (or taken as it is from a GGUF's int4 blocks)
    and their rows put together: both forms are per row, so this is quantizing the fused weight."""
    pending = {}

    def load(p):
        if not pending:
            quantized = [src_part(src, part, mode, group_size) for part in parts]
            pending.update({k: torch.cat([q[k] for q in quantized]) for k in quantized[0]})
        return pending.pop(p)  # dropped once written

    rows, cols = shape
    shapes = {"weight": ((rows, cols), torch.int8) if mode == "int8" else ((rows, cols // 2), torch.uint8),
              "scales": ((rows,) if mode == "int8" else (rows, cols // group_size), torch.float32),
              "zeros": ((rows, cols // group_size), torch.float32)}
    return {f"{layer}.{p}": (*shapes[p], lambda p=p: load(p)) for p in quant.PARTS[mode]}


def src_part(src: Source, name: str, mode: str, group_size: int) -> dict:
    """A source tensor in its stored quantized form: a GGUF's int4 blocks as they are, anything else
    quantized from its float values."""
    direct = src.load_int4(name, group_size) if mode == "int4" else None
    return direct if direct is not None else quant.quantize(src.load(name), mode, group_size)


def check_int4_shapes(config: dict, mode: str, group_size: int):
    """int4 groups must tile every quantized layer's inputs (the kernels' other constraints are checked at load)."""
    if mode == "int4" and (bad := quant.untiled_layer(_meta_model(config), group_size)):
        name, _, n_in = bad
        raise ConversionError(f"{name} has {n_in} inputs, not whole groups of {group_size}: choose another "
                              f"--group-size, or int8", ("group_size",))


def _meta_model(config: dict) -> Transformer:
    with torch.device("meta"):
        return Transformer(ModelArgs(**config))


def write_safetensors(path: Path, plan: dict, metadata: dict | None = None):
    """Write model.safetensors one tensor at a time (plan: name -> (shape, dtype, load)):
    safetensors.torch.save_file needs every tensor in memory at once, which for a 70B model (or a GGUF
    dequantized to fp32) is too much."""
    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for name, (shape, dtype, _) in plan.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": FILE_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(header).encode()
    header += b" " * (-len(header) % 8)  # pad so tensor data starts 8-byte aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for name in tqdm(plan, desc="converting", unit="tensor", disable=None):
            shape, dtype, load = plan[name]
            t = load().to(dtype).contiguous()
            assert tuple(t.shape) == tuple(shape), (name, t.shape, shape)
            f.write(t.reshape(-1).view(torch.uint8).numpy())


def open_source(src: str) -> Source:
    path = Path(src)
    if path.is_file() and path.suffix == ".gguf":
        return open_gguf(path)
    if path.is_dir():
        return open_converted(path) if _ours(path) else open_hf_dir(path)
    if path.exists():
        raise ConversionError(f"{src} is neither a model dir nor a .gguf file")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", src) and not src.endswith(".gguf"):
        return open_hf_dir(download(src))
    raise ConversionError(f"{src} does not exist")


def _ours(path: Path) -> bool:
    """A dir converted by us: its config.json holds ModelArgs fields (n_layer, ...)."""
    try:
        return "n_layer" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def convert(src, out_dir, force: bool = False, quantize: str | None = None, group_size: int = quant.GROUP_SIZE) -> Path:
    """Convert src (HF model dir, hub repo id or .gguf file) into the checkpoint dir out_dir; quantize
    int8 or int4 (int4 in groups of group_size inputs) stores the blocks' linear layers quantized, and
    then src may also be one of our converted dirs."""
    if quantize is not None and quantize not in quant.WEIGHTS:
        raise ConversionError(f"unknown --quantize {quantize!r}; choose {' or '.join(quant.WEIGHTS)}", ("quantize",))
    if group_size not in quant.GROUP_SIZES:
        raise ConversionError(f"group size {group_size} is not one of {quant.GROUP_SIZES}", ("group_size",))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConversionError(f"{out} exists and is not empty (force=True replaces it)", ("force",))
    if Path(src).exists() and out.resolve() in (Path(src).resolve(), *Path(src).resolve().parents):
        raise ConversionError(f"the output {out} would overwrite the source {src}", ("out",))
    source = open_source(str(src))
    if quantize is None and Path(src).is_dir() and _ours(Path(src)):
        raise ConversionError(f"{src} is converted already; it loads as it is (--quantize makes a quantized copy)",
                              ("quantize",))
    try:
        args = ModelArgs(**source.config)  # every field written, the defaults too
    except ValueError as e:
        raise ConversionError(f"{src}: {e}") from None
    plan = plan_tensors(source)
    if quantize is not None:
        check_int4_shapes(source.config, quantize, group_size)
    metadata = {} if quantize is None else {"weights": quantize, **({"group_size": str(group_size)}
                                                                      if quantize == "int4" else {})}

    # Build everything in a temp dir next to out and rename at the end: an interrupted
    # conversion must never leave a half-written checkpoint that later loads.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"  # not mkdtemp: that ignores the umask (0700)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        args.to_json(tmp / "config.json")
        source.write_tokenizer(tmp)
        write_safetensors(tmp / "model.safetensors", tensors_to_write(plan, source, quantize, group_size), metadata)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="Hugging Face model dir, hub repo id (org/name), or .gguf file "
                        f"(GGUF architectures: {', '.join(GGUF_ARCHITECTURES)})")
    parser.add_argument("--out", required=True, help="checkpoint dir to create")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quantize", choices=quant.WEIGHTS,
                        help="store the linear layers quantized: int8 (a scale per output channel) or int4 "
                             "(a scale and a zero per group of inputs); the source may then be a converted dir")
    parser.add_argument("--group-size", type=int, default=quant.GROUP_SIZE, choices=quant.GROUP_SIZES,
                        help=f"inputs per int4 scale and zero (default {quant.GROUP_SIZE}, GGUF's Q4 blocks)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.out, force=args.force, quantize=args.quantize, group_size=args.group_size)
    except ConversionError as e:
        print(f"error: {e.with_flags()}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written to {args.out}", file=sys.stderr)
        sys.exit(130)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
