"""Multi-turn chat over one KV cache: each turn appends its tokens, nothing is prefilled twice.

A Conversation holds the token ids of everything said so far (an opening document, the turns, the
answers); the cache always holds a prefix of them, so a turn prefills only what the cache lacks.
`interactive` is the CLI's session (`generate.py -i`): one user turn per stdin line.
"""
import sys

import torch

from errors import UsageError
from planner import make_cache, plan_cache

# Stand-ins rendered through the chat template, then split on: the text around a question (and
# around an answer) is whatever the model's template puts there, for any template.
QUESTION, ANSWER = "\x00question\x00", "\x00answer\x00"


def turn_parts(tokenizer, chat: bool, opening: str = "") -> tuple[str, str, str, str]:
    """(before, after) the first question, and (before, after) every later one. The opening (a
    document) leads the first user message, followed by a blank line and the question."""
    lead = f"{opening}\n\n" if opening else ""
    if not chat:  # plain text: the opening, then each question on a new line after the previous answer
        return lead, "", "\n", ""
    first = tokenizer.apply_chat_template([{"role": "user", "content": lead + QUESTION}])
    later = tokenizer.apply_chat_template([{"role": "user", "content": "-"}, {"role": "assistant", "content": ANSWER},
                                           {"role": "user", "content": QUESTION}])
    if first.count(QUESTION) != 1 or later.count(ANSWER) != 1 or later.count(QUESTION) != 1:
        raise UsageError("the model's chat template does not render messages as they are; use --no-chat")
    first_head, _, first_tail = first.partition(QUESTION)
    next_head, _, next_tail = later.partition(ANSWER)[2].partition(QUESTION)
    return first_head, first_tail, next_head, next_tail


def prompt_text(tokenizer, chat: bool, question: str, opening: str = "") -> str:
    """The text of a one-turn prompt: the same as a conversation's first turn, in one piece."""
    head, tail, _, _ = turn_parts(tokenizer, chat, opening)
    return head + question + tail


class Conversation:
    """The token ids of a conversation. `ids` only grows by whole turns (reset and rewind aside), so
    a cache holding a prefix of them stays valid from turn to turn."""

    def __init__(self, tokenizer, chat: bool, opening: str = ""):
        self.tokenizer = tokenizer
        opening_text, self.first_tail, self.next_head, self.next_tail = turn_parts(tokenizer, chat, opening)
        self.ids = tokenizer.encode(opening_text) if opening_text else []  # the opening (BOS included)
        self.opening, self.turns = len(self.ids), 0

    def ask(self, question: str) -> list[int]:
        """Append a user turn, up to where the answer starts; returns its ids."""
        head, tail = ("", self.first_tail) if self.turns == 0 else (self.next_head, self.next_tail)
        new = self.tokenizer.encode(head + question + tail, bos=None if not self.ids else False)
        self.ids += new
        self.turns += 1
        return new

    def answer(self, ids: list[int]):
        """Append the model's answer. A final stop token is left out: the next turn's text closes the
        answer as the template does."""
        self.ids += ids[:-1] if ids and ids[-1] in self.tokenizer.stop_ids else ids

    def rewind(self, length: int, turns: int):
        """Back to an earlier state (a turn that was interrupted before its answer began)."""
        del self.ids[length:]
        self.turns = turns

    def reset(self):
        """Forget every turn; keep the opening."""
        self.rewind(self.opening, 0)


def interactive(model, tokenizer, opts, chat: bool, offload: str, opening: str, first_question: str | None):
    """The CLI's chat session. The cache is planned once for opts.ctx_size tokens (default: the model's
    max_seq_len); the opening is prefilled (and taken from / saved to the prompt cache) before the
    first question; a turn that would pass ctx_size is refused, and the session goes on."""
    from generate import (Answer, check_ctx_size, default_prefill_chunk, generate, load_or_note, prefill, report,
                          save_or_warn)
    from prompt_cache import up_to_date

    args, device, dtype = model.args, model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    ctx = opts.ctx_size or args.max_seq_len
    check_ctx_size(args, ctx)
    conv = Conversation(tokenizer, chat, opening)
    if len(conv.ids) >= ctx:
        raise UsageError(f"the opening has {len(conv.ids)} tokens; ctx_size is {ctx}", ("prompt_file", "ctx_size"))
    chunk = opts.prefill_chunk or default_prefill_chunk(device)
    try:
        plan = plan_cache(args, ctx, dtype, device, offload, opts.gpu_kv_budget, chunk)
    except UsageError as e:  # the session's size is the knob that fits it
        raise UsageError(str(e), e.options + ("ctx_size",)) from None
    print(plan.describe(), file=sys.stderr)
    cache = make_cache(plan, args)
    if conv.ids:
        reused, stored = load_or_note(cache, opts.prompt_cache, model, conv.ids, True) if opts.prompt_cache else (0, 0)
        with torch.no_grad():
            prefill(model, cache, conv.ids[cache.length:], chunk, progress=True)
        if opts.prompt_cache and not opts.prompt_cache_ro and not up_to_date(reused, stored, conv.ids):
            save_or_warn(cache, opts.prompt_cache, model, conv.ids, True)
        print(f"opening: {len(conv.ids)} tokens ({reused} from the prompt cache); ask away (/reset, /exit)",
              file=sys.stderr)

    def turn(question):
        length, turns = len(conv.ids), conv.turns
        conv.ask(question)
        if len(conv.ids) >= ctx:
            conv.rewind(length, turns)
            print(f"error: this turn would take the conversation past ctx_size {ctx} tokens; /reset starts over "
                  f"(see --ctx-size)", file=sys.stderr)
            return
        answer, stats = Answer(tokenizer, show=not opts.json), {}
        try:
            generate(model, conv.ids, opts.max_new_tokens, temperature=opts.temperature, top_k=opts.top_k,
                     seed=opts.seed, prefill_chunk=chunk, compile=opts.compile, stop_ids=tokenizer.stop_ids,
                     on_token=answer.add, stats=stats, progress=True, cache=cache)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
            pass
        except UsageError as e:  # out of GPU memory: this turn fails, the conversation so far stands
            print(f"error: {e.with_flags()}", file=sys.stderr)
        report(opts, tokenizer, answer, stats)
        if stats.get("prefill_s") is None:  # stopped before the answer began: the question is dropped
            conv.rewind(length, turns)
        else:
            conv.answer(answer.ids)
        cache.truncate(min(cache.length, len(conv.ids)))  # e.g. a fed-back stop token, or a dropped turn

    questions = [first_question] if first_question else []
    while True:
        if not questions:
            if sys.stdin.isatty():
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:  # EOF
                return
            questions.append(line.strip())
        question = questions.pop()
        if question == "/exit":
            return
        if question == "/reset":
            conv.reset()
            cache.truncate(min(cache.length, len(conv.ids)))
            print("(conversation cleared; the opening is kept)", file=sys.stderr)
        elif question:
            turn(question)
