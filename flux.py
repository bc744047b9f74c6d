"""FLUX.1 dev / schnell's transformer (diffusers' FluxTransformer2DModel), from scratch, config-driven.

x (B,16,h,w) latents -> packed 2x2 into tokens (B, h/2 * w/2, 64) -> 19 double-stream blocks -> 38 single-stream
blocks -> final AdaLN -> a linear -> unpacked: the velocity (B,16,h,w). The conditioning vector (timestep
embedding + guidance embedding (dev) + projected CLIP pooled text) modulates every block through AdaLN-Zero, as
in SD3. A double-stream block is MMDiT's joint block: image and T5 text tokens keep their own weights and meet in
one attention over [text; image]. A single-stream block runs on that concatenated sequence with one set of
weights: attention and MLP side by side on the same modulated input, one output linear over both.

No position table: every attention rotates q and k (RoPE) by 3-axis ids, (0, row, col) for image tokens and zeros
for text, each axis owning a slice (16, 56, 56) of the head dim. qk-norm (RMS) is always on. dev is
guidance-distilled (the guidance scale is an input, embedded like the timestep); schnell is timestep-distilled
(few steps) and has no guidance embedding.

Modules are named after the diffusers layout (a transformer/ folder loads key for key); Black Forest Labs'
single files (`double_blocks.*`, fused qkv and qkv+MLP, shift-before-scale final norm) through one table.
The shared blocks (AdaLN, RMSNorm, the feed-forward, the embedders' MLPs) come from mmdit.py.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
import weights
from mmdit import AdaLN, FeedForward, MLP, heads, layer_norm, merge, modulate, qk_norms
from unet import run, timestep_embedding
from weights import CheckpointError

# diffusers' defaults (FLUX.1 schnell's hub config); dev adds the guidance embedding.
DEFAULTS = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=False, axes_dims_rope=(16, 56, 56))
SCHNELL = dict(DEFAULTS)
DEV = dict(DEFAULTS, guidance_embeds=True)
PREFIX = "model.diffusion_model."  # where some single files (ComfyUI's, whole checkpoints) keep the transformer
THETA = 10000  # RoPE's base
GUIDANCE = 3.5  # FLUX-dev's guidance input: its pipeline's default, and what diffusers' FLUX scripts train with


# ----------------------------------------------------------------------------------------------------
# Packing and rotary positions


def pack(x):
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2x2 patch one token (FluxPipeline._pack_latents)."""
    B, C, h, w = x.shape
    return x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, h // 2 * (w // 2), 4 * C)


def unpack(tokens, h, w):
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), pack's inverse (FluxPipeline._unpack_latents)."""
    B, _, C4 = tokens.shape
    return tokens.view(B, h // 2, w // 2, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C4 // 4, h, w)


def position_ids(n_text, h, w, device):
    """(n_text + h*w, 3) ids, text first: zeros for text, (0, row, col) for an h x w token grid (row-major)."""
    rows = torch.arange(h, device=device).repeat_interleave(w)  # (h*w,)
    cols = torch.arange(w, device=device).repeat(h)  # (h*w,)
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=1)  # (h*w, 3)
    return torch.cat([torch.zeros(n_text, 3, dtype=image.dtype, device=device), image])


def rope(ids, axes):
    """cos, sin (L, D) for ids (L, 3): axis i rotates its own axes[i] channels, in pairs (2j, 2j+1); fp64 angles."""
    cos, sin = [], []
    for i, d in enumerate(axes):
        freqs = THETA ** -(torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)  # (d/2,)
        angles = torch.outer(ids[:, i].double(), freqs)  # (L, d/2)
        cos.append(angles.cos().repeat_interleave(2, dim=1))  # (L, d): one angle per pair
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, dim=1).float(), torch.cat(sin, dim=1).float()


def apply_rope(x, cos, sin):
    """x (B, H, L, D) with each channel pair (2j, 2j+1) rotated by its angle; in fp32, back to x's dtype."""
    pairs = x.unflatten(-1, (-1, 2))  # (B, H, L, D/2, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (B, H, L, D): (-x1, x0) per pair
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# The model


class Attention(nn.Module):
    """q/k/v with RMS qk-norm and RoPE, one attention; a double block's also has the text stream's own weights."""

    def __init__(self, dim, n_heads, context):
        super().__init__()
        self.n_heads = n_heads
        for name in ("to_q", "to_k", "to_v"):
            setattr(self, name, nn.Linear(dim, dim))
        qk_norms(self, dim // n_heads, ["norm_q", "norm_k"])
        if context:  # a single block has no output projection here: its proj_out takes attention and MLP together
            self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # to_out.1 is diffusers' parameterless dropout
            for name in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
                setattr(self, name, nn.Linear(dim, dim))
            qk_norms(self, dim // n_heads, ["norm_added_q", "norm_added_k"])

    def project(self, x, q, k, v, norm_q, norm_k):
        """x (B, L, dim) -> q, k, v (B, H, L, D), q and k RMS-normed."""
        return norm_q(heads(q(x), self.n_heads)), norm_k(heads(k(x), self.n_heads)), heads(v(x), self.n_heads)

    def forward(self, x, cos, sin, c=None):  # x (B, Lx, dim); c (B, Lc, dim), the text stream, goes first
        q, k, v = self.project(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if c is not None:
            cq, ck, cv = self.project(c, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q,
                                      self.norm_added_k)
            q, k, v = torch.cat([cq, q], 2), torch.cat([ck, k], 2), torch.cat([cv, v], 2)  # (B, H, Lc + Lx, D)
        o = merge(kernels.attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v))  # (B, L, dim)
        if c is None:
            return o
        return self.to_out[0](o[:, c.shape[1]:]), self.to_add_out(o[:, :c.shape[1]])


class DoubleBlock(nn.Module):
    """AdaLN-Zero on both streams, the joint attention, then a feed-forward per stream (MMDiT's block, RoPE'd)."""

    def __init__(self, dim, n_heads):
        super().__init__()
        self.norm1, self.norm1_context = AdaLN(dim, 6), AdaLN(dim, 6)
        self.attn = Attention(dim, n_heads, context=True)
        self.ff, self.ff_context = FeedForward(dim), FeedForward(dim)

    def forward(self, x, c, emb, cos, sin):  # x (B, Lx, dim), c (B, Lc, dim), emb (B, dim)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(emb)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(emb)
        ax, ac = self.attn(modulate(layer_norm(x), shift, scale), cos, sin, modulate(layer_norm(c), c_shift, c_scale))
        x = x + gate[:, None] * ax
        x = x + gate_mlp[:, None] * self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp))
        c = c + c_gate[:, None] * ac
        c = c + c_gate_mlp[:, None] * self.ff_context(modulate(layer_norm(c), c_shift_mlp, c_scale_mlp))
        return x, c


class SingleBlock(nn.Module):
    """One stream over [text; image]: attention and a 4x tanh-GELU MLP side by side, one output linear over both."""

    def __init__(self, dim, n_heads):
        super().__init__()
        self.norm = AdaLN(dim, 3)
        self.proj_mlp = nn.Linear(dim, 4 * dim)
        self.proj_out = nn.Linear(5 * dim, dim)
        self.attn = Attention(dim, n_heads, context=False)

    def forward(self, x, emb, cos, sin):  # x (B, L, dim), emb (B, dim)
        shift, scale, gate = self.norm(emb)
        h = modulate(layer_norm(x), shift, scale)
        both = torch.cat([self.attn(h, cos, sin), F.gelu(self.proj_mlp(h), approximate="tanh")], dim=2)  # (B, L, 5dim)
        return x + gate[:, None] * self.proj_out(both)


def check_config(config):
    """Fill diffusers' defaults; refuse what this FLUX does not build, in one line."""
    cfg = {**DEFAULTS, **{k: v for k, v in config.items() if k in DEFAULTS}}
    cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
    axes = cfg["axes_dims_rope"]
    if cfg["patch_size"] != 1:
        raise ValueError(f"unsupported FLUX config: patch_size={cfg['patch_size']} (1: the latents come packed 2x2)")
    if len(axes) != 3 or any(d % 2 for d in axes) or sum(axes) != cfg["attention_head_dim"]:
        raise ValueError(f"unsupported FLUX config: axes_dims_rope {axes} must be 3 even sizes summing to "
                         f"attention_head_dim {cfg['attention_head_dim']}")
    if cfg["in_channels"] % 4 or (cfg["out_channels"] or cfg["in_channels"]) % 4:
        raise ValueError("unsupported FLUX config: in_channels / out_channels must be 4 x the latent channels")
    return cfg


class Flux(nn.Module):
    """FluxTransformer2DModel built from its diffusers config dict (m.config), diffusers module names."""

    def __init__(self, config):
        super().__init__()
        self.config = cfg = check_config(config)
        dim, n_heads = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["num_attention_heads"]
        self.gradient_checkpointing = False  # training: recompute each block in backward
        self.prediction_type = "flow"  # the output is the velocity eps - x0
        self.latent_channels = cfg["in_channels"] // 4  # of the VAE latents it denoises: it packs 2x2 of them
        self.time_text_embed = nn.Module()
        self.time_text_embed.timestep_embedder = MLP(256, dim)
        if cfg["guidance_embeds"]:
            self.time_text_embed.guidance_embedder = MLP(256, dim)
        self.time_text_embed.text_embedder = MLP(cfg["pooled_projection_dim"], dim)
        self.context_embedder = nn.Linear(cfg["joint_attention_dim"], dim)
        self.x_embedder = nn.Linear(cfg["in_channels"], dim)
        self.transformer_blocks = nn.ModuleList([DoubleBlock(dim, n_heads) for _ in range(cfg["num_layers"])])
        self.single_transformer_blocks = nn.ModuleList([SingleBlock(dim, n_heads)
                                                        for _ in range(cfg["num_single_layers"])])
        self.norm_out = AdaLN(dim, 2)  # (scale, shift)
        self.proj_out = nn.Linear(dim, cfg["out_channels"] or cfg["in_channels"])

    @property
    def dtype(self):
        return self.proj_out.weight.dtype

    def forward(self, x, t, context, pooled, guidance=None):
        """x (B, 16, h, w), t (B,) = sigma * 1000, context (B, L, 4096), pooled (B, 768), guidance (B,): the plain
        scale (dev only) -> velocity (B, 16, h, w)."""
        B, _, h, w = x.shape
        if self.config["guidance_embeds"] and guidance is None:
            raise ValueError("this FLUX model (dev) is guidance-distilled: pass guidance, the scale (e.g. 3.5)")
        if not self.config["guidance_embeds"] and guidance is not None:
            raise ValueError("this FLUX model (schnell) has no guidance embedding: pass guidance=None")
        if h % 2 or w % 2:
            raise ValueError(f"FLUX packs 2x2 latent patches: h and w must be even, got {h}x{w}")
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        embed = self.time_text_embed
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)  # (B,)
        emb = embed.timestep_embedder(timestep_embedding(t, 256, True, 0).to(pooled.dtype))  # (B, dim)
        if guidance is not None:
            g = torch.as_tensor(guidance, dtype=torch.float32, device=x.device).reshape(-1).expand(B) * 1000
            emb = emb + embed.guidance_embedder(timestep_embedding(g, 256, True, 0).to(pooled.dtype))
        emb = emb + embed.text_embedder(pooled)
        img = self.x_embedder(pack(x))  # (B, h/2 * w/2, dim)
        txt = self.context_embedder(context)  # (B, L, dim)
        cos, sin = rope(position_ids(txt.shape[1], h // 2, w // 2, x.device), self.config["axes_dims_rope"])
        for block in self.transformer_blocks:
            img, txt = run(block, img, txt, emb, cos, sin, checkpointing=ckpt)
        both = torch.cat([txt, img], dim=1)  # (B, L + h/2 * w/2, dim)
        for block in self.single_transformer_blocks:
            both = run(block, both, emb, cos, sin, checkpointing=ckpt)
        scale, shift = self.norm_out(emb)
        out = self.proj_out(modulate(layer_norm(both[:, txt.shape[1]:]), shift, scale))  # (B, h/2 * w/2, 4C)
        return unpack(out, h, w)


# ----------------------------------------------------------------------------------------------------
# Black Forest Labs' single-file layout: our module -> (its module, which rows of a fused tensor); one table.
# Rows are (start, stop) in units of the width, concatenated in order; None: the whole tensor. {i}: block index.

BFL = {
    "x_embedder": ("img_in", None), "context_embedder": ("txt_in", None),
    "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", None),
    "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", None),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", None),
    "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", None),
    "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", None),
    "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", None),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", [(1, 2), (0, 1)]),  # BFL: shift then scale
    "proj_out": ("final_layer.linear", None),
    "transformer_blocks.{i}.norm1.linear": ("double_blocks.{i}.img_mod.lin", None),
    "transformer_blocks.{i}.norm1_context.linear": ("double_blocks.{i}.txt_mod.lin", None),
    "transformer_blocks.{i}.attn.to_q": ("double_blocks.{i}.img_attn.qkv", [(0, 1)]),
    "transformer_blocks.{i}.attn.to_k": ("double_blocks.{i}.img_attn.qkv", [(1, 2)]),
    "transformer_blocks.{i}.attn.to_v": ("double_blocks.{i}.img_attn.qkv", [(2, 3)]),
    "transformer_blocks.{i}.attn.add_q_proj": ("double_blocks.{i}.txt_attn.qkv", [(0, 1)]),
    "transformer_blocks.{i}.attn.add_k_proj": ("double_blocks.{i}.txt_attn.qkv", [(1, 2)]),
    "transformer_blocks.{i}.attn.add_v_proj": ("double_blocks.{i}.txt_attn.qkv", [(2, 3)]),
    "transformer_blocks.{i}.attn.norm_q": ("double_blocks.{i}.img_attn.norm.query_norm", None),
    "transformer_blocks.{i}.attn.norm_k": ("double_blocks.{i}.img_attn.norm.key_norm", None),
    "transformer_blocks.{i}.attn.norm_added_q": ("double_blocks.{i}.txt_attn.norm.query_norm", None),
    "transformer_blocks.{i}.attn.norm_added_k": ("double_blocks.{i}.txt_attn.norm.key_norm", None),
    "transformer_blocks.{i}.attn.to_out.0": ("double_blocks.{i}.img_attn.proj", None),
    "transformer_blocks.{i}.attn.to_add_out": ("double_blocks.{i}.txt_attn.proj", None),
    "transformer_blocks.{i}.ff.net.0.proj": ("double_blocks.{i}.img_mlp.0", None),
    "transformer_blocks.{i}.ff.net.2": ("double_blocks.{i}.img_mlp.2", None),
    "transformer_blocks.{i}.ff_context.net.0.proj": ("double_blocks.{i}.txt_mlp.0", None),
    "transformer_blocks.{i}.ff_context.net.2": ("double_blocks.{i}.txt_mlp.2", None),
    "single_transformer_blocks.{i}.norm.linear": ("single_blocks.{i}.modulation.lin", None),
    "single_transformer_blocks.{i}.attn.to_q": ("single_blocks.{i}.linear1", [(0, 1)]),
    "single_transformer_blocks.{i}.attn.to_k": ("single_blocks.{i}.linear1", [(1, 2)]),
    "single_transformer_blocks.{i}.attn.to_v": ("single_blocks.{i}.linear1", [(2, 3)]),
    "single_transformer_blocks.{i}.proj_mlp": ("single_blocks.{i}.linear1", [(3, 7)]),
    "single_transformer_blocks.{i}.attn.norm_q": ("single_blocks.{i}.norm.query_norm", None),
    "single_transformer_blocks.{i}.attn.norm_k": ("single_blocks.{i}.norm.key_norm", None),
    "single_transformer_blocks.{i}.proj_out": ("single_blocks.{i}.linear2", None),
}


def bfl_name(name):
    """Our parameter name -> (BFL's key, rows or None). BFL calls the qk-norms' weight `scale`."""
    parts = name.split(".")
    block = parts[1] if parts[0] in ("transformer_blocks", "single_transformer_blocks") else None
    if block is not None:
        parts[1] = "{i}"
    module, rows = BFL[".".join(parts[:-1])]
    param = "scale" if module.endswith("_norm") else parts[-1]
    return f"{module.format(i=block)}.{param}", rows


def single_file_config(ckpt, path):
    """(config read off a BFL single file's shapes, its key prefix): the file holds no config."""
    prefix = PREFIX if PREFIX + "double_blocks.0.img_attn.qkv.weight" in ckpt else ""
    if prefix + "double_blocks.0.img_attn.qkv.weight" not in ckpt:
        sd3 = any(k.startswith((PREFIX + "joint_blocks.", "joint_blocks.")) for k in ckpt.keys())
        what = "an SD3 file, not FLUX" if sd3 else "not a FLUX.1 file"
        raise CheckpointError(f"{path}: {what} (no [{PREFIX}]double_blocks.*)")
    keys = [k[len(prefix):] for k in ckpt.keys() if k.startswith(prefix)]
    dim, in_channels = ckpt.shape(prefix + "img_in.weight")
    d = ckpt.shape(prefix + "double_blocks.0.img_attn.norm.query_norm.scale")[0]  # the head dim
    out = ckpt.shape(prefix + "final_layer.linear.weight")[0]
    config = dict(DEFAULTS, in_channels=in_channels, out_channels=None if out == in_channels else out,
                  num_layers=max(int(k.split(".")[1]) for k in keys if k.startswith("double_blocks.")) + 1,
                  num_single_layers=max((int(k.split(".")[1]) for k in keys if k.startswith("single_blocks.")),
                                        default=-1) + 1,
                  attention_head_dim=d, num_attention_heads=dim // d,
                  joint_attention_dim=ckpt.shape(prefix + "txt_in.weight")[1],
                  pooled_projection_dim=ckpt.shape(prefix + "vector_in.in_layer.weight")[1],
                  guidance_embeds=prefix + "guidance_in.in_layer.weight" in ckpt,
                  axes_dims_rope=(d // 8, 7 * d // 16, 7 * d // 16))  # FLUX.1's 16:56:56 split of its head dim
    return config, prefix


# ----------------------------------------------------------------------------------------------------
# Loading and saving


def _open(path):
    """(config, checkpoint, the single file's key prefix or None for a diffusers folder), no weights read."""
    kind, where = weights.component(path, "transformer")
    if kind == "file":
        ckpt = weights.Checkpoint(where)
        config, prefix = single_file_config(ckpt, where)
        return config, ckpt, prefix
    config, ckpt = weights.diffusers_folder(where, "FluxTransformer2DModel")
    return config, ckpt, None


def read_config(path) -> dict:
    """The config of a model path (a folder's config.json, or read off a BFL single file's shapes), no weights read."""
    return _open(path)[0]


def load(path, device="cpu", dtype=torch.float32, norm_dtype=None, quantize=None):
    """A FLUX transformer from a diffusers folder (root or transformer/) or a BFL single file, straight into dtype
    (norm scales and position tables into norm_dtype when given: weights.layer_dtypes; quantize: its Linear layers
    in that format, weights.load_module)."""
    config, ckpt, prefix = _open(path)
    try:
        with torch.device("meta"):
            m = Flux(config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    what = f"FLUX transformer {ckpt.files[0]}"
    if prefix is None:
        sources = {k: (lambda k=k: ckpt[k]) for k in ckpt.keys()}
    else:
        dim = m.config["num_attention_heads"] * m.config["attention_head_dim"]
        sources = weights.fused_sources(ckpt, {n: bfl_name(n) for n in m.state_dict()}, prefix, dim, what)
    return weights.load_module(m, sources, weights.layer_dtypes(m, dtype, norm_dtype), device, what, quantize)


def save(m, path, layout="diffusers", metadata=None):
    """path/ config.json + diffusion_pytorch_model.safetensors (FluxTransformer2DModel.from_pretrained loads it); BFL's
    single-file layout is read, not written."""
    if layout != "diffusers":
        raise ValueError(f"FLUX transformers are saved in the diffusers layout only, not {layout!r}")
    config = {"_class_name": "FluxTransformer2DModel", **m.config, "axes_dims_rope": list(m.config["axes_dims_rope"])}
    weights.save_diffusers(m.state_dict(), config, path, metadata)
