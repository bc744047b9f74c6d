"""SD3 / SD3.5's MMDiT (diffusers' SD3Transformer2DModel), from scratch, config-driven.

x (B,16,h,w) latents -> 2x2 patches + a 2-D sin-cos position table cropped from the centre of a larger one ->
N joint blocks -> final AdaLN -> unpatchify -> the velocity (B,16,h,w). The conditioning vector (timestep
embedding + projected pooled text) modulates every block through AdaLN-Zero (shift, scale and a gate per
sub-layer, predicted from it). A joint block keeps two streams, image and text, each with its own weights,
and runs one attention over both concatenated: image tokens attend to text and text to image. The last block
is "context pre-only": its text stream only feeds the attention. SD3.5 adds RMS qk-norm and, in its first
blocks ("dual attention", medium only), a second image-only self-attention.

The blocks here (AdaLN, RMSNorm, the feed-forward, the embeddings' MLPs) are also FLUX's (flux.py imports them).
Modules are named after the diffusers layout (a transformer/ folder loads key for key); the original single
files (`model.diffusion_model.joint_blocks.*`, fused qkv, shift-before-scale final norms) through one table.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
import weights
from unet import run, timestep_embedding
from weights import CheckpointError

# diffusers' defaults; then the hub configs of stabilityai's SD3-medium, SD3.5-medium and SD3.5-large.
DEFAULTS = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=18, attention_head_dim=64,
                num_attention_heads=18, joint_attention_dim=4096, caption_projection_dim=1152,
                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=96, dual_attention_layers=(),
                qk_norm=None)
SD3_MEDIUM = dict(DEFAULTS, num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192)
SD35_MEDIUM = dict(SD3_MEDIUM, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35_LARGE = dict(DEFAULTS, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                  pos_embed_max_size=192, qk_norm="rms_norm")
PREFIX = "model.diffusion_model."  # where the transformer lives in an original single file


# ----------------------------------------------------------------------------------------------------
# Building blocks (shared with flux.py)


def heads(x, n):
    """(B, L, n * D) -> (B, n, L, D), the layout kernels.attention takes."""
    B, L, _ = x.shape
    return x.view(B, L, n, -1).transpose(1, 2)


def merge(o):
    """(B, n, L, D) -> (B, L, n * D)."""
    B, n, L, D = o.shape
    return o.transpose(1, 2).reshape(B, L, n * D)


def layer_norm(x):
    """LayerNorm without affine parameters (the AdaLN modulation supplies scale and shift), eps 1e-6."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulate(x, shift, scale):
    """x (B, L, C) scaled and shifted per sample by (B, C) vectors: AdaLN's conditioning."""
    return x * (1 + scale[:, None]) + shift[:, None]


class RMSNorm(nn.Module):
    """qk-norm: RMS over the head dim, statistics in fp32, a learned scale (as diffusers' RMSNorm)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        rms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        y = x * rms  # fp32
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return y * self.weight


class AdaLN(nn.Module):
    """The conditioning vector -> `n` modulation vectors of width dim (shift, scale, gate, ...)."""

    def __init__(self, dim, n, cond=None):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(cond or dim, n * dim)

    def forward(self, emb):  # emb (B, cond)
        return self.linear(F.silu(emb)).chunk(self.n, dim=1)  # n x (B, dim)


class FeedForward(nn.Module):
    """Linear -> tanh-GELU -> Linear, 4x wide (diffusers' FeedForward "gelu-approximate"; net.1 is a dropout)."""

    def __init__(self, dim, inner=None):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, inner or 4 * dim)
        self.net = nn.ModuleList([proj, nn.Identity(), nn.Linear(inner or 4 * dim, dim)])

    def forward(self, x):
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class MLP(nn.Module):
    """linear_1 -> SiLU -> linear_2: the timestep, guidance and pooled-text embedders."""

    def __init__(self, cin, dim):
        super().__init__()
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


def qk_norms(module, dim_head, names):
    """Attach RMS qk-norms named `names` (SD3.5, FLUX) to an attention module."""
    for name in names:
        setattr(module, name, RMSNorm(dim_head))


# ----------------------------------------------------------------------------------------------------
# The model


def sincos_table(dim, grid, base):
    """SD3's 2-D sin-cos position table (grid^2, dim): the first half of the channels encodes the column, the
    second half the row (diffusers' meshgrid order)."""
    pos = torch.arange(grid, dtype=torch.float64) / (grid / base)  # (grid,)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)

    def embed(p):  # (grid^2,) -> (grid^2, dim/2)
        out = torch.outer(p, omega)
        return torch.cat([out.sin(), out.cos()], dim=1)
    rows = pos[:, None].expand(grid, grid).reshape(-1)
    cols = pos[None, :].expand(grid, grid).reshape(-1)
    return torch.cat([embed(cols), embed(rows)], dim=1).float()  # (grid^2, dim)


class PatchEmbed(nn.Module):
    """2x2 patches -> tokens, plus the centre crop of the position table that matches the latent's size."""

    def __init__(self, cfg, dim):
        super().__init__()
        self.patch, self.max = cfg["patch_size"], cfg["pos_embed_max_size"]
        self.proj = nn.Conv2d(cfg["in_channels"], dim, self.patch, stride=self.patch)
        table = sincos_table(dim, self.max, cfg["sample_size"] // self.patch)
        self.register_buffer("pos_embed", table[None])  # (1, max^2, dim), saved in checkpoints

    def forward(self, x):  # x (B, C, h, w)
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        if h > self.max or w > self.max:
            raise ValueError(f"latent of {h}x{w} patches exceeds the position table ({self.max}x{self.max})")
        top, left = (self.max - h) // 2, (self.max - w) // 2
        pos = self.pos_embed.view(self.max, self.max, -1)[top:top + h, left:left + w].reshape(1, h * w, -1)
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, dim)
        return (tokens + pos).to(tokens.dtype)


class JointAttention(nn.Module):
    """One attention over [image; text] tokens, each stream with its own q/k/v and output projections."""

    def __init__(self, dim, n_heads, qk_norm, context=True, context_out=True):
        super().__init__()
        self.n_heads = n_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # to_out.1 is diffusers' parameterless dropout
        if qk_norm:
            qk_norms(self, dim // n_heads, ["norm_q", "norm_k"])
        self.context = context
        if context:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
            if context_out:
                self.to_add_out = nn.Linear(dim, dim)
            if qk_norm:
                qk_norms(self, dim // n_heads, ["norm_added_q", "norm_added_k"])

    def project(self, x, q, k, v, norm_q, norm_k):
        """x (B, L, dim) -> q, k, v (B, H, L, D), with qk-norm when the model has it."""
        q, k, v = (heads(p(x), self.n_heads) for p in (q, k, v))
        if norm_q is not None:
            q, k = norm_q(q), norm_k(k)
        return q, k, v

    def forward(self, x, c=None):  # x (B, Lx, dim), c (B, Lc, dim) or None
        q, k, v = self.project(x, self.to_q, self.to_k, self.to_v, getattr(self, "norm_q", None),
                               getattr(self, "norm_k", None))
        if c is None:
            return self.to_out[0](merge(kernels.attention(q, k, v)))
        cq, ck, cv = self.project(c, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                  getattr(self, "norm_added_q", None), getattr(self, "norm_added_k", None))
        o = kernels.attention(torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2))  # (B,H,Lx+Lc,D)
        o = merge(o)  # (B, Lx + Lc, dim)
        ox, oc = o[:, :x.shape[1]], o[:, x.shape[1]:]
        return self.to_out[0](ox), (self.to_add_out(oc) if hasattr(self, "to_add_out") else None)


class JointBlock(nn.Module):
    """AdaLN-Zero on both streams, the joint attention, then a feed-forward per stream (MMDiT's block)."""

    def __init__(self, dim, n_heads, qk_norm, last, dual):
        super().__init__()
        self.last, self.dual = last, dual
        self.norm1 = AdaLN(dim, 9 if dual else 6)
        self.norm1_context = AdaLN(dim, 2 if last else 6)  # last: AdaLayerNormContinuous (scale, shift)
        self.attn = JointAttention(dim, n_heads, qk_norm, context_out=not last)
        if dual:
            self.attn2 = JointAttention(dim, n_heads, qk_norm, context=False)
        self.ff = FeedForward(dim)
        if not last:
            self.ff_context = FeedForward(dim)

    def forward(self, x, c, emb):  # x (B, Lx, dim), c (B, Lc, dim), emb (B, dim)
        mods = self.norm1(emb)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        nx = layer_norm(x)
        if self.last:
            c_scale, c_shift = self.norm1_context(emb)
            nc = modulate(layer_norm(c), c_shift, c_scale)
        else:
            c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(emb)
            nc = modulate(layer_norm(c), c_shift, c_scale)
        ax, ac = self.attn(modulate(nx, shift, scale), nc)
        x = x + gate[:, None] * ax
        if self.dual:
            shift2, scale2, gate2 = mods[6:]
            x = x + gate2[:, None] * self.attn2(modulate(nx, shift2, scale2))
        x = x + gate_mlp[:, None] * self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp))
        if self.last:
            return x, None
        c = c + c_gate[:, None] * ac
        c = c + c_gate_mlp[:, None] * self.ff_context(modulate(layer_norm(c), c_shift_mlp, c_scale_mlp))
        return x, c


def check_config(config):
    """Fill diffusers' defaults; refuse what this MMDiT does not build, in one line."""
    cfg = {**DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_") and k in DEFAULTS}}
    if cfg["qk_norm"] not in (None, "rms_norm"):
        raise ValueError(f"unsupported MMDiT config: qk_norm={cfg['qk_norm']!r} (None or 'rms_norm')")
    if cfg["caption_projection_dim"] != cfg["num_attention_heads"] * cfg["attention_head_dim"]:
        raise ValueError("unsupported MMDiT config: caption_projection_dim must equal heads x head dim")
    cfg["dual_attention_layers"] = tuple(cfg["dual_attention_layers"])
    return cfg


class MMDiT(nn.Module):
    """SD3Transformer2DModel built from its diffusers config dict (m.config), diffusers module names."""

    def __init__(self, config):
        super().__init__()
        self.config = cfg = check_config(config)
        dim, n = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["num_layers"]
        self.gradient_checkpointing = False  # training: recompute each block in backward
        self.prediction_type = "flow"  # the output is the velocity eps - x0
        self.latent_channels = cfg["in_channels"]  # of the VAE latents it denoises
        self.pos_embed = PatchEmbed(cfg, dim)
        self.time_text_embed = nn.Module()
        self.time_text_embed.timestep_embedder = MLP(256, dim)
        self.time_text_embed.text_embedder = MLP(cfg["pooled_projection_dim"], dim)
        self.context_embedder = nn.Linear(cfg["joint_attention_dim"], cfg["caption_projection_dim"])
        self.transformer_blocks = nn.ModuleList([
            JointBlock(dim, cfg["num_attention_heads"], cfg["qk_norm"], i == n - 1, i in cfg["dual_attention_layers"])
            for i in range(n)])
        self.norm_out = AdaLN(dim, 2)  # (scale, shift)
        self.proj_out = nn.Linear(dim, cfg["patch_size"] ** 2 * cfg["out_channels"])

    @property
    def dtype(self):
        return self.proj_out.weight.dtype

    def forward(self, x, t, context, pooled):
        """x (B, 16, h, w), t (B,) = sigma * 1000, context (B, L, 4096), pooled (B, 2048) -> velocity (B, 16, h, w)."""
        B, _, h, w = x.shape
        p = self.config["patch_size"]
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)  # (B,)
        emb = self.time_text_embed.timestep_embedder(timestep_embedding(t, 256, True, 0).to(pooled.dtype))
        emb = emb + self.time_text_embed.text_embedder(pooled)  # (B, dim)
        tokens = self.pos_embed(x)  # (B, h/p * w/p, dim)
        c = self.context_embedder(context)  # (B, L, dim)
        for block in self.transformer_blocks:
            tokens, c = run(block, tokens, c, emb, checkpointing=ckpt)
        scale, shift = self.norm_out(emb)
        out = self.proj_out(modulate(layer_norm(tokens), shift, scale))  # (B, h/p * w/p, p*p*C)
        out = out.view(B, h // p, w // p, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # (B, C, h/p, p, w/p, p)
        return out.reshape(B, -1, h, w)


# ----------------------------------------------------------------------------------------------------
# The original single-file layout: our name -> (its key, which part of it); one table plus loops.

BLOCK = {"norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
         "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
         "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
         "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
         "attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q",
         "attn2.norm_k": "x_block.attn2.ln_k",
         "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
         "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}
QKV = {"to_q": 0, "to_k": 1, "to_v": 2, "add_q_proj": 0, "add_k_proj": 1, "add_v_proj": 2}
TOP = {"pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
       "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
       "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
       "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
       "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
       "norm_out.linear": "final_layer.adaLN_modulation.1", "proj_out": "final_layer.linear"}


def original_name(name, last):
    """Our parameter name -> (original key, third of a fused qkv or None, swap shift/scale halves?)."""
    if not name.startswith("transformer_blocks."):
        module, param = name.rsplit(".", 1) if name != "pos_embed.pos_embed" else (name, None)
        key = TOP[module] + ("." + param if param else "")
        return key, None, module == "norm_out.linear"
    _, i, rest = name.split(".", 2)
    module, param = rest.rsplit(".", 1)
    attn, _, proj = module.partition(".")
    if proj in QKV:  # attn.to_q -> x_block.attn.qkv, attn.add_q_proj -> context_block.attn.qkv (first third)
        stream = "context_block" if proj.startswith("add_") else "x_block"
        return f"joint_blocks.{i}.{stream}.{attn}.qkv.{param}", QKV[proj], False
    swap = last == int(i) and module == "norm1_context.linear"  # AdaLayerNormContinuous: scale before shift
    return f"joint_blocks.{i}.{BLOCK[module]}.{param}", None, swap


def file_prefix(ckpt, path):
    """Where the transformer lives in a single file: under model.diffusion_model. (whole-model files) or at the top."""
    for prefix in (PREFIX, ""):
        if prefix + "joint_blocks.0.x_block.attn.qkv.weight" in ckpt and prefix + "pos_embed" in ckpt:
            return prefix
    what = "a FLUX file" if any(".double_blocks." in "." + k for k in ckpt.keys()) else "not an SD3 / SD3.5 file"
    raise CheckpointError(f"{path}: {what} (no joint_blocks.* and pos_embed, with or without {PREFIX})")


def single_file_config(ckpt, prefix):
    """An SD3 / SD3.5 config read off a single file's shapes (the file holds no config)."""
    keys = [k[len(prefix):] for k in ckpt.keys() if k.startswith(prefix)]
    blocks = {int(k.split(".")[1]) for k in keys if k.startswith("joint_blocks.")}

    def shape(key):
        return ckpt.shape(prefix + key)
    dim = shape("x_embedder.proj.weight")[0]
    norm = "joint_blocks.0.x_block.attn.ln_q.weight"
    head = shape(norm)[0] if prefix + norm in ckpt else 64  # SD3-medium has no qk-norm; its heads are 64 wide
    return dict(DEFAULTS, num_layers=max(blocks) + 1, num_attention_heads=dim // head, attention_head_dim=head,
                caption_projection_dim=dim, patch_size=shape("x_embedder.proj.weight")[-1],
                in_channels=shape("x_embedder.proj.weight")[1], joint_attention_dim=shape("context_embedder.weight")[1],
                pooled_projection_dim=shape("y_embedder.mlp.0.weight")[1],
                pos_embed_max_size=round(shape("pos_embed")[1] ** 0.5),
                dual_attention_layers=tuple(sorted({int(k.split(".")[1]) for k in keys if ".attn2." in k})),
                qk_norm="rms_norm" if any(".ln_q." in k for k in keys) else None,
                out_channels=shape("final_layer.linear.weight")[0] // shape("x_embedder.proj.weight")[-1] ** 2)


def converted(ckpt, prefix, names, last, what):
    """Our name -> a thunk reading its tensor from an original single file (split qkv, swapped halves)."""
    def read(key, third, swap):
        t = ckpt[key]
        if third is not None:
            t = t.chunk(3, dim=0)[third].clone()  # not a view: it would keep the whole fused tensor alive
        if swap:
            shift, scale = t.chunk(2, dim=0)
            t = torch.cat([scale, shift], dim=0)
        return t
    plan = {n: original_name(n, last) for n in names}
    missing = sorted({prefix + k for k, _, _ in plan.values()} - set(ckpt.keys()))
    if missing:
        raise CheckpointError(f"{what}: keys missing: {', '.join(missing[:8])}")
    used = {prefix + k for k, _, _ in plan.values()}
    mine = tuple(prefix + p for p in ("pos_embed", "x_embedder.", "t_embedder.", "y_embedder.", "context_embedder.",
                                      "joint_blocks.", "final_layer."))  # other keys: the VAE, text encoders
    unexpected = sorted(k for k in ckpt.keys() if k.startswith(mine) and k not in used)
    if unexpected:
        raise CheckpointError(f"{what}: unexpected keys: {', '.join(unexpected[:8])}")
    return {n: (lambda p=p: read(prefix + p[0], p[1], p[2])) for n, p in plan.items()}


# ----------------------------------------------------------------------------------------------------
# Loading and saving


def _open(path):
    """(config, checkpoint, the prefix of a single file or None for a folder) of a model path, no weights read."""
    kind, where = weights.component(path, "transformer")
    if kind == "file":
        ckpt = weights.Checkpoint(where)
        prefix = file_prefix(ckpt, where)
        return single_file_config(ckpt, prefix), ckpt, prefix
    config, ckpt = weights.diffusers_folder(where, "SD3Transformer2DModel")
    return config, ckpt, None


def read_config(path) -> dict:
    """The config of a model path (a folder's config.json, or read off a single file's shapes), no weights read."""
    return _open(path)[0]


def load(path, device="cpu", dtype=torch.float32, norm_dtype=None, quantize=None):
    """An MMDiT from a diffusers folder (root or transformer/) or an original single file, straight into dtype
    (norm scales and position tables into norm_dtype when given: weights.layer_dtypes; quantize: its Linear layers
    in that format, weights.load_module)."""
    config, ckpt, prefix = _open(path)
    try:
        with torch.device("meta"):
            m = MMDiT(config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    what = f"SD3 transformer {ckpt.files[0]}"
    if prefix is not None:
        sources = converted(ckpt, prefix, m.state_dict(), m.config["num_layers"] - 1, what)
    else:
        sources = {k: (lambda k=k: ckpt[k]) for k in ckpt.keys()}
    return weights.load_module(m, sources, weights.layer_dtypes(m, dtype, norm_dtype), device, what, quantize)


def save(m, path, layout="diffusers", metadata=None):
    """path/ config.json + diffusion_pytorch_model.safetensors (SD3Transformer2DModel.from_pretrained loads it); the
    original single-file layout is read, not written."""
    if layout != "diffusers":
        raise ValueError(f"SD3 transformers are saved in the diffusers layout only, not {layout!r}")
    config = {"_class_name": "SD3Transformer2DModel", **m.config}
    config["dual_attention_layers"] = list(config["dual_attention_layers"])
    weights.save_diffusers(m.state_dict(), config, path, metadata)
