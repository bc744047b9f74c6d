"""Fused paired-noise Diffusion-DPO loss: one Triton pass for the forward, one for the gradient.

Layout: model_pred and ref_pred are (2B, C, H, W) with the B winners first and the B losers after;
noise (B, C, H, W) is shared by winner i and loser i. With N = C*H*W and mse = per-sample mean:
    inner_i = -0.5 * beta * ((mse_w - mse_l) - (ref_mse_w - ref_mse_l))
    loss    = mean_i -logsigmoid(inner_i) = mean_i softplus(-inner_i)
The forward kernel reads each prediction and the noise exactly once (noise once for both halves)
and writes per-chunk partial sums; the backward is closed form:
    dL/dinner_i = -sigmoid(-inner_i) / B,  dinner/dmse_w = -beta/2,  dinner/dmse_l = +beta/2,
    dmse/dx = 2 (x - noise) / N
so grad(model_w) = c_i (model_w - noise), grad(model_l) = -c_i (model_l - noise),
    c_i = beta * sigmoid(-inner_i) / (B * N),
written by one elementwise kernel with no intermediate tensor of the predictions' size.
Beside them: the autograd.Function, its allocation model, the public dpo_loss, dpo_loss_ref, and the self-check
`python kernels/fused_dpo_loss.py` (against the reference; on a GPU it also times itself).
"""
import os
import sys

if __package__ in (None, ""):  # run as a script: be the package's module (kernels/__init__ sets the interpreter up)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "kernels"
    import kernels  # noqa: F401

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .dispatch import planning, use_triton  # noqa: E402

BLOCK = 2048  # elements of one sample handled by one program (both kernels)


@triton.jit
def _dpo_sse_kernel(MODEL, REF, NOISE, PARTIAL, B, N, n_chunks, BLOCK: tl.constexpr):
    """Program (i, c): sums of squared errors of pair i over chunk c, for the 4 predictions."""
    i = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    win = i * N + offs  # row i of the (2B, N) predictions: winner
    lose = (i + B) * N + offs  # row B + i: loser
    noise = tl.load(NOISE + i * N + offs, mask=mask, other=0.0).to(tl.float32)  # read once, used 4x
    mw = tl.load(MODEL + win, mask=mask, other=0.0).to(tl.float32) - noise
    ml = tl.load(MODEL + lose, mask=mask, other=0.0).to(tl.float32) - noise
    rw = tl.load(REF + win, mask=mask, other=0.0).to(tl.float32) - noise
    rl = tl.load(REF + lose, mask=mask, other=0.0).to(tl.float32) - noise
    # PARTIAL is fp32 (4, B, n_chunks); reduced by a deterministic torch .sum afterwards (no atomics)
    out = PARTIAL + i * n_chunks + c
    stride = B * n_chunks
    tl.store(out, tl.sum(mw * mw, 0))
    tl.store(out + stride, tl.sum(ml * ml, 0))
    tl.store(out + 2 * stride, tl.sum(rw * rw, 0))
    tl.store(out + 3 * stride, tl.sum(rl * rl, 0))


@triton.jit
def _dpo_grad_kernel(MODEL, NOISE, COEF, GRAD, B, N, BLOCK: tl.constexpr):
    """Program (r, c): grad[r] = coef[r] * (model[r] - noise[r mod B]) over chunk c of row r."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    coef = tl.load(COEF + r)  # fp32 scalar: +c_i for winners, -c_i for losers (times grad_output)
    x = tl.load(MODEL + r * N + offs, mask=mask, other=0.0).to(tl.float32)
    noise = tl.load(NOISE + (r % B) * N + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(GRAD + r * N + offs, (coef * (x - noise)).to(GRAD.dtype.element_ty), mask=mask)


def _check(model_pred, ref_pred, noise):
    """The layout both paths expect: predictions (2B, ...) winners first, noise (B, ...) shared by each pair."""
    n = model_pred.shape[0]
    if model_pred.shape != ref_pred.shape or n % 2 or noise.shape != (n // 2, *model_pred.shape[1:]):
        raise ValueError(f"dpo_loss expects model_pred and ref_pred (2B, C, H, W) and noise (B, C, H, W), got "
                         f"{tuple(model_pred.shape)}, {tuple(ref_pred.shape)} and {tuple(noise.shape)}")


def _epilogue(sse, N, beta):
    """From per-sample sums of squared errors (4, B) fp32 to (loss, inner, stats); shared with the ref."""
    mse = sse / N  # (4, B): model_w, model_l, ref_w, ref_l
    mw, ml, rw, rl = mse
    inner = -0.5 * beta * ((mw - ml) - (rw - rl))  # (B,)
    loss = F.softplus(-inner).mean()  # = mean(-logsigmoid(inner))
    with torch.no_grad():
        stats = {
            "implicit_acc": (inner > 0).float().mean(),  # ties (inner == 0) count as wrong
            "model_mse": mse[:2].mean(), "ref_mse": mse[2:].mean(),
            # policy's improvement over the reference on winners minus on losers (beta-free, >0 good)
            "reward_margin": ((rw - mw) - (rl - ml)).mean(),
            "model_mse_w": mw.mean(), "model_mse_l": ml.mean(),
            "ref_mse_w": rw.mean(), "ref_mse_l": rl.mean(),
        }
    return loss, inner, {k: v.detach() for k, v in stats.items()}


class DPOLoss(torch.autograd.Function):
    """Forward = one fused reduction kernel; backward = one elementwise kernel (closed-form grad).

    autograd.Function can only return tensors, so the stats are written into the `stats` dict arg.
    """

    @staticmethod
    def forward(ctx, model_pred, ref_pred, noise, beta, stats):
        model_pred, ref_pred, noise = model_pred.contiguous(), ref_pred.contiguous(), noise.contiguous()
        B = noise.shape[0]
        N = noise.numel() // B
        n_chunks = triton.cdiv(N, BLOCK)
        partial = torch.empty((4, B, n_chunks), device=noise.device, dtype=torch.float32)
        _dpo_sse_kernel[(B, n_chunks)](model_pred, ref_pred, noise, partial, B, N, n_chunks, BLOCK=BLOCK)
        loss, inner, s = _epilogue(partial.sum(-1), N, beta)  # (4, B) -> scalars
        stats.update(s)
        c = beta * torch.sigmoid(-inner) / (B * N)  # (B,) fp32
        ctx.save_for_backward(model_pred, noise, torch.cat([c, -c]))  # (2B,) per-row coefficient
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        model_pred, noise, coef = ctx.saved_tensors
        B = noise.shape[0]
        N = noise.numel() // B
        coef = (coef * grad_loss).contiguous()  # (2B,) fp32
        grad = torch.empty_like(model_pred)  # (2B, C, H, W), the only full-size allocation
        _dpo_grad_kernel[(2 * B, triton.cdiv(N, BLOCK))](model_pred, noise, coef, grad, B, N, BLOCK=BLOCK)
        return grad, None, None, None, None


class DPOLossMemory(torch.autograd.Function):
    """DPOLoss's allocation model: the tensors its forward and backward allocate, made empty, in the same order, with
    no kernel run (bench/plan.py counts the CUDA step with it): per-chunk partial sums, then one gradient."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, noise, beta):
        model_pred, ref_pred, noise = model_pred.contiguous(), ref_pred.contiguous(), noise.contiguous()
        B = noise.shape[0]
        N = noise.numel() // B
        partial = torch.empty((4, B, -(-N // BLOCK)), device=noise.device, dtype=torch.float32)
        loss, inner, _ = _epilogue(partial.sum(-1), N, beta)
        c = beta * torch.sigmoid(-inner) / (B * N)  # (B,)
        ctx.save_for_backward(model_pred, noise, torch.cat([c, -c]))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        model_pred, noise, coef = ctx.saved_tensors
        coef = (coef * grad_loss).contiguous()  # (2B,)
        return torch.empty_like(model_pred), None, None, None


def dpo_loss(model_pred, ref_pred, noise, beta):
    """Diffusion-DPO loss and detached stats; gradient flows to model_pred only."""
    _check(model_pred, ref_pred, noise)
    if planning():  # bench/plan.py: what the kernels would allocate, no compute (no stats)
        return DPOLossMemory.apply(model_pred, ref_pred.detach(), noise.detach(), float(beta)), {}
    if not use_triton(model_pred):
        return dpo_loss_ref(model_pred, ref_pred, noise, beta)
    stats = {}
    loss = DPOLoss.apply(model_pred, ref_pred.detach(), noise.detach(), float(beta), stats)
    return loss, stats


def dpo_loss_ref(model_pred, ref_pred, noise, beta):
    """Readable PyTorch version (autograd does the backward); accumulates in fp32 for any input dtype."""
    _check(model_pred, ref_pred, noise)
    B = noise.shape[0]
    target = noise.float().repeat(2, *([1] * (noise.dim() - 1)))  # (2B, C, H, W): same noise for w and l
    model_se = (model_pred.float() - target).pow(2).flatten(1).sum(1)  # (2B,)
    with torch.no_grad():
        ref_se = (ref_pred.float() - target).pow(2).flatten(1).sum(1)  # (2B,)
    sse = torch.stack([model_se[:B], model_se[B:], ref_se[:B], ref_se[B:]])  # (4, B)
    loss, _, stats = _epilogue(sse, noise[0].numel(), beta)
    return loss, stats


# ----------------------------------------------------------------------------------------------
# self-check: python kernels/fused_dpo_loss.py


def check(B, shape, dtype, tol):
    """Loss, stats and the gradient of the fused path against dpo_loss_ref for B pairs of images of shape (C, H, W)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(B, *shape, generator=g)
    model = (torch.cat([noise, noise]) + 0.3 * torch.randn(2 * B, *shape, generator=g)).to(dev, dtype)
    ref = (torch.cat([noise, noise]) + 0.3 * torch.randn(2 * B, *shape, generator=g)).to(dev, dtype)
    out = {}
    for name in ("triton", "ref"):
        x = model.clone().requires_grad_()
        if name == "triton":
            s = {}
            loss = DPOLoss.apply(x, ref, noise.to(dev, dtype), 50.0, s)
        else:
            loss, s = dpo_loss_ref(x, ref, noise.to(dev, dtype), 50.0)
        loss.backward()
        out[name] = (loss.item(), float(s["implicit_acc"]), x.grad.float())
    (la, aa, ga), (lb, ab, gb) = out["triton"], out["ref"]
    err = ((ga - gb).abs().max() / gb.abs().max()).item()
    ok = abs(la - lb) <= tol * max(1.0, abs(lb)) and aa == ab and err <= tol
    print(f"{'ok ' if ok else 'BAD'} B={B} {tuple(shape)} {str(dtype)[6:]}: loss {la:.6f} vs {lb:.6f}, "
          f"implicit_acc {aa:.3f} vs {ab:.3f}, max rel grad err {err:.1e}", flush=True)
    if not ok:
        raise SystemExit(f"dpo_loss differs from its reference by more than {tol}")


def bench(B, shape):
    """Forward + backward time (ms) and GB/s (reads of both predictions and the noise, one gradient written) of the
    fused kernels and of the eager reference, bf16."""
    from triton.testing import do_bench
    noise = torch.randn(B, *shape, device="cuda", dtype=torch.bfloat16)
    model = torch.randn(2 * B, *shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ref = torch.randn(2 * B, *shape, device="cuda", dtype=torch.bfloat16)
    gb = (3 * model.numel() + noise.numel()) * 2 / 1e9
    for name, fn in (("triton", dpo_loss), ("eager ref", dpo_loss_ref)):
        ms = do_bench(lambda: fn(model, ref, noise, 5000.0)[0].backward(), grad_to_none=[model])
        print(f"B={B} {tuple(shape)} fwd+bwd {name}: {ms:.3f} ms, {gb / ms * 1e3:.0f} GB/s", flush=True)


if __name__ == "__main__":
    if torch.cuda.is_available():
        check(4, (4, 128, 128), torch.bfloat16, 2e-2)  # SDXL latents at 1024^2
        bench(8, (4, 128, 128))
    else:  # Triton's interpreter: odd sizes (chunks that do not fill a block)
        check(3, (4, 9, 13), torch.float32, 1e-5)
        check(2, (4, 8, 8), torch.float16, 1e-2)
