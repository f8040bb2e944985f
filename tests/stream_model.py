"""A CPU model of CUDA stream ordering, standing in for offload.CudaStreams in the tests.

On a GPU the compute stream, the H2D stream and the D2H stream run side by side; only events order
them. On the CPU everything happens in program order, so a missing wait cannot show. This model
brings it out in two ways at once:

- Timing. A copy runs at the *latest* moment CUDA allows (mode "latest": when the compute stream
  waits for an event recorded after it, when a later copy on another stream waits for it, or at a
  synchronize) or the *earliest* (mode "earliest": as soon as it is issued). A compute read that
  no wait orders after its copy then sees a stale buffer or store, and the logits are wrong.
- Races. Every access to memory a copy touches is checked with vector clocks (one per stream, joined
  by event waits, as in CUDA's happens-before): the compute stream's accesses are seen through a
  TorchDispatchMode, the copies' through the model. Two accesses to overlapping bytes, one of them a
  write, that no chain of events orders, raise StreamRace at the second, whatever the timing; this
  catches what the timing cannot show on a CPU, such as a copy into a buffer that attention may still
  be reading (the compute is always done when the CPU issues the copy).

Use it through the `streams` fixture of test_streams.py, or `with StreamModel(mode) as model:`
while a HeadOffloadCache is made (offload.copy_streams is replaced for the duration).
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

import attention
import offload

COMPUTE, H2D, D2H = "compute", "h2d", "d2h"
STREAMS = (COMPUTE, H2D, D2H)


class StreamRace(AssertionError):
    pass


class Event:
    def __init__(self):
        self.clock = None  # the recording stream's vector clock when it was last recorded
        self.op = None     # the copy it was recorded after (None: on the compute stream, done at once)


class Stream:
    def __init__(self, name):
        self.name, self.queue = name, []  # copies issued but not run yet, in order


class Copy:
    def __init__(self, stream, pairs, waits):
        self.stream, self.pairs, self.waits, self.done = stream, pairs, waits, False


def _span(t: torch.Tensor) -> tuple[int, int, int]:
    """(storage, first byte, last byte + 1) of what t covers, strides included (a bounding box)."""
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
    first = t.data_ptr()
    return t.untyped_storage().data_ptr(), first, first + extent * t.element_size()


class StreamModel(TorchDispatchMode):
    """offload.CudaStreams' interface (copy, record, wait, synchronize, event, share) on the CPU."""

    def __init__(self, mode="latest", check_races=True):
        super().__init__()
        assert mode in ("latest", "earliest")
        self.mode, self.check_races = mode, check_races
        self.h2d, self.d2h = Stream(H2D), Stream(D2H)
        # Vector clocks: clock[s][t] is the last access time of stream t that stream s is ordered after
        # (-1: none yet); clock[s][s] is the time stamped on s's own accesses, advanced by each record.
        self.clock = {s: {t: 0 if t == s else -1 for t in STREAMS} for s in STREAMS}
        self.history = {}     # storage -> [(stream, time, first, last, is_write)] of accesses not yet ordered for all
        self.host = set()     # storages in host memory (the stores): the host's own accesses are synchronous
        self.kept = {}        # the storages in history, held so that their memory is not handed out again
        self.dropped = set()  # ids of events whose waits are skipped (the mutation tests)
        self.copies = 0       # copies issued: a test can check that the model was used
        self._running = False

    # --- the interface offload.HeadOffloadCache calls ---------------------------------------------

    def __enter__(self):
        self._saved = offload.copy_streams, attention._lower_right
        offload.copy_streams = lambda device: self
        attention._lower_right = _mask_outside_the_mode
        return super().__enter__()

    def __exit__(self, *exc):
        offload.copy_streams, attention._lower_right = self._saved
        return super().__exit__(*exc)

    def event(self):
        return Event()

    def share(self, tensors):
        pass

    def drop_waits_on(self, events):
        """Mutation: every wait on these events is skipped (the cache as if the wait were deleted)."""
        self.dropped.update(id(e) for e in events)

    def copy(self, stream, pairs, after=(), done=()):
        self.copies += 1
        waits = [e for e in after if e.clock is not None and id(e) not in self.dropped]
        for e in waits:
            self._join(stream.name, e)
        op = Copy(stream, pairs, waits)
        for dst, src in pairs:  # the copy's accesses, at its place in its stream's order
            self.host.add((src if stream is self.h2d else dst).untyped_storage().data_ptr())
            self._access(stream.name, src, write=False)
            self._access(stream.name, dst, write=True)
        stream.queue.append(op)
        for e in done:
            self._record(e, stream.name, op)
        if self.mode == "earliest":
            self._run(op)

    def record(self, event):
        self._record(event, COMPUTE, None)

    def wait(self, event):
        if event.clock is None or id(event) in self.dropped:
            return
        self._join(COMPUTE, event)
        if event.op is not None:
            self._run(event.op)

    def synchronize(self):
        for stream in (self.h2d, self.d2h):
            while stream.queue:
                self._run(stream.queue[-1])
        for s in (H2D, D2H):  # the host (the compute stream's program order) has seen every copy
            self._merge(COMPUTE, self.clock[s])

    # --- timing -------------------------------------------------------------------------------------

    def _run(self, op: Copy):
        """Run `op` now, and before it what CUDA must run first: its stream's earlier copies and the
        copies of other streams it waits for."""
        if op.done:
            return
        stream = op.stream
        while stream.queue and not op.done:
            first = stream.queue[0]
            for e in first.waits:
                if e.op is not None:
                    self._run(e.op)
            self._running = True
            try:
                for dst, src in first.pairs:
                    dst.copy_(src)
            finally:
                self._running = False
            first.done = True
            stream.queue.pop(0)

    # --- races: vector clocks ------------------------------------------------------------------------

    def _record(self, event, stream_name, op):
        event.clock, event.op = dict(self.clock[stream_name]), op
        self.clock[stream_name][stream_name] += 1

    def _join(self, stream_name, event):
        self._merge(stream_name, event.clock)

    def _merge(self, stream_name, clock):
        mine = self.clock[stream_name]
        for s, t in clock.items():
            mine[s] = max(mine[s], t)

    def _access(self, stream_name, t: torch.Tensor, write: bool):
        if not self.check_races or not t.numel():
            return
        storage, first, last = _span(t)
        if stream_name == COMPUTE and storage not in self.history:
            return  # memory no copy has touched: nothing to race with
        mine = self.clock[stream_name]
        kept = []
        for entry in self.history.get(storage, []):
            other, time, f, l, w = entry
            if other != stream_name and (write or w) and f < last and first < l and mine[other] < time:
                kind = "write" if write else "read"
                raise StreamRace(f"{stream_name} {kind} of bytes [{first}, {last}) races with a "
                                 f"{'write' if w else 'read'} on {other}: no event orders them")
            # an access every other stream has already synchronized with can never race again
            if not all(self.clock[s][other] >= time for s in STREAMS if s != other):
                kept.append(entry)
        if not (stream_name == COMPUTE and storage in self.host):
            # (the host's reads and writes of a store are done before it issues anything after them)
            kept.append((stream_name, mine[stream_name], first, last, write))
        self.history[storage] = kept
        self.kept.setdefault(storage, t.untyped_storage())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._running and not func.is_view and self.history:
            schema = func._schema.arguments
            named = dict(zip((a.name for a in schema), args)) | kwargs
            for a in schema:
                value = named.get(a.name)
                write = a.alias_info is not None and a.alias_info.is_write
                for t in tree_leaves(value):
                    if isinstance(t, torch.Tensor):
                        self._access(COMPUTE, t, write)
        return func(*args, **kwargs)


def _mask_outside_the_mode(T, S, lower_right=attention._lower_right):
    """torch's CausalBias is a Tensor subclass made by the legacy constructor, which cannot run under a
    dispatch mode; the mask holds no data the copies touch, so it is made with the mode paused."""
    with _disable_current_modes():
        return lower_right(T, S)
