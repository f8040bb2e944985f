"""Many sequences over one shared prefix: the prefix's K/V once, each sequence's own tokens apart.

B questions about one document are B sequences that begin alike. The document's K/V live in one
batch-1 cache of any policy (offloaded and streamed, with head offload), prefilled once; each
question's own tokens (its question, then its answer) live in a small cache on the device. Each
layer's attention for a question's query is the exact softmax over both parts:

    attention over [prefix; own] = merge(attention over the prefix, causal attention over its own)

merged by log-sum-exp (attention.merge). The prefix part takes the queries of all B questions in one
pass (attention.shared_attention), so one read of the prefix's K/V serves every question: with the
prefix streamed over PCIe, B questions per step cost about what one does (Hydragen and FlashInfer's
cascade attention do this for caches on the GPU).

Questions have different lengths: they are left-padded to the longest, so every question's own
tokens end at the same slot and a decode step writes the same slot for all. A padding slot is never
a key; a padding query still attends to the prefix (which is never empty), so nothing turns NaN.
"""
import torch
from torch import Tensor

from attention import merge
from model import softcap
from offload import KVCache


class SharedPrefixCache:
    """The cache interface of offload.py (`cache(layer, q, k, v) -> out`) for B sequences that continue
    `prefix`, a batch-1 cache holding the shared tokens (read, never written, here).

    lengths: each sequence's own tokens before the first new one (its question); room: the new
    tokens each may still store after that. `length` counts own slots, padding included, the same
    for every sequence; `positions(T)` gives each sequence's positions for its next T tokens.
    """

    def __init__(self, prefix: KVCache, lengths: list[int], room: int):
        if prefix.batch != 1 or prefix.length < 1:
            raise ValueError(f"the shared prefix must be one sequence of at least one token, not "
                             f"{prefix.batch} of {prefix.length}")
        if not lengths or min(lengths) < 1:
            raise ValueError(f"every sequence needs at least one token of its own, got lengths {lengths}")
        args, longest = prefix.args, max(lengths)
        self.prefix, self.args, self.max_len = prefix, args, longest + room
        shape = (args.n_layer, len(lengths), self.max_len, args.n_kv_head, args.head_dim)
        self.k = torch.zeros(shape, device=prefix.device, dtype=prefix.dtype)
        self.v = torch.zeros(shape, device=prefix.device, dtype=prefix.dtype)
        self.first = torch.tensor([longest - n for n in lengths], device=prefix.device)  # first own slot
        self.length = 0

    @property
    def batch(self) -> int:
        return self.first.shape[0]

    @property
    def nbytes(self) -> int:
        """The memory of the own caches, as allocated (keep() leaves it allocated)."""
        return self.k.untyped_storage().nbytes() + self.v.untyped_storage().nbytes()

    def positions(self, T: int) -> Tensor:
        """[B, T]: the positions of the next T slots, counted after the prefix in each own sequence."""
        slots = torch.arange(self.length, self.length + T, device=self.first.device)
        return self.prefix.length + slots[None, :] - self.first[:, None]

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        start, end = self.length, self.length + q.shape[2]
        if end > self.max_len:
            raise ValueError(f"the per-sequence cache is full: {self.length} + {q.shape[2]} slots > {self.max_len}")
        self.k[layer, :, start:end] = k.transpose(1, 2)
        self.v[layer, :, start:end] = v.transpose(1, 2)
        out_prefix, lse_prefix = self.prefix.attend_shared(layer, q, self.positions(q.shape[2]))
        out_own, lse_own = self._attend_own(q, self.k[layer, :, :end].transpose(1, 2),
                                            self.v[layer, :, :end].transpose(1, 2), start, self.args.window(layer))
        if layer == self.args.n_layer - 1:
            self.length = end
        return merge(out_prefix, lse_prefix, out_own, lse_own)[0].to(q.dtype)

    def _attend_own(self, q: Tensor, k: Tensor, v: Tensor, start: int, window: int | None) -> tuple[Tensor, Tensor]:
        """Causal attention of q [B, Hq, T, D] (slots start..start+T-1) over each sequence's own slots
        k/v [B, Hk, S, D], padding excluded, within the layer's window; output and log-sum-exp in fp32
        (-inf: no key, output 0). The scale and soft cap are the model's, as in attention.attention."""
        B, Hq, T, D = q.shape
        Hk, S = k.shape[1], k.shape[2]
        scores = softcap((q.float() * self.args.attention_scale).reshape(B, Hk, Hq // Hk * T, D) @ k.float().mT,
                         self.args.attn_softcap)
        scores = scores.view(B, Hk, Hq // Hk, T, S)
        key = torch.arange(S, device=q.device)
        query = torch.arange(start, start + T, device=q.device)
        visible = (key[None, None, :] >= self.first[:, None, None]) & (key[None, None, :] <= query[None, :, None])
        if window is not None:  # slots and positions differ by one offset per sequence
            visible &= key[None, None, :] > query[None, :, None] - window
        scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
        lse = scores.logsumexp(dim=-1)
        weights = (scores - lse.nan_to_num(neginf=0.0)[..., None]).exp()  # a row with no key: all 0
        out = weights.view(B, Hk, Hq // Hk * T, S) @ v.float()
        return out.view(B, Hq, T, D), lse.view(B, Hq, T)

    def keep(self, rows: list[int]):
        """Keep only these sequences (ascending indices), e.g. when the others have stopped: later steps
        compute for them alone. Rows move down in place, so no second copy of the cache is made."""
        if rows != sorted(set(rows)) or (rows and not 0 <= rows[0] <= rows[-1] < self.batch):
            raise ValueError(f"rows to keep must be ascending indices below {self.batch}, got {rows}")
        for new, old in enumerate(rows):
            if new != old:
                self.k[:, new] = self.k[:, old]
                self.v[:, new] = self.v[:, old]
        self.k, self.v, self.first = self.k[:, :len(rows)], self.v[:, :len(rows)], self.first[rows]


def shared_length(prompts: list[list[int]]) -> int:
    """How many ids every prompt begins with, leaving each at least one of its own: the prefix that
    B whole prompts (a document, then each question, tokenized together) can share."""
    n = min(map(len, prompts)) - 1
    for ids in prompts[1:]:
        n = next((i for i in range(n) if ids[i] != prompts[0][i]), n)
    return max(n, 0)
