"""Diffusion-DPO (Wallace et al. 2023, arXiv:2311.12908): fine-tune SDXL / SD1.5 / SD3 / FLUX on preference pairs.

    python dpo.py [--demo flow|online]                              # CPU demos (demo.py), no downloads
    python dpo.py --online --model SDXL_DIR --prompts parti --score pickscore=DIR ...   # online DPO (online.py)
    torchrun --nproc_per_node 8 dpo.py --model SDXL_DIR --data pickapic_v2/ --beta 5000 --out_dir runs/sdxl
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_id run1 --rdzv_backend c10d --rdzv_endpoint HOST0:29500 dpo.py ...

A pair (x_w, x_l) of images for prompt c, x_w preferred. Both are noised with ONE timestep t ~ U{0..999} and ONE
noise eps (the forward process q(x_t | x_0), diffusion.py); the trainable policy eps_theta and the frozen reference
eps_ref (the base model) predict the noise of both; eq. 14 asks the policy to denoise the winner better than the
reference does, relative to how it denoises the loser. Rectified-flow models (SD3, FLUX) draw ONE sigma instead of
t, noise both images onto the straight path x_sigma = (1 - sigma) x_0 + sigma eps, and eq. 14 compares their
velocity errors |(eps - x_0) - v_theta|^2 in place of the noise errors. Reading order: eq. 14 and the table of
objectives (objectives.py has the others), one micro-batch (pair_loss), the models and the optimizer step, the loop
(train), the flags and defaults."""
import argparse
import contextlib
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import cache
import checkpoint
import cli
import data
import denoiser
import diffusion
import flux
import kernels
import lora
import objectives
import online
import optim
import parallel
import vae as vaelib
from data import seed_for
from objectives import mse, preference_logits, stats
from weights import CheckpointError

# ----------------------------------------------------------------------------------------------------
# The loss. MSEs are per sample (mean over C, H, W); the paper's T * omega(lambda_t) is folded into beta.


def dpo_loss(model_pred, ref_pred, noise, beta):
    """Eq. 14: loss = mean_pairs -log sigmoid(-beta/2 [(|eps - eps_theta(x_w)|^2 - |eps - eps_theta(x_l)|^2) -
    (|eps - eps_ref(x_w)|^2 - |eps - eps_ref(x_l)|^2)]). Preds (2B, C, H, W) winners first; noise (B, C, H, W) is
    the eps both images of pair i were noised with. Plain PyTorch; kernels.dpo_loss fuses it for CUDA."""
    B = noise.shape[0]
    target = torch.cat([noise, noise])  # (2B, C, H, W): the same eps for winner i and loser i
    model_mse = mse(model_pred, target)  # (2B,) |eps - eps_theta(x_t, t)|^2
    ref_mse = mse(ref_pred, target).detach()  # (2B,) |eps - eps_ref(x_t, t)|^2, no gradient
    logits = preference_logits(model_mse[:B], model_mse[B:], ref_mse[:B], ref_mse[B:], beta)  # (B,) eq. 14's argument
    return -F.logsigmoid(logits).mean(), stats(logits, model_mse.detach(), ref_mse, beta)


def dpo(pred, ref_pred, eps, args, inputs):
    """Eq. 14 as the loop calls every objective: fused in Triton on CUDA (kernels.dpo_loss), dpo_loss elsewhere."""
    loss_fn = kernels.dpo_loss if kernels.use_triton(pred) else dpo_loss
    return loss_fn(pred, ref_pred, eps, args.beta)


# --loss NAME -> its loss(pred, ref_pred, eps, args, inputs) -> (loss, stats); each is beside its paper in objectives.py
OBJECTIVES = {"dpo": dpo, "sft": objectives.sft, "rpo": objectives.rpo, "ipo": objectives.ipo,
              "hinge": objectives.hinge, "mapo": objectives.mapo, "kto": objectives.kto}
REFERENCE_FREE = ("sft", "mapo")  # no reference model at all
BETA = {"dpo": 5000.0, "rpo": 5000.0, "ipo": 5000.0, "hinge": 5000.0, "kto": 1000.0, "mapo": 0.1}  # as their authors
# Flow models: flow_grpo's Flow-DPO recipe for SD3.5 (Liu et al. 2025), with eq. 14's 1/2 and per-element mean MSEs
# as here; velocity errors differ far more between images than noise errors do (kto, mapo: as above)
FLOW_BETA = {"dpo": 100.0, "rpo": 100.0, "ipo": 100.0, "hinge": 100.0}

# ----------------------------------------------------------------------------------------------------
# One micro-batch


def draw(pos, seed, shape, n_t, p_drop, n_latent=0, flow=None):
    """t, eps and prompt dropout for the pairs at global positions pos: ONE draw per pair (shared by winner and
    loser), keyed by (seed, position) alone, so world size, data workers and resume do not change it. n_latent > 0
    (--latents sample): also the noise that draws each of a pair's n_latent latents from the VAE posterior.
    flow = (density, scheduler config) for a flow model: t is then sigma in (0, 1], drawn as SD3's and FLUX's own
    training scripts draw it (a density of u, then the scheduler's table of sigmas)."""
    t, eps, drop, latent = [], [], [], []
    for p in pos.tolist():
        g = torch.Generator().manual_seed(seed_for(seed, p, 0x7E5))
        if flow is None:
            t.append(torch.randint(0, n_t, (1,), generator=g))
        else:
            t.append(diffusion.training_sigmas(diffusion.density(flow[0], 1, g), flow[1]))
        eps.append(torch.randn(shape, generator=g))
        drop.append(torch.rand(1, generator=g) < p_drop)
        if n_latent:
            latent.append(torch.randn((n_latent, *shape), generator=g))
    latent = torch.stack(latent) if n_latent else None  # (B, n_latent, C, h, w)
    return torch.cat(t), torch.stack(eps), torch.cat(drop), latent  # (B,), (B, C, h, w), (B,) bool


def micro_batch(batch, feed, args, T, dev, flow=None):
    """A batch of items -> pair_loss's inputs: one draw of (t, eps, prompt dropout) per item, then the latents and
    text embeddings (cache.Feed: encoded now or read from the cache), labels and RPO's embeddings."""
    t, eps, drop, zn = draw(batch["pos"], args.seed, feed.latent_shape, T, args.prompt_dropout, feed.n_latent, flow)
    z, cond = feed(batch, drop.to(dev), zn)
    labels = batch["label"].to(dev) if "label" in batch else None
    return dict(z=z, eps=eps.to(dev), t=t.to(dev), T=T, cond=cond, labels=labels, rpo_emb=feed.rpo_embeddings(batch))


def pair_loss(model, ref, inputs, args, alphas_cumprod, prediction_type):
    """The loss of one micro-batch, as the paper computes it. inputs: z (kB, C, h, w) clean latents, the items'
    first images first (the winners; k = 2 images per pair, 1 for single images); eps (B, C, h, w) and t (B,), one
    draw per item (a flow model's sigma); cond, the denoiser's conditioning with kB rows ((context, pooled,
    time_ids) for a UNet); and what an objective needs besides (T, the number of timesteps; labels of single
    images; rpo_emb, RPO's CLIP embeddings)."""
    z, eps, t, cond = inputs["z"], inputs["eps"], inputs["t"], inputs["cond"]
    B = eps.shape[0]
    if args.loss == "sft":  # the paper's baseline learns from the preferred images only
        z, cond = z[:B], tuple(None if c is None else c[:B] for c in cond)
    k = z.shape[0] // B  # images per item
    eps_k, t_k = eps.repeat(k, 1, 1, 1), t.repeat(k)  # (kB, C, h, w), (kB,): winner i and loser i share them
    # (kB, C, h, w) a draw of q(x_t | x_0) and the target (eps, or v for v-prediction); for a flow model the point
    # (1 - sigma) x_0 + sigma eps on the straight path and its velocity eps - x_0, the model given sigma * 1000
    x_t, t_k, target = diffusion.noised(z, eps_k, t_k, prediction_type, alphas_cumprod)
    amp = torch.autocast(x_t.device.type, dtype=args.amp_dtype, enabled=args.amp_dtype != torch.float32,
                         cache_enabled=args.autocast_cache)
    with amp:
        pred = model(x_t, t_k, *cond)  # (kB, C, h, w) the policy's eps_theta(x_t, t, c)
    ref_pred = None
    if args.loss not in REFERENCE_FREE:
        with torch.no_grad(), amp:
            ref_pred = ref(x_t, t_k, *cond)  # (kB, C, h, w) the frozen reference's eps_ref(x_t, t, c)
    if prediction_type != "epsilon":  # |pred - v|^2 = |(pred - v + eps) - eps|^2: every loss compares with eps
        pred = pred - (target - eps_k)
        ref_pred = None if ref_pred is None else ref_pred - (target - eps_k)
    return OBJECTIVES[args.loss](pred, ref_pred, eps, args, inputs)


# ----------------------------------------------------------------------------------------------------
# The models and the optimizer step (bench_step.py and memplan.py build and step them the same way)


def reference(path, dev, dtype):
    """The frozen reference: conv/linear weights in the compute dtype, norms in fp32, so that under autocast it
    computes bit for bit what the policy computes at step 0 (bf16 norm weights would shift eq. 14's argument by
    beta x rounding noise: loss 0.34 instead of log 2 at step 0 on the tiny model). path: a model path or module."""
    ref = denoiser.load(path, dev, dtype, norm_dtype=torch.float32) if isinstance(path, str) else path
    ref.requires_grad_(False).eval()
    for m in ref.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.to(dtype)
    return ref


def build_models(args, dev, make=None):
    """(policy, reference or None, trained parameters). Full fine-tune: fp32 master weights for the policy, a frozen
    reference in the compute dtype. LoRA: one frozen UNet in the compute dtype with fp32 adapters; the reference is
    that UNet with the adapters off. make(): a fresh fp32 UNet to start from (bench_step.py: random weights,
    memplan.py: shadow tensors) instead of loading --unet_init or --model. The same for the flow transformers."""
    start = args.unet_init or args.model

    def source(dtype):  # the starting denoiser, read straight into dtype (norms fp32)
        return denoiser.load(start, dev, dtype, norm_dtype=torch.float32) if make is None else make()
    if args.lora:
        policy = reference(source(args.amp_dtype), dev, args.amp_dtype)
        trained = lora.add(policy, args.lora, args.lora_alpha, lora.targets(args.family), seed=args.seed)
        ref = lora.reference(policy)
    else:
        policy = source(torch.float32)
        ref = None if args.loss in REFERENCE_FREE else reference(source(args.amp_dtype), dev, args.amp_dtype)
        trained = list(policy.parameters())
    policy.gradient_checkpointing = args.gradient_checkpointing
    for m in (policy, ref) if args.channels_last else ():
        if isinstance(m, torch.nn.Module):
            m.to(memory_format=torch.channels_last)
    return policy, ref, trained


def optimizer_step(opt, scaler, trained, args, step):
    """After the micro-steps' backward: the learning rate (linear warmup, then constant), unscaling (fp16), gradient
    clipping, the step; returns (lr, grad norm tensor)."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr
    for g in opt.param_groups:
        g["lr"] = lr
    scaler.unscale_(opt)
    grad_norm = parallel.full(torch.nn.utils.clip_grad_norm_(trained, args.grad_clip))
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return lr, grad_norm


# ----------------------------------------------------------------------------------------------------
# The loop


def train(args) -> dict:
    """One run: policy + frozen reference from args.model, the loop, checkpoints, the final UNet in out_dir/unet
    (a flow model's transformer in out_dir/transformer)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = parallel.setup(device)
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    if args.model is None:
        raise ValueError("--model is required for training (run without flags for the demo)")
    columns = cli.parse_map(args.columns, "--columns", data.COLUMN_MAP) if args.columns else None
    pairs = data.Preferences(args.data, args.dreamlike_only, args.split, columns) if args.data else None  # lazily
    if pairs is not None:
        log(f"data: {pairs.read}")
    family = denoiser.family(args.unet_init or args.model)
    if args.unet_init and denoiser.family(args.model) != family:
        raise ValueError(f"--unet_init {args.unet_init} is {denoiser.NAME[family]}, --model {args.model} is "
                         f"{denoiser.NAME[denoiser.family(args.model)]}: they must be one family")
    config = denoiser.read_config(args.unet_init or args.model)
    native = config["sample_size"] * vaelib.downsample(args.model) if config.get("sample_size") else None
    args = resolve(args, family, world, device, native, config.get("guidance_embeds", False))
    ck_path = checkpoint.prepare(args, rank, log)  # refuses to overwrite a run; removes a killed run's temp files
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed_for(args.seed, rank, 0x5EED))
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)
    policy, ref, trained = build_models(args, dev)
    ch = denoiser.latent_channels(policy)  # data (or the policy's own samples, online.py) -> model inputs:
    feed = online.Feed(args, policy, ref, ch, dev, rank, world, log) if args.online else \
        cache.Feed(args, pairs, ch, dev, rank, world, log)
    flow, alphas_cumprod = None, None  # flow: (sigma density, flow schedule) of a flow model
    if policy.prediction_type == "flow":
        flow = (args.sigma_density, diffusion.flow_config(args.model, family))
        schedule, T = dict(prediction_type="flow"), flow[1]["num_train_timesteps"]
    else:
        schedule = diffusion.scheduler_config(args.model, policy.prediction_type)  # single files: their metadata
        alphas_cumprod = diffusion.alphas_cumprod(schedule)
        T = len(alphas_cumprod)
    model = parallel.wrap(policy, args.fsdp, args.amp_dtype, dev)  # DDP, or FSDP2 shards (policy is sharded too)
    if args.fsdp and isinstance(ref, torch.nn.Module):
        parallel.shard(ref, args.amp_dtype)  # the same bf16 weights as the policy: eq. 14 starts at log 2
    trained = [p for p in policy.parameters() if p.requires_grad]  # FSDP2 swapped in sharded parameters
    opt = optim.build(args.optimizer, trained, args.lr, args.weight_decay, fused=device == "cuda")
    fingerprints = checkpoint.fingerprints(args, feed.fingerprint)
    step, position = checkpoint.load(ck_path, args, fingerprints, policy, opt, rank, world, log)
    if checkpoint.finished(ck_path, policy, args, step, log):  # said, not done: nothing is rewritten
        return dict(step=step, metrics={}, out_dir=args.out_dir)
    if rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        checkpoint.start_log(args.out_dir, step, log)
    if args.compile:
        model = torch.compile(model)
    scaler = torch.amp.GradScaler(device, enabled=args.amp_dtype == torch.float16)  # a no-op unless fp16
    B, G, A = args.batch_size, args.pairs_per_step, args.grad_accum
    loader = feed.loader(position, step, world, rank, device)
    log(f"{denoiser.NAME[family]} {args.loss} beta={args.beta} lr={args.lr:.3g} {args.optimizer} "
        f"{world} rank(s) x {B} pairs x {A} accum = {G} pairs/step, {len(feed.dataset)} "
        f"{'prompts' if args.online else 'pairs'}, {args.resolution}px")

    bad = data.Unreadable(args.max_bad_frac, f"pairs of {args.data}")
    seen, last, last_ckpt, flops = 0, {}, step, None
    clock = dict(first=step, logged=step, tic=time.time())
    policy.train()
    try:
        while step < args.max_steps:
            acc = {}
            for m in range(A):
                batch = next(loader)
                inputs = micro_batch(batch, feed, args, T, dev, flow)
                if flops is None and device == "cuda":
                    flops = checkpoint.step_flops(policy, ref, inputs, args.loss)
                # DDP all-reduces gradients once per optimizer step, on its last micro-step; FSDP reduce-scatters
                # every micro-step into the sharded gradients (holding whole ones between would cost their memory)
                with contextlib.nullcontext() if m == A - 1 or args.fsdp else model.no_sync():
                    loss, numbers = pair_loss(model, ref, inputs, args, alphas_cumprod, schedule["prediction_type"])
                    scale = world if args.loss == "rpo" else 1  # RPO's loss covers every rank's pairs
                    scaler.scale(loss * scale / A).backward()
                for k, val in {"loss": loss, **numbers, **batch.get("stats", {})}.items():  # online: rewards too
                    acc[k] = acc.get(k, 0.0) + torch.as_tensor(val, dtype=torch.float64, device=dev).detach() / A
                bad.add(batch["bad"])
                seen += len(batch["pos"])
            rec, seen_all = parallel.mean_over_ranks(acc, seen, dev)
            if not math.isfinite(rec["loss"]):
                raise ValueError(f"loss is {rec['loss']} at step {step + 1}: stopped; the last good checkpoint "
                                 f"(step {last_ckpt}) is kept in {ck_path if last_ckpt else 'none written yet'}")
            bad_all = bad.check(seen_all)  # every rank's unreadable pairs so far, each counted once
            lr, grad_norm = optimizer_step(opt, scaler, trained, args, step)
            step += 1
            if step % args.log_every == 0 or step == args.max_steps:
                last = checkpoint.log_step(args, step, rec, lr, grad_norm.item(), bad_all, clock, flops, log)
            if args.online:  # its pairs written, the reference refreshed, the held-out check
                feed.after_step(step)
            if step % args.ckpt_every == 0 or step == args.max_steps:
                checkpoint.save(ck_path, policy, opt, step, position + (step - clock["first"]) * G, args, fingerprints,
                                rank, log)
                last_ckpt = step
    except KeyboardInterrupt:  # Ctrl-C: one line; files being written removed on the way (weights.atomic)
        kept = f"step {last_ckpt} in {ck_path}" if last_ckpt else "none written yet"
        raise cli.Interrupted(f"interrupted at step {step} of {args.max_steps}; last checkpoint: {kept}") from None
    checkpoint.save_outputs(policy, args, step, log)
    if args.online:
        feed.finish()  # the last line: the held-out trend
    return dict(step=step, metrics=last, out_dir=args.out_dir)


# ----------------------------------------------------------------------------------------------------
# Flags and their defaults. None: filled by model family, loss or world size in resolve().

DEFAULTS = dict(
    model=None, unet_init=None, data=None, split="train", beta=None, loss="dpo", out_dir="out", batch_size=1,
    grad_accum=None, max_steps=2000, lr=None, warmup=None, optimizer=None, weight_decay=1e-2, grad_clip=1.0,
    resolution=None, random_crop=False, no_flip=False, prompt_dropout=0.2, dreamlike_only=False, rpo_tau=0.5,
    rpo_clip=None, rpo_form="logit", time_ids="image", latents="mean", seed=0, resume=False, ckpt_every=200,
    log_every=10, device=None, dtype=None, gradient_checkpointing=None, lora=None, lora_alpha=None, fsdp=False,
    compile=False, channels_last=False, cache=False, cache_dir=None, max_bad_frac=0.01, save_single=False,
    tokenizer=None, num_workers=None, sigma_density="logit_normal", guidance=None, columns=None, demo=None)
AUTOCAST_CACHE = False  # a cache keeps a bf16 copy of each fp32 weight all forward long; each is used once anyway


def resolve(args, family, world, device="cpu", native=None, guidance_embeds=False):
    """A copy of args with the defaults filled in that depend on the model (native: its own image size; its family,
    'sdxl', 'sd15', 'sd3' or 'flux', for the recipe, as the official launchers and diffusers' SD3 / FLUX scripts;
    guidance_embeds: FLUX-dev's guidance input), the loss, the world size and the device; refuses (ValueError)
    what cannot run there."""
    name, given = denoiser.NAME[family], vars(args).get("given", ())
    if family != "sdxl" and "time_ids" in given:
        raise ValueError(f"--time_ids is SDXL's size conditioning; {name} has none: drop it")
    if family in denoiser.FLOW and args.save_single:
        raise ValueError(f"--save_single writes a UNet's original single file; {name} runs leave transformer/ "
                         "(diffusers layout): drop it")
    if family in denoiser.FLOW and args.channels_last:
        raise ValueError(f"--channels_last is for a UNet's convolutions; {name} is a transformer: drop it")
    if "guidance" in given and not guidance_embeds:
        raise ValueError(f"--guidance feeds FLUX-dev's guidance embedding; this {name} model has none: drop it")
    if "sigma_density" in given and family not in denoiser.FLOW:
        raise ValueError(f"--sigma_density draws a flow model's sigma; {name} draws integer timesteps: drop it")
    if args.fsdp and world == 1:
        raise ValueError("--fsdp shards the model over ranks: start with torchrun --nproc_per_node N, N > 1 "
                         "(on one rank drop --fsdp)")
    if args.fsdp and args.dtype == "fp16":
        raise ValueError("--fsdp takes --dtype bf16 or fp32 (fp16 would need a sharded gradient scaler)")
    args = argparse.Namespace(**vars(args))
    if args.resolution is None and native:
        args.resolution = native
    args.family = family
    if args.beta is None:
        args.beta = BETA.get(args.loss, BETA["dpo"])
        if family in denoiser.FLOW:
            args.beta = FLOW_BETA.get(args.loss, args.beta)
    if guidance_embeds and args.guidance is None:
        args.guidance = flux.GUIDANCE
    recipe = {"resolution": (1024, 512, 1024), "warmup": (200, 500, 200), "optimizer": ("adafactor", "adamw", "adamw"),
              "gradient_checkpointing": (True, False, True)}  # SDXL, SD1.5, the flow transformers
    if args.lora and args.optimizer is None:
        args.optimizer = "adamw"  # the adapters are small: no need for Adafactor's factored moments
    column = {"sdxl": 0, "sd15": 1, "sd3": 2, "flux": 2}[family]
    for k, values in recipe.items():
        if getattr(args, k) is None:
            setattr(args, k, values[column])
    if args.grad_accum is None:
        args.grad_accum = max(1, 2048 // (args.batch_size * world))  # the paper's 2048 pairs per step
    args.pairs_per_step = args.batch_size * args.grad_accum * world
    if args.lr is None:
        args.lr = 1e-8 * args.pairs_per_step
    if args.cache_dir is None:
        args.cache_dir = os.path.join(args.out_dir, "cache")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    args.amp_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    args.autocast_cache = vars(args).get("autocast_cache", AUTOCAST_CACHE)  # memplan.py plans both
    return args


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, their defaults DEFAULTS; args.given lists the flags typed."""
    p = cli.Parser(description=__doc__.split("\n")[0] + " [...] = default picked by model family / world size.",
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def a(flag, **kw):
        p.add_argument(flag, default=DEFAULTS[flag[2:]], **kw)
    a("--model", help="base model (diffusers folder or one .safetensors, SDXL or SD1.5): policy init AND frozen "
      "reference; omit for the demo")
    a("--unet_init", help="start policy AND reference from this UNet instead (e.g. an SFT run's out_dir/unet), "
      "as the official --unet_init; VAE, text encoders and noise schedule still come from --model")
    a("--data", help="Pick-a-Pic v2 parquet (file, folder or glob) or JSONL {caption,image_0,image_1,label_0}")
    a("--split", help="which split's shards a Pick-a-Pic folder gives (others are not read)")
    a("--columns", help="another parquet preference set's column names, OURS=THEIRS, e.g. caption=prompt,"
      "jpg_0=chosen,jpg_1=rejected (no label_0 column: jpg_0's image is preferred); also label_0, model_0, model_1")
    a("--beta", type=float, help="beta of the loss [eq. 14: 5000 as the official launchers (paper text: 2000 for "
      "SD1.5; diffusers' SD1.5 script drops eq. 14's 1/2, so its beta is half ours), also for rpo, ipo, hinge; "
      "kto 1000, mapo 0.1, as their authors' code; SD3 / FLUX: 100, flow_grpo's Flow-DPO]")
    a("--loss", choices=list(OBJECTIVES), help="sft: MSE on the winner; rpo: Diffusion-RPO; ipo, hinge: DPO "
      "variants; mapo: reference-free; kto: single labelled images (JSONL {caption,image,label}) or pairs")
    a("--out_dir", help="unet/, metrics.jsonl, checkpoint.pt")
    a("--batch_size", type=int, help="pairs per rank per micro-step")
    a("--grad_accum", type=int, help="micro-steps per optimizer step [2048 / (batch_size*world): the paper's 2048]")
    a("--max_steps", type=int, help="optimizer steps")
    a("--lr", type=float, help="[1e-8 * batch_size*grad_accum*world, the official launchers' --scale_lr; "
      "the paper's text says 2000/beta * 2.048e-8]")
    a("--warmup", type=int, help="linear warmup steps, then constant [200 SDXL, 500 SD1.5]")
    a("--optimizer", choices=["adamw", "adafactor"], help="[adafactor for SDXL, adamw otherwise]")
    a("--weight_decay", type=float, help="decoupled weight decay (AdamW and Adafactor)")
    a("--grad_clip", type=float, help="max gradient norm")
    a("--resolution", type=int, help="square training size in pixels [the model's own: 1024 SDXL, 512 SD1.5]")
    a("--random_crop", action="store_true", help="random instead of center crop")
    a("--no_flip", action="store_true", help="no random horizontal flips")
    a("--prompt_dropout", type=float, help="P(prompt -> empty string), drawn once per pair")
    a("--dreamlike_only", action="store_true", help="keep pairs whose model_0 and model_1 contain 'dream' (official)")
    a("--rpo_tau", type=float, help="RPO temperature of the similarity weights")
    a("--rpo_clip", help="RPO weights from this CLIP model's prompt and image embeddings (a transformers CLIPModel "
      "folder), as Diffusion-RPO [without it: the UNet's text embeddings of the prompts only]")
    a("--rpo_form", choices=["logit", "loss"],
      help="where RPO's weight enters: scaling each logit (the paper's and RPO's code) or each pair's loss")
    a("--time_ids", choices=["image", "official"],
      help="SDXL size conditioning: each image's true size and crop, or the official code's constants")
    a("--latents", choices=["mean", "sample"], help="VAE posterior mean, or a sample of it (the official code)")
    a("--seed", type=int, help="data order, t, noise, dropout, crops: all keyed by (seed, pair position)")
    a("--resume", action="store_true", help="continue from out_dir/checkpoint.pt (a new run refuses to overwrite one)")
    a("--ckpt_every", type=int, help="optimizer steps between checkpoints")
    a("--log_every", type=int, help="optimizer steps between log lines")
    a("--device", choices=["cpu", "cuda"], help="[cuda if available]")
    a("--dtype", choices=["fp32", "bf16", "fp16"], help="compute dtype: autocast + frozen models [bf16 cuda, fp32 cpu]")
    a("--gradient_checkpointing", action=argparse.BooleanOptionalAction, help="[on for SDXL]")
    a("--lora", type=int, help="train rank-RANK LoRA adapters (attention + feed-forward projections of the "
      "transformer blocks) on a frozen base; the reference is the base: no second UNet [full fine-tune]")
    a("--lora_alpha", type=float, help="LoRA scale alpha/rank [alpha = rank]")
    a("--fsdp", action="store_true", help="FSDP2: shard parameters, gradients and optimizer state (and the "
      "reference) over the ranks instead of DDP's full copies")
    a("--compile", action="store_true", help="torch.compile the policy")
    a("--channels_last", action="store_true", help="channels_last memory format for the UNets")
    a("--cache", action="store_true", help="precompute latents + text embeddings once, train without VAE/text encoders")
    a("--cache_dir", help="[out_dir/cache]")
    a("--max_bad_frac", type=float, help="stop when more than this fraction of pairs is unreadable")
    a("--save_single", action="store_true", help="also write out_dir/unet.safetensors (original single-file layout)")
    a("--tokenizer", help="tokenizer folder override for clip.load")
    a("--num_workers", type=int, help="data loader processes [4 on cuda, 0 on cpu]")
    a("--sigma_density", choices=["logit_normal", "mode", "uniform"], help="flow models: how sigma is drawn, "
      "as SD3's and FLUX's training scripts (logit-normal u ~ sigmoid(N(0, 1)), then the scheduler's shift)")
    a("--guidance", type=float, help=f"FLUX-dev: its guidance embedding's input in training [{flux.GUIDANCE}]")
    a("--demo", choices=["sdxl", "flow", "online"], help="without --model: the CPU demo with a toy model of SDXL's "
      "or FLUX.1-dev's architecture, or online DPO on the toy SDXL [sdxl]")
    online.add_flags(p)  # --online, --score, --prompts, --samples_per_prompt, ... (their defaults: online.py)
    # Every flag starts out unset (argparse keeps what the namespace has): the typed ones are told apart (the demo)
    unset = object()
    args = argparse.Namespace(**{k: unset for k in DEFAULTS})
    p.parse_args(argv, args)
    args.given = sorted(k for k, v in vars(args).items() if v is not unset and (k in DEFAULTS or v != p.get_default(k)))
    for k, v in DEFAULTS.items():
        if getattr(args, k) is unset:
            setattr(args, k, v)
    for k in ("batch_size", "grad_accum", "max_steps", "resolution", "ckpt_every", "log_every", "lora"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k} must be >= 1, got {getattr(args, k)}")
    valid = {"beta": lambda v: v is None or 0 < v < math.inf, "lr": lambda v: v is None or 0 < v < math.inf,
             "prompt_dropout": lambda v: 0 <= v <= 1, "max_bad_frac": lambda v: 0 <= v <= 1,
             "rpo_tau": lambda v: v > 0, "warmup": lambda v: v is None or v >= 0, "grad_clip": lambda v: v > 0,
             "lora_alpha": lambda v: v is None or 0 < v < math.inf}
    for k, ok in valid.items():
        if not ok(getattr(args, k)):
            p.error(f"--{k} has an invalid value: {getattr(args, k)}")
    if args.columns and args.data and args.data.endswith(".jsonl"):
        p.error(f"--columns maps a parquet set's column names; {args.data} is a JSONL file: drop --columns")
    if args.columns:
        try:
            cli.parse_map(args.columns, "--columns", data.COLUMN_MAP)
        except ValueError as e:
            p.error(str(e))
    if "split" in args.given and args.data and args.data.endswith(".jsonl"):
        p.error(f"--split picks the shards of a Pick-a-Pic folder; {args.data} is a JSONL file: drop --split")
    if args.demo and args.model:
        p.error(f"--demo {args.demo} builds its own toy model: drop --model (or --demo to train {args.model})")
    online.check(p, args)
    if args.rpo_clip is not None and args.loss != "rpo":
        p.error(f"--rpo_clip weights RPO's matrix: it needs --loss rpo (got --loss {args.loss})")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.model is None:  # no model: the CPU demo, a tool above this file: the one import made here
            import demo
            parallel.setup("cpu")
            demo.run(args, train)
        else:
            train(args)
    except (CheckpointError, ValueError, OSError, cli.Interrupted, KeyboardInterrupt) as e:
        status = 130 if isinstance(e, (cli.Interrupted, KeyboardInterrupt)) else 1  # 130: Ctrl-C, as shells say
        if dist.is_initialized() and dist.get_rank() > 0:
            sys.exit(status)  # rank 0 says it
        cli.fail(str(e) if str(e) else "interrupted", status)


if __name__ == "__main__":
    main()
