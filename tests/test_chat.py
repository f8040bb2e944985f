"""Multi-turn chat: each turn appends only its new tokens to the same cache, answers as a single run over
the whole conversation's ids would, and the session survives refusals and Ctrl-C."""
import io
import json

import pytest
import torch

import generate as G
from chat import Conversation, prompt_text
from errors import UsageError
from generate import generate, prefill
from planner import make_cache, plan_cache
from tests.test_cli_errors import run_in_process
from tests.test_offload import tiny_model
from tests.test_prompt_cache import LOGIT_ATOL, ids_of
from tests.test_windows import windowed_model


@pytest.mark.parametrize("windowed", [False, True], ids=["global", "sliding-window"])
@pytest.mark.parametrize("policy", ["none", "layer", "head"])
def test_each_turn_answers_as_a_single_run_over_the_whole_conversation(policy, windowed):
    """The session's way (generate continuing one cache; the answer, less a stop token, appended; the
    cache cut back to the conversation) against cold runs over the same ids. With sliding-window
    layers, cutting back further than their rings reach starts the cache over: the same answers."""
    model = windowed_model(window=8, vocab_size=97) if windowed else tiny_model(6, 3)
    stop = {int(t) for t in torch.arange(0, 97, 7)}  # some answers stop early, some run to the limit
    cache = make_cache(plan_cache(model.args, 200, torch.float32, "cpu", policy), model.args)
    ids = ids_of(40)
    for turn in range(4):
        ids += ids_of(9 + turn, seed=10 + turn)
        held = cache.length  # the logits of prefilling only what the cache lacks, then rolled back
        warm_logits = prefill(model, cache, ids[held:], chunk=16)
        cache.truncate(held)
        cold = make_cache(plan_cache(model.args, 200, torch.float32, "cpu", policy), model.args)
        torch.testing.assert_close(warm_logits, prefill(model, cold, ids, chunk=16), atol=LOGIT_ATOL, rtol=0)
        answer = generate(model, ids, 12, stop_ids=stop, prefill_chunk=16, cache=cache)
        assert answer == generate(model, ids, 12, offload=policy, stop_ids=stop, prefill_chunk=16)
        ids += answer[:-1] if answer[-1] in stop else answer
        cache.truncate(min(cache.length, len(ids)))


def test_a_cache_that_holds_the_whole_prompt_is_refused():
    model = tiny_model(6, 3)
    cache = make_cache(plan_cache(model.args, 50, torch.float32, "cpu", "none"), model.args)
    prefill(model, cache, ids_of(10))
    with pytest.raises(UsageError, match="must go beyond them"):
        generate(model, ids_of(10), 3, cache=cache)


# --- turns rendered through the chat template ----------------------------------------------------

@pytest.mark.default_model
def test_turn_by_turn_ids_render_the_templates_conversation(tiny_ckpt):
    _, tok = G.load_model(tiny_ckpt)
    conv = Conversation(tok, chat=True, opening="A long document.")
    conv.ask("First question?")
    conv.answer(tok.encode("An answer.", bos=False) + [tok.token_id("<|im_end|>")])
    conv.ask("Second?")
    expected = tok.apply_chat_template([{"role": "user", "content": "A long document.\n\nFirst question?"},
                                        {"role": "assistant", "content": "An answer."},
                                        {"role": "user", "content": "Second?"}])
    assert tok.decode(conv.ids, skip_special=False) == expected
    assert prompt_text(tok, True, "First question?", opening="A long document.") == expected[:expected.index(
        "An answer.")]  # a one-turn prompt is the conversation's first turn
    conv.reset()
    assert tok.decode(conv.ids, skip_special=False) == expected[:expected.index("First question?")]


@pytest.mark.default_model
def test_a_chat_message_carries_no_trailing_newline_but_plain_text_does(tiny_ckpt):
    """A prompt file ends with a newline by convention; in the chat template it would be part of what the
    user says. A file's text and the same text given with --prompt (no newline) are the same ids."""
    _, tok = G.load_model(tiny_ckpt)
    ids = lambda *a, **kw: tok.encode(prompt_text(tok, *a, **kw))  # noqa: E731
    assert ids(True, "Where?\n") == ids(True, "Where?") != ids(True, "Where?\n\n", opening="A document.")
    assert ids(True, "Where?", opening="A document.\n") == ids(True, "Where?", opening="A document.")
    assert ids(False, "Where?\n") != ids(False, "Where?")  # plain text continues as written
    conv = Conversation(tok, chat=True, opening="A document.\n")
    conv.ask("Where?\n")
    assert tok.decode(conv.ids, skip_special=False) == prompt_text(tok, True, "Where?", opening="A document.")


# --- the CLI session -----------------------------------------------------------------------------

def chat(tiny_ckpt, capsys, monkeypatch, lines, *flags):
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{l}\n" for l in lines)))
    r = run_in_process(G.cli, ["--checkpoint", str(tiny_ckpt), "-i", "--json", "--max-new-tokens", "6", *flags],
                       capsys)
    turns = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    return r, turns


@pytest.mark.default_model
def test_a_session_appends_turns_and_reset_keeps_the_opening(tiny_ckpt, tmp_path, capsys, monkeypatch):
    doc = tmp_path / "doc.txt"
    doc.write_text("The miller kept seven cats. " * 8)
    r, turns = chat(tiny_ckpt, capsys, monkeypatch, ["How many cats?", "And dogs?", "/reset", "How many cats?",
                                                      "/exit", "never asked"], "--prompt-file", str(doc))
    assert r.returncode == 0 and "Traceback" not in r.stderr and len(turns) == 3
    first, second, again = turns
    opening = first["reused_tokens"]
    assert opening > 60  # the document was prefilled before the first question
    answered = first["prompt_tokens"] + len(first["new_tokens"])
    assert second["reused_tokens"] >= answered - 2  # nothing prefilled twice (less a stop token, maybe one unfed)
    assert again["reused_tokens"] == opening and again["prompt_tokens"] == first["prompt_tokens"]
    assert again["new_tokens"] == first["new_tokens"]  # the same context after /reset: the same answer


@pytest.mark.default_model
def test_a_turn_past_ctx_size_is_refused_and_the_session_goes_on(tiny_ckpt, capsys, monkeypatch):
    r, turns = chat(tiny_ckpt, capsys, monkeypatch, ["hello", "word " * 40, "/reset", "hi"], "--ctx-size", "60")
    assert r.returncode == 0 and len(turns) == 2
    refusals = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(refusals) == 1 and "ctx_size 60" in refusals[0]


@pytest.mark.default_model
def test_ctrl_c_stops_the_answer_not_the_session(tiny_ckpt, capsys, monkeypatch):
    real_decode, calls = G.decode, []

    def decode_then_ctrl_c(*a, **kw):
        calls.append(1)
        for i, token in enumerate(real_decode(*a, **kw)):
            if len(calls) == 1 and i == 2:
                raise KeyboardInterrupt
            yield token

    monkeypatch.setattr(G, "decode", decode_then_ctrl_c)
    r, turns = chat(tiny_ckpt, capsys, monkeypatch, ["hello", "again"])
    assert r.returncode == 0 and len(turns) == 2
    assert turns[0]["interrupted"] and len(turns[0]["new_tokens"]) == 2
    assert not turns[1]["interrupted"]
    assert turns[1]["reused_tokens"] >= turns[0]["prompt_tokens"] + 1  # the partial answer stayed in the conversation


class CtrlCWhileWaiting(io.StringIO):
    """stdin whose first readline is interrupted by Ctrl-C, as at the idle `>` prompt."""

    def __init__(self, text):
        super().__init__(text)
        self.interrupted = False

    def readline(self, *a):
        if not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        return super().readline(*a)


@pytest.mark.default_model
def test_ctrl_c_at_the_idle_prompt_keeps_the_session_and_says_how_to_end_it(tiny_ckpt, capsys, monkeypatch):
    stdin = CtrlCWhileWaiting("hello\n/exit\n")
    monkeypatch.setattr("sys.stdin", stdin)
    r = run_in_process(G.cli, ["--checkpoint", str(tiny_ckpt), "-i", "--json", "--max-new-tokens", "3"], capsys)
    assert stdin.interrupted and r.returncode == 0
    assert "(Ctrl-C stops an answer; /exit or Ctrl-D ends the session)" in r.stderr.splitlines()
    assert len([l for l in r.stdout.splitlines() if l.startswith("{")]) == 1  # "hello" was still answered


@pytest.mark.default_model
def test_the_opening_is_saved_once_and_reused_by_the_next_session(tiny_ckpt, tmp_path, capsys, monkeypatch):
    doc, kv = tmp_path / "doc.txt", tmp_path / "doc.kv"
    doc.write_text("A document worth keeping. " * 6)
    r, turns = chat(tiny_ckpt, capsys, monkeypatch, ["Summary?"], "--prompt-file", str(doc), "--prompt-cache", str(kv))
    assert r.returncode == 0 and kv.exists()
    written = kv.stat().st_mtime_ns
    r, again = chat(tiny_ckpt, capsys, monkeypatch, ["Summary?"], "--prompt-file", str(doc), "--prompt-cache", str(kv))
    assert f"{turns[0]['reused_tokens'] - 1} of {turns[0]['reused_tokens']} prompt tokens reused" in r.stderr
    same = ("new_tokens", "prompt_tokens", "reused_tokens")
    assert [{k: t[k] for k in same} for t in again] == [{k: t[k] for k in same} for t in turns]
    assert kv.stat().st_mtime_ns == written  # the file held exactly this opening: not written again
