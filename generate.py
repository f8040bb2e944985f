"""Generate text with a KV cache that may live in CPU RAM (HeadInfer), from the CLI or from Python.

    python generate.py                                   # the embedded SmolLM2-135M-Instruct answers a question
    python generate.py --checkpoint DIR --prompt-file long.txt --offload head --max-new-tokens 64
    python generate.py -i --prompt-file book.txt --prompt-cache book.kv   # a chat about a book kept on disk
    python generate.py --prompt-file book.txt --questions-file qs.txt   # many questions, decoded together
    torchrun --nproc-per-node 3 generate.py              # tensor parallelism: each rank 1/3 of the heads

The life of a request, top-down: the pieces (prefill; decode, sampling each next token), generate()
composing them over a planned cache (planner.py; the caches are offload.py's), generate_many() for
many questions over one document (shared_prefix.py), and the CLI, main(). Flags and printing are
cli.py's, loading checkpoint.py's, a run's clock, stats and clean failures run.py's. In Python:
    model, tokenizer = load_model(None)                  # the embedded default model, on CPU in fp32
    new_ids = generate(model, tokenizer.encode("The capital of France is"), 8, offload="head")
    cache = make_cache(plan_cache(model.args, max_len, dtype, device, "head"), model.args)   # or the pieces
    logits = prefill(model, cache, prompt_ids)           # appends to whatever the cache holds
    for token in decode(model, cache, logits, 64): ...
"""
import functools
import os
import sys
from collections.abc import Iterator

import torch
from torch import Tensor
from tqdm import tqdm

import tensor_parallel
from chat import Conversation, prompt_text
from checkpoint import load_draft_model, load_model, resolve_device
from cli import (DEFAULT_PROMPT, Answer, check_context, check_flags, fail, join_tensor_parallel, parse_args,
                 read_prompt_file, read_questions, read_turns, report, report_many, settings, use_chat)
from errors import UsageError, say
from model import Transformer
from planner import default_prefill_chunk, make_cache, plan_cache
from prompt_cache import check_prompt_cache, load_or_note, save_or_warn
from quantize import describe
from run import (Run, check_compile, check_continues, check_ctx_size, check_questions, check_request, check_rollback,
                 check_room)
from sampling import accept, sample
from shared_prefix import SharedPrefixCache, shared_length
from speculative import (DEFAULT_DRAFT_WINDOW, DEFAULT_K, SPECULATION_COUNTS, DraftLength, Tap, check_speculation,
                         make_drafter, plan_room)

PROGRESS_DELAY_S = 2.0  # a prefill shows its progress bar once it has taken this long


# --- the pieces: prefill, decode ----------------------------------------------------------------

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


def decode_step(model, token: Tensor, input_pos: Tensor, cache) -> Tensor:
    return model(token, input_pos, cache)[:, -1]


@functools.cache
def compiled_decode_step(mode: str = "default"):
    # Attention is an opaque custom op (offload.py), so the rest of the step compiles into one
    # graph; positions are a tensor and the cache keeps its length, so nothing recompiles per token.
    # (Modes that replay CUDA graphs are refused by run.check_compile: a replay skips that op's host code.)
    return torch.compile(decode_step, fullgraph=True, mode=mode)


@torch.no_grad()
def decode(model: Transformer, cache, logits: Tensor, max_new_tokens: int, temperature: float = 0.0,
           top_k: int | None = None, generator: torch.Generator | None = None,
           compile: bool | str = False) -> Iterator[int]:
    """Yield up to max_new_tokens new ids: the first sampled from `logits` (the prefill's last
    position), each next one from a decode step that appends the previous token to `cache`.

    From the third token on, each token is read on the host one step late: the next step is queued
    before the host waits for this token, so a GPU never idles on the host. The first two are read
    before the next step is queued, so the first step (compilation included) can be timed apart.
    Stop whenever you like: the cache then holds the prompt and every token yielded so far except
    possibly the last; `cache.length` says which.
    """
    check_room(cache, max_new_tokens)
    check_compile(compile)
    step = compiled_decode_step("default" if compile is True else compile) if compile else decode_step
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


@torch.no_grad()
def speculative_decode(model: Transformer, cache, logits: Tensor, max_new_tokens: int, ids: list[int], drafter,
                       speculate_k: int = DEFAULT_K, temperature: float = 0.0, top_k: int | None = None,
                       generator: torch.Generator | None = None, counts: dict | None = None) -> Iterator[int]:
    """decode(), with the tokens checked several at a time: yields the same ids greedily, and draws from
    the same distribution when sampling (sampling.accept). `ids`: the prompt (what the cache holds),
    which the drafter reads; `drafter` (speculative.make_drafter) proposes up to speculate_k tokens
    (fewer while its drafts keep failing: speculative.DraftLength), and one forward pass of the last
    token and the drafts through `cache` (a prefill chunk of k + 1 tokens: a streamed head group is
    copied once for all of them) gives the model's logits after each. The cache is then truncated to
    what was accepted. counts, if given, is kept current: verify_passes, drafted_tokens, accepted_tokens,
    and tokens_per_pass (the tokens the passes yielded, per pass).

    Stop whenever you like: the cache then holds the prompt and every token yielded so far but the
    last, and possibly accepted tokens not yet yielded; truncate it to what you keep.
    """
    check_room(cache, max_new_tokens)
    ids, device = list(ids), logits.device
    counts = {} if counts is None else counts
    counts.update(verify_passes=0, drafted_tokens=0, accepted_tokens=0, tokens_per_pass=None)
    length = DraftLength(speculate_k)
    token = int(sample(logits, temperature, top_k, generator))
    ids.append(token)
    yield token
    done = 1
    while done < max_new_tokens:
        room = min(length.next(), max_new_tokens - done - 1, cache.max_len - cache.length - 1)
        drafts, q = drafter.propose(ids, room) if room > 0 else ([], None)
        start, tap = cache.length, Tap(cache)
        tokens = torch.tensor([ids[-1:] + drafts], device=device)
        logits = model(tokens, torch.arange(start, start + tokens.shape[1], device=device), tap)[0]
        new = accept(logits, drafts, q, temperature, top_k, generator)
        cache.truncate(start + len(new))  # the pass's first token and the accepted drafts
        drafter.update(start, len(new), tap.kv)
        length.update(len(drafts), len(new) - 1)
        counts["verify_passes"] += 1
        counts["drafted_tokens"] += len(drafts)
        counts["accepted_tokens"] += len(new) - 1
        new = new[:max_new_tokens - done]
        counts["tokens_per_pass"] = (done - 1 + len(new)) / counts["verify_passes"]
        for token in new:
            ids.append(token)
            done += 1
            yield token


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
    check_room(cache, max_new_tokens)
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


def prefill_prompt(model, cache, ids, chunk: int, progress: bool, prompt_cache=None,
                   read_only: bool = False) -> tuple[Tensor, int, bool]:
    """Prefill what `cache` lacks of `ids` (it holds a prefix of them), after loading what it can from
    the file `prompt_cache` (prompt_cache.py; the cache is then empty before). Returns the last
    logits, the positions that were not computed, and whether to save_or_warn the file once the
    answer is given (prompt_cache.load_or_note decides)."""
    save = prompt_cache is not None and load_or_note(cache, prompt_cache, model, ids, progress, read_only)
    reused = cache.length
    logits = prefill(model, cache, ids[reused:], chunk, progress)
    return logits, reused, save


# --- generate, generate_many: the pieces over a planned cache, with stats and clean failures --------

@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, offload: str = "head",
             temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
             prefill_chunk: int | None = None, gpu_kv_budget: float | None = None, compile: bool | str = False,
             stop_ids=(), on_token=None, stats: dict | None = None, progress: bool = False,
             ctx_size: int | None = None, cache=None, prompt_cache=None, prompt_cache_ro: bool = False,
             speculate: str | None = None, speculate_k: int = DEFAULT_K, draft_model: Transformer | None = None,
             draft_window: int = DEFAULT_DRAFT_WINDOW) -> list[int]:
    """Prefill the prompt in chunks, then decode up to max_new_tokens; returns the new token ids.

    offload: none | layer | head. gpu_kv_budget: GiB of KV the GPU may hold (default: what is free
    after the weights; CUDA only). prefill_chunk: default the plan's (CUDA: up to 8192, smaller where a
    long context's buffers need the room; the CPU: 512). ctx_size:
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

    Speculative decoding (speculative_decode; the same greedy tokens, the same distribution when
    sampling): speculate "lookup" (drafts copied from the prompt and answer), "self" (the model itself
    over a small cache of draft_window tokens) or "draft" (draft_model, a smaller model with the same
    vocabulary; giving it is enough), up to speculate_k drafts per pass. A cache of your own must have
    been planned with rollback=speculate_k if the model has sliding-window layers. stats then also
    holds verify_passes, drafted_tokens, accepted_tokens and tokens_per_pass.
    """
    check_request(model, prompt_ids, max_new_tokens, temperature, top_k, prefill_chunk, ctx_size)
    check_compile(compile)
    check_prompt_cache(model.args, prompt_cache, prompt_cache_ro)
    speculate = "draft" if speculate is None and draft_model is not None else speculate
    check_speculation(speculate, speculate_k, draft_window, compile, model, draft_model)
    device, dtype, generator = setup(model, seed)
    if cache is None:
        max_new_tokens = min(max_new_tokens, (ctx_size or model.args.max_seq_len) - len(prompt_ids))
        max_len = ctx_size or len(prompt_ids) + max_new_tokens
        room = plan_room(speculate, model, draft_model, draft_window, speculate_k,
                         prefill_chunk or default_prefill_chunk(device), max_len)
        plan = plan_cache(model.args, max_len, dtype, device, offload, gpu_kv_budget, prefill_chunk, **room)
    else:
        check_continues(cache, prompt_ids)
        check_rollback(cache, speculate_k if speculate else 0)
        plan, max_new_tokens = cache.plan, min(max_new_tokens, cache.max_len - len(prompt_ids))
    chunk = prefill_chunk or plan.prefill_chunk
    new_ids = []
    with Run(device, plan, chunk, stats, **describe(model), prompt_tokens=len(prompt_ids), reused_tokens=0,
             speculate=speculate, speculate_k=speculate_k if speculate else None, **SPECULATION_COUNTS) as run:
        cache = run.allocate(model.args, progress) if cache is None else cache
        if compile and progress:
            say("compiling the decode step: its first run takes seconds to a minute")
        run.phase = "prefill"
        logits, run.fields["reused_tokens"], save = prefill_prompt(model, cache, prompt_ids, chunk, progress,
                                                                    prompt_cache, prompt_cache_ro)
        drafter = make_drafter(speculate, model, cache, speculate_k, draft_window, temperature, top_k, generator,
                               draft_model, chunk)
        tokens = (decode(model, cache, logits, max_new_tokens, temperature, top_k, generator, compile)
                  if drafter is None else
                  speculative_decode(model, cache, logits, max_new_tokens, prompt_ids, drafter, speculate_k,
                                     temperature, top_k, generator, counts=run.fields))
        for token in tokens:
            new_ids.append(token)
            run.step(cache.length)
            if on_token is not None:
                on_token(token)
            if token in stop_ids:
                break
        run.stop(cache.length)
        if save:
            run.phase = "saving"  # the answer is complete; a Ctrl-C now leaves the old file as it was
            save_or_warn(cache, prompt_cache, model, prompt_ids, progress)
    cache = drafter = tokens = None  # freed before a failure is raised again (its traceback holds this frame)
    run.raise_failure()
    return new_ids


@torch.no_grad()
def generate_many(model: Transformer, prefix_ids: list[int], suffixes: list[list[int]], max_new_tokens: int,
                  offload: str = "head", temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
                  prefill_chunk: int | None = None, gpu_kv_budget: float | None = None, stop_ids=(), on_token=None,
                  stats: dict | None = None, progress: bool = False, prompt_cache=None,
                  prompt_cache_ro: bool = False) -> list[list[int]]:
    """Many questions about one document: each of the B `suffixes` (token ids) continues `prefix_ids`;
    returns B lists of new ids, each the answer generate(model, prefix_ids + suffix, ...) gives greedily
    in fp32 (in bf16 the two attentions round differently: see docs/many-questions.md).

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
    check_prompt_cache(model.args, prompt_cache, prompt_cache_ro)
    device, dtype, generator = setup(model, seed)
    B, longest = len(suffixes), max(map(len, suffixes))
    max_new_tokens = min(max_new_tokens, model.args.max_seq_len - len(prefix_ids) - longest)
    plan = plan_cache(model.args, len(prefix_ids), dtype, device, offload, gpu_kv_budget, prefill_chunk,
                      questions=(B, longest, max_new_tokens - 1))  # the last token is never fed back
    chunk = plan.prefill_chunk
    answers, counts = [[] for _ in suffixes], [0] * B
    with Run(device, plan, chunk, stats, **describe(model), prefix_tokens=len(prefix_ids),
             question_tokens=[len(q) for q in suffixes], reused_tokens=0, answer_tokens=counts, question_kv_bytes=None, speculate=None, speculate_k=None,
             **SPECULATION_COUNTS) as run:
        cache = run.allocate(model.args, progress, f"; {B} questions of up to {longest} tokens on top")
        run.phase = "prefill"
        _, run.fields["reused_tokens"], save = prefill_prompt(model, cache, prefix_ids, chunk, progress,
                                                               prompt_cache, prompt_cache_ro)
        together = SharedPrefixCache(cache, [len(q) for q in suffixes], max_new_tokens - 1)
        run.fields["question_kv_bytes"] = together.nbytes
        logits = prefill_questions(model, together, suffixes, chunk)
        steps = decode_many(model, together, logits, max_new_tokens, temperature, top_k, generator, stop_ids)
        for step in tqdm(steps, total=max_new_tokens, desc=f"{B} answers", unit="step", file=sys.stderr,
                         disable=not progress, delay=PROGRESS_DELAY_S):
            for question, token in step:
                answers[question].append(token)
                counts[question] += 1
                if on_token is not None:
                    on_token(question, token)
            run.step(sum(counts))
        run.stop(sum(counts))
        if save:
            run.phase = "saving"
            save_or_warn(cache, prompt_cache, model, prefix_ids, progress)
    cache = together = steps = None  # freed before a failure is raised again, as in generate()
    run.raise_failure()
    return answers


def setup(model, seed: int | None):
    """The model's device and dtype, and the seeded sampling generator."""
    device, dtype = model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    return device, dtype, generator


# --- the CLI: one question, many questions, or a chat -------------------------------------------

def main(argv=None):
    opts = parse_args(argv)
    check_flags(opts)
    device = resolve_device(opts.device)
    tp = join_tensor_parallel(opts, device) if tensor_parallel.launched() else None
    device = device if tp is None else tp.device
    dtype, offload = settings(opts, device)
    # Under torchrun rank 0 reads the files for all: stdin reaches one rank only.
    document, questions = tensor_parallel.from_rank0(lambda: (read_prompt_file(opts), read_questions(opts)))
    model, tokenizer = load_model(opts.checkpoint, device=device, dtype=dtype, tp=tp, weights=opts.weights)
    draft = None if opts.draft_checkpoint is None else load_draft_model(opts.draft_checkpoint, tokenizer, device, dtype)
    speculation = dict(speculate="draft" if draft is not None else opts.speculate, speculate_k=opts.speculate_k,
                       draft_model=draft, draft_window=opts.draft_window)
    chat = use_chat(opts, tokenizer)
    if opts.interactive:
        return interactive(model, tokenizer, opts, chat, offload, speculation, opening=document or "",
                           first_question=opts.prompt)
    if questions is not None:
        return ask_many(model, tokenizer, opts, chat, offload, document or "", questions)
    if document is not None and opts.prompt is not None:  # a document, then the question about it
        text = prompt_text(tokenizer, chat, opts.prompt, opening=document)
    else:
        text = prompt_text(tokenizer, chat, document if document is not None else opts.prompt or DEFAULT_PROMPT)
    prompt_ids = tensor_parallel.from_rank0(lambda: tokenizer.encode(text))  # a template may hold today's date
    check_context(opts, model.args, len(prompt_ids))
    answer, stats, finished = Answer(tokenizer, show=not opts.json), {}, False
    try:
        generate(model, prompt_ids, opts.max_new_tokens, offload=offload, temperature=opts.temperature,
                 top_k=opts.top_k, seed=opts.seed, prefill_chunk=opts.prefill_chunk,
                 gpu_kv_budget=opts.gpu_kv_budget, compile=opts.compile, stop_ids=tokenizer.stop_ids,
                 on_token=answer.add, stats=stats, progress=True, ctx_size=opts.ctx_size,
                 prompt_cache=opts.prompt_cache, prompt_cache_ro=opts.prompt_cache_ro, **speculation)
        finished = True
    finally:  # also on Ctrl-C: what was generated stays printed, with the stats so far
        if finished or not tensor_parallel.failed_elsewhere():  # a peer's failure: its one line says it all
            report(opts, tokenizer, answer, stats)


def ask_many(model, tokenizer, opts, chat: bool, offload: str, document: str, questions: list[str]):
    """--questions-file: each question's prompt is tokenized whole, as a run with --prompt would be, and
    the ids they all begin with (the document, and the template around it) are the shared prefix."""
    prompts = tensor_parallel.from_rank0(
        lambda: [tokenizer.encode(prompt_text(tokenizer, chat, question, opening=document)) for question in questions])
    check_context(opts, model.args, max(map(len, prompts)))
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


def interactive(model, tokenizer, opts, chat: bool, offload: str, speculation: dict, opening: str,
                first_question: str | None):
    """-i: one user turn per stdin line (chat.Conversation), over one cache planned once for
    opts.ctx_size tokens (default: the model's max_seq_len). The opening is prefilled (and taken from /
    saved to the prompt cache) before the first question; a turn that would pass ctx_size is refused,
    and the session goes on; /reset forgets the turns, /exit or EOF ends."""
    ctx = opts.ctx_size or model.args.max_seq_len
    check_ctx_size(model.args, ctx)
    conv = Conversation(tokenizer, chat, opening)
    check_context(opts, model.args, len(conv.ids))
    if len(conv.ids) >= ctx:
        raise UsageError(f"the opening has {len(conv.ids)} tokens; ctx_size is {ctx}", ("prompt_file", "ctx_size"))
    device, dtype, _ = setup(model, None)
    s = speculation
    room = plan_room(s["speculate"], model, s["draft_model"], s["draft_window"], s["speculate_k"],
                     opts.prefill_chunk or default_prefill_chunk(device), ctx)
    try:
        plan = plan_cache(model.args, ctx, dtype, device, offload, opts.gpu_kv_budget, opts.prefill_chunk, **room)
    except UsageError as e:  # the session's size is the knob that fits it
        raise UsageError(str(e), e.options + ("ctx_size",)) from None
    chunk = plan.prefill_chunk
    say(plan.describe())
    cache = make_cache(plan, model.args)
    if conv.ids:
        _, reused, save = prefill_prompt(model, cache, conv.ids, chunk, True, opts.prompt_cache, opts.prompt_cache_ro)
        if save:
            save_or_warn(cache, opts.prompt_cache, model, conv.ids, True)
        say(f"opening: {len(conv.ids)} tokens ({reused} from the prompt cache); ask away (/reset, /exit)")
    for question in read_turns(first_question):
        if question == "/exit":
            return
        if question == "/reset":
            conv.reset()
            cache.truncate(min(cache.length, len(conv.ids)))
            say("(conversation cleared; the opening is kept)")
        elif question:
            chat_turn(model, tokenizer, opts, conv, cache, ctx, chunk, question, speculation)


def chat_turn(model, tokenizer, opts, conv: Conversation, cache, ctx: int, chunk: int, question: str,
              speculation: dict):
    """One turn of -i: the question appended, the answer streamed; the conversation keeps both."""
    length, turns = len(conv.ids), conv.turns
    conv.ask(question)
    if len(conv.ids) >= ctx:
        conv.rewind(length, turns)
        say(f"error: this turn would take the conversation past ctx_size {ctx} tokens; /reset starts over "
            f"(see --ctx-size)")
        return
    answer, stats = Answer(tokenizer, show=not opts.json), {}
    try:
        generate(model, conv.ids, opts.max_new_tokens, temperature=opts.temperature, top_k=opts.top_k,
                 seed=opts.seed, prefill_chunk=chunk, compile=opts.compile, stop_ids=tokenizer.stop_ids,
                 on_token=answer.add, stats=stats, progress=True, cache=cache, **speculation)
    except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
        pass
    except UsageError as e:  # out of GPU memory: this turn fails, the conversation so far stands
        say(f"error: {e.with_flags()}")
    report(opts, tokenizer, answer, stats)
    if stats.get("prefill_s") is None:  # stopped before the answer began: the question is dropped
        conv.rewind(length, turns)
    else:
        conv.answer(answer.ids)
    cache.truncate(min(cache.length, len(conv.ids)))  # e.g. a fed-back stop token, or a dropped turn


def cli(argv=None):
    """The process: main, with every error a user can fix said in one line (cli.fail) and Ctrl-C's exit code."""
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


if __name__ == "__main__":
    cli()
