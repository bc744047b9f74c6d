"""Diffusion-DPO (Wallace et al. 2023, arXiv:2311.12908): fine-tune SDXL / SD1.5 on human preference pairs.

    python dpo.py                                                   # CPU demo (demo.py), no downloads
    torchrun --nproc_per_node 8 dpo.py --model SDXL_DIR --data pickapic_v2/ --beta 5000 --out_dir runs/sdxl
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_id run1 --rdzv_backend c10d --rdzv_endpoint HOST0:29500 dpo.py ...

A pair (x_w, x_l) of images for prompt c, x_w preferred. Both are noised with ONE timestep t ~ U{0..999} and ONE
noise eps (the forward process q(x_t | x_0), diffusion.py); the trainable policy eps_theta and the frozen
reference eps_ref (the base model) predict the noise of both; eq. 14 asks the policy to denoise the winner better
than the reference does, relative to how it denoises the loser. Reading order: the losses (eq. 14 first), one
micro-batch (pair_loss), the loop (train), then setup and flags.
"""
import argparse
import contextlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint
import cli
import data
import demo
import diffusion
import kernels
import lora
import optim
import parallel
import reward
import unet as unetlib
import vae as vaelib
from data import Pairs, collate, distinct, seed_for
from weights import CheckpointError

# ----------------------------------------------------------------------------------------------------
# The losses. MSEs are per sample (mean over C, H, W); the paper's T * omega(lambda_t) is folded into beta.


def mse(pred, target):
    """Per-sample mean squared error in fp32: (N, C, H, W) -> (N,)."""
    return (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


def preference_logits(model_mse_w, model_mse_l, ref_mse_w, ref_mse_l, beta):
    """Eq. 14's argument: -beta/2 [(|eps - eps_theta(x_w)|^2 - |eps - eps_theta(x_l)|^2) - (the same for eps_ref)].
    Positive when the policy, more than the reference, denoises the winner better than the loser. Broadcasts."""
    return -0.5 * beta * ((model_mse_w - model_mse_l) - (ref_mse_w - ref_mse_l))


def dpo_loss(model_pred, ref_pred, noise, beta, form="dpo"):
    """Eq. 14: loss = mean_pairs -log sigmoid(logits). Preds (2B, C, H, W) winners first; noise (B, C, H, W) is
    the eps both images of pair i were noised with. Plain PyTorch; kernels.dpo_loss fuses it for CUDA.
    form "ipo" or "hinge": the DPO variants diffusers' example offers, on the same logits (pair_losses)."""
    B = noise.shape[0]
    target = torch.cat([noise, noise])  # (2B, C, H, W): the same eps for winner i and loser i
    model_mse = mse(model_pred, target)  # (2B,) |eps - eps_theta(x_t, t)|^2
    ref_mse = mse(ref_pred, target).detach()  # (2B,) |eps - eps_ref(x_t, t)|^2, no gradient
    logits = preference_logits(model_mse[:B], model_mse[B:], ref_mse[:B], ref_mse[B:], beta)  # (B,)
    loss = pair_losses(logits, beta, form).mean()
    return loss, _stats(logits, model_mse.detach(), ref_mse, beta)


def pair_losses(logits, beta, form):
    """Each pair's loss from its eq.-14 logits z; h = z / beta is the log-likelihood-ratio margin, winner over loser."""
    if form == "ipo":  # IPO (Azar et al. 2023, eq. 17): regress h onto 1/(2 beta) instead of pushing it up forever
        return (logits / beta - 1 / (2 * beta)) ** 2
    if form == "hinge":  # SLiC / RSO's hinge (Liu et al. 2023, arXiv:2309.06657): no gradient once z reaches 1
        return F.relu(1 - logits)
    return -F.logsigmoid(logits)  # DPO, eq. 14


def kto_loss(model_pred, ref_pred, target, beta, labels):
    """Diffusion-KTO (Li et al. 2024, arXiv:2404.04465): single images, labels (N,) 1 desirable, 0 undesirable.
    With r = beta (|eps - eps_ref|^2 - |eps - eps_theta|^2), each image's implicit reward, the loss is
    1 - sigmoid(r - z) for a desirable image and 1 - sigmoid(z - r) for an undesirable one; the reference point z
    is the batch's mean reward over all ranks, not below 0 (no gradient; the paper's eq. 8, as its code notes)."""
    model_mse, ref_mse = mse(model_pred, target), mse(ref_pred, target).detach()  # (N,)
    reward = ref_mse - model_mse  # (N,) / beta
    z = reward.detach().mean()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(z)
        z = z / dist.get_world_size()
    sign = 2.0 * labels.float() - 1  # +1 desirable, -1 undesirable
    value = sign * beta * (reward - z.clamp(min=0))  # (N,)
    loss = (1 - torch.sigmoid(value)).mean()
    return loss, {"implicit_acc": (value.detach() > 0).float().mean(), "reward_margin": (sign * reward).mean(),
                  "model_mse": model_mse.detach().mean(), "ref_mse": ref_mse.mean()}


MAPO_W = 0.5  # MaPO's constant in its score's link function (the authors' --snr_value)


def mapo_loss(model_pred, target, beta, T):
    """MaPO (Hong et al. 2024, arXiv:2406.06424), reference-free: the winner's denoising loss, plus beta times the
    Bradley-Terry loss of the margin between the two images' scores s(m) = w m / (e^(w m) - 1) (w = 0.5; a bounded,
    decreasing link of the MSE m), scaled by T timesteps: L = m_w - beta log sigmoid(T (s(m_w) - s(m_l))), as the
    authors' code (mapo-t2i/mapo) computes it."""
    B = target.shape[0] // 2
    model_mse = mse(model_pred, target)  # (2B,)
    score = MAPO_W * model_mse / torch.expm1(MAPO_W * model_mse)  # (2B,)
    margin = T * (score[:B] - score[B:])  # (B,)
    loss = model_mse[:B].mean() - beta * F.logsigmoid(margin).mean()
    return loss, {"implicit_acc": (margin.detach() > 0).float().mean(), "model_mse": model_mse.detach().mean()}


def rpo_weights(emb, tau):
    """Diffusion-RPO's weights (Gu et al. 2024, arXiv:2406.06382, after RPO, Yin et al. 2024) of winner i against
    loser j: w_ij = softmax_j(-(1 - s_ij) / tau), rows sum to 1. emb (M, 3, P): CLIP's unit-length embeddings of each
    pair's prompt c, winner x^w and loser x^l (--rpo_clip); s_ij is the cosine of the concatenated prompt and image
    embeddings of (c_i, x^w_i) and (c_j, x^l_j): (cos(c_i, c_j) + cos(x^w_i, x^l_j)) / 2. emb (M, E), the fallback
    without a CLIP model: one text embedding per pair, s_ij = cos(e_i, e_j) (RPO's prompt-only weights)."""
    if emb.dim() == 3:
        c, xw, xl = (F.normalize(emb[:, k].float(), dim=-1) for k in range(3))  # (M, P) each
        s = 0.5 * (c @ c.T + xw @ xl.T)  # (M, M)
    else:
        e = F.normalize(emb.float(), dim=-1)  # (M, E)
        s = e @ e.T
    return torch.softmax(-(1 - s) / tau, dim=1)  # (M, M)


def rpo_loss(model_pred, ref_pred, noise, beta, emb, tau, form="logit", weights=None):
    """Diffusion-RPO: winner i against EVERY loser j of the batch (all-gathered across ranks), eq. 14's logit for
    each (i, j) scaled by rpo_weights. form "logit", the paper's and RPO's code: the weight scales the logit,
    L = mean_ij -log sigmoid(w_ij * logit_ij); form "loss": the weight scales each (i, j)'s loss,
    L = mean_i sum_j w_ij * -log sigmoid(logit_ij). A single pair (M = 1, w = 1) is DPO in both forms. The loss is
    the whole gathered batch's: times world size before backward (DDP means)."""
    B = noise.shape[0]
    target = torch.cat([noise, noise])  # (2B, C, H, W)
    model_mse, ref_mse = mse(model_pred, target), mse(ref_pred, target).detach()  # (2B,)
    mw, ml = _gather(model_mse[:B]), _gather(model_mse[B:])  # (M,) the M pairs of all ranks
    rw, rl = _gather(ref_mse[:B]), _gather(ref_mse[B:])
    logits = preference_logits(mw[:, None], ml[None, :], rw[:, None], rl[None, :], beta)  # (M, M): i vs j
    if weights is None:
        weights = rpo_weights(_gather(emb.detach()), tau)  # (M, M)
    if form == "logit":
        loss = -F.logsigmoid(weights * logits).mean()
    else:
        loss = (weights * -F.logsigmoid(logits)).sum(1).mean()
    return loss, _stats(logits.diagonal(), torch.cat([mw, ml]).detach(), torch.cat([rw, rl]), beta)


def _stats(logits, model_mse, ref_mse, beta):
    """What the log shows: how often the policy prefers the winner more than the reference does, and by how much
    (reward_margin = logits / (beta/2), beta-free; > 0 is good)."""
    logits = logits.detach()
    return {"implicit_acc": (logits > 0).float().mean(), "reward_margin": (logits / (0.5 * beta)).mean(),
            "model_mse": model_mse.mean(), "ref_mse": ref_mse.mean()}


def _gather(x):
    """All ranks' x, concatenated in rank order; only this rank's slice carries gradient."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------------
# One micro-batch of pairs


def draw(pos, seed, shape, n_t, p_drop, n_latent=0):
    """t, eps and prompt dropout for the pairs at global positions pos: ONE draw per pair (shared by winner and
    loser), keyed by (seed, position) alone, so world size, data workers and resume do not change it. n_latent > 0
    (--latents sample): also the noise that draws each of a pair's n_latent latents from the VAE posterior."""
    t, eps, drop, latent = [], [], [], []
    for p in pos.tolist():
        g = torch.Generator().manual_seed(seed_for(seed, p, 0x7E5))
        t.append(torch.randint(0, n_t, (1,), generator=g))
        eps.append(torch.randn(shape, generator=g))
        drop.append(torch.rand(1, generator=g) < p_drop)
        if n_latent:
            latent.append(torch.randn((n_latent, *shape), generator=g))
    latent = torch.stack(latent) if n_latent else None  # (B, n_latent, C, h, w)
    return torch.cat(t), torch.stack(eps), torch.cat(drop), latent  # (B,), (B, C, h, w), (B,) bool


# Autocast's cache would keep a bf16 copy of every fp32 policy weight for the whole forward (4.8 GiB for SDXL; see
# bench_step.py --plan). Each weight is used once per forward, so not caching costs no extra casts.
AUTOCAST_CACHE = False


def pair_loss(model, ref, z, eps, t, cond, args, alphas_cumprod, prediction_type, labels=None, rpo_emb=None):
    """The loss of one micro-batch, as the paper computes it. z (2B, C, h, w): clean latents, winners first; eps
    (B, C, h, w) and t (B,): one draw per pair; cond = (context, pooled, time_ids) with 2B rows. KTO's single
    images: z (B, C, h, w) with labels (B,). RPO with --rpo_clip: rpo_emb (B, 3, P), CLIP's prompt, winner, loser."""
    B = eps.shape[0]
    if args.loss == "sft":  # the paper's baseline: the plain denoising loss on the preferred images only
        z, cond = z[:B], tuple(None if c is None else c[:B] for c in cond)
    k = z.shape[0] // B  # images per pair: 2 (1 for SFT and single images)
    eps, t = eps.repeat(k, 1, 1, 1), t.repeat(k)  # (kB, C, h, w), (kB,): winner i and loser i share them
    x_t = diffusion.forward_process(z, eps, t, alphas_cumprod)  # (kB, C, h, w) a draw of q(x_t | x_0)
    target = diffusion.target(z, eps, t, alphas_cumprod, prediction_type)  # eps, or v for v-prediction
    amp = torch.autocast(x_t.device.type, dtype=args.amp_dtype, enabled=args.amp_dtype != torch.float32,
                         cache_enabled=AUTOCAST_CACHE)
    with amp:
        pred = model(x_t, t, *cond)  # (kB, C, h, w) the policy's eps_theta(x_t, t, c)
    if args.loss == "sft":
        loss = mse(pred, target).mean()
        return loss, {"model_mse": loss.detach()}
    if args.loss == "mapo":  # no reference model at all
        return mapo_loss(pred, target, args.beta, len(alphas_cumprod))
    with torch.no_grad(), amp:
        ref_pred = ref(x_t, t, *cond)  # (2B, C, h, w) the frozen reference's eps_ref(x_t, t, c)
    if args.loss == "kto":  # a pair is two labelled images: the winner desirable, the loser not
        labels = torch.arange(len(z), device=z.device) < B if labels is None else labels
        return kto_loss(pred, ref_pred, target, args.beta, labels)
    if prediction_type == "v_prediction":  # |pred - v|^2 = |(pred - v + eps) - eps|^2: the losses' shared-eps layout
        pred, ref_pred = pred - (target - eps), ref_pred - (target - eps)
    if args.loss == "rpo":  # CLIP's prompt and image embeddings (--rpo_clip), else the UNet's text embedding:
        if rpo_emb is None:  # SDXL's pooled one; SD1.5 has none, so the mean of the context states
            rpo_emb = (cond[0].mean(1) if cond[1] is None else cond[1])[:B]  # (B, E), one per pair
        return rpo_loss(pred, ref_pred, eps[:B], args.beta, rpo_emb, args.rpo_tau, args.rpo_form)
    if args.loss in ("ipo", "hinge"):
        return dpo_loss(pred, ref_pred, eps[:B], args.beta, args.loss)
    loss_fn = kernels.dpo_loss if kernels.use_triton(pred) else dpo_loss  # eq. 14: fused in Triton on CUDA
    return loss_fn(pred, ref_pred, eps[:B], args.beta)


# ----------------------------------------------------------------------------------------------------
# The loop


def train(args) -> dict:
    """One run: policy + frozen reference from args.model, the loop, checkpoints, the final UNet in out_dir/unet."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = parallel.setup(device)
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    if args.model is None:
        raise ValueError("--model is required for training (run without flags for the demo)")
    ck_path = os.path.join(args.out_dir, "checkpoint.pt")
    if os.path.exists(ck_path) and not args.resume:
        raise ValueError(f"{ck_path} exists: pass --resume to continue that run or choose another --out_dir")
    if args.fsdp and world == 1:
        raise ValueError("--fsdp shards the model over ranks: start with torchrun --nproc_per_node N, N > 1 "
                         "(on one rank drop --fsdp)")
    if args.fsdp and args.dtype == "fp16":
        raise ValueError("--fsdp takes --dtype bf16 or fp32 (fp16 would need a sharded gradient scaler)")
    if rank == 0 and os.path.isdir(args.out_dir):
        checkpoint.clean(args.out_dir, log)  # temporary files of a run that was killed
    dist.barrier()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed_for(args.seed, rank, 0x5EED))
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)

    pairs = Pairs(args.data, args.dreamlike_only, args.split) if args.data else None  # images are read lazily
    if pairs is not None:
        log(f"data: {pairs.read}")
    start = args.unet_init or args.model
    config = unetlib.read_config(start)
    native = config["sample_size"] * vaelib.downsample(args.model) if config.get("sample_size") else None
    args = resolve(args, config.get("addition_embed_type") == "text_time", world, device, native)
    # Models. Full fine-tune: fp32 master weights for the policy, a frozen reference in the compute dtype. LoRA: one
    # frozen UNet in the compute dtype with fp32 adapters; the reference is that UNet with the adapters off.
    if args.lora:
        policy = reference(start, dev, args.amp_dtype)
        lora.add(policy, args.lora, args.lora_alpha, seed=args.seed)
        ref = lora.reference(policy)
    else:
        policy = unetlib.load(start, dev, torch.float32)
        ref = None if args.loss in ("sft", "mapo") else reference(start, dev, args.amp_dtype)
    dataset, encoders, empty, downsample = data.training_set(args, pairs, dev, rank, world, log)
    rpo_clip = None  # Diffusion-RPO's CLIP model, run on each batch's images unless the cache holds its embeddings
    if args.loss == "rpo":
        if args.rpo_clip and encoders is not None:
            rpo_clip = reward.load("clip", args.rpo_clip, dev, args.amp_dtype)
        weights = f"CLIP prompt + image similarity ({args.rpo_clip})" if args.rpo_clip else \
            "the UNet's text embeddings of the prompts (no --rpo_clip; Diffusion-RPO uses CLIP prompts and images)"
        log(f"RPO weights: {weights}, tau {args.rpo_tau}, each weight scales its {args.rpo_form}")
        if args.batch_size * world == 1:
            log("RPO over one pair per micro-step (all ranks together) is DPO: its matrix is 1x1 with weight 1; "
                "raise --batch_size (or the ranks) to compare across pairs")
    fingerprints = checkpoint.fingerprints(args, pairs.fingerprint() if pairs else dataset.meta.get("fingerprint"))
    latent_shape = (policy.config["in_channels"], args.resolution // downsample, args.resolution // downsample)
    per_item = dataset.per_item  # images per item: a pair's two, or one labelled image
    schedule = diffusion.scheduler_config(args.model, policy.prediction_type)  # single files: from their metadata
    alphas_cumprod = diffusion.alphas_cumprod(schedule)

    policy.gradient_checkpointing = args.gradient_checkpointing
    if args.channels_last:
        policy.to(memory_format=torch.channels_last)
        if isinstance(ref, torch.nn.Module):
            ref.to(memory_format=torch.channels_last)
    model = parallel.wrap(policy, args.fsdp, args.amp_dtype, dev)  # DDP, or FSDP2 shards (policy is sharded too)
    if args.fsdp and isinstance(ref, torch.nn.Module):
        parallel.shard(ref, args.amp_dtype)  # the same bf16 weights as the policy: eq. 14 starts at log 2
    trained = [p for p in policy.parameters() if p.requires_grad]  # a LoRA run: the adapters only
    opt = optim.build(args.optimizer, trained, args.lr, args.weight_decay, fused=device == "cuda")
    step, position = checkpoint.load(ck_path, args, fingerprints, policy, opt, rank, world, log)
    if step >= args.max_steps:  # said, not done: nothing is rewritten (but a final UNet that a crash cut short)
        log(f"nothing to do: {ck_path} is at step {step}, --max_steps is {args.max_steps}")
        if not checkpoint.outputs_done(args, step):
            checkpoint.save_outputs(policy, args, step, log)
        return dict(step=step, metrics={}, out_dir=args.out_dir)
    if rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        checkpoint.start_log(args.out_dir, step, log)
    if args.compile:
        model = torch.compile(model)
    scaler = torch.amp.GradScaler(device, enabled=args.amp_dtype == torch.float16)  # a no-op unless fp16

    # Data: optimizer step s, micro-step m, rank r reads global positions p0 + s*G + m*world*B + r*B + [0, B)
    B, G, A = args.batch_size, args.pairs_per_step, args.grad_accum
    order = [position + (s - step) * G + m * world * B + rank * B + k
             for s in range(step, args.max_steps) for m in range(A) for k in range(B)]
    workers = (4 if device == "cuda" else 0) if args.num_workers is None else args.num_workers
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=B, sampler=order, num_workers=workers,
                                              collate_fn=collate, pin_memory=device == "cuda"))
    log(f"{'SDXL' if policy.is_sdxl else 'SD1.5'} {args.loss} beta={args.beta} lr={args.lr:.3g} {args.optimizer} "
        f"{world} rank(s) x {B} pairs x {A} accum = {G} pairs/step, {len(dataset)} pairs, {args.resolution}px")

    flops, bad, seen, last, last_ckpt = None, set(), 0, {}, step
    first_step, logged, tic = step, step, time.time()
    policy.train()
    while step < args.max_steps:
        acc = {}
        for m in range(A):
            batch = next(loader)
            n_latent = per_item if args.latents == "sample" else 0
            t, eps, drop, zn = draw(batch["pos"], args.seed, latent_shape, len(alphas_cumprod), args.prompt_dropout,
                                    n_latent)
            t, eps = t.to(dev), eps.to(dev)
            z, cond = data.model_inputs(batch, drop.to(dev), dev, args, encoders, empty, zn)
            if flops is None and device == "cuda":  # per item: policy fwd+bwd (3 forwards) and ref fwd per image
                one = kernels.flops(policy, z[:1], t[:1], *(None if c is None else c[:1] for c in cond))
                flops = one * (3 if args.loss == "sft" else 3 * per_item + (0 if ref is None else per_item))
            # DDP all-reduces gradients once per optimizer step, on its last micro-step; FSDP reduce-scatters
            # every micro-step into the sharded gradients (holding whole ones between would cost their memory)
            sync = m == A - 1 or args.fsdp
            with contextlib.nullcontext() if sync else model.no_sync():
                rpo_emb = data.rpo_embeddings(batch, dev, rpo_clip) if args.rpo_clip else None  # (B, 3, P)
                loss, stats = pair_loss(model, ref, z, eps, t, cond, args, alphas_cumprod, schedule["prediction_type"],
                                        batch["label"].to(dev) if "label" in batch else None, rpo_emb)
                scale = world if args.loss == "rpo" else 1  # RPO's loss covers every rank's pairs
                scaler.scale(loss * scale / A).backward()
            for k, val in {"loss": loss, **stats}.items():
                acc[k] = acc.get(k, 0.0) + torch.as_tensor(val, dtype=torch.float64, device=dev).detach() / A
            bad.update(batch["bad"])
            seen += len(batch["pos"])
        rec, seen_all = reduce_stats(acc, seen, dev, world)
        bad = distinct(bad)  # every rank's unreadable pairs so far, each counted once
        bad_all = len(bad)
        if not math.isfinite(rec["loss"]):
            raise ValueError(f"loss is {rec['loss']} at step {step + 1}: stopped; the last good checkpoint "
                             f"(step {last_ckpt}) is kept in {ck_path if last_ckpt else 'none written yet'}")
        if bad_all > args.max_bad_frac * max(seen_all, 100):
            raise ValueError(f"{bad_all} of {seen_all} pairs of {args.data} were unreadable (more than "
                             f"--max_bad_frac {args.max_bad_frac})")
        lr = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr  # linear warmup, then constant
        for g in opt.param_groups:
            g["lr"] = lr
        scaler.unscale_(opt)
        grad_norm = parallel.full(torch.nn.utils.clip_grad_norm_(trained, args.grad_clip)).item()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        step += 1

        if step % args.log_every == 0 or step == args.max_steps:
            pairs_per_s = G * (step - logged) / (time.time() - tic)  # global
            tic, logged = time.time(), step
            last = dict(step=step, loss=rec["loss"], implicit_acc=rec.get("implicit_acc"),
                        reward_margin=rec.get("reward_margin"), model_mse=rec["model_mse"], ref_mse=rec.get("ref_mse"),
                        lr=lr, grad_norm=grad_norm, pairs_per_s=pairs_per_s, bad_pairs=bad_all,
                        mfu=flops * pairs_per_s / world / H100_BF16_PEAK if flops else None,
                        peak_mem_gb=torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None)
            log(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in last.items() if v is not None))
            if rank == 0:
                with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(last) + "\n")
        if step % args.ckpt_every == 0 or step == args.max_steps:
            checkpoint.save(ck_path, policy, opt, step, position + (step - first_step) * G, args, fingerprints, rank,
                            log)
            last_ckpt = step
    checkpoint.save_outputs(policy, args, step, log)
    return dict(step=step, metrics=last, out_dir=args.out_dir)


def reduce_stats(acc, seen, dev, world):
    """Means of the logged numbers over ranks, and the pairs seen, summed over ranks."""
    keys = sorted(acc)
    red = torch.cat([torch.stack([acc[k] for k in keys]), torch.tensor([float(seen)], dtype=torch.float64, device=dev)])
    dist.all_reduce(red)
    return {k: red[i].item() / world for i, k in enumerate(keys)}, int(red[-1].item())


# ----------------------------------------------------------------------------------------------------
# Setup

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of one H100 SXM, the MFU denominator
# --beta by loss, as each method's authors ran it (the DPO family on eq. 14's scale)
BETA = {"dpo": 5000.0, "rpo": 5000.0, "ipo": 5000.0, "hinge": 5000.0, "kto": 1000.0, "mapo": 0.1}


def resolve(args, sdxl, world, device="cpu", native=None):
    """A copy of args with the defaults filled in that depend on the model (native: its own image size; its family,
    SDXL or SD1.5, for the recipe, as the official launchers), the loss, the world size and the device."""
    args = argparse.Namespace(**vars(args))
    if args.resolution is None and native:
        args.resolution = native
    if args.beta is None:
        args.beta = BETA.get(args.loss, BETA["dpo"])
    family = {"resolution": (1024, 512), "warmup": (200, 500), "optimizer": ("adafactor", "adamw"),
              "gradient_checkpointing": (True, False)}
    if args.lora and args.optimizer is None:
        args.optimizer = "adamw"  # the adapters are small: no need for Adafactor's factored moments
    for k, (for_sdxl, for_sd15) in family.items():
        if getattr(args, k) is None:
            setattr(args, k, for_sdxl if sdxl else for_sd15)
    if args.grad_accum is None:
        args.grad_accum = max(1, 2048 // (args.batch_size * world))  # the paper's 2048 pairs per step
    args.pairs_per_step = args.batch_size * args.grad_accum * world
    if args.lr is None:
        args.lr = 1e-8 * args.pairs_per_step
    if args.cache_dir is None:
        args.cache_dir = os.path.join(args.out_dir, "cache")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    args.amp_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return args


def reference(path, dev, dtype):
    """The frozen reference: conv/linear weights in the compute dtype, norms in fp32, so that under autocast it
    computes bit for bit what the policy computes at step 0 (bf16 norm weights would shift eq. 14's argument by
    beta x rounding noise: loss 0.34 instead of log 2 at step 0 on the tiny model)."""
    ref = unetlib.load(path, dev, dtype, norm_dtype=torch.float32) if isinstance(path, str) else path
    ref.requires_grad_(False).eval()
    for m in ref.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.to(dtype)
    return ref


# ----------------------------------------------------------------------------------------------------
# Flags


def parse_args(argv=None) -> argparse.Namespace:
    """The flags; None defaults are filled by model family in resolve(); args.given lists the flags typed."""
    p = cli.Parser(description=__doc__.split("\n")[0] + " [...] = default picked by model family / world size.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", help="base model (diffusers folder or one .safetensors, SDXL or SD1.5): policy init AND frozen "
      "reference; omit for the demo")
    a("--unet_init", help="start policy AND reference from this UNet instead (e.g. an SFT run's out_dir/unet), "
      "as the official --unet_init; VAE, text encoders and noise schedule still come from --model")
    a("--data", help="Pick-a-Pic v2 parquet (file, folder or glob) or JSONL {caption,image_0,image_1,label_0}")
    a("--split", default="train", help="which split's shards a Pick-a-Pic folder gives (others are not read)")
    a("--beta", type=float, help="beta of the loss [eq. 14: 5000 as the official launchers (paper text: 2000 for "
      "SD1.5), also for rpo, ipo, hinge; kto 1000, mapo 0.1, as their authors' code]")
    a("--loss", choices=["dpo", "sft", "rpo", "ipo", "hinge", "mapo", "kto"], default="dpo",
      help="sft: MSE on the winner; rpo: Diffusion-RPO; ipo, hinge: DPO variants; mapo: reference-free; kto: "
      "single labelled images (JSONL {caption,image,label}) or pairs")
    a("--out_dir", default="out", help="unet/, metrics.jsonl, checkpoint.pt")
    a("--batch_size", type=int, default=1, help="pairs per rank per micro-step")
    a("--grad_accum", type=int, help="micro-steps per optimizer step [2048 / (batch_size*world): the paper's 2048]")
    a("--max_steps", type=int, default=2000, help="optimizer steps")
    a("--lr", type=float, help="[1e-8 * batch_size*grad_accum*world, the official launchers' --scale_lr; "
      "the paper's text says 2000/beta * 2.048e-8]")
    a("--warmup", type=int, help="linear warmup steps, then constant [200 SDXL, 500 SD1.5]")
    a("--optimizer", choices=["adamw", "adafactor"], help="[adafactor for SDXL, adamw otherwise]")
    a("--weight_decay", type=float, default=1e-2, help="decoupled weight decay (AdamW and Adafactor)")
    a("--grad_clip", type=float, default=1.0, help="max gradient norm")
    a("--resolution", type=int, help="square training size in pixels [1024 SDXL, 512 SD1.5]")
    a("--random_crop", action="store_true", help="random instead of center crop")
    a("--no_flip", action="store_true", help="no random horizontal flips")
    a("--prompt_dropout", type=float, default=0.2, help="P(prompt -> empty string), drawn once per pair")
    a("--dreamlike_only", action="store_true", help="keep pairs whose model_0 and model_1 contain 'dream' (official)")
    a("--rpo_tau", type=float, default=0.5, help="RPO temperature of the similarity weights")
    a("--rpo_clip", help="RPO weights from this CLIP model's prompt and image embeddings (a transformers CLIPModel "
      "folder), as Diffusion-RPO [without it: the UNet's text embeddings of the prompts only]")
    a("--rpo_form", choices=["logit", "loss"], default="logit",
      help="where RPO's weight enters: scaling each logit (the paper's and RPO's code) or each pair's loss")
    a("--time_ids", choices=["image", "official"], default="image",
      help="SDXL size conditioning: each image's true size and crop, or the official code's constants")
    a("--latents", choices=["mean", "sample"], default="mean",
      help="VAE posterior mean, or a sample of it (the official code)")
    a("--seed", type=int, default=0, help="data order, t, noise, dropout, crops: all keyed by (seed, pair position)")
    a("--resume", action="store_true", help="continue from out_dir/checkpoint.pt (a new run refuses to overwrite one)")
    a("--ckpt_every", type=int, default=200, help="optimizer steps between checkpoints")
    a("--log_every", type=int, default=10, help="optimizer steps between log lines")
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
    a("--max_bad_frac", type=float, default=0.01, help="stop when more than this fraction of pairs is unreadable")
    a("--save_single", action="store_true", help="also write out_dir/unet.safetensors (original single-file layout)")
    a("--tokenizer", help="tokenizer folder override for clip.load")
    a("--num_workers", type=int, help="data loader processes [4 on cuda, 0 on cpu]")
    # One parse. Every flag starts out unset, so the typed ones can be told apart (the demo keeps them).
    unset = object()
    args = argparse.Namespace(**{act.dest: unset for act in p._actions if act.default is not argparse.SUPPRESS})
    p.parse_args(argv, args)
    args.given = sorted(k for k, v in vars(args).items() if v is not unset)
    for act in p._actions:
        if getattr(args, act.dest, None) is unset:
            setattr(args, act.dest, act.default)
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
    if args.rpo_clip is not None and args.loss != "rpo":
        p.error(f"--rpo_clip weights RPO's matrix: it needs --loss rpo (got --loss {args.loss})")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.model is None:  # no model: the CPU demo, whose training runs are train() above
            parallel.setup("cpu")
            demo.run(args, train)
        else:
            train(args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        if dist.is_initialized() and dist.get_rank() > 0:
            sys.exit(1)  # rank 0 says it
        cli.fail(str(e))


if __name__ == "__main__":
    main()
