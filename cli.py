"""How the command-line tools talk to the user: one error line, and progress lines that errors never run into.

Every tool (dpo.py, sample.py, evaluate.py, relabel.py, bench_step.py) reports a problem the user can act on as one line on stderr,
`error: <what, and the file it is about>`, and exits non-zero (2 for a bad flag, 1 for bad input); progress is
one line on stderr rewritten in place, which an error first ends.
"""
import argparse
import sys

_progress_open = False  # a progress line is on stderr without its newline


class Parser(argparse.ArgumentParser):
    """argparse with one error line (not usage + error) and exit status 2."""

    def error(self, message):
        fail(message, status=2)


def progress(message):
    """Rewrite the progress line on stderr."""
    global _progress_open
    print(f"\r{message}", end="", file=sys.stderr, flush=True)
    _progress_open = True


def end_progress():
    """Finish the progress line, if one is open, so that what follows starts on a fresh line."""
    global _progress_open
    if _progress_open:
        print(file=sys.stderr, flush=True)
    _progress_open = False


def fail(message, status=1):
    """The one error line, on a fresh line, then exit."""
    end_progress()
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def guard(fn, args, errors=(ValueError, OSError)):
    """fn(args), with a problem the user can act on (one of errors) reported as the one error line."""
    try:
        fn(args)
    except errors as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
