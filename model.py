"""A Llama-family transformer in plain PyTorch (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, SmolLM2).

The model never stores keys and values: each attention layer computes q/k/v and hands them to a
cache object (see offload.py), which stores them wherever its policy says and returns the attention
output. That is what lets the KV cache live in CPU RAM without the model knowing.
"""
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 8
    head_dim: int = 128  # explicit: not always dim // n_head
    intermediate_size: int = 14336
    vocab_size: int = 128256
    norm_eps: float = 1e-5
    rope_base: float = 500000.0
    rope_scaling: dict | None = None  # Llama-3.1 "llama3" frequency scaling
    qkv_bias: bool = False  # Qwen2
    tie_word_embeddings: bool = False
    max_seq_len: int = 8192

    def __post_init__(self):
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in KNOWN_CONFIGS:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(KNOWN_CONFIGS)}")
        return cls(**KNOWN_CONFIGS[name])

    @classmethod
    def from_json(cls, path) -> "ModelArgs":
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
        return cls(**raw)

    def to_json(self, path):
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        # K and V, for every layer and KV head: Llama-3-8B in bf16 takes 2 * 32 * 8 * 128 * 2 = 128 KiB per token.
        return 2 * self.n_layer * self.n_kv_head * self.head_dim * dtype.itemsize


_LLAMA3_SCALING = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
_LLAMA32_SCALING = {**_LLAMA3_SCALING, "factor": 32.0}

# Shapes as published on the HF hub (config.json of each repo). A converted checkpoint's own
# config.json always wins; these serve benchmarks with random weights and quick experiments.
KNOWN_CONFIGS = {
    "Llama-2-7b": dict(dim=4096, n_layer=32, n_head=32, n_kv_head=32, intermediate_size=11008,
                       vocab_size=32000, norm_eps=1e-5, rope_base=10000.0, max_seq_len=4096),
    "Llama-2-13b": dict(dim=5120, n_layer=40, n_head=40, n_kv_head=40, intermediate_size=13824,
                        vocab_size=32000, norm_eps=1e-5, rope_base=10000.0, max_seq_len=4096),
    "Llama-2-70b": dict(dim=8192, n_layer=80, n_head=64, n_kv_head=8, intermediate_size=28672,
                        vocab_size=32000, norm_eps=1e-5, rope_base=10000.0, max_seq_len=4096),
    "Meta-Llama-3-8B": dict(dim=4096, n_layer=32, n_head=32, n_kv_head=8, intermediate_size=14336,
                            vocab_size=128256, rope_base=500000.0, max_seq_len=8192),
    "Meta-Llama-3-70B": dict(dim=8192, n_layer=80, n_head=64, n_kv_head=8, intermediate_size=28672,
                             vocab_size=128256, rope_base=500000.0, max_seq_len=8192),
    "Llama-3.1-8B": dict(dim=4096, n_layer=32, n_head=32, n_kv_head=8, intermediate_size=14336,
                         vocab_size=128256, rope_base=500000.0, rope_scaling=_LLAMA3_SCALING,
                         max_seq_len=131072),
    "Llama-3.1-70B": dict(dim=8192, n_layer=80, n_head=64, n_kv_head=8, intermediate_size=28672,
                          vocab_size=128256, rope_base=500000.0, rope_scaling=_LLAMA3_SCALING,
                          max_seq_len=131072),
    "Llama-3.2-1B": dict(dim=2048, n_layer=16, n_head=32, n_kv_head=8, head_dim=64,
                         intermediate_size=8192, vocab_size=128256, rope_base=500000.0,
                         rope_scaling=_LLAMA32_SCALING, tie_word_embeddings=True, max_seq_len=131072),
    "Llama-3.2-3B": dict(dim=3072, n_layer=28, n_head=24, n_kv_head=8, intermediate_size=8192,
                         vocab_size=128256, rope_base=500000.0, rope_scaling=_LLAMA32_SCALING,
                         tie_word_embeddings=True, max_seq_len=131072),
    "Mistral-7B": dict(dim=4096, n_layer=32, n_head=32, n_kv_head=8, intermediate_size=14336,
                       vocab_size=32768, rope_base=1000000.0, max_seq_len=32768),
    "Qwen2-7B": dict(dim=3584, n_layer=28, n_head=28, n_kv_head=4, intermediate_size=18944,
                     vocab_size=152064, norm_eps=1e-6, rope_base=1000000.0, qkv_bias=True,
                     max_seq_len=131072),
    "Qwen2.5-0.5B": dict(dim=896, n_layer=24, n_head=14, n_kv_head=2, head_dim=64,
                         intermediate_size=4864, vocab_size=151936, norm_eps=1e-6,
                         rope_base=1000000.0, qkv_bias=True, tie_word_embeddings=True,
                         max_seq_len=32768),
    "Qwen2.5-7B": dict(dim=3584, n_layer=28, n_head=28, n_kv_head=4, intermediate_size=18944,
                       vocab_size=152064, norm_eps=1e-6, rope_base=1000000.0, qkv_bias=True,
                       max_seq_len=131072),
    "SmolLM2-135M": dict(dim=576, n_layer=30, n_head=9, n_kv_head=3, head_dim=64,
                         intermediate_size=1536, vocab_size=49152, rope_base=100000.0,
                         tie_word_embeddings=True, max_seq_len=8192),
    "SmolLM2-360M": dict(dim=960, n_layer=32, n_head=15, n_kv_head=5, head_dim=64,
                         intermediate_size=2560, vocab_size=49152, rope_base=100000.0,
                         tie_word_embeddings=True, max_seq_len=8192),
    "SmolLM2-1.7B": dict(dim=2048, n_layer=24, n_head=32, n_kv_head=32, head_dim=64,
                         intermediate_size=8192, vocab_size=49152, rope_base=130000.0,
                         tie_word_embeddings=True, max_seq_len=8192),
}


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """Per-pair rotation frequencies, with Llama-3.1's piecewise scaling when configured."""
    inv_freq = 1.0 / args.rope_base ** (torch.arange(0, args.head_dim, 2, dtype=torch.float32) / args.head_dim)
    s = args.rope_scaling
    if not s or s.get("type", s.get("rope_type")) in (None, "default"):
        return inv_freq
    if s.get("type", s.get("rope_type")) != "llama3":
        raise ValueError(f"unsupported rope scaling {s!r}")
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly between.
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"])
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(mid, (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq, scaled)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (HF layout) on x [B, T, H, D] with cos/sin [T, D/2] or [B, T, D/2] in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # one angle for every head
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in fp32 as the reference implementations do; bf16 variance loses digits.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        qkv_dim = (args.n_head + 2 * args.n_kv_head) * args.head_dim
        self.wqkv = nn.Linear(args.dim, qkv_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache) -> Tensor:
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim), cos, sin)
        k = apply_rope(k.view(B, T, self.n_kv_head, self.head_dim), cos, sin)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        # The cache stores k/v and attends q over everything stored so far ([B, H, T, D] in and out).
        y = cache(self.layer, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(y.transpose(1, 2).reshape(B, T, q_dim))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_word_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        # Only the frequencies are precomputed: a cos/sin table for millions of positions would
        # cost GiBs of GPU memory, which is what offloading the KV cache is meant to save.
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def forward(self, tokens: Tensor, input_pos: Tensor, cache, last_only: bool = False) -> Tensor:
        """tokens [B, T] at positions input_pos [T] (every row alike) or [B, T] (each row its own, as
        when questions of different lengths are decoded together); returns logits [B, T or 1, vocab] in fp32.

        `last_only` keeps just the last position's logits: during chunked prefill the full
        [T, vocab] logits would be the largest activation of all.
        """
        angles = input_pos.float()[..., None] * self.inv_freq
        cos, sin = angles.cos(), angles.sin()
        x = self.tok_embeddings(tokens)
        for block in self.layers:
            x = block(x, cos, sin, cache)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        head = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(x, head).float()
