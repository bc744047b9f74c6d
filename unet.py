"""The SDXL / SD1.5 denoising UNet (diffusers' UNet2DConditionModel), from scratch, config-driven.

x (B,4,h,w) latents -> conv_in -> down levels (ResBlocks, spatial transformers on attention levels,
strided-conv downsampling) -> mid (ResBlock, transformer, ResBlock) -> up levels (ResBlocks on the
concatenated skip, transformers, nearest-neighbour upsampling) -> GroupNorm, SiLU, conv_out -> (B,4,h,w).
Every ResBlock adds the timestep embedding (SDXL: plus pooled text and size/crop conditioning); every
transformer block cross-attends to the text states. Modules are named after the diffusers layout, so a
diffusers folder loads key for key; original single-file checkpoints ("model.diffusion_model.input_blocks...")
are read and written through one table of module names generated from the config (layout_map).
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels
import weights
from weights import CheckpointError

# Config fields we implement, with diffusers' defaults (which are SD1.x's values).
DEFAULTS = dict(
    sample_size=None, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0, layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280], norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280,
    transformer_layers_per_block=1, attention_head_dim=8, num_attention_heads=None, use_linear_projection=False,
    addition_embed_type=None, addition_time_embed_dim=None, projection_class_embeddings_input_dim=None,
    upcast_attention=False)  # upcast_attention: kernels.attention always accumulates in fp32
# Fields we only support at these (default) values; anything else is a different architecture.
FIXED = dict(
    center_input_sample=False, mid_block_type="UNetMidBlock2DCrossAttn", only_cross_attention=False,
    downsample_padding=1, mid_block_scale_factor=1, dropout=0.0, act_fn="silu", conv_in_kernel=3, conv_out_kernel=3,
    reverse_transformer_layers_per_block=None, encoder_hid_dim=None, encoder_hid_dim_type=None,
    dual_cross_attention=False, class_embed_type=None, num_class_embeds=None, resnet_time_scale_shift="default",
    resnet_skip_time_act=False, resnet_out_scale_factor=1.0, time_embedding_type="positional",
    time_embedding_dim=None, time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None,
    attention_type="default", class_embeddings_concat=False, mid_block_only_cross_attention=None,
    cross_attention_norm=None, addition_embed_type_num_heads=64)
# The real hub configs (stabilityai/stable-diffusion-xl-base-1.0, runwayml/stable-diffusion-v1-5), for single files.
SD15 = dict(DEFAULTS, cross_attention_dim=768, sample_size=64)
SDXL = dict(DEFAULTS, sample_size=128, block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
PREFIX = "model.diffusion_model."  # where the UNet lives in an original single-file checkpoint


def attention(q, k, v, heads):
    """All UNet attention goes through here, so one kernel (kernels.attention: SDPA or Triton) serves all."""
    B, Lq, C = q.shape  # q (B, Lq, C), k/v (B, Lk, C): C = heads * D
    q = q.view(B, Lq, heads, -1).transpose(1, 2)  # (B, H, Lq, D), a strided view, no copy
    k = k.view(B, k.shape[1], heads, -1).transpose(1, 2)  # (B, H, Lk, D)
    v = v.view(B, v.shape[1], heads, -1).transpose(1, 2)  # (B, H, Lk, D)
    o = kernels.attention(q, k, v)  # (B, H, Lq, D), softmax(q k^T / sqrt(D)) v
    return o.transpose(1, 2).reshape(B, Lq, C)  # (B, Lq, C)


def timestep_embedding(t, dim, flip_sin_to_cos=True, shift=0.0, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps, in fp32 whatever the model dtype (as diffusers)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    args = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([args.cos(), args.sin()] if flip_sin_to_cos else [args.sin(), args.cos()], dim=-1)
    return F.pad(emb, (0, dim % 2))  # (N, dim)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in fp32 (bf16 means/variances over big groups drift)."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def run(block, *args, checkpointing=False):
    """Call a block; with checkpointing, its activations are recomputed in backward instead of stored."""
    if checkpointing:
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between, plus a (1x1-projected) skip."""

    def __init__(self, cin, cout, temb, groups, eps):
        super().__init__()
        self.norm1, self.conv1 = GroupNorm32(groups, cin, eps), nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2, self.conv2 = GroupNorm32(groups, cout, eps), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, emb):  # x (B, cin, h, w), emb (B, temb)
        h = self.conv1(F.silu(self.norm1(x)))  # (B, cout, h, w)
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Multi-head attention of x over itself (attn1) or over the text states (attn2)."""

    def __init__(self, c, ctx, heads):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(c, c, bias=False)
        self.to_k, self.to_v = nn.Linear(ctx, c, bias=False), nn.Linear(ctx, c, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # diffusers' to_out.1 is a parameterless dropout

    def forward(self, x, context=None):  # x (B, L, c), context (B, Lk, ctx)
        ctx = x if context is None else context
        return self.to_out[0](attention(self.to_q(x), self.to_k(ctx), self.to_v(ctx), self.heads))


class GEGLU(nn.Module):
    """Feed-forward input projection with a GELU gate (half the channels gate the other half)."""

    def __init__(self, c, inner):
        super().__init__()
        self.proj = nn.Linear(c, 2 * inner)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)  # (B, L, inner) each
        return h * F.gelu(gate)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward; each residual."""

    def __init__(self, c, ctx, heads):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(c), nn.LayerNorm(c), nn.LayerNorm(c)
        self.attn1, self.attn2 = Attention(c, c, heads), Attention(c, ctx, heads)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([GEGLU(c, 4 * c), nn.Identity(), nn.Linear(4 * c, c)])  # net.1 = dropout

    def forward(self, x, context):  # x (B, L, c), context (B, 77, ctx)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        h = self.norm3(x)
        for layer in self.ff.net:
            h = layer(h)
        return x + h


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel: GroupNorm, project in, transformer blocks over the h*w tokens, project out."""

    def __init__(self, c, ctx, heads, depth, groups, linear):
        super().__init__()
        if c % heads:
            raise ValueError(f"{c} channels do not split into {heads} attention heads")
        self.linear = linear
        self.norm = GroupNorm32(groups, c, eps=1e-6)
        proj = (lambda: nn.Linear(c, c)) if linear else (lambda: nn.Conv2d(c, c, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList([TransformerBlock(c, ctx, heads) for _ in range(depth)])
        self.proj_out = proj()

    def forward(self, x, context, checkpointing=False):  # x (B, c, h, w)
        B, C, H, W = x.shape
        h = self.norm(x) if self.linear else self.proj_in(self.norm(x))
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, L, c); free for channels-last input
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = run(block, h, context, checkpointing=checkpointing)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, c, h, w), channels-last strides
        return x + (h if self.linear else self.proj_out(h))


class Resample(nn.Module):
    """Strided 3x3 conv (down), or nearest x2 upsampling then 3x3 conv (up)."""

    def __init__(self, c, up):
        super().__init__()
        self.up, self.conv = up, nn.Conv2d(c, c, 3, stride=1 if up else 2, padding=1)

    def forward(self, x, size=None):
        return self.conv(F.interpolate(x, size=size, mode="nearest") if self.up else x)


class Timestep(nn.Module):
    """diffusers' TimestepEmbedding: sinusoid features -> Linear -> SiLU -> Linear."""

    def __init__(self, cin, cout):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(cin, cout), nn.Linear(cout, cout)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


def _per_level(v, n, name):
    v = list(v) if isinstance(v, (list, tuple)) else [v] * n
    if len(v) != n or any(isinstance(x, (list, tuple)) for x in v):
        raise ValueError(f"UNet config {name}={v} must be one value or one per level ({n} levels)")
    return v


def check_config(cfg):
    """Fill diffusers' defaults and refuse what this implementation does not build (one clear line)."""
    for k, v in cfg.items():
        d = FIXED.get(k, v if v in (None, False) else ...)  # unknown fields pass only when switched off
        if k in DEFAULTS or k.startswith("_") or v == d or (isinstance(v, (list, tuple)) and all(x == d for x in v)):
            continue
        raise ValueError(f"unsupported UNet config: {k}={v!r} (this UNet builds SD1.x/SDXL-style models only)")
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")}}
    for t in cfg["down_block_types"] + cfg["up_block_types"]:
        if t not in ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"):
            raise ValueError(f"unsupported UNet block type {t!r}")
    if cfg["addition_embed_type"] not in (None, "text_time"):
        raise ValueError(f"unsupported UNet config: addition_embed_type={cfg['addition_embed_type']!r}")
    if not isinstance(cfg["layers_per_block"], int):
        raise ValueError(f"unsupported UNet config: layers_per_block={cfg['layers_per_block']!r} (one int)")
    return cfg


class UNet(nn.Module):
    """UNet2DConditionModel built from its diffusers config dict (u.config), diffusers module names."""

    def __init__(self, config):
        super().__init__()
        self.config = cfg = check_config(config)
        ch, L, n = cfg["block_out_channels"], cfg["layers_per_block"], len(cfg["block_out_channels"])
        groups, eps, temb = cfg["norm_num_groups"], cfg["norm_eps"], 4 * ch[0]
        heads = _per_level(cfg["num_attention_heads"] or cfg["attention_head_dim"], n, "attention_head_dim")
        depth = _per_level(cfg["transformer_layers_per_block"], n, "transformer_layers_per_block")
        ctx = _per_level(cfg["cross_attention_dim"], n, "cross_attention_dim")
        self.is_sdxl = cfg["addition_embed_type"] == "text_time"
        self.prediction_type = "epsilon"  # what the network output means; load() reads it from the scheduler config
        self.latent_channels = cfg["in_channels"]  # of the VAE latents it denoises
        self.gradient_checkpointing = False  # training: recompute each ResBlock and TransformerBlock in backward

        def transformer(i, c):
            return SpatialTransformer(c, ctx[i], heads[i], depth[i], groups, cfg["use_linear_projection"])

        self.conv_in = nn.Conv2d(cfg["in_channels"], ch[0], 3, padding=1)
        self.time_embedding = Timestep(ch[0], temb)
        if self.is_sdxl:
            self.add_embedding = Timestep(cfg["projection_class_embeddings_input_dim"], temb)
        self.down_blocks = nn.ModuleList()
        for i, c in enumerate(ch):
            b = nn.Module()
            cin = [ch[max(i - 1, 0)]] + [c] * (L - 1)
            b.resnets = nn.ModuleList([ResBlock(cin[j], c, temb, groups, eps) for j in range(L)])
            attn = cfg["down_block_types"][i].startswith("CrossAttn")
            b.attentions = nn.ModuleList([transformer(i, c) for _ in range(L)] if attn else [])
            b.downsamplers = nn.ModuleList([Resample(c, up=False)] if i < n - 1 else [])
            self.down_blocks.append(b)
        self.mid_block = nn.Module()
        self.mid_block.resnets = nn.ModuleList([ResBlock(ch[-1], ch[-1], temb, groups, eps) for _ in range(2)])
        self.mid_block.attentions = nn.ModuleList([transformer(n - 1, ch[-1])])
        self.up_blocks = nn.ModuleList()
        for i, c in enumerate(reversed(ch)):  # level n-1-i; its resnets take the skips of that level, in reverse
            lvl, b = n - 1 - i, nn.Module()
            prev, skip_in = ch[min(lvl + 1, n - 1)], ch[max(lvl - 1, 0)]
            cin = [(prev if j == 0 else c) + (skip_in if j == L else c) for j in range(L + 1)]  # h + skip
            b.resnets = nn.ModuleList([ResBlock(cin[j], c, temb, groups, eps) for j in range(L + 1)])
            attn = cfg["up_block_types"][i].startswith("CrossAttn")
            b.attentions = nn.ModuleList([transformer(lvl, c) for _ in range(L + 1)] if attn else [])
            b.upsamplers = nn.ModuleList([Resample(c, up=True)] if i < n - 1 else [])
            self.up_blocks.append(b)
        self.conv_norm_out = GroupNorm32(groups, ch[0], eps)
        self.conv_out = nn.Conv2d(ch[0], cfg["out_channels"], 3, padding=1)

    @property
    def dtype(self):
        return self.conv_in.weight.dtype

    def forward(self, x, t, context, pooled=None, time_ids=None):
        """x (B, 4, h, w), t (B,) or scalar, context (B, 77, D); SDXL: pooled (B, 1280), time_ids (B, 6)."""
        cfg, B = self.config, x.shape[0]
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()  # SDXL at 1024px needs it
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)  # (B,)
        emb = timestep_embedding(t, cfg["block_out_channels"][0], cfg["flip_sin_to_cos"], cfg["freq_shift"])
        emb = self.time_embedding(emb.to(x.dtype))  # (B, temb)
        if self.is_sdxl:
            if pooled is None or time_ids is None:
                raise ValueError("the SDXL UNet needs pooled [B,1280] text embeddings and time_ids [B,6] "
                                 "(orig_h, orig_w, crop_top, crop_left, target_h, target_w)")
            ids = timestep_embedding(time_ids.reshape(-1), cfg["addition_time_embed_dim"], cfg["flip_sin_to_cos"],
                                     cfg["freq_shift"]).reshape(B, -1)  # (B, 6 * 256)
            emb = emb + self.add_embedding(torch.cat([pooled.to(emb.dtype), ids.to(emb.dtype)], dim=-1))

        h = self.conv_in(x)  # (B, c0, h, w)
        skips = [h]
        for b in self.down_blocks:
            for j, res in enumerate(b.resnets):
                h = run(res, h, emb, checkpointing=ckpt)
                h = b.attentions[j](h, context, ckpt) if len(b.attentions) else h
                skips.append(h)
            if len(b.downsamplers):
                h = b.downsamplers[0](h)  # (B, c, h/2, w/2)
                skips.append(h)
        h = run(self.mid_block.resnets[0], h, emb, checkpointing=ckpt)
        h = self.mid_block.attentions[0](h, context, ckpt)
        h = run(self.mid_block.resnets[1], h, emb, checkpointing=ckpt)
        for b in self.up_blocks:
            for j, res in enumerate(b.resnets):
                h = run(res, torch.cat([h, skips.pop()], dim=1), emb, checkpointing=ckpt)  # (B, c_h + c_skip, h, w)
                h = b.attentions[j](h, context, ckpt) if len(b.attentions) else h
            if len(b.upsamplers):
                h = b.upsamplers[0](h, size=skips[-1].shape[-2:])  # to the next skip's size (x2)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, h, w)


# ----------------------------------------------------------------------------------------------------
# The original single-file layout: one table of renames, generated from the config.

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
       "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
       "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
       "mid_block.attentions.0": "middle_block.1"}


def layout_map(config):
    """diffusers module prefix -> single-file module prefix (inside the transformers the names agree)."""
    cfg = check_config(config)
    L, n, m = cfg["layers_per_block"], len(cfg["block_out_channels"]), dict(TOP)

    def resnet(d, s):
        m.update({f"{d}.{a}": f"{s}.{b}" for a, b in RESNET.items()})

    for i in range(n):
        for j in range(L):  # input_blocks: [conv_in], then per level L x [resnet, (attention)], [downsample]
            k = 1 + i * (L + 1) + j
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0")
            if cfg["down_block_types"][i].startswith("CrossAttn"):
                m[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
        m[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (L + 1)}.0.op"
        attn = cfg["up_block_types"][i].startswith("CrossAttn")
        for j in range(L + 1):  # output_blocks: per level (L+1) x [resnet, (attention), (upsample on the last)]
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{i * (L + 1) + j}.0")
            if attn:
                m[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * (L + 1) + j}.1"
        m[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (L + 1) + L}.{2 if attn else 1}.conv"
    resnet("mid_block.resnets.0", "middle_block.0")
    resnet("mid_block.resnets.1", "middle_block.2")
    return m


# ----------------------------------------------------------------------------------------------------
# Loading and saving


def _open(path):
    """(config, checkpoint, our key -> checkpoint key or None when they agree, prediction_type), no weights read."""
    kind, where = weights.component(path, "unet")
    if kind == "folder":
        config = weights.read_config(where)
        if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
            raise CheckpointError(f"{where} holds a {config['_class_name']}, not a UNet2DConditionModel")
        ckpt = weights.Checkpoint(weights.find_weights(where))
        scheduler = weights.read_json(os.path.join(where, "..", "scheduler", "scheduler_config.json"), {})
        return config, ckpt, None, scheduler.get("prediction_type", "epsilon")  # the diffusers layout is ours
    ckpt = weights.Checkpoint(where)
    # a config stored by save(layout="single"), so any size round-trips; else one of the released UNets
    config = json.loads(ckpt.metadata["config"]) if "config" in ckpt.metadata else _released_config(ckpt, where)
    if not any(k.startswith(PREFIX) for k in ckpt.keys()):
        raise CheckpointError(f"{where}: no UNet weights in this file (no {PREFIX}* keys)")
    return config, ckpt, layout_map(config), ckpt.metadata.get("prediction_type", "epsilon")


def _released_config(ckpt, where) -> dict:
    """The config of a single file's UNet that stores none: SDXL's when it has SDXL's text_time embedding
    (label_emb), SD1.5's otherwise. The transformers' files, and files of no SD model, are refused by name."""
    keys = list(ckpt.keys())
    for marker, name in (("joint_blocks.", "SD3"), ("double_blocks.", "FLUX")):
        if any(k.startswith((marker, PREFIX + marker)) for k in keys):
            raise CheckpointError(f"{where}: an {name} file, not an SDXL / SD1.5 UNet")
    parts = (PREFIX, "first_stage_model.", "conditioner.", "cond_stage_model.")  # UNet, VAE, text encoders
    if not any(k.startswith(parts) for k in keys):
        raise CheckpointError(f"{where}: not an SDXL, SD1.5, SD3 or FLUX checkpoint (no {', '.join(parts[:-1])} or "
                              f"{parts[-1]} keys)")
    sdxl = any(k.startswith((PREFIX + "label_emb.", "conditioner.")) for k in keys)
    return SDXL if sdxl else SD15


def read_config(path) -> dict:
    """The UNet config of a model path (folder or single file) without reading its weights."""
    return _open(path)[0]


def load(path, device="cpu", dtype=torch.float32, norm_dtype=None, quantize=None):
    """A UNet from a diffusers folder (root or unet/) or an original single .safetensors, straight into dtype
    (norm layers into norm_dtype when given: the frozen models keep fp32 norms, see dpo.reference); quantize: its
    Linear layers stored in that format (weights.load_module)."""
    config, ckpt, table, pred = _open(path)
    try:
        with torch.device("meta"):
            u = UNet(config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if table is None:
        names = {k: k for k in ckpt.keys()}
    else:
        names = weights.renamed(ckpt, u.state_dict(), PREFIX, table, f"{ckpt.files[0]}: UNet", strict=True)
    sources = {name: (lambda k=k: ckpt[k]) for name, k in names.items()}
    norms = {f"{n}.{p}" for n, m in u.named_modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))
             for p in ("weight", "bias")}
    dtypes = {name: norm_dtype if norm_dtype is not None and name in norms else dtype for name in names}
    weights.load_module(u, sources, dtypes, device, f"UNet {path}", quantize)
    u.prediction_type = pred
    return u


def save(u, path, layout="diffusers", metadata=None):
    """diffusers layout: path/ config.json + diffusion_pytorch_model.safetensors; single: one file, original names.
    metadata: more string pairs for the safetensors header (dpo.py records the training step there)."""
    config = {"_class_name": "UNet2DConditionModel", **u.config}
    sd, metadata = u.state_dict(), dict(metadata or {})
    if layout == "diffusers":
        os.makedirs(path, exist_ok=True)
        weights.save_safetensors(sd, os.path.join(path, "diffusion_pytorch_model.safetensors"), metadata or None)
        weights.save_json(config, os.path.join(path, "config.json"))
    elif layout == "single":
        table = layout_map(u.config)
        metadata.update(config=json.dumps(config), prediction_type=u.prediction_type)
        weights.save_safetensors({PREFIX + weights.rename(k, table): v for k, v in sd.items()}, path, metadata)
    else:
        raise ValueError(f"layout must be 'diffusers' or 'single', got {layout!r}")
