"""GPU tests of the compiled (autotuned) Triton kernels at real SDXL / SD1.5 / SD3.5 / FLUX shapes, in bf16.

Skipped without CUDA. Rule for bf16: kernel error <= 2x the error of PyTorch's own bf16 SDPA (the quantized linear:
of dequantize-then-F.linear in bf16), both measured against an fp32 (fp64) reference (plus a small absolute floor,
see _check).
"""
import pytest
import torch
import torch.nn.functional as F

import kernels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _fwd_bwd(fn, q, k, v, g, dtype):
    xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    o = fn(*xs)
    grads = torch.autograd.grad(o, xs, g.to(dtype))
    return [t.detach().float() for t in (o, *grads)]


def _check(B, H, Lq, Lk, D, causal=False, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device="cuda", generator=gen) for L in (Lq, Lk, Lk))
    g = torch.randn(B, H, Lq, D, device="cuda", generator=gen)
    ref = _fwd_bwd(lambda a, b, c: kernels.attention_ref(a, b, c, causal=causal), q, k, v, g, torch.float32)
    out = _fwd_bwd(lambda a, b, c: kernels.attention(a, b, c, causal=causal), q, k, v, g, dtype)
    sdpa = _fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal), q, k, v, g, dtype)
    for name, r, o, s in zip(("o", "dq", "dk", "dv"), ref, out, sdpa):
        assert torch.isfinite(o).all(), name
        err, torch_err = (o - r).abs().max().item(), (s - r).abs().max().item()
        # floor: 1e-3 * the tensor's scale (bf16 epsilon is 7.8e-3), for the case torch_err ~ 0
        floor = 1e-3 * r.abs().max().item()
        assert err <= 2 * torch_err + floor, f"{name}: kernel err {err:.3e} vs torch bf16 err {torch_err:.3e}"


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("DPO_KERNELS", "triton")


# SDXL at 1024^2 (head dim 64): self-attention at 64^2 and 32^2 latents, cross-attention to 77 tokens
@pytest.mark.parametrize("B,H,Lq,Lk,D", [
    (2, 10, 4096, 4096, 64), (2, 20, 1024, 1024, 64), (2, 10, 4096, 77, 64), (2, 20, 1024, 77, 64)])
def test_attention_sdxl_bf16(B, H, Lq, Lk, D):
    _check(B, H, Lq, Lk, D)


# SD1.5 at 512^2 (8 heads): head dims 40 / 80 / 160, self and cross
@pytest.mark.parametrize("B,H,Lq,Lk,D", [
    (2, 8, 4096, 4096, 40), (2, 8, 1024, 1024, 80), (2, 8, 256, 256, 160),
    (2, 8, 4096, 77, 40), (2, 8, 1024, 77, 80), (2, 8, 256, 77, 160)])
def test_attention_sd15_bf16(B, H, Lq, Lk, D):
    _check(B, H, Lq, Lk, D)


# The flow transformers' joint attention at 1024^2 (image + text tokens in one sequence): SD3.5-medium 4096 + 333
# tokens (77 CLIP + 256 T5), head dim 64; FLUX.1-dev 4096 + 512, head dim 128
@pytest.mark.parametrize("B,H,Lq,Lk,D", [(1, 24, 4429, 4429, 64), (1, 24, 4608, 4608, 128)])
def test_attention_flow_bf16(B, H, Lq, Lk, D):
    _check(B, H, Lq, Lk, D)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_causal_text_encoder(dtype):
    """CLIP text encoder: causal self-attention over 77 tokens, head dim 64."""
    _check(4, 12, 77, 77, 64, causal=True, dtype=dtype)


@pytest.mark.parametrize("tf32", [False, True])
def test_attention_fp32_follows_torch_tf32_setting(monkeypatch, tf32):
    """fp32 inputs: exact fp32 dots by default (torch's default), TF32 tensor cores once torch allows TF32."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(2, 4, L, 64, device="cuda", generator=gen) for L in (333, 77, 77))
    g = torch.randn(2, 4, 333, 64, device="cuda", generator=gen)
    ref = _fwd_bwd(kernels.attention_ref, q, k, v, g, torch.float64)  # fp64: the oracle whatever TF32 says
    out = _fwd_bwd(kernels.attention, q, k, v, g, torch.float32)
    for name, r, o in zip(("o", "dq", "dk", "dv"), ref, out):
        rel = ((o - r).abs().max() / r.abs().max()).item()
        assert rel < (1e-2 if tf32 else 1e-4), f"{name}: {rel:.2e}"  # TF32 keeps 10 mantissa bits
        if tf32 and name == "o":
            assert rel > 1e-6, "TF32 allowed but the result is exact: the setting was not followed"


def test_attention_strided_views():
    """(B, L, H, D) buffers viewed as (B, H, L, D), as the UNet produces them."""
    x = torch.randn(2, 1024, 3, 10, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    torch.testing.assert_close(kernels.attention(q, k, v).float(), kernels.attention_ref(q, k, v).float(),
                               rtol=2e-2, atol=2e-2)


def test_dpo_loss_bf16_sdxl_latents():
    """[2*4, 4, 128, 128] bf16 predictions: loss, stats and gradient vs the fp32 reference."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, shape = 4, (4, 128, 128)
    noise = torch.randn(B, *shape, device="cuda", generator=gen)
    model = (noise.repeat(2, 1, 1, 1) + 0.3 * torch.randn(2 * B, *shape, device="cuda", generator=gen)).bfloat16()
    ref = (noise.repeat(2, 1, 1, 1) + 0.3 * torch.randn(2 * B, *shape, device="cuda", generator=gen)).bfloat16()
    m1, m2 = model.clone().requires_grad_(), model.float().requires_grad_()
    loss, stats = kernels.dpo_loss(m1, ref, noise, 5000.0)
    loss.backward()
    loss_ref, stats_ref = kernels.dpo_loss_ref(m2, ref.float(), noise, 5000.0)  # same bf16 values, fp32 math
    loss_ref.backward()
    assert m1.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m1.grad.float(), m2.grad, rtol=1e-2, atol=1e-2 * m2.grad.abs().max().item())
    for key in stats_ref:
        torch.testing.assert_close(stats[key], stats_ref[key], rtol=1e-4, atol=1e-6)


def _qlinear_fwd_dx(fn, x, q, b, dy, dtype):
    x = x.detach().to(dtype).requires_grad_()
    y = fn(x, q, b.to(dtype))
    (dx,) = torch.autograd.grad(y, x, dy.to(dtype))
    return y.detach().double(), dx.double()


# FLUX.1's MLP down projection at 1024^2 (4096 + 512 tokens, 12288 -> 3072), SDXL's feed-forward up projection at
# 32x32 latents (1024 tokens, 1280 -> 5120), CLIP-L's MLP on a batch of two prompts (2 x 77 tokens: ragged tiles)
@pytest.mark.parametrize("lead,N,K", [((4608,), 3072, 12288), ((1024,), 5120, 1280), ((2, 77), 3072, 768)])
@pytest.mark.parametrize("fmt", ["fp8", "int8", "nf4"])
def test_qlinear_bf16(fmt, lead, N, K, monkeypatch):
    """y and dx of the kernels in bf16 against fp64 math on the same quantized weight (one config, not autotuned:
    the GPU check's time limit; kernels/bench.py autotunes)."""
    from kernels import quantized_linear
    monkeypatch.setattr(quantized_linear, "FORCE_BLOCKS", (128, 64, 64))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = kernels.quantize(torch.randn(N, K, device="cuda", generator=gen) / K ** 0.5, fmt)
    x = torch.randn(*lead, K, device="cuda", generator=gen)
    b, dy = torch.randn(N, device="cuda", generator=gen), torch.randn(*lead, N, device="cuda", generator=gen)
    ref = _qlinear_fwd_dx(kernels.qlinear_ref, x, q, b, dy, torch.float64)
    out = _qlinear_fwd_dx(kernels.qlinear, x, q, b, dy, torch.bfloat16)
    eager = _qlinear_fwd_dx(kernels.qlinear_ref, x, q, b, dy, torch.bfloat16)  # dequantize, then F.linear
    for name, r, o, e in zip(("y", "dx"), ref, out, eager):
        assert torch.isfinite(o).all(), name
        err, torch_err = (o - r).abs().max().item(), (e - r).abs().max().item()
        floor = 1e-3 * r.abs().max().item()
        assert err <= 2 * torch_err + floor, f"{name}: kernel err {err:.3e} vs dequantize + F.linear {torch_err:.3e}"
