"""KV cache policies: where keys and values live. Attention over them is attention.py's.

All policies share one interface, `cache(layer, q, k, v) -> out` with q [B, n_head, T, D] and
k/v [B, n_kv_head, T, D] for the T new tokens: the cache stores the new K/V and returns attention of
q over everything stored so far (causal, the query block aligned to the end of the keys).

- StandardCache:    everything on the device (the reference, and the fastest when it fits).
- HeadOffloadCache: HeadInfer (arXiv 2502.12574, Sec. 4). The cache of each (layer, KV head) slot
                    lives in pinned CPU memory and streams to the GPU one head group at a time through
                    two ping-pong buffers, the next group's copy overlapping the current group's
                    attention. Slots that fit the GPU budget stay resident and are never copied.
- LayerOffloadCache: the paper's layer-wise offload baseline: the same engine with one group per layer.

Reading order: KVCache (the interface and the bookkeeping every policy shares), StandardCache (what
a policy does, in 30 lines), then HeadOffloadCache, the HeadInfer method itself: its __init__ lays
out the memory (resident slots, one pinned block of per-group stores, two buffers), attend() is one
layer's attention, and _streamed() is the pipeline (prefetch the next group, wait for this one's
copy, attend, copy the new rows back); the copy streams (CUDA's, or the CPU's plain copies) follow
it. Then the baseline, the sliding-window rings (a few layers of some models, on the device under
every policy) and the custom op that torch.compile sees.

The cache owns its position: it advances by T once the last layer has attended. Besides attention,
every cache offers the same small surface for code that keeps a cache beyond one call: `length`,
`read` and `write` of a layer's K/V rows in one canonical layout ([B, n_kv_head, T, D]), and
`truncate`. A batch-1 cache can also be the shared prefix of many sequences: `attend_shared` attends
their queries over it without storing anything (shared_prefix.py). Which memory (planning) a cache
gets is planner.py's business.
"""
import ctypes
import weakref

import torch
from torch import Tensor

from attention import attention, shared_attention
from model import ModelArgs


class KVCache:
    """Shared plumbing: position bookkeeping, the public read/write surface, and the opaque op that
    torch.compile sees. Subclasses say where each layer's heads live (`_parts`) and how to attend."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device, dtype, rollback: int = 0):
        self.args, self.batch, self.max_len = args, batch, max_len
        self.device, self.dtype = torch.device(device), dtype
        self.rep = args.n_head // args.n_kv_head
        self.variant = dict(scale=args.attention_scale, softcap=args.attn_softcap)  # every layer's attention
        self.length = 0  # tokens stored in every layer; read it, change it with write/truncate
        # The sliding-window layers keep their last tokens in rings of their own, whatever the policy;
        # the policy holds the global layers (args.global_layers). rollback: the positions a truncate
        # may take back after a verification pass of speculative decoding, which the rings keep too.
        self.windows = (SlidingWindows(args, batch, max_len, self.device, dtype, rollback) if args.sliding_layers
                        else None)
        self.handle = _register(self)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            # Opaque to the compiler: streams, events and host-side bookkeeping stay in eager mode,
            # the rest of the decode step compiles into one graph.
            return torch.ops.headinfer.attend(q, k, v, self.handle, layer)
        return self._attend_and_advance(layer, q, k, v)

    @torch.no_grad()  # the cache is inference memory: outside no_grad, writes into its views would build a graph
    def _attend_and_advance(self, layer, q, k, v):
        T = q.shape[2]
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {T} tokens > max_len {self.max_len}")
        if self.args.window(layer) is not None:
            out = self.windows.attend(layer, q, k, v, self.length, self.variant)
        else:
            out = self.attend(layer, q, k, v)
        if layer == self.args.n_layer - 1:
            self.length += T
        return out

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def attend_shared(self, layer: int, q: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """shared_attention of q [B, n_head, T, D], at positions [B, T], over everything this batch-1
        cache holds, storing nothing: the cache is the shared prefix of B sequences (shared_prefix.py).
        In a sliding-window layer each query sees the prefix's tokens within its window only."""
        if self.args.window(layer) is not None:
            return self.windows.attend_shared(layer, q, positions, self.length, self.variant)
        return self._attend_shared(layer, q)

    def _attend_shared(self, layer: int, q: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # --- the public surface: a layer's K/V rows in one layout, whatever the policy -----------------

    def read(self, layer: int, start: int = 0, end: int | None = None, device=None) -> tuple[Tensor, Tensor]:
        """Copies of K and V for positions [start, end) of `layer`, each [B, n_kv_head, end - start, D],
        on `device` (default: the cache's; "cpu" takes the stored rows without a round trip through
        the GPU). end defaults to the length."""
        end = self.length if end is None else end
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"cannot read positions [{start}, {end}) of a cache holding {self.length}")
        self._settle()
        device = self.device if device is None else torch.device(device)
        if self.args.window(layer) is not None:
            rows = self.windows.rows(layer, start, end, self.length)
            return tuple(t.transpose(1, 2).to(device).contiguous() for t in rows)
        shape = (self.batch, self.args.n_kv_head, end - start, self.args.head_dim)
        k, v = (torch.empty(shape, device=device, dtype=self.dtype) for _ in range(2))
        for k_part, v_part, h0, h1 in self._parts(layer):
            k[:, h0:h1] = k_part[:, start:end].transpose(1, 2)
            v[:, h0:h1] = v_part[:, start:end].transpose(1, 2)
        return k, v

    @torch.no_grad()
    def write(self, layer: int, start: int, k: Tensor, v: Tensor):
        """Store K and V ([B, n_kv_head, T, D], any device) at positions [start, start + T) of `layer`.

        start may not leave a gap after the stored tokens. As in attention, the length covers the new
        positions once the last layer has them: write every layer, the last one last."""
        T = k.shape[2]
        expected = (self.batch, self.args.n_kv_head, T, self.args.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"write takes K and V of shape {list(expected)}, got {list(k.shape)} and {list(v.shape)}")
        if not 0 <= start <= self.length or start + T > self.max_len:
            raise ValueError(f"cannot write positions [{start}, {start + T}) into a cache holding {self.length} "
                             f"of at most {self.max_len}")
        self._settle()
        if self.args.window(layer) is not None:
            self.windows.store(layer, start, k.transpose(1, 2), v.transpose(1, 2), max(self.length, start + T))
        for k_part, v_part, h0, h1 in self._parts(layer):
            k_part[:, start:start + T] = k[:, h0:h1].transpose(1, 2)
            v_part[:, start:start + T] = v[:, h0:h1].transpose(1, 2)
        if layer == self.args.n_layer - 1:
            self.length = max(self.length, start + T)

    def truncate(self, length: int):
        """Forget every position from `length` on; the next tokens are stored from there.

        A sliding-window layer keeps only its last tokens: when it no longer holds the window before
        `length` (going back more than one token past a full window), everything is forgotten
        (length 0), and the next prefill computes it all again."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache holding {self.length} positions to {length}")
        self._settle()
        if self.windows is not None and not self.windows.holds_window_before(length):
            length = 0
        if self.windows is not None and length == 0:
            self.windows.forget()
        self.length = length

    def _parts(self, layer: int):
        """(K, V, first head, last head + 1) for every place a global layer's heads live, each
        [B, max_len, heads, D] (none for a sliding-window layer: its ring is self.windows')."""
        raise NotImplementedError

    def _settle(self):
        """Before rows are read or replaced from outside: copies still in flight must land first."""


class StandardCache(KVCache):
    """All K/V preallocated on the device: [global layer][B, max_len, n_kv, D], token-major like the offload store."""

    def __init__(self, args, batch, max_len, device, dtype, rollback: int = 0):
        super().__init__(args, batch, max_len, device, dtype, rollback)
        self.slot = {layer: i for i, layer in enumerate(args.global_layers)}
        shape = (len(self.slot), batch, max_len, args.n_kv_head, args.head_dim)
        self.k = host_or_device_empty(shape, self.device, dtype)
        self.v = host_or_device_empty(shape, self.device, dtype)
        kv_bytes = 2 * self.k.nbytes + _window_bytes(self)
        on_gpu = self.device.type == "cuda"
        self.gpu_bytes, self.host_bytes = (kv_bytes, 0) if on_gpu else (0, kv_bytes)
        self.store_bytes = 0  # nothing is streamed

    def attend(self, layer, q, k, v):
        i, start, end = self.slot[layer], self.length, self.length + q.shape[2]
        self.k[i, :, start:end] = k.transpose(1, 2)
        self.v[i, :, start:end] = v.transpose(1, 2)
        return attention(q, self.k[i, :, :end].transpose(1, 2), self.v[i, :, :end].transpose(1, 2), **self.variant)

    def _attend_shared(self, layer, q):
        i, n = self.slot[layer], self.length
        return shared_attention(q, self.k[i, :, :n].transpose(1, 2), self.v[i, :, :n].transpose(1, 2), **self.variant)

    def _parts(self, layer):
        if layer in self.slot:
            yield self.k[self.slot[layer]], self.v[self.slot[layer]], 0, self.args.n_kv_head


class HeadOffloadCache(KVCache):
    """Head-wise offload (HeadInfer) with resident slots, ping-pong buffers and prefetch.

    Layer l keeps its first `resident[l]` KV heads on the GPU; its other heads are split into groups
    of `group_size` and stored in CPU memory (pinned when CUDA is used), each group token-major
    [B, max_len, g, D] so that the prefix of S tokens is one contiguous copy. Streamed groups run
    in a fixed order (layer by layer); the copy of group i+1 is in flight while group i computes,
    and the last group of a step prefetches the first group of the next step. The new rows go back
    on a stream of their own, so that a prefill chunk's write-back never queues ahead of the next
    group's copy.
    """

    def __init__(self, args, batch, max_len, device, dtype, group_size: int, resident, rollback: int = 0):
        super().__init__(args, batch, max_len, device, dtype, rollback)
        n_kv, D = args.n_kv_head, args.head_dim
        if isinstance(resident, int):
            resident = spread_resident(resident, args)
        if (not 1 <= group_size <= n_kv or len(resident) != args.n_layer or not all(0 <= r <= n_kv for r in resident)
                or any(resident[l] for l in args.sliding_layers)):
            raise ValueError(f"bad head grouping: group_size={group_size}, resident={resident}")
        self.group_size, self.resident = group_size, list(resident)
        cuda = self.device.type == "cuda"
        # Resident slots: one device tensor per layer holding that layer's first resident[l] heads.
        self.res_k = [host_or_device_empty((batch, max_len, r, D), self.device, dtype) for r in resident]
        self.res_v = [host_or_device_empty((batch, max_len, r, D), self.device, dtype) for r in resident]
        self.units = [(l, h, min(h + group_size, n_kv))
                      for l in args.global_layers for h in range(resident[l], n_kv, group_size)]
        # Streamed slots: the unit of transfer is (layer, head range); one host block holds all of
        # them, pinned so that copies are asynchronous DMA.
        unit_numel = [batch * max_len * (h1 - h0) * D for _, h0, h1 in self.units]
        pin = cuda and bool(self.units)  # all heads resident: nothing to pin (cudaHostRegister rejects 0 bytes)
        block = pinned_empty(2 * sum(unit_numel), dtype) if pin else host_or_device_empty(
            (2 * sum(unit_numel),), torch.device("cpu"), dtype)
        views = block.split(unit_numel * 2)
        self.store_k = [t.view(batch, max_len, -1, D) for t in views[: len(self.units)]]
        self.store_v = [t.view(batch, max_len, -1, D) for t in views[len(self.units):]]
        self.units_of_layer = [[i for i, u in enumerate(self.units) if u[0] == l] for l in range(args.n_layer)]
        # Ping-pong buffers, flat so a smaller last group can view them with its own head count.
        n_buf = 2 if self.units else 0
        buf_numel = batch * max_len * group_size * D
        self.buf_k = [host_or_device_empty((buf_numel,), self.device, dtype) for _ in range(n_buf)]
        self.buf_v = [host_or_device_empty((buf_numel,), self.device, dtype) for _ in range(n_buf)]
        self.streams = copy_streams(self.device)
        self.streams.share(self.buf_k + self.buf_v)
        if pin:
            weakref.finalize(self, _unpin, block, self.streams)
        # The events that order the three streams (compute, H2D, D2H); all are device-side waits.
        event = self.streams.event
        self.copied = [event() for _ in range(n_buf)]    # H2D into the buffer done: attention may read it
        self.attended = [event() for _ in range(n_buf)]  # compute done with the buffer (new rows written in)
        self.released = [event() for _ in range(n_buf)]  # D2H of the buffer's new rows done: it may be refilled
        self.stored = [event() for _ in self.units]      # the unit's store holds every row written so far
        self.tick = 0            # streamed units processed so far; buffer = tick % 2
        self.in_flight = None    # (tick, unit, prefix length) whose H2D copy is enqueued
        res_bytes = sum(t.nbytes for t in self.res_k + self.res_v)
        buf_bytes = sum(t.nbytes for t in self.buf_k + self.buf_v)
        store_bytes = sum(t.nbytes for t in self.store_k + self.store_v)
        self.store_bytes = store_bytes  # the streamed slots, in host RAM
        on_device = res_bytes + buf_bytes + _window_bytes(self)
        self.gpu_bytes = on_device if cuda else 0
        self.host_bytes = store_bytes + (0 if cuda else on_device)

    def _view(self, flat: Tensor, unit: int, length: int) -> Tensor:
        _, h0, h1 = self.units[unit]
        return flat[: self.batch * self.max_len * (h1 - h0) * self.args.head_dim].view(
            self.batch, self.max_len, h1 - h0, self.args.head_dim)[:, :length]

    def _prefetch(self, tick: int, unit: int, length: int):
        """Enqueue the H2D copy of `unit`'s first `length` tokens into buffer tick % 2, once the buffer's
        previous readers (attention, the write-back) are done and the unit's store has its newest rows."""
        b = tick % 2
        pairs = [(self._view(buf, unit, length)[i], store[i, :length])  # per batch row: one contiguous memcpy
                 for buf, store in ((self.buf_k[b], self.store_k[unit]), (self.buf_v[b], self.store_v[unit]))
                 for i in range(self.batch)] if length else []
        self.streams.copy(self.streams.h2d, pairs, after=(self.attended[b], self.released[b], self.stored[unit]),
                          done=(self.copied[b],))
        self.in_flight = (tick, unit, length)

    def attend(self, layer, q, k, v):
        start, end = self.length, self.length + q.shape[2]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, T, n_kv, D], token-major like the stores
        outs = []
        r = self.resident[layer]
        if r:
            self.res_k[layer][:, start:end] = k[:, :, :r]
            self.res_v[layer][:, start:end] = v[:, :, :r]
            outs.append(attention(q[:, : r * self.rep], self.res_k[layer][:, :end].transpose(1, 2),
                                  self.res_v[layer][:, :end].transpose(1, 2), **self.variant))
        for h0, h1, buf_k, buf_v in self._streamed(layer, k, v):
            outs.append(attention(q[:, h0 * self.rep: h1 * self.rep], buf_k, buf_v, **self.variant))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _attend_shared(self, layer, q):
        outs = []
        r, n = self.resident[layer], self.length
        if r:
            outs.append(shared_attention(q[:, : r * self.rep], self.res_k[layer][:, :n].transpose(1, 2),
                                         self.res_v[layer][:, :n].transpose(1, 2), **self.variant))
        for h0, h1, buf_k, buf_v in self._streamed(layer):
            outs.append(shared_attention(q[:, h0 * self.rep: h1 * self.rep], buf_k, buf_v, **self.variant))
        return tuple(torch.cat(parts, dim=1) for parts in zip(*outs))

    def _streamed(self, layer, k=None, v=None):
        """Yield (first head, last head + 1, K, V) for each streamed group of `layer`, K/V [B, g, S, D] in
        a device buffer: the stored rows, then the new rows k/v ([B, T, n_kv, D]; none for a read-only
        pass). Between two yields the caller attends; the new rows then go back to the store."""
        start = self.length
        end = start + (0 if k is None else k.shape[1])
        for unit in self.units_of_layer[layer]:
            _, h0, h1 = self.units[unit]
            b = self.tick % 2
            if self.in_flight != (self.tick, unit, start):
                self._prefetch(self.tick, unit, start)
            last = unit + 1 == len(self.units)
            if not last:  # keep the pipeline one unit ahead: this copy overlaps the caller's attention
                self._prefetch(self.tick + 1, unit + 1, start)
            self.streams.wait(self.copied[b])
            buf_k, buf_v = self._view(self.buf_k[b], unit, end), self._view(self.buf_v[b], unit, end)
            if k is not None:
                buf_k[:, start:end] = k[:, :, h0:h1]
                buf_v[:, start:end] = v[:, :, h0:h1]
            try:
                yield h0, h1, buf_k.transpose(1, 2), buf_v.transpose(1, 2)
            finally:  # also when the caller's attention failed: what it queued must end before a reuse
                self.streams.record(self.attended[b])
            if k is not None:
                # Only the new tokens go back to the CPU store, copied from the buffer (not from the
                # short-lived k/v, whose memory the allocator could hand out again meanwhile).
                pairs = [(store[i, start:end], buf[i, start:end])
                         for store, buf in ((self.store_k[unit], buf_k), (self.store_v[unit], buf_v))
                         for i in range(self.batch)]
                self.streams.copy(self.streams.d2h, pairs, after=(self.attended[b],),
                                  done=(self.released[b], self.stored[unit]))
            if last:  # the next step's first unit, after this step's new rows are in its store
                self._prefetch(self.tick + 1, 0, end)
            self.tick += 1

    def _parts(self, layer):
        if self.resident[layer]:
            yield self.res_k[layer], self.res_v[layer], 0, self.resident[layer]
        for unit in self.units_of_layer[layer]:
            _, h0, h1 = self.units[unit]
            yield self.store_k[unit], self.store_v[unit], h0, h1

    def _settle(self):
        # Rows still travelling to or from the stores land first, and a prefetched buffer may hold
        # rows that are about to change: the next attention copies its unit again.
        self.streams.synchronize()
        self.in_flight = None


def spread_resident(n_resident: int, args: ModelArgs) -> list[int]:
    """Resident slots per layer, spread evenly over the global layers so that each streams about the
    same bytes (a sliding-window layer has none: its ring is always on the device)."""
    layers = args.global_layers
    n_resident = max(0, min(n_resident, len(layers) * args.n_kv_head))
    per_layer = [0] * args.n_layer
    for i, l in enumerate(layers):
        per_layer[l] = n_resident // len(layers) + (i < n_resident % len(layers))
    return per_layer


# --- HeadOffloadCache's plumbing: the copy streams, pinned stores -------------------------------
# Every copy and every ordering between the streams goes through one of these two objects, so that
# the order can be checked without a GPU: tests/stream_model.py stands in for CudaStreams on the CPU,
# running each copy at the latest (or earliest) moment CUDA would allow and flagging any access that
# no event orders.

def copy_streams(device: torch.device):
    return CudaStreams(device) if device.type == "cuda" else HostCopies()


class CudaStreams:
    """Copies beside the compute (the device's current stream): H2D prefetches on one stream, D2H
    write-backs on another. Streams order each other only through events, device-side waits that
    never stop the host."""

    def __init__(self, device: torch.device):
        self.device = device
        self.h2d, self.d2h = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def event(self):
        return torch.cuda.Event()

    def share(self, tensors):
        """Device memory the copy streams also use: freed only once their queued copies are done."""
        for t in tensors:
            t.record_stream(self.h2d)
            t.record_stream(self.d2h)

    def copy(self, stream, pairs, after=(), done=()):
        """On `stream`: wait for the events `after` (an event never recorded is no wait), copy each
        (dst, src) pair, then record the events `done`."""
        with torch.cuda.stream(stream):
            for event in after:
                stream.wait_event(event)
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)  # pinned host memory: asynchronous DMA
            for event in done:
                event.record(stream)

    def record(self, event):
        """Record `event` on the compute stream (the current stream of the cache's device, which need
        not be the current device)."""
        event.record(torch.cuda.current_stream(self.device))

    def wait(self, event):
        """Make the compute stream wait for `event`: a device-side wait, not a host sync."""
        torch.cuda.current_stream(self.device).wait_event(event)

    def synchronize(self):
        self.h2d.synchronize()
        self.d2h.synchronize()


class HostCopies:
    """On the CPU the compute is the copier: every copy happens when it is issued, in program order,
    which is all the ordering the events would give."""
    h2d = d2h = None

    def event(self):
        return None

    def share(self, tensors):
        pass

    def copy(self, stream, pairs, after=(), done=()):
        for dst, src in pairs:
            dst.copy_(src)

    def record(self, event):
        pass

    def wait(self, event):
        pass

    def synchronize(self):
        pass


def pinned_empty(numel: int, dtype: torch.dtype) -> Tensor:
    """A host tensor page-locked at exactly its size.

    torch's pinned allocator rounds each block up to a power of two, so a 600K-token store would
    pin as much RAM as a 1M one; registering ordinary memory with CUDA pins what is used, no more.
    """
    t = torch.empty(numel, dtype=dtype)  # registering locks (and so commits) every page
    runtime = cuda_runtime()
    err = runtime.host_register(t.data_ptr(), t.nbytes, HOST_REGISTER_PORTABLE)
    if err:
        # A failed runtime call stays the thread's "last error", which the next kernel launch's check
        # would report as its own failure: clear it, and say what failed here.
        runtime.clear_last_error()
        raise MemoryError(f"cudaHostRegister failed (CUDA error {err}) pinning {t.nbytes / 2**30:.2f} GiB")
    return t


def _unpin(block: Tensor, streams: CudaStreams):
    try:
        streams.synchronize()  # no DMA may still target the block when it is unregistered and freed
    finally:  # a failed synchronize must not leave the pages locked for the rest of the process
        cuda_runtime().host_unregister(block.data_ptr())


HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every device's copies, not the current one's only


class _CudaRuntime:
    """The three runtime calls pinning needs: torch binds cudaHostRegister and cudaHostUnregister, not
    cudaGetLastError (the call that clears an error), which is taken from the libcudart torch loaded."""

    def host_register(self, ptr: int, nbytes: int, flags: int) -> int:
        return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, flags))

    def host_unregister(self, ptr: int) -> int:
        return int(torch.cuda.cudart().cudaHostUnregister(ptr))

    def clear_last_error(self):
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
        for path in paths:  # the process's own copy: loading it again returns the same library
            ctypes.CDLL(path).cudaGetLastError()


def cuda_runtime():
    return _CudaRuntime()


# --- the layer-wise baseline, the sliding-window rings, cache memory ------------------------------

class LayerOffloadCache(HeadOffloadCache):
    """The layer-wise offload baseline: each layer's whole KV is one streamed unit, nothing resident."""

    def __init__(self, args, batch, max_len, device, dtype, rollback: int = 0):
        super().__init__(args, batch, max_len, device, dtype, group_size=args.n_kv_head, resident=0, rollback=rollback)


class SlidingWindows:
    """The K/V of the sliding-window layers. A query of such a layer sees only itself and the W - 1
    tokens before it, so the layer keeps its last W tokens, in a ring of W rows per layer (position p
    in row p mod W): memory fixed by the window, not the context, and small enough to stay on the
    compute device, so nothing of it streams, whatever the policy.

    Decode writes the new token over the oldest and attends over the whole ring, without a mask: it
    holds exactly the window (in ring order, which the softmax does not see). A prefill chunk
    attends over the window before it, gathered in position order, then its own tokens, with the
    window's mask; then its last W tokens replace the ring's oldest. With `rollback` rows more (for
    speculative decoding: a truncate may take back that many positions, and the window before them must
    still be there), a ring holds more than the window, and decode takes the prefill chunk's way.
    """

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 rollback: int = 0):
        self.window = args.sliding_window
        self.size = min(args.sliding_window + rollback, max_len)  # rows per ring: no more than the cache can hold
        self.ring = {layer: i for i, layer in enumerate(args.sliding_layers)}
        shape = (len(self.ring), batch, self.size, args.n_kv_head, args.head_dim)
        self.k = host_or_device_empty(shape, device, dtype)
        self.v = host_or_device_empty(shape, device, dtype)
        self.nbytes = self.k.nbytes + self.v.nbytes
        # Per ring, the newest position ever written, plus one: the ring still has positions from
        # written - size on (older rows were overwritten), even after a truncate, or a pass that
        # failed after some layers had stored their rows.
        self.written = [0] * len(self.ring)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, start: int, variant: dict) -> Tensor:
        """attention() of q over the window of the T new tokens at positions [start, start + T), as in
        KVCache.attend (k/v [B, n_kv, T, D]), storing them."""
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, T, n_kv, D], token-major like the ring
        T = k.shape[1]
        if T == 1 and min(start + 1, self.size) <= self.window:  # the ring holds the window and nothing else
            i = self.ring[layer]
            self._check_holds(layer, max(0, start - self.window + 1), start, start)
            self.k[i, :, start % self.size], self.v[i, :, start % self.size] = k[:, 0], v[:, 0]
            self.written[i] = max(self.written[i], start + 1)
            held = min(start + 1, self.size)
            return attention(q, self.k[i, :, :held].transpose(1, 2), self.v[i, :, :held].transpose(1, 2), **variant)
        before_k, before_v = self.rows(layer, max(0, start - self.window + 1), start, start)
        keys, values = torch.cat([before_k, k], dim=1), torch.cat([before_v, v], dim=1)
        out = attention(q, keys.transpose(1, 2), values.transpose(1, 2), window=self.window, **variant)
        self.store(layer, start, k, v, start + T)
        return out

    def attend_shared(self, layer: int, q: Tensor, positions: Tensor, length: int, variant: dict):
        """shared_attention of q [B, n_head, T, D] at positions [B, T] (all after the prefix) over the
        window's end of a batch-1 prefix of `length` tokens: the ring's rows, in order."""
        first = max(0, length - self.size)
        k, v = self.rows(layer, first, length, length)
        first_seen = (positions - self.window + 1 - first).clamp(min=0)  # index into the rows
        return shared_attention(q, k.transpose(1, 2), v.transpose(1, 2), first_seen=first_seen, **variant)

    def rows(self, layer: int, start: int, end: int, length: int) -> tuple[Tensor, Tensor]:
        """Copies of K and V [B, end - start, n_kv, D] at positions [start, end), in order, from a ring
        holding `length` positions (of which it has the last `size`)."""
        self._check_holds(layer, start, end, length)
        slots = torch.arange(start, end, device=self.k.device) % self.size
        i = self.ring[layer]
        return self.k[i][:, slots], self.v[i][:, slots]

    def _check_holds(self, layer: int, start: int, end: int, length: int):
        oldest = max(0, max(length, self.written[self.ring[layer]]) - self.size)
        if start < end and start < oldest:
            raise ValueError(f"layer {layer} has a {self.window}-token sliding window and keeps positions "
                             f"[{oldest}, {length}) only; [{start}, {end}) was asked for")

    def store(self, layer: int, start: int, k: Tensor, v: Tensor, length: int):
        """Put rows k/v [B, T, n_kv, D] of positions [start, start + T) into a ring that will hold
        `length` positions: only those among its last `size` are kept."""
        first = max(start, length - self.size)
        slots = torch.arange(first, start + k.shape[1], device=self.k.device) % self.size
        i = self.ring[layer]
        self.k[i][:, slots], self.v[i][:, slots] = k[:, first - start:].to(self.k), v[:, first - start:].to(self.v)
        self.written[i] = max(self.written[i], start + k.shape[1])

    def holds_window_before(self, position: int) -> bool:
        """Whether every ring still has the W - 1 positions before `position`."""
        return max(0, position - self.window + 1) >= max(0, max(self.written) - self.size)

    def forget(self):
        """Nothing is held any more (the cache is empty): every row may be written afresh."""
        self.written = [0] * len(self.ring)


def _window_bytes(cache: KVCache) -> int:
    return 0 if cache.windows is None else cache.windows.nbytes


def host_or_device_empty(shape, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Cache memory, committed now. The OS backs untouched host pages lazily: an `empty` store would
    pass the plan's RAM check, then grow with every token and could be OOM-killed hours into a run.
    Device memory (and pinned host memory) is committed when allocated, so no fill is needed there."""
    if device.type == "cpu":
        return torch.zeros(shape, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


# --- the opaque op seen by torch.compile ----------------------------------------------------------
# A custom op takes tensors and plain values, not Python objects, so caches are looked up by a small
# integer handle. The registry holds them weakly and a freed handle is reused, so the next
# generate() call's cache gets the same handle and the compiled decode step does not recompile.
_CACHES: "weakref.WeakValueDictionary[int, KVCache]" = weakref.WeakValueDictionary()


def _register(cache: KVCache) -> int:
    handle = next(i for i in range(len(_CACHES) + 1) if i not in _CACHES)
    _CACHES[handle] = cache
    return handle


@torch.library.custom_op("headinfer::attend", mutates_args=())
def _attend_op(q: Tensor, k: Tensor, v: Tensor, handle: int, layer: int) -> Tensor:
    return _CACHES[handle]._attend_and_advance(layer, q, k, v).contiguous()


@_attend_op.register_fake
def _(q, k, v, handle, layer):
    return q.new_empty(q.shape)
