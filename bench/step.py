"""Time one Diffusion-DPO optimizer step: ours (dpo.py) beside a diffusers-model trainer doing the same work.

    python bench/step.py                           # SDXL at 1024px, 1 pair/step, Adafactor, checkpointing, bf16
                                                   # (needs a GPU: it refuses what cannot fit, saying how much)
    python bench/step.py --model SD15_DIR          # another model: its denoiser's config (no weights are read)
    python bench/step.py --model sd15              # a released model's config (families.RELEASED; sdxl: the default)
    python bench/step.py --model tiny_sdxl/ --resolution 32 --steps 2 --warmup 1 --dtype fp32 --device cpu
    python bench/step.py --model flux-dev --lora 64  # FLUX.1-dev's LoRA step (also sd35-medium, or a model folder)
    python bench/step.py --plan [--plan_out F]     # no GPU needed: the predicted peak memory of every training
                                                   # configuration (bench/plan.py) of the released models

What one step is (random weights and inputs, one process, inputs already on the device as with dpo.py --cache):
policy forward + backward on the 2B winner/loser latents, frozen reference forward on the same 2B (a copy of the
policy: conv/linear in the compute dtype, norms in fp32, as dpo.build_models), the DPO loss (eq. 14), gradient
clipping, optimizer step (optim.update), with dpo.py's defaults for the family (its record's recipe: SDXL
Adafactor, checkpointing on, 1024px; the flow transformers one sigma per pair, AdamW). LoRA: a frozen base, fp32
adapters on the family's targets.
  ours       dpo.build_models + dpo.pair_loss: our denoiser (kernels.attention: Triton on CUDA), the fused
             kernels.dpo_loss
  diffusers  the family's diffusers model, same config, its SDPA attention and gradient checkpointing, LoRA through
             peft, eq. 14 written out in PyTorch: what a diffusers-based trainer does (bench/baseline.py)
Reading the numbers: s/step is the median over the timed steps after warm-up (the device is synchronized after
each step); pairs/s = B / (s/step); s/pair = its inverse (the official code reports ~4 s per pair per GPU).
GFLOP = one denoiser forward on one image, counted op by op (torch's FlopCounterMode; it does not count SDPA on CPU).
A step costs 8 of them per pair (policy forward on 2 images + backward ~2x that + reference forward on 2), not
counting the recomputation of checkpointing: MFU = 8 B GFLOP / (s/step) / 989 TFLOP/s, the dense bf16 peak of one
H100 SXM, so it only means something on an H100 in bf16. peak GiB = torch.cuda.max_memory_allocated over that impl's
steps (weights, gradients, optimizer state, activations; counted from after the models are built). plan GiB = what
bench/plan.py predicts for the same step without a GPU (ours only; --no-predict skips it). loss@0 = the first step's
loss (log 2 = 0.693: the policy equals the reference). speedup = diffusers s/step / ours s/step.
"""
import argparse
import csv
import gc
import importlib
import math
import os
import shlex
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import cli  # noqa: E402
import diffusion  # noqa: E402
import dpo  # noqa: E402
import families  # noqa: E402
import kernels  # noqa: E402
import optim  # noqa: E402
from bench import baseline, models, plan_online  # noqa: E402
from bench import plan as memplan  # noqa: E402
from weights import CheckpointError, save_json  # noqa: E402

COMMAND = "python bench/step.py"
PLANNED = ("sdxl", "sd15", "sd35-medium", "sd35-large", "flux-dev", "qwen-image", "z-image")  # --plan's default


def parse_args(argv):
    p = cli.Parser(description=__doc__.split("\n")[0] + " [...] = default by model family.")
    a = p.add_argument
    a("--model", help="take the denoiser's config of this model (diffusers folder or single file, or "
      f"{' / '.join(families.RELEASED)}: the released configs) [{models.DEFAULT}]; no weights read")
    a("--resolution", type=int, help="square image size in pixels [the model's own: 1024 SDXL, 512 SD1.5]")
    a("--batch_size", type=int, default=1, help="pairs per step")
    a("--steps", type=int, default=10, help="timed steps")
    a("--warmup", type=int, default=3, help="untimed steps first")
    a("--dtype", choices=["fp32", "bf16"], help="autocast + reference dtype [bf16 on cuda, fp32 on cpu]")
    a("--gradient_checkpointing", action=argparse.BooleanOptionalAction, help="[on for SDXL and the transformers]")
    a("--compile", action="store_true", help="torch.compile the policy")
    a("--optimizer", choices=["adafactor", "adamw"], help="[adafactor SDXL, adamw otherwise]")
    a("--impl", default="ours,diffusers", help="comma-separated: ours, diffusers")
    a("--device", choices=["cuda", "cpu"], help="[cuda if available]")
    a("--csv", help="append one row per impl to this CSV file")
    a("--lora", type=int, help="a LoRA step of this rank (dpo.py --lora): frozen base, fp32 adapters (diffusers' "
      "through peft)")
    a("--quantize", choices=kernels.FORMATS, help="with --lora: the frozen base in this format (dpo.py --quantize); "
      "--impl ours only")
    a("--predict", action=argparse.BooleanOptionalAction, default=True,
      help="print bench/plan.py's predicted peak memory beside the measured one")
    a("--plan", action="store_true", help="no timing: the predicted peak GPU memory of every training "
      "configuration (bench/plan.py; full / LoRA / FSDP-8, checkpointing, 1/2/4 pairs, encoders on the GPU or cached)")
    a("--plan_out", help="with --plan: write the plan as a JSON list to this file")
    a("--overwrite", action="store_true", help="replace an existing --plan_out")
    a("--plan_batches", default="1,2,4", help="with --plan: the batch sizes (pairs per rank) to plan")
    a("--plan_models", default=",".join(PLANNED), help="with --plan and no --model: the released models to plan")
    opts = p.parse_args(argv)
    opts.impl = opts.impl.split(",")
    if not opts.impl or set(opts.impl) - {"ours", "diffusers"}:
        p.error(f"--impl takes ours and/or diffusers, got {','.join(opts.impl)}")
    for k in ("resolution", "batch_size", "steps", "lora"):
        if getattr(opts, k) is not None and getattr(opts, k) < 1:
            p.error(f"--{k} must be >= 1, got {getattr(opts, k)}")
    if opts.warmup < 0:
        p.error(f"--warmup must be >= 0, got {opts.warmup}")
    if opts.quantize and (not opts.lora or "diffusers" in opts.impl):
        p.error("--quantize times our LoRA step on a quantized base: add --lora RANK and --impl ours")
    given = opts.plan_batches
    try:
        opts.plan_batches = [int(b) for b in given.split(",")]
    except ValueError:
        opts.plan_batches = []
    if not opts.plan_batches or min(opts.plan_batches) < 1:
        p.error(f"--plan_batches takes batch sizes >= 1 separated by commas, got {given}")
    opts.plan_models = opts.plan_models.split(",")
    if not set(opts.plan_models) <= set(families.RELEASED):
        p.error(f"--plan_models takes some of {','.join(families.RELEASED)}, got {','.join(opts.plan_models)}")
    return opts


def settings(opts, spec, device):
    """dpo.py's own defaults for the model's family (beta, lr, weight decay, clip, optimizer, ...; its native
    resolution and guidance input, as dpo.train), the bench flags on top."""
    return models.settings(spec, device, resolution=opts.resolution, batch_size=opts.batch_size,
                           optimizer=opts.optimizer, gradient_checkpointing=opts.gradient_checkpointing,
                           compile=opts.compile, lora=opts.lora, dtype=opts.dtype, quantize=opts.quantize)


def build(impl, spec, dev, args):
    """(policy, ref, step, call): step(z, eps, t, cond) does one optimizer step and returns (loss, grad norm)
    tensors; call(x, t, *cond) runs the policy as ours is called (for the FLOP count)."""
    fam, cfg = spec["family"], spec["config"]
    acp = None if fam.flow else diffusion.alphas_cumprod(diffusion.scheduler_config("", fam)).to(dev)
    if impl == "ours":  # exactly dpo.py's models (dpo.build_models), from random weights

        def source(dtype, quantize=None):  # the same random denoiser at every call: the reference starts as the policy
            torch.manual_seed(0)
            return kernels.quantize_linears(made(dtype), quantize, dtype) if quantize else made(dtype)  # (as loaded)

        def made(dtype):
            """A LoRA run's frozen base is made in the compute dtype, its norms fp32 as dpo.py loads them (no fp32
            copy of a 20 B model first); a full fine-tune's in fp32 (its reference is cast from the same weights)."""
            if not args.lora or dtype == torch.float32:
                with torch.device(dev):
                    return fam.model(cfg)
            default = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                with torch.device(dev):
                    u = fam.model(cfg)
            finally:
                torch.set_default_dtype(default)
            for m in u.modules():
                if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                    for p in m.parameters(recurse=False):
                        p.data = p.data.float()
                    for k, b in m.named_buffers(recurse=False):
                        m._buffers[k] = b.float() if b.is_floating_point() else b
            return u
        policy, ref, trained = dpo.build_models(source, args.amp_dtype, args.lora, args.lora_alpha, fam.lora_targets,
                                                args.seed, args.loss in dpo.REFERENCE_FREE,
                                                args.gradient_checkpointing, args.quantize)
    else:
        policy, ref, trained = baseline.models(fam, cfg, dev, args)
    policy.train()
    net = torch.compile(policy) if args.compile else policy
    if impl == "ours":  # exactly dpo.py's micro-step
        objective = dpo.objective(args.loss, args.beta, args.rpo_tau, args.rpo_form)
        prediction = "flow" if fam.flow else "epsilon"

        def loss_fn(z, eps, t, cond):
            inputs = dict(z=z, eps=eps, t=t, T=1000, cond=cond)
            return dpo.pair_loss(net, ref, inputs, objective, prediction, acp, args.amp_dtype)[0]
    else:
        loss_fn = baseline.loss_fn(fam, net, ref, args, acp)
    opt = optim.build(args.optimizer, trained, args.lr, args.weight_decay, fused=dev.type == "cuda")
    scaler = torch.amp.GradScaler(dev.type, enabled=False)  # bf16 or fp32: no loss scaling, as dpo.py

    def step(z, eps, t, cond):
        loss = loss_fn(z, eps, t, cond)
        loss.backward()  # past warmup: the full lr
        _, norm = optim.update(opt, scaler, trained, args.lr, args.warmup, args.grad_clip, args.warmup)
        return loss.detach(), norm
    return policy, ref, step, policy if impl == "ours" else baseline.CALLS[fam.diffusers_class](policy)


def measure(impl, spec, dev, args, opts):
    """One impl's row: build, count FLOPs once, warm up, time, peak memory of the steps."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    policy, ref, step, net = build(impl, spec, dev, args)
    g = torch.Generator().manual_seed(0)
    z, eps, t, cond = models.inputs(spec, args.batch_size, dev, g, args.sigma_density, args.guidance)
    amp = torch.autocast(dev.type, dtype=args.amp_dtype, enabled=args.amp_dtype != torch.float32)
    with amp:  # as the step runs it (a LoRA base is in the compute dtype, the inputs fp32)
        one = kernels.flops(net, z[:1], t[:1], *(None if c is None else c[:1] for c in cond))
    if dev.type == "cuda":  # the steps' peak, as bench/plan.py plans it (not the building of the models)
        torch.cuda.reset_peak_memory_stats()
    times, loss0 = [], None
    for i in range(opts.warmup + opts.steps):
        sync()
        tic = time.perf_counter()
        loss, _ = step(z, eps, t, cond)
        sync()
        times.append(time.perf_counter() - tic)
        loss0 = loss.item() if loss0 is None else loss0
        print(f"  {impl} step {i + 1}/{opts.warmup + opts.steps}: {times[-1]:.3f} s", file=sys.stderr, flush=True)
    if not math.isfinite(loss.item()):
        raise ValueError(f"{impl}: loss is {loss.item()}")
    s, B = float(np.median(times[opts.warmup:])), args.batch_size
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else None
    return dict(impl=impl, s_step=s, pairs_s=B / s, s_pair=s / B, gflop_fwd=one / 1e9,
                mfu=8 * B * one / s / kernels.H100_BF16_PEAK, peak_gib=peak, loss0=loss0)


def available_bytes(dev):
    """Memory free for the step: on CUDA the device's, on the CPU MemAvailable of /proc/meminfo (None: unknown)."""
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def state_bytes(spec, args):
    """A lower bound on one step's memory: fp32 policy and gradients, the reference (conv/linear in the compute
    dtype), AdamW's two fp32 moments (Adafactor's factored ones are ~0); LoRA: the frozen base, made in the compute
    dtype (build: made). Activations come on top."""
    with torch.device("meta"):
        n = sum(p.numel() for p in spec["family"].model(spec["config"]).parameters())
    ref = 4 if args.amp_dtype == torch.float32 else 2
    if args.lora:
        return n, n * ref
    return n, n * (4 + 4 + ref + (8 if args.optimizer == "adamw" else 0))


def plan(opts, argv):
    """--plan: bench/plan.py's predicted peak memory of every training configuration, as a table (and JSON)."""
    try:
        if opts.plan_out:  # before the work, not after it
            cli.check_output(opts.plan_out, replace=opts.overwrite)
        specs = [models.spec(m, opts.resolution) for m in ([opts.model] if opts.model else opts.plan_models)]
    except (CheckpointError, ValueError) as e:
        cli.fail(str(e))
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {date} | memory plan on shadow tensors, no GPU (bench/plan.py) | torch {torch.__version__}")
    print(f"# {COMMAND} {shlex.join(argv)}", flush=True)
    tic = time.time()
    rows = memplan.plan(specs, opts.plan_batches, log=lambda msg: print(msg, flush=True))
    ours = [r for r in rows if not r["autocast_cache"]]
    print(memplan.table(ours))
    print("\nThe same step if dpo.pair_loss's autocast cached its bf16 copies of the fp32 weights "
          "(torch.autocast(..., cache_enabled=True), torch's default):")
    print(memplan.table([r for r in rows if r["autocast_cache"]]))
    print("\nThe table of docs/memory.md, and the memory tiers' goals (bench/plan.py's GOALS) for the models planned:")
    print(memplan.summary(ours))
    print(memplan.goals(rows))
    online = plan_online.plan(specs, rows, log=lambda msg: print(msg, flush=True))
    print("\nOnline DPO (dpo.py --online): the peak while sampling inside a step (bench/plan_online.py), beside the "
          "training step's:")
    print(plan_online.summary(online))
    rl_models = [s for s in specs if s["name"] in ("sdxl", "flux-dev")]  # the two: a UNet and a transformer
    if rl_models:
        rl = plan_online.rl_rows(rl_models, online, rows, log=lambda msg: print(msg, flush=True))
        print("\nOnline RL (dpo.py --online --loss grpo|nft, rl.py): sampling as online DPO's, one trained denoising "
              "step of the K samples per micro-step, NFT's old policy:")
        print(plan_online.rl_summary(rl))
    print(f"# {len(rows)} configurations in {time.time() - tic:.0f} s; GiB = 2^30 bytes; a GPU of G GiB fits a peak P "
          f"when 1.05 P + 0.75 GiB <= G")
    if opts.plan_out:
        save_json(rows, opts.plan_out)
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    if opts.plan:
        return plan(opts, argv)
    if opts.csv:  # rows are appended; the folder is checked before the steps run
        try:
            cli.check_output(opts.csv, replace=True)
        except ValueError as e:
            cli.fail(str(e))
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        cli.fail("--device cuda but no CUDA device is available")
    dev = torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as dpo.train
    try:
        spec = models.spec(opts.model, opts.resolution)
        args = settings(opts, spec, device)
    except (CheckpointError, ValueError) as e:
        cli.fail(str(e))
    fam, cfg, what = spec["family"], spec["config"], spec["family"].kind
    h = args.resolution // models.downsample(spec["vae"])
    down = 2 if fam.flow else 2 ** (len(cfg["block_out_channels"]) - 1)  # a transformer's 2x2 patches, UNet levels
    if h % down:
        cli.fail(f"--resolution {args.resolution} gives {h}x{h} latents, not divisible by the {what}'s {down}")
    params, need = state_bytes(spec, args)
    free = available_bytes(dev)
    if free is not None and need > free:  # refuse up front, not by an out-of-memory kill minutes later
        cli.fail(f"this step needs at least {need / 2 ** 30:.1f} GiB on the {device} (fp32 weights and gradients, "
                 f"reference, optimizer state of a {params / 1e9:.2f} B-parameter {what}; activations on top) and "
                 f"{free / 2 ** 30:.1f} GiB are free: use a GPU, or --model with a smaller {what}")
    if "diffusers" in opts.impl and fam.diffusers_class not in baseline.CALLS:
        print(f"diffusers baseline skipped: bench/baseline.py does not call a {fam.diffusers_class}")
        opts.impl = [i for i in opts.impl if i != "diffusers"]
    if "diffusers" in opts.impl:
        for module in ("diffusers", "peft") if opts.lora else ("diffusers",):  # peft: its LoRA
            try:
                importlib.import_module(module)
            except ImportError as e:
                print(f"diffusers baseline skipped: cannot import {module} ({e}); pip install -r requirements-dev.txt")
                opts.impl = [i for i in opts.impl if i != "diffusers"]
                break
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    name = torch.cuda.get_device_name(dev) if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {date} | {name} | torch {torch.__version__} | triton {tv}")
    env = "".join(f"{k}={os.environ[k]} " for k in ("DPO_KERNELS",) if os.environ.get(k))  # what changes the step
    command = f"{env}{COMMAND} {shlex.join(argv)}"
    print(f"# {command}")
    text = f", {(h // 2) ** 2} image + {fam.text.context(spec['lengths'])} text tokens, " \
        f"{cfg.get('num_attention_heads') or cfg['n_heads']} heads" \
        if fam.flow else ""
    print(f"# {fam.title}-shaped {what}, {args.resolution}px ({h}x{h} latents{text}), {args.batch_size} pair(s)/step, "
          f"{f'LoRA rank {args.lora}, ' if args.lora else ''}{args.optimizer}, checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, {str(args.amp_dtype)[6:]}, compile "
          f"{'on' if opts.compile else 'off'}, median of {opts.steps} steps after {opts.warmup} warm-up", flush=True)
    rows = []
    for impl in opts.impl:
        rows.append(measure(impl, spec, dev, args, opts))
        if opts.compile:
            torch._dynamo.reset()  # compiled graphs hold the models
        gc.collect()  # the impl's models and optimizer state are gone with measure()'s frame: free them first
        if device == "cuda":
            torch.cuda.empty_cache()
    for r in rows:  # the memory plan of the same step, on shadow tensors (ours only: the plan runs our denoiser)
        r["plan_gib"] = r["plan_phase"] = None
        if r["impl"] == "ours" and opts.predict:
            try:  # after the GPU measurements: a plan that fails (another torch) must not take them with it
                value, r["plan_phase"], _ = memplan.predict(dict(spec, resolution=args.resolution), args)
                r["plan_gib"] = value / 2 ** 30
            except Exception as e:  # noqa: BLE001
                print(f"memory plan failed, the measurements stand: {type(e).__name__}: {e}", flush=True)
    print(f"{'impl':<10} {'s/step':>9} {'pairs/s':>9} {'s/pair':>9} {'GFLOP/fwd':>10} {'MFU%':>7} {'peak GiB':>9} "
          f"{'plan GiB':>9} {'loss@0':>8}")
    for r in rows:
        peak, pred = ("-" if r[k] is None else f"{r[k]:.2f}" for k in ("peak_gib", "plan_gib"))
        print(f"{r['impl']:<10} {r['s_step']:>9.4f} {r['pairs_s']:>9.3f} {r['s_pair']:>9.4f} {r['gflop_fwd']:>10.2f} "
              f"{100 * r['mfu']:>7.2f} {peak:>9} {pred:>9} {r['loss0']:>8.4f}")
    for r in rows:
        if r["peak_gib"] is not None and r["plan_gib"] is not None:
            print(f"memory plan ({r['impl']}): predicted {r['plan_gib']:.2f} GiB (peak in {r['plan_phase']}), measured "
                  f"{r['peak_gib']:.2f} GiB: {100 * (r['plan_gib'] / r['peak_gib'] - 1):+.1f}%")
    by = {r["impl"]: r for r in rows}
    if len(by) == 2:
        speedup = by["diffusers"]["s_step"] / by["ours"]["s_step"]
        print(f"speedup ours/diffusers: {speedup:.2f}x (diffusers s/step / ours s/step)")
    if opts.csv:
        write_csv(opts.csv, rows, [date, name, torch.__version__, tv, command], args, opts.compile)
    return rows


def write_csv(path, rows, run, args, compile_):
    """One row per impl appended to path (a header first into a new file): the run (date, device, versions,
    command), the step's settings, its numbers."""
    new = not os.path.exists(path)
    numbers = ("s_step", "pairs_s", "s_pair", "gflop_fwd", "mfu", "peak_gib", "plan_gib", "loss0")
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "device", "torch", "triton", "command", "impl", "resolution", "batch_size", "dtype",
                        "optimizer", "checkpointing", "compile", *numbers])
        for r in rows:
            w.writerow([*run, r["impl"], args.resolution, args.batch_size, str(args.amp_dtype)[6:], args.optimizer,
                        args.gradient_checkpointing, compile_, *(r[k] for k in numbers)])


if __name__ == "__main__":
    main()
