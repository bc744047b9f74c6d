"""How the command-line tools talk to the user: one error line, and progress lines that errors never run into.

Every tool (dpo.py, sample.py, evaluate.py, relabel.py, bench/step.py) reports a problem the user can act on as one
line on stderr, `error: <what, and the file it is about>`, and exits non-zero (2 for a bad flag, 1 for bad input,
130 for Ctrl-C); progress is one line on stderr rewritten in place, which an error first ends. Outputs are checked
before the work (check_output): never over a file the command reads, never over an earlier output unasked; one
command writes an output at a time (hold), and a command that fails leaves no empty folder behind (finish).
"""
import argparse
import errno
import fcntl
import os
import sys

import torch

_progress_open = False  # a progress line is on stderr without its newline
_held = {}  # real path -> (open descriptor holding its lock, lock file or None): the outputs this command writes
_made = []  # the folders this command made, in order: finish() removes those left empty
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype's names


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


class Interrupted(Exception):
    """Ctrl-C, worded as the one line that says where the work stopped and what it left (exit status 130)."""


def guard(fn, args, errors=(ValueError, OSError)):
    """fn(args), with a problem the user can act on (one of errors) reported as the one error line, and Ctrl-C as
    one line too (exit 130; the files being written are removed by weights.atomic on the way out); then finish()."""
    try:
        fn(args)
    except Interrupted as e:
        fail(str(e), status=130)
    except KeyboardInterrupt:
        fail("interrupted", status=130)
    except errors as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    finally:
        finish()


def check_output(path, reads=(), replace=False, flag="--overwrite", make_folder=False):
    """Refuse, before any work, an output that cannot be written or must not be: a missing (unless make_folder:
    then it is made) or read-only folder, a folder in a file's place, a file this command reads (real paths
    compared, links resolved), or an existing file unless `flag` (replace=True) says to replace it. Raises
    ValueError, one line."""
    real = os.path.realpath(path)
    for r in reads:
        if r is not None and os.path.exists(r) and os.path.realpath(r) == real:
            raise ValueError(f"{path} is also an input of this command ({r}): write the output elsewhere")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder: give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if make_folder and not os.path.exists(folder):
        try:
            make_folders(folder)
        except OSError as e:
            raise ValueError(f"cannot make the folder {folder} for {path}: {e.strerror}") from None
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {path}: no folder {folder}")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {path}: the folder {folder} is not writable")
    if os.path.exists(path) and not replace:
        raise ValueError(f"{path} exists: pass {flag} to replace it")


def make_folders(path):
    """os.makedirs(path), each folder it makes noted, so that finish() removes it if the command leaves it empty."""
    missing = []
    p = os.path.abspath(path)
    while not os.path.exists(p):
        missing.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    _made.extend(reversed(missing))


def hold(path, folder=True, flag="--out"):
    """Take the output path for this command alone: a folder (made if missing) is locked itself, a file through
    PATH.lock beside it. A second command writing there is refused in one line (ValueError). The lock is the
    kernel's (flock): it goes with the process however it ends, kill -9 included, so a killed run leaves nothing
    stuck (a file's PATH.lock may stay behind, unlocked). Released by finish(); on a file system without locks
    (some network mounts) a warning says that two writers would not be told apart."""
    real = os.path.realpath(path)
    if real in _held:
        return
    if folder:
        make_folders(path)
    lock = None if folder else real + ".lock"
    while True:
        fd = os.open(real, os.O_RDONLY) if folder else os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ValueError(f"{flag} {path} is being written by another command (it holds the lock on "
                                 f"{lock or path}): wait for it to end, or give another {flag}") from None
            end_progress()
            print(f"warning: cannot lock {lock or path} ({e.strerror}): a second command writing there at the same "
                  "time would not be refused", file=sys.stderr, flush=True)
            return
        if lock is None or (os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino):
            break
        os.close(fd)  # the lock file was removed by its last holder between our open and our lock: take the new one
    _held[real] = (fd, lock)


def finish():
    """The end of a command, however it ends: its locks released (their lock files removed) and the folders it made
    and left empty removed, so that a failed or interrupted command leaves nothing that a rerun would stumble on."""
    for real, (fd, lock) in list(_held.items()):
        if lock is not None and os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            os.remove(lock)
        os.close(fd)
        del _held[real]
    for folder in reversed(_made):
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
    _made.clear()


def parse_args(p, argv, defaults, at_least_1=(), valid=None) -> argparse.Namespace:
    """p's flags parsed from argv; args.given lists the flags typed (each of defaults when typed at all, so that one
    typed as its default value is told apart; any other when it differs from its default); then the flags of
    at_least_1 must be >= 1 (when set) and each of valid pass its test, else p.error: one line."""
    unset = object()  # argparse keeps what the namespace holds: every flag of defaults starts out unset
    args = argparse.Namespace(**{k: unset for k in defaults})
    p.parse_args(argv, args)
    args.given = sorted(k for k, v in vars(args).items() if v is not unset and (k in defaults or v != p.get_default(k)))
    for k, v in defaults.items():
        if getattr(args, k) is unset:
            setattr(args, k, v)
    for k in at_least_1:
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k} must be >= 1, got {getattr(args, k)}")
    for k, ok in (valid or {}).items():
        if not ok(getattr(args, k)):
            p.error(f"--{k} has an invalid value: {getattr(args, k)}")
    return args


def parse_map(spec: str, flag: str, keys) -> dict:
    """flag "A=x,B=y" -> {"A": "x", "B": "y"}, each A one of keys: e.g. --columns "caption=prompt,jpg_0=chosen"
    reads another parquet preference set as Pick-a-Pic (data.Preferences: without label_0, jpg_0 is preferred)."""
    out = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        ours, eq, theirs = part.partition("=")
        if not eq or not theirs.strip() or ours.strip() not in keys:
            raise ValueError(f"{flag} {spec!r}: {part!r} is not OURS=THEIRS with OURS one of {', '.join(keys)}")
        out[ours.strip()] = theirs.strip()
    return out
