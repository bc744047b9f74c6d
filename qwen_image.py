"""Qwen-Image's transformer (diffusers' QwenImageTransformer2DModel), from scratch, config-driven.

x (B,16,h,w) latents -> packed 2x2 into tokens (B, h/2 * w/2, 64) -> 60 double-stream blocks -> final AdaLN -> a
linear -> unpacked: the velocity (B,16,h,w). The text side is Qwen2.5-VL's last hidden states (B, L, 3584), RMS-normed
and projected to the model width. Each block is FLUX's double-stream block (MMDiT's joint block): image and text keep
their own weights (AdaLN-Zero modulation, q/k/v and output projections, RMS qk-norms, a 4x tanh-GELU MLP) and meet
in one attention over [text; image]. Unlike FLUX there are no single-stream blocks, no pooled text vector and no
guidance embedding: the timestep alone modulates every block. The last block's text stream past its keys and values
feeds nothing (as in diffusers): those weights get no gradient, and a full fine-tune leaves them out (unused()).

Prompts of a batch come padded to the longest one (mask (B, L), True = a real token, any pattern); the joint attention
masks the padded text keys, so neither image nor real text tokens ever see them. Without padding it runs
kernels.attention; with padding torch's scaled_dot_product_attention with a boolean mask, as diffusers does.

RoPE as FLUX's (3 axes (frame, row, col) with their own slices (16, 56, 56) of the head dim, pairs rotated) but with
Qwen's positions: image rows and columns centred on zero (row - (h - h//2): "scale_rope"), frame 0; each text token j
sits on the diagonal after the image, position max(h//2, w//2) + j on all three axes. Angles in fp32 as Qwen's table.

Modules are named after the diffusers layout (a transformer/ folder loads key for key). ComfyUI's single files
(qwen_image_*.safetensors) use the same names, bare or under "model.diffusion_model.", so need no table; Edit-2511's
files carry a `__index_timestep_zero__` marker (diffusers' zero_cond_t). zero_cond_t only changes how reference-image
tokens (editing) are modulated, so for this text-to-image forward it is accepted and changes nothing. Qwen-Image 2.x
(diffusers' QwenImage21Transformer2DModel) does not load here: a different network (single-stream blocks with one
shared modulation, bias-free SwiGLU MLPs, zero-centred norms, block-causal attention); its class is refused.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
import weights
from flux import Attention, apply_rope, pack, unpack
from mmdit import AdaLN, FeedForward, MLP, RMSNorm, layer_norm, merge, modulate
from unet import run, timestep_embedding
from weights import CheckpointError

# diffusers' defaults, which are the released Qwen-Image's (and Qwen-Image-2512's) hub config.
DEFAULTS = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
                zero_cond_t=False, use_additional_t_cond=False, use_layer3d_rope=False)
QWEN_IMAGE = dict(DEFAULTS)
CLASS = "QwenImageTransformer2DModel"
PREFIX = "model.diffusion_model."  # where ComfyUI's whole-model files keep the transformer
MARKER = "__index_timestep_zero__"  # ComfyUI's flag (an empty tensor) of Edit-2511's zero_cond_t
THETA = 10000  # RoPE's base


# ----------------------------------------------------------------------------------------------------
# Rotary positions


def position_ids(n_text, h, w, device):
    """(n_text + h*w, 3) ids, text first: (m + j,) * 3 for text token j, m = max(h//2, w//2); (0, row, col) centred on
    zero for an h x w token grid (row-major)."""
    rows = (torch.arange(h, device=device) - (h - h // 2)).repeat_interleave(w)  # (h*w,)
    cols = (torch.arange(w, device=device) - (w - w // 2)).repeat(h)  # (h*w,)
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=1)  # (h*w, 3)
    text = (max(h // 2, w // 2) + torch.arange(n_text, device=device))[:, None].expand(n_text, 3)  # (n_text, 3)
    return torch.cat([text, image])


def rope(ids, axes):
    """cos, sin (L, D) for ids (L, 3), axis i on its axes[i] channels in pairs (2j, 2j+1). The angles are rounded in
    fp32 as Qwen's table rounds them (flux.rope's fp64 differs from it at text positions in the thousands)."""
    cos, sin = [], []
    for i, d in enumerate(axes):
        freqs = 1.0 / torch.pow(THETA, torch.arange(0, d, 2, dtype=torch.float32, device=ids.device) / d)  # (d/2,)
        angles = torch.outer(ids[:, i].float(), freqs)  # (L, d/2)
        cos.append(angles.cos().repeat_interleave(2, dim=1))  # (L, d): one angle per pair
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, dim=1), torch.cat(sin, dim=1)


# ----------------------------------------------------------------------------------------------------
# The model


def joint_attention(attn, img, txt, cos, sin, mask):
    """flux's double-block attention (its modules, text first) with the padded text keys masked out.
    img (B, Li, dim), txt (B, Lt, dim), mask (B, Lt) bool or None -> (image out, text out)."""
    q, k, v = attn.project(img, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
    cq, ck, cv = attn.project(txt, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q,
                              attn.norm_added_k)
    q, k, v = torch.cat([cq, q], 2), torch.cat([ck, k], 2), torch.cat([cv, v], 2)  # (B, H, Lt + Li, D)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if mask is None:
        o = kernels.attention(q, k, v)
    else:  # every query sees the real text tokens and all image tokens
        keys = torch.cat([mask, mask.new_ones(mask.shape[0], img.shape[1])], dim=1)  # (B, Lt + Li)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None])
    o = merge(o)  # (B, Lt + Li, dim)
    n = txt.shape[1]
    return attn.to_out[0](o[:, n:]), attn.to_add_out(o[:, :n])


class Block(nn.Module):
    """AdaLN-Zero on both streams, the joint attention, then an MLP per stream (FLUX's double block, Qwen's names)."""

    def __init__(self, dim, n_heads):
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))  # shift, scale, gate for attention and MLP
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = Attention(dim, n_heads, context=True)
        self.img_mlp, self.txt_mlp = FeedForward(dim), FeedForward(dim)

    def forward(self, img, txt, emb, cos, sin, mask):  # img (B, Li, dim), txt (B, Lt, dim), emb (B, dim)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.img_mod(emb).chunk(6, dim=1)
        t_shift, t_scale, t_gate, t_shift_mlp, t_scale_mlp, t_gate_mlp = self.txt_mod(emb).chunk(6, dim=1)
        a_img, a_txt = joint_attention(self.attn, modulate(layer_norm(img), shift, scale),
                                       modulate(layer_norm(txt), t_shift, t_scale), cos, sin, mask)
        img = img + gate[:, None] * a_img
        txt = txt + t_gate[:, None] * a_txt
        img = img + gate_mlp[:, None] * self.img_mlp(modulate(layer_norm(img), shift_mlp, scale_mlp))
        txt = txt + t_gate_mlp[:, None] * self.txt_mlp(modulate(layer_norm(txt), t_shift_mlp, t_scale_mlp))
        if img.dtype == torch.float16:  # as diffusers: keep fp16 activations finite
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt


def check_config(config):
    """Fill diffusers' defaults; refuse what this Qwen-Image does not build, in one line."""
    cfg = {**DEFAULTS, **{k: v for k, v in config.items() if k in DEFAULTS}}
    cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
    axes, out = cfg["axes_dims_rope"], cfg["out_channels"] or cfg["in_channels"]
    if cfg["patch_size"] != 2:
        raise ValueError(f"unsupported Qwen-Image config: patch_size={cfg['patch_size']} (the latents are packed 2x2)")
    if cfg["in_channels"] != 4 * out:
        raise ValueError(f"unsupported Qwen-Image config: in_channels {cfg['in_channels']} must be 4 x out_channels "
                         f"{out} (2x2 packed latents in, latents out)")
    if len(axes) != 3 or any(d % 2 for d in axes) or sum(axes) != cfg["attention_head_dim"]:
        raise ValueError(f"unsupported Qwen-Image config: axes_dims_rope {axes} must be 3 even sizes summing to "
                         f"attention_head_dim {cfg['attention_head_dim']}")
    if cfg["guidance_embeds"]:
        raise ValueError("unsupported Qwen-Image config: guidance_embeds=True (no release is guidance-distilled and "
                         "diffusers builds no guidance embedder for it)")
    for key in ("use_additional_t_cond", "use_layer3d_rope"):
        if cfg[key]:
            raise ValueError(f"unsupported Qwen-Image config: {key}=True (Qwen-Image-Layered's, not built here)")
    return cfg


class QwenImage(nn.Module):
    """QwenImageTransformer2DModel built from its diffusers config dict (m.config), diffusers module names."""

    def __init__(self, config):
        super().__init__()
        self.config = cfg = check_config(config)
        dim, n_heads = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["num_attention_heads"]
        self.gradient_checkpointing = False  # training: recompute each block in backward
        self.prediction_type = "flow"  # the output is the velocity eps - x0
        self.latent_channels = cfg["in_channels"] // 4  # of the VAE latents it denoises: it packs 2x2 of them
        self.time_text_embed = nn.Module()
        self.time_text_embed.timestep_embedder = MLP(256, dim)
        self.txt_norm = RMSNorm(cfg["joint_attention_dim"])
        self.img_in = nn.Linear(cfg["in_channels"], dim)
        self.txt_in = nn.Linear(cfg["joint_attention_dim"], dim)
        self.transformer_blocks = nn.ModuleList([Block(dim, n_heads) for _ in range(cfg["num_layers"])])
        self.norm_out = AdaLN(dim, 2)  # (scale, shift)
        self.proj_out = nn.Linear(dim, 4 * self.latent_channels)

    @property
    def dtype(self):
        return self.proj_out.weight.dtype

    def unused(self):
        """Names of the parameters that feed nothing (as in diffusers): the last block's text path after its keys and
        values, since no block follows to read the text stream. A full fine-tune leaves them out of training."""
        last = f"transformer_blocks.{len(self.transformer_blocks) - 1}."
        dead = ("attn.add_q_proj.", "attn.norm_added_q.", "attn.to_add_out.", "txt_mlp.")
        return [n for n, _ in self.named_parameters() if n.startswith(last) and n[len(last):].startswith(dead)]

    def forward(self, x, t, context, mask=None):
        """x (B, 16, h, w), t (B,) = sigma * 1000 (diffusers' model takes sigma), context (B, L, 3584) the text
        encoder's states, mask (B, L) bool (True = a real token; None: no padding) -> velocity (B, 16, h, w)."""
        B, _, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Qwen-Image packs 2x2 latent patches: h and w must be even, got {h}x{w}")
        if mask is not None and tuple(mask.shape) != tuple(context.shape[:2]):
            raise ValueError(f"mask {tuple(mask.shape)} must be (B, L) of context {tuple(context.shape)}")
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        img = self.img_in(pack(x))  # (B, h/2 * w/2, dim)
        if mask is not None and kernels.planning():  # bench/plan.py's shapes without values: every token real
            mask = None
        if mask is not None:  # padding after every row's last real token changes nothing: left out
            mask = mask.to(device=x.device, dtype=torch.bool)
            n = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
            context, mask = context[:, :n], mask[:, :n]
            mask = None if mask.all() else mask  # no padding left: the fast kernel
        txt = self.txt_in(self.txt_norm(context))  # (B, L, dim)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)  # (B,)
        emb = self.time_text_embed.timestep_embedder(timestep_embedding(t, 256, True, 0).to(img.dtype))  # (B, dim)
        cos, sin = rope(position_ids(txt.shape[1], h // 2, w // 2, x.device), self.config["axes_dims_rope"])
        for block in self.transformer_blocks:
            img, txt = run(block, img, txt, emb, cos, sin, mask, checkpointing=ckpt)
        scale, shift = self.norm_out(emb)
        return unpack(self.proj_out(modulate(layer_norm(img), shift, scale)), h, w)  # (B, 16, h, w)


# ----------------------------------------------------------------------------------------------------
# Loading and saving


def single_file_config(ckpt, path):
    """(config read off a ComfyUI single file's shapes, its key prefix): the file holds no config."""
    prefix = PREFIX if PREFIX + "img_in.weight" in ckpt else ""
    shaped = ("img_in.weight", "txt_norm.weight", "txt_in.weight", "transformer_blocks.0.attn.norm_q.weight",
              "proj_out.weight")  # what the config is read off
    if any(prefix + k not in ckpt for k in shaped):
        raise CheckpointError(f"{path}: not a Qwen-Image transformer file (no [{PREFIX}]{', '.join(shaped)})")
    keys = [k[len(prefix):] for k in ckpt.keys() if k.startswith(prefix)]
    dim, in_channels = ckpt.shape(prefix + "img_in.weight")
    d = ckpt.shape(prefix + "transformer_blocks.0.attn.norm_q.weight")[0]  # the head dim
    config = dict(DEFAULTS, in_channels=in_channels, out_channels=ckpt.shape(prefix + "proj_out.weight")[0] // 4,
                  num_layers=max(int(k.split(".")[1]) for k in keys if k.startswith("transformer_blocks.")) + 1,
                  attention_head_dim=d, num_attention_heads=dim // d,
                  joint_attention_dim=ckpt.shape(prefix + "txt_in.weight")[1],
                  axes_dims_rope=(d // 8, 7 * d // 16, 7 * d // 16),  # Qwen-Image's 16:56:56 split of its head dim
                  zero_cond_t=prefix + MARKER in ckpt,
                  use_additional_t_cond=prefix + "time_text_embed.addition_t_embedding.weight" in ckpt)
    return config, prefix


def _open(path):
    """(config, checkpoint, key prefix): a diffusers folder's keys have none, a single file's "" or PREFIX."""
    kind, where = weights.component(path, "transformer")
    if kind == "file":
        ckpt = weights.Checkpoint(where)
        config, prefix = single_file_config(ckpt, where)
        return config, ckpt, prefix
    if weights.read_config(where).get("_class_name") == "QwenImage21Transformer2DModel":
        raise CheckpointError(f"{where} holds Qwen-Image 2.x (QwenImage21Transformer2DModel), a different network "
                              f"than {CLASS}: not supported")
    config, ckpt = weights.diffusers_folder(where, CLASS)
    return config, ckpt, ""


def read_config(path) -> dict:
    """The config of a model path (a folder's config.json, or read off a single file's shapes), no weights read."""
    return _open(path)[0]


def load(path, device="cpu", dtype=torch.float32, norm_dtype=None, quantize=None):
    """A Qwen-Image transformer from a diffusers folder (root or transformer/) or a ComfyUI single file, straight into
    dtype (norm scales into norm_dtype when given: weights.layer_dtypes; quantize: its Linear layers in that format,
    weights.load_module). Strict: missing and unexpected keys are named."""
    config, ckpt, prefix = _open(path)
    try:
        with torch.device("meta"):
            m = QwenImage(config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    sources = {k[len(prefix):]: (lambda k=k: ckpt[k]) for k in ckpt.keys()
               if k.startswith(prefix) and k != prefix + MARKER}
    what = f"Qwen-Image transformer {ckpt.files[0]}"
    return weights.load_module(m, sources, weights.layer_dtypes(m, dtype, norm_dtype), device, what, quantize)


def save(m, path, layout="diffusers", metadata=None):
    """path/ config.json + diffusion_pytorch_model.safetensors (QwenImageTransformer2DModel.from_pretrained loads it);
    ComfyUI's single files are read, not written."""
    if layout != "diffusers":
        raise ValueError(f"Qwen-Image transformers are saved in the diffusers layout only, not {layout!r}")
    config = {"_class_name": CLASS, **m.config, "axes_dims_rope": list(m.config["axes_dims_rope"])}
    weights.save_diffusers(m.state_dict(), config, path, metadata)
