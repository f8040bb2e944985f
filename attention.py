"""The attention kernels every KV cache calls (offload.py), whatever its policy.

- attention():        causal attention of the new tokens' queries over the keys stored so far, the
                      queries being the last keys (bottom-right aligned, so a prefill chunk sees all of
                      the context before it); SDPA where it can, written out in fp32 for soft caps.
- shared_attention(): B sequences' queries over one prefix they share, with the log-sum-exp that
                      merge() needs to add the rest of each sequence (shared_prefix.py).
- merge():            attention over two sets of keys from attention over each.

A layer's variants come from ModelArgs: the scale of the scores, Gemma-2's soft cap, and a sliding
window (a query sees itself and the window - 1 keys before it).
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from model import softcap as soft_cap  # here `softcap` names the cap, a number


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
    if T <= FEW_QUERIES and window is None:
        # A few queries (a verification pass of speculative decoding): as in decode, the query heads of a KV
        # head ride in the sequence dimension, one call per KV head instead of one per query head, with
        # an explicit mask (row r * T + t sees the keys up to S - T + t).
        mask = _sees(_causal_bounds(T, S, Hq // Hk, None, q.device), torch.arange(S, device=q.device))
        out = F.scaled_dot_product_attention(q.reshape(B, Hk, Hq // Hk * T, D), k, v, attn_mask=mask, scale=scale)
        return out.reshape(B, Hq, T, D)
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


FEW_QUERIES = 16


def _lower_right(T: int, S: int) -> Tensor:
    # causal_lower_right(T, S) goes through the legacy Tensor constructor, which allocates an unused
    # [2, T, S] fp32 host tensor (64 GiB for an 8K chunk at 1M tokens, per call). SDPA dispatches on
    # the lengths alone, so build a tiny one and set them. (Imported here: the module pulls in
    # torch._dynamo, seconds of start-up that a run which fails its checks should not pay.)
    from torch.nn.attention.bias import causal_lower_right

    mask = causal_lower_right(1, 1)
    mask.seq_len_q, mask.seq_len_kv = T, S
    return mask


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
