"""Weight-only quantization: each linear layer of the transformer blocks holds its weight in int8 (one
scale per output channel) or int4 (a scale and a zero per group of 32 inputs), and computes in the
activation dtype.

    model, tokenizer = load_model(checkpoint, device="cuda", dtype=torch.bfloat16, weights="int8")

This changes the model (its weights are rounded), not the method: the attention over the KV cache is
as exact as before, and every cache policy gives the standard cache's result for the same quantized
model. What it buys is GPU memory: int8 halves bf16 weights, and the planner turns the room freed into
resident KV heads (paper Sec. 4.3), which need no transfer per token.

The embedding and the output layer stay in the model dtype: the embedding is read one row per token,
so quantizing it would save memory but no time, and the logits are the layer where rounding shows
most (bench/NOTES.md item 18 measures both).

The stored form (a quantized checkpoint: docs/checkpoint-format.md) is the same on every device:
    int8: weight int8 [out, in], scales fp32 [out]                     w = q * scale
    int4: weight uint8 [out, in/2], two 4-bit q per byte, the even input in the high nibble;
          scales and zeros fp32 [out, in/group]                        w = (q - 8) * scale + zero
At load, int4 weights are repacked into the layout of PyTorch's int4 kernel where one is used.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from errors import UsageError

WEIGHTS = ("int8", "int4")
GROUP_SIZE = 32  # the inputs sharing an int4 scale and zero: GGUF's Q4 block, the finest PyTorch's kernels take
GROUP_SIZES = (32, 64, 128)  # what _weight_int4pack_mm takes
PARTS = {"int8": ("weight", "scales"), "int4": ("weight", "scales", "zeros")}  # a quantized linear's stored tensors
LINEARS = re.compile(r"layers\.\d+\.(attention\.(wqkv|wo)|feed_forward\.w[123])")  # the quantized layers

# The kernels chosen per device and dtype (bench/NOTES.md item 18 has the measurements):
# - PyTorch's CPU kernels (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) are vectorized for bf16
#   activations only; for a few rows they beat a bf16 matmul, for a prefill chunk dequantizing first
#   is faster. In fp32 they run 5-10x slower than a dequantize-and-matmul, which fp32 uses.
# - On CUDA int4 takes the bf16 tinygemm kernel (_weight_int4pack_mm, compute capability 8.0+); int8
#   dequantizes and multiplies (gpt-fast's form, which torch.compile fuses into one kernel).
FEW_ROWS = 16


# --- quantizing a weight, and the reference that undoes it ------------------------------------------

def quantize(w: Tensor, mode: str, group_size: int = GROUP_SIZE) -> dict[str, Tensor]:
    """A float weight [out, in] in its stored form (see the module docstring), rounded to nearest."""
    w = w.float()
    if mode == "int8":  # symmetric: the row's largest |w| maps to 127
        scales = w.abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        return {"weight": (w / scales[:, None]).round().clamp(-128, 127).to(torch.int8), "scales": scales}
    out, n_in = w.shape
    groups = w.reshape(out, n_in // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)  # asymmetric: a group's [min, max] spans the 16 levels
    scales = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = ((groups - low[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8)
    return {"weight": pack_int4(q.reshape(out, n_in)), "scales": scales, "zeros": low + 8 * scales}


def dequantize(parts: dict[str, Tensor], dtype=torch.float32) -> Tensor:
    """The weight [out, in] that stored `parts` stand for, in `dtype` (the reference every kernel is tested
    against, and the fp32 path's matmul operand)."""
    if "zeros" not in parts:
        return parts["weight"].to(dtype) * parts["scales"].to(dtype)[:, None]
    q = unpack_int4(parts["weight"])
    out, groups = parts["scales"].shape
    q = q.reshape(out, groups, -1).to(dtype)
    w = (q - 8) * parts["scales"].to(dtype)[..., None] + parts["zeros"].to(dtype)[..., None]
    return w.reshape(out, -1)


def pack_int4(q: Tensor) -> Tensor:
    """4-bit values [out, in] (uint8, 0..15) two to a byte [out, in/2], the even input in the high nibble."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def unpack_int4(packed: Tensor) -> Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1)


# --- the quantized layers ---------------------------------------------------------------------------

class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + bias, with q int8 [out, in] and one scale per output channel."""

    def __init__(self, weight: Tensor, scales: Tensor, bias: Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[:-1].numel()
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and rows <= FEW_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, -1).contiguous(), self.weight, self.scales)
            y = y.view(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """y = x @ ((q - 8) * scale + zero)^T + bias, with a scale and a zero per group of inputs. `kernel`
    says whether `weight` holds q in the layout of PyTorch's int4 kernel for this device, or in the stored
    form, which each call dequantizes (int4_kernel chooses; the measurements are above FEW_ROWS)."""

    def __init__(self, parts: dict[str, Tensor], bias: Tensor | None, device: torch.device, dtype: torch.dtype):
        super().__init__()
        out, n_in = parts["weight"].shape[0], 2 * parts["weight"].shape[1]
        self.group_size = n_in // parts["scales"].shape[1]
        self.kernel = int4_kernel(device, dtype)
        if self.kernel is None:
            self.register_buffer("weight", parts["weight"].to(device))
            self.register_buffer("scales", parts["scales"].to(device, dtype))
            self.register_buffer("zeros", parts["zeros"].to(device, dtype))
        else:  # the kernels' layout: scales and zeros [in/group, out, 2]
            sz = torch.stack([parts["scales"], parts["zeros"]], dim=-1).transpose(0, 1)
            self.register_buffer("scales_and_zeros", sz.contiguous().to(device, dtype))
            if self.kernel == "cuda":
                self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack(
                    parts["weight"].to(device), inner_k_tiles(n_in)))
            else:
                q = unpack_int4(parts["weight"]).to(torch.int32)
                self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1).to(device))
        self.register_buffer("bias", bias)
        self.out_features = out

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[:-1].numel()
        if self.kernel == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x.reshape(rows, -1).contiguous(), self.weight, self.group_size,
                                                   self.scales_and_zeros)
        elif self.kernel == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(rows, -1).contiguous(), self.weight,
                                                           self.group_size, self.scales_and_zeros)
        else:
            y = F.linear(x, dequantize({"weight": self.weight, "scales": self.scales, "zeros": self.zeros}, x.dtype))
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantized_linear(mode: str, parts: dict[str, Tensor], bias: Tensor | None, device, dtype) -> nn.Module:
    """A quantized layer on `device` from its stored `parts` (on any device)."""
    bias = None if bias is None else bias.to(device, dtype)
    if mode == "int8":
        return Int8Linear(parts["weight"].to(device), parts["scales"].to(device, dtype), bias)
    return Int4Linear(parts, bias, device, dtype)


def int4_kernel(device: torch.device, dtype: torch.dtype) -> str | None:
    """Which int4 kernel runs on `device` in `dtype`: "cuda", "cpu", or None (dequantize-and-matmul)."""
    if device.type == "cuda":
        return "cuda"  # check_mode refused what it cannot run
    return "cpu" if dtype == torch.bfloat16 else None


def inner_k_tiles(n_in: int) -> int:
    """tinygemm's tiling of the inputs: the largest of 8, 4, 2 tiles of 16 that divides them."""
    return next(t for t in (8, 4, 2) if n_in % (16 * t) == 0)


# --- which model, which bytes, refused where ---------------------------------------------------------

def quantized_layers(model: nn.Module) -> list[str]:
    """The names of the linear layers `weights` quantizes (the blocks' five; not the embedding or the output)."""
    return [name for name, _ in model.named_modules() if LINEARS.fullmatch(name)]


def check_mode(weights: str | None, device: torch.device, dtype: torch.dtype):
    """Refuse, before any conversion or loading, an unknown mode and int4 where PyTorch has no kernel."""
    if weights is None or weights == "int8":
        return
    if weights not in WEIGHTS:
        raise UsageError(f"unknown weights {weights!r}; choose {' or '.join(WEIGHTS)} (or none for the model "
                         f"dtype)", ("weights",))
    if device.type == "cuda" and dtype != torch.bfloat16:
        raise UsageError(f"int4 weights on CUDA need dtype bfloat16: PyTorch's int4 kernel (_weight_int4pack_mm) "
                         f"takes bf16 only, not {str(dtype).removeprefix('torch.')}", ("weights", "dtype"))
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        raise UsageError(f"int4 weights need a GPU of compute capability 8.0 or more for PyTorch's int4 kernel; "
                         f"{torch.cuda.get_device_name(device)} has "
                         f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}: use int8", ("weights",))
    if device.type not in ("cuda", "cpu"):
        raise UsageError(f"int4 weights have no PyTorch kernel on {device}: use int8", ("weights",))


def check_checkpoint(weights: str | None, stored: tuple | None, model: nn.Module, device: torch.device,
                     dtype: torch.dtype) -> tuple[str | None, int]:
    """The (mode, group size) a checkpoint loads with, refused before its weights are read when it cannot:
    a quantized checkpoint asked for another mode, int4 without a kernel, or layers of `model` (the
    meta model, a rank's shard under tensor parallelism) whose shapes the int4 kernels cannot take.
    `stored` is the checkpoint's (mode, group size), None for float weights."""
    if stored is not None and weights not in (None, stored[0]):
        raise UsageError(f"the checkpoint holds {stored[0]} weights, not {weights}: convert the original with "
                         f"--quantize {weights}, or leave weights out", ("weights",))
    mode, group = (weights, GROUP_SIZE) if stored is None else stored
    check_mode(mode, device, dtype)
    rows = 16 if int4_kernel(device, dtype) == "cpu" else 8  # the kernels' tiles of output channels
    if mode == "int4" and (bad := untiled_layer(model, group, rows)):
        raise UsageError(f"{bad[0]} has {bad[1]} outputs and {bad[2]} inputs; int4 weights need inputs in whole "
                         f"groups of {group} and outputs in multiples of {rows}: use int8", ("weights",))
    return mode, group


def untiled_layer(model: nn.Module, group_size: int, rows: int = 1) -> tuple[str, int, int] | None:
    """The first quantized layer of `model` (meta) whose inputs are not whole int4 groups, or whose outputs
    are not whole tiles of `rows`, as (name, outputs, inputs); None when every layer fits. (Groups are
    32 inputs or more, which also makes whole tiles of tinygemm's 32 inputs.)"""
    for name in quantized_layers(model):
        out, n_in = model.get_submodule(name).weight.shape
        if n_in % group_size or out % rows:
            return name, out, n_in
    return None


def stored_shapes(model: nn.Module, stored: tuple | None) -> dict[str, list[int]]:
    """The name and shape of each tensor a checkpoint of `model` (meta) holds, its weights `stored` as (mode,
    group size) or None (float)."""
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    if stored is None:
        return shapes
    mode, group = stored
    for name in quantized_layers(model):
        out, n_in = shapes.pop(f"{name}.weight")
        bias = shapes.pop(f"{name}.bias", None)
        shapes[f"{name}.weight"] = [out, n_in] if mode == "int8" else [out, n_in // 2]
        shapes[f"{name}.scales"] = [out] if mode == "int8" else [out, n_in // group]
        if mode == "int4":
            shapes[f"{name}.zeros"] = [out, n_in // group]
        if bias is not None:
            shapes[f"{name}.bias"] = bias
    return shapes


def stored_bytes(shape, mode: str | None, dtype: torch.dtype, group_size: int = GROUP_SIZE) -> int:
    """The bytes a linear weight of `shape` [out, in] takes on the device as `mode` (None: float in dtype)."""
    out, n_in = shape
    if mode is None:
        return out * n_in * dtype.itemsize
    if mode == "int8":
        return out * n_in + out * dtype.itemsize
    return out * n_in // 2 + 2 * out * (n_in // group_size) * dtype.itemsize


def weight_bytes(model: nn.Module, mode: str | None, dtype: torch.dtype, group_size: int = GROUP_SIZE) -> int:
    """The bytes of `model`'s (meta) weights once loaded as `mode`, without allocating them."""
    quantized = {f"{name}.weight" for name in quantized_layers(model)}
    return sum(stored_bytes(t.shape, mode, dtype, group_size) if name in quantized else t.numel() * dtype.itemsize
               for name, t in model.state_dict().items())


def describe(model: nn.Module) -> dict:
    """What a loaded model's weights are (int8, int4, or their float dtype) and the bytes they take on its
    device (under tensor parallelism, this rank's), as generate()'s stats give them."""
    kinds = {type(m) for m in model.modules()}
    kind = ("int8" if Int8Linear in kinds else "int4" if Int4Linear in kinds
            else str(model.tok_embeddings.weight.dtype).removeprefix("torch."))
    return {"weights": kind, "weights_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values())}
