"""What the step benchmark and the memory plan know of a model without reading its weights (spec), dpo.py's flags for
a step of it (settings), and the inputs that step starts from (inputs), random or empty.

    spec = models.spec("flux-dev")       # a released model by name (families.RELEASED), or a model path
    args = models.settings(spec, "cuda", lora=64)
    z, eps, t, cond = models.inputs(spec, 1, "cuda", torch.Generator().manual_seed(0), guidance=args.guidance)
"""
import os

import torch

import diffusion
import dpo
import families
import vae as vaelib
from weights import read_config

DEFAULT = "sdxl"  # the model a benchmark or a plan takes without --model: the official Diffusion-DPO run's


def released_vae(family) -> dict:
    """The family's VAE at full size: SD's AutoencoderKL with its latent channels (16, no quant convs: SD3, FLUX), or
    the family's own architecture's released config (Qwen-Image's)."""
    v = family.vae
    if v.config is not None:
        return dict(v.config)
    return dict(vaelib.FULL_CONFIG, latent_channels=v.channels, use_quant_conv=v.quant_conv,
                use_post_quant_conv=v.quant_conv)


def spec(model=None, resolution=None) -> dict:
    """A model as the plan and the benchmark take it: name, title, family (its record), config (the denoiser's),
    text (each encoder's config, in the record's order) and lengths (each one's token count, as the family's pipeline
    encodes prompts), vae (its config), resolution (the native one unless given), path (None for a released one).
    model: a released model's name (the real configs), or a path: a diffusers folder (its own configs; the family's
    released encoders and VAE where a folder lacks them) or one single file (its denoiser; released encoders, VAE)."""
    found = families.released(model or DEFAULT) if model is None or not os.path.exists(model) else None
    if found:
        fam, title, config = found
        text, vae = [e.config for e in fam.text.encoders], released_vae(fam)
        config = fam.module.check_config(config)
        return dict(name=model or DEFAULT, title=title, family=fam, config=config, text=text,
                    lengths=fam.text.lengths(config), vae=vae, resolution=resolution or fam.recipe.resolution,
                    path=None)
    fam = families.of(model)
    config = fam.module.check_config(fam.read_config(model))
    root = model if os.path.isdir(os.path.join(model, fam.subfolder)) else os.path.dirname(os.path.abspath(model))
    root = root if os.path.isdir(model) else None  # a single file: the released encoders and VAE

    def folder(sub, default):  # a component's config from the folder, or the released one
        return read_config(os.path.join(root, sub)) if root and os.path.isdir(os.path.join(root, sub)) else default
    text = [folder(e.folder, e.config) for e in fam.text.encoders]
    vae = folder("vae", released_vae(fam))
    native = config["sample_size"] * downsample(vae) if config.get("sample_size") else None
    name = os.path.basename(os.path.normpath(model))
    return dict(name=name, title=name, family=fam, config=config, text=text, lengths=fam.text.lengths(config), vae=vae,
                resolution=resolution or native or fam.recipe.resolution, path=model)


def latent_channels(vae) -> int:
    """The latent channels of a VAE of this config (z_dim: Qwen-Image's)."""
    return vae.get("latent_channels") or vae["z_dim"]


def downsample(vae) -> int:
    """How much a VAE of this config downsamples (8 for the released ones)."""
    return 2 ** (len(vae.get("block_out_channels") or vae["dim_mult"]) - 1)  # (dim_mult: Qwen-Image's levels)


def settings(s, device, **flags):
    """dpo.py's resolved flags for a step of the model on device (its family's recipe, the native resolution, the
    guidance input of its config), with flags (dpo.py's names: batch_size, lora, gradient_checkpointing, ...) set
    on top; None keeps dpo.py's default."""
    args = dpo.parse_args([])
    vars(args).update({k: v for k, v in flags.items() if v is not None})
    return dpo.resolve(args, s["family"], 1, device, s["resolution"], s["config"])


def inputs(s, batch, dev="cpu", generator=None, sigma_density="logit_normal", guidance=None, tokens=None):
    """One step's inputs on dev, as dpo.micro_batch hands them to pair_loss: clean latents z (2B, C, h, h) winners
    first, the shared eps (B, C, h, h), one t per pair (B,) (a flow model's sigma, drawn as dpo.draw draws it), and the
    denoiser's conditioning with 2B rows (its family's inputs; the model's text length, or tokens). generator:
    random values from it (the benchmark); None: empty tensors (the memory plan's shadows hold no values)."""
    fam, cfg, B, channels = s["family"], s["config"], batch, latent_channels(s["vae"])
    h = s["resolution"] // downsample(s["vae"])
    res = float(s["resolution"])

    def new(*shape):
        return torch.randn(shape, generator=generator) if generator else torch.empty(shape)
    z, eps = new(2 * B, channels, h, h), new(B, channels, h, h)
    if fam.flow:
        u = diffusion.density(sigma_density, B, generator) if generator else None
        t = diffusion.training_sigmas(u, diffusion.scheduler_config(s["path"] or "", fam)) if generator else \
            torch.empty(B)
    else:
        t = torch.randint(0, 1000, (B,), generator=generator) if generator else torch.zeros(B, dtype=torch.long)
    shapes = fam.input_shapes(cfg, tokens or fam.text.context(s["lengths"]))
    ctx = new(2 * B, *shapes["context"])
    pooled = new(2 * B, *shapes["pooled"]) if "pooled" in shapes else None
    if "mask" in shapes:  # a language model's states: every token real
        pooled = torch.ones(2 * B, *shapes["mask"], dtype=torch.bool)
    time_ids = None
    if "time_ids" in shapes:  # SDXL: the image's size, uncropped
        time_ids = torch.tensor([[res, res, 0.0, 0.0, res, res]] * 2 * B) if generator else torch.empty(2 * B, 6)
    z, eps, t, ctx, pooled, time_ids = (None if x is None else x.to(dev) for x in (z, eps, t, ctx, pooled, time_ids))
    return z, eps, t, fam.conditioning(ctx, pooled, time_ids, guidance)
