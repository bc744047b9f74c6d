"""bench/gpu_check.py --dry_run: every step of the one-command GPU check runs on the CPU (tiny models, the kernels in
the interpreter, stub timers) and its summary holds every table, so the script cannot rot between GPU sessions."""
import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def _check(out, *flags):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--dry_run", "--out", str(out),
                        *flags], env=ENV, capture_output=True, text=True, timeout=1200)
    summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
    return r, summary


def test_dry_run_runs_every_step_and_writes_every_table(tmp_path):
    r, summary = _check(tmp_path / "gc")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = [line.split(" | ")[:2] for line in summary.splitlines() if line.startswith("| kernel_") or
             line.startswith("| step_")]
    names = [s[0][2:] for s in steps]
    assert names == ["kernel_tests", "step_sdxl", "kernel_bench", "step_flux_dev_lora64", "step_qwen_image_lora64",
                     "step_z_image_lora64", "step_sd35m_lora64", "step_flux_dev_lora64_nf4", "step_sdxl_lora64",
                     "step_sdxl_sdpa"]
    assert all(s[1] == "ok" for s in steps), steps
    for title in ("### Attention, fwd+bwd TFLOP/s", "### DPO loss fwd+bwd, GB/s", "### One DPO optimizer step",
                  "### Quantized linear, bf16 activations, ms"):
        assert title in summary
    assert "| tiny joint |" in summary  # the flow models' attention (head dim 128) in the --quick benchmark
    rows = [line for line in summary.splitlines() if line.startswith("| `")]
    assert len(rows) == 11  # two impls for SDXL, FLUX's and SD3.5's LoRA steps, ours for the other five
    ours = [line.split(" | ") for line in rows if " | ours | " in line and "tiny_flux" not in line and
            "tiny_sd3" not in line]
    assert any("--quantize nf4" in line for line in rows)  # FLUX's LoRA step on an nf4 base
    assert any("tiny_qwen_image --impl ours --lora 64" in line for line in rows)  # Qwen-Image's and Z-Image's steps
    assert any("tiny_z_image --impl ours --lora 64" in line for line in rows)
    assert len(ours) == 5 and all(float(cells[6]) > 0 for cells in ours)  # the plan's prediction of each of ours
    for tiny in ("tiny_flux", "tiny_sd3"):  # ours and diffusers' transformer, with LoRA 64, same run
        flow = [line for line in rows if f"{tiny} --lora 64 " in line and "--quantize" not in line]
        assert [line.split(" | ")[1] for line in flow] == ["ours", "diffusers"], flow
    assert any(line.startswith("| `DPO_KERNELS=torch ") for line in rows)  # the SDPA step says what it changed
    assert all(line.endswith("| 0.6931 |") for line in rows)  # loss@0 = log 2 everywhere
    assert sorted(f for f in os.listdir(tmp_path / "gc") if f.endswith(".log")) == sorted(f"{n}.log" for n in names)
    with open(tmp_path / "gc" / "step.csv") as f:  # the rows behind the table: one per step and impl
        step = list(csv.DictReader(f))
    assert [(r["impl"], r["resolution"], r["batch_size"]) for r in step if "tiny_flux" in r["command"]] == [
        ("ours", "32", "1"), ("diffusers", "32", "1"), ("ours", "32", "1")]


def test_budget_spent_skips_the_rest_and_says_so(tmp_path):
    r, summary = _check(tmp_path / "gc", "--budget", "0")
    assert r.returncode == 1
    assert summary.count("| skipped (--budget 0 s spent) |") == 10


def test_step_limits_fit_nine_minutes():
    """The steps' own time limits add up to at most 9 minutes (the default --budget), the FLUX, Qwen-Image and Z-Image
    LoRA steps right after the headline and the kernel benchmark."""
    from bench import gpu_check
    steps = gpu_check.plan(gpu_check.argparse.Namespace(dry_run=False), "/tmp/gc")
    assert sum(seconds for _, _, seconds, _ in steps) <= 540
    first = ["kernel_tests", "step_sdxl", "kernel_bench", "step_flux_dev_lora64", "step_qwen_image_lora64",
             "step_z_image_lora64"]
    assert [name for name, *_ in steps][:6] == first
    flux = next(argv for name, argv, _, _ in steps if name == "step_flux_dev_lora64")
    assert flux[flux.index("--model") + 1] == "flux-dev" and "--lora" in flux
