"""checkpoint.py, runs you can trust: --resume refuses another run, nothing to do is said and not done, what a crash
leaves is cleaned up, outputs never go stale, file modes follow the umask, unreadable pairs are counted once, and
training killed with SIGKILL anywhere resumes to the uninterrupted result."""
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
