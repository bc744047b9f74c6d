"""AutoencoderKL, the VAE of Stable Diffusion 1.5, SDXL, SD3 / SD3.5 and FLUX.1, from scratch.

Images live in pixel space [B,3,H,W]; the denoiser works on latents [B,C,H/f,W/f] with f = 8 for the real models,
C = 4 for SD1.5 / SDXL and 16 for SD3 and FLUX (whose VAEs have no quant convs and centre their latents with a
shift_factor: latents = (z - shift_factor) * scaling_factor; `scale` and `unscale` below are that one formula).
The encoder is a stack of ResNet blocks with stride-2 downsampling, one single-head self-attention at the
lowest resolution, and a 1x1 conv to the mean and log-variance of a diagonal Gaussian; we return its mean
(DPO and sampling never need a sample of it). The decoder mirrors the encoder with nearest-neighbour upsampling.

Modules are named after the diffusers layout (encoder.down_blocks.0.resnets.0.norm1, ...), so a diffusers
vae/ folder loads key for key. The original single-file layout (first_stage_model.encoder.down.0.block.0.norm1,
decoder.up.N in reversed order, 1x1-conv attention weights) goes through one table of names, `ldm_table` below.
"""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import families
import kernels
from unet import GroupNorm32
from weights import (Checkpoint, CheckpointError, component, find_weights, load_module, read_config,
                     rename, renamed, save_json, save_safetensors)

# The real SD1.5 / SDXL VAE (83,653,863 parameters); single files use it unless their metadata holds a config.
FULL_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                   layers_per_block=2, norm_num_groups=32, force_upcast=True, use_quant_conv=True,
                   use_post_quant_conv=True, mid_block_add_attention=True)
SCALING_FACTOR = 0.18215  # diffusers' AutoencoderKL's, where neither a config nor a family says (SD1.5's)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = GroupNorm32(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm32(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions, head dim = C (512): kernels.sdpa (torch's SDPA), not
    the Triton kernel, which handles head dims up to 160."""

    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = GroupNorm32(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        o = kernels.sdpa(q, k, v).squeeze(1)  # (B, HW, C)
        return x + self.to_out[0](o).transpose(1, 2).reshape(B, C, H, W)


class Resample(nn.Module):
    """Halve the resolution (pad right/bottom by one, 3x3 conv stride 2) or double it (nearest, 3x3 conv)."""

    def __init__(self, c, up):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(c, c, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x):
        if self.up:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Level(nn.Module):
    """One resolution: `n` ResNet blocks, then a down- or upsampler (none at the last level)."""

    def __init__(self, cin, cout, n, groups, sample=None):  # sample: "down", "up" or None
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)])
        if sample:
            setattr(self, f"{sample}samplers", nn.ModuleList([Resample(cout, up=sample == "up")]))

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for s in getattr(self, "downsamplers", getattr(self, "upsamplers", [])):
            x = s(x)
        return x


class MidBlock(nn.Module):
    def __init__(self, c, groups, attention):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([Attention(c, groups)] if attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for a in self.attentions:
            x = a(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """image (B, 3, H, W) -> moments (B, 2*4, H/f, W/f): the Gaussian's mean and log-variance."""

    def __init__(self, cfg):
        super().__init__()
        chs, n, g = list(cfg["block_out_channels"]), cfg["layers_per_block"], cfg["norm_num_groups"]
        self.conv_in = nn.Conv2d(cfg["in_channels"], chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([Level(chs[max(i - 1, 0)], c, n, g, "down" if i < len(chs) - 1 else None)
                                          for i, c in enumerate(chs)])
        self.mid_block = MidBlock(chs[-1], g, cfg["mid_block_add_attention"])
        self.conv_norm_out = GroupNorm32(g, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg["latent_channels"], 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """latent (B, 4, h, w) -> image (B, 3, h*f, w*f); the encoder mirrored, one more ResNet block per level."""

    def __init__(self, cfg):
        super().__init__()
        chs, n, g = list(cfg["block_out_channels"])[::-1], cfg["layers_per_block"], cfg["norm_num_groups"]
        self.conv_in = nn.Conv2d(cfg["latent_channels"], chs[0], 3, padding=1)
        self.mid_block = MidBlock(chs[0], g, cfg["mid_block_add_attention"])
        self.up_blocks = nn.ModuleList([Level(chs[max(i - 1, 0)], c, n + 1, g, "up" if i < len(chs) - 1 else None)
                                        for i, c in enumerate(chs)])
        self.conv_norm_out = GroupNorm32(g, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], cfg["out_channels"], 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg, scaling_factor=SCALING_FACTOR, dtype=torch.float32, shift_factor=0.0):
        super().__init__()
        self.config = {**FULL_CONFIG, **cfg}
        self.config["scaling_factor"] = self.scaling_factor = float(scaling_factor)
        self.config["shift_factor"] = self.shift_factor = float(shift_factor or 0.0)
        self.downsample = 2 ** (len(self.config["block_out_channels"]) - 1)  # latent = image / downsample
        self.dtype = dtype  # dtype of encode/decode outputs; the weights may be fp32 (see load)
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        c = 2 * self.config["latent_channels"]
        self.quant_conv = nn.Conv2d(c, c, 1) if self.config["use_quant_conv"] else None
        self.post_quant_conv = nn.Conv2d(c // 2, c // 2, 1) if self.config["use_post_quant_conv"] else None

    @property
    def weight_dtype(self):
        return self.encoder.conv_in.weight.dtype

    def encode(self, images, std=False):
        """images (B, 3, H, W) in [-1, 1] -> latent mean (B, C, H/f, W/f), unscaled (see scale);
        std=True: (mean, standard deviation) of the diagonal Gaussian posterior, to draw a sample of it."""
        moments = self.encoder(images.to(self.weight_dtype))  # (B, 2*C, H/f, W/f): mean, log-variance
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)  # (B, C, H/f, W/f) each
        if not std:
            return mean.to(self.dtype)
        return mean.to(self.dtype), (0.5 * logvar.clamp(-30.0, 20.0)).exp().to(self.dtype)  # clamped as diffusers

    def scale(self, z):
        """Unscaled latents (encode's output) -> the denoiser's latents (unit variance, centred for SD3 / FLUX)."""
        return (z - self.shift_factor) * self.scaling_factor

    def unscale(self, latents):
        """The denoiser's latents -> what decode takes."""
        return latents / self.scaling_factor + self.shift_factor

    def decode(self, z):
        """Unscaled latents (B, C, h, w) -> images (B, 3, h*f, w*f), nominally [-1, 1] (not clamped, as diffusers)."""
        z = z.to(self.weight_dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).to(self.dtype)


# ----------------------------------------------------------------------------------------------------
# The original (ldm / single-file) layout: one rename table, applied to each diffusers name in turn.


ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_table(config):
    """Our module name -> the original layout's, for every renamed module (decoder levels count in reverse there)."""
    levels, n, m = len(config["block_out_channels"]), config["layers_per_block"], {}
    for side, blocks, sample, count in (("encoder", "down", "downsample", n), ("decoder", "up", "upsample", n + 1)):
        m[f"{side}.conv_norm_out"] = f"{side}.norm_out"
        for k in range(2):
            m[f"{side}.mid_block.resnets.{k}"] = f"{side}.mid.block_{k + 1}"
        for a, b in ATTENTION.items():
            m[f"{side}.mid_block.attentions.0.{a}"] = f"{side}.mid.attn_1.{b}"
        for i in range(levels):
            there = f"{side}.{blocks}.{i if side == 'encoder' else levels - 1 - i}"
            m[f"{side}.{blocks}_blocks.{i}.{sample}rs.0"] = f"{there}.{sample}"
            for j in range(count):
                m[f"{side}.{blocks}_blocks.{i}.resnets.{j}"] = f"{there}.block.{j}"
                m[f"{side}.{blocks}_blocks.{i}.resnets.{j}.conv_shortcut"] = f"{there}.block.{j}.nin_shortcut"
    return m


def _is_attn_linear(name):
    """The attention projections, which the original layout stores as 1x1 convs (C, C, 1, 1)."""
    return ".attentions.0.to_" in name and name.endswith(".weight")


def _single_file_config(ckpt, prefix):
    """The VAE config of a single file without one in its metadata: SD's VAE with the file's latent channels
    and quant convs (16 channels without them: SD3's and FLUX's)."""
    if "vae_config" in ckpt.metadata:
        return json.loads(ckpt.metadata["vae_config"])
    latent = ckpt.shape(prefix + "decoder.conv_in.weight")[1]
    quant = prefix + "quant_conv.weight" in ckpt
    return dict(FULL_CONFIG, latent_channels=latent, use_quant_conv=quant, use_post_quant_conv=quant)


def _factors(ckpt, prefix, cfg, where):
    """(scaling_factor, shift_factor) of a single file whose metadata holds no config: a whole model's are its
    family's (families.py); a VAE-only file's, those of the family whose VAE ships alone with its latent channels
    (FLUX's ae.safetensors: 16), else diffusers' defaults (SD3's VAE ships inside its model files)."""
    if prefix:
        fam = families.of_keys(ckpt, where)
    else:
        fam = next((f for f in families.FAMILIES if f.vae.standalone and f.vae.channels == cfg["latent_channels"]),
                   None)
    return (fam.vae.scaling_factor, fam.vae.shift_factor) if fam else (SCALING_FACTOR, 0.0)


def _single_file_layout(ckpt, path):
    """(prefix, is_ldm) of the VAE keys in a single file: a whole SD/SDXL/SD3 checkpoint, or a VAE-only file."""
    keys = ckpt.keys()
    if any(k.startswith("first_stage_model.") for k in keys):
        return "first_stage_model.", True
    if "encoder.conv_in.weight" in keys and any(k.startswith("encoder.down.") for k in keys):
        return "", True  # VAE-only file in the original layout (e.g. sdxl_vae.safetensors)
    if "encoder.conv_in.weight" in keys and any(k.startswith("encoder.down_blocks.") for k in keys):
        return "", False  # VAE-only file in the diffusers layout
    raise CheckpointError(f"{path}: holds no VAE (no first_stage_model. keys and no encoder./decoder. keys)")


def _own_module(cfg=None, ckpt=None):
    """The module of a family's own VAE architecture (its record's VAE.module) whose class a vae/config.json names,
    or whose layout a single file (weights.Checkpoint) has; None: an AutoencoderKL."""
    return next((f.vae.module for f in families.FAMILIES if f.vae.module and (
        f.vae.diffusers_class == cfg.get("_class_name") if cfg is not None else f.vae.module.in_file(ckpt))), None)


def load(path, device="cpu", dtype=torch.float32, scaling_factor=None, shift_factor=None):
    """Load a VAE from a diffusers root, its vae/ folder, or a single .safetensors file.

    With dtype=float16 and force_upcast in the config (true for the SDXL VAE, and for every single file
    without a config), the weights stay fp32 and encode/decode compute in fp32, casting their outputs to
    fp16: the SDXL VAE overflows in fp16. A fixed VAE (force_upcast: false) runs in fp16; bf16 always runs
    in bf16. scaling_factor and shift_factor override the config's / the checkpoint family's (see _factors).
    """
    kind, where = component(path, "vae")
    if kind == "folder":
        cfg = read_config(where)
        other = _own_module(cfg)
        if other is not None:  # a family's own VAE architecture (its record names its module)
            return other.load(path, device, dtype, scaling_factor, shift_factor)
        ckpt = Checkpoint(find_weights(where))
        sources = {k: (lambda k=k: ckpt[k]) for k in ckpt.keys()}
        sf, shift = cfg.get("scaling_factor", SCALING_FACTOR), cfg.get("shift_factor")
    else:
        ckpt = Checkpoint(where)
        other = _own_module(ckpt=ckpt)
        if other is not None:  # a family's own VAE architecture in its own single-file layout
            return other.load(path, device, dtype, scaling_factor, shift_factor)
        prefix, is_ldm = _single_file_layout(ckpt, where)
        cfg = _single_file_config(ckpt, prefix)
        default = _factors(ckpt, prefix, cfg, where)
        sf, shift = cfg.get("scaling_factor") or default[0], cfg.get("shift_factor", default[1])
        sources = None
    for t in cfg.get("down_block_types", []) + cfg.get("up_block_types", []):
        if t not in ("DownEncoderBlock2D", "UpDecoderBlock2D"):
            raise CheckpointError(f"{path}: unsupported VAE block type {t} (only AutoencoderKL is supported)")
    upcast = dtype == torch.float16 and cfg.get("force_upcast", True)
    with torch.device("meta"):
        model = AutoencoderKL(cfg, scaling_factor if scaling_factor is not None else sf, dtype,
                              shift_factor if shift_factor is not None else shift)
    if sources is None:  # single file: each of our names maps to one name there
        table = ldm_table(model.config) if is_ldm else {}
        names = renamed(ckpt, model.state_dict(), prefix, table, f"{where}: VAE")
        sources = {name: (lambda k=k: ckpt[k]) for name, k in names.items()}
        for name, k in names.items():
            if is_ldm and _is_attn_linear(name):
                sources[name] = lambda k=k: ckpt[k].flatten(1)  # (C, C, 1, 1) -> (C, C)
    load_module(model, sources, torch.float32 if upcast else dtype, device, f"VAE ({where})")
    return model.eval()


def downsample(path) -> int:
    """How much the VAE of the model at path downsamples (2^(levels - 1): 8 for SD's), from its config alone."""
    kind, where = component(path, "vae")
    if kind == "folder":
        cfg = read_config(where)
        other = _own_module(cfg)
        if other is not None:
            return other.downsample(path)
    else:
        ckpt = Checkpoint(where)
        other = _own_module(ckpt=ckpt)
        if other is not None:
            return other.downsample(path)
        cfg = _single_file_config(ckpt, _single_file_layout(ckpt, where)[0])
    return 2 ** (len(cfg.get("block_out_channels", FULL_CONFIG["block_out_channels"])) - 1)


def save(v, path, layout="diffusers"):
    """Write a VAE as a diffusers vae/ folder (config.json + safetensors) or one original-layout .safetensors."""
    state = v.state_dict()
    if layout == "diffusers":
        os.makedirs(path, exist_ok=True)
        levels = len(v.config["block_out_channels"])
        cfg = dict(v.config, _class_name="AutoencoderKL", act_fn="silu",
                   down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels)
        save_safetensors(state, os.path.join(path, "diffusion_pytorch_model.safetensors"))
        save_json(cfg, os.path.join(path, "config.json"))
    elif layout == "single":
        table = ldm_table(v.config)
        out = {"first_stage_model." + rename(k, table): (t[:, :, None, None] if _is_attn_linear(k) else t)
               for k, t in state.items()}
        save_safetensors(out, path, metadata={"vae_config": json.dumps(v.config)})
    else:
        raise ValueError(f"layout must be 'diffusers' or 'single', got {layout!r}")
