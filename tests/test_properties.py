"""Property-based exactness: any small model, prompt, chunking and head placement gives the standard
cache's logits, bit for bit (on the CPU every policy makes the same attention calls; see test_offload)."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import ModelArgs, Transformer
from offload import HeadOffloadCache, LayerOffloadCache, StandardCache
from tests.test_offload import logits_of


@st.composite
def setups(draw):
    n_kv = draw(st.integers(1, 4))
    n_head = n_kv * draw(st.integers(1, 3))
    args = ModelArgs(dim=draw(st.sampled_from([16, 24, 32])), n_layer=draw(st.integers(1, 3)), n_head=n_head,
                     n_kv_head=n_kv, head_dim=draw(st.sampled_from([4, 8])), intermediate_size=32,
                     vocab_size=61, max_seq_len=128, rope_base=draw(st.sampled_from([100.0, 10000.0])),
                     qkv_bias=draw(st.booleans()), tie_word_embeddings=draw(st.booleans()))
    policy = draw(st.sampled_from(["layer", "head"]))
    group = draw(st.integers(1, n_kv))
    resident = draw(st.integers(0, args.n_layer * n_kv))
    prompt_len = draw(st.integers(1, 40))
    chunk = draw(st.integers(1, 45))
    n_decode = draw(st.integers(0, 12))
    seed = draw(st.integers(0, 2**16))
    return args, policy, group, resident, prompt_len, chunk, n_decode, seed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setups())
def test_offloaded_logits_equal_standard(setup):
    args, policy, group, resident, prompt_len, chunk, n_decode, seed = setup
    torch.manual_seed(seed)
    model = Transformer(args).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    tokens = torch.randint(0, args.vocab_size, (1, prompt_len))
    max_len = prompt_len + n_decode
    ref = logits_of(model, StandardCache(args, 1, max_len, "cpu", torch.float32), tokens, chunk, n_decode)
    cache = (LayerOffloadCache(args, 1, max_len, "cpu", torch.float32) if policy == "layer" else
             HeadOffloadCache(args, 1, max_len, "cpu", torch.float32, group, resident))
    got = logits_of(model, cache, tokens, chunk, n_decode)
    assert torch.equal(got, ref)
