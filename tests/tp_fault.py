"""generate.py's CLI with rank 1's prefill raising after its first chunk (tests/test_tp.py), while
rank 0 goes on into the next chunk's all-reduces and waits there for rank 1."""
import os

import generate

if os.environ["RANK"] == "1":
    real_prefill = generate.prefill

    def prefill(model, cache, prompt_ids, chunk=None, progress=False):
        real_prefill(model, cache, prompt_ids[:chunk], chunk)
        raise RuntimeError("injected fault in prefill")

    generate.prefill = prefill

generate.cli()
