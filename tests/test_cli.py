"""cli.py: one writer per output (hold), what a command leaves when it fails (finish), the one error line."""
import fcntl
import os
import signal
import subprocess
import sys

import pytest

import cli
import dpo
import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLDER = "import sys, time; sys.path.insert(0, {root!r}); import cli; cli.hold({path!r}, folder={folder}); " \
         "print('held', flush=True); time.sleep(600)"


def holder(path, folder=True):
    """Another process holding path as cli.hold does, until killed; returns it once the lock is taken."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=ROOT, path=str(path), folder=folder)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_is_refused_and_a_killed_one_leaves_nothing_stuck(tmp_path):
    """A folder and a file, each held by another process: refused in one line (ValueError); after kill -9 the
    lock is gone with the process and the path is taken. The same process may hold a path twice."""
    for path, folder in ((tmp_path / "run", True), (tmp_path / "pairs.jsonl", False)):
        p = holder(path, folder)
        with pytest.raises(ValueError, match="is being written by another command"):
            cli.hold(str(path), folder=folder)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        cli.hold(str(path), folder=folder)
        cli.hold(str(path), folder=folder)  # (already ours)
        cli.finish()
        assert not os.path.exists(f"{path}.lock")  # a file's lock file goes with its release


def test_finish_removes_only_the_empty_folders_it_made(tmp_path):
    """A failed command leaves no empty folder it made; folders that hold files, or were there before, stay."""
    (tmp_path / "before").mkdir()
    cli.make_folders(str(tmp_path / "a" / "b" / "c"))
    cli.make_folders(str(tmp_path / "kept" / "sub"))
    (tmp_path / "kept" / "file").write_text("x")
    cli.hold(str(tmp_path / "before"))
    cli.finish()
    assert not os.path.exists(tmp_path / "a") and os.path.isdir(tmp_path / "before")
    assert os.path.isfile(tmp_path / "kept" / "file") and not os.path.exists(tmp_path / "kept" / "sub")


def test_dpo_refuses_a_run_folder_in_use(tmp_path, sd15_dir, jsonl, capsys):
    """Two runs into one --out_dir: the second is refused in one line before anything is read or written (the
    folder held as a plain flock would be: the same lock); once the first is gone the run goes ahead."""
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run holds it
    argv = ["--model", sd15_dir, "--data", jsonl, "--out_dir", str(out), "--resolution", "32", "--batch_size", "2",
            "--grad_accum", "1", "--max_steps", "1", "--warmup", "0", "--lr", "1e-4"]
    err = tiny.cli_error(dpo.main, argv, capsys)
    assert err == f"error: --out_dir {out} is being written by another command (it holds the lock on {out}): wait " \
                  "for it to end, or give another --out_dir"
    assert os.listdir(out) == []
    os.close(fd)
    dpo.main(argv)
    assert os.path.isfile(out / "checkpoint.pt")
