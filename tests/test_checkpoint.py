"""checkpoint.py, runs you can trust: --resume refuses another run (but not a typed default), nothing to do is said
and not done, what a crash leaves is cleaned up, outputs never go stale, file modes follow the umask, unreadable
pairs are counted once, training killed with SIGKILL anywhere resumes to the uninterrupted result, and a full disk
or Ctrl-C is one line that loses nothing."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import checkpoint
import tiny
import unet as unetlib
import weights
from tiny import ENV, ROOT, run

pytestmark = pytest.mark.usefixtures("one_thread")


def _files(root):
    """path -> (size, mtime_ns) of every file under root."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            st = os.stat(os.path.join(d, n))
            out[os.path.join(d, n)] = (st.st_size, st.st_mtime_ns)
    return out


def _step(path):
    with safe_open(path, "pt") as f:
        return f.metadata().get("step")


def _moved_jsonl(src_jsonl, dst_dir):
    """A copy of the JSONL data set (file and images) in another folder."""
    shutil.copytree(os.path.dirname(src_jsonl), dst_dir)
    return os.path.join(dst_dir, os.path.basename(src_jsonl))


def test_resume_refuses_other_data_or_weights_but_follows_moved_files(tmp_path, sdxl_dir, sd15_dir, jsonl, capsys):
    out = tmp_path / "run"
    run(out, sdxl_dir, jsonl, "--ckpt_every", "1", steps=1)
    ck = out / "checkpoint.pt"
    before = ck.stat().st_mtime_ns
    lines = open(jsonl).read().splitlines()
    other = tmp_path / "other" / "pairs.jsonl"
    _moved_jsonl(jsonl, tmp_path / "other")
    other.write_text("\n".join(lines[:-2]) + "\n")  # one usable pair fewer
    model = shutil.copytree(sdxl_dir, tmp_path / "other_model")  # the same files, other UNet weights
    weights_file = str(model / "unet" / "diffusion_pytorch_model.safetensors")
    with safe_open(weights_file, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) + 1e-3 for k in f.keys()}, f.metadata()
    save_file(tensors, weights_file, metadata=meta)
    cases = [(sdxl_dir, str(other), "--data", f"{jsonl} (1 file(s), 8 pairs", f"{other} (1 file(s), 7 pairs"),
             (str(model), jsonl, "--model", f"{sdxl_dir} (", f"{model} (")]
    for model, data, flag, old, new in cases:
        with pytest.raises(SystemExit) as e:
            run(out, model, data, "--ckpt_every", "1", "--resume", steps=2)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(err) == 1, err
        assert err[0].startswith(f"error: --resume with other {flag}: {ck} was trained on {old}"), err[0]
        assert f"this run has {new}" in err[0] and err[0].endswith("use a new --out_dir"), err[0]
        assert ck.stat().st_mtime_ns == before  # nothing overwritten
    # the same model and data files, copied elsewhere: the fingerprints match and the run continues
    model = shutil.copytree(sdxl_dir, tmp_path / "moved_model")
    data = _moved_jsonl(jsonl, tmp_path / "moved_data")
    m = run(out, str(model), data, "--ckpt_every", "1", "--resume", steps=2)
    assert [r["step"] for r in m] == [1, 2]


def test_nothing_to_do_is_said_and_nothing_rewritten(tmp_path, sdxl_dir, jsonl, capsys):
    out = tmp_path / "run"
    run(out, sdxl_dir, jsonl, steps=2)
    assert _step(out / "unet" / "diffusion_pytorch_model.safetensors") == "2"
    before = _files(out)
    capsys.readouterr()
    for steps in (2, 1):
        m = run(out, sdxl_dir, jsonl, "--resume", steps=steps)
        assert f"nothing to do: {out / 'checkpoint.pt'} is at step 2, --max_steps is {steps}" in capsys.readouterr().out
        assert _files(out) == before and [r["step"] for r in m] == [1, 2]


def test_crash_leftovers_are_cleaned_and_a_cut_last_log_line_dropped(tmp_path, sdxl_dir, jsonl, capsys):
    out = tmp_path / "run"
    run(out, sdxl_dir, jsonl, "--ckpt_every", "1", steps=2)
    leftovers = [out / "checkpoint.pt.tmp4242", out / "unet" / "diffusion_pytorch_model.safetensors.tmp77",
                 out / "metrics.jsonl.tmp"]
    for f in leftovers:
        f.write_bytes(b"half a file")
    metrics = out / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 0.69')  # a crash during the append
    capsys.readouterr()
    m = run(out, sdxl_dir, jsonl, "--ckpt_every", "1", "--resume", steps=3)
    printed = capsys.readouterr().out
    assert not any(f.exists() for f in leftovers) and f"removed {leftovers[0]}" in printed
    assert f"warning: {metrics}:3: dropped a last line cut short by a crash" in printed
    assert [r["step"] for r in m] == [1, 2, 3]
    metrics.write_text(metrics.read_text().replace('"step": 2', '"step": oops'))  # not a crash: an error naming it
    with pytest.raises(SystemExit):
        run(out, sdxl_dir, jsonl, "--ckpt_every", "1", "--resume", steps=4)
    assert capsys.readouterr().err.strip().startswith(f"error: {metrics}:2: not a JSON line")


def test_no_stale_outputs_and_modes_follow_the_umask(tmp_path, sdxl_dir, jsonl, capsys):
    out = tmp_path / "run"
    run(out, sdxl_dir, jsonl, "--save_single", steps=2)
    assert _step(out / "unet.safetensors") == _step(out / "unet" / "diffusion_pytorch_model.safetensors") == "2"
    run(out, sdxl_dir, jsonl, "--ckpt_every", "1", "--resume", steps=3)  # no --save_single this time
    assert not (out / "unet.safetensors").exists()
    assert _step(out / "unet" / "diffusion_pytorch_model.safetensors") == "3"
    mode = 0o666 & ~weights._umask()
    modes = {str(f): oct(os.stat(f).st_mode & 0o777) for f in _files(out)}
    assert set(modes.values()) == {oct(mode)}, modes
    # killed after the last checkpoint but before the final UNet: the next --resume writes it, and only it
    shutil.rmtree(out / "unet")
    run(out, sdxl_dir, jsonl, "--resume", steps=3)
    assert _step(out / "unet" / "diffusion_pytorch_model.safetensors") == "3"
    u, saved = unetlib.load(str(out)), torch.load(out / "checkpoint.pt", weights_only=True)["policy"]
    assert all(torch.equal(saved[k], v) for k, v in u.state_dict().items())


def test_an_unreadable_pair_read_twice_counts_once(tmp_path, sdxl_dir, jsonl, capsys):
    data = tmp_path / "d"
    _moved_jsonl(jsonl, data)
    (data / "img" / "2_0.png").write_bytes(b"not a png")
    m = run(tmp_path / "run", sdxl_dir, str(data / "pairs.jsonl"), "--max_bad_frac", "0.5", steps=4)  # 2 epochs
    printed = capsys.readouterr().out
    assert printed.count("warning: skipping unreadable pair") >= 2  # met in both epochs ...
    assert f"{data / 'pairs.jsonl'}:3 " in printed  # ... named by file:line
    assert m[-1]["bad_pairs"] == 1  # ... and counted once


def _temp_files(out):
    return {os.path.join(d, n) for d, _, ns in os.walk(out) for n in ns if checkpoint.TEMP.search(n)}


def _logged(out):
    try:
        return open(os.path.join(out, "metrics.jsonl")).read().count("\n")
    except OSError:
        return 0


def _kill_run(argv, out, mode, delay):
    """Start dpo.py and SIGKILL it: mode "write" the moment a new temporary file shows up in out (inside a write),
    mode "step" `delay` seconds after it logs its first step. Returns (exit status, killed inside a write)."""
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    old_temp, old_logged, hit = _temp_files(out), _logged(out), [False]

    def watch():
        while proc.poll() is None:
            if mode == "write" and _temp_files(out) - old_temp:
                break
            if mode == "step" and _logged(out) > old_logged:
                time.sleep(delay)
                break
            time.sleep(0.0005)
        hit[0] = bool(_temp_files(out) - old_temp)
        proc.send_signal(signal.SIGKILL)
    watcher = threading.Thread(target=watch)
    watcher.start()
    _, err = proc.communicate(timeout=300)
    watcher.join()
    assert proc.returncode in (0, -signal.SIGKILL), err[-2000:]
    return proc.returncode, hit[0] and proc.returncode != 0


def test_sigkill_anywhere_then_resume_is_the_uninterrupted_run(tmp_path, sdxl_dir, jsonl):
    """Kill training again and again, after random steps and inside checkpoint, log and output writes, resuming
    each time: the final UNet is bit-identical to an uninterrupted run's, no temporary file is left, and each step
    is logged once with the uninterrupted run's numbers."""
    steps = 10
    common = [sys.executable, os.path.join(ROOT, "dpo.py"), "--model", sdxl_dir, "--data", jsonl, "--resolution",
              "32", "--batch_size", "2", "--grad_accum", "2", "--max_steps", str(steps), "--log_every", "1",
              "--lr", "1e-4", "--warmup", "0", "--ckpt_every", "1", "--device", "cpu"]
    full = subprocess.run(common + ["--out_dir", str(tmp_path / "full")], env=ENV, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    out, rng, kills, in_writes = tmp_path / "cut", random.Random(0), 0, 0
    for k in range(60):
        mode = "write" if k % 2 else "step"
        rc, hit = _kill_run(common + ["--out_dir", str(out), "--resume"], out, mode, rng.uniform(0.0, 0.4))
        kills += rc != 0
        in_writes += hit
        if rc == 0:  # finished: the last step, its checkpoint and the final UNet were written to the end
            break
    assert rc == 0 and kills >= 10 and in_writes >= 4, (rc, kills, in_writes)
    assert not _temp_files(out)
    a, b = unetlib.load(str(tmp_path / "full")), unetlib.load(str(out))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    logged = [json.loads(line) for line in open(out / "metrics.jsonl")]
    want = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["step"] for r in logged] == list(range(1, steps + 1))
    keys = ("loss", "implicit_acc", "model_mse", "ref_mse", "grad_norm")
    assert [[r[k] for k in keys] for r in logged] == [[r[k] for k in keys] for r in want]


# ----------------------------------------------------------------------------------------------------
# A full disk, Ctrl-C, odd flags: one line, nothing lost


def _size(path):
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(path) for n in ns) \
        if os.path.isdir(path) else os.path.getsize(path)


@pytest.mark.parametrize("where", ["checkpoint", "final UNet"])
def test_a_full_disk_is_one_line_and_the_last_checkpoint_is_kept(tmp_path, sdxl_dir, jsonl, capsys, monkeypatch,
                                                                 where):
    """A disk that fills while a checkpoint (or the final UNet) is written: one line naming the file and the cause,
    no temporary file left behind, the last good checkpoint as it was. On a real small tmpfs where one can be
    mounted, else with the write failing as a full disk does (ENOSPC)."""
    probe = tmp_path / "probe"
    run(probe, sdxl_dir, jsonl, "--ckpt_every", "1", steps=1)
    ck_bytes, unet_bytes = _size(probe / "checkpoint.pt"), _size(probe / "unet")
    capsys.readouterr()
    # checkpoint: room for one checkpoint and a half (the second's temporary file cannot fit beside the first);
    # final UNet: room for the checkpoint and half the UNet
    room = ck_bytes + (ck_bytes if where == "checkpoint" else unet_bytes) // 2 + 64 * 1024
    steps = 2 if where == "checkpoint" else 1
    with tiny.small_disk(tmp_path / "disk", room) as disk:
        out = os.path.join(disk, "run") if disk else str(tmp_path / "run")
        if disk is None and where == "checkpoint":
            tiny.fill_disk_after(monkeypatch, checkpoint.torch, "save", calls=2)
        elif disk is None:
            tiny.fill_disk_after(monkeypatch, weights, "save_file", calls=1)
        with pytest.raises(SystemExit) as e:
            run(out, sdxl_dir, jsonl, "--ckpt_every", "1", steps=steps)
        monkeypatch.undo()
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        name = "checkpoint.pt" if where == "checkpoint" else os.path.join("unet", "diffusion_pytorch_model.safetensors")
        assert e.value.code == 1 and len(err) == 1, err
        assert err[0] == f"error: cannot write {os.path.join(out, name)}: no space left on device", err
        assert not _temp_files(out)
        assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["step"] == 1  # the good one


def test_ctrl_c_says_where_it_stopped_and_leaves_no_temporary_file(tmp_path, sdxl_dir, jsonl):
    """SIGINT during training: exit 130, one line naming the step and the last checkpoint; --resume goes on."""
    out = tmp_path / "run"
    argv = [sys.executable, os.path.join(ROOT, "dpo.py"), "--model", sdxl_dir, "--data", jsonl, "--out_dir", str(out),
            "--resolution", "32", "--batch_size", "2", "--grad_accum", "1", "--max_steps", "500", "--log_every", "1",
            "--ckpt_every", "2", "--lr", "1e-4", "--warmup", "0"]
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while _logged(out) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted at step "), lines
    assert " of 500; last checkpoint: step " in lines[0] and str(out / "checkpoint.pt") in lines[0], lines
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert f"last checkpoint: step {step} in" in lines[0] and not _temp_files(out)


def test_out_dir_that_is_a_file_and_a_typed_default_on_resume(tmp_path, sdxl_dir, jsonl, capsys):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "file", sdxl_dir, jsonl, steps=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and err == [f"error: --out_dir {tmp_path / 'file'} is a file, not a folder: give a "
                                         "folder for the run's outputs"]
    assert (tmp_path / "file").read_text() == "mine"
    # --lora_alpha typed as the default it resolves to (alpha = rank) is no change of the run
    run(tmp_path / "lora", sdxl_dir, jsonl, "--lora", "4", "--ckpt_every", "1", steps=1)
    m = run(tmp_path / "lora", sdxl_dir, jsonl, "--lora", "4", "--lora_alpha", "4", "--resume", steps=2)
    assert [r["step"] for r in m] == [1, 2]
    with pytest.raises(SystemExit):  # another alpha is still refused
        run(tmp_path / "lora", sdxl_dir, jsonl, "--lora", "4", "--lora_alpha", "8", "--resume", steps=3)
    assert "--lora_alpha 4.0 -> 8.0" in capsys.readouterr().err
