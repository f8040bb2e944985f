"""Decode speed of the embedded model through the CLI, one run per row (the README's CPU table).

    python bench/cli_decode.py            # writes bench/results/cli-decode-<device>.json

Each row is a real `generate.py --json` run; the JSON keeps the command and the reported stats.
"""
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

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


def main():
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    prompt_file = out / "cli-decode-prompt.tmp"
    prompt_file.write_text(LONG_PROMPT)
    rows = []
    for name, argv in ROWS.items():
        if "2K" in name:
            argv = ["--prompt-file", str(prompt_file)] + argv
        r = subprocess.run([sys.executable, "generate.py", *argv, "--json"], cwd=ROOT, capture_output=True,
                           text=True, check=True)
        stats = json.loads(r.stdout.strip().splitlines()[-1])
        stats.pop("text"), stats.pop("new_tokens")
        rows.append({"name": name, "argv": argv, **stats})
        print(f"{name:28s} prompt {stats['prompt_tokens']:5d}  decode {stats['decode_tok_s']:6.1f} tok/s  "
              f"first step {stats['first_step_s']:.2f} s", flush=True)
    prompt_file.unlink()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    path = out / f"cli-decode-{device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
