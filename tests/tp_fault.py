"""generate.py's CLI with a fault on rank 1 (tests/test_tp.py): `tp_fault.py prefill ARGS` raises in its
prefill after the first chunk, while rank 0 goes on into the next chunk's all-reduces and waits there;
`tp_fault.py ram ARGS` gives it 1 KiB of host RAM, which refuses its weights."""
import os
import sys

import generate
import planner

fault, sys.argv[1:] = sys.argv[1], sys.argv[2:]
if os.environ["RANK"] == "1" and fault == "prefill":
    real_prefill = generate.prefill

    def prefill(model, cache, prompt_ids, chunk=None, progress=False):
        real_prefill(model, cache, prompt_ids[:chunk], chunk)
        raise RuntimeError("injected fault in prefill")

    generate.prefill = prefill
elif os.environ["RANK"] == "1" and fault == "ram":
    planner.host_available_bytes = lambda: 1024

generate.cli()
