"""Time one Diffusion-DPO optimizer step: ours (dpo.py) beside a diffusers-model trainer doing the same work.

    python bench_step.py                           # SDXL at 1024px, 1 pair/step, Adafactor, checkpointing, bf16
                                                   # (needs a GPU: it refuses what cannot fit, saying how much)
    python bench_step.py --model SD15_DIR          # another architecture: its UNet config (no weights are read)
    python bench_step.py --model sd15              # the real SD1.5 config at 512^2 (sdxl: the default)
    python bench_step.py --model tiny_sdxl/ --resolution 32 --steps 2 --warmup 1 --dtype fp32 --device cpu
    python bench_step.py --lora 64                 # a LoRA step (rank 64, dpo.py --lora): ours only
    python bench_step.py --model flux-dev --lora 64  # FLUX.1-dev's LoRA step, ours vs diffusers' (bench_flow.py;
                                                   # also sd35-medium, or an SD3 / FLUX diffusers folder)
    python bench_step.py --plan [--plan_out F]     # no GPU needed: the predicted peak memory of every training
                                                   # configuration (memplan.py), SDXL and SD1.5 (or --model's)

What one step is (random weights and inputs, one process, inputs already on the device as with dpo.py --cache):
policy forward + backward on the 2B winner/loser latents, frozen reference forward on the same 2B (a copy of the
policy: conv/linear in the compute dtype, norms in fp32, as dpo.build_models), the DPO loss (eq. 14), gradient
clipping, optimizer step (dpo.optimizer_step), with dpo.py's defaults for the family (SDXL: Adafactor, checkpointing
on, 1024px).
  ours       dpo.pair_loss: our UNet (kernels.attention: Triton on CUDA) and the fused kernels.dpo_loss
  diffusers  diffusers.UNet2DConditionModel, same config, its default SDPA attention processor and its gradient
             checkpointing, the readable plain-PyTorch dpo.dpo_loss: what a diffusers-based trainer does
Reading the numbers: s/step is the median over the timed steps after warm-up (the device is synchronized after
each step); pairs/s = B / (s/step); s/pair = its inverse (the official code reports ~4 s per pair per GPU).
GFLOP = one UNet forward on one image, counted op by op (torch's FlopCounterMode; it does not count SDPA on CPU).
A step costs 8 of them per pair (policy forward on 2 images + backward ~2x that + reference forward on 2), not
counting the recomputation of checkpointing: MFU = 8 B GFLOP / (s/step) / 989 TFLOP/s, the dense bf16 peak of one
H100 SXM, so it only means something on an H100 in bf16. peak GiB = torch.cuda.max_memory_allocated over that impl's
steps (weights, gradients, optimizer state, activations; counted from after the models are built). plan GiB = what
memplan.py predicts for the same step without a GPU (ours only; --no-predict skips it). loss@0 = the first step's loss
(log 2 = 0.693: the policy equals the reference). speedup = diffusers s/step / ours s/step.
"""
import argparse
import csv
import gc
import importlib
import json
import math
import os
import shlex
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch

import bench_flow
import cli
import clip
import denoiser
import diffusion
import dpo
import kernels
import memplan
import memplan_online
import optim
import unet as unetlib
import vae as vaelib
from dpo import dpo_loss, pair_loss, reference, resolve
from weights import Checkpoint, CheckpointError, component, family, read_config, save_json


def parse_args(argv):
    p = cli.Parser(description=__doc__.split("\n")[0] + " [...] = default by model family.")
    a = p.add_argument
    a("--model", help="take the UNet (or SD3 / FLUX transformer) config of this model (diffusers folder or single "
      f"file, or {' / '.join(['sdxl', 'sd15', *bench_flow.MODELS])}: the real configs) [sdxl]; no weights read")
    a("--resolution", type=int, help="square image size in pixels [1024 SDXL, 512 SD1.5]")
    a("--batch_size", type=int, default=1, help="pairs per step")
    a("--steps", type=int, default=10, help="timed steps")
    a("--warmup", type=int, default=3, help="untimed steps first")
    a("--dtype", choices=["fp32", "bf16"], help="autocast + reference dtype [bf16 on cuda, fp32 on cpu]")
    a("--gradient_checkpointing", action=argparse.BooleanOptionalAction, help="[on for SDXL]")
    a("--compile", action="store_true", help="torch.compile the policy")
    a("--optimizer", choices=["adafactor", "adamw"], help="[adafactor SDXL, adamw SD1.5]")
    a("--impl", default="ours,diffusers", help="comma-separated: ours, diffusers")
    a("--device", choices=["cuda", "cpu"], help="[cuda if available]")
    a("--csv", help="append one row per impl to this CSV file")
    a("--lora", type=int, help="a LoRA step of this rank (dpo.py --lora): frozen base, fp32 adapters; ours only for "
      "a UNet, both impls for a flow transformer (diffusers' through peft)")
    a("--predict", action=argparse.BooleanOptionalAction, default=True,
      help="print memplan.py's predicted peak memory beside the measured one")
    a("--plan", action="store_true", help="no timing: the predicted peak GPU memory of every training "
      "configuration (memplan.py; full / LoRA / FSDP-8, checkpointing, 1/2/4 pairs, encoders on the GPU or cached)")
    a("--plan_out", help="with --plan: write the plan as a JSON list to this file")
    a("--overwrite", action="store_true", help="replace an existing --plan_out")
    a("--plan_batches", default="1,2,4", help="with --plan: the batch sizes (pairs per rank) to plan")
    a("--plan_models", default=",".join(memplan.MODELS), help="with --plan and no --model: the real models to plan")
    opts = p.parse_args(argv)
    opts.impl = opts.impl.split(",")
    if not opts.impl or set(opts.impl) - {"ours", "diffusers"}:
        p.error(f"--impl takes ours and/or diffusers, got {','.join(opts.impl)}")
    for k in ("resolution", "batch_size", "steps", "lora"):
        if getattr(opts, k) is not None and getattr(opts, k) < 1:
            p.error(f"--{k} must be >= 1, got {getattr(opts, k)}")
    if opts.warmup < 0:
        p.error(f"--warmup must be >= 0, got {opts.warmup}")
    given = opts.plan_batches
    try:
        opts.plan_batches = [int(b) for b in given.split(",")]
    except ValueError:
        opts.plan_batches = []
    if not opts.plan_batches or min(opts.plan_batches) < 1:
        p.error(f"--plan_batches takes batch sizes >= 1 separated by commas, got {given}")
    opts.plan_models = opts.plan_models.split(",")
    if not set(opts.plan_models) <= set(memplan.MODELS):
        p.error(f"--plan_models takes some of {','.join(memplan.MODELS)}, got {','.join(opts.plan_models)}")
    return opts


def builtin(model):
    """The name of a built-in real model ("sdxl", "sd15": configs in unet.py, no files), None for a path."""
    return model if model in ("sdxl", "sd15") and not os.path.exists(model) else None


def unet_config(model):
    """The UNet config (dict) of --model without reading weights; SDXL's without --model."""
    if model is None or builtin(model):
        return dict(unetlib.SD15 if builtin(model) == "sd15" else unetlib.SDXL)
    kind, where = component(model, "unet")
    if kind == "folder":
        return read_config(where)
    ck = Checkpoint(where)
    if "config" in ck.metadata:
        return json.loads(ck.metadata["config"])
    return dict(unetlib.SDXL if family(ck) == "sdxl" else unetlib.SD15)


def latent_factor(model):
    """The VAE downsampling of --model (SD's 8 without --model, or for a folder without a VAE)."""
    try:
        return vaelib.downsample(model) if model and not builtin(model) and not bench_flow.builtin(model) else 8
    except CheckpointError:
        return 8


def denoiser_config(model):
    """(family, denoiser config) of --model, no weights read: a UNet's, or an SD3 / FLUX transformer's."""
    if bench_flow.is_flow(model):
        return bench_flow.config(model)
    cfg = unet_config(model)
    return denoiser.unet_family(unetlib.check_config(cfg)), cfg


def settings(opts, fam, device, cfg=None):
    """dpo.py's own defaults for this family (beta, lr, weight decay, clip, optimizer, ...), the bench flags on top;
    a flow transformer's config (cfg) gives its native resolution and FLUX-dev's guidance input, as dpo.train."""
    args = argparse.Namespace(**dpo.DEFAULTS)
    for k in ("resolution", "batch_size", "optimizer", "gradient_checkpointing", "compile", "lora"):
        setattr(args, k, getattr(opts, k))
    args.dtype = opts.dtype
    cfg = cfg or {}
    native = cfg["sample_size"] * latent_factor(opts.model) if cfg.get("sample_size") else None
    return resolve(args, fam, 1, device, native, cfg.get("guidance_embeds", False))


def inputs(cfg, B, h, res, dev, seed=0):
    """Clean latents z (2B, C, h, h) winners first, shared eps (B, C, h, h) and t (B,), cond with 2B rows."""
    c, g = unetlib.check_config(cfg), torch.Generator().manual_seed(seed)
    z = torch.randn(2 * B, c["in_channels"], h, h, generator=g)
    eps = torch.randn(B, c["in_channels"], h, h, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    ctx = torch.randn(2 * B, 77, c["cross_attention_dim"], generator=g)
    pooled = tids = None
    if c["addition_embed_type"] == "text_time":  # SDXL: pooled text embedding and size conditioning
        pooled = torch.randn(2 * B, c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"],
                             generator=g)
        tids = torch.tensor([[res, res, 0, 0, res, res]] * 2 * B, dtype=torch.float32)  # (2B, 6)
    return z.to(dev), eps.to(dev), t.to(dev), tuple(None if x is None else x.to(dev) for x in (ctx, pooled, tids))


def as_ours(net):
    """A diffusers UNet behind our call signature u(x, t, context, pooled, time_ids)."""
    def call(x, t, ctx, pooled=None, tids=None):
        extra = None if pooled is None else {"text_embeds": pooled, "time_ids": tids}
        return net(x, t, encoder_hidden_states=ctx, added_cond_kwargs=extra).sample
    return call


def build(impl, cfg, dev, args):
    """(policy, ref, step): step(z, eps, t, cond) does one optimizer step and returns (loss, grad norm) tensors."""
    if impl == "ours":  # exactly dpo.py's models (dpo.build_models), from random weights

        def make():  # the same random UNet at every call: the reference starts as the policy, as in training
            torch.manual_seed(0)
            with torch.device(dev):
                return unetlib.UNet(cfg)
        policy, ref, trained = dpo.build_models(args, dev, make)
    else:
        from diffusers import UNet2DConditionModel
        with torch.device(dev):
            policy, ref = UNet2DConditionModel.from_config(cfg), UNet2DConditionModel.from_config(cfg)
        if args.gradient_checkpointing:
            policy.enable_gradient_checkpointing()
        ref.load_state_dict(policy.state_dict())  # the reference starts as the policy, as in training
        ref, trained = reference(ref, dev, args.amp_dtype), list(policy.parameters())
    acp = diffusion.alphas_cumprod(diffusion.SD_SCHEDULE).to(dev)
    policy.train()
    net = torch.compile(policy) if args.compile else policy
    opt = optim.build(args.optimizer, trained, args.lr, args.weight_decay, fused=dev.type == "cuda")
    scaler = torch.amp.GradScaler(dev.type, enabled=False)  # bf16 or fp32: no loss scaling, as dpo.py

    def loss_fn(z, eps, t, cond):
        if impl == "ours":  # exactly dpo.py's micro-step
            inputs = dict(z=z, eps=eps, t=t, T=len(acp), cond=cond)
            return pair_loss(net, ref, inputs, args, acp, "epsilon")[0]
        t2 = torch.cat([t, t])  # (2B,): the same t and eps for winner i and loser i
        x = diffusion.forward_process(z, torch.cat([eps, eps]), t2, acp)  # (2B, C, h, w)
        amp = torch.autocast(dev.type, dtype=args.amp_dtype, enabled=args.amp_dtype != torch.float32)
        with amp:
            pred = as_ours(net)(x, t2, *cond)  # (2B, C, h, w)
        with torch.no_grad(), amp:
            ref_pred = as_ours(ref)(x, t2, *cond)  # (2B, C, h, w)
        return dpo_loss(pred, ref_pred, eps, args.beta)[0]

    def step(z, eps, t, cond):
        loss = loss_fn(z, eps, t, cond)
        loss.backward()
        _, norm = dpo.optimizer_step(opt, scaler, trained, args, args.warmup)  # past warmup: the full lr
        return loss.detach(), norm
    return policy, ref, step


def measure(impl, cfg, dev, args, opts, h):
    """One impl's row: build, count FLOPs once, warm up, time, peak memory of the steps."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if args.family in denoiser.FLOW:  # an SD3 / FLUX transformer: bench_flow.py's step
        policy, ref, step = bench_flow.build(impl, args.family, cfg, dev, args)
        z, eps, t, cond = bench_flow.inputs(args.family, cfg, args, h, dev, opts.model)
        net = policy if impl == "ours" else bench_flow.as_ours(policy, args.family)
    else:
        policy, ref, step = build(impl, cfg, dev, args)
        z, eps, t, cond = inputs(cfg, args.batch_size, h, args.resolution, dev)
        net = policy if impl == "ours" else as_ours(policy)
    one = kernels.flops(net, z[:1], t[:1], *(None if c is None else c[:1] for c in cond))
    if dev.type == "cuda":  # the steps' peak, as memplan plans it (not the building of the models)
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


def state_bytes(cfg, args):
    """A lower bound on one step's memory: fp32 policy and gradients, the reference (conv/linear in the compute
    dtype), AdamW's two fp32 moments (Adafactor's factored ones are ~0); LoRA: the frozen base, built in fp32 from
    random weights before its layers are cast. Activations come on top."""
    with torch.device("meta"):
        n = sum(p.numel() for p in denoiser.build(cfg, args.family).parameters())
    ref = 4 if args.amp_dtype == torch.float32 else 2
    if args.lora:
        return n, n * 4
    return n, n * (4 + 4 + ref + (8 if args.optimizer == "adamw" else 0))


def flow_spec(model, resolution=None):
    """memplan's description of an SD3 / FLUX --model: its transformer config, a folder's encoder and VAE configs."""
    fam, cfg = bench_flow.config(model)
    name = bench_flow.builtin(model)
    spec = dict(memplan.MODELS["flux-dev" if fam == "flux" else "sd35-medium"], transformer=cfg,
                name=name or os.path.basename(os.path.normpath(model)))
    spec["t5_length"] = clip.T5_LENGTH["flux" if cfg.get("guidance_embeds") else "flux-schnell"] if fam == "flux" \
        else clip.T5_LENGTH["sd3"]
    root = model if name is None and os.path.isdir(os.path.join(model, "transformer")) else None
    if root is not None:  # a diffusers folder: its own text encoders (CLIPs, then T5) and VAE
        subs = ["text_encoder", "text_encoder_2", "text_encoder_3"][:3 if fam == "sd3" else 2]
        text = [read_config(os.path.join(root, s)) for s in subs if os.path.isdir(os.path.join(root, s))]
        if len(text) == len(subs):
            spec["text"], spec["t5"] = text[:-1], text[-1]
        if os.path.isdir(os.path.join(root, "vae")):
            spec["vae"] = read_config(os.path.join(root, "vae"))
    if cfg.get("sample_size"):  # SD3's native size; FLUX's is 1024
        spec["resolution"] = cfg["sample_size"] * 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    spec["resolution"] = resolution or spec["resolution"]
    return spec


def model_spec(model, resolution=None):
    """memplan's description of --model (no weights read): its UNet, text encoder and VAE configs, its resolution;
    the real SDXL without --model. A single file takes the encoders of its family."""
    if bench_flow.is_flow(model):
        return flow_spec(model, resolution)
    cfg = unet_config(model)
    sdxl = unetlib.check_config(cfg)["addition_embed_type"] == "text_time"
    spec = dict(memplan.MODELS["sdxl" if sdxl else "sd15"], unet=cfg)
    if model is not None and not builtin(model):
        spec["name"] = os.path.basename(os.path.normpath(model))
        kind, where = component(model, "unet")
        root = os.path.dirname(os.path.abspath(where))
        if kind == "folder" and os.path.isdir(os.path.join(root, "text_encoder")):
            spec["text"] = [read_config(os.path.join(root, s)) for s in ("text_encoder", "text_encoder_2")
                            if os.path.isdir(os.path.join(root, s))]
        if kind == "folder" and os.path.isdir(os.path.join(root, "vae")):
            spec["vae"] = read_config(os.path.join(root, "vae"))
        if cfg.get("sample_size"):
            spec["resolution"] = cfg["sample_size"] * 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    spec["resolution"] = resolution or spec["resolution"]
    return spec


def plan(opts, argv):
    """--plan: memplan's predicted peak memory of every training configuration, as a table (and JSON)."""
    try:
        if opts.plan_out:  # before the work, not after it
            cli.check_output(opts.plan_out, replace=opts.overwrite)
        models = [model_spec(opts.model, opts.resolution)] if opts.model else [memplan.MODELS[m]
                                                                               for m in opts.plan_models]
    except (CheckpointError, ValueError) as e:
        cli.fail(str(e))
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {date} | memory plan on shadow tensors, no GPU (memplan.py) | torch {torch.__version__}")
    print(f"# python bench_step.py {shlex.join(argv)}", flush=True)
    tic = time.time()
    rows = memplan.plan(models, opts.plan_batches, log=lambda msg: print(msg, flush=True))
    print(memplan.table([r for r in rows if r["autocast_cache"] == dpo.AUTOCAST_CACHE]))
    print(f"\nThe same step if dpo.py's autocast {'did not cache' if dpo.AUTOCAST_CACHE else 'cached'} its bf16 copies "
          f"of the fp32 weights (torch.autocast(..., cache_enabled={not dpo.AUTOCAST_CACHE})):")
    print(memplan.table([r for r in rows if r["autocast_cache"] != dpo.AUTOCAST_CACHE]))
    print("\nThe table of docs/memory.md, and the memory tiers' goals (memplan.GOALS) for the models planned:")
    print(memplan.summary([r for r in rows if r["autocast_cache"] == dpo.AUTOCAST_CACHE]))
    print(memplan.goals(rows))
    online = memplan_online.plan(models, rows, log=lambda msg: print(msg, flush=True))
    print("\nOnline DPO (dpo.py --online): the peak while sampling inside a step (memplan_online.py), beside the "
          "training step's:")
    print(memplan_online.summary(online))
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
        fam, cfg = denoiser_config(opts.model)
        flow = fam in denoiser.FLOW
        args = settings(opts, fam, device, cfg if flow else None)
    except (CheckpointError, ValueError) as e:
        cli.fail(str(e))
    what = "transformer" if flow else "UNet"
    h = args.resolution // latent_factor(opts.model)
    down = bench_flow.patch(fam, cfg) if flow else 2 ** (len(unetlib.check_config(cfg)["block_out_channels"]) - 1)
    if h % down:
        cli.fail(f"--resolution {args.resolution} gives {h}x{h} latents, not divisible by the {what}'s {down}")
    params, need = state_bytes(cfg, args)
    free = available_bytes(dev)
    if free is not None and need > free:  # refuse up front, not by an out-of-memory kill minutes later
        cli.fail(f"this step needs at least {need / 2 ** 30:.1f} GiB on the {device} (fp32 weights and gradients, "
                 f"reference, optimizer state of a {params / 1e9:.2f} B-parameter {what}; activations on top) and "
                 f"{free / 2 ** 30:.1f} GiB are free: use a GPU, or --model with a smaller {what}")
    if "diffusers" in opts.impl and opts.lora and not flow:
        print("diffusers baseline skipped: --lora (the UNet baseline is a full fine-tune)")
        opts.impl = [i for i in opts.impl if i != "diffusers"]
    if "diffusers" in opts.impl:
        for module in ("diffusers", "peft") if flow and opts.lora else ("diffusers",):  # peft: its LoRA
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
    print(f"# {env}python bench_step.py {shlex.join(argv)}")
    tokens = f", {bench_flow.describe(fam, cfg, h)}" if flow else ""
    print(f"# {denoiser.NAME[fam]}-shaped {what}, {args.resolution}px ({h}x{h} latents{tokens}), "
          f"{args.batch_size} pair(s)/step, {f'LoRA rank {args.lora}, ' if args.lora else ''}{args.optimizer}, "
          f"checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, {str(args.amp_dtype)[6:]}, compile "
          f"{'on' if opts.compile else 'off'}, median of {opts.steps} steps after {opts.warmup} warm-up", flush=True)
    rows = []
    for impl in opts.impl:
        rows.append(measure(impl, cfg, dev, args, opts, h))
        if opts.compile:
            torch._dynamo.reset()  # compiled graphs hold the models
        gc.collect()  # the impl's models and optimizer state are gone with measure()'s frame: free them first
        if device == "cuda":
            torch.cuda.empty_cache()
    for r in rows:  # the memory plan of the same step, on shadow tensors (ours only: memplan runs our UNet)
        r["plan_gib"] = r["plan_phase"] = None
        if r["impl"] == "ours" and opts.predict:
            try:  # after the GPU measurements: a plan that fails (another torch) must not take them with it
                value, r["plan_phase"], _ = memplan.predict(model_spec(opts.model, args.resolution), args)
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
        new = not os.path.exists(opts.csv)
        numbers = ("s_step", "pairs_s", "s_pair", "gflop_fwd", "mfu", "peak_gib", "plan_gib", "loss0")
        with open(opts.csv, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["date", "device", "torch", "triton", "command", "impl", "resolution", "batch_size", "dtype",
                            "optimizer", "checkpointing", "compile", *numbers])
            for r in rows:
                command = env + "python bench_step.py " + shlex.join(argv)
                w.writerow([date, name, torch.__version__, tv, command, r["impl"],
                            args.resolution, args.batch_size, str(args.amp_dtype)[6:], args.optimizer,
                            args.gradient_checkpointing, opts.compile, *(r[k] for k in numbers)])
    return rows


if __name__ == "__main__":
    main()
