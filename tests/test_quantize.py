"""int8 and int4 weights (quantize.py): the rounding itself against its definition, each kernel against
dequantized weights times the input, the cache policies exact for the same quantized model, stored
checkpoints equal to quantizing at load, GGUF's int4 blocks taken as they are, the planner's bytes, and
what is refused before any weight is read."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import planner
import quantize as Q
from checkpoint import load_model
from convert_checkpoint import ConversionError, convert, gguf_int4
from errors import UsageError
from generate import generate
from model import ModelArgs, Transformer
from offload import HeadOffloadCache, LayerOffloadCache, StandardCache
from planner import GiB
from tests.test_offload import logits_of
from tests.test_planner import fake_gpu

ROOT = Path(__file__).resolve().parent.parent
EPS = torch.finfo(torch.float32).eps
# dim 64 and MLP 128: whole int4 groups of 32 and the CPU kernel's tiles of 16 outputs in every layer.
ARGS = ModelArgs(dim=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, intermediate_size=128, vocab_size=97,
                 max_seq_len=256, rope_base=10000.0)


def lively(args=ARGS, seed=0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args).eval()
    for p in model.parameters():  # larger than default init: peaked attention, tokens that vary
        torch.nn.init.normal_(p, std=0.25)
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("float")
    ARGS.to_json(out / "config.json")
    save_file(lively().state_dict(), out / "model.safetensors")
    return out


# --- the rounding, and the kernels ------------------------------------------------------------------

def weights_to_round():
    torch.manual_seed(1)
    w = torch.randn(48, 128) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different sizes
    w[3] = 0                    # a row (and its groups) of zeros: scales must not divide by zero
    w[5, :32] = 0.75            # a constant group
    return w


@pytest.mark.parametrize("mode", Q.WEIGHTS)
def test_quantization_rounds_each_weight_to_its_nearest_level(mode):
    w = weights_to_round()
    parts = Q.quantize(w, mode)
    err = (Q.dequantize(parts) - w).abs()
    # Round to nearest: at most half a step (the scale) from w. Computing q * s (or (q - 8) s + z) and
    # w / s in fp32 adds a few roundings of |w|'s size: 4 eps |w| + tiny covers them.
    step = parts["scales"][:, None] if mode == "int8" else parts["scales"].repeat_interleave(Q.GROUP_SIZE, 1)
    assert (err <= step / 2 + 4 * EPS * w.abs() + 1e-30).all()
    assert err[3].max() == 0 and (err[5, :32] <= 4 * EPS).all()
    # and the levels are used: the largest |w| of a row (int8) or both ends of a group (int4) are levels
    assert (err.amax() < step.amax())
    if mode == "int8":
        assert parts["weight"].abs().amax(1)[torch.arange(48) != 3].eq(127).all()


def test_int4_packing_round_trips_two_values_per_byte():
    q = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    packed = Q.pack_int4(q)
    assert packed.shape == (16, 32) and torch.equal(packed[:, 0], q[:, 0] * 16 + q[:, 1])  # even input high
    assert torch.equal(Q.unpack_int4(packed), q)


def reference(x, parts, bias=None):
    """Dequantized weights (in fp32) times the input, in fp32: what every kernel must compute."""
    return F.linear(x.float(), Q.dequantize(parts), None if bias is None else bias.float())


@pytest.mark.parametrize("mode", Q.WEIGHTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4, 16, 17, 64])  # the kernels' few rows, and the dequantize path
def test_a_quantized_linear_computes_dequantized_weights_times_input(mode, dtype, rows):
    torch.manual_seed(2)
    w, bias = torch.randn(96, 128), torch.randn(96)
    parts = Q.quantize(w, mode)
    parts["scales"] = parts["scales"].to(dtype).float()  # what the layer holds: scales in the activation dtype
    if mode == "int4":
        parts["zeros"] = parts["zeros"].to(dtype).float()
    layer = Q.quantized_linear(mode, parts, bias, torch.device("cpu"), dtype)
    x = torch.randn(2, rows, 128).to(dtype)
    got, want = layer(x).float(), reference(x, parts, bias)
    size = x.float().abs() @ Q.dequantize(parts).abs().T + bias.abs()  # sum |x_i w_i| (+ |bias|) per output
    if dtype == torch.float32:
        # fp32 sums of 128 products (the int8 path scales after the sum): gamma_128 ~ 128 eps of sum |x w|
        assert ((got - want).abs() <= 130 * EPS * size).all()
        if mode == "int4":  # the fp32 int4 path is this very matmul
            assert torch.equal(got, want)
    else:
        # bf16: the kernel may round each dequantized weight and the output to bf16, 2^-8 each, and
        # accumulates in fp32; 2^-7 of sum |x w| bounds both.
        assert ((got - want).abs() <= 2 ** -7 * size).all()


def test_the_quantized_layers_are_the_blocks_linears_not_the_embedding_or_output():
    model = lively(ModelArgs(**{**ARGS.__dict__, "tie_word_embeddings": False}))
    assert Q.quantized_layers(model) == [f"layers.{i}.{name}" for i in range(2) for name in
                                         ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3",
                                          "feed_forward.w2")]


# --- the model: exact attention for the same quantized weights ---------------------------------------

@pytest.fixture(scope="module", params=Q.WEIGHTS)
def quantized(request, ckpt):
    return request.param, load_model(ckpt, weights=request.param)[0]


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_every_policy_gives_the_standard_caches_logits_bit_for_bit_with_quantized_weights(quantized, chunk):
    mode, model = quantized
    T, n_decode = 37, 24
    tokens = torch.randint(0, ARGS.vocab_size, (1, T), generator=torch.Generator().manual_seed(3))
    ref = logits_of(model, StandardCache(ARGS, 1, T + n_decode, "cpu", torch.float32), tokens, chunk, n_decode)
    slots = ARGS.n_layer * ARGS.n_kv_head
    for cache in (LayerOffloadCache(ARGS, 1, T + n_decode, "cpu", torch.float32),
                  HeadOffloadCache(ARGS, 1, T + n_decode, "cpu", torch.float32, 1, 0),
                  HeadOffloadCache(ARGS, 1, T + n_decode, "cpu", torch.float32, 2, slots // 2)):
        # The linears compute the same (quantized) products whatever the cache; the caches' attention
        # is bit for bit the standard cache's (test_offload): so the logits are equal, not merely close.
        assert torch.equal(logits_of(model, cache, tokens, chunk, n_decode), ref), (mode, type(cache).__name__)


def test_greedy_tokens_of_every_policy_and_speculation_agree_with_quantized_weights(quantized):
    _, model = quantized
    prompt = [(7 * i + 3) % 97 for i in range(30)]
    expected = generate(model, prompt, 20, offload="none")
    assert len(set(expected)) > 1  # tokens that vary, or equality would prove little
    for offload in ("layer", "head"):
        assert generate(model, prompt, 20, offload=offload) == expected
    assert generate(model, prompt, 20, offload="head", speculate="lookup") == expected


def test_quantized_weights_change_the_model_by_their_rounding_only(quantized, ckpt):
    # The float model's logits and the quantized one's differ, by about what rounding the weights to
    # 255 (int8) or 16 (int4) levels moves them: a test that would catch a scale off by a factor, a
    # transposed group, or a layer left unquantized (difference 0).
    mode, model = quantized
    float_model = load_model(ckpt)[0]
    tokens = torch.tensor([[(5 * i + 1) % 97 for i in range(20)]])
    with torch.no_grad():
        a = float_model(tokens, torch.arange(20), StandardCache(ARGS, 1, 20, "cpu", torch.float32))
        b = model(tokens, torch.arange(20), StandardCache(ARGS, 1, 20, "cpu", torch.float32))
    rel = ((a - b).norm() / a.norm()).item()
    assert (0.0005 < rel < 0.03) if mode == "int8" else (0.01 < rel < 0.4), rel


def test_the_planner_counts_the_bytes_the_loaded_weights_take(quantized):
    mode, model = quantized
    with torch.device("meta"):
        meta = Transformer(ARGS)
    assert Q.describe(model) == {"weights": mode, "weights_bytes": Q.weight_bytes(meta, mode, torch.float32)}
    assert Q.weight_bytes(meta, mode, torch.float32) < Q.weight_bytes(meta, None, torch.float32)


# --- stored checkpoints ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", Q.WEIGHTS)
def test_a_checkpoint_quantized_once_loads_as_the_same_model_as_quantizing_at_load(mode, ckpt, tmp_path):
    stored = convert(ckpt, tmp_path / "q", quantize=mode)  # one of our converted dirs as the source
    a, _ = load_model(stored)  # no weights argument: the checkpoint says what it holds
    b, _ = load_model(ckpt, weights=mode)
    assert Q.describe(a)["weights"] == mode
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert load_model(stored, weights=mode)[0] is not None  # asking for what it holds is fine
    other = "int4" if mode == "int8" else "int8"
    with pytest.raises(UsageError, match=f"holds {mode} weights, not {other}"):
        load_model(stored, weights=other)
    with pytest.raises(ConversionError, match="already quantized"):
        convert(stored, tmp_path / "again", quantize=other)


def test_an_hf_checkpoint_quantized_by_another_tool_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 vocab_size=64)).save_pretrained(tmp_path / "hf")
    config = (tmp_path / "hf" / "config.json")
    config.write_text(config.read_text().replace('"vocab_size"', '"quantization_config": {"quant_method": "gptq"}, '
                                                                 '"vocab_size"'))
    with pytest.raises(ConversionError, match=r"already quantized \(gptq\)"):
        convert(tmp_path / "hf", tmp_path / "out", quantize="int8")


def test_the_converter_refuses_in_one_line(ckpt, tmp_path):
    for argv, needle in ((["--quantize", "int3"], "invalid choice: 'int3'"),
                         ([], "converted already")):
        r = subprocess.run([sys.executable, "convert_checkpoint.py", str(ckpt), "--out", str(tmp_path / "o"), *argv],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode != 0 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    stored = convert(ckpt, tmp_path / "q", quantize="int8")
    r = subprocess.run([sys.executable, "convert_checkpoint.py", str(stored), "--out", str(tmp_path / "o"),
                        "--quantize", "int8"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "already quantized (int8 weights)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# --- GGUF's int4 blocks, as they are --------------------------------------------------------------

def gguf_tensor(kind: str, rows: int, cols: int):
    """A GGUF tensor of `kind` as the reader gives it (raw blocks and the type), from random data (Q4_0,
    Q4_1: gguf's own quantizer) or random block bytes with sane fp16 scales (Q4_K: gguf-py has no quantizer)."""
    import gguf
    qtype = gguf.GGMLQuantizationType[kind]
    rng = np.random.default_rng(4)
    if kind == "Q4_K":
        blocks = rng.integers(0, 256, (rows * cols // 256, 144), dtype=np.uint8)
        blocks[:, 0:4] = rng.uniform(0.001, 0.05, (len(blocks), 2)).astype(np.float16).view(np.uint8)
        data = blocks.reshape(rows, -1)
    else:
        data = gguf.quants.quantize(rng.standard_normal((rows, cols), dtype=np.float32), qtype)
    return type("Tensor", (), {"data": data, "tensor_type": qtype})()


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_gguf_int4_blocks_become_int4_groups_without_a_float_weight(kind):
    import gguf
    t = gguf_tensor(kind, 16, 512)
    parts = gguf_int4(t, (16, 512))
    want = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(16, 512)
    got = Q.dequantize(parts)
    # The same levels: (q - 8) d + (m + 8 d) against d q + m (Q4_1; Q4_K alike), two fp32 roundings of
    # values up to |m| + 16 |d| apart; Q4_0's zero is 0 and (q - 8) d is the very product gguf computes.
    size = parts["zeros"].abs() + 16 * parts["scales"].abs()
    assert ((got - want).abs() <= 4 * EPS * size.repeat_interleave(32, 1)).all()
    if kind == "Q4_0":
        assert torch.equal(got, want)


@pytest.mark.slow
@pytest.mark.default_model
def test_the_embedded_q4_1_model_in_int4_is_its_gguf_weights_and_answers_paris():
    # Every linear of the embedded GGUF is Q4_1: as int4 it is the same model as the fp32 conversion, up
    # to the fp32 rounding of the zeros (the test above), so its logits stay within 1e-4 of it.
    fp32, tokenizer = load_model(None)
    int4, _ = load_model(None, weights="int4")
    int8, _ = load_model(None, weights="int8")
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    cache = lambda m: StandardCache(m.args, 1, len(ids), "cpu", torch.float32)
    with torch.no_grad():
        a = fp32(torch.tensor([ids]), torch.arange(len(ids)), cache(fp32))
        b = int4(torch.tensor([ids]), torch.arange(len(ids)), cache(int4))
    torch.testing.assert_close(b, a, rtol=0, atol=1e-3)
    for model in (int4, int8):
        answer = generate(model, ids, 30, offload="head", stop_ids=tokenizer.stop_ids)
        assert "Paris" in tokenizer.decode(answer)


# --- refused before any weight is read, and the planner ------------------------------------------------

def test_refusals_before_loading(ckpt, monkeypatch):
    read = []
    monkeypatch.setattr("checkpoint.safe_open", lambda *a, **k: read.append(a) or (_ for _ in ()).throw(AssertionError))
    with pytest.raises(UsageError, match="unknown weights 'int3'"):
        load_model(ckpt, weights="int3")
    with pytest.raises(UsageError, match="int4 weights on CUDA need dtype bfloat16"):
        Q.check_mode("int4", torch.device("cuda"), torch.float16)  # no GPU needed: the dtype decides
    assert not read


def test_int4_refuses_layers_it_cannot_tile(tmp_path):
    args = ModelArgs(**{**ARGS.__dict__, "dim": 48, "head_dim": 12})  # 48 inputs: not whole groups of 32
    with torch.device("meta"):
        model = Transformer(args)
    with pytest.raises(UsageError, match="whole groups of 32"):
        Q.check_checkpoint("int4", None, model, torch.device("cpu"), torch.float32)
    Q.check_checkpoint("int8", None, model, torch.device("cpu"), torch.float32)  # int8 takes any shape


def test_with_int8_weights_a_24_gib_gpu_keeps_more_kv_resident_at_128k(monkeypatch):
    # The paper's card (RTX 4090, 24 GiB) and Llama-3.1-8B at 128K tokens: the planner gets the memory the
    # weights leave free; int8 weights leave about 7.5 GiB more, which become resident (layer, head) slots.
    args = ModelArgs.from_name("Llama-3.1-8B")
    with torch.device("meta"):
        meta = Transformer(args)
    plans = {}
    for mode in (None, "int8"):
        fake_gpu(monkeypatch, 24, Q.weight_bytes(meta, mode, torch.bfloat16))
        plans[mode] = planner.plan_cache(args, 131072, torch.bfloat16, "cuda", "head")
    bf16, int8 = plans[None], plans["int8"]
    assert int8.resident_slots > bf16.resident_slots
    assert int8.store_bytes < bf16.store_bytes  # less KV streamed per token
    saved = Q.weight_bytes(meta, None, torch.bfloat16) - Q.weight_bytes(meta, "int8", torch.bfloat16)
    assert (int8.resident_bytes - bf16.resident_bytes) > 0.9 * saved - 2 * GiB  # the room went to KV
