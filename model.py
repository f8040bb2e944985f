"""A Llama-family transformer in plain PyTorch (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, SmolLM2,
Gemma-2). The families differ in a few switches of ModelArgs, each named after what it does.

The model never stores keys and values: each attention layer computes q/k/v and hands them to a
cache object (see offload.py), which stores them wherever its policy says and returns the attention
output. That is what lets the KV cache live in CPU RAM without the model knowing.
"""
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


# The MLP's gate activation: SwiGLU (Llama) or GeGLU with tanh-approximate GELU (Gemma).
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


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
    rope_freq_factors: list[float] | None = None  # per-pair divisors of the frequencies (GGUF rope_freqs)
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm of every query and key head before RoPE
    tie_word_embeddings: bool = False
    max_seq_len: int = 8192
    # Gemma-2 (arXiv 2408.00118, Sec. 2)
    embedding_scale: float = 1.0  # embeddings times this (Gemma: sqrt(dim), rounded to the dtype)
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight): Gemma stores weight - 1
    sandwich_norm: bool = False  # a norm after attention and after the MLP too, before the residual sum
    mlp_activation: str = "silu"  # of the gate: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power, not head_dim's
    attn_softcap: float | None = None  # scores become cap * tanh(scores / cap) before the softmax
    final_softcap: float | None = None  # the same for the logits
    # Sliding-window attention (Mistral, Gemma-2's local layers): in these layers a query sees only
    # itself and the sliding_window - 1 tokens before it.
    sliding_window: int | None = None
    sliding_layers: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.mlp_activation not in ACTIVATIONS:
            raise ValueError(f"unknown mlp_activation {self.mlp_activation!r}; known: {', '.join(ACTIVATIONS)}")
        if self.sliding_layers and not (self.sliding_window and self.sliding_window >= 1):
            raise ValueError(f"sliding_layers {self.sliding_layers} need a sliding_window >= 1")
        if not all(0 <= l < self.n_layer for l in self.sliding_layers):
            raise ValueError(f"sliding_layers {self.sliding_layers} are not all layers of {self.n_layer}")

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None when it attends to the whole context."""
        return self.sliding_window if layer in self.sliding_layers else None

    @property
    def global_layers(self) -> list[int]:
        """The layers that attend to the whole context: their KV grows with it (the others' does not)."""
        return [l for l in range(self.n_layer) if l not in self.sliding_layers]

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

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
        # Sliding-window layers are not counted: their KV stops growing at the window.
        return 2 * len(self.global_layers) * self.n_kv_head * self.head_dim * dtype.itemsize


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
    "Qwen3-8B": dict(dim=4096, n_layer=36, n_head=32, n_kv_head=8, intermediate_size=12288,
                     vocab_size=151936, norm_eps=1e-6, rope_base=1000000.0, qk_norm=True, max_seq_len=40960),
    "Gemma-2-9B": dict(dim=3584, n_layer=42, n_head=16, n_kv_head=8, head_dim=256, intermediate_size=14336,
                       vocab_size=256000, norm_eps=1e-6, rope_base=10000.0, tie_word_embeddings=True,
                       max_seq_len=8192, embedding_scale=3584 ** 0.5, norm_offset=1.0, sandwich_norm=True,
                       mlp_activation="gelu_tanh", query_pre_attn_scalar=256, attn_softcap=50.0,
                       final_softcap=30.0, sliding_window=4096, sliding_layers=list(range(0, 42, 2))),
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
    if args.rope_freq_factors is not None:  # llama.cpp's form of Llama-3.1's scaling: theta_i / factor_i
        inv_freq = inv_freq / torch.tensor(args.rope_freq_factors, dtype=torch.float32)
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
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in fp32 as the reference implementations do; bf16 variance loses digits.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma scales in fp32, by (1 + weight), and rounds once at the end
            return (xf * (self.offset + self.weight.float())).type_as(x)
        return self.weight * xf.type_as(x)


# A few rows through a linear layer on the CPU (a verification pass of speculative decoding, a short
# prefill chunk): MKL multiplies x @ W^T for 2-16 rows at 1.5-2x the cost of one row, though both read
# the weight once; W @ x^T, the same product with the weight on the left, costs about what one row
# does (bench/NOTES.md, "The verification pass"). One row and many rows keep F.linear.
FEW_ROWS = 16


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    rows = x.shape[:-1].numel()
    if x.device.type != "cpu" or not 1 < rows <= FEW_ROWS:
        return F.linear(x, weight, bias)
    y = (weight @ x.reshape(rows, -1).mT).mT.contiguous().view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


class Linear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def softcap(x: Tensor, cap: float | None) -> Tensor:
    """Gemma-2's soft cap: cap * tanh(x / cap), smooth and bounded by cap (identity when cap is None)."""
    return x if cap is None else torch.tanh(x / cap) * cap


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        qkv_dim = (args.n_head + 2 * args.n_kv_head) * args.head_dim
        self.wqkv = Linear(args.dim, qkv_dim, bias=args.qkv_bias)
        self.wo = Linear(args.n_head * args.head_dim, args.dim, bias=False)
        # Qwen3: one norm over head_dim for the queries and one for the keys, shared by the heads
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache) -> Tensor:
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q, k = q.view(B, T, self.n_head, self.head_dim), k.view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        # The cache stores k/v and attends q over everything stored so far ([B, H, T, D] in and out);
        # the layer's scale, soft cap and window are the cache's to apply (offload.py).
        y = cache(self.layer, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(y.transpose(1, 2).reshape(B, T, q_dim))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.intermediate_size, bias=False)  # gate
        self.w3 = Linear(args.dim, args.intermediate_size, bias=False)  # up
        self.w2 = Linear(args.intermediate_size, args.dim, bias=False)  # down
        self.activation = ACTIVATIONS[args.mlp_activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.activation(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        norm = lambda: RMSNorm(args.dim, args.norm_eps, args.norm_offset)
        self.attention_norm = norm()
        self.attention = Attention(args, layer)
        self.ffn_norm = norm()
        self.feed_forward = FeedForward(args)
        self.post_attention_norm = norm() if args.sandwich_norm else None
        self.post_ffn_norm = norm() if args.sandwich_norm else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache) -> Tensor:
        a = self.attention(self.attention_norm(x), cos, sin, cache)
        if self.post_attention_norm is not None:
            a = self.post_attention_norm(a)
        h = x + a
        m = self.feed_forward(self.ffn_norm(h))
        if self.post_ffn_norm is not None:
            m = self.post_ffn_norm(m)
        return h + m


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.norm_offset)
        self.output = None if args.tie_word_embeddings else Linear(args.dim, args.vocab_size, bias=False)
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
        if self.args.embedding_scale != 1.0:
            x = x * torch.tensor(self.args.embedding_scale, dtype=x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, cache)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        logits = linear(x, self.tok_embeddings.weight) if self.output is None else self.output(x)
        return softcap(logits.float(), self.args.final_softcap)
