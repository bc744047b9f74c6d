"""Which denoiser a model holds, whatever its family: SD1.5's and SDXL's UNet (unet.py), SD3 / SD3.5's MMDiT
(mmdit.py) or FLUX.1's transformer (flux.py). Training, sampling and evaluation find, load and save it through
these few functions, so that a family plugs in here: where diffusers keeps it (unet/ or transformer/, which is
also the prefix of its LoRA keys), which module builds it, and whether it predicts noise or a flow velocity.
"""
import json
import os

import torch

import flux
import mmdit
import unet as unetlib
import weights
from weights import CheckpointError

FLOW = ("sd3", "flux")  # rectified-flow transformers: x_sigma = (1 - sigma) x0 + sigma eps, they predict eps - x0
MODULE = {"sd15": unetlib, "sdxl": unetlib, "sd3": mmdit, "flux": flux}
CLASS = {"UNet2DConditionModel": "unet", "SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
NAME = {"sd15": "SD1.5", "sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX"}


def unet_family(config) -> str:
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"


def family(path) -> str:
    """'sd15', 'sdxl', 'sd3' or 'flux' of a model path (a diffusers root, its unet/ or transformer/ folder, or one
    .safetensors file), read from configs and key names only."""
    if os.path.isfile(path):
        ckpt = weights.Checkpoint(path)
        if "config" in ckpt.metadata:  # unet.save(layout="single") records its config
            return unet_family(json.loads(ckpt.metadata["config"]))
        return weights.family(ckpt)
    if not os.path.isdir(path):
        raise CheckpointError(f"model path does not exist: {path}")
    for sub in ("transformer", "unet", ""):
        f = os.path.join(path, sub, "config.json")
        if os.path.isfile(f):
            config = weights.read_config(os.path.dirname(f))
            kind = CLASS.get(config.get("_class_name", "UNet2DConditionModel"))
            if kind is None:
                raise CheckpointError(f"{os.path.dirname(f)} holds a {config['_class_name']}, not a UNet or an "
                                      "SD3 / FLUX transformer")
            return unet_family(config) if kind == "unet" else kind
    raise CheckpointError(f"{path} is neither a diffusers model folder (no unet/ or transformer/) nor a denoiser "
                          "folder")


def subfolder(fam) -> str:
    """Where diffusers keeps the denoiser of a family, and the prefix of its keys in a LoRA file."""
    return "transformer" if fam in FLOW else "unet"


def read_config(path) -> dict:
    """The denoiser's config (diffusers' config.json names) without reading its weights."""
    fam = family(path)
    if fam in FLOW:
        return MODULE[fam]._open(path)[0]
    return unetlib.read_config(path)


def load(path, device="cpu", dtype=torch.float32, norm_dtype=None):
    """The denoiser of a model path, straight into dtype (norms and other non-layer tensors into norm_dtype)."""
    return MODULE[family(path)].load(path, device, dtype, norm_dtype=norm_dtype)


def build(config, fam):
    """A denoiser of this family from its config (on the current default device: meta for shadows)."""
    if fam == "sd3":
        return mmdit.MMDiT(config)
    if fam == "flux":
        return flux.Flux(config)
    return unetlib.UNet(config)


def family_of(model) -> str:
    """The family of a built denoiser."""
    if isinstance(model, mmdit.MMDiT):
        return "sd3"
    if isinstance(model, flux.Flux):
        return "flux"
    return unet_family(model.config)


def save(model, path, layout="diffusers", metadata=None):
    """path/ config.json + diffusion_pytorch_model.safetensors that diffusers' from_pretrained loads (UNet2DCondition,
    SD3Transformer2D or FluxTransformer2D); layout="single": a UNet's original single file."""
    fam = family_of(model)
    if fam in FLOW:
        if layout != "diffusers":
            raise ValueError(f"{NAME[fam]} transformers are saved in the diffusers layout only (no --save_single)")
        MODULE[fam].save(model, path, metadata)
    else:
        unetlib.save(model, path, layout, metadata)


def conditioning(family, context, pooled, time_ids=None, guidance=None) -> tuple:
    """The conditioning a family's denoiser takes after (x, t): a UNet (context, pooled, time_ids), SD3's MMDiT
    (context, pooled), FLUX (context, pooled, guidance) with guidance, FLUX-dev's scalar input, repeated per row
    (None for schnell)."""
    if family == "sd3":
        return context, pooled
    if family == "flux":
        g = None if guidance is None else torch.full((len(context),), float(guidance), device=context.device)
        return context, pooled, g
    return context, pooled, time_ids


def latent_channels(model) -> int:
    """The VAE latent's channels the denoiser takes (FLUX's in_channels count 2x2 packed patches)."""
    c = model.config["in_channels"]
    return c // 4 if isinstance(model, flux.Flux) else c


def blocks(model) -> tuple:
    """The module types FSDP shards one by one and gradient checkpointing recomputes."""
    if isinstance(model, mmdit.MMDiT):
        return (mmdit.JointBlock,)
    if isinstance(model, flux.Flux):
        return (flux.DoubleBlock, flux.SingleBlock)
    return (unetlib.ResBlock, unetlib.SpatialTransformer, unetlib.Resample)
