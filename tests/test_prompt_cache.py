"""A prompt cache on disk: reuse is exact for every policy, a file that cannot be used is refused in one
line and the run goes on, and a save that fails or is interrupted leaves the old file as it was."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import prompt_cache as PC
from errors import UsageError
from generate import decode, generate, prefill
from planner import make_cache, plan_cache, plan_memory
from prompt_cache import UnusablePromptCache, load_prompt_cache, save_prompt_cache
from tests.test_offload import tiny_model

ROOT = Path(__file__).resolve().parent.parent

# Reuse changes where prefill chunks begin (the rest starts at the reused length, not at a multiple of
# the chunk), and a row's fp32 sums then run in another order. The largest difference measured over
# 5 models x 3 chunk sizes x 3 prefix lengths was 7.2e-7 on logits of magnitude 1-2.5 (a few ulps);
# 1e-5 allows ten times that. Where the chunk boundaries coincide, the tests ask for bit equality.
LOGIT_ATOL = 1e-5


def cpu_plan(model, policy, max_len=140, **layout):
    """plan_cache's CPU plan, or, with group_size/resident, that layout of head offload."""
    if layout:
        return plan_memory(model.args, max_len, torch.float32, "head", "cpu", **layout)
    return plan_cache(model.args, max_len, torch.float32, "cpu", policy)


LAYOUTS = [("none", {}), ("layer", {}), ("head", {}), ("head", dict(group_size=2, resident=4)),
           ("head", dict(group_size=3, resident=9))]
LAYOUT_IDS = ["none", "layer", "head-1x0", "head-2x4", "head-all-resident"]


def ids_of(n, seed=0, vocab=97):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def filled(model, plan, ids, chunk):
    cache = make_cache(plan, model.args)
    prefill(model, cache, ids, chunk=chunk)
    return cache


@pytest.mark.parametrize("saved", range(len(LAYOUTS)), ids=LAYOUT_IDS)
@pytest.mark.parametrize("loaded", range(len(LAYOUTS)), ids=LAYOUT_IDS)
def test_a_file_written_by_any_policy_loads_bit_for_bit_into_any_other(saved, loaded, tmp_path):
    model, ids = tiny_model(6, 3), ids_of(100)
    source = filled(model, cpu_plan(model, LAYOUTS[saved][0], **LAYOUTS[saved][1]), ids, chunk=16)
    save_prompt_cache(source, tmp_path / "p.kv", model, ids)
    target = make_cache(cpu_plan(model, LAYOUTS[loaded][0], **LAYOUTS[loaded][1]), model.args)
    new_ids = ids[:70] + [(t + 1) % 97 for t in ids[70:90]]  # shares exactly 70 tokens with the file
    assert load_prompt_cache(target, tmp_path / "p.kv", model, new_ids) == (70, 100)
    assert target.length == 70
    for layer in range(model.args.n_layer):
        for a, b in zip(source.read(layer, 0, 70), target.read(layer)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("layout", range(len(LAYOUTS)), ids=LAYOUT_IDS)
@pytest.mark.parametrize("chunk", [7, 16, 64])
@pytest.mark.parametrize("shared", [37, 80, 120], ids=["partly", "chunk-aligned", "fully"])
def test_reuse_gives_the_cold_runs_tokens_and_logits(layout, chunk, shared, tmp_path):
    """The file holds a prompt that shares `shared` tokens with the new one (all 120 of them: the same
    prompt again, when only its last token is prefilled); the rest is prefilled in chunks."""
    model = tiny_model(6, 3)
    policy, extra = LAYOUTS[layout]
    prompt = ids_of(120)
    written = prompt[:shared] + [(t + 1) % 97 for t in prompt[shared:shared + 30]]
    plan = cpu_plan(model, policy, **extra)
    save_prompt_cache(filled(model, plan, written, chunk), tmp_path / "p.kv", model, written)

    cold = make_cache(plan, model.args)
    cold_logits = prefill(model, cold, prompt, chunk=chunk)
    warm = make_cache(plan, model.args)
    reused, _ = load_prompt_cache(warm, tmp_path / "p.kv", model, prompt)
    assert reused == min(shared, len(prompt) - 1)  # at least one token is prefilled: its logits start the answer
    warm_logits = prefill(model, warm, prompt[reused:], chunk=chunk)

    if reused % chunk == 0:  # the rest starts where a cold run's chunk starts: the same arithmetic
        assert torch.equal(warm_logits, cold_logits)
    torch.testing.assert_close(warm_logits, cold_logits, atol=LOGIT_ATOL, rtol=0)
    assert list(decode(model, warm, warm_logits, 12)) == list(decode(model, cold, cold_logits, 12))


def test_generate_with_a_prompt_cache_answers_as_without_and_writes_the_prompt_back(tmp_path):
    model, path = tiny_model(6, 3), tmp_path / "p.kv"
    first, second = ids_of(90) + [5, 6, 7], ids_of(90) + [8, 9]
    stats = {}
    assert generate(model, first, 10, offload="head", prompt_cache=path, stats=stats) == \
        generate(model, first, 10, offload="head")
    assert stats["reused_tokens"] == 0 and path.exists()
    assert load_file(path)["tokens"].tolist() == first  # the prompt, not the answer
    assert generate(model, second, 10, offload="layer", prompt_cache=path, stats=stats) == \
        generate(model, second, 10, offload="layer")
    assert stats["reused_tokens"] == 90
    assert load_file(path)["tokens"].tolist() == second
    before = path.read_bytes()
    generate(model, first, 10, prompt_cache=path, prompt_cache_ro=True, stats=stats)
    assert stats["reused_tokens"] == 90 and path.read_bytes() == before  # read only


def test_the_file_is_safetensors_with_the_documented_layout(tmp_path):
    model, ids = tiny_model(6, 3), ids_of(40)
    cache = filled(model, cpu_plan(model, "none"), ids, chunk=16)
    save_prompt_cache(cache, tmp_path / "p.kv", model, ids)
    tensors = load_file(tmp_path / "p.kv")  # any safetensors reader
    with safe_open(tmp_path / "p.kv", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "headinfer-prompt-cache" and meta["version"] == "1" and meta["dtype"] == "float32"
    assert meta["model"] == PC.fingerprint(model)
    assert sorted(tensors) == ["layers.0", "layers.1", "layers.2", "tokens"]
    k, v = cache.read(1)
    assert torch.equal(tensors["layers.1"][:, 0], k[0].transpose(0, 1))  # [T, 2, n_kv_head, head_dim]
    assert torch.equal(tensors["layers.1"][:, 1], v[0].transpose(0, 1))


def test_the_fingerprint_tells_models_apart_but_not_copies():
    a, b = tiny_model(6, 3, seed=0), tiny_model(6, 3, seed=1)
    copy = tiny_model(6, 3, seed=0)
    assert PC.fingerprint(a) == PC.fingerprint(copy) != PC.fingerprint(b)
    with torch.no_grad():
        copy.layers[2].attention.wqkv.weight[0, 0] += 0.5  # one weight: sampled, since index 0 always is
    assert PC.fingerprint(copy) != PC.fingerprint(a)


# --- files that cannot be used -------------------------------------------------------------------

def rewrite(path, tensors=None, **meta):
    """Rewrite a prompt cache through safetensors itself, with some tensors or metadata changed."""
    with safe_open(path, "pt") as f:
        old_meta = f.metadata()
    save_file({**load_file(path), **(tensors or {})}, path, metadata={**old_meta, **meta})


def flip_a_byte(path, offset_from_end):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


KEPT, DAMAGED = False, True  # whether a run may replace the file: only a damaged cache of ours
UNUSABLE = [
    ("other-model", lambda p, m: None, "another model", KEPT),
    ("other-dtype", lambda p, m: rewrite(p, dtype="bfloat16"), "written in bfloat16", KEPT),
    ("other-version", lambda p, m: rewrite(p, version="2"), "format version 2", KEPT),
    ("not-ours", lambda p, m: save_file({"x": torch.zeros(3)}, p), "not a prompt cache .a safetensors file", KEPT),
    ("text", lambda p, m: p.write_text("Chapter 1. It was a bright cold day in April.\n"), "not a prompt cache", KEPT),
    ("garbage", lambda p, m: p.write_bytes(b"\x00" * 64), "not a prompt cache", KEPT),
    ("header-cut", lambda p, m: p.write_bytes(p.read_bytes()[:100]), "not a prompt cache", KEPT),  # unrecognizable
    ("truncated", lambda p, m: p.write_bytes(p.read_bytes()[:-100]), "truncated", DAMAGED),
    ("empty", lambda p, m: p.write_bytes(b""), "it is empty", DAMAGED),
    ("corrupt-rows", lambda p, m: flip_a_byte(p, 50), "corrupt", DAMAGED),
    ("corrupt-tokens", lambda p, m: rewrite(p, {"tokens": torch.tensor(ids_of(60, seed=3))}), "corrupt", DAMAGED),
    ("corrupt-header", lambda p, m: rewrite(p, crc32="{"), "header is corrupt", DAMAGED),
]
NOT_A_CACHE = ["not-ours", "text", "garbage", "header-cut"]


def spoiled(case, tmp_path):
    """(writer, reader, the prompt's ids, the file spoiled as `case` says)."""
    name, spoil, _, _ = case
    writer, reader = tiny_model(6, 3), tiny_model(6, 3, seed=1 if name == "other-model" else 0)
    ids, path = ids_of(60), tmp_path / "p.kv"
    save_prompt_cache(filled(writer, cpu_plan(writer, "head"), ids, 16), path, writer, ids)
    spoil(path, writer)
    return writer, reader, ids, path


@pytest.mark.parametrize("case", UNUSABLE, ids=[c[0] for c in UNUSABLE])
def test_an_unusable_file_is_refused_with_the_reason_and_the_cache_left_empty(case, tmp_path):
    _, reader, ids, path = spoiled(case, tmp_path)
    cache = make_cache(cpu_plan(reader, "head"), reader.args)
    with pytest.raises(UnusablePromptCache, match=case[2]) as refused:
        load_prompt_cache(cache, path, reader, ids)
    assert cache.length == 0
    assert isinstance(refused.value, PC.DamagedPromptCache) == case[3]


@pytest.mark.parametrize("case", UNUSABLE, ids=[c[0] for c in UNUSABLE])
def test_a_run_writes_over_nothing_but_a_damaged_cache_of_ours(case, tmp_path, capsys):
    """A file that is not a prompt cache is the user's (a text, a checkpoint, another safetensors
    file): refused before any work. Another model's, dtype's or version's cache may have cost hours:
    the run goes on without it and keeps it. Only a damaged cache of ours is replaced."""
    name, _, words, damaged = case
    _, model, ids, path = spoiled(case, tmp_path)
    before = path.read_bytes()
    if name in NOT_A_CACHE:
        with pytest.raises(UsageError, match=f"{path} exists and is not a prompt cache.*left as it was"):
            generate(model, ids, 8, prompt_cache=path)
        assert path.read_bytes() == before
        return
    assert generate(model, ids, 8, prompt_cache=path) == generate(model, ids, 8)
    [note] = capsys.readouterr().err.strip().splitlines()
    assert note.startswith(f"note: prompt cache {path} not used: ") and re.search(words, note)
    if damaged:
        assert note.endswith("the file is replaced after the answer")
        assert load_file(path)["tokens"].tolist() == ids
    else:
        assert note.endswith("the file is kept, not saved over (give --prompt-cache another file name)")
        assert path.read_bytes() == before


def test_saving_writes_over_an_empty_file_or_a_cache_of_this_model_and_nothing_else(tmp_path):
    model, other = tiny_model(6, 3), tiny_model(6, 3, seed=1)
    ids, path = ids_of(40), tmp_path / "p.kv"
    cache = filled(model, cpu_plan(model, "none"), ids, 16)
    path.write_text("my notes\n")
    with pytest.raises(UsageError, match="not a prompt cache"):
        save_prompt_cache(cache, path, model, ids)
    assert path.read_text() == "my notes\n"
    path.write_bytes(b"")
    save_prompt_cache(cache, path, model, ids)               # an empty file
    save_prompt_cache(cache, path, model, ids[:30])          # this model's cache: updated
    assert load_file(path)["tokens"].tolist() == ids[:30]
    before = path.read_bytes()
    with pytest.raises(UsageError, match="another model.*it is kept"):
        save_prompt_cache(filled(other, cpu_plan(other, "none"), ids, 16), path, other, ids)
    assert path.read_bytes() == before


def test_a_missing_file_is_no_file(tmp_path):
    model = tiny_model(6, 3)
    cache = make_cache(cpu_plan(model, "none"), model.args)
    assert load_prompt_cache(cache, tmp_path / "none.kv", model, ids_of(10)) == (0, 0)


# --- saving: disk full, write errors, interrupts -----------------------------------------------

def saved_once(tmp_path):
    model, path = tiny_model(6, 3), tmp_path / "p.kv"
    first = ids_of(60)
    save_prompt_cache(filled(model, cpu_plan(model, "head"), first, 16), path, model, first)
    return model, path, path.read_bytes()


def no_partial_files(directory):
    return [p.name for p in Path(directory).iterdir() if p.name.endswith(".tmp")] == []


def test_too_little_disk_space_is_refused_before_writing(tmp_path, monkeypatch, capsys):
    model, path, before = saved_once(tmp_path)
    real = PC.shutil.disk_usage
    monkeypatch.setattr(PC.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    ids = ids_of(60, seed=5)
    with pytest.raises(UsageError, match="has 1000 B free; it was not saved"):
        save_prompt_cache(filled(model, cpu_plan(model, "none"), ids, 16), path, model, ids)
    assert path.read_bytes() == before and no_partial_files(tmp_path)
    # Through generate: the answer, then one warning line; the old file is kept.
    assert generate(model, ids, 6, prompt_cache=path) == generate(model, ids, 6)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the prompt cache") and "not saved" in err[0]
    assert path.read_bytes() == before


def test_a_write_that_fails_midway_leaves_the_old_file(tmp_path):
    """A real failed write: the process may write at most 4 KiB per file (RLIMIT_FSIZE, as on a
    full disk the kernel refuses the write), and the file needs ~30 KiB."""
    model, path, before = saved_once(tmp_path)
    script = (f"import signal, resource, sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from tests.test_offload import tiny_model\nfrom tests.test_prompt_cache import ids_of\n"
              "from generate import generate\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write, not a killed process\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
              f"print(generate(tiny_model(6, 3), ids_of(70, seed=7), 5, prompt_cache={str(path)!r}))\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(generate(model, ids_of(70, seed=7), 5))  # the answer was given
    warnings = [l for l in r.stderr.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "not saved: File too large" in warnings[0], r.stderr
    assert path.read_bytes() == before and no_partial_files(tmp_path)


def test_an_interrupted_save_leaves_the_old_file(tmp_path, monkeypatch):
    model, path, before = saved_once(tmp_path)
    real_rows, calls = PC._rows, []

    def rows_then_ctrl_c(*a):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_rows(*a)

    monkeypatch.setattr(PC, "_rows", rows_then_ctrl_c)
    ids, stats = ids_of(60, seed=6), {}
    with pytest.raises(KeyboardInterrupt):
        generate(model, ids, 5, prompt_cache=path, stats=stats)
    assert stats["interrupted"] and len(calls) == 2
    assert path.read_bytes() == before and no_partial_files(tmp_path)
    cache = make_cache(cpu_plan(model, "none"), model.args)
    assert load_prompt_cache(cache, path, model, ids_of(60)) == (59, 60)  # the old file still loads


def test_a_path_that_can_never_be_written_is_refused_before_the_run(tmp_path):
    model = tiny_model(6, 3)
    with pytest.raises(UsageError, match="is a directory"):
        generate(model, ids_of(10), 3, prompt_cache=tmp_path)
    with pytest.raises(UsageError, match="not a directory"):
        generate(model, ids_of(10), 3, prompt_cache=tmp_path / "missing" / "p.kv")
    assert generate(model, ids_of(10), 3, prompt_cache=tmp_path / "missing" / "p.kv", prompt_cache_ro=True)
