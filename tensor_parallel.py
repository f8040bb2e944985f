"""Tensor parallelism over torch.distributed: N processes (torchrun), each with 1/N of the model and
1/N of the KV cache.

    torchrun --nproc-per-node 2 generate.py --checkpoint DIR --prompt-file long.txt --offload head

Each rank holds, in every layer, n_head/N query heads and n_kv_head/N KV heads (the rows of wqkv that
compute them, and the columns of wo that read them), 1/N of the MLP (rows of w1 and w3, columns of
w2) and 1/N of the vocabulary (rows of the embedding and of the output). This is the Megatron-LM
layout (Shoeybi et al., arXiv 1909.08053, Sec. 3): attention and the MLP each end in one all-reduce
of the ranks' partial sums. The vocabulary costs two more per forward pass: a token's embedding is
found on one rank (zeros on the others), and each rank's logits fill its slice of the vocabulary.

Head-wise offload (HeadInfer) and tensor parallelism split the same dimension: a rank's KV cache
holds its own heads only, with any policy, so each GPU streams 1/N of the KV over its own PCIe link.
Neither the model (model.py) nor the caches (offload.py) know of this: a rank's model is the same
Transformer, built for a ModelArgs with 1/N of the heads, and the collectives run in forward hooks,
as functional collectives, which torch.compile traces.

A rank's arithmetic differs from one process's only in the order of the sums that the all-reduces
finish, so the logits agree to fp32 rounding and greedy decoding to the token; every rank reduces to
the same values, so all of them pick the same token.
"""
import os
import pickle
import sys
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from errors import UsageError
from model import ModelArgs, Transformer

# A rank may wait this long for the others on the host (rank 0 converting a large checkpoint, or
# reading stdin); a rank that dies ends the group sooner, through torchrun.
HOST_WAIT = timedelta(hours=6)

_group = None     # this process's TensorParallel, once init() has joined a group
_store = None     # torchrun's rendezvous store: the ranks' host-side exchanges and failure count
_exchanges = 0    # exchanges so far: every rank makes the same ones, in the same order


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def ranks() -> int:
    """The processes of this group, each holding 1/N of the heads (1 outside a group)."""
    return _group.world if _group is not None else 1


def local_ranks() -> int:
    """The processes of this group on this machine: they share its RAM (1 outside a group)."""
    return int(os.environ["LOCAL_WORLD_SIZE"]) if _group is not None else 1


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the group: rank r of `world`, computing on `device`."""
    rank: int
    world: int
    device: torch.device

    # --- the shard of the model ---------------------------------------------------------------

    def shard_args(self, args: ModelArgs) -> ModelArgs:
        """The shape of this rank's model: 1/N of the heads, of the MLP and of the vocabulary (the
        vocabulary rounded up, the last rank's slice padded with rows of zeros)."""
        n = self.world
        for what, count in (("KV heads", args.n_kv_head), ("MLP width (intermediate_size)", args.intermediate_size)):
            if count % n:
                fits = _divisors(args.n_kv_head, args.intermediate_size)
                raise UsageError(f"{n} tensor-parallel ranks must divide the model's {what}, {count}; run {fits} "
                                 f"ranks (torchrun --nproc-per-node)")
        return replace(args, n_head=args.n_head // n, n_kv_head=args.n_kv_head // n,
                       intermediate_size=args.intermediate_size // n, vocab_size=-(-args.vocab_size // n))

    def shard_model(self, args: ModelArgs) -> Transformer:
        """This rank's Transformer (build it on the meta device, then load read_shard's tensors)."""
        shard = self.shard_args(args)
        model = Transformer(shard)
        model.tok_embeddings = VocabSlice(shard.vocab_size, shard.dim, start=self.rank * shard.vocab_size)
        return model

    def read_shard(self, f, name: str, args: ModelArgs) -> Tensor:
        """This rank's part of tensor `name` of the full model `args`, read from the safetensors file
        `f` (safe_open) without reading the rest."""
        return self.shard(f.get_slice(name), name, args)

    def shard(self, part, name: str, args: ModelArgs) -> Tensor:
        """This rank's part of `part`, tensor `name` of the full model `args`: a tensor, or a safetensors
        slice (then only that part is read). A quantized layer's scales and zeros (quantize.py) are split
        like its weight, except int8's one scale per output channel, which a row-parallel layer keeps whole."""
        n, r = self.world, self.rank
        shape = list(part.shape) if isinstance(part, Tensor) else part.get_shape()

        def mine(size, offset=0):  # this rank's 1/n of `size` rows (or columns) from `offset` on
            return slice(offset + r * size // n, offset + (r + 1) * size // n)

        if ".attention.wqkv." in name:  # the rows of the query heads, then the key heads, then the value heads
            q, kv = args.n_head * args.head_dim, args.n_kv_head * args.head_dim
            return torch.cat([part[mine(q)], part[mine(kv, q)], part[mine(kv, q + kv)]])
        if name.endswith((".attention.wo.scales", ".feed_forward.w2.scales")) and len(shape) == 1:
            return part[:]
        if name.endswith(tuple(f"{layer}.{p}" for layer in (".attention.wo", ".feed_forward.w2")
                               for p in ("weight", "scales", "zeros"))):  # input columns
            if shape[1] % n:  # int4's packed inputs, and their groups, split evenly or not at all
                raise UsageError(f"{name} has {shape[1]} columns, which {n} tensor-parallel ranks cannot share evenly")
            return part[:, mine(shape[1])]
        if ".feed_forward.w1." in name or ".feed_forward.w3." in name:  # output rows
            return part[mine(shape[0])]
        if name in ("tok_embeddings.weight", "output.weight"):  # rows of the vocabulary, padded to 1/n rounded up
            rows = -(-args.vocab_size // n)
            held = part[min(r * rows, args.vocab_size):min((r + 1) * rows, args.vocab_size)]
            return F.pad(held, (0, 0, 0, rows - held.shape[0]))
        if name.endswith("norm.weight"):  # every rank has the norms whole
            return part[:]
        raise ValueError(f"no tensor-parallel split is known for {name}")  # a bias of wo or w2 would be summed N times

    def connect(self, model: Transformer, vocab_size: int) -> Transformer:
        """Add the collectives to a loaded shard: attention's and the MLP's partial outputs are summed
        over the ranks, and the logits of the vocabulary's slices put side by side."""
        for block in model.layers:
            block.attention.register_forward_hook(_sum_over_ranks)
            block.feed_forward.register_forward_hook(_sum_over_ranks)
        rows = model.args.vocab_size
        before, after = self.rank * rows, (self.world - 1 - self.rank) * rows

        def whole_vocabulary(_model, _inputs, logits):
            # Each rank's slice in its place and zeros elsewhere: the sum is every slice side by side,
            # exactly (x + 0 = x). A pass has one position's logits, so the all-reduce's N-fold bytes
            # over a gather's are small, and its functional API is the same in torch 2.11 and 2.13.
            return _sum(F.pad(logits, (before, after)))[..., :vocab_size]

        model.register_forward_hook(whole_vocabulary)
        return model


class VocabSlice(nn.Embedding):
    """Rows [start, start + num_embeddings) of the vocabulary's embedding: a token outside them looks
    up zeros, so the sum over the ranks is every token's embedding, exactly."""

    def __init__(self, num_embeddings: int, dim: int, start: int):
        super().__init__(num_embeddings, dim)
        self.start = start

    def forward(self, tokens: Tensor) -> Tensor:
        local = tokens - self.start
        inside = (local >= 0) & (local < self.num_embeddings)
        rows = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        return _sum(rows * inside.unsqueeze(-1))


def _sum(x: Tensor) -> Tensor:
    out = funcol.all_reduce(x, "sum", dist.group.WORLD)
    # Eagerly the result is an AsyncCollectiveTensor, which waits where it is first used, and a
    # chunk's logits that prefill never reads would be left unwaited. Waiting here costs nothing: the
    # next op needs the sum anyway (on CUDA the wait orders the streams, the host does not block).
    # A compiled graph has its waits already, on plain tensors.
    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out


def _sum_over_ranks(_module, _inputs, partial: Tensor) -> Tensor:
    return _sum(partial)


def _divisors(*counts: int) -> str:
    common = [d for d in range(1, min(counts) + 1) if all(c % d == 0 for c in counts)]
    return ", ".join(map(str, common[:-1])) + f" or {common[-1]}" if len(common) > 1 else "1"


def init(device: torch.device) -> TensorParallel:
    """Join the ranks torchrun started (it sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous): with
    device "cuda", NCCL between GPUs, the rank of local rank r on cuda:r; with "cpu", gloo."""
    global _group, _store
    cuda = device.type == "cuda"
    if cuda:
        if device.index is not None:
            raise UsageError(f"under torchrun each rank runs on cuda:LOCAL_RANK; give --device cuda, not {device}",
                             ("device",))
        per_machine, gpus = int(os.environ["LOCAL_WORLD_SIZE"]), torch.cuda.device_count()
        if per_machine > gpus:  # checked alike on every rank, so that rank 0 says it (first_to_fail)
            raise UsageError(f"{per_machine} ranks on this machine but it has {gpus} GPUs: start at most {gpus} "
                             f"(torchrun --nproc-per-node), or run them on the CPU (--device cpu)")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    _store, rank, world = next(dist.rendezvous("env://"))
    dist.init_process_group("nccl" if cuda else "gloo", store=_store, rank=rank, world_size=world,
                            device_id=device if cuda else None)
    _group = TensorParallel(rank, world, device)
    return _group


def leave():
    """Leave the group after a run that went well (NCCL warns at exit about a group left standing)."""
    if _group is not None:
        dist.destroy_process_group()


# --- the ranks agree on the host, through the rendezvous store ----------------------------------------
# Host-side waits (a conversion on rank 0, stdin, each rank's plan) go through torchrun's store, not
# through GPU collectives, whose watchdog would end a wait of more than ten minutes.

def _key(name: str) -> str:
    """A store key of this run of torchrun (its store outlives a restart of the ranks)."""
    run, restart = os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"headinfer/{run}/{restart}/{name}"


def _exchange(value) -> list:
    """Every rank's `value`, in rank order, once every rank has given its own."""
    global _exchanges
    _exchanges += 1
    keys = [_key(f"exchange{_exchanges}/{r}") for r in range(_group.world)]
    _store.set(keys[_group.rank], pickle.dumps(value))
    _store.wait(keys, HOST_WAIT)
    return [pickle.loads(_store.get(k)) for k in keys]


def rank0_first(fn):
    """fn() on rank 0, then on the others (what rank 0 did once, such as a conversion, they find
    done); just fn() outside a group."""
    if _group is None:
        return fn()
    result = fn() if _group.rank == 0 else None
    _exchange(None)
    return result if _group.rank == 0 else fn()


def from_rank0(fn):
    """Rank 0's fn() on every rank (what only one process may read, such as stdin, or what must be
    the same everywhere, such as a prompt's ids); just fn() outside a group."""
    if _group is None:
        return fn()
    return _exchange(fn() if _group.rank == 0 else None)[0]


def agree(fn):
    """fn() on every rank of a group, once all have arrived (so that none has allocated yet); a
    refusal on any of them refuses on all, with the same message: the lowest failing rank's."""
    if _group is None:
        return fn()
    _exchange(None)
    try:
        result, failure = fn(), None
    except UsageError as e:
        result, failure = None, (str(e), e.options)
    for rank, failed in enumerate(_exchange(failure)):
        if failed is not None:
            message, options = failed
            raise UsageError(message if rank == 0 else f"rank {rank}: {message}", options)
    return result


def fewest_over_ranks(n: int) -> int:
    """The smallest of every rank's n (n itself outside a group)."""
    return n if _group is None else min(_exchange(n))


def rank_file(path) -> Path:
    """The file of this rank's part of `path` (a prompt cache of its own heads), `path` outside a group:
    book.kv is book.kv.rank0-of-2 and book.kv.rank1-of-2 for two ranks."""
    path = Path(path)
    return path if _group is None else path.with_name(f"{path.name}.rank{_group.rank}-of-{_group.world}")


# --- failing as a group ---------------------------------------------------------------------------

def first_to_fail() -> bool:
    """Called by a rank that fails: True for the first rank of the group to fail, which alone says why;
    the others fail because it did (a peer that left), or in the same way, and stay silent. True
    outside torchrun."""
    if not launched():
        return True
    if _store is None:  # before the group has met, every rank fails alike (the same arguments): rank 0 says it
        return os.environ["RANK"] == "0"
    return _failures(add=1) == 1


def failed_elsewhere() -> bool:
    """Whether another rank of the group has failed (then this rank's run ends because of it, and the
    other rank says why); False outside a group."""
    return _store is not None and _failures(add=0) > 0


def _failures(add: int) -> int:
    """The group's count of failed ranks, after adding `add`; when the store is gone with torchrun's
    agent, someone has failed (and counts as the first)."""
    try:
        return _store.add(_key("failures"), add)
    except Exception:  # noqa: BLE001  whatever the store raises once its server is gone
        return 2


def exit_process(code: int):
    """End this process. A rank of a group skips the interpreter's teardown, where NCCL may wait for
    peers that are gone; torchrun ends the others."""
    if _group is None:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
