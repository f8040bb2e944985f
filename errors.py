"""The one exception type for problems a user can fix, shared by the Python API and both CLIs, and
the argument parser both CLIs use to say a bad flag in one line."""
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
