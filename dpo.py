"""Diffusion-DPO (Wallace et al. 2023, arXiv:2311.12908): fine-tune SDXL, SD1.5, SD3, FLUX, Qwen-Image, Z-Image on pairs

    python dpo.py [--demo flow|zimage|online]                       # CPU demos (demo.py), no downloads
    python dpo.py --online --model SDXL_DIR --prompts parti --score pickscore=DIR ...   # online DPO (online.py)
    torchrun --nproc_per_node 8 dpo.py --model SDXL_DIR --data pickapic_v2/ --beta 5000 --out_dir runs/sdxl

A pair (x_w, x_l) of images for prompt c, x_w preferred. Both are noised with ONE timestep t ~ U{0..999} and ONE
noise eps (the forward process q(x_t | x_0), diffusion.py); the trainable policy eps_theta and the frozen reference
eps_ref (the base model) predict the noise of both; eq. 14 asks the policy to denoise the winner better than the
reference does, relative to how it denoises the loser. Flow models (SD3, FLUX) draw ONE sigma instead of t, noise
both onto x_sigma = (1 - sigma) x_0 + sigma eps, and compare velocity errors |(eps - x_0) - v_theta|^2. Reading
order: eq. 14 and the objectives, one micro-batch (pair_loss), the models, the loop (train), the flags."""
import argparse
import contextlib
import math
import os
import random
import sys
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import cache
import checkpoint
import cli
import dashboard
import data
import diffusion
import families
import hub
import kernels
import lora
import objectives
import online
import optim
import parallel
import rl
import vae
from weights import CheckpointError

# ----------------------------------------------------------------------------------------------------
# The loss. MSEs are per sample (mean over C, H, W); the paper's T * omega(lambda_t) is folded into beta.


def dpo_loss(model_pred, ref_pred, noise, beta):
    """Eq. 14: loss = mean_pairs -log sigmoid(-beta/2 [(|eps - eps_theta(x_w)|^2 - |eps - eps_theta(x_l)|^2) -
    (|eps - eps_ref(x_w)|^2 - |eps - eps_ref(x_l)|^2)]). Preds (2B, C, H, W) winners first; noise (B, C, H, W) is
    the eps both images of pair i were noised with (objectives.pair_logits: eq. 14's argument, the reference's MSEs
    without gradient). Plain PyTorch; kernels.dpo_loss fuses it for CUDA."""
    logits, stats = objectives.pair_logits(model_pred, ref_pred, noise, beta)  # (B,)
    return -F.logsigmoid(logits).mean(), stats


def dpo(pred, ref_pred, eps, inputs, beta):
    """Eq. 14 as the loop calls every objective: fused in Triton on CUDA (kernels.dpo_loss), dpo_loss elsewhere."""
    loss_fn = kernels.dpo_loss if kernels.use_triton(pred) else dpo_loss
    return loss_fn(pred, ref_pred, eps, beta)


# --loss NAME -> its loss(pred, ref_pred, eps, inputs, **numbers) -> (loss, stats), beside its paper in objectives.py
OBJECTIVES = {"dpo": dpo, "sft": objectives.sft, "rpo": objectives.rpo, "ipo": objectives.ipo,
              "hinge": objectives.hinge, "mapo": objectives.mapo, "kto": objectives.kto}
REFERENCE_FREE = ("sft", "mapo")  # no reference model at all
# --lr's default per run kind, (online, lora) -> lr, as the references train (docs/training.md): offline full, None =
# 1e-8 x pairs per step (the official launchers' --scale_lr); offline LoRA 1e-5 (diffusers' Diffusion-DPO LoRA
# scripts); online LoRA 3e-4 (flow_grpo, DiffusionNFT); online full 1e-5 (Flow-Factory)
LR = {(False, False): None, (False, True): 1e-5, (True, True): 3e-4, (True, False): 1e-5}
# beta as their authors use it; a family's record may say otherwise (flow models: families.FLOW_BETA)
BETA = {"dpo": 5000.0, "rpo": 5000.0, "ipo": 5000.0, "hinge": 5000.0, "kto": 1000.0, "mapo": 0.1,
        "nft": 1.0, "grpo": 0.0}  # (NFT's: its policies' mixing strength; GRPO's KL weight is --kl)


def objective(loss, beta, rpo_tau=0.5, rpo_form="logit"):
    """--loss as pair_loss calls it, (pred, ref_pred, eps, inputs) -> (loss, stats), the numbers it uses bound:
    beta, and RPO's temperature and form."""
    numbers = {"sft": {}, "rpo": dict(beta=beta, tau=rpo_tau, form=rpo_form)}.get(loss, dict(beta=beta))
    return partial(OBJECTIVES[loss], **numbers)


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
        g = torch.Generator().manual_seed(data.seed_for(seed, p, 0x7E5))
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


def micro_batch(batch, feed, seed, p_drop, T, dev, flow=None, winners_only=False):
    """A batch of items -> pair_loss's inputs: one draw of (t, eps, prompt dropout) per item, then the latents and
    text embeddings (cache.Feed: encoded now or read from the cache), labels and RPO's embeddings. winners_only: the
    paper's SFT baseline learns from the preferred images alone."""
    t, eps, drop, zn = draw(batch["pos"], seed, feed.latent_shape, T, p_drop, feed.n_latent, flow)
    z, cond = feed(batch, drop.to(dev), zn)
    if winners_only:
        z, cond = z[:len(eps)], tuple(None if c is None else c[:len(eps)] for c in cond)
    labels = batch["label"].to(dev) if "label" in batch else None
    return dict(z=z, eps=eps.to(dev), t=t.to(dev), T=T, cond=cond, labels=labels, rpo_emb=feed.rpo_embeddings(batch))


def pair_loss(model, ref, inputs, loss, prediction_type, alphas_cumprod=None, dtype=torch.float32,
              autocast_cache=False):
    """The loss of one micro-batch, as the paper computes it. inputs: z (kB, C, h, w) clean latents, winners first
    (k = 2 images per pair, 1 for single images or SFT); eps (B, C, h, w) and t (B,), one draw per item (a flow
    model's sigma); cond, the denoiser's conditioning with kB rows; what an objective needs besides (T, labels,
    rpo_emb). loss: objective()'s; ref None: none (SFT, MaPO). autocast_cache: keep autocast's bf16 copy of each
    fp32 weight all forward long (torch's default; each copy is used once here, so off)."""
    z, eps, t, cond = inputs["z"], inputs["eps"], inputs["t"], inputs["cond"]
    k = z.shape[0] // eps.shape[0]  # images per item
    eps_k, t_k = eps.repeat(k, 1, 1, 1), t.repeat(k)  # (kB, C, h, w), (kB,): winner i and loser i share them
    # (kB, C, h, w) a draw of q(x_t | x_0) and the target (eps, or v for v-prediction); for a flow model the point
    # (1 - sigma) x_0 + sigma eps on the straight path and its velocity eps - x_0, the model given sigma * 1000
    x_t, t_k, target = diffusion.noised(z, eps_k, t_k, prediction_type, alphas_cumprod)
    amp = torch.autocast(x_t.device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=autocast_cache)
    with amp:
        pred = model(x_t, t_k, *cond)  # (kB, C, h, w) the policy's eps_theta(x_t, t, c)
    ref_pred = None
    if ref is not None:
        with torch.no_grad(), amp:
            ref_pred = ref(x_t, t_k, *cond)  # (kB, C, h, w) the frozen reference's eps_ref(x_t, t, c)
    if prediction_type != "epsilon":  # |pred - v|^2 = |(pred - v + eps) - eps|^2: every loss compares with eps
        pred = pred - (target - eps_k)
        ref_pred = None if ref_pred is None else ref_pred - (target - eps_k)
    return loss(pred, ref_pred, eps, inputs)


# ----------------------------------------------------------------------------------------------------
# The models


def reference(model, dtype):
    """The frozen reference: conv/linear weights in the compute dtype, norms in fp32, so that under autocast it
    computes bit for bit what the policy computes at step 0 (bf16 norms: beta x rounding noise, not log 2)."""
    model.requires_grad_(False).eval()
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.to(dtype)
    return model


def build_models(source, dtype, lora_rank=None, lora_alpha=None, lora_targets=None, seed=0, reference_free=False,
                 gradient_checkpointing=False, quantize=None):
    """(policy, reference or None, trained parameters). source(dtype, quantize): the starting denoiser in dtype, norms
    in fp32 (train: --unet_init or --model). Full fine-tune: fp32 master weights for the policy, a frozen reference in
    the compute dtype. LoRA: one frozen base in the compute dtype (its Linears in the quantize format, if given) with
    fp32 adapters, the reference with them off: the same quantized base, so eq. 14 still starts at log 2."""
    if lora_rank:
        policy = reference(source(dtype, quantize), dtype)
        if quantize and not any(isinstance(m, kernels.QuantLinear) for m in policy.modules()):
            raise ValueError(f"--quantize {quantize}: no Linear layer of this model can be stored in it (nf4: input "
                             "widths that are multiples of 64); drop it or take fp8 / int8")
        trained = lora.add(policy, lora_rank, lora_alpha, lora_targets, seed=seed)
        ref = None if reference_free else lora.reference(policy)
    else:
        policy = source(torch.float32)
        ref = None if reference_free else reference(source(dtype), dtype)
        for name in getattr(policy, "unused", list)():  # parameters that feed nothing (Qwen-Image's last text path)
            policy.get_parameter(name).requires_grad_(False)
        trained = [p for p in policy.parameters() if p.requires_grad]
    policy.gradient_checkpointing = gradient_checkpointing
    return policy, ref, trained


# ----------------------------------------------------------------------------------------------------
# The loop


def start(model, unet_init=None):
    """(--model's family record, the starting denoiser's config, its native size in pixels); --unet_init of it."""
    fam = families.of(unet_init or model)
    if unet_init and families.of(model) is not fam:
        raise ValueError(f"--unet_init {unet_init} is {fam.title}, --model {model} is {families.of(model).title}: "
                         "they must be one family")
    config = fam.read_config(unet_init or model)
    return fam, config, config["sample_size"] * vae.downsample(model) if config.get("sample_size") else None


def train(args) -> dict:
    """One run: policy + frozen reference from args.model, the loop, checkpoints, the final denoiser in out_dir/unet
    (out_dir/transformer for a flow model: its family's subfolder)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = parallel.setup(device)
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    if args.model is None:
        raise ValueError("--model is required for training (run without flags for the demo)")
    pairs = data.Preferences(args.data, args.dreamlike_only, args.split, data.column_map(args.columns)) \
        if args.data else None  # read lazily
    if pairs is not None:
        log(f"data: {pairs.read}")
    fam, config, native = start(args.model, args.unet_init)
    args = resolve(args, fam, world, device, native, config)
    ck_path = checkpoint.prepare(args, rank, log)  # refuses to overwrite a run; removes a killed run's temp files
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(data.seed_for(args.seed, rank, 0x5EED))
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)
    policy, ref, trained = build_models(lambda dtype, q=None: fam.load(args.unet_init or args.model, dev, dtype,
                                                                       torch.float32, q),
                                        args.amp_dtype, args.lora, args.lora_alpha, fam.lora_targets, args.seed,
                                        args.loss in REFERENCE_FREE, args.gradient_checkpointing, args.quantize)
    for m in (policy, ref) if args.channels_last else ():
        if isinstance(m, torch.nn.Module):
            m.to(memory_format=torch.channels_last)
    # data (or the policy's own samples, online.py) -> the denoiser's inputs
    rl_run = args.loss in rl.LOSSES  # GRPO, NFT (rl.py): one denoising step of a sampled batch per micro-step
    if args.online:  # the policy's own samples, scored (online.py, rl.py)
        kind = rl.Feed if rl_run else online.Feed
        feed = kind(args, fam, policy, ref, policy.latent_channels, dev, rank, world, log)
    else:
        feed = cache.Feed(args, fam, pairs, policy.latent_channels, dev, rank, world, log)
    sched = diffusion.scheduler_config(args.model, fam, policy.prediction_type)  # single files: their metadata
    T, prediction = sched["num_train_timesteps"], "flow" if fam.flow else sched["prediction_type"]
    flow = (args.sigma_density, sched) if fam.flow else None  # a flow model draws sigma, not t
    alphas_cumprod = None if fam.flow else diffusion.alphas_cumprod(sched)
    model = parallel.wrap(policy, args.fsdp, args.amp_dtype, dev, fam.blocks)  # DDP, or FSDP2 shards in place
    if args.fsdp and isinstance(ref, torch.nn.Module):
        parallel.shard(ref, args.amp_dtype, fam.blocks)  # the same bf16 weights as the policy: log 2 at step 0
    trained = [p for p in policy.parameters() if p.requires_grad]  # FSDP2 swapped in sharded parameters
    opt = optim.build(args.optimizer, trained, args.lr, args.weight_decay, fused=device == "cuda")
    ema = optim.EMA(policy) if args.ema else None  # --ema: the trained weights' average, evaluated and saved too
    feed.ema, extra = ema, ({"ema": ema.values} if ema else {})
    if args.loss == "nft":  # DiffusionNFT's old policy: an average of the trained weights too (rl.Feed.after_step)
        feed.old = optim.EMA(policy)
        extra["old"] = feed.old.values
    fingerprints = checkpoint.fingerprints(args, feed.fingerprint)
    step, position = checkpoint.load(ck_path, args, fingerprints, policy, opt, rank, world, log, extra)
    if checkpoint.finished(ck_path, policy, fam, args, step, log):  # said, not done: nothing is rewritten
        feed.finish(step)  # (online: the held-out trend, which a run cut short at its end may not have written)
        return dict(step=step, metrics={}, out_dir=args.out_dir)
    if rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        checkpoint.start_log(args.out_dir, step, log)
        dashboard.start(dashboard.parse(args.report_to), args.out_dir, checkpoint.flags(args), step, step > 0)
    if args.compile:
        model = torch.compile(model)
    scaler = torch.amp.GradScaler(device, enabled=args.amp_dtype == torch.float16)  # a no-op unless fp16
    loss_fn = None if rl_run else objective(args.loss, args.beta, args.rpo_tau, args.rpo_form)
    B, G, A = args.batch_size, args.pairs_per_step, args.grad_accum * (feed.micro if rl_run else 1)
    loader = feed.loader(position, step, world, rank, device)
    log(f"{fam.title} {args.loss} beta={args.beta} lr={args.lr:.3g} {args.optimizer} {world} rank(s) x {B} pairs x "
        f"{A} accum = {G} pairs/step, {len(feed.dataset)} {feed.items}, {args.resolution}px")

    bad = data.Unreadable(args.max_bad_frac, f"pairs of {args.data}")
    seen, last, last_ckpt, flops = 0, {}, step, None
    clock = dict(first=step, logged=step, tic=time.time())
    policy.train()
    try:
        while step < args.max_steps:
            acc = {}
            for m in range(A):
                batch = next(loader)
                if not rl_run:
                    inputs = micro_batch(batch, feed, args.seed, args.prompt_dropout, T, dev, flow, args.loss == "sft")
                if flops is None and device == "cuda" and not rl_run:
                    flops = checkpoint.step_flops(policy, ref, inputs)
                # DDP all-reduces gradients once per optimizer step, on its last micro-step; FSDP reduce-scatters
                # every micro-step into the sharded gradients (holding whole ones between would cost their memory)
                with contextlib.nullcontext() if m == A - 1 or args.fsdp else model.no_sync():
                    if rl_run:
                        loss, numbers = feed.loss(model, ref, batch)
                    else:
                        loss, numbers = pair_loss(model, ref, inputs, loss_fn, prediction, alphas_cumprod,
                                                  args.amp_dtype)
                    w = batch.get("weight", 1.0)  # online: the share of the micro-batch's pairs that are not ties
                    loss = loss * w  # (ties train nothing; so 2 ranks still train as 1 rank does)
                    scale = world if args.loss == "rpo" else 1  # RPO's loss covers every rank's pairs
                    scaler.scale(loss * scale / A).backward()
                numbers = {k: torch.as_tensor(v, dtype=torch.float64, device=dev) * w for k, v in numbers.items()}
                for k, val in {"loss": loss, **numbers, **batch.get("stats", {}),
                               **({"weight": w} if "weight" in batch else {})}.items():
                    acc[k] = acc.get(k, 0.0) + torch.as_tensor(val, dtype=torch.float64, device=dev).detach() / A
                bad.add(batch["bad"])
                seen += len(batch["pos"])
            rec, seen_all = parallel.mean_over_ranks(acc, seen, dev)
            if rec.get("weight"):  # online: the loss's numbers as means over the pairs that are not ties
                rec.update({k: rec[k] / rec["weight"] for k in numbers})
            if not math.isfinite(rec["loss"]):
                raise ValueError(f"loss is {rec['loss']} at step {step + 1}: stopped; the last good checkpoint "
                                 f"(step {last_ckpt}) is kept in {ck_path if last_ckpt else 'none written yet'}")
            bad_all = bad.check(seen_all)  # every rank's unreadable pairs so far, each counted once
            lr, grad_norm = optim.update(opt, scaler, trained, args.lr, args.warmup, args.grad_clip, step)
            if ema:
                ema.update(policy, args.ema)
            step += 1
            if step % args.log_every == 0 or step == args.max_steps:
                last = checkpoint.log_step(args, step, rec, lr, grad_norm.item(), bad_all, clock, flops, log)
            feed.after_step(step)  # online: its pairs written, the reference refreshed, the held-out check
            if step % args.ckpt_every == 0 or step == args.max_steps:
                checkpoint.save(ck_path, policy, opt, step, position + (step - clock["first"]) * G, args, fingerprints,
                                rank, log, extra)
                last_ckpt = step
    except KeyboardInterrupt:  # Ctrl-C: one line; files being written removed on the way (weights.atomic)
        kept = f"step {last_ckpt} in {ck_path}" if last_ckpt else "none written yet"
        raise cli.Interrupted(f"interrupted at step {step} of {args.max_steps}; last checkpoint: {kept}") from None
    checkpoint.save_outputs(policy, fam, args, step, log)
    if ema:  # out_dir/ema/: the average in the same layout (evaluate.py and sample.py take it for the run folder)
        with ema.swapped(policy):
            checkpoint.save_outputs(policy, fam, argparse.Namespace(**{**vars(args), "save_single": False,
                                                                      "out_dir": os.path.join(args.out_dir, "ema")}),
                                    step, log)
    feed.finish(step)  # online: the last line, the held-out trend
    dashboard.close()
    return dict(step=step, metrics=last, out_dir=args.out_dir)


# ----------------------------------------------------------------------------------------------------
# The flags (parse_args: each with its default; None: filled by the model's family, the loss or the world size)


def resolve(args, family, world, device="cpu", native=None, config=None):
    """A copy of args with the defaults filled in that depend on the model (its family's record: the recipe of the
    official launchers and diffusers' scripts; native: its own image size; config: its denoiser's, whether it takes
    a guidance input), the loss, the world size and the device; refuses (ValueError) what cannot run there."""
    config, name, given = config or {}, family.title, args.given
    if not family.time_ids and "time_ids" in given:
        raise ValueError(f"--time_ids is {families.names([f for f in families.FAMILIES if f.time_ids])}'s size "
                         f"conditioning; {name} has none: drop it")
    if args.save_single and "single" not in family.layouts:
        raise ValueError(f"--save_single writes a UNet's original single file; {name} runs leave {family.subfolder}/ "
                         "(diffusers layout): drop it")
    if args.channels_last and family.flow:
        raise ValueError(f"--channels_last is for a UNet's convolutions; {name} is a {family.kind}: drop it")
    if "guidance" in given and not config.get("guidance_embeds"):
        raise ValueError(f"--guidance feeds FLUX-dev's guidance embedding; this {name} model has none: drop it")
    if args.loss == "nft" and not family.flow:
        raise ValueError(f"--loss nft (DiffusionNFT) trains a flow model's velocity; {name} is a {family.kind}: use "
                         "--loss grpo (DDPO's, with DDIM) or online dpo")
    if "sigma_density" in given and not family.flow:
        raise ValueError(f"--sigma_density draws a flow model's sigma; {name} draws integer timesteps: drop it")
    if args.fsdp and world == 1:
        raise ValueError("--fsdp shards the model over ranks: start with torchrun --nproc_per_node N, N > 1 "
                         "(on one rank drop --fsdp)")
    if args.quantize and not args.lora:
        raise ValueError("--quantize stores a LoRA run's frozen base; a full fine-tune trains every weight, and its "
                         "reference must equal the starting policy (eq. 14: log 2 at step 0): add --lora RANK")
    if args.quantize == "fp8" and torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        raise ValueError(f"--quantize fp8 needs a GPU with float8 (sm_89+: Ada, Hopper); this one is sm_"
                         f"{''.join(map(str, torch.cuda.get_device_capability()))}: use int8 or nf4")
    if args.fsdp and args.dtype == "fp16":
        raise ValueError("--fsdp takes --dtype bf16 or fp32 (fp16 would need a sharded gradient scaler)")
    args = argparse.Namespace(**vars(args))
    if args.resolution is None and native:
        args.resolution = native
    if args.beta is None:
        args.beta = family.recipe.beta.get(args.loss, BETA.get(args.loss, BETA["dpo"]))
    if config.get("guidance_embeds") and args.guidance is None:
        args.guidance = family.recipe.guidance
    if args.lora and args.optimizer is None:
        args.optimizer = "adamw"  # the adapters are small: no need for Adafactor's factored moments
    if args.online and args.warmup is None:
        args.warmup = 0  # a constant rate, as flow_grpo and DiffusionNFT train
    if args.prompt_dropout is None:  # the offline UNet recipes drop 20% of prompts; online and flow references none
        args.prompt_dropout = 0.0 if args.online else family.recipe.prompt_dropout
    for k in ("resolution", "warmup", "optimizer", "gradient_checkpointing"):
        if getattr(args, k) is None:
            setattr(args, k, getattr(family.recipe, k))
    args.grad_accum = args.grad_accum or max(1, 2048 // (args.batch_size * world))  # the paper's 2048 pairs per step
    args.pairs_per_step = args.batch_size * args.grad_accum * world
    if args.lr is None:
        args.lr = LR[(args.online, bool(args.lora))] or 1e-8 * args.pairs_per_step
    args.cache_dir = args.cache_dir or os.path.join(args.out_dir, "cache")
    args.amp_dtype = cli.DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    return args


def parse_args(argv=None) -> argparse.Namespace:
    """The flags and their defaults; args.given lists the flags typed (the demo keeps its own for the others)."""
    p = cli.Parser(description=__doc__.split("\n")[0] + " [...] = default picked by model family / world size.",
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = {}

    def a(flag, default, help, **kw):
        defaults[flag[2:]] = default
        p.add_argument(flag, default=default, help=help, **kw)
    a("--model", None, "base model (diffusers folder or one .safetensors): policy init AND frozen reference [the demo]")
    a("--unet_init", None, "start policy AND reference from this denoiser (e.g. an SFT run's out_dir/unet)")
    a("--data", None, "Pick-a-Pic v2 parquet (file, folder or glob) or JSONL {caption,image_0,image_1,label_0}")
    a("--split", "train", "which split's shards a Pick-a-Pic folder gives (others are not read)")
    a("--columns", None, "another parquet set's columns, OURS=THEIRS, e.g. caption=prompt,jpg_0=chosen,jpg_1=rejected")
    a("--beta", None, "eq. 14's beta [5000 (diffusers' SD1.5 script's: half); kto 1000, mapo .1; flow 100]", type=float)
    a("--loss", "dpo", "rpo: Diffusion-RPO; mapo, sft: no reference; kto: single images; online only: grpo, nft "
      "(rl.py)", choices=list(OBJECTIVES) + list(rl.LOSSES))
    a("--out_dir", "out", "unet/ (transformer/), metrics.jsonl, checkpoint.pt")
    a("--batch_size", 1, "pairs per rank per micro-step", type=int)
    a("--grad_accum", None, "micro-steps per optimizer step [2048 / (batch_size*world): the paper's 2048]", type=int)
    a("--max_steps", 2000, "optimizer steps", type=int)
    a("--lr", None, "[by run kind: offline full 1e-8 * pairs per step, LoRA 1e-5; online LoRA 3e-4, full 1e-5]",
      type=float)
    a("--warmup", None, "linear warmup steps, then constant [the family's: 200 SDXL, 500 SD1.5; online 0]", type=int)
    a("--optimizer", None, "[the family's: adafactor for SDXL, adamw otherwise]", choices=["adamw", "adafactor"])
    a("--weight_decay", 1e-2, "decoupled weight decay (AdamW and Adafactor)", type=float)
    a("--grad_clip", 1.0, "max gradient norm", type=float)
    a("--resolution", None, "square training size in pixels [the model's own: 1024 SDXL, 512 SD1.5]", type=int)
    a("--random_crop", False, "random instead of center crop", action="store_true")
    a("--no_flip", False, "no random horizontal flips", action="store_true")
    a("--prompt_dropout", None, "P(prompt -> empty string), drawn once per pair [SDXL, SD1.5 offline 0.2; else 0]",
      type=float)
    a("--dreamlike_only", False, "keep pairs whose model_0 and model_1 contain 'dream' (official)", action="store_true")
    a("--rpo_tau", 0.5, "RPO temperature of the similarity weights", type=float)
    a("--rpo_clip", None, "RPO weights from this CLIP folder's prompt and image embeddings [the prompts' embeddings]")
    a("--rpo_form", "logit", "RPO's weight scales each logit (the paper's) or each loss", choices=["logit", "loss"])
    a("--time_ids", "image", "SDXL's size ids: each image's, or the official ones", choices=["image", "official"])
    a("--latents", "mean", "VAE posterior mean, or a sample of it (the official code)", choices=["mean", "sample"])
    a("--seed", 0, "data order, t, noise, dropout, crops: all keyed by (seed, pair position)", type=int)
    a("--resume", False, "continue from out_dir/checkpoint.pt (a new run never overwrites one)", action="store_true")
    a("--ckpt_every", 200, "optimizer steps between checkpoints", type=int)
    a("--log_every", 10, "optimizer steps between log lines", type=int)
    a("--device", None, "[cuda if available]", choices=["cpu", "cuda"])
    a("--dtype", None, "compute dtype: autocast + frozen models [bf16 cuda, fp32 cpu]", choices=list(cli.DTYPES))
    a("--gradient_checkpointing", None, "[the family's: on for SDXL]", action=argparse.BooleanOptionalAction)
    a("--lora", None, "train rank-N LoRA adapters on a frozen base, the reference [full fine-tune]", type=int)
    a("--lora_alpha", None, "LoRA scale alpha/rank [alpha = rank]", type=float)
    a("--quantize", None, "LoRA runs: the frozen base and text encoders stored in this format", choices=kernels.FORMATS)
    a("--fsdp", False, "FSDP2: shard weights, gradients, optimizer state, the reference", action="store_true")
    a("--compile", False, "torch.compile the policy", action="store_true")
    a("--channels_last", False, "channels_last memory format for the UNets", action="store_true")
    a("--cache", False, "precompute latents and text embeddings, train without the encoders", action="store_true")
    a("--cache_dir", None, "[out_dir/cache]")
    a("--offload_encoders", False, "text encoders and VAE on the CPU, on the GPU only to encode a batch (no --cache)",
      action="store_true")
    a("--max_bad_frac", 0.01, "stop when more than this fraction of pairs is unreadable", type=float)
    a("--save_single", False, "also write out_dir/unet.safetensors (original single-file layout)", action="store_true")
    a("--tokenizer", None, "tokenizer folder override for clip.load")
    a("--ema", None, "keep an exponential moving average of the trained weights with this decay (e.g. 0.99): "
      "checkpointed, used by the held-out checks, saved in out_dir/ema/", type=float)
    a("--report_to", None, "also log to these dashboards: tensorboard, wandb (comma-separated) [metrics.jsonl only]")
    a("--revision", None, "hub revision (commit, branch, tag) of --model when it is a hub id ORG/NAME [the newest]")
    a("--num_workers", None, "data loader processes [4 on cuda, 0 on cpu]", type=int)
    a("--sigma_density", "logit_normal", "flow models: sigma's density", choices=["logit_normal", "mode", "uniform"])
    a("--guidance", None, "a guidance input's value in training (FLUX-dev) [the family's: 3.5]", type=float)
    a("--demo", None, "without --model: a CPU demo (toy SDXL, FLUX, Z-Image; online DPO, GRPO, NFT; online_flow: "
      "online DPO on the toy FLUX)", choices=["sdxl", "flow", "zimage", "online", "grpo", "nft", "online_flow"])
    online.add_flags(p)  # --online, --score, --prompts, --samples_per_prompt, ... (their defaults: online.py)
    rl.add_flags(p)  # --loss grpo / nft's: --sampler, --noise_level, --clip_range, --kl, ... (rl.py)
    valid = {"beta": lambda v: v is None or 0 < v < math.inf, "lr": lambda v: v is None or 0 < v < math.inf,
             "prompt_dropout": lambda v: v is None or 0 <= v <= 1, "ema": lambda v: v is None or 0 < v < 1,
             "max_bad_frac": lambda v: 0 <= v <= 1,
             "rpo_tau": lambda v: v > 0, "warmup": lambda v: v is None or v >= 0, "grad_clip": lambda v: v > 0,
             "lora_alpha": lambda v: v is None or 0 < v < math.inf}
    positive = ("batch_size", "grad_accum", "max_steps", "resolution", "ckpt_every", "log_every", "lora")
    args = cli.parse_args(p, argv, defaults, positive, valid)  # args.given: the flags typed
    data.check_flags(p, args.data, "split" in args.given, args.columns)
    if args.demo and args.model:
        p.error(f"--demo {args.demo} builds its own toy model: drop --model (or --demo to train {args.model})")
    rl.check(p, args)  # (first: it fills --sampler and --eval_steps, which online.check's refusals read)
    online.check(p, args)
    try:
        dashboard.parse(args.report_to)
    except ValueError as e:
        p.error(str(e))
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
            hub.resolve(args, dict(model={}, unet_init=dict(only=families.SUBFOLDERS), data=dict(repo_type="dataset"),
                                   rpo_clip={}, tokenizer=dict(tokenizer=True)), args.revision)  # hub ids
            train(args)
    except (CheckpointError, ValueError, OSError, cli.Interrupted, KeyboardInterrupt) as e:
        status = 130 if isinstance(e, (cli.Interrupted, KeyboardInterrupt)) else 1  # 130: Ctrl-C, as shells say
        if dist.is_initialized() and dist.get_rank() > 0:
            sys.exit(status)  # rank 0 says it
        cli.fail(str(e) if str(e) else "interrupted", status)
    finally:
        dashboard.close()  # (a run that failed: what it logged, flushed)
        cli.finish()  # the run folder's lock released; a folder made and left empty removed


if __name__ == "__main__":
    main()
