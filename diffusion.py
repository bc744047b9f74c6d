"""The diffusion math that training, sampling and evaluation share: the noise schedule and the forward process.

DDPM (Ho et al. 2020) noises a clean latent x_0 in T = 1000 steps with variances beta_1..beta_T. After t steps
the fraction of signal variance left is alpha_bar_t = prod_{s<=t} (1 - beta_s), so x_t can be drawn in one go:
    q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I), that is x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, a_t = alpha_bar_t.
The UNet is trained to predict eps from x_t (prediction_type "epsilon"), or v = sqrt(alpha_bar_t) eps -
sqrt(1 - alpha_bar_t) x_0 ("v_prediction", Salimans & Ho 2022). SD1.5 and SDXL use the "scaled_linear" betas
below; a model folder's scheduler/scheduler_config.json can say otherwise.
"""
import os

import torch

from weights import read_json

# SD1.5 / SDXL's released scheduler settings; a model's scheduler/scheduler_config.json overrides them.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   timestep_spacing="leading", steps_offset=1, prediction_type="epsilon",
                   set_alpha_to_one=False, clip_sample=False)


def scheduler_config(path, prediction_type="epsilon") -> dict:
    """SD's released settings, overridden by the model folder's scheduler/scheduler_config.json when it has one;
    prediction_type is the fallback when the folder does not say (a single file's UNet knows its own)."""
    cfg = dict(SD_SCHEDULE, prediction_type=prediction_type)
    if os.path.isdir(path):
        found = read_json(os.path.join(path, "scheduler", "scheduler_config.json"), {})
        cfg.update({k: found[k] for k in SD_SCHEDULE if found.get(k) is not None})
    if cfg["prediction_type"] not in ("epsilon", "v_prediction"):
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
