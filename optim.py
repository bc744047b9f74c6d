"""The optimizers of the official Diffusion-DPO recipes (Adafactor for SDXL, AdamW for SD1.5) and the update that
steps them (warmup, clipping); an average of the trained weights (EMA) and running a model with other weights."""
import contextlib

import torch

import parallel


def build(name, params, lr, weight_decay, fused=False):
    """'adafactor' (SDXL: factored second moments, a few bytes per parameter) or 'adamw' (SD1.5)."""
    if name == "adafactor":
        return Adafactor(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, fused=fused)
    raise ValueError(f"unknown optimizer {name!r} (adafactor or adamw)")


def update(opt, scaler, trained, lr, warmup, grad_clip, step):
    """After the micro-steps' backward: the learning rate (linear warmup, then constant), unscaling (fp16), gradient
    clipping, the step; returns (lr, grad norm tensor)."""
    lr = lr * min(1.0, (step + 1) / warmup) if warmup else lr
    for g in opt.param_groups:
        g["lr"] = lr
    scaler.unscale_(opt)
    grad_norm = parallel.full(torch.nn.utils.clip_grad_norm_(trained, grad_clip))
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return lr, grad_norm


class Adafactor(torch.optim.Optimizer):
    """transformers.Adafactor as the official SDXL run used it (relative_step=False, scale_parameter=False, no
    momentum): factored second moments, update RMS clipped to 1, step = lr * update. torch.optim.Adafactor is a
    different rule: it always scales the step by max(1e-3, RMS(param)) and caps it at 1/sqrt(t)."""

    def __init__(self, params, lr, weight_decay=0.0, clip_threshold=1.0, decay_rate=-0.8, eps=1e-30):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, clip_threshold=clip_threshold,
                                      decay_rate=decay_rate, eps=eps))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in (p for p in g["params"] if p.grad is not None):
                grad, st = p.grad.float(), self.state[p]
                if not st:  # row/column statistics for matrices (and conv kernels), full ones for vectors
                    st["step"] = 0
                    if grad.dim() >= 2:
                        st["row"] = grad.new_zeros(grad.shape[:-1])  # mean over the last dim
                        st["col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])  # mean over the one before
                    else:
                        st["sq"] = torch.zeros_like(grad)
                st["step"] += 1
                beta2 = 1.0 - st["step"] ** g["decay_rate"]
                sq = grad * grad + g["eps"]
                if grad.dim() >= 2:
                    st["row"].lerp_(sq.mean(-1), 1 - beta2)
                    st["col"].lerp_(sq.mean(-2), 1 - beta2)
                    r = (st["row"] / st["row"].mean(-1, keepdim=True)).rsqrt_().unsqueeze(-1)
                    update = r * st["col"].unsqueeze(-2).rsqrt() * grad
                else:
                    update = st["sq"].lerp_(sq, 1 - beta2).rsqrt() * grad
                update /= (update.pow(2).mean().sqrt() / g["clip_threshold"]).clamp(min=1.0)
                if g["weight_decay"]:
                    p.add_(p, alpha=-g["weight_decay"] * g["lr"])
                p.add_(update, alpha=-g["lr"])


class EMA:
    """An exponential moving average of the trained tensors, named as the model names them (sharded as they are):
    --ema's weights, and DiffusionNFT's old policy (Zheng et al. 2025: the trained weights' EMA, decay ramped)."""

    def __init__(self, model):
        self.values = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model, decay):
        """values <- decay * values + (1 - decay) * the model's trained tensors."""
        for n, p in model.named_parameters():
            if n in self.values:
                self.values[n].lerp_(p.detach(), 1 - decay)

    def swapped(self, model):
        """Run the model with the average in place of its trained tensors (they come back after)."""
        return swapped([p for n, p in model.named_parameters() if n in self.values], list(self.values.values()))


@contextlib.contextmanager
def swapped(params, values):
    """params hold values for the block, then their own again: a second set of weights in the same model (an EMA,
    a LoRA run's reference adapters), with no second model in memory."""
    with torch.no_grad():
        kept = [p.detach().clone() for p in params]
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, kept):
                p.copy_(v)
