"""Online RL on the policy's own samples: Flow-GRPO (DDPO's GRPO for the UNets) and DiffusionNFT.

    python dpo.py --online --loss grpo --model SD3_DIR --lora 32 --prompts parti --score pickscore=DIR \
        --samples_per_prompt 16 --sample_steps 10 --eval_steps 40 --out_dir runs/grpo
    python dpo.py --online --loss nft --model SD3_DIR --lora 32 --prompts parti --score pickscore=DIR ...

Each micro-step, each rank takes --batch_size prompts (the offline loader's positions, as online DPO does) and
samples K = --samples_per_prompt images of each with the current policy, keeping the whole trajectory; the scorers
give each image its reward, and each reward is compared with its prompt's group: the advantage (r - mean) / (std +
1e-4) (objectives.group_advantages). Then the loop trains one micro-step per trained denoising step j of that batch
(so one step's graph is in memory at a time, as flow_grpo trains), and steps the optimizer after all of them:
  grpo  the sampler is stochastic, Flow-GRPO's SDE for the flow models (diffusion.sde_step, --noise_level a = 0.7),
        DDIM with eta = --noise_level for the UNets (diffusion.ddim_step), so each step has a log-probability; step j's
        loss is the PPO-clipped ratio of its probability under the policy to the sampler's, times the clipped
        advantage, plus --kl times the KL to the reference of the step's Gaussian (objectives.grpo_loss). The trained
        steps: all, a random --train_steps share of them each optimizer step (Flow-GRPO-Fast, DanceGRPO), or MixGRPO's
        --sde_window: SDE steps in a window that slides each optimizer step, the ODE elsewhere, the window trained.
  nft   no likelihoods: any sampler (the ODE by default); the final clean latents are noised afresh at step j's sigma
        and the policy's velocity is compared with the old policy's (an EMA of the trained weights, decay ramped as
        DiffusionNFT's: min(0.001 step, --old_decay)) through the implicit positive and negative policies, the reward
        r = clip(adv) / adv_clip / 2 + 1/2 mixing them, plus --kl times |v - v_ref|^2 (objectives.nft_loss).
The held-out check, its chart, the reward-hacking warning and every other online flag are online DPO's (online.py).
"""
import time

import torch

import data
import diffusion
import objectives
import online

LOSSES = ("grpo", "nft")
KL = {"grpo": 0.04, "nft": 1e-4}  # flow_grpo's SD3.5 config; DiffusionNFT's
NFT_RAMP = 0.001  # DiffusionNFT's old-policy decay: min(NFT_RAMP * step, --old_decay)


def add_flags(p):
    """dpo.py's flags of the RL losses (their defaults here and in check)."""
    a = p.add_argument
    a("--sampler", choices=["sde", "ode"], help="online: the sampler [grpo: sde; dpo, nft: ode]")
    a("--noise_level", type=float, help="online, --sampler sde: Flow-GRPO's a (flow models) or DDIM's eta (UNets) "
      "[0.7 flow, 1.0 UNet]")
    a("--clip_range", type=float, default=1e-4, help="grpo: the PPO clip of the probability ratio")
    a("--adv_clip", type=float, default=5.0, help="grpo, nft: advantages clipped to +-this")
    a("--kl", type=float, help=f"grpo, nft: the KL term's weight [grpo {KL['grpo']}, nft {KL['nft']}]")
    a("--train_steps", type=float, help="grpo, nft: the denoising steps trained per sampled batch: a share in (0, 1] "
      "drawn anew each optimizer step [1: all]")
    a("--sde_window", type=int, help="grpo: MixGRPO's sliding window of this many SDE steps (ODE elsewhere), trained")
    a("--old_decay", type=float, default=0.5, help="nft: the old policy's EMA decay, reached by 0.001 a step")
    a("--eval_steps", type=int, help="online: sampling steps of the held-out check [--sample_steps]")


FLAGS = ("sampler", "noise_level", "clip_range", "adv_clip", "kl", "train_steps", "sde_window", "old_decay")


def check(p, args):
    """Refusals at parse time, one line each (p.error); the defaults that depend on the loss."""
    rl = args.loss in LOSSES
    if rl and not args.online:
        p.error(f"--loss {args.loss} trains on the policy's own samples: add --online (with --prompts and --score)")
    named = [f for f in FLAGS if f in args.given and f not in ("sampler", "noise_level")]
    if named and not rl:
        p.error(f"--{named[0]} is a flag of --loss grpo / nft")
    if not args.online:
        return
    args.sampler = args.sampler or ("sde" if args.loss == "grpo" else "ode")
    if args.loss == "grpo" and args.sampler == "ode":
        p.error("--loss grpo needs the step probabilities of a stochastic sampler: --sampler sde (or drop it)")
    if args.noise_level is not None and args.sampler == "ode":
        p.error("--noise_level sets the stochastic sampler's noise: add --sampler sde (or drop --noise_level)")
    if args.sde_window is not None and (args.loss != "grpo" or args.sde_window > args.sample_steps):
        p.error(f"--sde_window {args.sde_window} must be at most --sample_steps {args.sample_steps} (grpo)")
    if args.train_steps is not None and not 0 < args.train_steps <= 1:
        p.error(f"--train_steps is a share of the steps in (0, 1], got {args.train_steps}")
    for k in ("clip_range", "adv_clip", "old_decay"):
        if not 0 < getattr(args, k) < (1 if k == "old_decay" else float("inf")):
            p.error(f"--{k} out of range: {getattr(args, k)}")
    if rl and args.ref_update:
        p.error(f"--ref_update moves online DPO's reference; --loss {args.loss}'s KL keeps the base: drop it")
    args.kl = KL.get(args.loss, 0.0) if args.kl is None else args.kl
    args.eval_steps = args.eval_steps or args.sample_steps


def trained_steps(n, share, window, step, seed):
    """The denoising steps trained in optimizer step `step` (and, with a window, the steps that sample with the SDE):
    all n, a share of them drawn with (seed, step), or MixGRPO's window of `window` steps sliding one step each
    optimizer step. -> (trained, sde)."""
    if window:
        start = step % (n - window + 1)
        steps = list(range(start, start + window))
        return steps, set(steps)
    if share is None or share >= 1:
        return list(range(n)), set(range(n))
    g = torch.Generator().manual_seed(data.seed_for(seed, step, 0x57E9))
    k = max(1, round(share * n))
    return sorted(torch.randperm(n, generator=g)[:k].tolist()), set(range(n))


def guided(model, x, t, cond, scale, dtype, renorm=False):
    """The velocity (eps) the sampler follows: with classifier-free guidance, uncond + scale (cond - uncond) from one
    forward of [x; x] (cond holds [negatives; prompts]); else one forward. x (B, C, h, w) -> (B, C, h, w) fp32.
    renorm: Qwen-Image's rescaled guidance (diffusion.cfg)."""
    amp = torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False)
    t = t.to(x.device, torch.float32).expand(x.shape[0] * (2 if scale > 1 else 1))
    with amp:
        out = model(torch.cat([x, x]) if scale > 1 else x, t, *cond).float()
    return diffusion.cfg(out, scale, renorm) if scale > 1 else out


def step_fn(family, sched, noise_level):
    """(out, x, i, prev, noise) -> (prev, log_prob, mean, std): the family's stochastic step."""
    if family.flow:
        return lambda out, x, i, prev=None, noise=None: diffusion.sde_step(out, x, sched.sigmas, i, noise_level,
                                                                           prev=prev, noise=noise)
    return lambda out, x, i, prev=None, noise=None: diffusion.ddim_step(sched, out, i, x, noise_level, prev=prev,
                                                                        noise=noise)


class Feed(online.Feed):
    """online.Feed whose micro-batches are (a sampled batch of groups, one denoising step j to train)."""

    def __init__(self, args, family, policy, ref, channels, dev, rank, world, log):
        super().__init__(args, family, policy, ref, channels, dev, rank, world, log)
        self.save, self.old = False, None  # (no pairs; dpo.train sets old: NFT's EMA of the trained weights)
        self.noise_level = args.noise_level if args.noise_level is not None else (0.7 if family.flow else 1.0)
        self.micro = len(trained_steps(args.sample_steps, args.train_steps, args.sde_window, 0, args.seed)[0])
        what = dict(grpo=f"Flow-GRPO (clip {args.clip_range}, KL {args.kl})" if family.flow else
                    f"DDPO's GRPO (clip {args.clip_range}, KL {args.kl})",
                    nft=f"DiffusionNFT (beta {args.beta}, old-policy decay up to {args.old_decay}, KL {args.kl})")
        log(f"online {args.loss}: {what[args.loss]}; {args.sampler} sampler ({args.sample_steps} steps"
            f"{', noise %g' % self.noise_level if args.sampler == 'sde' else ''}), {self.micro} step(s) trained per "
            f"batch, advantages clipped to {args.adv_clip}; held-out checks at {args.eval_steps} steps")

    def loader(self, position, step, world, rank, device):
        """Per sampled batch of groups, one micro-batch for each denoising step trained in its optimizer step."""
        self.begin(step)
        for s, micro in self.positions(position, step, world, rank):
            steps, sde = trained_steps(self.args.sample_steps, self.args.train_steps, self.args.sde_window, s,
                                       self.args.seed)
            group = self.sample(micro, sde)
            for k, j in enumerate(steps):
                yield dict(group=group, j=j, pos=group["pos"] if k == 0 else [], bad=[], stats=group["stats"])

    @torch.no_grad()
    def sample(self, positions, sde):
        """K trajectories of each prompt at these positions: latents (S + 1, N, C, h, w), the sampler's step
        log-probabilities (S, N), the conditioning, the rewards and their group advantages (N,)."""
        a, (te, v) = self.args, self.encoders
        scale, embed = diffusion.guidance_inputs(self.family, self.policy.config, self.guidance)
        sched = diffusion.sampler(self.family, self.sched_cfg, "ddim" if not self.family.flow else "euler",
                                  a.sample_steps, self.latent_shape)
        stochastic = step_fn(self.family, sched, self.noise_level)
        prompts = [self.dataset.prompts[self.dataset.index(p)] for p in positions for _ in range(self.K)]
        keys = [(p, k) for p in positions for k in range(self.K)]
        x = torch.cat([self.noise(p, self.K, 0x5A3) for p in positions]) * sched.init_sigma  # (N, C, h, w)
        cond = diffusion.conditions(te, prompts, None, scale > 1, self.force_zeros, (a.resolution,) * 2, embed)
        lats, lps = [x], []
        tic = time.time()
        for i in range(a.sample_steps):
            out = guided(self.policy, sched.scale_input(x, i).to(self.dev), sched.timesteps[i], cond, scale,
                         a.amp_dtype, self.family.sampling.renorm).cpu()
            if a.sampler == "sde" and i in sde:
                z = torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(
                    data.seed_for(a.seed, p, k, i, 0x5DE))) for p, k in keys])  # each image's own noise
                x, lp = stochastic(out, x, i, noise=z)[:2]
            else:
                x, lp = sched.step(out, i, x), torch.zeros(len(x))
            lats.append(x.float())
            lps.append(lp.float())
        images = torch.cat([diffusion.decode(v, z[None]) for z in x])
        self.seconds["sampling"] += time.time() - tic
        each, r = self.score(self.scorers, online.eight_bit(images)[1], prompts)  # (N,) on the 8-bit images
        groups = torch.arange(len(positions)).repeat_interleave(self.K)
        flat = [float(r[groups == g].max() == r[groups == g].min()) for g in range(len(positions))]
        self.counts += torch.tensor([float((~torch.isfinite(t)).sum()) for t in each.values()] +
                                    [sum(flat), float(len(positions))], dtype=torch.float64)
        self.rewards.extend(r.view(-1, self.K).mean(1).tolist())
        adv = objectives.group_advantages(r, groups)
        spread = torch.stack([r[groups == g].std(unbiased=False) for g in range(len(positions))]).mean()
        stats = {"reward_mean": r.mean(), "reward_std": spread, "zero_std_groups": sum(flat) / len(flat)}  # (a
        # group's std, averaged: what the advantages divide by, the same on any number of ranks)
        return dict(lats=torch.stack(lats), lps=torch.stack(lps), cond=cond, adv=adv.float(), scale=scale,
                    sched=sched, step=stochastic, pos=torch.tensor(positions),
                    stats={k: torch.as_tensor(float(v), dtype=torch.float64, device=self.dev)
                           for k, v in stats.items()})

    def loss(self, model, ref, batch):
        """The loss of one trained step j of a sampled batch: GRPO's or NFT's (module docstring)."""
        g, j, a, dev = batch["group"], batch["j"], self.args, self.dev
        sched, x = g["sched"], g["lats"][j].to(dev)
        if a.loss == "grpo":
            t = sched.timesteps[j]
            renorm = self.family.sampling.renorm
            out = guided(model, sched.scale_input(x, j), t, g["cond"], g["scale"], a.amp_dtype, renorm)
            _, lp, mean, std = g["step"](out, x, j, prev=g["lats"][j + 1].to(dev))
            ref_mean = None
            if a.kl > 0 and ref is not None:
                with torch.no_grad():
                    ref_out = guided(ref, sched.scale_input(x, j), t, g["cond"], g["scale"], a.amp_dtype, renorm)
                    ref_mean = g["step"](ref_out, x, j, prev=g["lats"][j + 1].to(dev))[2]
            return objectives.grpo_loss(lp, g["lps"][j].to(dev), g["adv"].to(dev), a.clip_range, a.adv_clip,
                                        a.kl if ref_mean is not None else 0.0, mean, ref_mean, std)
        x0, sigma = g["lats"][-1].to(dev), sched.sigmas[j].to(dev).expand(len(x))
        eps = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(  # each sample's own,
            data.seed_for(a.seed, int(p), k, j, 0x4F7))) for p in g["pos"] for k in range(self.K)]).to(dev)  # (N, ...)
        x_t = diffusion.flow_forward(x0, eps, sigma)
        cond = tuple(None if c is None else c[len(c) // 2:] if g["scale"] > 1 else c for c in g["cond"])  # no CFG
        with torch.no_grad():  # first: the old policy's weights are swapped in and out, before a graph holds them
            with self.old.swapped(self.policy):
                v_old = guided(self.policy, x_t, sigma * 1000, cond, 1.0, a.amp_dtype)
            v_ref = guided(ref, x_t, sigma * 1000, cond, 1.0, a.amp_dtype) if ref is not None and a.kl > 0 else None
        v = guided(model, x_t, sigma * 1000, cond, 1.0, a.amp_dtype)
        return objectives.nft_loss(v, v_old, v_ref, x_t, x0, sigma, g["adv"].to(dev), a.beta, a.adv_clip, a.kl)

    def after_step(self, step):
        """NFT's old policy moves toward the trained weights; then online DPO's checks (online.Feed.after_step)."""
        if self.old is not None:
            self.old.update(self.policy, min(NFT_RAMP * step, self.args.old_decay))
        super().after_step(step)
