"""Every GPU number this project reports, in one command and one run (GPU time comes in short slices):

    python bench/gpu_check.py                # on one H100/H200: at most 9 minutes; writes gpu_check/summary.md
    python bench/gpu_check.py --dry_run      # the same steps on the CPU: tiny shapes, stub timers (CI runs this)

Steps, in order of what matters most if time runs out, each in its own process with its own time limit (seconds,
so one failure or hang costs only its step; together 535, within --budget's 540):
  kernel_tests 100          the GPU kernel tests (bf16 forward and every gradient against the fp32 references)
  step_sdxl 60              bench/step.py: an SDXL DPO step at 1024^2, ours vs a diffusers-UNet trainer, same run
  kernel_bench 95           kernels/bench.py --quick: attention vs every SDPA backend (the SDXL, SD1.5, SD3.5-medium
                            and FLUX-dev shapes), the loss kernel vs eager / torch.compile and copy bandwidth, the
                            quantized linear (fp8, int8, nf4) vs dequantize-then-F.linear
  step_flux_dev_lora64 70   FLUX.1-dev's LoRA-64 DPO step at 1024^2, ours vs diffusers' transformer with peft's LoRA
  step_qwen_image_lora64 50 Qwen-Image's (20B) LoRA-64 step at 1024^2, ours alone (no diffusers baseline: time)
  step_z_image_lora64 35    Z-Image's (6B) LoRA-64 step at 1024^2, ours alone
  step_sd35m_lora64 45      SD3.5-medium's LoRA-64 step, ours vs diffusers'
  step_flux_dev_lora64_nf4 45  ours on an nf4 base (dpo.py --quantize nf4): time and memory beside the bf16 base's
  step_sdxl_lora64 20, step_sdxl_sdpa 15: a memory tier and the attention backend, measured
                            torch.cuda.max_memory_allocated beside `bench/step.py --plan`'s prediction
Every bench/step.py step runs fewer timed steps than its default (its flags in STEPS) to fit the 9 minutes.

Out: gpu_check/summary.md (tables that go straight into BENCHMARKS.md, with the date, GPU, torch and Triton
versions and each command), the CSV files behind them, and one .log per step.
"""
import argparse
import csv
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo

# bench/step.py configurations: (name, released model, flags, environment, seconds). The first is the headline: dpo.py's
# SDXL defaults, ours against the diffusers UNet; then the flow transformers' LoRA steps (dpo.py's flow defaults: 1
# pair, 1024^2, checkpointing, AdamW, bf16), ours against diffusers' transformer; "sdpa" is our UNet with torch's
# attention instead of the kernel. Fewer timed steps than bench/step.py's 10 after 3, so that all fit.
SHORT = ["--steps", "4", "--warmup", "1"]
STEPS = [("sdxl", "sdxl", ["--steps", "6", "--warmup", "2"], {}, 60),
         ("flux_dev_lora64", "flux-dev", ["--lora", "64", "--steps", "3", "--warmup", "1"], {}, 70),
         ("qwen_image_lora64", "qwen-image", ["--impl", "ours", "--lora", "64", "--steps", "3", "--warmup", "1"], {},
          50),
         ("z_image_lora64", "z-image", ["--impl", "ours", "--lora", "64", "--steps", "3", "--warmup", "1"], {}, 35),
         ("sd35m_lora64", "sd35-medium", ["--lora", "64", "--steps", "3", "--warmup", "1"], {}, 45),
         ("flux_dev_lora64_nf4", "flux-dev", ["--impl", "ours", "--lora", "64", "--quantize", "nf4", "--steps", "3",
                                              "--warmup", "1"], {}, 45),
         ("sdxl_lora64", "sdxl", ["--impl", "ours", "--lora", "64", *SHORT], {}, 20),
         ("sdxl_sdpa", "sdxl", ["--impl", "ours", *SHORT], {"DPO_KERNELS": "torch"}, 15)]
BUDGET = {"tests": 100, "bench": 95}  # seconds of the kernel tests and kernels/bench.py --quick


def plan(args, out):
    """(name, argv, seconds, env) of every step; --dry_run swaps in tiny models and CPU flags."""
    py, env = sys.executable, {}
    kernel_tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(ROOT, "tests",
                                                                                     "test_kernels_gpu.py")]
    bench = [py, os.path.join(ROOT, "kernels", "bench.py"), "--quick", "--out", out]
    step = [py, os.path.join(ROOT, "bench", "step.py"), "--csv", os.path.join(out, "step.csv")]
    budget, cpu, model = dict(BUDGET), [], {name: name for _, name, *_ in STEPS}  # the released configs, no weights
    if args.dry_run:  # tiny models, one step each, the Triton kernels in the interpreter
        env = {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
        bench.append("--dry_run")
        model = {name: tiny_model(out, name) for name in model}
        cpu = ["--device", "cpu", "--resolution", "32", "--steps", "1", "--warmup", "0", "--dtype", "fp32"]
        budget = {"tests": 300, "bench": 300}
    steps = [("kernel_tests", kernel_tests, budget["tests"], env)]
    for i, (name, released, flags, step_env, seconds) in enumerate(STEPS):
        argv = step + ["--model", model[released], *flags, *cpu]  # the dry run's flags last: they win
        steps.append((f"step_{name}", argv, 300 if args.dry_run else seconds, {**env, **step_env}))
        if i == 0:
            steps.append(("kernel_bench", bench, budget["bench"], env))
    return steps


def tiny_model(out, released):
    """A tiny random diffusers model of a released model's family for --dry_run (tests/tiny.py's make_<family>, built
    once)."""
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import families
    import tiny
    import tiny_qwen
    name = families.released(released)[0].name.replace("-", "_")
    root = os.path.join(out, f"tiny_{name}")
    if not os.path.isfile(os.path.join(root, "model_index.json")):
        (getattr(tiny, f"make_{name}", None) or getattr(tiny_qwen, f"make_{name}"))(root)
    return root


def run(name, argv, seconds, env, out):
    """One step in its own process, its output in out/name.log; (return code, seconds). 124: out of time."""
    tic = time.time()
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        try:
            rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=seconds, cwd=ROOT,
                                env={**os.environ, **env}).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.time() - tic


def read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def value(cell):
    """A CSV cell as a float, None when empty (what a run could not measure, e.g. peak memory on the CPU)."""
    return None if cell in (None, "", "None") else float(cell)


def num(cell, fmt):
    """A CSV cell as formatted, '-' when empty."""
    v = value(cell)
    return "-" if v is None else format(v, fmt)


def tables(out) -> list:
    """The markdown tables of BENCHMARKS.md from the CSV files of this run."""
    lines = []
    attn = read_csv(os.path.join(out, "attention.csv"))
    if attn:
        lines += ["### Attention, fwd+bwd TFLOP/s (kernels/bench.py --quick)", "",
                  "| shape | ours (Triton) | best SDPA backend | its TFLOP/s | ratio |", "|---|---|---|---|---|"]
        for shape in dict.fromkeys(r["shape"] for r in attn):
            rows = [r for r in attn if r["shape"] == shape and value(r["fwdbwd_tflops"]) is not None]
            ours = next((float(r["fwdbwd_tflops"]) for r in rows if r["impl"] == "triton"), None)
            sdpa = [r for r in rows if r["impl"] != "triton"]
            best = max(sdpa, key=lambda r: float(r["fwdbwd_tflops"])) if sdpa else None
            b = float(best["fwdbwd_tflops"]) if best else None
            ratio = f"{ours / b:.2f}" if ours and b else "-"
            name = best["impl"] if best else "-"
            lines.append(f"| {shape} | {num(ours, '.1f')} | {name} | {num(b, '.1f')} | {ratio} |")
        lines.append("")
    loss = read_csv(os.path.join(out, "dpo_loss.csv"))
    if loss:
        lines += ["### DPO loss fwd+bwd, GB/s (kernels/bench.py --quick)", "",
                  f"Copy bandwidth: {num(loss[0]['copy_gbs'], '.0f')} GB/s.", "",
                  "| shape | impl | ms | GB/s | % of copy |", "|---|---|---|---|---|"]
        for r in loss:
            gbs = value(r["gbs"])
            pct = "-" if gbs is None else f"{100 * gbs / float(r['copy_gbs']):.0f}%"
            lines.append(f"| {r['shape']} | {r['impl']} | {num(r['ms'], '.3f')} | {num(r['gbs'], '.0f')} | {pct} |")
        lines.append("")
    qlin = read_csv(os.path.join(out, "quantized_linear.csv"))
    if qlin:
        lines += ["### Quantized linear, bf16 activations, ms (kernels/bench.py --quick)", "",
                  "| shape (M, N, K) | format | impl | fwd ms | fwd + dx ms |", "|---|---|---|---|---|"]
        for r in qlin:
            lines.append(f"| {r['shape']} ({r['M']}, {r['N']}, {r['K']}) | {r['format']} | {r['impl']} | "
                         f"{num(r['fwd_ms'], '.3f')} | {num(r['fwddx_ms'], '.3f')} |")
        lines.append("")
    step = read_csv(os.path.join(out, "step.csv"))
    if step:
        lines += ["### One DPO optimizer step (bench/step.py)", "",
                  "| flags | impl | s/step | pairs/s | MFU | peak GiB measured | plan GiB | plan / measured | loss@0 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in step:
            cmd = r["command"].replace("python bench/step.py ", "")
            cmd = cmd.replace(f"--csv {os.path.join(out, 'step.csv')}", "")
            peak, pred, mfu = value(r.get("peak_gib")), value(r.get("plan_gib")), value(r["mfu"])
            ratio = "-" if peak is None or pred is None else f"{pred / peak:.2f}"
            mfu = "-" if mfu is None else f"{100 * mfu:.1f}%"
            lines.append(f"| `{cmd.strip() or '(defaults)'}` | {r['impl']} | {num(r['s_step'], '.3f')} | "
                         f"{num(r['pairs_s'], '.3f')} | {mfu} | {num(peak, '.2f')} | {num(pred, '.2f')} | {ratio} | "
                         f"{num(r['loss0'], '.4f')} |")
        lines.append("")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check", help="folder for summary.md, the CSV files and the logs")
    p.add_argument("--dry_run", action="store_true", help="on the CPU with tiny models: checks the script, no numbers")
    p.add_argument("--budget", type=float, help="seconds for all steps: a step gets what is left of it, up to its "
                   "own limit; steps past it are skipped (summary.md is rewritten after each step) [540; dry run 1800]")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 1800 if args.dry_run else 540
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    for f in ("attention.csv", "dpo_loss.csv", "quantized_linear.csv", "step.csv"):  # this run's numbers only
        if os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("error: bench/gpu_check.py needs a CUDA GPU (or --dry_run)")
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    device = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [f"## GPU check, {date}", "", f"{device} | torch {torch.__version__} | triton {tv} | "
            f"`python bench/gpu_check.py{' --dry_run' if args.dry_run else ''}`", "",
            "| step | result | seconds | command |", "|---|---|---|---|"]
    results, start, summary = [], time.time(), ""
    for name, cmd, seconds, env in plan(args, out):
        left = args.budget - (time.time() - start)
        short = " ".join(f"{k}={v}" for k, v in env.items() if k == "DPO_KERNELS")
        short = (short + " " if short else "") + shlex.join([os.path.relpath(c, ROOT) if c.startswith(ROOT) else c
                                                             for c in cmd[1:]])
        if left < 20:
            results.append(f"| {name} | skipped (--budget {args.budget:.0f} s spent) | 0 | `{short}` |")
        else:
            print(f"{name} ...", flush=True)
            rc, took = run(name, cmd, min(seconds, left), env, out)
            verdict = "ok" if rc == 0 else ("out of time" if rc == 124 else f"failed (exit {rc})")
            print(f"{name}: {verdict} in {took:.0f} s (log: {os.path.join(out, name + '.log')})", flush=True)
            results.append(f"| {name} | {verdict} | {took:.0f} | `{short}` |")
        summary = "\n".join(head + results + [""] + tables(out))
        with open(os.path.join(out, "summary.md"), "w") as f:  # after every step: a cut run keeps what it measured
            f.write(summary + "\n")
    print(summary)
    print(f"wrote {os.path.join(out, 'summary.md')}")
    return 0 if all("| ok |" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
