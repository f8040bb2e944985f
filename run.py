"""One call of generate() or generate_many(): what it refuses before any work, and the run itself,
timed, with its stats filled in also when it fails or is interrupted.

    with Run(device, plan, stats, prompt_tokens=len(ids)) as run:   # a Ctrl-C or an OOM in here still fills stats
        cache = run.allocate(model.args, progress)
        ...                                                          # run.step(done) once per new token
        run.stop(done)
    cache = None            # the block's caches are freed before its failure is raised again
    run.raise_failure()
"""
from time import perf_counter

import torch

from errors import UsageError, say
from model import ModelArgs
from planner import make_cache

FAILURES = (torch.cuda.OutOfMemoryError, KeyboardInterrupt)  # held back by Run, raised again by raise_failure


# --- refused before any work --------------------------------------------------------------------

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


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # torch.compile modes the decode step can use


def check_compile(compile: bool | str | None):
    """compile: False or None (eager), True (mode "default") or one of COMPILE_MODES. The modes that replay CUDA graphs
    ("reduce-overhead", "max-autotune") are refused: a replay runs the recorded kernels only, and the
    cache's attention is host code (copies on streams, events, the position it advances), so every
    replayed step would attend at the captured position over the captured buffers, silently wrong."""
    if compile in (None, False, True) or compile in COMPILE_MODES:
        return
    why = (" replays CUDA graphs, which skip the KV cache's host code (streams, events, its position)"
           if compile in ("reduce-overhead", "max-autotune") else " is not a torch.compile mode")
    raise UsageError(f"compile mode {compile!r}{why}; use one of {', '.join(COMPILE_MODES)}", ("compile",))


def check_ctx_size(args: ModelArgs, ctx_size: int):
    if ctx_size > args.max_seq_len:
        raise UsageError(f"ctx_size {ctx_size} exceeds the model's max_seq_len {args.max_seq_len}", ("ctx_size",))


def check_continues(cache, prompt_ids):
    """A cache of the caller's holds a prefix of prompt_ids (a conversation so far), and has room for the rest."""
    if cache.length >= len(prompt_ids):
        raise UsageError(f"the cache holds {cache.length} positions; the prompt must go beyond them, it has "
                         f"{len(prompt_ids)} tokens", ("prompt",))
    if len(prompt_ids) >= cache.max_len:
        raise UsageError(f"the prompt has {len(prompt_ids)} tokens; the cache holds at most {cache.max_len}",
                         ("ctx_size",))


def check_rollback(cache, rollback: int):
    """A cache of the caller's can take back `rollback` positions after a verification pass: its
    sliding-window rings were planned with room for them (planner.plan_cache(..., rollback=))."""
    if cache.windows is not None and cache.plan.rollback < rollback:
        raise UsageError(f"the cache's sliding-window rings were planned for taking back {cache.plan.rollback} "
                         f"positions, speculative decoding needs {rollback}: plan it with rollback={rollback}",
                         ("speculate_k",))


def check_room(cache, max_new_tokens: int):
    """A decode of max_new_tokens fits the cache."""
    room = cache.max_len - cache.length + 1  # the last token is never fed back
    if max_new_tokens > room:
        raise UsageError(f"the cache has room for {room} more tokens, not max_new_tokens={max_new_tokens}",
                         ("max_new_tokens",))


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


# --- the run ------------------------------------------------------------------------------------

class Run:
    """The clock, the stats and the failures of one run, used as `with run:` around its work.

    `stats` (a dict, or None) receives, when the block ends, `run.fields` (given here, kept current by
    the block), the timings, the memory and the plan; also when the block ends in a Ctrl-C or out of
    GPU memory. Those two are held back: leaving the block drops their traceback, and with
    it the caches the block made; raise_failure() raises them again after the caller has dropped its
    own references: a Ctrl-C as a Ctrl-C, an OOM as one line with its fixes.

    Timings: prefill_s from the start until the first token is known (allocation and prefill);
    first_step_s the first decode step alone (compilation included); decode_tok_s the tokens decoded
    after it, per second. step(done) is called once the first token is known and after each decode
    step, `done` counting the tokens decoded so far (generate() counts them on the cache, which a
    GPU runs a step ahead of the host). `phase` says where a failure happened.
    """

    def __init__(self, device: torch.device, plan, chunk: int, stats: dict | None, **fields):
        self.device, self.plan, self.chunk, self.stats, self.fields = device, plan, chunk, stats, fields
        self.phase, self.failure = "allocation", None
        self.prefill_s = self.first_step_s = self.decode_tok_s = None
        self.steps, self.done, self.steady_from = 0, None, None  # (time, tokens done) once the first step is done

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = perf_counter()
        return self

    def allocate(self, args: ModelArgs, progress: bool, more: str = ""):
        """The plan's cache; progress: the plan on stderr first (and `more` after it)."""
        if progress:
            say(self.plan.describe() + more)
        return make_cache(self.plan, args)

    def step(self, done: int):
        now = perf_counter()
        self.steps, self.done = self.steps + 1, done
        if self.steps == 1:
            self.prefill_s, self.phase = now - self.start, "decode"
        elif self.steps == 2:
            self.first_step_s = now - self.start - self.prefill_s
            self.steady_from = (now, done)

    def stop(self, done: int | None):
        """The clock stops: the last step's tokens are done (a GPU has run them), and the rate is known."""
        if self.device.type == "cuda" and self.phase == "decode":
            torch.cuda.synchronize(self.device)
        if self.steady_from is not None and done is not None:
            t, before = self.steady_from
            self.decode_tok_s = (done - before) / (perf_counter() - t) if done > before else None

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is None:
            self.phase = "done"
        elif self.phase in ("allocation", "prefill", "decode"):  # cut short: the clock stops where it got to
            self.stop(self.done)
        if self.stats is not None:
            self.stats.update(**self.fields, **self.as_dict())
        if kind is not None and issubclass(kind, FAILURES):
            self.failure = kind
            return True
        return False

    def as_dict(self) -> dict:
        device, plan = self.device, self.plan
        return dict(prefill_s=self.prefill_s, first_step_s=self.first_step_s, decode_tok_s=self.decode_tok_s,
                    peak_gpu_mem_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                    kv_bytes_gpu=plan.gpu_bytes, kv_bytes_cpu=plan.host_bytes, tp_ranks=plan.ranks, offload=plan.policy,
                    plan=plan.as_dict(),
                    interrupted=self.phase != "done")

    def raise_failure(self):
        """A Ctrl-C again; running out of GPU memory as one line with its fixes; nothing after a good run."""
        if self.failure is KeyboardInterrupt:
            raise KeyboardInterrupt
        if self.failure is not None:
            raise UsageError(f"out of GPU memory during {self.phase} ({self.plan.describe()}); a smaller "
                             f"prefill_chunk (now {self.chunk}) or gpu_kv_budget leaves more room",
                             ("prefill_chunk", "gpu_kv_budget"))
