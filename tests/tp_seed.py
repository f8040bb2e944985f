"""Each rank of a group writes the seed that generate.py's CLI gives it when sampling without --seed
to OUT/seed{rank} (tests/test_tp.py)."""
import sys
from pathlib import Path

import torch

import cli

opts = cli.parse_args(["--temperature", "1.0"])
tp = cli.join_tensor_parallel(opts, torch.device("cpu"))
(Path(sys.argv[1]) / f"seed{tp.rank}").write_text(str(opts.seed))
