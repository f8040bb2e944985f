"""Drafters for speculative decoding: cheap guesses of the next tokens, which one verification pass of
the model then checks together (generate.speculative_decode; the acceptance rules are sampling.py's).
A draft never changes the answer, only how many tokens a pass yields: with the KV cache offloaded a
pass of k + 1 tokens streams the cache once, as a pass of one token does.

- LookupDrafter ("lookup"): prompt lookup. The longest recent n-gram of the ids so far that occurred
  before, in the prompt or the answer, and the tokens that followed it there. No model, no memory.
- ModelDrafter ("self", "draft"): a model over a DraftCache of a few sink tokens and the most recent
  ones (StreamingLLM, arXiv 2309.17453; as a drafter, MagicDec, arXiv 2408.11049): the target's own
  weights, its rows refreshed from the target's exact K/V of every accepted token; or a smaller model
  with the same tokenizer over its own such cache. Memory fixed by the window, at any context.
- DraftLength: how many tokens to draft next, from how many of the last drafts were accepted.

Every drafter has the same two calls: propose(ids, k) -> (drafts, q), at most k ids that may follow
`ids` and the distributions they were drawn from (None: chosen deterministically); and
update(length, kept, kv) after a verification pass that started at cache position `length` and kept
`kept` of its rows, kv holding each layer's K/V [B, n_kv, T, D] of the pass.
"""
import torch
from torch import Tensor

from attention import attention
from errors import UsageError
from model import ModelArgs, Transformer
from sampling import probabilities, draw

SPECULATE = ("lookup", "self")  # --speculate; "draft" is a draft model's (--draft-checkpoint)
DEFAULT_K = 4                   # drafts per pass: bench/NOTES.md, "Speculative decoding"
SINKS = 4                       # the first tokens every draft query sees (StreamingLLM's attention sinks)
DEFAULT_DRAFT_WINDOW = 512      # sink + recent tokens a draft attends to (MagicDec's 512)
MAX_NGRAM = 3                   # lookup: the longest n-gram matched


SPECULATION_COUNTS = dict(verify_passes=None, drafted_tokens=None, accepted_tokens=None, tokens_per_pass=None)


def check_speculation(speculate: str | None, k: int, window: int, compile, model: Transformer | None,
                      draft_model: Transformer | None):
    """Refuse, before any work, what speculative decoding cannot do (the CLI asks before the models load:
    model None)."""
    if speculate is None:
        return
    if speculate not in SPECULATE + ("draft",):
        raise UsageError(f"unknown drafter {speculate!r}; choose one of {', '.join(SPECULATE)}, or a draft model",
                         ("speculate",))
    if model is not None and (speculate == "draft") != (draft_model is not None):
        raise UsageError("a draft model is its own drafter: give it alone" if draft_model is not None else
                         "speculate 'draft' needs a draft model", ("speculate", "draft_checkpoint"))
    if not (isinstance(k, int) and k >= 1):
        raise UsageError(f"speculate_k must be a whole number >= 1, got {k!r}", ("speculate_k",))
    if not (isinstance(window, int) and window >= SINKS + k):
        raise UsageError(f"draft_window must be at least the {SINKS} sink tokens plus speculate_k ({k}), got "
                         f"{window!r}", ("draft_window",))
    if compile:
        raise UsageError("compile applies to the one-token decode step; speculative decoding runs passes of "
                         "k + 1 tokens, eagerly: drop one of the two", ("compile", "speculate"))
    if draft_model is not None and draft_model.args.vocab_size > model.args.vocab_size:
        raise UsageError(f"the draft model has {draft_model.args.vocab_size} token ids, the model "
                         f"{model.args.vocab_size}: a draft needs the model's vocabulary", ("draft_checkpoint",))


def plan_room(speculate: str | None, model: Transformer, draft_model: Transformer | None, window: int, k: int,
              chunk: int, max_len: int) -> dict:
    """What the cache plan (planner.plan_cache) sets aside for speculation over max_len positions: rollback,
    the positions a pass may take back, and draft_bytes, the drafter's own cache on the compute device."""
    return dict(rollback=k if speculate else 0,
                draft_bytes=draft_bytes(speculate, model, draft_model, window, k, chunk, max_len))


def draft_bytes(speculate: str | None, model: Transformer, draft_model: Transformer | None, window: int, k: int,
                chunk: int, max_len: int) -> int:
    """What the drafter keeps on the compute device beside the weights (its DraftCache), for a cache of
    max_len positions."""
    if speculate not in ("self", "draft"):
        return 0
    drafter = model if speculate == "self" else draft_model
    return DraftCache.nbytes(drafter.args, draft_window(window, max_len, k),
                             room_for(k, chunk if speculate == "draft" else 1), drafter.tok_embeddings.weight.dtype)


def draft_window(window: int, max_len: int, k: int) -> int:
    """A window beyond the context would only hold rows never written."""
    return min(window, max(max_len, SINKS + k))


class LookupDrafter:
    """Prompt lookup: for n = MAX_NGRAM down to 1, the last n ids, if they occurred before, are followed
    by the ids that followed them the last time; those are the drafts. An index of every n-gram's last
    occurrence is kept up to date as ids grow, so a step costs O(k), not O(context)."""

    def __init__(self):
        self.last = {}   # n-gram (a tuple) -> the position after its latest occurrence
        self.seen = 0    # positions indexed: every n-gram ending before it

    def propose(self, ids: list[int], k: int) -> tuple[list[int], None]:
        # Index the n-grams that end before the last id: the last n-gram itself is what is looked up.
        for end in range(max(self.seen, 1), len(ids)):
            for n in range(1, min(MAX_NGRAM, end) + 1):
                self.last[tuple(ids[end - n:end])] = end
        self.seen = max(self.seen, len(ids))
        for n in range(min(MAX_NGRAM, len(ids)), 0, -1):
            after = self.last.get(tuple(ids[-n:]))
            if after is not None:
                return ids[after:after + k], None
        return [], None

    def update(self, length: int, kept: int, kv: dict):
        pass


class DraftCache:
    """The draft's KV cache: the first SINKS positions, then a run of recent positions, all on the
    compute device in one preallocated block [n_layer, B, rows, n_kv, D]. Rows [0, SINKS) hold positions
    [0, SINKS); row r >= SINKS holds position r + offset. When a pass would not fit, the last
    `recent` positions move down to row SINKS: a draft query sees the sinks and the last `recent` to
    `recent + room` positions. Called like the target's caches (the model cannot tell the difference)."""

    def __init__(self, args: ModelArgs, window: int, room: int, device, dtype, batch: int = 1):
        self.args, self.recent = args, window - SINKS
        shape = (args.n_layer, batch, window + room, args.n_kv_head, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.variant = dict(scale=args.attention_scale, softcap=args.attn_softcap)
        self.length, self.offset = 0, 0

    @staticmethod
    def nbytes(args: ModelArgs, window: int, room: int, dtype) -> int:
        return 2 * args.n_layer * (window + room) * args.n_kv_head * args.head_dim * dtype.itemsize

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        T, window = q.shape[2], self.args.window(layer)
        self._store(layer, self.length, k, v)
        end = self._row(self.length + T)
        # A sliding-window layer sees its window only, as in the target (and no sinks, which its ring lacks).
        begin = 0 if window is None else self._row(max(0, self.length - window + 1))
        out = attention(q, self.k[layer, :, begin:end].transpose(1, 2), self.v[layer, :, begin:end].transpose(1, 2),
                        window=window, **self.variant)
        if layer == self.args.n_layer - 1:
            self.length += T
        return out

    def write(self, layer: int, start: int, k: Tensor, v: Tensor):
        """Store K/V [B, n_kv, T, D] at positions [start, start + T) (start <= length); the length covers them
        once the last layer has them, as in offload.KVCache.write."""
        self._store(layer, start, k, v)
        if layer == self.args.n_layer - 1:
            self.length = max(self.length, start + k.shape[2])

    def truncate(self, length: int):
        """Forget the positions from `length` on. Going back past the first recent position the cache
        still has (further than a verification pass ever does) forgets everything: length 0."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a draft cache holding {self.length} positions to {length}")
        self.length = length if self.offset == 0 or length >= self.offset + SINKS else 0
        if self.length == 0:
            self.offset = 0

    def _row(self, position: int) -> int:
        """The row of a position (of the oldest recent one, for a position no longer held)."""
        return position if position < SINKS or self.offset == 0 else max(SINKS, position - self.offset)

    def _store(self, layer: int, start: int, k: Tensor, v: Tensor):
        T = k.shape[2]
        if layer == 0 and start >= SINKS and start + T - self.offset > self.k.shape[2]:
            self._make_room(start)
        row = start if start < SINKS else start - self.offset  # a run that starts in the sinks has offset 0
        self.k[layer, :, row:row + T] = k.transpose(1, 2)
        self.v[layer, :, row:row + T] = v.transpose(1, 2)

    def _make_room(self, start: int):
        """Keep the sinks and the last `recent` positions before `start`, moved down to row SINKS."""
        first = max(SINKS, start - self.recent)
        shift = first - SINKS - self.offset
        if shift > 0:
            n = start - first
            src = slice(first - self.offset, start - self.offset)
            self.k[:, :, SINKS:SINKS + n] = self.k[:, :, src].clone()
            self.v[:, :, SINKS:SINKS + n] = self.v[:, :, src].clone()
            self.offset += shift

    def fill_from(self, cache):
        """Take the sinks and the last `recent` positions of every layer from another cache (the target's,
        through its read()): the draft then starts where the target is, with its exact K/V. A
        sliding-window layer's ring no longer has the oldest of them: those rows stay zero (a draft may be
        wrong; the verification pass is exact)."""
        L = cache.length
        first = max(SINKS, L - self.recent)
        self.length, self.offset = 0, max(0, first - SINKS)
        for layer in range(self.args.n_layer):
            window = self.args.window(layer)
            held = 0 if window is None else max(0, L - window + 1)
            for start, end in ((0, min(SINKS, L)), (first, L)):
                start = max(start, held)
                if start < end:
                    k, v = cache.read(layer, start, end)
                    self._store(layer, start, k.to(self.k.device), v.to(self.v.device))
        self.length = L


class ModelDrafter:
    """Drafts with a model over a DraftCache: the target itself ("self", its cache rows refreshed from
    the target's exact K/V after each pass) or a smaller model with the same vocabulary ("draft", over its
    own K/V: its cache catches up on the accepted tokens it has not seen by itself).

    A proposal feeds the ids the draft cache lacks (after a pass: the model's own last token; at the
    start, for a draft model, the whole prompt, `chunk` tokens per pass), then each draft in turn:
    k drafts cost k passes of the draft model, each reading its weights once."""

    def __init__(self, model: Transformer, target, window: int, k: int, temperature: float,
                 top_k: int | None, generator, vocab_size: int, chunk: int):
        # target: for "self", the target's cache, whose rows start and refresh the draft cache; None for a draft model
        self.model, self.target, self.chunk = model, target, chunk
        self.temperature, self.top_k, self.generator, self.vocab_size = temperature, top_k, generator, vocab_size
        device, dtype = model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
        self.cache = DraftCache(model.args, window, room_for(k, chunk), device, dtype)

    @torch.no_grad()
    def propose(self, ids: list[int], k: int) -> tuple[list[int], Tensor | None]:
        if self.target is not None and self.cache.length == 0 and self.target.length:
            self.cache.fill_from(self.target)
        device = self.model.tok_embeddings.weight.device
        todo = ids[self.cache.length:]
        drafts, qs = [], []
        while len(drafts) < k:
            for s in range(0, len(todo), self.chunk):
                part = torch.tensor([todo[s:s + self.chunk]], device=device)
                start = self.cache.length
                logits = self.model(part, torch.arange(start, start + part.shape[1], device=device), self.cache,
                                    last_only=True)[0, -1]
            token, q = self._choose(logits)
            drafts.append(token)
            qs.append(q)
            todo = [token]
        return drafts, (None if self.temperature == 0 else torch.stack(qs))

    def _choose(self, logits: Tensor) -> tuple[int, Tensor | None]:
        if self.temperature == 0:
            return int(logits.argmax()), None
        q = probabilities(logits, self.temperature, self.top_k)
        q = torch.nn.functional.pad(q, (0, self.vocab_size - q.shape[-1]))  # the target's vocabulary may be larger
        return int(draw(q, self.generator)), q

    def update(self, length: int, kept: int, kv: dict):
        if self.target is not None:  # "self": the target's K/V of what it kept replace the draft's own
            self.cache.truncate(min(self.cache.length, length))
            if self.cache.length < length:  # it had to forget: the next proposal starts it from the target again
                return
            for layer, (k, v) in sorted(kv.items()):
                self.cache.write(layer, length, k[:, :, :kept], v[:, :, :kept])
        else:
            self.cache.truncate(min(self.cache.length, length + kept))


def room_for(k: int, chunk: int) -> int:
    """Rows a draft cache keeps beyond its window: one pass of the draft model (a prompt chunk, or a
    verification's rows written back: k + 1), plus the k - 1 drafts before it."""
    return max(chunk, k + 1) + k


class DraftLength:
    """How many tokens to draft for the next pass (Leviathan et al.: with acceptance rate a, a pass of
    k drafts yields (1 - a^(k+1)) / (1 - a) tokens). Halved after a pass that kept none of its drafts,
    doubled (up to k_max) after one that kept them all; at 0 (drafts keep failing: lookup on free
    writing) no drafting for a while, each pause twice the last, up to 32 passes; then k = 1 again."""

    def __init__(self, k_max: int):
        self.k_max, self.k, self.pause, self.wait = k_max, k_max, 1, 0

    def next(self) -> int:
        if self.wait:
            self.wait -= 1
            return 0
        return self.k

    def update(self, drafted: int, accepted: int):
        if not drafted:
            return
        if accepted == 0:
            self.k //= 2
            if self.k == 0:
                self.wait, self.pause, self.k = self.pause, min(32, 2 * self.pause), 1
        elif accepted == drafted:
            self.k, self.pause = min(self.k_max, 2 * self.k), 1


def make_drafter(speculate: str | None, model: Transformer, cache, k: int, window: int, temperature: float,
                 top_k: int | None, generator, draft_model: Transformer | None, chunk: int):
    """The drafter `speculate` names, over `cache` (the target's); None without speculation."""
    if speculate is None:
        return None
    if speculate == "lookup":
        return LookupDrafter()
    if speculate == "self":
        return ModelDrafter(model, cache, draft_window(window, cache.max_len, k), k, temperature, top_k, generator,
                            model.args.vocab_size, chunk=1)
    return ModelDrafter(draft_model, None, draft_window(window, cache.max_len, k), k, temperature, top_k, generator,
                        model.args.vocab_size, chunk)


class Tap:
    """The target's cache, seen by the verification pass: it records each layer's new K/V as they go by
    (the self drafter takes the accepted ones), and is otherwise the cache itself."""

    def __init__(self, cache):
        self.cache, self.kv = cache, {}

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.kv[layer] = (k, v)
        return self.cache(layer, q, k, v)
