"""gpu_check.py --dry_run: every step of the one-command GPU check runs on the CPU (tiny models, the kernels in the
interpreter, stub timers) and its summary holds every table, so the script cannot rot between GPU sessions."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def _check(out, *flags):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "gpu_check.py"), "--dry_run", "--out", str(out), *flags],
                       env=ENV, capture_output=True, text=True, timeout=1200)
    summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
    return r, summary


def test_dry_run_runs_every_step_and_writes_every_table(tmp_path):
    r, summary = _check(tmp_path / "gc")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = [line.split(" | ")[:2] for line in summary.splitlines() if line.startswith("| kernel_") or
             line.startswith("| step_")]
    names = [s[0][2:] for s in steps]
    assert names == ["kernel_tests", "step_sdxl", "kernel_bench", "step_sdxl_lora64", "step_sdxl_nockpt_b2",
                     "step_sdxl_sdpa", "step_sd15_b4"] and all(s[1] == "ok" for s in steps), steps
    for title in ("### Attention, fwd+bwd TFLOP/s", "### DPO loss fwd+bwd, GB/s", "### One DPO optimizer step"):
        assert title in summary
    rows = [line for line in summary.splitlines() if line.startswith("| `")]
    assert len(rows) == 7  # two impls for the SDXL and SD1.5 headlines, ours for the other three
    ours = [line.split(" | ") for line in rows if " | ours | " in line]
    assert len(ours) == 5 and all(float(cells[6]) > 0 for cells in ours)  # the plan's prediction of each of ours
    assert any(line.startswith("| `DPO_KERNELS=torch ") for line in rows)  # the SDPA step says what it changed
    assert all(line.endswith("| 0.6931 |") for line in rows)  # loss@0 = log 2 everywhere
    assert sorted(f for f in os.listdir(tmp_path / "gc") if f.endswith(".log")) == sorted(f"{n}.log" for n in names)


def test_budget_spent_skips_the_rest_and_says_so(tmp_path):
    r, summary = _check(tmp_path / "gc", "--budget", "0")
    assert r.returncode == 1
    assert summary.count("| skipped (--budget 0 s spent) |") == 7
