"""LoRA (Hu et al. 2021, arXiv:2106.09685) for the UNet: train a low-rank update B A of chosen Linear layers.

    W x  ->  W x + (alpha / r) B A x,      A (r, in) Gaussian-initialized, B (out, r) zero: at step 0 nothing changes

The base model stays frozen in the compute dtype; only A and B (fp32) train, so the policy costs ~2 bytes per base
parameter instead of the full fine-tune's 8+ (fp32 weights, fp32 gradients, optimizer state), and the Diffusion-DPO
reference needs no copy at all: it is the same UNet with the adapters switched off (`disabled`).

Module names follow PEFT: the adapted layer keeps its name (its base weight loads and saves as before) and gains
children lora_A and lora_B, so `save` writes the file diffusers' `pipeline.load_lora_weights(folder)` reads:
pytorch_lora_weights.safetensors with keys "unet.<layer>.lora_A.weight" / "unet.<layer>.lora_B.weight". The scale
alpha/r is folded into B there, so the file needs no alpha metadata (diffusers then assumes alpha = r).
"""
import contextlib
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import families
import kernels
import optim
import weights

FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE


def prefix_of(model) -> str:
    """unet. or transformer.: where diffusers' load_lora_weights looks for this denoiser's adapters (its family's
    subfolder, families.py)."""
    return families.of_model(model).subfolder + "."


def _kind(prefix) -> str:
    """'a UNet (SD1.5 / SDXL)': the denoisers whose LoRA keys start with prefix, in words."""
    fams = [f for f in families.FAMILIES if f.subfolder + "." == prefix]
    return f"a {fams[0].kind} ({' / '.join(f.title for f in fams)})"


class LoRALinear(nn.Linear):
    """A Linear plus a switchable low-rank update; weight and bias keep their names, so base checkpoints load. A
    quantized base (kernels.QuantLinear, --quantize) stays one: its codes in `quantized`, the bias here."""

    def __init__(self, base, rank: int, alpha: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.quantized = base if isinstance(base, kernels.QuantLinear) else None
        self.weight = base.weight if self.quantized is None else None  # the base parameters themselves, not copies
        self.bias = base.bias
        if self.quantized is not None:
            self.quantized.bias = None  # (the bias lives here, under its checkpoint name)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        self.scale, self.enabled = alpha / rank, True

    def forward(self, x):  # x (..., in)
        if self.quantized is None:
            y = F.linear(x, self.weight, self.bias)  # (..., out) the base layer, exactly as nn.Linear
        else:
            y = kernels.qlinear(x, self.quantized.weight, self.bias)  # (..., out) W dequantized in the matmul
        if not self.enabled:
            return y
        return y + self.scale * self.lora_B(self.lora_A(x))


def add(unet: nn.Module, rank: int, alpha: float = None, targets=None, seed: int = 0) -> list:
    """Freeze unet and adapt every Linear whose name ends in a target; returns the trainable parameters (fp32).
    A is drawn with std 1/r with a generator keyed by seed (PEFT's init_lora_weights="gaussian"), B is zero.
    targets: layer-name suffixes (default: the model's family's lora_targets, families.py)."""
    if rank < 1:
        raise ValueError(f"--lora must be a rank >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    targets = families.of_model(unet).lora_targets if targets is None else targets
    unet.requires_grad_(False)
    names = [n for n, m in unet.named_modules() if type(m) in (nn.Linear, kernels.QuantLinear)
             and n.endswith(tuple(targets))]
    if not names:
        raise ValueError(f"LoRA: no Linear layer of the UNet ends in any of {', '.join(targets)}")
    g = torch.Generator().manual_seed(seed)
    params = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        layer = LoRALinear(unet.get_submodule(name), rank, alpha)
        a = torch.randn(layer.lora_A.weight.shape, generator=g) / rank  # (r, in), std 1/r
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.zero_()
        setattr(unet.get_submodule(parent_name), child, layer)  # ModuleList children are named "0", "1", ...
        params += [layer.lora_A.weight, layer.lora_B.weight]
    return params


def layers(unet) -> dict:
    """name -> LoRALinear of an adapted UNet (empty if none)."""
    return {n: m for n, m in unet.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def disabled(unet):
    """Run the base model: Diffusion-DPO's frozen reference, with no second UNet in memory."""
    adapted = list(layers(unet).values())
    for m in adapted:
        m.enabled = False
    try:
        yield
    finally:
        for m in adapted:
            m.enabled = True


class Reference:
    """The reference of a LoRA run as a callable like a UNet, under no_grad: the policy with its adapters off (the
    base), or with `adapters` (the policy's adapters at a --ref_update refresh) in place of the trained ones."""

    def __init__(self, unet):
        self.unet, self.adapters = unet, None

    def __call__(self, *args):
        if self.adapters is None:
            run = disabled(self.unet)
        else:
            run = optim.swapped([p for p in self.unet.parameters() if p.requires_grad], self.adapters)
        with torch.no_grad(), run:
            return self.unet(*args)


def reference(unet):
    """The reference of a LoRA run: the base (the policy with its adapters off) until a refresh gives it adapters."""
    return Reference(unet)


def state_dict(unet) -> dict:
    """The adapters in the diffusers/PEFT file layout, the scale folded into B, fp32 (FSDP shards stay sharded:
    parallel.gathered makes them whole)."""
    sd, prefix = {}, prefix_of(unet)
    for name, m in layers(unet).items():
        sd[f"{prefix}{name}.lora_A.weight"] = m.lora_A.weight.detach().float()
        sd[f"{prefix}{name}.lora_B.weight"] = m.scale * m.lora_B.weight.detach().float()
    return sd


def save(sd, folder, metadata=None):
    """folder/pytorch_lora_weights.safetensors (diffusers: pipe.load_lora_weights(folder)), written atomically."""
    os.makedirs(folder, exist_ok=True)
    weights.save_safetensors(sd, os.path.join(folder, FILE), {"format": "pt", **(metadata or {})})


def pairs(sd, where, meta=None, prefix="unet.") -> dict:
    """layer name -> (A (r, in), B (out, r)) of a file-layout state dict, the scale folded into B: ours have it
    folded already; diffusers' say alpha and r in their metadata (unet.lora_alpha, unet.r), when not 1. prefix:
    the denoiser's (prefix_of), unet. or transformer."""
    meta = meta or {}
    others = {f.subfolder + "." for f in families.FAMILIES} - {prefix}  # the other denoisers' LoRA prefixes
    other = next((p for p in sorted(others) if sd and all(k.startswith(p) for k in sd)), None)
    if other:
        raise weights.CheckpointError(f"{where}: a LoRA of {_kind(other)}, and this model's denoiser is "
                                      f"{_kind(prefix)}: give the LoRA of a model of this family")
    found, bad = {}, []
    for key, t in sd.items():
        if not key.startswith(prefix) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            bad.append(key)
            continue
        name, which = key[len(prefix):].rsplit(".", 2)[:2]
        found.setdefault(name, {})[which] = t
    if bad:
        raise weights.CheckpointError(f"{where}: not a LoRA of {_kind(prefix)} in the diffusers/PEFT layout "
                                      f"(unexpected keys {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    out = {}
    for name, p in found.items():
        if set(p) != {"lora_A", "lora_B"}:
            raise weights.CheckpointError(f"{where}: {name} has {', '.join(sorted(p))} only (need lora_A and lora_B)")
        r = p["lora_A"].shape[0]
        scale = float(meta.get(f"{prefix}lora_alpha", r)) / float(meta.get(f"{prefix}r", r))
        out[name] = (p["lora_A"].float(), scale * p["lora_B"].float())
    return out


def read(path, prefix="unet.") -> dict:
    """pairs() of a LoRA file: the file, a folder holding pytorch_lora_weights.safetensors, or dpo.py's out_dir."""
    f = path
    for where in (os.path.join(path, FILE), os.path.join(path, "lora", FILE)):  # the lora/ folder or its out_dir
        f = where if os.path.isfile(where) else f
    if not os.path.isfile(f):
        raise weights.CheckpointError(f"{path}: no LoRA file (expected {FILE} in a folder, or a .safetensors file)")
    ckpt = weights.Checkpoint(f)
    meta = json.loads(ckpt.metadata.get("lora_adapter_metadata", "{}"))
    return pairs({k: ckpt[k] for k in ckpt.keys()}, f, meta, prefix)


@torch.no_grad()
def merge(unet, adapters: dict):
    """W += B A for every layer of adapters (pairs()' dict): the plain UNet a LoRA run leaves, or a LoRA applied
    for sampling. A layer the UNet lacks, or whose shape differs, is an error naming it."""
    modules = dict(unet.named_modules())
    fam = families.of_model(unet)
    this = f"this {fam.title} {fam.kind}"  # (FLUX's, Qwen-Image's and Z-Image's LoRAs share the prefix transformer.)
    for name, (A, B) in adapters.items():
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            raise weights.CheckpointError(f"LoRA layer {name}: {this} has no Linear of that name (a LoRA of another "
                                          "model?)")
        if (B.shape[0], A.shape[1]) != tuple(m.weight.shape) or A.shape[0] != B.shape[1]:
            raise weights.CheckpointError(f"LoRA layer {name}: B {tuple(B.shape)} A {tuple(A.shape)} do not fit "
                                          f"the weight {tuple(m.weight.shape)} of {this} (a LoRA of another size?)")
        delta = B.to(m.weight.device) @ A.to(m.weight.device)  # (out, in) fp32
        m.weight.copy_((m.weight.float() + delta).to(m.weight.dtype))
    return unet
