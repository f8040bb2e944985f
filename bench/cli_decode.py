"""Decode speed of the embedded model through the CLI, one run per row (the CPU table of docs/benchmarks.md).

    python bench/cli_decode.py            # writes bench/results/cli-decode-<device>.json

Each row is a real `generate.py --json` run, repeated (interleaved with the other rows) and reported
as the median: on a shared 2-core VM one run of a row varies by +-20%. The JSON keeps the commands,
every run's stats, the machine (CPU model, threads) and the ratios of medians: absolute CPU speeds
vary 2-3x between machines, ratios much less.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the repo's modules and the bench package
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from bench.harness import machine

ROOT = Path(__file__).resolve().parent.parent
STORY = ["--chat", "--prompt", "Tell me a long story about a dragon who learns to sing.", "--max-new-tokens", "200"]
# ~2.3K tokens of filler, then a request for a long answer (random words make the model stop at once).
LONG_PROMPT = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 95
               + "\n\nNow write a long, detailed story about a shepherd who lives under this green grass and blue sky.")
ROWS = {
    "eager, standard cache": STORY + ["--offload", "none"],
    "compiled, standard cache": STORY + ["--offload", "none", "--compile"],
    "compiled, head offload": STORY + ["--offload", "head", "--compile"],
    "2K prompt, standard cache": ["--chat", "--max-new-tokens", "64", "--offload", "none"],
    "2K prompt, head offload": ["--chat", "--max-new-tokens", "64", "--offload", "head"],
}
RATIOS = {  # name: (numerator row, denominator row), decode tok/s
    "compiled / eager, standard cache": ("compiled, standard cache", "eager, standard cache"),
    "head / standard, compiled": ("compiled, head offload", "compiled, standard cache"),
    "head / standard, 2K prompt": ("2K prompt, head offload", "2K prompt, standard cache"),
}


def run_row(argv) -> dict:
    r = subprocess.run([sys.executable, "generate.py", *argv, "--json"], cwd=ROOT, capture_output=True,
                       text=True, check=True)
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    stats.pop("text"), stats.pop("new_tokens")
    return stats


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="runs per row, interleaved; the median is reported")
    opts = p.parse_args()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    prompt_file = out / "cli-decode-prompt.tmp"
    prompt_file.write_text(LONG_PROMPT)
    argvs = {name: (["--prompt-file", str(prompt_file)] if "2K" in name else []) + argv for name, argv in ROWS.items()}
    runs = {name: [] for name in ROWS}
    for repeat in range(opts.repeats):  # round robin: a slow spell of the machine hits every row alike
        for name, argv in argvs.items():
            runs[name].append(run_row(argv))
            print(f"[{repeat + 1}/{opts.repeats}] {name:28s} decode {runs[name][-1]['decode_tok_s']:6.1f} tok/s", flush=True)
    prompt_file.unlink()
    rows = []
    for name, stats in runs.items():
        rates = sorted(s["decode_tok_s"] for s in stats)
        rows.append({"name": name, "argv": ROWS[name], "decode_tok_s": statistics.median(rates),
                     "decode_tok_s_runs": rates, "first_step_s_median": statistics.median(s["first_step_s"] for s in stats),
                     "prompt_tokens": stats[0]["prompt_tokens"], "runs": stats})
        print(f"{name:28s} prompt {stats[0]['prompt_tokens']:5d}  decode median {rows[-1]['decode_tok_s']:6.1f} tok/s "
              f"(runs {', '.join(f'{r:.1f}' for r in rates)})")
    rate = {r["name"]: r["decode_tok_s"] for r in rows}
    ratios = {name: rate[a] / rate[b] for name, (a, b) in RATIOS.items()}
    for name, value in ratios.items():
        print(f"{name:34s} {value:.2f}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", **machine(),
              "repeats": opts.repeats, "rows": rows, "ratios": ratios}
    path = out / f"cli-decode-{device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
