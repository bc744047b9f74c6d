"""Qwen-Image's VAE (diffusers' AutoencoderKLQwenImage: Wan 2.1's causal video VAE, fine-tuned), from scratch, on
single frames.

It is a video VAE: every convolution is a causal 3-D convolution (a k-frame kernel, the clip padded with zero frames
in front and none behind, so frame t sees frames <= t), and its temporal resamplers also halve / double time through
extra time convolutions that diffusers runs from the second frame on, over a cache of past frames. Qwen-Image
only ever gives it one frame, (B, 3, 1, H, W), and on one frame all of that collapses exactly: the frames in front
are zeros, so a causal 3-D convolution is a 2-D convolution by its kernel's last time slice, and the time
convolutions and temporal resampling, which act from the second frame on, do nothing. This file is that exact
single-frame equivalent on (B, C, H, W) images. The parameters keep their checkpoint shapes (5-D conv weights, the
unused time convolutions included), so a checkpoint loads strictly key for key straight into the dtype; the forward
pass slices them.

Encoder: a conv in, levels of residual blocks (RMS norm over channels, SiLU, 3x3 conv, twice; a 1x1 shortcut where
the width changes) with a stride-2 downsampler between levels, a middle (residual, single-head attention, residual),
RMS norm, SiLU, a conv to 2 x 16 channels and a 1x1 quant conv: the mean and log-variance of a diagonal Gaussian.
The decoder mirrors it: a 1x1 post-quant conv, a conv in, the middle, levels of one more residual block each with a
nearest 2x upsampler that halves the width, and its image clamped to [-1, 1] as diffusers' decode clamps it.

Latents are normalised per channel (16 means and standard deviations, not one scaling factor), as Qwen-Image's
pipelines do: scale(z) = (z - latents_mean) * (1 / latents_std) = (z - shift_factor) * scaling_factor, with
per-channel (1, 16, 1, 1) tensors.

Modules are named after diffusers' keys (a vae/ folder loads key for key). ComfyUI's single file
(qwen_image_vae.safetensors) keeps Wan 2.1's original names (encoder.conv1, encoder.downsamples.N.residual.K,
middle, head, decoder.upsamples.N as one flat list, conv1 / conv2 for the quant convs): one table, `wan_table`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
import weights
from weights import CheckpointError

CLASS = "AutoencoderKLQwenImage"  # its vae/config.json's _class_name
# The released VAE's per-channel latent statistics (Qwen/Qwen-Image vae/config.json; diffusers' defaults)
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916]
# diffusers' defaults, which are the released Qwen-Image VAE's config (also Wan 2.1's VAE)
DEFAULTS = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True], dropout=0.0, input_channels=3,
                latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
QWEN_IMAGE_VAE = dict(DEFAULTS)


def check_config(config):
    """Fill diffusers' defaults; refuse what this VAE does not build, in one line."""
    cfg = {**DEFAULTS, **{k: v for k, v in config.items() if k in DEFAULTS}}
    for k in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
        cfg[k] = None if cfg[k] is None else list(cfg[k])
    if cfg["attn_scales"]:  # (diffusers' encoder cannot run them either: it calls them with a frame cache)
        raise ValueError(f"unsupported Qwen-Image VAE config: attn_scales {cfg['attn_scales']} (only [])")
    if len(cfg["temperal_downsample"]) != len(cfg["dim_mult"]) - 1:
        raise ValueError("unsupported Qwen-Image VAE config: temperal_downsample needs one flag per level but the "
                         f"last, {len(cfg['dim_mult']) - 1}")
    for k in ("latents_mean", "latents_std"):
        if len(cfg[k] or []) != cfg["z_dim"]:
            raise ValueError(f"Qwen-Image VAE config: {k} must hold z_dim = {cfg['z_dim']} numbers, got {cfg[k]}")
    return cfg


def per_channel(values):
    """A list of per-channel numbers -> a (1, C, 1, 1) fp32 tensor on the CPU (also when built on the meta device)."""
    return torch.tensor(values, dtype=torch.float32, device="cpu").view(1, -1, 1, 1)


# ----------------------------------------------------------------------------------------------------
# Blocks (on one frame: (B, C, H, W))


class FrameConv(nn.Conv3d):
    """A causal k x k x k (or 1x1x1) 3-D convolution on one frame. Its 2 * (k // 2) frames in front are zeros, so only
    the kernel's last time slice meets the frame: a 2-D convolution with 'same' spatial padding."""

    def forward(self, x):  # (B, Cin, H, W) -> (B, Cout, H, W)
        return F.conv2d(x, self.weight[:, :, -1], self.bias, padding=self.kernel_size[-1] // 2)


class RMSNorm(nn.Module):
    """x / ||x|| over the channels, times sqrt(C) and a per-channel gain (Wan's RMS_norm, without its unused bias);
    normalised in fp32 for half-precision inputs, as diffusers does."""

    def __init__(self, dim, video=True):
        super().__init__()
        self.scale = dim ** 0.5
        # the checkpoint's shape: (C, 1, 1, 1) where diffusers applies it to a clip, (C, 1, 1) in the attention
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1, 1) if video else (dim, 1, 1)))

    def forward(self, x):  # (B, C, H, W)
        normed = F.normalize(x.float(), dim=1).to(x.dtype)
        return normed * self.scale * self.gamma.view(-1, 1, 1)


class ResidualBlock(nn.Module):
    """RMS norm, SiLU, 3x3 conv, twice, plus the input (through a 1x1 conv where the width changes). The config's
    dropout (training only, 0 in the release) is not applied: the VAE is frozen."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm1 = RMSNorm(cin)
        self.conv1 = FrameConv(cin, cout, 3)
        self.norm2 = RMSNorm(cout)
        self.conv2 = FrameConv(cout, cout, 3)
        self.conv_shortcut = FrameConv(cin, cout, 1) if cin != cout else None

    def forward(self, x):  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class Attention(nn.Module):
    """Single-head self-attention over the frame's H*W positions, head dim = C (384 in the real VAE): kernels.sdpa
    (torch's SDPA), as in vae.py, since the Triton kernel takes head dims up to 160."""

    def __init__(self, dim):
        super().__init__()
        self.norm = RMSNorm(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, HW, 3C)
        q, k, v = qkv.chunk(3, dim=-1)  # (B, 1, HW, C) each
        o = kernels.sdpa(q, k, v).squeeze(1)  # (B, HW, C)
        return x + self.proj(o.transpose(1, 2).reshape(B, C, H, W))


class Resample(nn.Module):
    """Between levels: halve H and W (pad right / bottom by one, 3x3 conv of stride 2), or double them (nearest,
    3x3 conv to half the channels). A temporal one also holds a time convolution that only acts from the second
    frame on: loaded with the checkpoint, never run here."""

    def __init__(self, dim, up, temporal):
        super().__init__()
        if up:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if temporal:  # up: each frame -> two (2 x the channels, then split); down: every other frame
            self.time_conv = nn.Conv3d(dim, 2 * dim if up else dim, (3, 1, 1), stride=(1 if up else 2, 1, 1))

    def forward(self, x):  # (B, C, H, W) -> (B, C, H/2, W/2) or (B, C/2, 2H, 2W)
        return self.resample(x)


class MidBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([Attention(dim)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class UpBlock(nn.Module):
    """One decoder level: n + 1 residual blocks, then an upsampler (none at the last level)."""

    def __init__(self, cin, cout, n, temporal=None):  # temporal: None at the last level (no upsampler)
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(cin if j == 0 else cout, cout) for j in range(n)])
        if temporal is not None:
            self.upsamplers = nn.ModuleList([Resample(cout, up=True, temporal=temporal)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if hasattr(self, "upsamplers") else x


class Encoder(nn.Module):
    """image (B, 3, H, W) -> (B, 2 * z_dim, H/f, W/f), before the quant conv."""

    def __init__(self, cfg):
        super().__init__()
        dims, n = [cfg["base_dim"] * m for m in [1] + cfg["dim_mult"]], cfg["num_res_blocks"]
        self.conv_in = FrameConv(cfg["input_channels"], dims[0], 3)
        blocks = []  # one flat list, as diffusers keys it: n residual blocks per level, a downsampler between
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            blocks += [ResidualBlock(cin if j == 0 else cout, cout) for j in range(n)]
            if i < len(cfg["dim_mult"]) - 1:
                blocks.append(Resample(cout, up=False, temporal=cfg["temperal_downsample"][i]))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = FrameConv(dims[-1], 2 * cfg["z_dim"], 3)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """latent (B, z_dim, h, w) -> image (B, 3, h*f, w*f), unclamped; each upsampler halves the width, so every level
    but the first starts from half the previous level's width."""

    def __init__(self, cfg):
        super().__init__()
        mult, n = cfg["dim_mult"], cfg["num_res_blocks"]
        dims = [cfg["base_dim"] * m for m in [mult[-1]] + mult[::-1]]
        temporal = cfg["temperal_downsample"][::-1] + [None]  # the last level has no upsampler
        self.conv_in = FrameConv(cfg["z_dim"], dims[0], 3)
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = nn.ModuleList([UpBlock(cin if i == 0 else cin // 2, cout, n + 1, temporal[i])
                                        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:]))])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = FrameConv(dims[-1], cfg["input_channels"], 3)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class QwenVAE(nn.Module):
    """AutoencoderKLQwenImage on single frames, built from its diffusers config dict (v.config); vae.py's interface."""

    def __init__(self, config, dtype=torch.float32):
        super().__init__()
        self.config = cfg = check_config(config)
        self.dtype = dtype  # of encode / decode outputs
        self.downsample = 2 ** (len(cfg["dim_mult"]) - 1)  # latent = image / downsample
        self.encoder = Encoder(cfg)
        self.quant_conv = FrameConv(2 * cfg["z_dim"], 2 * cfg["z_dim"], 1)
        self.post_quant_conv = FrameConv(cfg["z_dim"], cfg["z_dim"], 1)
        self.decoder = Decoder(cfg)
        # plain tensors, not buffers (the state dict stays the checkpoint's); scale / unscale move them to the latents
        self.shift_factor = per_channel(cfg["latents_mean"])  # (1, z_dim, 1, 1)
        self.scaling_factor = 1.0 / per_channel(cfg["latents_std"])  # (1, z_dim, 1, 1), as the pipelines compute it

    @property
    def weight_dtype(self):
        return self.encoder.conv_in.weight.dtype

    def encode(self, images, std=False):
        """images (B, 3, H, W) in [-1, 1] -> latent mean (B, 16, H/f, W/f), unscaled (see scale);
        std=True: (mean, standard deviation) of the diagonal Gaussian posterior, to draw a sample of it."""
        moments = self.quant_conv(self.encoder(images.to(self.weight_dtype)))  # (B, 2*16, H/f, W/f)
        mean, logvar = moments.chunk(2, dim=1)  # (B, 16, H/f, W/f) each
        if not std:
            return mean.to(self.dtype)
        return mean.to(self.dtype), (0.5 * logvar.clamp(-30.0, 20.0)).exp().to(self.dtype)  # clamped as diffusers

    def scale(self, z):
        """Unscaled latents (encode's output) -> the denoiser's: (z - latents_mean) / latents_std per channel."""
        return (z - self.shift_factor.to(z)) * self.scaling_factor.to(z)

    def unscale(self, latents):
        """The denoiser's latents -> what decode takes (the pipelines' latents / (1 / std) + mean)."""
        return latents / self.scaling_factor.to(latents) + self.shift_factor.to(latents)

    def decode(self, z):
        """Unscaled latents (B, 16, h, w) -> images (B, 3, h*f, w*f), clamped to [-1, 1] as diffusers' decode."""
        x = self.decoder(self.post_quant_conv(z.to(self.weight_dtype)))
        return x.clamp(-1.0, 1.0).to(self.dtype)


# ----------------------------------------------------------------------------------------------------
# Wan 2.1's original layout (ComfyUI's qwen_image_vae.safetensors): one table of names


RESIDUAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
            "conv_shortcut": "shortcut"}  # Wan's residual Sequential: norm, SiLU, conv, norm, SiLU, dropout, conv


def wan_table(config):
    """Our module name -> Wan 2.1's, for every renamed module. The encoder's flat list keeps its indices; the
    decoder's levels are one flat list there too (n + 1 residual blocks, then the upsampler, per level)."""
    cfg = check_config(config)
    n, levels = cfg["num_res_blocks"], len(cfg["dim_mult"])
    m, blocks = {"quant_conv": "conv1", "post_quant_conv": "conv2"}, {}  # blocks: our residual block -> Wan's
    for side in ("encoder", "decoder"):
        m[f"{side}.conv_in"] = f"{side}.conv1"
        m[f"{side}.norm_out"], m[f"{side}.conv_out"] = f"{side}.head.0", f"{side}.head.2"  # (head.1 is the SiLU)
        m[f"{side}.mid_block.attentions.0"] = f"{side}.middle.1"
        for k in range(2):
            blocks[f"{side}.mid_block.resnets.{k}"] = f"{side}.middle.{2 * k}"
    for i in range(levels * (n + 1) - 1):
        m[f"encoder.down_blocks.{i}"] = f"encoder.downsamples.{i}"  # a downsampler's inner names are the same
        if i % (n + 1) < n:
            blocks[f"encoder.down_blocks.{i}"] = f"encoder.downsamples.{i}"
    for i in range(levels):
        for j in range(n + 1):
            blocks[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.upsamples.{i * (n + 2) + j}"
        if i < levels - 1:
            m[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.upsamples.{i * (n + 2) + n + 1}"
    for ours, theirs in blocks.items():
        m.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in RESIDUAL.items()})
    return m


def in_file(ckpt) -> bool:
    """Whether a single file (weights.Checkpoint) holds this VAE in Wan 2.1's layout (ComfyUI's qwen_image_vae)."""
    return "encoder.conv1.weight" in ckpt and "decoder.middle.0.residual.0.gamma" in ckpt


def single_file_config(ckpt, path):
    """The config of a Wan-layout single file, read off its keys and shapes (ComfyUI's files hold none); the latents'
    statistics are the released ones (none where the latent width differs: load's factors must give them)."""
    keys = set(ckpt.keys())
    if "encoder.conv1.weight" not in keys or "decoder.middle.0.residual.0.gamma" not in keys:
        raise CheckpointError(f"{path}: not a Qwen-Image VAE file in Wan 2.1's layout (no encoder.conv1.weight, "
                              "decoder.middle.0.*)")
    if any(k.startswith("decoder.upsamples.0.upsamples.") for k in keys):
        raise CheckpointError(f"{path}: a Wan 2.2 VAE (residual up blocks, 48 channels), not Qwen-Image's")
    try:
        blocks = sorted({int(k.split(".")[2]) for k in keys if k.startswith("encoder.downsamples.")})
        down = [i for i in blocks if f"encoder.downsamples.{i}.resample.1.weight" in keys]
        levels = len(down) + 1
        n = (len(blocks) - len(down)) // levels
        base, channels = ckpt.shape("encoder.conv1.weight")[:2]
        z = ckpt.shape("conv2.weight")[0]
        mult = [ckpt.shape(f"encoder.downsamples.{i * (n + 1)}.residual.2.weight")[0] // base for i in range(levels)]
    except KeyError as e:
        raise CheckpointError(f"{path}: Qwen-Image VAE key missing: {e.args[0]}") from None
    released = z == len(LATENTS_MEAN)
    return dict(DEFAULTS, base_dim=base, z_dim=z, dim_mult=mult, num_res_blocks=n, input_channels=channels,
                temperal_downsample=[f"encoder.downsamples.{i}.time_conv.weight" in keys for i in down],
                latents_mean=LATENTS_MEAN if released else None, latents_std=LATENTS_STD if released else None)


# ----------------------------------------------------------------------------------------------------
# Loading and saving


def _open(path):
    """(config, checkpoint, whether it is in Wan's layout) of a model path, no weights read."""
    kind, where = weights.component(path, "vae")
    if kind == "file":
        ckpt = weights.Checkpoint(where)
        return single_file_config(ckpt, where), ckpt, True
    config, ckpt = weights.diffusers_folder(where, CLASS)  # another class: one line naming it
    return config, ckpt, False


def read_config(path) -> dict:
    """The config of a model path (a folder's config.json, or read off a single file's shapes), no weights read."""
    try:
        return check_config(_open(path)[0])
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _factors(values, z):
    """A per-channel override (one number for all channels, or z numbers) -> a list of z floats."""
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() not in (1, z):
        raise ValueError(f"a Qwen-Image VAE factor needs 1 or {z} numbers, got {t.numel()}")
    return t.expand(z).tolist()


def load(path, device="cpu", dtype=torch.float32, scaling_factor=None, shift_factor=None):
    """A Qwen-Image VAE from a diffusers root, its vae/ folder, or a Wan-layout single .safetensors, straight into
    dtype (outputs in dtype too). scaling_factor / shift_factor (one number or one per channel) override the
    config's 1 / latents_std and latents_mean."""
    config, ckpt, wan = _open(path)
    config = dict(config)
    z = config.get("z_dim", DEFAULTS["z_dim"])
    if shift_factor is not None:
        config["latents_mean"] = _factors(shift_factor, z)
    if scaling_factor is not None:
        config["latents_std"] = [1.0 / s for s in _factors(scaling_factor, z)]
    try:
        with torch.device("meta"):
            model = QwenVAE(config, dtype)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    what = f"Qwen-Image VAE ({ckpt.files[0]})"
    if wan:
        names = weights.renamed(ckpt, model.state_dict(), "", wan_table(model.config), what, strict=True)
        sources = {name: (lambda k=k: ckpt[k]) for name, k in names.items()}
    else:
        sources = {k: (lambda k=k: ckpt[k]) for k in ckpt.keys()}
    return weights.load_module(model, sources, dtype, device, what).eval()


def downsample(path) -> int:
    """How much the VAE at path downsamples (2^(levels - 1): 8 for Qwen-Image's), from its config alone."""
    kind, where = weights.component(path, "vae")
    if kind == "file":
        cfg = single_file_config(weights.Checkpoint(where), where)
    else:
        cfg = weights.read_config(where)
        if cfg.get("_class_name", CLASS) != CLASS:
            raise CheckpointError(f"{where} holds {cfg['_class_name']}, not {CLASS}")
    return 2 ** (len(cfg.get("dim_mult", DEFAULTS["dim_mult"])) - 1)


def save(v, path, layout="diffusers"):
    """A vae/ folder (config.json + safetensors, which AutoencoderKLQwenImage.from_pretrained loads), or one
    .safetensors file in Wan 2.1's layout (layout="single", ComfyUI's; it holds no config: the latents' statistics
    read back are the released ones)."""
    state = v.state_dict()
    if layout == "diffusers":
        weights.save_diffusers(state, {"_class_name": CLASS, **v.config}, path)
    elif layout == "single":
        table = wan_table(v.config)
        weights.save_safetensors({weights.rename(k, table): t for k, t in state.items()}, path)
    else:
        raise ValueError(f"layout must be 'diffusers' or 'single', got {layout!r}")
