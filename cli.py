"""generate.py's command line: its flags, what is refused before the model loads, and what it prints.

Nothing here runs a model. generate.main reads the flags (parse_args), refuses what cannot work
before loading anything (check_flags), reads the prompt files, and gives each new token to an Answer
(the text as it streams); report() prints the rest: the text, the stats line on stderr, the --json
object. fail() is the one-line exit of every error.
"""
import argparse
import json
import os
import secrets
import sys
from pathlib import Path

import torch

import errors
import tensor_parallel
from errors import UsageError, end_answer_line, say, write_answer
from planner import CPU_PREFILL_CHUNK, DEFAULT_PREFILL_CHUNK, POLICIES, fmt_bytes
from prompt_cache import check_prompt_cache_path
from quantize import WEIGHTS
from run import check_compile
from speculative import DEFAULT_DRAFT_WINDOW, DEFAULT_K, SINKS, SPECULATE, check_speculation

DEFAULT_PROMPT = "What is the capital of France?"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- the flags ----------------------------------------------------------------------------------

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


class ArgumentParser(errors.ArgumentParser):
    def error(self, message):
        if tensor_parallel.first_to_fail():  # under torchrun every rank parses the same arguments: one says so
            super().error(message)
        sys.exit(2)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Exact LLM inference with the KV cache offloaded head by head (HeadInfer).")
    p.add_argument("--checkpoint", metavar="SRC",
                   help="a converted checkpoint dir, a Hugging Face model dir, a .gguf file or a hub id (the last "
                        "three are converted once into ~/.cache/headinfer; default: the embedded "
                        "SmolLM2-135M-Instruct)")
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
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the decode step; the first step then takes up to a minute. MODE: default or "
                        "max-autotune-no-cudagraphs; the CUDA-graph modes (reduce-overhead, max-autotune) are refused "
                        "(default: off)")
    p.add_argument("--speculate", choices=SPECULATE, default=None,
                   help="speculative decoding, the same tokens several per pass: lookup (drafts copied from the prompt "
                        "and answer) or self (the model over a small cache of --draft-window tokens) (default: off)")
    p.add_argument("--draft-checkpoint", metavar="SRC",
                   help="speculative decoding with a smaller draft model of the same vocabulary, any kind "
                        "--checkpoint takes (default: none)")
    p.add_argument("--speculate-k", type=positive_int, default=DEFAULT_K, metavar="K",
                   help=f"most drafted tokens per verification pass (default: {DEFAULT_K})")
    p.add_argument("--draft-window", type=positive_int, default=DEFAULT_DRAFT_WINDOW, metavar="W",
                   help=f"tokens a self or draft-model draft attends to: {SINKS} sinks and the most recent ones "
                        f"(default: {DEFAULT_DRAFT_WINDOW})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="of the weights, activations and KV cache (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--weights", choices=WEIGHTS, default=None,
                   help="quantize the linear layers as they load: int8 (a scale per output channel) or int4 (a "
                        "scale and a zero per 32 inputs; on CUDA with --dtype bfloat16); the attention stays exact "
                        "(default: the weights in --dtype, or as a --quantize'd checkpoint stores them)")
    p.add_argument("--json", action="store_true",
                   help="print, instead of the streamed text, one JSON object per answer (the text, ids and stats) "
                        "as the only output on stdout; notes and the stats line stay on stderr (default: off)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


# --- before the run: what is refused, the settings, the prompt files --------------------------

def check_flags(opts):
    """What the flags ask for that cannot work, refused before the model loads."""
    if opts.prompt_cache_ro and opts.prompt_cache is None:
        raise UsageError("--prompt-cache-ro makes sense only with a prompt cache", ("prompt_cache",))
    if opts.interactive and str(opts.prompt_file) == "-":
        raise UsageError("with --interactive, stdin carries the turns; give the opening document as a file",
                         ("prompt_file",))
    if opts.prompt is not None and not opts.prompt.strip():
        raise UsageError("the prompt is empty", ("prompt",))
    check_compile(opts.compile)
    if opts.prompt_cache is not None:
        check_prompt_cache_is_its_own(opts)
        check_prompt_cache_path(opts.prompt_cache, opts.prompt_cache_ro)
    check_questions_flags(opts)
    check_speculation_flags(opts)


def check_speculation_flags(opts):
    """What speculative decoding does not combine with, refused before the model loads; the flags that
    would change nothing without it said so."""
    if opts.speculate is not None and opts.draft_checkpoint is not None:
        raise UsageError(f"--draft-checkpoint is its own drafter; drop --speculate {opts.speculate}",
                         ("speculate", "draft_checkpoint"))
    speculate = "draft" if opts.draft_checkpoint is not None else opts.speculate
    if speculate is None:
        for flag, given in (("--speculate-k", opts.speculate_k != DEFAULT_K),
                            ("--draft-window", opts.draft_window != DEFAULT_DRAFT_WINDOW)):
            if given:
                say(f"note: {flag} has no effect without --speculate or --draft-checkpoint")
        return
    if opts.questions_file is not None:
        raise UsageError("speculative decoding does not combine with --questions-file: its questions decode "
                         "together, one token each per step", ("speculate", "questions_file"))
    if opts.draft_checkpoint is not None and tensor_parallel.launched():
        raise UsageError("--draft-checkpoint does not run under torchrun; --speculate lookup or self do",
                         ("draft_checkpoint",))
    check_speculation(speculate, opts.speculate_k, opts.draft_window, opts.compile, None, None)


def check_prompt_cache_is_its_own(opts):
    """--prompt-cache names no file the run reads (the prompt file, the questions file, the checkpoint
    or a file in its dir): the prompt's KV is saved there after the answer, replacing what was there."""
    cache = opts.prompt_cache.resolve()
    for flag, given in (("--prompt-file", opts.prompt_file), ("--questions-file", opts.questions_file),
                        ("--checkpoint", opts.checkpoint)):
        path = Path(given).resolve() if given is not None and str(given) != "-" else None
        if path == cache or (path is not None and path.is_dir() and cache.is_relative_to(path) and cache.exists()):
            what = f"the file of {flag}" if path == cache else f"a file of {flag} {given}"
            raise UsageError(f"the prompt cache {opts.prompt_cache} is {what}, which it would replace; give the "
                             f"prompt cache a file name of its own", ("prompt_cache",))


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


def check_context(opts, args, n_tokens: int):
    """A prompt the model's context cannot hold, refused in the CLI's terms: where its text came from,
    the limit, the model and what to do (generate() would refuse it in the Python API's)."""
    if n_tokens >= args.max_seq_len:
        model = opts.checkpoint or "the embedded SmolLM2-135M-Instruct"
        raise UsageError(f"{prompt_source(opts)} has {n_tokens} tokens, but {model} has a context of "
                         f"{args.max_seq_len} tokens (its max_seq_len) for the prompt and the answer together: "
                         f"shorten the text, or use a checkpoint with a longer context", ("checkpoint",))


def prompt_source(opts) -> str:
    """Where the prompt's text came from, for a message about it."""
    file = None if opts.prompt_file is None else f"the prompt file {opts.prompt_file}"
    if str(opts.prompt_file) == "-":
        file = "stdin (--prompt-file -)"
    if opts.questions_file is not None:
        return " with ".join(filter(None, [file, "the longest question of --questions-file"]))
    if file is None:
        return "the prompt of --prompt" if opts.prompt is not None else "the default prompt"
    if opts.interactive:
        return f"the opening, {file},"
    return f"{file} with the question of --prompt" if opts.prompt is not None else file


def join_tensor_parallel(opts, device: torch.device) -> tensor_parallel.TensorParallel:
    """Under torchrun: this process becomes one rank of the group, and only rank 0 prints (the others'
    failures are still said once, by fail())."""
    if opts.interactive:
        raise UsageError("--interactive does not run under torchrun: a chat reads its turns from one terminal",
                         ("interactive",))
    tp = tensor_parallel.init(device)
    if tp.rank != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    if opts.temperature > 0 and opts.seed is None:  # every rank must draw the same tokens: one seed for all
        opts.seed = tensor_parallel.from_rank0(lambda: secrets.randbits(63))
    return tp


def settings(opts, device: torch.device) -> tuple[torch.dtype, str]:
    """--dtype and --offload, or the device's defaults; a note for each flag that changes nothing
    here (an offload policy on the CPU has no GPU to stream to; a seed draws nothing when decoding greedily)."""
    dtype = DTYPES[opts.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    offload = opts.offload or ("head" if device.type == "cuda" else "none")
    if offload != "none" and device.type != "cuda":
        say(f"note: no CUDA device; --offload {offload} runs its CPU path (same algorithm, no streams)")
    if opts.seed is not None and opts.temperature == 0:
        say("note: --seed has no effect: decoding is greedy at --temperature 0")
    return dtype, offload


def use_chat(opts, tokenizer) -> bool:
    """Whether prompts go through the chat template: --chat / --no-chat, else when the checkpoint has one."""
    if tokenizer is None:
        raise UsageError(f"{opts.checkpoint} has no tokenizer files; use the Python API with token ids")
    chat = tokenizer.chat_template is not None if opts.chat is None else opts.chat
    if chat and tokenizer.chat_template is None:
        raise UsageError(f"{opts.checkpoint} has no chat template; drop --chat")
    return chat


def read_text(path: Path, what: str, option: str) -> str:
    """A UTF-8 file's text (- reads stdin), or one line saying why it cannot be had. UTF-8 allows NUL
    bytes, but no text holds them: a file with any is binary (and would be thousands of blank tokens)."""
    name = "stdin" if str(path) == "-" else f"the {what} {path}"
    try:
        data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"{name} does not exist", (option,)) from None
    except UnicodeDecodeError:
        raise UsageError(f"{name} is not UTF-8 text", (option,)) from None
    except OSError as e:
        raise UsageError(f"cannot read {name}: {e.strerror}", (option,)) from None
    if "\0" in text:
        raise UsageError(f"{name} is not text: it holds NUL bytes (at byte {data.index(0)})", (option,))
    if not text.strip():
        raise UsageError(f"{name} is empty" if not text else f"{name} holds only whitespace", (option,))
    return text


def read_prompt_file(opts) -> str | None:
    return None if opts.prompt_file is None else read_text(opts.prompt_file, "prompt file", "prompt_file")


def read_questions(opts) -> list[str] | None:
    """The questions of --questions-file: its non-blank lines."""
    if opts.questions_file is None:
        return None
    text = read_text(opts.questions_file, "questions file", "questions_file")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_turns(first: str | None):
    """The turns of -i: the first question (--prompt), then one per stdin line, stripped, until EOF;
    a "> " prompt on a terminal. Ctrl-C while waiting for a line ends nothing: it says how to end."""
    if first:
        yield first
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            say("\n(Ctrl-C stops an answer; /exit or Ctrl-D ends the session)")
            continue
        if not line:  # EOF
            return
        yield line.strip()


# --- what is printed ----------------------------------------------------------------------------

class Answer:
    """The new ids of an answer, and (show) its text on stdout as it comes, whole characters only."""

    def __init__(self, tokenizer, show: bool):
        self.ids, self.stream, self.show = [], tokenizer.decode_stream(), show

    def add(self, token_id: int):
        self.ids.append(token_id)
        if self.show:
            write_answer(self.stream.add([token_id]))


def report(opts, tokenizer, answer: Answer, stats):
    if not stats:  # failed before generation started
        return
    new_ids, text = answer.ids, tokenizer.decode(answer.ids)
    if not opts.json:
        write_answer(text[len(answer.stream.text):])  # what the stream held back (a split character)
        end_answer_line()
    if stats["interrupted"]:
        say("interrupted")
    say(stats_line(stats, f"prompt {stats['prompt_tokens']} tokens", len(new_ids)))
    if opts.json:
        print(json.dumps({"text": text, "new_tokens": new_ids, **stats}), flush=True)


def stats_line(stats, what: str, new_tokens: int, rate_of: str = "") -> str:
    """The one-line summary on stderr: what was prefilled, how fast, and where the KV went (under
    tensor parallelism, one rank's share: each holds 1/N of the heads)."""
    prefill = f"{stats['prefill_s']:.2f} s" if stats["prefill_s"] is not None else "unfinished"
    first = f", first step {stats['first_step_s']:.2f} s" if stats["first_step_s"] is not None else ""
    rate = f", then {stats['decode_tok_s']:.1f} tok/s{rate_of}" if stats["decode_tok_s"] else ""
    peak = f", peak GPU {fmt_bytes(stats['peak_gpu_mem_bytes'])}" if stats["peak_gpu_mem_bytes"] else ""
    reused = f" ({stats['reused_tokens']} reused)" if stats["reused_tokens"] else ""
    where = (f"{fmt_bytes(stats['kv_bytes_gpu'])} on GPU / {fmt_bytes(stats['kv_bytes_cpu'])} in host RAM"
             if stats["plan"]["device"].startswith("cuda") else f"{fmt_bytes(stats['kv_bytes_cpu'])} in RAM (CPU run)")
    ranks = f" per rank ({stats['tp_ranks']} ranks)" if stats["tp_ranks"] > 1 else ""
    passes = (f" ({stats['tokens_per_pass']:.2f} tokens per pass, {stats['speculate']} drafts, "
              f"k={stats['speculate_k']})" if stats.get("tokens_per_pass") else "")
    weights = f"weights {stats['weights']} {fmt_bytes(stats['weights_bytes'])}"
    return (f"{what}{reused}, prefill {prefill}, {plural(new_tokens, 'new token')}{first}{rate}{passes}; "
            f"{weights}, offload={stats['offload']}, KV {where}{ranks}{peak}")


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


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
        say("interrupted")
    say(stats_line(stats, f"{len(questions)} questions over a shared prefix of {stats['prefix_tokens']} tokens",
                   sum(stats["answer_tokens"]), " over all questions"))


def fail(line: str):
    """Exit with one line on stderr; in a tensor-parallel group only the first rank to fail says it
    (the others fail because of it, or in the same way), and torchrun ends the rest."""
    if tensor_parallel.first_to_fail():
        if tensor_parallel.launched():
            sys.stderr = sys.__stderr__  # a rank other than 0 was silenced
        print(line, file=sys.stderr)
    tensor_parallel.exit_process(1)
