"""A KV cache on disk: prefill a long prompt once, and let later runs reuse its longest common prefix.

    reused, stored = load_prompt_cache(cache, "book.kv", model, ids)  # into any policy's memory
    logits = prefill(model, cache, ids[reused:])                      # only the rest is computed
    save_prompt_cache(cache, "book.kv", model, ids)                   # the prompt's KV, for next time

The file is safetensors (docs/prompt-cache-format.md): the prompt's token ids, and per layer its K and V
token-major, [tokens, 2, n_kv_head, head_dim], so that the KV of a prefix is one contiguous range of
each layer. Its metadata names the model (a fingerprint of config and weights), the dtype, and a
CRC-32 per block of rows: a file that is foreign, truncated or corrupt is refused before a row of it
can change an answer. Loading streams a block of rows at a time into the cache's own memory; saving
writes to a temporary file that replaces FILE only once it is complete.

A path is the user's: nothing is ever written over but an empty file or a prompt cache of this model,
dtype and format version (whose data may be truncated or corrupt). A text, another safetensors file
or another model's cache is refused before any work (check_prompt_cache_path) and, in a run, kept.
"""
import hashlib
import json
import os
import shutil
import sys
import zlib
from dataclasses import asdict
from pathlib import Path
from time import perf_counter

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

import tensor_parallel
from errors import UsageError, end_answer_line, say
from planner import fmt_bytes

FORMAT, VERSION = "headinfer-prompt-cache", "1"
BLOCK_BYTES = 8 << 20   # rows per read, write and checksum: large sequential I/O, little extra memory
SAMPLES = 4096          # weight values per tensor in the model fingerprint
PROGRESS_DELAY_S = 2.0  # load and save show a progress bar once they have taken this long
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on its JSON header


class UnusablePromptCache(Exception):
    """The file cannot be used for this run; the message says why. The cache is left as it was, and so
    is the file: another model's, dtype's or format version's cache (or a file that is not a prompt
    cache) is never written over."""


class DamagedPromptCache(UnusablePromptCache):
    """A prompt cache of ours that is empty, truncated or corrupt: none of it is used, and saving the
    prompt's KV may replace it."""


def fingerprint(model) -> str:
    """What a KV cache depends on: the config and the weights. Hashing every weight would cost
    seconds per run for an 8B model, so each tensor contributes its name, shape and SAMPLES evenly
    spaced values (as float32, so a bf16 checkpoint loaded in fp32 is still the same weights)."""
    h = hashlib.sha256(json.dumps(asdict(model.args), sort_keys=True).encode())
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        n = min(SAMPLES, flat.numel())  # integer positions: the same on every device
        idx = (torch.arange(n) * (flat.numel() - 1) // max(n - 1, 1)).to(flat.device)
        h.update(f"{name}:{list(t.shape)}".encode())
        h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _block_tokens(args, dtype) -> int:
    row_bytes = 2 * args.n_kv_head * args.head_dim * dtype.itemsize  # K and V of one token in one layer
    return max(1, BLOCK_BYTES // row_bytes)


def _crc(t: torch.Tensor) -> str:
    return f"{zlib.crc32(t.contiguous().view(torch.uint8).numpy()):08x}"


def _header(path: Path) -> dict | None:
    """The `__metadata__` of a file that begins as a safetensors file does ({} without any), read from
    its header alone (so also when its data is truncated); None for any other file. Safetensors
    begins with the header's length (8 bytes, little-endian), then the header, JSON."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n <= MAX_HEADER_BYTES else None
    except (OSError, ValueError):  # ValueError: not JSON, not UTF-8
        return None
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


def _not_ours(meta: dict | None) -> str | None:
    """Why a file whose header is `meta` (_header's) is not a prompt cache; None when it is one."""
    if meta is None:
        return "is not a prompt cache (not a safetensors file)"
    return "is not a prompt cache (a safetensors file of other tensors)" if meta.get("format") != FORMAT else None


def check_prompt_cache_path(path, read_only: bool = False):
    """Refuse, before a long run, a path that could never be read or written as a prompt cache, or
    whose file is not one (a text, a checkpoint, another safetensors file: the user's data)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"the prompt cache {path} is a directory; give a file name", ("prompt_cache",))
    if path.is_file() and path.stat().st_size and (why := _not_ours(_header(path))):
        raise UsageError(f"the prompt cache {path} exists and {why}; it is left as it was: give the prompt cache "
                         f"a new file name", ("prompt_cache",))
    if not read_only and not path.parent.is_dir():
        raise UsageError(f"the prompt cache {path} cannot be written: {path.parent} is not a directory",
                         ("prompt_cache",))
    if not read_only and not os.access(path.parent, os.W_OK):
        raise UsageError(f"the prompt cache {path} cannot be written: {path.parent} is not writable",
                         ("prompt_cache",))


def check_prompt_cache(args, path, read_only: bool):
    """A prompt cache can be used (None: none is asked for): its path (check_prompt_cache_path), and a
    model without sliding-window layers (the file saves every position of every layer, and such a
    layer no longer keeps the positions before its window)."""
    if path is None:
        return
    check_prompt_cache_path(path, read_only)
    if args.sliding_layers:
        raise UsageError(f"a prompt cache does not work yet with sliding-window layers: {len(args.sliding_layers)} of "
                         f"this model's layers keep only their last {args.sliding_window} tokens", ("prompt_cache",))


# --- loading ------------------------------------------------------------------------------------

def load_prompt_cache(cache, path, model, ids, progress: bool = False) -> tuple[int, int]:
    """Load into the empty `cache` the KV of the longest common prefix of `ids` and the tokens stored
    at `path`, keeping at least the last id for the prefill (its logits start the answer).

    Returns (reused, stored): the positions now in the cache, and the tokens the file holds (0, 0
    when there is no file). Raises UnusablePromptCache, with the cache empty again, when the file is
    not a prompt cache, or another model's, dtype's or format version's; DamagedPromptCache when it
    is empty, truncated or corrupt.
    """
    if cache.length:
        raise ValueError(f"load_prompt_cache needs an empty cache; this one holds {cache.length} positions")
    if cache.batch != 1:
        raise ValueError(f"a prompt cache holds one sequence; the cache has batch size {cache.batch}")
    path = Path(path)
    if not path.exists():
        return 0, 0
    try:
        crcs = _check_header(path, fingerprint(model), model.args, cache.dtype)
        with safe_open(path, framework="pt", device="cpu") as f:
            tokens = f.get_tensor("tokens")
            if crcs["tokens"] != [_crc(tokens)]:
                raise DamagedPromptCache("it is corrupt (the checksum of its token ids does not match)")
            reused = min(_common_prefix(tokens, ids), len(ids) - 1)
            _load_rows(f, cache, crcs, reused, progress)
    except (SafetensorError, OSError) as e:
        cache.truncate(0)
        raise DamagedPromptCache(f"it cannot be read ({e}): it is truncated or damaged") from None
    except UnusablePromptCache:
        cache.truncate(0)
        raise
    return reused, tokens.numel()


def _check_header(path: Path, model_fingerprint: str, args, dtype) -> dict:
    """The per-block checksums, once the file is known to be ours, this version, this dtype and model."""
    if path.stat().st_size == 0:
        raise DamagedPromptCache("it is empty")
    meta = _header(path)
    if why := _not_ours(meta):
        raise UnusablePromptCache(f"it {why}")
    if meta.get("version") != VERSION:
        raise UnusablePromptCache(f"it has format version {meta.get('version')}; this version reads {VERSION}")
    if meta.get("dtype") != str(dtype).removeprefix("torch."):
        raise UnusablePromptCache(f"it was written in {meta.get('dtype')}, this run uses "
                                  f"{str(dtype).removeprefix('torch.')}")
    if meta.get("model") != model_fingerprint:
        raise UnusablePromptCache("it was written by another model (its config or weights differ)")
    try:
        crcs, block = json.loads(meta["crc32"]), int(meta["block_tokens"])
    except (KeyError, ValueError, TypeError):
        crcs = block = None
    if not isinstance(crcs, dict) or "tokens" not in crcs:
        raise DamagedPromptCache("its header is corrupt")
    if block != _block_tokens(args, dtype):
        raise UnusablePromptCache(f"its rows are checksummed in blocks of {block} tokens, not "
                                  f"{_block_tokens(args, dtype)}")
    return crcs


def _common_prefix(stored: torch.Tensor, ids) -> int:
    n = min(stored.numel(), len(ids))
    differ = (stored[:n] != torch.as_tensor(ids[:n], dtype=stored.dtype)).nonzero()
    return int(differ[0]) if len(differ) else n


def _load_rows(f, cache, crcs: dict, reused: int, progress: bool):
    """Block by block, every layer's rows of the block (checked, then written), so that the cache's
    length grows a block at a time (write's rule: no gap after the stored positions)."""
    n_layer, block = cache.args.n_layer, _block_tokens(cache.args, cache.dtype)
    with tqdm(total=reused, desc="loading prompt cache", unit="tok", file=sys.stderr, disable=not progress,
              delay=PROGRESS_DELAY_S) as bar:
        for i, start in enumerate(range(0, reused, block)):
            for layer in range(n_layer):
                name = f"layers.{layer}"
                rows = f.get_slice(name)[start:start + block]  # the whole block: its checksum covers it
                if i >= len(crcs.get(name, [])) or _crc(rows) != crcs[name][i]:
                    raise DamagedPromptCache(f"it is corrupt (the checksum of {name}, tokens {start}-"
                                              f"{start + len(rows)}, does not match)")
                rows = rows[:reused - start].permute(1, 2, 0, 3)[:, None]  # [2, B=1, n_kv, T, D]
                cache.write(layer, start, rows[0], rows[1])
            bar.update(min(block, reused - start))


def _up_to_date(reused: int, stored: int, ids) -> bool:
    """After load_prompt_cache returned (reused, stored): the file holds `ids` up to their last token
    (which a load never takes), so writing `ids` again would not let a later run reuse more of them."""
    return (reused, stored) == (len(ids) - 1, len(ids))


# --- saving -------------------------------------------------------------------------------------

def save_prompt_cache(cache, path, model, ids, progress: bool = False) -> int:
    """Write the KV of `ids` (the first len(ids) positions of `cache`) to `path`; returns its size.

    The file is written next to `path` under a temporary name and renamed over it once complete and
    synced, so an interrupted or failed save leaves `path` as it was. Raises UsageError (nothing
    written) when the disk has too little space, the write fails, or `path` holds anything but an
    empty file or a prompt cache of this model, dtype and format version (damaged or not).
    """
    path, T = Path(path), len(ids)
    if not 0 < T <= cache.length:
        raise ValueError(f"cannot save {T} positions of a cache holding {cache.length}")
    if cache.batch != 1:
        raise ValueError(f"a prompt cache holds one sequence; the cache has batch size {cache.batch}")
    args, dtype, model_fingerprint = cache.args, cache.dtype, fingerprint(model)
    _check_replaceable(path, model_fingerprint, args, dtype)
    block = _block_tokens(args, dtype)
    n_blocks = -(-T // block)
    tokens = torch.tensor(ids, dtype=torch.int64)
    layer_shape = [T, 2, args.n_kv_head, args.head_dim]
    layer_bytes = T * 2 * args.n_kv_head * args.head_dim * dtype.itemsize
    placeholder = {"tokens": ["0" * 8]} | {f"layers.{l}": ["0" * 8] * n_blocks for l in range(args.n_layer)}
    meta = {"format": FORMAT, "version": VERSION, "model": model_fingerprint,
            "dtype": str(dtype).removeprefix("torch."), "block_tokens": str(block), "device": str(cache.device)}

    def header(crcs) -> bytes:  # the same length for any checksums: written first, rewritten at the end
        entries = {"__metadata__": meta | {"crc32": json.dumps(crcs)},
                   "tokens": {"dtype": "I64", "shape": [T], "data_offsets": [0, tokens.nbytes]}}
        offset = tokens.nbytes
        for l in range(args.n_layer):
            entries[f"layers.{l}"] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": layer_shape,
                                      "data_offsets": [offset, offset + layer_bytes]}
            offset += layer_bytes
        text = json.dumps(entries).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        return len(text).to_bytes(8, "little") + text

    size = len(header(placeholder)) + tokens.nbytes + args.n_layer * layer_bytes
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # hidden, and never a name that loads
    try:
        free = shutil.disk_usage(path.parent).free
        if size > free:
            raise UsageError(f"the prompt cache {path} needs {fmt_bytes(size)} but {path.parent} has "
                             f"{fmt_bytes(free)} free; it was not saved", ("prompt_cache",))
        with open(tmp, "wb") as out:
            out.write(header(placeholder))
            crcs = {"tokens": [_crc(tokens)]}
            out.write(tokens.numpy().tobytes())
            with tqdm(total=args.n_layer * T, desc="saving prompt cache", unit="tok", file=sys.stderr,
                      disable=not progress, delay=PROGRESS_DELAY_S) as bar:
                for layer in range(args.n_layer):
                    crcs[f"layers.{layer}"] = []
                    for start in range(0, T, block):
                        rows = _rows(cache, layer, start, min(start + block, T))
                        crcs[f"layers.{layer}"].append(_crc(rows))
                        out.write(rows.view(torch.uint8).numpy())
                        bar.update(len(rows))
            out.seek(0)
            out.write(header(crcs))
            out.flush()
            os.fsync(out.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except OSError as e:
        raise UsageError(f"the prompt cache {path} was not saved: {e.strerror or e}", ("prompt_cache",)) from None
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; after a failure or Ctrl-C, the partial file
    return size


def _check_replaceable(path: Path, model_fingerprint: str, args, dtype):
    """Refuse to write over the user's data: a file that is not a prompt cache, or another model's,
    dtype's or format version's. An empty file, or a damaged cache of this model, may be replaced."""
    if not path.is_file():
        return
    try:
        _check_header(path, model_fingerprint, args, dtype)
    except DamagedPromptCache:
        pass
    except UnusablePromptCache as e:
        raise UsageError(f"the prompt cache {path} was not saved: {e}, and it is kept; give another file name",
                         ("prompt_cache",)) from None


def _rows(cache, layer: int, start: int, end: int) -> torch.Tensor:
    """Positions [start, end) of a layer in the file's layout, [T, 2, n_kv_head, head_dim], in host RAM."""
    k, v = cache.read(layer, start, end, device="cpu")  # [1, n_kv, T, D]
    return torch.stack((k[0], v[0])).permute(2, 0, 1, 3).contiguous()


# --- for a run: a file that cannot be used or saved is one line on stderr, not a failed run -----------

def load_or_note(cache, path, model, prompt_ids, progress: bool, read_only: bool) -> bool:
    """load_prompt_cache, or one line on stderr saying why the file is not used, and nothing loaded;
    cache.length then says how many prompt positions were loaded. Returns whether to save_or_warn the
    prompt's KV after the answer: the file does not hold the prompt up to its last token yet, the run
    is not read_only, and the file is not another model's, dtype's or format version's (never
    written over). Under tensor parallelism each rank loads its own file (rank_file), and all keep the
    positions that every rank could load: the prefill after them is one computation of all ranks together."""
    path = tensor_parallel.rank_file(path)
    try:
        (reused, stored), note, writable = load_prompt_cache(cache, path, model, prompt_ids, progress), None, True
    except UnusablePromptCache as e:
        (reused, stored), writable = (0, 0), isinstance(e, DamagedPromptCache)
        fate = "" if read_only else (", and the file is replaced after the answer" if writable else
                                     "; the file is kept, not saved over (give --prompt-cache another file name)")
        note = f"note: prompt cache {path} not used: {e}; it is computed again{fate}"
    common = tensor_parallel.fewest_over_ranks(reused)
    if common < reused:
        cache.truncate(common)
    if note is not None:
        say(note)
    elif progress:
        fewest = " (the fewest that every rank has)" if common < reused else ""
        say(f"prompt cache {path}: " + (f"{common} of {len(prompt_ids)} prompt tokens reused{fewest}" if stored else
                                        "none yet; it is written after this run"))
    return writable and not read_only and not _up_to_date(common, stored, prompt_ids)


def save_or_warn(cache, path, model, prompt_ids, progress):
    """save_prompt_cache (this rank's file, under tensor parallelism); when the disk is full or the
    write fails, one line on stderr and the old file as it was: the answer has been given, only the
    next run's reuse is lost."""
    path = tensor_parallel.rank_file(path)
    end_answer_line()  # a save's progress bar, past a few seconds, starts on a line of its own
    try:
        t0 = perf_counter()
        size = save_prompt_cache(cache, path, model, prompt_ids, progress)
        if progress:
            say(f"prompt cache {path}: {len(prompt_ids)} tokens saved ({fmt_bytes(size)} in "
                f"{perf_counter() - t0:.2f} s)")
    except UsageError as e:
        say(f"warning: {e}")
