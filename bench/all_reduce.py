"""All-reduce latency and bandwidth between the ranks of a group: the cost the tensor-parallel
performance model (bench/NOTES.md item 12) counts per token and per prefill chunk.

    torchrun --nproc-per-node 2 bench/all_reduce.py [OUT.json]     # gloo on the CPU, NCCL on GPUs

Functional all-reduces as tensor_parallel.py issues them, of 4 KiB (a small model's hidden state) to
16 MiB (a prefill chunk's), in the dtype of a run there (fp32 on the CPU, bf16 on GPUs); rank 0 prints
a table and, with OUT, writes it as JSON. Bus bandwidth is the bytes a ring moves per rank,
2 (N - 1) / N x size, over the time.
"""
import json
import os
import sys
from pathlib import Path
from time import perf_counter

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20]


def timed(x: torch.Tensor, repeats: int) -> float:
    for _ in range(5):
        funcol.all_reduce(x, "sum", dist.group.WORLD).wait()
    if x.is_cuda:
        torch.cuda.synchronize()
    dist.barrier()
    t = perf_counter()
    for _ in range(repeats):
        funcol.all_reduce(x, "sum", dist.group.WORLD).wait()
    if x.is_cuda:
        torch.cuda.synchronize()
    return (perf_counter() - t) / repeats


def main():
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    n, dtype = dist.get_world_size(), torch.bfloat16 if cuda else torch.float32
    rows = []
    for size in SIZES:
        x = torch.ones(size // dtype.itemsize, dtype=dtype, device="cuda" if cuda else "cpu")
        seconds = timed(x, repeats=max(5, min(200, (64 << 20) // size)))
        rows.append({"bytes": size, "us": seconds * 1e6, "bus_gbps": 2 * (n - 1) / n * size / seconds / 1e9})
    if dist.get_rank() == 0:
        for r in rows:
            print(f"all-reduce {r['bytes'] >> 10:6d} KiB over {n} ranks: {r['us']:9.1f} us, bus {r['bus_gbps']:.2f} GB/s")
        if len(sys.argv) > 1:
            Path(sys.argv[1]).write_text(json.dumps({"ranks": n, "backend": dist.get_backend(),
                                                     "dtype": str(dtype), "rows": rows}, indent=2) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
