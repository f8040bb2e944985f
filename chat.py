"""Prompts through the chat template, and multi-turn chat over one KV cache: each turn appends its
tokens, nothing is prefilled twice.

A Conversation holds the token ids of everything said so far (an opening document, the turns, the
answers); the cache always holds a prefix of them, so a turn prefills only what the cache lacks.
The CLI's session (`generate.py -i`, one user turn per stdin line) is generate.interactive.

In a chat, a message carries no trailing whitespace: a prompt file ends with a newline by
convention, and that newline is not part of what the user says.
"""
from errors import UsageError

# Stand-ins rendered through the chat template, then split on: the text around a question (and
# around an answer) is whatever the model's template puts there, for any template.
QUESTION, ANSWER = "\x00question\x00", "\x00answer\x00"


def turn_parts(tokenizer, chat: bool, opening: str = "") -> tuple[str, str, str, str]:
    """(before, after) the first question, and (before, after) every later one. The opening (a
    document) leads the first user message, followed by a blank line and the question."""
    if not chat:  # plain text: the opening, then each question on a new line after the previous answer
        return f"{opening}\n\n" if opening else "", "", "\n", ""
    lead = f"{opening.rstrip()}\n\n" if opening else ""
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
    return head + (question.rstrip() if chat else question) + tail


class Conversation:
    """The token ids of a conversation. `ids` only grows by whole turns (reset and rewind aside), so
    a cache holding a prefix of them stays valid from turn to turn."""

    def __init__(self, tokenizer, chat: bool, opening: str = ""):
        self.tokenizer, self.chat = tokenizer, chat
        opening_text, self.first_tail, self.next_head, self.next_tail = turn_parts(tokenizer, chat, opening)
        self.ids = tokenizer.encode(opening_text) if opening_text else []  # the opening (BOS included)
        self.opening, self.turns = len(self.ids), 0

    def ask(self, question: str) -> list[int]:
        """Append a user turn, up to where the answer starts; returns its ids."""
        head, tail = ("", self.first_tail) if self.turns == 0 else (self.next_head, self.next_tail)
        question = question.rstrip() if self.chat else question
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
