"""PNG plots from summary.json: decode s/token and prefill seconds vs context, GPU memory bars.

    python bench/plot.py [bench/results/summary.json]    # writes the PNGs beside the JSON
matplotlib is imported lazily: bench.py warns and goes on without plots where it is missing.
"""
import json
import sys
from pathlib import Path

GiB = 1 << 30


def _series(rows, label, y):
    """{label: ([context], [value])} for the rows that have a value, by increasing context."""
    out = {}
    for r in sorted(rows, key=lambda r: r["context"]):
        if r.get(y) is not None:
            xs, ys = out.setdefault(label(r), ([], []))
            xs.append(r["context"])
            ys.append(r[y])
    return out


def _loglog(plt, series, title, ylabel, path):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_plots(summary: dict, out_dir) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    out_dir, written = Path(out_dir), []
    where = f"{summary['device']}, {summary['model']}"
    if any(r.get("s_per_token") for r in summary["decode"]):
        written.append(out_dir / "decode.png")
        _loglog(plt, _series(summary["decode"], lambda r: r.get("config", r["policy"]), "s_per_token"),
                f"decode ({where})", "seconds per token", written[-1])
    if any(r.get("seconds") for r in summary["prefill"]):
        written.append(out_dir / "prefill.png")
        _loglog(plt, _series(summary["prefill"], lambda r: r["policy"], "seconds"),
                f"prefill ({where})", "seconds", written[-1])
    mem = [r for r in summary["memory"] if r.get("peak_gpu_bytes") is not None]
    if mem:  # stacked bars: weights, KV on the GPU, the rest (activations, buffers of the allocator)
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(mem)), 4.5))
        names = [f"{r['policy']}\n{r['context'] // 1024}K" if r["context"] >= 1024 else f"{r['policy']}\n{r['context']}"
                 for r in mem]
        w = [r["weights_bytes"] / GiB for r in mem]
        kv = [r["kv_gpu_bytes"] / GiB for r in mem]
        act = [max(0, r["peak_gpu_bytes"] / GiB - a - b) for r, a, b in zip(mem, w, kv)]
        ax.bar(names, w, label="weights")
        ax.bar(names, kv, bottom=w, label="KV on GPU")
        ax.bar(names, act, bottom=[a + b for a, b in zip(w, kv)], label="activations and other")
        ax.set(ylabel="peak GPU memory (GiB)", title=f"GPU memory ({where})")
        ax.legend()
        fig.tight_layout()
        written.append(out_dir / "memory.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "summary.json")
    for p in make_plots(json.loads(path.read_text()), path.parent):
        print(p)
