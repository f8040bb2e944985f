"""What the user is told: the one exception type for problems a user can fix, shared by the Python API
and both CLIs; the argument parser both CLIs use to say a bad flag in one line; and the two streams of
a run, the answer on stdout and every note on stderr on a line of its own."""
import argparse
import sys


class UsageError(Exception):
    """A bad checkpoint, argument or prompt, or a run that cannot fit: one line, no traceback needed.

    The message speaks the Python API's terms. `options` names the arguments that would fix it
    (API parameter names such as "prefill_chunk"), so that a CLI can point at its own flags.
    """

    def __init__(self, message: str, options: tuple[str, ...] = ()):
        super().__init__(message)
        self.options = tuple(options)

    def with_flags(self) -> str:
        """The message as a CLI says it, pointing at the flags of the arguments (prefill_chunk: --prefill-chunk)."""
        if not self.options:
            return str(self)
        return f"{self} (see {', '.join('--' + name.replace('_', '-') for name in self.options)})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line, like every other error of these tools (argparse prints the usage too)."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


# --- the answer on stdout, notes on stderr ----------------------------------------------------------
# Under `2>&1` both streams reach one terminal or file: a note printed while a streamed answer's line
# is still open would glue onto it ("...their namespaceprompt cache doc.kv: 1949 tokens saved").

_answer_line_open = False  # the answer streamed to stdout has text after its last newline


def write_answer(text: str):
    """Stream a piece of the answer to stdout."""
    global _answer_line_open
    if text:
        print(text, end="", flush=True)
        _answer_line_open = not text.endswith("\n")


def end_answer_line():
    """End the answer's line on stdout, if it has one open."""
    global _answer_line_open
    if _answer_line_open:
        print(flush=True)
        _answer_line_open = False


def say(line: str):
    """One line for the user on stderr (a note, a warning, the plan, the stats), on a line of its own."""
    end_answer_line()
    print(line, file=sys.stderr, flush=True)
