"""Diffusion-DPO (Wallace et al. 2023, arXiv:2311.12908): fine-tune SDXL / SD1.5 on human preference pairs.

    python dpo.py                                                   # CPU demo (demo.py), no downloads
    torchrun --nproc_per_node 8 dpo.py --model SDXL_DIR --data pickapic_v2/ --beta 5000 --out_dir runs/sdxl
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_id run1 --rdzv_backend c10d --rdzv_endpoint HOST0:29500 dpo.py ...

The algorithm (eq. numbers from the paper): a pair (x_w, x_l) of images for prompt c, x_w preferred. Both are
noised with ONE timestep t ~ U{0..999} and ONE noise eps (the forward process q(x_t | x_0)); the policy eps_theta
(trainable) and the frozen reference eps_ref (the base model) predict the noise of both; eq. 14 asks the policy to
denoise the winner better than the reference does, relative to how it denoises the loser:
    loss = -log sigmoid(-beta/2 * ((|eps - eps_theta(x_w,t)|^2 - |eps - eps_theta(x_l,t)|^2)
                                   - (|eps - eps_ref(x_w,t)|^2   - |eps - eps_ref(x_l,t)|^2)))
with per-sample mean squared errors, the paper's T*omega(lambda_t) folded into beta and the 1/2 of the official
code. Everything stays on the GPU (the official code CPU-offloads the reference, VAE and text encoders).
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

import kernels
import optim
import sample
import unet as unetlib
from data import Cache, PairDataset, Pairs, build_cache, cache_meta, collate, read_pairs, seed_for  # noqa: F401
from weights import CheckpointError

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of one H100 SXM, the MFU denominator
# flags that --resume must keep (max_steps, logging, paths and world size may change: draws are keyed by position)
RESUME_SAME = ("loss", "beta", "pairs_per_step", "lr", "warmup", "optimizer", "weight_decay", "grad_clip", "seed",
               "resolution", "random_crop", "no_flip", "prompt_dropout", "dreamlike_only", "rpo_tau")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, not usage + error
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    """Flags; None defaults are resolved by model family (SDXL / SD1.5) in resolve(). args.given = flags typed."""
    p = _Parser(description=__doc__.split("\n")[0] + " [...] = default picked by model family / world size.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", help="base model (diffusers folder or one .safetensors, SDXL or SD1.5): policy init AND frozen reference; omit for the demo")
    a("--unet_init", help="start policy AND reference from this UNet instead (e.g. an SFT run's out_dir/unet), "
      "as the official --unet_init; VAE, text encoders and noise schedule still come from --model")
    a("--data", help="Pick-a-Pic v2 parquet (file, folder or glob) or JSONL {caption,image_0,image_1,label_0}")
    a("--beta", type=float, default=5000.0, help="beta of eq. 14 (official launchers: 5000; paper text: 2000 for SD1.5)")
    a("--loss", choices=["dpo", "sft", "rpo"], default="dpo", help="dpo; sft = MSE on the preferred image; rpo = Diffusion-RPO")
    a("--out_dir", default="out", help="unet/, metrics.jsonl, checkpoint.pt")
    a("--batch_size", type=int, default=1, help="pairs per rank per micro-step")
    a("--grad_accum", type=int, help="micro-steps per optimizer step [2048 / (batch_size*world): the paper's 2048 pairs]")
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
    a("--dreamlike_only", action="store_true", help="keep pairs whose model_0 and model_1 both contain 'dream' (as the official code)")
    a("--rpo_tau", type=float, default=0.5, help="RPO temperature of the prompt-similarity weights")
    a("--seed", type=int, default=0, help="data order, t, noise, dropout, crops: all keyed by (seed, pair position)")
    a("--resume", action="store_true", help="continue from out_dir/checkpoint.pt (a fresh run refuses to overwrite one)")
    a("--ckpt_every", type=int, default=200, help="optimizer steps between checkpoints")
    a("--log_every", type=int, default=10, help="optimizer steps between log lines")
    a("--device", choices=["cpu", "cuda"], help="[cuda if available]")
    a("--dtype", choices=["fp32", "bf16", "fp16"], help="compute dtype: autocast + frozen models [bf16 on cuda, fp32 on cpu]")
    a("--gradient_checkpointing", action=argparse.BooleanOptionalAction, help="[on for SDXL]")
    a("--compile", action="store_true", help="torch.compile the policy")
    a("--channels_last", action="store_true", help="channels_last memory format for the UNets")
    a("--cache", action="store_true", help="precompute latents + text embeddings once, then train without VAE/text encoders")
    a("--cache_dir", help="[out_dir/cache]")
    a("--max_bad_frac", type=float, default=0.01, help="stop when more than this fraction of pairs is unreadable")
    a("--save_single", action="store_true", help="also write out_dir/unet.safetensors (original single-file layout)")
    a("--tokenizer", help="tokenizer folder override for clip.load")
    a("--num_workers", type=int, help="data loader processes [4 on cuda, 0 on cpu]")
    args = p.parse_args(argv)
    for act in p._actions:  # a second parse without defaults tells which flags the user typed (demo.py needs it)
        act.default = argparse.SUPPRESS
    args.given = sorted(vars(p.parse_args(argv)))
    for k in ("batch_size", "grad_accum", "max_steps", "resolution", "ckpt_every", "log_every"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k} must be >= 1, got {getattr(args, k)}")
    for k, ok in (("beta", lambda v: 0 < v < math.inf), ("lr", lambda v: v is None or 0 < v < math.inf),
                  ("prompt_dropout", lambda v: 0 <= v <= 1), ("max_bad_frac", lambda v: 0 <= v <= 1),
                  ("rpo_tau", lambda v: v > 0), ("warmup", lambda v: v is None or v >= 0), ("grad_clip", lambda v: v > 0)):
        if not ok(getattr(args, k)):
            p.error(f"--{k} has an invalid value: {getattr(args, k)}")
    return args


# ----------------------------------------------------------------------------------------------------
# The losses


def _mse(pred, target):
    """Per-sample mean squared error in fp32: (N, C, H, W) -> (N,)."""
    return (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


def dpo_loss(model_pred, ref_pred, noise, beta):
    """Eq. 14, readable (kernels.dpo_loss fuses it): preds (2B, C, H, W) winners first, noise (B, C, H, W) shared."""
    B = noise.shape[0]
    target = torch.cat([noise, noise])  # (2B, C, H, W): the same eps for winner i and loser i
    model_mse = _mse(model_pred, target)  # (2B,) |eps - eps_theta(x_t, t)|^2
    ref_mse = _mse(ref_pred, target).detach()  # (2B,) |eps - eps_ref(x_t, t)|^2, no gradient
    inner = -0.5 * beta * ((model_mse[:B] - model_mse[B:]) - (ref_mse[:B] - ref_mse[B:]))  # (B,)
    loss = -F.logsigmoid(inner).mean()
    return loss, _stats(inner, model_mse.detach(), ref_mse)


def _stats(inner, model_mse, ref_mse):
    B = inner.shape[0]
    mw, ml, rw, rl = model_mse[:B], model_mse[B:], ref_mse[:B], ref_mse[B:]
    return {"implicit_acc": (inner.detach() > 0).float().mean(),  # the policy prefers the winner more than ref does
            "reward_margin": ((rw - mw) - (rl - ml)).mean(),  # beta-free; > 0 is good
            "model_mse": model_mse.mean(), "ref_mse": ref_mse.mean()}


def rpo_loss(model_pred, ref_pred, target, beta, emb, tau, weights=None):
    """Diffusion-RPO (Gu et al. 2024, arXiv:2406.06382): winner i against EVERY loser j of the batch (all-gathered
    across ranks), weighted by w_ij = softmax_j(-(1 - cos(e_i, e_j)) / tau) of the prompts' text embeddings e.

    The official RPO code (yinyueqin/relative-preference-optimization, tau = 0.5) multiplies the logit by w_ij
    and averages over j; here w_ij weights each pair's loss and rows sum to 1, so identity weights give DPO
    exactly and unrelated prompts contribute ~0 instead of a constant log 2. Returns the loss of the whole
    gathered batch (multiply by world size before backward: DDP averages gradients).
    """
    B = target.shape[0] // 2
    model_mse, ref_mse = _mse(model_pred, target), _mse(ref_pred, target).detach()  # (2B,)
    mw, ml, rw, rl = (_gather(x) for x in (model_mse[:B], model_mse[B:], ref_mse[:B], ref_mse[B:]))  # (M,)
    inner = -0.5 * beta * ((mw[:, None] - ml[None, :]) - (rw[:, None] - rl[None, :]))  # (M, M): winner i vs loser j
    if weights is None:
        e = F.normalize(_gather(emb.float().detach()), dim=-1)  # (M, E)
        weights = torch.softmax(-(1 - e @ e.T) / tau, dim=1)  # (M, M), rows sum to 1
    loss = (weights * -F.logsigmoid(inner)).sum(1).mean()
    return loss, _stats(inner.diagonal(), torch.cat([mw, ml]).detach(), torch.cat([rw, rl]))


def _gather(x):
    """All ranks' x, concatenated in rank order; only this rank's slice carries gradient."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------------
# One pair batch: the shared noise draw, the forward process, the loss


def draw(pos, seed, shape, n_t, p_drop):
    """t, eps and prompt dropout for the pairs at global positions pos: ONE draw per pair (shared by winner and
    loser), keyed by (seed, position) alone, so world size, data workers and resume do not change it."""
    t, eps, drop = [], [], []
    for p in pos.tolist():
        g = torch.Generator().manual_seed(seed_for(seed, p, 0x7E5))
        t.append(torch.randint(0, n_t, (1,), generator=g))
        eps.append(torch.randn(shape, generator=g))
        drop.append(torch.rand(1, generator=g) < p_drop)
    return torch.cat(t), torch.stack(eps), torch.cat(drop)  # (B,), (B, C, h, w), (B,) bool


def noisy_pairs(z, eps, t, alphas_cumprod, v_pred=False):
    """The forward process q(x_t | x_0) with the SAME eps and t for winner z[i] and loser z[B+i].

    z (2B, C, h, w) winners first (or (B, ...) winners only, for SFT), eps (B, C, h, w), t (B,).
    Returns x_t, t and eps repeated to z's rows, and the regression target (eps, or v for v-prediction)."""
    k = z.shape[0] // eps.shape[0]
    eps, t = eps.repeat(k, 1, 1, 1), t.repeat(k)  # (kB, C, h, w), (kB,)
    x, target = sample.forward_process(z, eps, t, alphas_cumprod, v_pred)
    return x, t, eps, target


def pair_loss(model, ref, z, eps, t, cond, args, alphas_cumprod, prediction_type):
    """Loss and stats of one micro-batch: z (2B, C, h, w) clean latents, winners first; cond = (context, pooled,
    time_ids), each with 2B rows. SFT (the paper's baseline) is the plain denoising loss on the winners only."""
    if args.loss == "sft":
        z, cond = z[:len(eps)], tuple(None if c is None else c[:len(eps)] for c in cond)
    v_pred = prediction_type == "v_prediction"
    x, t2, eps2, target = noisy_pairs(z, eps, t, alphas_cumprod, v_pred)
    amp = torch.autocast(x.device.type, dtype=args.amp_dtype, enabled=args.amp_dtype != torch.float32)
    with amp:
        pred = model(x, t2, *cond)  # (2B, C, h, w) policy eps_theta(x_t, t, c)
    if args.loss == "sft":
        loss = _mse(pred, target).mean()
        return loss, {"model_mse": loss.detach()}
    with torch.no_grad(), amp:
        ref_pred = ref(x, t2, *cond)  # (2B, C, h, w) frozen eps_ref(x_t, t, c)
    if args.loss == "rpo":  # prompt embedding: SDXL's pooled one; SD1.5 has none, so the mean of the context states
        emb = (cond[0].mean(1) if cond[1] is None else cond[1])[:len(eps)]  # (B, E), one per pair
        return rpo_loss(pred, ref_pred, target, args.beta, emb, args.rpo_tau)
    if v_pred:  # |pred - v|^2 = |(pred - v + eps) - eps|^2: the kernel's shared-noise layout
        pred, ref_pred = pred - (target - eps2), ref_pred - (target - eps2)
    return kernels.dpo_loss(pred, ref_pred, eps, args.beta)  # eq. 14, fused in Triton on CUDA


# ----------------------------------------------------------------------------------------------------
# Setup


def setup_distributed(device):
    """One code path for 1 and N processes: torchrun's env:// rendezvous, or a 1-process group of our own."""
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def resolve(args, sdxl, world):
    """Fill the family-dependent defaults (SDXL vs SD1.5, as the official launchers) into a copy of args."""
    args = argparse.Namespace(**vars(args))
    pick = lambda k, x, s: setattr(args, k, (x if sdxl else s) if getattr(args, k) is None else getattr(args, k))
    pick("resolution", 1024, 512), pick("warmup", 200, 500), pick("optimizer", "adafactor", "adamw")
    pick("gradient_checkpointing", True, False)
    if args.grad_accum is None:
        args.grad_accum = max(1, 2048 // (args.batch_size * world))
    args.pairs_per_step = args.batch_size * args.grad_accum * world
    if args.lr is None:
        args.lr = 1e-8 * args.pairs_per_step
    if args.cache_dir is None:
        args.cache_dir = os.path.join(args.out_dir, "cache")
    return args


def reference(path, dev, dtype):
    """The frozen reference: conv/linear weights in the compute dtype, norms in fp32, so that under autocast it
    computes bit for bit what the policy computes at step 0 (bf16 norm weights would shift eq. 14's argument by
    beta x rounding noise: loss 0.34 instead of log 2 at step 0 on the tiny model)."""
    ref = unetlib.load(path, dev, torch.float32) if isinstance(path, str) else path
    ref.requires_grad_(False).eval()
    for m in ref.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.to(dtype)
    return ref


def noise_schedule(model, prediction_type="epsilon"):
    """alpha_bar_t, t = 0..999, and the prediction type: the model's scheduler config (sample.py's reader), SD's by
    default; prediction_type is the fallback when the model folder does not say."""
    cfg = sample.scheduler_config(model, prediction_type)
    return sample.alphas_cumprod(cfg), cfg["prediction_type"]  # fp32, as diffusers' DDPMScheduler


def unet_flops(u, x, t, cond):
    """FLOPs of one UNet forward on these inputs, counted op by op (attention through the PyTorch path)."""
    from torch.utils.flop_counter import FlopCounterMode
    old, os.environ["DPO_KERNELS"] = os.environ.get("DPO_KERNELS"), "torch"
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            u(x, t, *cond)
    finally:
        os.environ.pop("DPO_KERNELS") if old is None else os.environ.__setitem__("DPO_KERNELS", old)
    return fc.get_total_flops()


def rng_state():
    return dict(torch=torch.get_rng_state(), numpy=[np.random.get_state()[1].tolist()] + list(np.random.get_state()[2:]),
                python=random.getstate(), cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", np.array(s["numpy"][0], dtype=np.uint32), *s["numpy"][1:]))
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


# ----------------------------------------------------------------------------------------------------
# Training


def train(args) -> dict:
    """One run: policy + frozen reference from args.model, the loop, checkpoints, the final UNet in out_dir/unet."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = setup_distributed(device)
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    if args.model is None:
        raise ValueError("--model is required for training (run without flags for the demo)")
    ck_path = os.path.join(args.out_dir, "checkpoint.pt")
    if os.path.exists(ck_path) and not args.resume:
        raise ValueError(f"{ck_path} exists: pass --resume to continue that run or choose another --out_dir")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed_for(args.seed, rank, 0x5EED)), np.random.seed(args.seed + rank), random.seed(args.seed + rank)

    pairs = Pairs(args.data, args.dreamlike_only) if args.data else None  # the index only: images are read lazily
    # Models: fp32 master weights for the policy; the reference (and the frozen encoders) in the compute dtype
    policy = unetlib.load(args.unet_init or args.model, dev, torch.float32)
    args = resolve(args, policy.is_sdxl, world)
    args.amp_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    ref = None if args.loss == "sft" else reference(args.unet_init or args.model, dev, args.amp_dtype)
    if args.cache or pairs is None:  # train from precomputed latents + embeddings
        meta = cache_meta(args.cache_dir)
        if meta is None and pairs is None:
            raise FileNotFoundError(f"no --data and no cache in {args.cache_dir}")
        if meta is None:
            log(f"building the latent cache in {args.cache_dir}")
            build_cache(args, pairs, dev, rank, world)
        elif meta["resolution"] != args.resolution or (pairs is not None and meta["pairs"] != len(pairs)):
            raise ValueError(f"the cache in {args.cache_dir} was built for other data or resolution; use another --cache_dir")
        dataset = Cache(args.cache_dir, args.seed)
        empty = {k: None if v is None else v.to(dev) for k, v in dataset.empty.items()}
        downsample = dataset.meta["downsample"]
    else:
        import clip
        import vae as vaelib
        te, v = clip.load(args.model, dev, args.amp_dtype, tokenizer=args.tokenizer), vaelib.load(args.model, dev, torch.float32)
        dataset, downsample = PairDataset(pairs, args.resolution, args.seed, args.random_crop, not args.no_flip), v.downsample
    lat_shape = (policy.config["in_channels"], args.resolution // downsample, args.resolution // downsample)
    alphas_cumprod, prediction_type = noise_schedule(args.model, policy.prediction_type)  # single files: metadata

    opt = optim.build(args.optimizer, policy.parameters(), args.lr, args.weight_decay, fused=device == "cuda")
    step, position = 0, 0
    os.makedirs(args.out_dir, exist_ok=True)
    if args.resume and os.path.exists(ck_path):  # weights, optimizer, step, data position, RNG: as if never stopped
        ck = torch.load(ck_path, map_location="cpu", weights_only=True)
        now = json.loads(json.dumps(vars(args), default=str))  # as the checkpoint stored them
        changed = [f"--{k} {ck['args'].get(k)} -> {now[k]}" for k in RESUME_SAME if ck["args"].get(k) != now[k]]
        if changed:  # data position, draws and schedule would silently mean something else
            raise ValueError(f"--resume with flags that change the run: {', '.join(changed)}; use a new --out_dir")
        policy.load_state_dict(ck["policy"]), opt.load_state_dict(ck["optimizer"])
        step, position = ck["step"], ck["position"]
        if len(ck["rng"]) == world:
            set_rng_state(ck["rng"][rank])
        log(f"resumed {ck_path} at step {step}")
    elif args.resume:
        log(f"--resume: no checkpoint in {args.out_dir}, starting fresh")
    if rank == 0:  # metrics logged after the checkpoint we resume from would be logged again: drop them
        mpath = os.path.join(args.out_dir, "metrics.jsonl")
        lines = open(mpath).read().splitlines() if os.path.exists(mpath) and step > 0 else []
        with open(mpath + ".tmp", "w") as f:
            f.writelines(line + "\n" for line in lines if json.loads(line)["step"] <= step)
        os.replace(mpath + ".tmp", mpath)
    policy.gradient_checkpointing = args.gradient_checkpointing
    if args.channels_last:
        policy.to(memory_format=torch.channels_last), ref is not None and ref.to(memory_format=torch.channels_last)
    model = torch.nn.parallel.DistributedDataParallel(policy, device_ids=[dev.index] if device == "cuda" else None,
                                                      gradient_as_bucket_view=True)
    model = torch.compile(model) if args.compile else model
    scaler = torch.amp.GradScaler(device) if args.amp_dtype == torch.float16 else None

    # Data: optimizer step s, micro-step m, rank r reads global positions p0 + s*G + m*world*B + r*B + [0, B)
    B, G, A = args.batch_size, args.pairs_per_step, args.grad_accum
    order = [position + (s - step) * G + m * world * B + rank * B + k
             for s in range(step, args.max_steps) for m in range(A) for k in range(B)]
    workers = (4 if device == "cuda" else 0) if args.num_workers is None else args.num_workers
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=B, sampler=order, num_workers=workers,
                                              collate_fn=collate, pin_memory=device == "cuda"))
    log(f"{'SDXL' if policy.is_sdxl else 'SD1.5'} {args.loss} beta={args.beta} lr={args.lr:.3g} {args.optimizer} "
        f"{world} rank(s) x {B} pairs x {A} accum = {G} pairs/step, {len(dataset)} pairs, {args.resolution}px")

    flops, bad, seen, tic, last, last_ckpt, step0, logged = None, 0, 0, time.time(), {}, step, step, step
    policy.train()
    while step < args.max_steps:
        acc = {}
        for m in range(A):
            batch = next(loader)
            t, eps, drop = draw(batch["pos"], args.seed, lat_shape, len(alphas_cumprod), args.prompt_dropout)
            t, eps, drop = t.to(dev), eps.to(dev), drop.to(dev)
            with torch.no_grad():
                if "latents" in batch:  # cached: swap in the embedding of "" where the prompt is dropped
                    z = batch["latents"].to(dev).transpose(0, 1).flatten(0, 1).float()  # (B, 2, C, h, w) -> (2B, ...)
                    ctx = torch.where(drop[:, None, None], empty["context"], batch["context"].to(dev))
                    pooled = None if empty["pooled"] is None else torch.where(drop[:, None], empty["pooled"], batch["pooled"].to(dev))
                else:  # the VAE and the text encoders run here, on the GPU
                    px = batch["pixels"].to(dev).transpose(0, 1).flatten(0, 1)  # (2B, 3, H, W) winners first
                    with torch.autocast(device, torch.bfloat16, enabled=args.amp_dtype == torch.bfloat16):
                        z = v.encode(px).float() * v.scaling_factor  # (2B, C, h, w) scaled latent means
                    # a dropped prompt is the encoders' embedding of "" (the official code, SDXL too; not zeros)
                    ctx, pooled = te.encode(["" if d else c for c, d in zip(batch["caption"], drop.tolist())])
                tids = batch["time_ids"].to(dev).float().transpose(0, 1).flatten(0, 1) if policy.is_sdxl else None
                cond = (torch.cat([ctx, ctx]), None if pooled is None else torch.cat([pooled, pooled]), tids)  # 2B rows
            if flops is None:  # per pair: policy fwd+bwd (3 forwards) on 2 images + reference fwd on 2; SFT: 3 on 1
                one = unet_flops(policy, z[:1], t[:1], tuple(c if c is None else c[:1] for c in cond)) if device == "cuda" else 0
                flops = one * (3 if args.loss == "sft" else 8)
            sync = m == A - 1  # gradients are all-reduced once per optimizer step, on its last micro-step
            with model.no_sync() if not sync else contextlib.nullcontext():
                loss, stats = pair_loss(model, ref, z, eps, t, cond, args, alphas_cumprod, prediction_type)
                scaled = loss * (world if args.loss == "rpo" else 1) / A
                (scaler.scale(scaled) if scaler else scaled).backward()
            for k, val in {"loss": loss, **stats}.items():
                acc[k] = acc.get(k, 0.0) + torch.as_tensor(val, dtype=torch.float64, device=dev).detach() / A
            bad, seen = bad + batch["bad"], seen + len(batch["pos"])
        keys = sorted(acc)
        red = torch.stack([acc[k] for k in keys] + [torch.tensor(float(bad), dtype=torch.float64, device=dev),
                                                      torch.tensor(float(seen), dtype=torch.float64, device=dev)])
        dist.all_reduce(red)
        rec = {k: red[i].item() / world for i, k in enumerate(keys)}
        bad_all, seen_all = int(red[-2].item()), int(red[-1].item())
        if not math.isfinite(rec["loss"]):
            raise ValueError(f"loss is {rec['loss']} at step {step + 1}: stopped; the last good checkpoint "
                             f"(step {last_ckpt}) is kept in {ck_path if last_ckpt else 'none written yet'}")
        if bad_all > args.max_bad_frac * max(seen_all, 100):
            raise ValueError(f"{bad_all} of {seen_all} pairs were unreadable (more than --max_bad_frac "
                             f"{args.max_bad_frac}): check --data")
        lr = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr  # linear warmup, then constant
        for g in opt.param_groups:
            g["lr"] = lr
        if scaler:
            scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip).item()
        scaler.step(opt) if scaler else opt.step()
        scaler and scaler.update()
        opt.zero_grad(set_to_none=True)
        step += 1

        if step % args.log_every == 0 or step == args.max_steps:
            pps, tic, logged = G * (step - logged) / (time.time() - tic), time.time(), step  # global pairs/s
            last = dict(step=step, loss=rec["loss"], implicit_acc=rec.get("implicit_acc"), reward_margin=rec.get("reward_margin"),
                        model_mse=rec["model_mse"], ref_mse=rec.get("ref_mse"), lr=lr, grad_norm=grad_norm, pairs_per_s=pps,
                        mfu=flops * pps / world / H100_BF16_PEAK if flops else None, bad_pairs=bad_all,
                        peak_mem_gb=torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None)
            log(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items() if v is not None))
            if rank == 0:
                with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(last) + "\n")
        if step % args.ckpt_every == 0 or step == args.max_steps:
            save_checkpoint(ck_path, policy, opt, step, position + (step - step0) * G, args, rank)
            last_ckpt = step
    if rank == 0:
        unetlib.save(policy, os.path.join(args.out_dir, "unet"), layout="diffusers")
        if args.save_single:
            unetlib.save(policy, os.path.join(args.out_dir, "unet.safetensors"), layout="single")
        log(f"saved {os.path.join(args.out_dir, 'unet')}")
    dist.barrier()
    return dict(step=step, metrics=last, out_dir=args.out_dir)


def save_checkpoint(path, policy, opt, step, position, args, rank):
    """Everything --resume needs, in one file written atomically: a crash mid-write keeps the previous one."""
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng_state())  # every rank's RNG state, restored rank by rank
    if rank == 0:
        state = dict(policy=policy.state_dict(), optimizer=opt.state_dict(), step=step, position=position, rng=rngs,
                     schedule=dict(lr=args.lr, warmup=args.warmup), args=json.loads(json.dumps(vars(args), default=str)))
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, path)
    dist.barrier()


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.model is None:
            import demo
            demo.run(args)
        else:
            train(args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
