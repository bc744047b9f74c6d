"""The diffusion math that training, sampling and evaluation share: the noise schedule, the forward process and the
sampling loop (schedulers, classifier-free guidance, the denoising loop over a given UNet, text side and VAE), so
that training can sample (online DPO) without importing a tool.

DDPM (Ho et al. 2020) noises a clean latent x_0 in T = 1000 steps with variances beta_1..beta_T. After t steps
the fraction of signal variance left is alpha_bar_t = prod_{s<=t} (1 - beta_s), so x_t can be drawn in one go:
    q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I), that is x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, a_t = alpha_bar_t.
The UNet is trained to predict eps from x_t (prediction_type "epsilon"), or v = sqrt(alpha_bar_t) eps -
sqrt(1 - alpha_bar_t) x_0 ("v_prediction", Salimans & Ho 2022). A family's record (families.py) holds its
released schedule (SD1.5 and SDXL: the "scaled_linear" betas); a model folder's scheduler/scheduler_config.json can
say otherwise.

Sampling runs the reverse process with one of two schedulers, each written out below (no diffusers): a table of
noise levels over the chosen timesteps plus a one-line update. They reproduce diffusers' EulerDiscreteScheduler /
DDIMScheduler (eta=0) and its SDXL / SD1.5 pipelines step for step (tests/test_diffusion.py, tests/test_sample.py).
"""
import math
import os

import numpy as np
import torch

import cli
from weights import read_json


def scheduler_config(path, family, prediction_type=None) -> dict:
    """The family's released scheduler settings (its record's schedule), overridden by the model folder's
    scheduler/scheduler_config.json when it has one; prediction_type: a DDPM model's when the folder does not say
    (a single file's UNet knows its own)."""
    cfg = dict(family.schedule)
    if prediction_type and not family.flow:
        cfg["prediction_type"] = prediction_type
    if os.path.isdir(path):
        found = read_json(os.path.join(path, "scheduler", "scheduler_config.json"), {})
        cfg.update({k: found[k] for k in family.schedule if found.get(k) is not None})
    if not family.flow and cfg["prediction_type"] not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {cfg['prediction_type']!r} (epsilon or v_prediction)")
    return cfg


def alphas_cumprod(cfg) -> torch.Tensor:
    """alpha_bar_t, t = 0..T-1: the fraction of signal variance left after t noising steps (fp32, as diffusers)."""
    n, b0, b1 = cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"]
    if cfg["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float32) ** 2
    elif cfg["beta_schedule"] == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float32)
    else:
        raise ValueError(f"unsupported beta_schedule {cfg['beta_schedule']!r} (linear or scaled_linear)")
    return torch.cumprod(1.0 - betas, dim=0)  # (T,)


def forward_process(x0, eps, t, alphas_cumprod):
    """A draw of q(x_t | x_0): x0, eps (N, C, h, w), t (N,) integer timesteps -> x_t (N, C, h, w)."""
    a = alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)  # (N, 1, 1, 1) alpha_bar_t
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def target(x0, eps, t, alphas_cumprod, prediction_type):
    """What the UNet regresses on: eps, or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 for v-prediction."""
    if prediction_type == "epsilon":
        return eps
    a = alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)  # (N, 1, 1, 1)
    return a.sqrt() * eps - (1 - a).sqrt() * x0


# ----------------------------------------------------------------------------------------------------
# Schedulers: the reverse process over `steps` of the T training timesteps


def timesteps(cfg, steps) -> np.ndarray:
    """The `steps` training timesteps to visit, high noise first ("Common Diffusion Noise Schedules ...", Tab. 2)."""
    n, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    if spacing == "leading":  # 1, 1+n/s, 1+2n/s, ... (SD's convention: offset 1)
        return (np.arange(steps) * (n // steps)).round()[::-1].astype(np.float32) + cfg["steps_offset"]
    if spacing == "trailing":
        return np.arange(n, 0, -n / steps).round().astype(np.float32) - 1
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    raise ValueError(f"unsupported timestep_spacing {spacing!r} (leading, trailing or linspace)")


class Euler:
    """Euler steps on the probability-flow ODE in sigma = sqrt((1-a)/a) space (Karras et al. 2022, Alg. 1 at s_churn=0).

    Latents live at x = x0 + sigma * eps; the UNet sees x / sqrt(sigma^2 + 1), i.e. the DDPM-scaled x_t.
    """

    def __init__(self, cfg, steps):
        self.v_pred = cfg["prediction_type"] == "v_prediction"
        ac = alphas_cumprod(cfg)
        sig = ((1 - ac) / ac) ** 0.5  # (N,) sigma of every training timestep
        ts = timesteps(cfg, steps)
        # sigma at (possibly fractional) timesteps by linear interpolation, then a final sigma of 0
        sigmas = np.interp(ts, np.arange(len(sig)), sig.numpy())
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))  # (steps+1,)
        self.timesteps = torch.from_numpy(ts)
        smax = self.sigmas.max()
        # diffusers: sigma_max for linspace/trailing; for leading sqrt(sigma_max^2 + 1), the std of x0 + sigma*eps
        self.init_sigma = smax if cfg["timestep_spacing"] in ("linspace", "trailing") else (smax ** 2 + 1) ** 0.5

    def scale_input(self, x, i):
        return x / (self.sigmas[i] ** 2 + 1) ** 0.5

    def add_noise(self, x0, noise, i):
        return x0 + noise * self.sigmas[i]

    def step(self, out, i, x):
        s, s_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = out * (-s / (s ** 2 + 1) ** 0.5) + x / (s ** 2 + 1) if self.v_pred else x - s * out
        return x + (x - x0) / s * (s_next - s)  # one Euler step of dx/dsigma = (x - x0) / sigma


class DDIM:
    """Deterministic DDIM (Song et al. 2021, eta = 0): predict x0 and eps, then re-noise x0 to the previous level."""

    def __init__(self, cfg, steps):
        self.cfg, self.ac = cfg, alphas_cumprod(cfg)
        self.timesteps = torch.from_numpy(timesteps(cfg, steps).round().astype(np.int64))
        self.gap = cfg["num_train_timesteps"] // steps  # diffusers' previous timestep is always t - N // steps
        self.final = torch.tensor(1.0) if cfg["set_alpha_to_one"] else self.ac[0]
        self.init_sigma = 1.0

    def scale_input(self, x, i):
        return x

    def add_noise(self, x0, noise, i):
        a = self.ac[self.timesteps[i]]
        return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise

    def predicted(self, out, i, x):
        """(x0, eps, a, a_prev) at step i: the clean sample and the noise the model's output stands for (eq. 12)."""
        t = int(self.timesteps[i])
        a, a_prev = self.ac[t].to(x), (self.ac[t - self.gap] if t - self.gap >= 0 else self.final).to(x)
        if self.cfg["prediction_type"] == "v_prediction":
            x0, eps = a ** 0.5 * x - (1 - a) ** 0.5 * out, a ** 0.5 * out + (1 - a) ** 0.5 * x
        else:
            x0, eps = (x - (1 - a) ** 0.5 * out) / a ** 0.5, out
        if self.cfg["clip_sample"]:
            x0 = x0.clamp(-1, 1)
        return x0, eps, a, a_prev

    def step(self, out, i, x):
        x0, eps, _, a_prev = self.predicted(out, i, x)
        return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps


SCHEDULERS = {"euler": Euler, "ddim": DDIM}


# ----------------------------------------------------------------------------------------------------
# Rectified flow (SD3, FLUX): x_sigma = (1 - sigma) x_0 + sigma eps, the network predicts the velocity eps - x_0

# diffusers' FlowMatchEulerDiscreteScheduler defaults (SD3's and FLUX's records change the shift)
FLOW_SCHEDULE = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                     max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, shift_terminal=None)


def flow_forward(x0, eps, sigma):
    """The straight path from data to noise at sigma (N,) in [0, 1]: x0, eps (N, C, h, w) -> x_sigma."""
    s = sigma.to(x0.device, x0.dtype).view(-1, 1, 1, 1)  # (N, 1, 1, 1)
    return (1 - s) * x0 + s * eps


def flow_target(x0, eps):
    """The velocity d x_sigma / d sigma = eps - x0 the transformer regresses on (the same for every sigma)."""
    return eps - x0


def shifted(sigma, shift):
    """SD3's timestep shift (Esser et al. 2024, eq. 23): more time at high noise for larger images."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def stretched(sigma, terminal):
    """Qwen-Image's shift_terminal: the shifted sigmas stretched so that the last is `terminal`, the first unmoved."""
    one_minus = 1 - sigma
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


def resolution_shift(mu, sigma):
    """FLUX's resolution-dependent shift: exp(mu) / (exp(mu) + 1/sigma - 1), mu from the image's token count."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def flux_mu(tokens, cfg):
    """FLUX's mu: linear in the packed image's token count, from base_shift at 256 tokens to max_shift at 4096."""
    slope = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    return cfg["base_shift"] + slope * (tokens - cfg["base_image_seq_len"])


def density(kind, n, generator, logit_mean=0.0, logit_std=1.0, mode_scale=1.29):
    """u in (0, 1) as SD3's and FLUX's training scripts draw it (compute_density_for_timestep_sampling):
    logit_normal (the default there: sigmoid of N(mean, std), most mass at mid noise), mode, or uniform."""
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator) * logit_std + logit_mean)
    u = torch.rand(n, generator=generator)
    if kind == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if kind == "uniform":
        return u
    raise ValueError(f"unknown sigma density {kind!r} (logit_normal, mode or uniform)")


def training_sigmas(u, cfg):
    """The training sigma of each u, as the scripts take it: the scheduler's table of num_train_timesteps sigmas
    (shifted, unless the shift is dynamic, as FLUX's is) at index floor(u * N)."""
    n = cfg["num_train_timesteps"]
    table = torch.arange(n, 0, -1, dtype=torch.float32) / n  # (N,) 1 ... 1/N
    if not cfg["use_dynamic_shifting"]:
        table = shifted(table, cfg["shift"])
    return table[(u * n).long().clamp(0, n - 1)]


def noised(x0, eps, t, prediction_type, alphas_cumprod=None):
    """One draw of the forward process, for training and the implicit reward alike: (x_t, the timestep input the
    denoiser is given, its regression target). DDPM: t integer, q(x_t | x_0), eps or v; flow: t = sigma, the point
    on the straight path, sigma * 1000 (as diffusers' pipelines and scripts give it), the velocity eps - x0."""
    if prediction_type == "flow":
        return flow_forward(x0, eps, t), t * 1000, flow_target(x0, eps)
    return forward_process(x0, eps, t, alphas_cumprod), t, target(x0, eps, t, alphas_cumprod, prediction_type)


class FlowEuler:
    """Euler steps on the flow ODE dx/dsigma = v (diffusers' FlowMatchEulerDiscreteScheduler as the SD3, FLUX,
    Qwen-Image and Z-Image pipelines run it): sigmas evenly spaced from 1 to the table's last, shifted (static, or by
    mu for FLUX and Qwen-Image; then stretched to end at shift_terminal where the schedule has one), then 0.
    sigmas: the unshifted sigmas to use instead (the FLUX, Qwen-Image and Z-Image pipelines give
    linspace(1, 1/steps, steps))."""

    def __init__(self, cfg, steps, mu=None, sigmas=None):
        n = cfg["num_train_timesteps"]
        table = torch.arange(n, 0, -1, dtype=torch.float32) / n
        if not cfg["use_dynamic_shifting"]:
            table = shifted(table, cfg["shift"])
        lo, hi = table[-1].item(), table[0].item()
        sig = np.linspace(hi * n, lo * n, steps) / n  # float64, as diffusers
        if sigmas is not None:
            sig = np.asarray(sigmas, dtype=np.float32)
        if cfg["use_dynamic_shifting"]:
            if mu is None:
                raise ValueError("a dynamically shifted schedule (FLUX) needs mu (flux_mu of the token count)")
            sig = resolution_shift(mu, sig)
        else:
            sig = shifted(sig, cfg["shift"])
        if cfg.get("shift_terminal"):
            sig = stretched(sig, cfg["shift_terminal"])
        sig = torch.from_numpy(sig).float()
        self.timesteps = sig * n  # (steps,) what the transformer is given: sigma * 1000
        self.sigmas = torch.cat([sig, torch.zeros(1)])  # (steps + 1,)
        self.init_sigma = 1.0

    def scale_input(self, x, i):
        return x

    def add_noise(self, x0, noise, i):
        s = self.sigmas[i]
        return s * noise + (1 - s) * x0

    def step(self, out, i, x):
        return x + (self.sigmas[i + 1] - self.sigmas[i]) * out


# ----------------------------------------------------------------------------------------------------
# Stochastic steps with their log-probabilities (online RL: Flow-GRPO's SDE, DDPO's DDIM with eta > 0)


LOG_SQRT_2PI = float(torch.log(torch.sqrt(2 * torch.tensor(math.pi))))  # in fp32, as flow_grpo's and DDPO's code


def gaussian_log_prob(prev, mean, std):
    """log N(prev; mean, std^2) per element, then the mean over all but the batch dim (as flow_grpo and DDPO
    average it: a per-pixel log-likelihood, comparable across image sizes): (B, C, h, w) -> (B,)."""
    lp = -((prev.detach() - mean) ** 2) / (2 * std ** 2) - torch.log(std) - LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def sde_step(v, x, sigmas, i, noise_level=0.7, prev=None, generator=None, noise=None):
    """One step of Flow-GRPO's SDE (Liu et al. 2025, eq. 9) from sigmas[i] to sigmas[i+1] with the same marginals as
    the flow ODE: x' = x + [v + s^2 / (2 sigma) (x + (1 - sigma) v)] dt + s sqrt(-dt) z, s = a sqrt(sigma /
    (1 - sigma)), a = noise_level, dt = sigmas[i+1] - sigmas[i] < 0. At sigma = 1 the ratio uses sigmas[1] for sigma
    in the denominator (as flow_grpo: 1 - 1 would divide by zero). prev given: the log-probability of that step
    (training), else a new draw (sampling) of z from generator, or z = noise. v, x (B, C, h, w); sigmas 1-D (the
    schedule, 0 last).
    -> (prev, log_prob (B,), mean, std)."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 would overflow in the mean (fp64 stays fp64)
    v, x = v.to(dtype), x.to(dtype)
    sigma, nxt = sigmas[i].to(x), sigmas[i + 1].to(x)
    below = torch.where(sigma == 1, sigmas[1].to(x), sigma)
    std = torch.sqrt(sigma / (1 - below)) * noise_level  # s: the SDE's diffusion coefficient at sigma
    dt = nxt - sigma
    mean = x * (1 + std ** 2 / (2 * sigma) * dt) + v * (1 + std ** 2 * (1 - sigma) / (2 * sigma)) * dt
    if prev is None:
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype) if noise is None else noise
        prev = mean + std * torch.sqrt(-dt) * z.to(x)
    return prev, gaussian_log_prob(prev.to(dtype), mean, std * torch.sqrt(-dt)), mean, std


def ddim_step(sched, out, i, x, eta=1.0, prev=None, generator=None, noise=None):
    """DDIM with eta > 0 (Song et al. 2021, eq. 12 and 16) on a DDIM scheduler, with the log-probability of the step
    as DDPO computes it (Black et al. 2024): the mean a_prev^.5 x0 + (1 - a_prev - s^2)^.5 eps, the std
    s = eta sqrt((1 - a_prev) / (1 - a) (1 - a / a_prev)). -> (prev, log_prob (B,), mean, std)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    out, x = out.to(dtype), x.to(dtype)
    x0, eps, a, a_prev = sched.predicted(out, i, x)
    std = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
    mean = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
    if prev is None:
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype) if noise is None else noise
        prev = mean + std * z.to(x)
    return prev, gaussian_log_prob(prev.to(dtype), mean, std), mean, std


# ----------------------------------------------------------------------------------------------------
# The sampling loop: text side -> guided denoising from noise (or a noised image) -> VAE


def zeros_for_empty(path, family) -> bool:
    """SDXL's force_zeros_for_empty_prompt (the record's; model_index.json may say false): no negative prompt means
    all-zero negative embeddings."""
    index = read_json(os.path.join(path, "model_index.json"), {}) if os.path.isdir(path) else {}
    return family.sampling.zeros_for_empty and index.get("force_zeros_for_empty_prompt", True)


def sampler(family, sched_cfg, name, steps, shape):
    """The sampler as the family's pipeline runs it: Euler or DDIM for a DDPM model; for a flow model the
    flow-matching Euler, its sigmas the scheduler's or the pipeline's own (FLUX: linspace), shifted statically or
    by the image's token count (a dynamic shift, FLUX's). shape: the latents' (C, h, w)."""
    if not family.flow:
        return SCHEDULERS[name](sched_cfg, steps)
    tokens = (shape[1] // 2) * (shape[2] // 2)  # the image's length in 2x2 patches
    mu = flux_mu(tokens, sched_cfg) if sched_cfg["use_dynamic_shifting"] else None
    sigmas = np.linspace(1.0, 1 / steps, steps) if family.sampling.sigmas == "linspace" else None
    return FlowEuler(sched_cfg, steps, mu, sigmas)


def guidance_inputs(family, config, guidance, negative=True):
    """(classifier-free guidance scale, the denoiser's guidance input) from the pipeline's own guidance number: a family
    whose denoiser takes the scale as an input (FLUX-dev) has no CFG; one of its configs without that input (schnell)
    takes neither. Z-Image's pipeline guides with cond + g (cond - uncond), that is CFG at scale g + 1 (its record's
    cfg_offset); Qwen-Image's guides only when given a negative prompt (negative None: no CFG)."""
    s = family.sampling
    if s.guidance_input:
        return 1.0, (guidance if config.get("guidance_embeds") else None)
    if s.needs_negative and negative is None:
        return 1.0, None
    return guidance + s.cfg_offset, None


def pad_text(context, second, length):
    """(context (B, L, D), its second part) padded to `length` tokens: zero states, False mask. Only the families whose
    text side gives each batch its own length (Qwen-Image, Z-Image: second is a (B, L) token mask) are padded; SD's,
    SD3's and FLUX's fixed-length context and pooled vector come back as they are."""
    if second is None or second.dtype != torch.bool or context.shape[1] == length:
        return context, second
    extra = length - context.shape[1]
    return torch.nn.functional.pad(context, (0, 0, 0, extra)), torch.nn.functional.pad(second, (0, extra))


def cat_text(parts):
    """[(context, second), ...] -> one (context, second) along the batch, lengths made equal by pad_text."""
    length = max(c.shape[1] for c, _ in parts)
    parts = [pad_text(c, s, length) for c, s in parts]
    return torch.cat([c for c, _ in parts]), (None if parts[0][1] is None else torch.cat([s for _, s in parts]))


def conditions(te, prompts, negative=None, guided=True, zeros_for_empty=False, size=None, guidance_embed=None):
    """What the denoiser is conditioned on, (context, pooled, time_ids) for a UNet, (context, pooled) for SD3,
    (context, pooled, guidance) for FLUX, with [negatives; prompts] stacked along the batch when guided
    (classifier-free guidance). negative: None, one string or one per prompt; zeros_for_empty: no negative prompt
    means all-zero negative embeddings (SDXL's force_zeros_for_empty_prompt). size (height, width): SDXL's
    micro-conditioning (original size, crop top-left 0, target size). guidance_embed: FLUX-dev's guidance input."""
    ctx, pooled = te.encode(prompts)
    if guided and negative is None and zeros_for_empty:
        nctx, npooled = torch.zeros_like(ctx), (None if pooled is None else torch.zeros_like(pooled))
    elif guided:
        neg = [negative or ""] * len(prompts) if negative is None or isinstance(negative, str) else list(negative)
        if len(neg) != len(prompts):
            raise ValueError(f"{len(neg)} negative prompts for {len(prompts)} prompts")
        nctx, npooled = te.encode(neg)
    if guided:
        ctx, pooled = cat_text([(nctx, npooled), (ctx, pooled)])
    time_ids = None
    if te.family.time_ids and size is not None:
        h, w = size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]] * len(ctx), device=ctx.device).to(ctx)  # (B or 2B, 6)
    return te.family.conditioning(ctx, pooled, time_ids, guidance_embed)


def predict(unet, x, t, cond, dtype):
    """One denoiser call in the model's dtype, on the device of the conditioning; the result in fp32 (the scheduler
    math runs in fp32). t: one timestep for the batch, or (B,); cond: what conditions() gives."""
    dev = cond[0].device
    t = t.to(dev, torch.float32).expand(x.shape[0])
    return unet(x.to(dev, dtype), t, *cond).float()


def cfg(out, guidance, renorm=False):
    """Classifier-free guidance (Ho & Salimans 2022) on the output (2B, C, h, w) of one forward of [x; x] whose
    conditioning is [negatives; prompts]: uncond + guidance (cond - uncond), (B, C, h, w). renorm (Qwen-Image's
    true CFG): then rescaled to the conditional prediction's norm, per 2x2 latent patch (the pipeline's token)."""
    uncond, c = out.chunk(2)
    guided = uncond + guidance * (c - uncond)
    if not renorm:
        return guided
    B, C, h, w = c.shape
    patch_norm = lambda x: torch.linalg.vector_norm(x.view(B, C, h // 2, 2, w // 2, 2), dim=(1, 3, 5), keepdim=True)
    return (guided.view(B, C, h // 2, 2, w // 2, 2) * (patch_norm(c) / patch_norm(guided))).view(B, C, h, w)


@torch.no_grad()
def denoise(unet, sched, x, cond, guidance, dtype, start=0, progress=False, renorm=False):
    """The reverse process from x (B, C, h, w) at scheduler step `start` (0: pure noise, already scaled by
    sched.init_sigma) to the clean latents (B, C, h, w), on the CPU in fp32. With guidance > 1, cond holds
    [negatives; prompts] and each step is uncond + guidance * (cond - uncond) (Ho & Salimans 2022; renorm: cfg's)."""
    guided = guidance > 1
    steps = len(sched.timesteps)
    for i in range(start, steps):
        xin = sched.scale_input(torch.cat([x, x]) if guided else x, i)
        out = predict(unet, xin, sched.timesteps[i], cond, dtype).cpu()
        x = sched.step(cfg(out, guidance, renorm) if guided else out, i, x)
        if progress:
            cli.progress(f"sampling: step {i + 1 - start}/{steps - start}")
    if progress:  # otherwise the caller's own progress line stays open
        cli.end_progress()
    return x


def decode(vae, latents):
    """Scaled latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1] on the CPU."""
    dev = next(vae.parameters()).device
    img = vae.decode(vae.unscale(latents).to(dev, vae.dtype)).float()
    return (img / 2 + 0.5).clamp(0, 1).cpu()
