"""The memory planner: where the KV cache goes, decided and checked before anything is allocated.

    plan = plan_cache(args, max_len, dtype, device, "head")   # this machine: free GPU memory, host RAM
    cache = make_cache(plan, args)                           # the cache the plan describes

`plan_memory` is the pure decision (any budget, any machine; tests and benchmarks call it directly);
`plan_cache` asks this machine what it has and refuses, in one line that says what would fit, what
cannot fit. A long run pins most of the host's RAM and may take an hour, so it checks first.
"""
import os
from dataclasses import asdict, dataclass, replace

import torch

from attention import SHARED_BLOCK_BYTES
from errors import UsageError
from model import ModelArgs
from offload import HeadOffloadCache, KVCache, LayerOffloadCache, StandardCache
from tensor_parallel import agree, local_ranks, ranks

POLICIES = ("none", "layer", "head")
GiB = 1 << 30
DEFAULT_PREFILL_CHUNK = 8192  # on CUDA. Paper Sec. 5: 10K-token chunks keep prefill compute bound on a 4090.
CPU_PREFILL_CHUNK = 512       # the CPU is compute bound at any chunk size; small chunks show progress
# Chunks the planner tries on CUDA, largest first, when none is given: a smaller chunk leaves room for
# the buffers of a longer context. At 512 tokens the copies of a streamed prefill no longer hide behind
# its attention (bench/NOTES.md, "Prefill streaming").
CHUNK_CHOICES = tuple(DEFAULT_PREFILL_CHUNK >> i for i in range(5))  # 8192 ... 512
ALLOCATOR_MARGIN = 512 << 20


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class Plan:
    """A cache layout for `max_len` tokens of `batch` sequences in `dtype` on `device`.

    Sizes are by role (store, resident slots, buffers); `gpu_bytes` and `host_bytes` say where those
    are: on a CPU run everything is in host RAM and nothing is on a GPU.
    """
    policy: str
    device: str
    dtype: torch.dtype
    batch: int
    max_len: int
    group_size: int           # KV heads per streamed unit
    resident_slots: int       # (layer, KV head) slots that stay on the compute device
    total_slots: int          # global layers (all but the sliding-window ones) * n_kv_head
    kv_bytes: int             # the whole cache at max_len (slots and windows)
    store_bytes: int          # the streamed slots' store in host RAM (pinned when CUDA is used)
    resident_bytes: int       # the resident slots (every slot for `none`)
    buffer_bytes: int         # the two ping-pong buffers of one group
    window_bytes: int         # the sliding-window layers' rings, on the compute device: fixed by the window
    prefill_chunk: int        # prompt tokens per forward pass
    activation_bytes: int     # the most a pass of prefill_chunk tokens holds beside weights and KV
    ranks: int = 1            # tensor-parallel ranks: each holds such a plan for its 1/ranks of the KV heads
    rollback: int = 0         # positions a verification pass may take back: the windows' rings hold this many more
    draft_bytes: int = 0      # a drafter's own cache on the compute device (speculative decoding)

    @property
    def on_gpu(self) -> bool:
        return torch.device(self.device).type == "cuda"

    @property
    def on_device_bytes(self) -> int:
        return self.resident_bytes + self.buffer_bytes + self.window_bytes

    @property
    def gpu_bytes(self) -> int:
        return self.on_device_bytes if self.on_gpu else 0

    @property
    def gpu_bytes_beyond_weights(self) -> int:
        """What the run holds on the GPU besides the weights, at most: the KV part and one pass's activations."""
        return self.gpu_bytes + self.activation_bytes + self.draft_bytes if self.on_gpu else 0

    @property
    def host_bytes(self) -> int:
        return self.store_bytes + (0 if self.on_gpu else self.on_device_bytes)

    def as_dict(self) -> dict:
        return {**asdict(self), "dtype": str(self.dtype).removeprefix("torch."),
                "gpu_bytes": self.gpu_bytes, "host_bytes": self.host_bytes,
                "gpu_bytes_beyond_weights": self.gpu_bytes_beyond_weights}

    def describe(self) -> str:
        g = fmt_bytes  # short: five sizes in one sentence
        n = self.ranks
        plan = f"plan per rank ({n} ranks, each with 1/{n} of the heads)" if n > 1 else "plan"
        windows = f", sliding windows {g(self.window_bytes)}" if self.window_bytes else ""
        layout = (f"{self.resident_slots}/{self.total_slots} head slots resident, groups of {self.group_size} KV "
                  f"heads, buffers {g(self.buffer_bytes)}{windows}")
        if self.policy == "none":
            where = f"GPU memory ({self.device})" if self.on_gpu else "host RAM"
            return f"{plan}: standard cache, {g(self.kv_bytes)} of KV in {where} for {self.max_len} tokens{windows}"
        if not self.on_gpu:  # nothing streams: the CPU computes where the KV lives
            return (f"{plan}: {self.policy} offload on the CPU (the same algorithm; nothing streams), {self.max_len} "
                    f"tokens, KV {g(self.kv_bytes)} in host RAM: {g(self.store_bytes)} as the store, "
                    f"{g(self.on_device_bytes)} in resident slots and buffers ({layout})")
        return (f"{plan}: {self.policy} offload, {self.max_len} tokens, KV {g(self.kv_bytes)}: "
                f"{g(self.store_bytes)} streamed from pinned host RAM, {g(self.on_device_bytes)} in GPU memory "
                f"({self.device}; {layout}); prefill chunks of {self.prefill_chunk} tokens, "
                f"{g(self.activation_bytes)} of activations")


def plan_memory(args: ModelArgs, max_len: int, dtype: torch.dtype, policy: str, device="cuda", batch: int = 1,
                gpu_budget: int | None = None, host_available: int | None = None,
                group_size: int | None = None, resident: int | None = None, prefill_chunk: int | None = None,
                rollback: int = 0) -> Plan:
    """Decide where the KV cache goes, before anything is allocated.

    gpu_budget: bytes of KV the device may hold (resident slots + ping-pong buffers); None is
    unlimited. host_available bounds what lives in host RAM: the store, and everything when the
    device is the CPU. group_size / resident override the choices below. prefill_chunk (default: the
    device's) sizes the plan's activation_bytes only: gpu_budget is for the KV alone.
    Adaptive grouping (paper Sec. 4.3): the largest group whose two ping-pong buffers take at most a
    quarter of the budget, so short contexts stream whole layers and the longest single heads; the
    rest of the budget keeps (layer, head) slots resident, and those need no transfer at all.
    Sliding-window layers hold rings of min(window + rollback, max_len) tokens on the device
    (offload.SlidingWindows), whatever the policy; they take their share of the budget first. rollback:
    the positions a verification pass of speculative decoding may take back (its drafts).
    """
    if policy not in POLICIES:
        raise UsageError(f"unknown offload policy {policy!r}; choose one of {', '.join(POLICIES)}", ("offload",))
    n_kv, slots = args.n_kv_head, len(args.global_layers) * args.n_kv_head
    if group_size is not None and not (isinstance(group_size, int) and 1 <= group_size <= n_kv):
        raise UsageError(f"group_size must be a whole number from 1 to the model's {n_kv} KV heads, got {group_size!r}")
    if resident is not None and not (isinstance(resident, int) and 0 <= resident <= slots):
        raise UsageError(f"resident must be a whole number from 0 to the {slots} (layer, KV head) slots of the "
                         f"model's global layers, got {resident!r}")
    token_bytes = 2 * batch * args.head_dim * dtype.itemsize  # K and V of one head for one token
    slot_bytes = max_len * token_bytes                          # one (layer, head) slot
    total = slots * slot_bytes
    ring = min((args.sliding_window or 0) + rollback, max_len) if args.sliding_layers else 0
    windows = len(args.sliding_layers) * n_kv * ring * token_bytes
    budget = float("inf") if gpu_budget is None else gpu_budget
    if windows > budget:
        raise UsageError(f"the {len(args.sliding_layers)} sliding-window layers need {fmt_bytes(windows)} on the "
                         f"device for their {args.sliding_window}-token windows but the GPU KV budget is "
                         f"{fmt_bytes(budget)}", ("gpu_kv_budget",))
    budget -= windows
    chunk = prefill_chunk or default_prefill_chunk(device)
    layout = dict(policy=policy, device=str(device), dtype=dtype, batch=batch, max_len=max_len, total_slots=slots,
                  kv_bytes=total + windows, window_bytes=windows, prefill_chunk=chunk, rollback=rollback,
                  activation_bytes=activation_bytes(args, dtype, min(chunk, max_len), batch))

    if policy == "none":
        if total > budget:
            raise UsageError(f"the standard cache needs {fmt_bytes(total)} of KV on the device for {max_len} tokens "
                             f"but the budget is {fmt_bytes(budget)}; head offload streams it from host RAM",
                             ("offload",))
        plan = Plan(**layout, group_size=n_kv, resident_slots=slots, store_bytes=0, resident_bytes=total,
                    buffer_bytes=0)
        return _check_host(plan, host_available)

    if policy == "layer":
        size, resident = n_kv, 0
    elif (resident is None and group_size is None and total <= budget) or slots == 0:
        size, resident = n_kv, slots  # everything fits (or every layer is windowed): nothing to stream
    else:
        fits = [d for d in range(1, n_kv + 1) if 2 * d * slot_bytes <= budget / 4]
        size = group_size or max(fits or [1])
    buffers = 2 * size * slot_bytes if resident != slots else 0
    if buffers > budget:
        fit = int(budget // (2 * size * token_bytes))
        raise UsageError(f"a GPU KV budget of {fmt_bytes(budget)} cannot hold the two buffers of a {size}-head "
                         f"group ({fmt_bytes(buffers)} at {max_len} tokens); a budget of {fmt_bytes(buffers)} or a "
                         f"context of at most {fit} tokens would fit", ("gpu_kv_budget",))
    if resident is None:
        resident = slots if budget == float("inf") else min(slots, int((budget - buffers) // slot_bytes))
    if resident == slots:
        buffers = 0
    plan = Plan(**layout, group_size=size, resident_slots=resident, store_bytes=(slots - resident) * slot_bytes,
                resident_bytes=resident * slot_bytes, buffer_bytes=buffers)
    return _check_host(plan, host_available)


def _check_host(plan: Plan, host_available: int | None) -> Plan:
    """Refuse a plan whose host-RAM part does not fit; all of it but the windows grows linearly with max_len."""
    need = plan.host_bytes
    if host_available is not None and need > host_available:
        fixed = 0 if plan.on_gpu else plan.window_bytes
        fit = int(max(0, host_available - fixed) * plan.max_len // max(1, need - fixed))
        raise UsageError(f"the KV cache needs {fmt_bytes(need)} of host RAM for {plan.max_len} tokens but "
                         f"{fmt_bytes(host_available)} is available; at most about {fit} tokens would fit")
    return plan


# --- what this machine has ------------------------------------------------------------------------

def host_available_bytes() -> int | None:
    """This process's share of the host RAM the OS can give without swapping (MemAvailable from
    /proc/meminfo); the ranks of a tensor-parallel group on one machine share it equally. None if unknown."""
    available = _machine_available_bytes()
    return None if available is None else available // local_ranks()


def _machine_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


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


def default_prefill_chunk(device) -> int:
    """Prompt tokens per prefill pass: a chunk's activations are what a prefill adds to the GPU's memory."""
    return DEFAULT_PREFILL_CHUNK if torch.device(device).type == "cuda" else CPU_PREFILL_CHUNK


def activation_bytes(args: ModelArgs, dtype, chunk: int, batch: int = 1) -> int:
    """The most memory a forward pass of `chunk` tokens (per sequence) holds beside the weights and the
    KV cache: an upper bound of the tensors the pieces allocate (tests/test_planner.py counts them).

    Per token: the MLP, where the peak is (the hidden state, about four [dim] tensors, and the gate, the
    up projection and their product, [intermediate] each); added to it, attention's side (q, k, v, the
    fp32 RoPE copies of q and k, the output twice: kernel and concatenation, the fp32 log-sum-exp).
    Per pass: a sliding window's mask (chunk x (chunk + window - 1) booleans, one layer at a time), a
    soft cap's fp32 key blocks, and the last position's fp32 logits.
    """
    a, size = args, dtype.itemsize
    mlp = size * (4 * a.dim + 3 * a.intermediate_size)
    attn = (size * (a.n_head + 2 * a.n_kv_head) * a.head_dim + 8 * (a.n_head + a.n_kv_head) * a.head_dim
            + 2 * size * a.n_head * a.head_dim + 4 * a.n_head)
    mask = chunk * (chunk + a.sliding_window - 1) if a.sliding_layers else 0
    blocks = 3 * SHARED_BLOCK_BYTES if a.attn_softcap else 0
    return batch * (chunk * (mlp + attn) + mask + blocks + 2 * 4 * a.vocab_size)


def activation_reserve(args: ModelArgs, dtype, chunk: int, batch: int = 1) -> int:
    """GPU memory kept free for one prefill chunk: its activations, and a margin for the allocator's
    rounding and the kernels' workspaces."""
    return activation_bytes(args, dtype, chunk, batch) + ALLOCATOR_MARGIN


def question_bytes(args: ModelArgs, dtype, n_questions: int, longest: int, room: int, chunk: int) -> tuple[int, int]:
    """What decoding n questions together (generate_many) needs beside the prefix's cache, on the
    compute device: (their own caches: the longest question plus `room` new tokens each, since they
    are left-padded to the longest; the activations of one pass over all of them: n x min(chunk,
    longest) tokens, plus those tokens' fp32 scores over their own slots, three copies live)."""
    own = n_questions * (longest + room) * args.kv_bytes_per_token(dtype)
    tokens = n_questions * min(chunk, longest)
    scores = 3 * tokens * args.n_head * (longest + room) * 4
    return own, activation_reserve(args, dtype, tokens) + scores


def plan_cache(args: ModelArgs, max_len: int, dtype, device, policy: str, gpu_kv_budget: float | None = None,
               prefill_chunk: int | None = None, batch: int = 1,
               questions: tuple[int, int, int] | None = None, rollback: int = 0, draft_bytes: int = 0) -> Plan:
    """The cache plan for a run on this machine, checked against host RAM and (on CUDA) the GPU memory
    left free by the weights and one prefill chunk's activations. gpu_kv_budget is in GiB; by default
    the KV may take all of that free memory. prefill_chunk: by default, on CUDA the largest of
    CHUNK_CHOICES with which the plan fits (a long context's buffers take the room of larger chunks'
    activations), on the CPU CPU_PREFILL_CHUNK; the plan says which (plan.prefill_chunk).

    questions: (n, longest, room) when the cache is the shared prefix of n questions decoded
    together (generate_many): their own caches and activations (question_bytes) are set aside too,
    and a run whose questions alone do not fit is refused here.

    In a tensor-parallel group (tensor_parallel.py) every rank plans its own shard (args is the
    shard's shape) with its own GPU and its share of host RAM, all at once before any allocates, and
    a plan refused on one rank is refused on all.

    Speculative decoding: rollback, the drafts a verification pass may take back (plan_memory);
    draft_bytes, the drafter's own cache on the compute device, set aside like the questions' caches."""
    return agree(lambda: _plan_cache(args, max_len, dtype, device, policy, gpu_kv_budget, prefill_chunk, batch,
                                     questions, rollback, draft_bytes))


def _plan_cache(args, max_len, dtype, device, policy, gpu_kv_budget, prefill_chunk, batch, questions, rollback,
                draft_bytes) -> Plan:
    device = torch.device(device)
    if gpu_kv_budget is not None and not gpu_kv_budget >= 0:
        raise UsageError(f"gpu_kv_budget must be >= 0 GiB, got {gpu_kv_budget}", ("gpu_kv_budget",))
    if gpu_kv_budget is not None and device.type != "cuda":
        raise UsageError(f"gpu_kv_budget needs a CUDA device; on {device} the whole KV cache is in host RAM",
                         ("gpu_kv_budget",))
    host = host_available_bytes()
    if device.type != "cuda":
        chunk = prefill_chunk or default_prefill_chunk(device)
        own = question_bytes(args, dtype, *questions, chunk)[0] if questions else 0
        if host is not None:
            _check_questions(questions, own, own, host, "host RAM")
            _check_draft(draft_bytes, host - own, "host RAM")
            host -= own + draft_bytes
        # On the CPU, head offload shows the method itself: every head streamed.
        overrides = dict(group_size=1, resident=0) if policy == "head" else {}
        plan = plan_memory(args, max_len, dtype, policy, device, batch, host_available=host, prefill_chunk=chunk,
                           rollback=rollback, **overrides)
        return replace(plan, ranks=ranks(), draft_bytes=draft_bytes)
    free = gpu_free_bytes(device)
    chunks = [prefill_chunk] if prefill_chunk else CHUNK_CHOICES
    for chunk in chunks:
        try:
            _check_draft(draft_bytes, free, f"GPU {device}")
            plan = _plan_gpu(args, max_len, dtype, device, policy, gpu_kv_budget, chunk, batch, questions,
                             free - draft_bytes, host, rollback)
            return replace(plan, ranks=ranks(), draft_bytes=draft_bytes)
        except UsageError:
            if chunk == chunks[-1]:  # the smallest chunk's refusal is the one to say
                raise


def _plan_gpu(args, max_len, dtype, device, policy, gpu_kv_budget, chunk, batch, questions, free, host,
              rollback) -> Plan:
    # The prefix is prefilled first, then the questions' caches live through their passes.
    own, question_pass = question_bytes(args, dtype, *questions, chunk) if questions else (0, 0)
    questions_need = own + question_pass
    _check_questions(questions, own, questions_need, free, f"GPU {device}")
    reserve = max(activation_reserve(args, dtype, min(chunk, max_len), batch), questions_need)
    available = max(0, free - reserve)
    budget = available if gpu_kv_budget is None else int(gpu_kv_budget * GiB)
    if budget > available:
        raise UsageError(f"a GPU KV budget of {gpu_kv_budget} GiB exceeds the {fmt_bytes(available)} free on "
                         f"{device} after the weights and one prefill chunk's activations", ("gpu_kv_budget",))
    return plan_memory(args, max_len, dtype, policy, device, batch, gpu_budget=budget, host_available=host,
                       prefill_chunk=chunk, rollback=rollback)


def _check_questions(questions, own: int, need: int, free: int, where: str):
    if questions and need > free:
        n, longest, room = questions
        raise UsageError(f"decoding {n} questions together needs {fmt_bytes(need)} in {where} (their own KV: "
                         f"{fmt_bytes(own)} for {longest} + {room} tokens each) but {fmt_bytes(free)} is free; "
                         f"fewer questions or fewer new tokens would fit", ("max_new_tokens",))


def _check_draft(draft_bytes: int, free: int | None, where: str):
    if draft_bytes and free is not None and draft_bytes > free:
        raise UsageError(f"the drafter's cache needs {fmt_bytes(draft_bytes)} in {where} but {fmt_bytes(free)} is "
                         f"free; a smaller draft_window needs less", ("draft_window",))


def make_cache(plan: Plan, args: ModelArgs) -> KVCache:
    """Allocate the cache a plan describes (it keeps the plan as `cache.plan`); running out of GPU
    memory or of lockable host memory here is reported in one line with the plan."""
    try:
        if plan.policy == "none":
            cache = StandardCache(args, plan.batch, plan.max_len, plan.device, plan.dtype, rollback=plan.rollback)
        elif plan.policy == "layer":
            cache = LayerOffloadCache(args, plan.batch, plan.max_len, plan.device, plan.dtype, rollback=plan.rollback)
        else:
            cache = HeadOffloadCache(args, plan.batch, plan.max_len, plan.device, plan.dtype, plan.group_size,
                                     plan.resident_slots, rollback=plan.rollback)
        cache.plan = plan
        return cache
    except torch.cuda.OutOfMemoryError:
        raise UsageError(f"out of GPU memory allocating the KV cache ({plan.describe()}); a smaller GPU KV budget "
                         f"would leave more room", ("gpu_kv_budget",)) from None
    except MemoryError as e:  # cudaHostRegister failing (offload.pinned_empty): pinned memory is never swapped
        raise UsageError(f"could not pin {fmt_bytes(plan.store_bytes)} of host memory for the KV store ({e}); "
                         f"a shorter context needs less") from None
