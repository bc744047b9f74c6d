"""Z-Image's transformer (diffusers' ZImageTransformer2DModel, Z-Image / Z-Image-Turbo's S3-DiT), from scratch.

One stream of blocks, each the same: RMS-normed attention and a SwiGLU feed-forward, each sandwiched between two
RMSNorms and, where the block is modulated, scaled before and gated (tanh) after by the timestep embedding. The
image's 2x2 latent patches and the caption's Qwen3 states are first refined apart (2 modulated blocks for the
image, 2 plain ones for the caption), then run together as one sequence [image; caption] through 30 blocks. A
final scale-only AdaLN and a linear give the patches back.

Sequences are padded to multiples of 32 with learned pad tokens (x_pad_token, cap_pad_token), which attend and are
attended to like any token; only the padding of a batch to its longest row is masked. Positions are 3-axis RoPE ids
(frame, row, col) with base 256: caption token j sits at (j + 1, 0, 0), image patch (r, c) at (L + 1, r, c) after
an L-token (padded) caption, and image pad tokens at (0, 0, 0).

Modules are named after the diffusers layout (a transformer/ folder loads key for key); ComfyUI's single file
(z_image_turbo_bf16.safetensors: fused qkv, `x_embedder` / `final_layer`, `q_norm` / `out`) through one table.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
import weights
from flux import apply_rope
from mmdit import RMSNorm, heads, layer_norm, merge
from unet import run, timestep_embedding
from weights import CheckpointError

# diffusers' defaults; the released Z-Image(-Turbo) transformer's hub config differs in axes_lens only.
DEFAULTS = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
                n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, siglip_feat_dim=None,
                rope_theta=256.0, t_scale=1000.0, axes_dims=(32, 48, 48), axes_lens=(1024, 512, 512))
Z_IMAGE = dict(DEFAULTS, axes_lens=(1536, 512, 512))  # cap_feat_dim 2560: Qwen3-4B's hidden size
SEQ_MULTI_OF = 32  # every caption and image sequence is padded to a multiple of this with its pad token
ADALN_DIM = 256  # the timestep embedding's width (min(dim, 256)) that every modulation reads
PREFIX = "model.diffusion_model."  # where whole-model single files keep the transformer


def padded(n):
    """n rounded up to a multiple of SEQ_MULTI_OF."""
    return n + (-n) % SEQ_MULTI_OF


# ----------------------------------------------------------------------------------------------------
# Patches and rotary positions


def patchify(x, p):
    """(B, C, h, w) -> (B, h/p * w/p, p*p*C) row-major patches, each (row, col, channel) inside (diffusers' order)."""
    B, C, h, w = x.shape
    return x.view(B, C, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, (h // p) * (w // p), p * p * C)


def unpatchify(tokens, h, w, p):
    """(B, h/p * w/p, p*p*C) -> (B, C, h, w), patchify's inverse."""
    B, _, D = tokens.shape
    return tokens.view(B, h // p, w // p, p, p, D // (p * p)).permute(0, 5, 1, 3, 2, 4).reshape(B, -1, h, w)


def rope(ids, axes, theta):
    """cos, sin (B, 1, L, D) for ids (B, L, 3): axis i rotates its own axes[i] channels in pairs (2j, 2j+1). Angles
    are rounded to fp32 before cos/sin, as diffusers' complex tables are."""
    cos, sin = [], []
    for i, d in enumerate(axes):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)  # (d/2,)
        angles = (ids[..., i, None].double() * freqs).float()  # (B, L, d/2)
        cos.append(angles.cos().repeat_interleave(2, dim=-1))  # (B, L, d): one angle per pair
        sin.append(angles.sin().repeat_interleave(2, dim=-1))
    return torch.cat(cos, dim=-1)[:, None], torch.cat(sin, dim=-1)[:, None]


# ----------------------------------------------------------------------------------------------------
# The model


class Attention(nn.Module):
    """q/k/v (no biases) with RMS qk-norm over each head, RoPE, one attention, an output linear."""

    def __init__(self, dim, n_heads, qk_norm):
        super().__init__()
        self.n_heads = n_heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])  # to_out.1 is diffusers' parameterless dropout
        self.norm_q = RMSNorm(dim // n_heads, eps=1e-5) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim // n_heads, eps=1e-5) if qk_norm else nn.Identity()

    def forward(self, x, cos, sin, mask):  # x (B, L, dim); mask (B, L) keys to attend to, or None: all
        q = apply_rope(self.norm_q(heads(self.to_q(x), self.n_heads)), cos, sin)  # (B, H, L, D)
        k = apply_rope(self.norm_k(heads(self.to_k(x), self.n_heads)), cos, sin)
        v = heads(self.to_v(x), self.n_heads)
        if mask is None:
            o = kernels.attention(q, k, v)
        else:  # rows of unequal length: the batch padding is masked exactly (kernels.attention has no mask)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.to_out[0](merge(o))  # (B, L, dim)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases: the feed-forward, 8/3 x wide."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Attention then feed-forward, each between two RMSNorms; with modulation, the timestep embedding scales each
    sub-layer's input and tanh-gates its output (no shift). The refiners' blocks and the main ones are this class."""

    def __init__(self, dim, n_heads, norm_eps, qk_norm, modulation):
        super().__init__()
        self.attention = Attention(dim, n_heads, qk_norm)
        self.feed_forward = SwiGLU(dim, int(dim / 3 * 8))
        self.attention_norm1, self.attention_norm2 = RMSNorm(dim, norm_eps), RMSNorm(dim, norm_eps)
        self.ffn_norm1, self.ffn_norm2 = RMSNorm(dim, norm_eps), RMSNorm(dim, norm_eps)
        if modulation:  # no SiLU before it: it reads the timestep embedding as is
            self.adaLN_modulation = nn.Sequential(nn.Linear(min(dim, ADALN_DIM), 4 * dim))

    def forward(self, x, cos, sin, mask, emb=None):  # x (B, L, dim), emb (B, min(dim, 256)) or None: unmodulated
        if emb is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), cos, sin, mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(emb)[:, None].chunk(4, dim=2)  # (B, 1, dim)
        attn = self.attention(self.attention_norm1(x) * (1 + scale_msa), cos, sin, mask)
        x = x + gate_msa.tanh() * self.attention_norm2(attn)
        return x + gate_mlp.tanh() * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp)))


class FinalLayer(nn.Module):
    """LayerNorm (no affine) scaled by 1 + a SiLU'd projection of the timestep embedding, then a linear."""

    def __init__(self, dim, out):
        super().__init__()
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, ADALN_DIM), dim))

    def forward(self, x, emb):  # x (B, L, dim), emb (B, min(dim, 256))
        return self.linear(layer_norm(x) * (1 + self.adaLN_modulation(emb)[:, None]))


def check_config(config):
    """Fill diffusers' defaults; refuse what this Z-Image does not build, in one line."""
    cfg = {**DEFAULTS, **{k: v for k, v in config.items() if k in DEFAULTS}}
    for k in ("all_patch_size", "all_f_patch_size", "axes_dims", "axes_lens"):
        cfg[k] = tuple(cfg[k])
    dim, n_heads, axes = cfg["dim"], cfg["n_heads"], cfg["axes_dims"]
    if cfg["siglip_feat_dim"] is not None:
        raise ValueError("unsupported Z-Image config: siglip_feat_dim (Z-Image-Omni's SigLIP inputs) is not built")
    if len(cfg["all_patch_size"]) != 1 or cfg["all_f_patch_size"] != (1,):
        raise ValueError(f"unsupported Z-Image config: one image patch size and all_f_patch_size (1,), got "
                         f"{cfg['all_patch_size']} and {cfg['all_f_patch_size']}")
    # n_kv_heads: diffusers takes it and builds every k / v head anyway (n_heads of them); so does this
    if dim % n_heads or len(axes) != 3 or any(d % 2 for d in axes) or sum(axes) != dim // n_heads:
        raise ValueError(f"unsupported Z-Image config: axes_dims {axes} must be 3 even sizes summing to the head dim "
                         f"dim / n_heads = {dim}/{n_heads}")
    return cfg


class ZImage(nn.Module):
    """ZImageTransformer2DModel built from its diffusers config dict (m.config), diffusers module names."""

    def __init__(self, config):
        super().__init__()
        self.config = cfg = check_config(config)
        dim, n_heads, eps, qk = cfg["dim"], cfg["n_heads"], cfg["norm_eps"], cfg["qk_norm"]
        self.patch = p = cfg["all_patch_size"][0]
        self.key = f"{p}-1"  # the ModuleDicts' key: patch size - frame patch size
        self.gradient_checkpointing = False  # training: recompute each block in backward
        self.prediction_type = "flow"  # forward returns the velocity eps - x0
        self.latent_channels = cfg["in_channels"]  # of the VAE latents it denoises
        self.all_x_embedder = nn.ModuleDict({self.key: nn.Linear(p * p * cfg["in_channels"], dim)})
        self.all_final_layer = nn.ModuleDict({self.key: FinalLayer(dim, p * p * cfg["in_channels"])})
        self.noise_refiner = nn.ModuleList([Block(dim, n_heads, eps, qk, True) for _ in range(cfg["n_refiner_layers"])])
        self.context_refiner = nn.ModuleList([Block(dim, n_heads, eps, qk, False)
                                              for _ in range(cfg["n_refiner_layers"])])
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(ADALN_DIM, 1024), nn.SiLU(), nn.Linear(1024, min(dim, ADALN_DIM)))
        self.cap_embedder = nn.Sequential(RMSNorm(cfg["cap_feat_dim"], eps), nn.Linear(cfg["cap_feat_dim"], dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.layers = nn.ModuleList([Block(dim, n_heads, eps, qk, True) for _ in range(cfg["n_layers"])])

    @property
    def dtype(self):
        return self.all_final_layer[self.key].linear.weight.dtype

    def forward(self, x, t, context, mask):
        """x (B, C, h, w) latents, t (B,) = sigma * 1000 (x = (1 - sigma) x0 + sigma eps), context (B, L, cap_feat_dim)
        the text encoder's states, mask (B, L) bool, True at real tokens -> the velocity eps - x0 (B, C, h, w).

        Row i equals diffusers' model given [context[i][mask[i]]]: ZImagePipeline calls it with timestep
        (1000 - sigma * 1000) / 1000 and negates its output; both conversions happen here."""
        B, _, h, w = x.shape
        p, ckpt = self.patch, self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if h % p or w % p:
            raise ValueError(f"Z-Image patches the latents {p}x{p}: h and w must be multiples of {p}, got {h}x{w}")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)  # (B,)
        s = (1000 - t.float()) / 1000 * self.config["t_scale"]  # the model's own time: 0 at noise, t_scale at data
        emb = self.t_embedder.mlp(timestep_embedding(s, ADALN_DIM).to(x.dtype))  # (B, min(dim, 256))

        # the image: patches, then pad tokens up to a multiple of 32
        tokens = self.all_x_embedder[self.key](patchify(x, p))  # (B, N, dim)
        N = tokens.shape[1]
        Np = padded(N)
        img = torch.cat([tokens, self.x_pad_token.to(tokens.dtype).expand(B, Np - N, -1)], dim=1)  # (B, Np, dim)

        # the caption: real tokens first (any padding side), pad tokens up to each row's multiple of 32, then the
        # batch's own padding (masked) up to the longest row
        mask = mask.to(device=x.device, dtype=torch.bool)
        counts = [mask.shape[1]] * B if kernels.planning() else mask.sum(1).tolist()  # real tokens per row (plan: all)
        if min(counts) == 0:
            raise ValueError("Z-Image needs at least one caption token per row (mask all False)")
        caps = [padded(k) for k in counts]  # each row's padded caption
        Lc = max(caps)
        n, cap_len = torch.tensor(counts, device=x.device), torch.tensor(caps, device=x.device)  # (B,), (B,)
        order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices  # real tokens first, in order
        ctx = context.gather(1, order[..., None].expand(-1, -1, context.shape[2]))[:, :Lc]
        ctx = F.pad(ctx, (0, 0, 0, Lc - ctx.shape[1]))  # (B, Lc, cap_feat_dim)
        pos = torch.arange(Lc, device=x.device)
        cap = self.cap_embedder(ctx)  # (B, Lc, dim)
        cap = torch.where((pos < n[:, None])[..., None], cap, self.cap_pad_token.to(cap.dtype))
        cap_mask = None if min(caps) == Lc else pos < cap_len[:, None]  # (B, Lc)
        both_mask = None if cap_mask is None else torch.cat([cap_mask.new_ones(B, Np), cap_mask], dim=1)

        # positions: image patch (r, c) at (caption + 1, r, c), its pad tokens at 0; caption token j at (j + 1, 0, 0)
        lens, (hp, wp) = self.config["axes_lens"], (h // p, w // p)
        if Lc + 1 >= lens[0] or hp > lens[1] or wp > lens[2]:
            raise ValueError(f"Z-Image's positions reach axes_lens {lens}: caption {Lc} tokens (padded), "
                             f"latent grid {hp}x{wp} patches")
        ids = torch.zeros(B, Np + Lc, 3, dtype=torch.long, device=x.device)
        ids[:, :N, 0] = cap_len[:, None] + 1
        ids[:, :N, 1] = torch.arange(hp, device=x.device).repeat_interleave(wp)
        ids[:, :N, 2] = torch.arange(wp, device=x.device).repeat(hp)
        ids[:, Np:, 0] = pos + 1
        cos, sin = rope(ids, self.config["axes_dims"], self.config["rope_theta"])  # (B, 1, Np + Lc, D)

        for block in self.noise_refiner:
            img = run(block, img, cos[:, :, :Np], sin[:, :, :Np], None, emb, checkpointing=ckpt)
        for block in self.context_refiner:
            cap = run(block, cap, cos[:, :, Np:], sin[:, :, Np:], cap_mask, checkpointing=ckpt)
        both = torch.cat([img, cap], dim=1)  # (B, Np + Lc, dim): row i's caption is valid up to Np + cap_len[i]
        for block in self.layers:
            both = run(block, both, cos, sin, both_mask, emb, checkpointing=ckpt)
        out = self.all_final_layer[self.key](both[:, :N], emb)  # (B, N, p*p*C)
        return -unpatchify(out, h, w, p)  # diffusers' model predicts x0 - eps


# ----------------------------------------------------------------------------------------------------
# ComfyUI's single-file layout (Comfy-Org's z_image_convert_original_to_comfy.py): our name's pieces -> its, and
# q, k, v fused row-wise into one `attention.qkv`. norm_final.weight, which some files carry, is unused.

COMFY = {"all_x_embedder.2-1.": "x_embedder.", "all_final_layer.2-1.": "final_layer.",
         ".attention.to_out.0.": ".attention.out.", ".attention.norm_q.": ".attention.q_norm.",
         ".attention.norm_k.": ".attention.k_norm.", ".attention.to_q.": ".attention.qkv.",
         ".attention.to_k.": ".attention.qkv.", ".attention.to_v.": ".attention.qkv."}
QKV_ROWS = {".attention.to_q.": 0, ".attention.to_k.": 1, ".attention.to_v.": 2}  # which third of qkv
UNUSED = ("norm_final.weight",)


def comfy_name(name):
    """Our parameter name -> (ComfyUI's key, the rows of the fused qkv it takes (weights.fused_sources) or None)."""
    for ours, theirs in COMFY.items():
        if ours in name:
            third = QKV_ROWS.get(ours)
            return name.replace(ours, theirs), None if third is None else [(third, third + 1)]
    return name, None


def single_file_config(ckpt, path):
    """(config read off a ComfyUI single file's shapes, its key prefix): the file holds no config. Patch size 2 and
    the RoPE / time settings are Z-Image's; the RoPE split is Z-Image's 1:1.5:1.5 of the head dim."""
    prefix = PREFIX if PREFIX + "x_embedder.weight" in ckpt else ""
    if prefix + "layers.0.attention.qkv.weight" not in ckpt or prefix + "x_embedder.weight" not in ckpt:
        diffusers = any(k.endswith("all_x_embedder.2-1.weight") for k in ckpt.keys())
        what = "a diffusers-named file: load its folder instead" if diffusers else "not a Z-Image file"
        raise CheckpointError(f"{path}: {what} (no [{PREFIX}]x_embedder.weight and layers.0.attention.qkv.weight)")
    keys = [k[len(prefix):] for k in ckpt.keys() if k.startswith(prefix)]
    dim, patch_in = ckpt.shape(prefix + "x_embedder.weight")
    qk_norm = prefix + "layers.0.attention.q_norm.weight" in ckpt
    d = ckpt.shape(prefix + "layers.0.attention.q_norm.weight")[0] if qk_norm else 128  # the head dim

    def count(stack):
        return max((int(k.split(".")[1]) for k in keys if k.startswith(stack + ".")), default=-1) + 1
    config = dict(Z_IMAGE, in_channels=patch_in // 4, dim=dim, n_layers=count("layers"),
                  n_refiner_layers=count("noise_refiner"), n_heads=dim // d, n_kv_heads=dim // d, qk_norm=qk_norm,
                  cap_feat_dim=ckpt.shape(prefix + "cap_embedder.0.weight")[0],
                  axes_dims=(d // 4, 3 * d // 8, 3 * d // 8))
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
    config, ckpt = weights.diffusers_folder(where, "ZImageTransformer2DModel")
    return config, ckpt, None


def read_config(path) -> dict:
    """The config of a model path (a folder's config.json, or read off a ComfyUI single file's shapes)."""
    return _open(path)[0]


def load(path, device="cpu", dtype=torch.float32, norm_dtype=None, quantize=None):
    """A Z-Image transformer from a diffusers folder (root or transformer/) or a ComfyUI single file, straight into
    dtype (norm scales and pad tokens into norm_dtype when given: weights.layer_dtypes; quantize: its Linear layers
    in that format, weights.load_module)."""
    config, ckpt, prefix = _open(path)
    try:
        with torch.device("meta"):
            m = ZImage(config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    what = f"Z-Image transformer {ckpt.files[0]}"
    if prefix is None:
        sources = {k: (lambda k=k: ckpt[k]) for k in ckpt.keys()}
    else:
        sources = weights.fused_sources(ckpt, {n: comfy_name(n) for n in m.state_dict()}, prefix, m.config["dim"],
                                        what, UNUSED)
    return weights.load_module(m, sources, weights.layer_dtypes(m, dtype, norm_dtype), device, what, quantize)


def save(m, path, layout="diffusers", metadata=None):
    """path/ config.json + diffusion_pytorch_model.safetensors (ZImageTransformer2DModel.from_pretrained loads it);
    ComfyUI's single-file layout is read, not written."""
    if layout != "diffusers":
        raise ValueError(f"Z-Image transformers are saved in the diffusers layout only, not {layout!r}")
    config = {"_class_name": "ZImageTransformer2DModel",
              **{k: list(v) if isinstance(v, tuple) else v for k, v in m.config.items()}}
    weights.save_diffusers(m.state_dict(), config, path, metadata)
