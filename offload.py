"""KV cache policies: where keys and values live, and attention over them.

All policies share one interface, `cache(layer, q, k, v) -> out` with q [B, n_head, T, D] and
k/v [B, n_kv_head, T, D] for the T new tokens: the cache stores the new K/V and returns attention of
q over everything stored so far (causal, the query block aligned to the end of the keys).

- StandardCache:    everything on the device (the reference, and the fastest when it fits).
- HeadOffloadCache: HeadInfer (arXiv 2502.12574, Sec. 4). The cache of each (layer, KV head) slot
                    lives in pinned CPU memory and streams to the GPU one head group at a time through
                    two ping-pong buffers, the next group's copy overlapping the current group's
                    attention. Slots that fit the GPU budget stay resident and are never copied.
- LayerOffloadCache: the paper's layer-wise offload baseline: the same engine with one group per layer.

The cache owns its position: it advances by T once the last layer has attended. Besides attention,
every cache offers the same small surface for code that keeps a cache beyond one call: `length`,
`read` and `write` of a layer's K/V rows in one canonical layout ([B, n_kv_head, T, D]), and
`truncate`. A batch-1 cache can also be the shared prefix of many sequences: `attend_shared` attends
their queries over it without storing anything (shared_prefix.py). Which memory (planning) a cache
gets is planner.py's business.
"""
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from model import ModelArgs, softcap as soft_cap  # here `softcap` names the cap, a number


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, softcap: float | None = None,
              window: int | None = None) -> Tensor:
    """Causal attention of q [B, Hq, T, D] over k/v [B, Hk, S, D], the T queries being the last T keys.

    The variants of a layer (ModelArgs): `scale` of the scores (default D ** -0.5), `softcap` (scores
    become softcap * tanh(scores / softcap), Gemma-2), `window` (a query sees itself and the window - 1
    keys before it, Mistral and Gemma-2's local layers)."""
    Hk = k.shape[1]
    if q.device.type == "cpu" and Hk > 1:
        # One KV head per call on the CPU. Its flash kernel splits the keys over threads when a call
        # has few heads, and then the fp32 sums run in an order that depends on the call's head count.
        # Every policy calls per KV head, whatever its grouping, so all of them do the same arithmetic
        # and agree bit for bit. (CUDA kernels parallelize per head: one call there.)
        rep = q.shape[1] // Hk
        return torch.cat([_attention(q[:, h * rep:(h + 1) * rep], k[:, h:h + 1], v[:, h:h + 1], scale, softcap, window)
                          for h in range(Hk)], dim=1)
    return _attention(q, k, v, scale, softcap, window)


def _attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, softcap: float | None = None,
               window: int | None = None) -> Tensor:
    B, Hq, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    if window is not None and S - T - window + 1 > 0:  # keys that no query sees: leave them out
        k, v = k[:, :, S - T - window + 1:], v[:, :, S - T - window + 1:]
    if softcap is not None:  # SDPA cannot soft-cap the scores
        rows = (q.float() * (scale or D ** -0.5)).reshape(B, Hk, Hq // Hk * T, D)
        out, _ = _written_out(rows, k, v, softcap, _causal_bounds(T, k.shape[2], Hq // Hk, window, q.device))
        return out.reshape(q.shape).type_as(q)
    return _sdpa(q, k, v, scale, window)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float | None, window: int | None) -> Tensor:
    B, Hq, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    if T == 1:
        # Decode: one query attends to every key (a window has already dropped those it cannot see), so
        # no mask is needed, and the query heads that share a KV head can ride in the sequence
        # dimension (GQA without repeating K/V).
        out = F.scaled_dot_product_attention(q.reshape(B, Hk, Hq // Hk, D), k, v, scale=scale)
        return out.reshape(B, Hq, 1, D)
    # Chunked prefill: causal mask aligned bottom-right; the top-left default would let chunk i
    # see only the first tokens of the context. A window needs an explicit mask, T x S booleans.
    mask = _lower_right(T, S) if window is None else _sees(_causal_bounds(T, S, 1, window, q.device),
                                                            torch.arange(S, device=q.device))
    if Hq == Hk:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # GQA: one call per query head of each KV head, so every call has equal head counts. The fused
    # kernels take the bottom-right mask only then (enable_gqa rules out the memory-efficient
    # kernel and can fall back to the math one, which materializes T x S scores); K/V are not copied.
    q = q.unflatten(1, (Hk, Hq // Hk))
    outs = [F.scaled_dot_product_attention(q[:, :, r], k, v, attn_mask=mask, scale=scale) for r in range(Hq // Hk)]
    return torch.stack(outs, dim=2).flatten(1, 2)


def _causal_bounds(T: int, S: int, rep: int, window: int | None, device) -> tuple[Tensor, Tensor]:
    """The first and the last key that each query row of a KV head sees (its `rep` query heads one after
    another, T queries each, the queries being the last T of S keys): itself, and the keys before it
    within the window. Two [rep * T, 1] index tensors."""
    own = torch.arange(S - T, S, device=device).repeat(rep)[:, None]
    return (own - window + 1 if window is not None else torch.zeros_like(own)), own


def _sees(bounds: tuple[Tensor, Tensor], keys: Tensor) -> Tensor:
    first, last = bounds
    return (keys >= first) & (keys <= last)


# Blocks of the written-out attention: the fp32 scores of a block of queries over a block of keys,
# and that block's fp32 K and V, stay within this size each (a few fit in the planner's activation
# margin, at any context and any number of queries). A block has at least MIN_BLOCK_KEYS keys:
# smaller products would be all launch overhead.
SHARED_BLOCK_BYTES = 32 << 20
MIN_BLOCK_KEYS = 256


def _written_out(rows: Tensor, k: Tensor, v: Tensor, softcap: float | None = None,
                 bounds: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Softmax attention of query rows [B, Hk, Q, D] (fp32, already scaled) over k/v [B, Hk, S, D],
    written out in fp32 for what SDPA cannot do: soft-capped scores, and the log-sum-exp of the
    scores that shared_attention returns. `bounds`: the first and last key index each row sees
    ([Q, 1] each: a causal mask, a window); None: every row sees every key. Returns the output
    [B, Hk, Q, D] and the log-sum-exp [B, Hk, Q].

    The keys go in blocks, with flash attention's running maximum and sum (Dao et al., arXiv
    2205.14135, Alg. 1), so memory is bounded at any context; rows are sliced too when there are
    so many that a block of MIN_BLOCK_KEYS keys would not bound their scores.
    """
    B, Hk, Q, D = rows.shape
    n_rows = max(1, min(Q, SHARED_BLOCK_BYTES // (4 * B * Hk * MIN_BLOCK_KEYS)))
    n_keys = max(MIN_BLOCK_KEYS, SHARED_BLOCK_BYTES // (4 * B * Hk * max(n_rows, D)))
    parts = [_over_key_blocks(rows[:, :, r:r + n_rows], k, v, n_keys, softcap,
                              None if bounds is None else tuple(b[r:r + n_rows] for b in bounds))
             for r in range(0, Q, n_rows)]
    if len(parts) == 1:  # decode: one slice, no copy
        return parts[0]
    return tuple(torch.cat(side, dim=2) for side in zip(*parts))


def _over_key_blocks(rows, k, v, n_keys, softcap, bounds) -> tuple[Tensor, Tensor]:
    top = torch.full((*rows.shape[:-1], 1), -torch.inf, device=rows.device)  # running maximum of each row's scores
    total = torch.zeros_like(top)                                            # running sum of exp(score - top)
    acc = torch.zeros_like(rows)                                             # running sum of exp(score - top) * v
    for s in range(0, k.shape[2], n_keys):
        scores = rows @ k[:, :, s:s + n_keys].float().mT  # [B, Hk, Q, keys]
        scores = soft_cap(scores, softcap)
        if bounds is not None:
            keys = torch.arange(s, s + scores.shape[-1], device=rows.device)
            scores = scores.masked_fill(~_sees(bounds, keys), -torch.inf)
        new_top = torch.maximum(top, scores.amax(dim=-1, keepdim=True))
        # A row that has seen no key yet has a maximum of -inf; 0 stands in for it, so that its
        # weights come out 0, not NaN.
        ref = new_top.masked_fill(new_top == -torch.inf, 0.0)
        weights = scores.sub_(ref).exp_()
        fade = (top - ref).exp()
        total = total * fade + weights.sum(dim=-1, keepdim=True)
        acc = acc * fade + weights @ v[:, :, s:s + n_keys].float()
        top = new_top
    # total >= 1 once a row has seen a key (its maximum adds exp(0)); a row that saw none (an empty
    # prefix) gets output 0 and log-sum-exp -inf, which merge() weighs 0.
    return acc / total.clamp(min=1.0), (top + total.log()).squeeze(-1)


def shared_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, softcap: float | None = None,
                     first_seen: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Attention of B sequences' queries q [B, Hq, T, D] over one prefix they all share, k/v [1, Hk, S, D]
    (every query comes after the whole prefix: no causal mask). Returns the output [B, Hq, T, D] and the
    log-sum-exp of the scores [B, Hq, T], both fp32, which merge() needs to add the rest of each sequence.
    first_seen [B, T]: the first key each query sees (a sliding window); None: all of them.

    All queries of a KV head go into one matrix product, so the prefix's K/V are read once for all B
    sequences (the point of decoding many questions together). SDPA returns no log-sum-exp, so this
    is written out (_written_out).
    """
    Hk = k.shape[1]
    if q.device.type == "cpu" and Hk > 1:  # one KV head per call, as attention() does: equal sums for every policy
        rep = q.shape[1] // Hk
        parts = [_shared_attention(q[:, h * rep:(h + 1) * rep], k[:, h:h + 1], v[:, h:h + 1], scale, softcap,
                                   first_seen) for h in range(Hk)]
        return torch.cat([o for o, _ in parts], dim=1), torch.cat([l for _, l in parts], dim=1)
    return _shared_attention(q, k, v, scale, softcap, first_seen)


def _shared_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, softcap: float | None = None,
                      first_seen: Tensor | None = None) -> tuple[Tensor, Tensor]:
    B, Hq, T, D = q.shape
    Hk = k.shape[1]
    rep = Hq // Hk
    # Every sequence's queries of a KV head are rows of one product with the prefix's keys: (B, rep, T) order.
    rows = (q.float() * (scale or D ** -0.5)).reshape(B, Hk, rep * T, D).transpose(0, 1).reshape(1, Hk, B * rep * T, D)
    bounds = None
    if first_seen is not None:
        first = first_seen[:, None, :].expand(B, rep, T).reshape(-1, 1)
        bounds = first, torch.full_like(first, k.shape[2] - 1)
    out, lse = _written_out(rows, k, v, softcap, bounds)
    out = out.view(Hk, B, rep * T, D).transpose(0, 1).reshape(B, Hq, T, D)
    return out, lse.view(Hk, B, rep * T).transpose(0, 1).reshape(B, Hq, T)


def merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over keys A and B from attention over each: softmax weights rescaled by log-sum-exp
    (the flash-attention / cascade-inference identity; exact up to rounding). An lse of -inf (no key
    at all on that side) weighs its side 0, provided its output is finite."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * (lse_a - lse).exp()[..., None] + out_b * (lse_b - lse).exp()[..., None], lse


def _lower_right(T: int, S: int) -> Tensor:
    # causal_lower_right(T, S) goes through the legacy Tensor constructor, which allocates an unused
    # [2, T, S] fp32 host tensor (64 GiB for an 8K chunk at 1M tokens, per call). SDPA dispatches on
    # the lengths alone, so build a tiny one and set them. (Imported here: the module pulls in
    # torch._dynamo, seconds of start-up that a run which fails its checks should not pay.)
    from torch.nn.attention.bias import causal_lower_right

    mask = causal_lower_right(1, 1)
    mask.seq_len_q, mask.seq_len_kv = T, S
    return mask


class KVCache:
    """Shared plumbing: position bookkeeping, the public read/write surface, and the opaque op that
    torch.compile sees. Subclasses say where each layer's heads live (`_parts`) and how to attend."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device, dtype):
        self.args, self.batch, self.max_len = args, batch, max_len
        self.device, self.dtype = torch.device(device), dtype
        self.rep = args.n_head // args.n_kv_head
        self.variant = dict(scale=args.attention_scale, softcap=args.attn_softcap)  # every layer's attention
        self.length = 0  # tokens stored in every layer; read it, change it with write/truncate
        # The sliding-window layers keep their last tokens in rings of their own, whatever the policy;
        # the policy holds the global layers (args.global_layers).
        self.windows = SlidingWindows(args, batch, max_len, self.device, dtype) if args.sliding_layers else None
        self.handle = _register(self)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            # Opaque to the compiler: streams, events and host-side bookkeeping stay in eager mode,
            # the rest of the decode step compiles into one graph.
            return torch.ops.headinfer.attend(q, k, v, self.handle, layer)
        return self._attend_and_advance(layer, q, k, v)

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

    def __init__(self, args, batch, max_len, device, dtype):
        super().__init__(args, batch, max_len, device, dtype)
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
    and the last group of a step prefetches the first group of the next step.
    """

    def __init__(self, args, batch, max_len, device, dtype, group_size: int, resident):
        super().__init__(args, batch, max_len, device, dtype)
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
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        if cuda:
            for t in self.buf_k + self.buf_v:  # also used on the copy stream: free once its copies are done
                t.record_stream(self.copy_stream)
        if pin:
            weakref.finalize(self, _unpin, block, self.copy_stream)
        self.copied = [_event(cuda) for _ in range(n_buf)]    # H2D of the buffer's unit done
        self.consumed = [_event(cuda) for _ in range(n_buf)]  # attention over the buffer done
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
        """Enqueue the H2D copy of `unit`'s first `length` tokens into buffer tick % 2."""
        b = tick % 2
        with _on(self.copy_stream):
            if self.copy_stream is not None:
                self.copy_stream.wait_event(self.consumed[b])  # the buffer's previous reader is done
            if length:
                for buf, store in ((self.buf_k[b], self.store_k[unit]), (self.buf_v[b], self.store_v[unit])):
                    dst = self._view(buf, unit, length)
                    for i in range(self.batch):  # per batch row: each is one contiguous memcpy
                        dst[i].copy_(store[i, :length], non_blocking=True)
            _record(self.copied[b], self.copy_stream)
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
            _wait(self.copied[b], self.device)
            buf_k, buf_v = self._view(self.buf_k[b], unit, end), self._view(self.buf_v[b], unit, end)
            if k is not None:
                buf_k[:, start:end] = k[:, :, h0:h1]
                buf_v[:, start:end] = v[:, :, h0:h1]
            try:
                yield h0, h1, buf_k.transpose(1, 2), buf_v.transpose(1, 2)
            finally:  # also when the caller's attention failed: what it queued must end before a reuse
                _record(self.consumed[b], device=self.device)
            if k is not None:
                # Only the new tokens go back to the CPU store, copied from the buffer (not from the
                # short-lived k/v, whose memory the allocator could hand out again meanwhile).
                with _on(self.copy_stream):
                    if self.copy_stream is not None:
                        self.copy_stream.wait_event(self.consumed[b])
                    for i in range(self.batch):
                        self.store_k[unit][i, start:end].copy_(buf_k[i, start:end], non_blocking=True)
                        self.store_v[unit][i, start:end].copy_(buf_v[i, start:end], non_blocking=True)
                    _record(self.consumed[b], self.copy_stream)
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
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        self.in_flight = None


class LayerOffloadCache(HeadOffloadCache):
    """The layer-wise offload baseline: each layer's whole KV is one streamed unit, nothing resident."""

    def __init__(self, args, batch, max_len, device, dtype):
        super().__init__(args, batch, max_len, device, dtype, group_size=args.n_kv_head, resident=0)


def spread_resident(n_resident: int, args: ModelArgs) -> list[int]:
    """Resident slots per layer, spread evenly over the global layers so that each streams about the
    same bytes (a sliding-window layer has none: its ring is always on the device)."""
    layers = args.global_layers
    n_resident = max(0, min(n_resident, len(layers) * args.n_kv_head))
    per_layer = [0] * args.n_layer
    for i, l in enumerate(layers):
        per_layer[l] = n_resident // len(layers) + (i < n_resident % len(layers))
    return per_layer


class SlidingWindows:
    """The K/V of the sliding-window layers. A query of such a layer sees only itself and the W - 1
    tokens before it, so the layer keeps its last W tokens, in a ring of W rows per layer (position p
    in row p mod W): memory fixed by the window, not the context, and small enough to stay on the
    compute device, so nothing of it streams, whatever the policy.

    Decode writes the new token over the oldest and attends over the whole ring, without a mask: it
    holds exactly the window (in ring order, which the softmax does not see). A prefill chunk
    attends over the window before it, gathered in position order, then its own tokens, with the
    window's mask; then its last W tokens replace the ring's oldest.
    """

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        self.window = args.sliding_window
        self.size = min(args.sliding_window, max_len)  # rows per ring: no more than the cache can ever hold
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
        if T == 1:
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


def pinned_empty(numel: int, dtype: torch.dtype) -> Tensor:
    """A host tensor page-locked at exactly its size.

    torch's pinned allocator rounds each block up to a power of two, so a 600K-token store would
    pin as much RAM as a 1M one; registering ordinary memory with CUDA pins what is used, no more.
    """
    t = torch.empty(numel, dtype=dtype)  # registering locks (and so commits) every page
    err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.nbytes, 0))
    if err:
        raise MemoryError(f"cudaHostRegister failed (CUDA error {err}) pinning {t.nbytes / 2**30:.2f} GiB")
    return t


def _unpin(block: Tensor, copy_stream):
    copy_stream.synchronize()  # no DMA may still target the block when it is unregistered and freed
    torch.cuda.cudart().cudaHostUnregister(block.data_ptr())


# --- streams and events that degrade to no-ops on CPU -------------------------------------------

class _NullContext:
    def __enter__(self): return self
    def __exit__(self, *exc): return False


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else _NullContext()


def _event(cuda: bool):
    return torch.cuda.Event() if cuda else None


# The compute stream is the current stream of the cache's device, which need not be the current device.
def _record(event, stream=None, device=None):
    if event is not None:
        event.record(stream if stream is not None else torch.cuda.current_stream(device))


def _wait(event, device=None):
    """Make the current (compute) stream wait for the event: a device-side wait, not a host sync."""
    if event is not None:
        torch.cuda.current_stream(device).wait_event(event)


# --- the opaque op seen by torch.compile ---------------------------------------------------------
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
