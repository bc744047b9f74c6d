"""CPU tests of the Triton kernels (run through the Triton interpreter) against PyTorch references.

Run: TRITON_INTERPRET=1 pytest tests/test_kernels.py   (the env var is also set below / by kernels/)
Shapes are small (the interpreter is slow) but hit the edge cases: odd lengths, Lq != Lk, padded
head dims, multi-block loops (forced small tiles), causal, non-contiguous inputs, fp16.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton` on CPU

import argparse  # noqa: E402
import importlib  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from bench import shadow  # noqa: E402

from kernels import flash_attention as attn_mod  # noqa: E402  (the modules behind kernels.attention / .dpo_loss)
from kernels import fused_dpo_loss as dpo_mod  # noqa: E402

needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU interpreter tests; tests/test_kernels_gpu.py covers CUDA")


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv("DPO_KERNELS", "triton")


def _blocks(monkeypatch, blocks):
    monkeypatch.setattr(attn_mod, "FORCE_BLOCKS", blocks)


def _fwd_bwd(fn, q, k, v, g, dtype):
    """Run fn on copies of q, k, v cast to dtype; return [o, dq, dk, dv] as float64."""
    xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    o = fn(*xs)
    grads = torch.autograd.grad(o, xs, g.to(dtype))
    return [t.detach().double() for t in (o, *grads)]


def _inputs(B, H, Lq, Lk, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for L in (Lq, Lk, Lk))
    g = torch.randn(B, H, Lq, D, generator=gen, dtype=torch.float64)  # upstream gradient dO
    return q, k, v, g


# (B, H, Lq, Lk, D, causal, forced (BLOCK_M, BLOCK_N) or None = interpreter default 64x64)
ATTN_CASES = [
    (2, 3, 37, 77, 40, False, (16, 32)),  # cross-attention shape, odd lengths, D pads 40 -> 64
    (1, 2, 77, 77, 64, False, (32, 16)),  # BLOCK_M > BLOCK_N, ragged last tiles
    (2, 2, 64, 77, 80, False, None),  # default 64x64 tiles: one query tile, two key tiles; D pads to 128
    (1, 1, 37, 64, 128, False, (16, 16)),
    (1, 1, 33, 77, 160, False, (16, 32)),  # D=160 pads to 256
    (1, 2, 77, 77, 64, True, (16, 32)),  # causal, BLOCK_M < BLOCK_N
    (2, 1, 37, 37, 40, True, (32, 16)),  # causal, BLOCK_M > BLOCK_N
    (2, 1, 37, 50, 64, False, None),  # both lengths < BLOCK = 64
    (1, 1, 1, 5, 64, False, None),  # single query, L << BLOCK
    (1, 2, 256 + 77, 256 + 77, 64, False, None),  # MMDiT's joint attention: image + text tokens, ragged last tile
    (1, 1, 144 + 23, 144 + 23, 128, False, (32, 64)),  # FLUX's: head dim 128, ragged, BLOCK_M < BLOCK_N
]


@needs_interpreter
@pytest.mark.parametrize("B,H,Lq,Lk,D,causal,blocks", ATTN_CASES)
def test_attention_fp32_matches_fp64_reference(monkeypatch, triton_path, B, H, Lq, Lk, D, causal, blocks):
    _blocks(monkeypatch, blocks)
    q, k, v, g = _inputs(B, H, Lq, Lk, D)
    ref = _fwd_bwd(lambda a, b, c: kernels.attention_ref(a, b, c, causal=causal), q, k, v, g, torch.float64)
    out = _fwd_bwd(lambda a, b, c: kernels.attention(a, b, c, causal=causal), q, k, v, g, torch.float32)
    for name, r, o in zip(("o", "dq", "dk", "dv"), ref, out):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@needs_interpreter
@pytest.mark.parametrize("B,H,Lq,Lk,D,causal,blocks", [ATTN_CASES[i] for i in (0, 2, 4, 5)])
def test_attention_fp16_error_within_2x_of_pytorch(monkeypatch, triton_path, B, H, Lq, Lk, D, causal, blocks):
    """fp16 rule: kernel error <= 2x the error of PyTorch's own fp16 SDPA (both vs fp64) + 1e-4.

    The 1e-4 absolute floor (about 1/10 of fp16's epsilon at unit scale) only matters if
    PyTorch's error happened to be ~0; the observed errors are ~5e-4..2e-3 for both.
    """
    _blocks(monkeypatch, blocks)
    q, k, v, g = _inputs(B, H, Lq, Lk, D, seed=1)
    ref = _fwd_bwd(lambda a, b, c: kernels.attention_ref(a, b, c, causal=causal), q, k, v, g, torch.float64)
    out = _fwd_bwd(lambda a, b, c: kernels.attention(a, b, c, causal=causal), q, k, v, g, torch.float16)
    sdpa = _fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal),
                    q, k, v, g, torch.float16)
    for name, r, o, s in zip(("o", "dq", "dk", "dv"), ref, out, sdpa):
        assert torch.isfinite(o).all(), name
        err, torch_err = (o - r).abs().max().item(), (s - r).abs().max().item()
        assert err <= 2 * torch_err + 1e-4, f"{name}: kernel err {err:.2e} vs torch fp16 err {torch_err:.2e}"


@needs_interpreter
def test_attention_non_contiguous_inputs_and_custom_scale(monkeypatch, triton_path):
    """q/k/v as .transpose views of (B, L, H, D) buffers, as the UNet produces them; scale kwarg."""
    _blocks(monkeypatch, (16, 32))
    B, H, Lq, Lk, D = 2, 3, 37, 45, 40
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(B, Lq, H, D, generator=gen).transpose(1, 2).requires_grad_()  # (B, H, Lq, D) view
    kv = torch.randn(B, Lk, 2, H, D, generator=gen)
    k, v = kv[:, :, 0].transpose(1, 2).requires_grad_(), kv[:, :, 1].transpose(1, 2).requires_grad_()
    assert not q.is_contiguous() and not k.is_contiguous()
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))  # leaves that are still strided views
    g = torch.randn(B, H, Lq, D, generator=gen)
    o = kernels.attention(q, k, v, scale=0.3)
    assert o.is_contiguous() and o.shape == (B, H, Lq, D)
    grads = torch.autograd.grad(o, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o_ref = kernels.attention_ref(q64, k64, v64, scale=0.3)
    ref_grads = torch.autograd.grad(o_ref, (q64, k64, v64), g.double())
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-4, atol=1e-5)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("path", ["triton", "torch", "plan"])
def test_attention_under_autocast_computes_in_its_dtype(monkeypatch, path):
    """SD3.5's / FLUX's fp32 qk-norm output meets a half v: every path casts to autocast's dtype, as SDPA's does."""
    monkeypatch.setenv("DPO_KERNELS", "torch" if path == "torch" else "triton")
    q, k, v, g = _inputs(1, 2, 37, 37, 64)
    q, k, v = q.float().requires_grad_(), k.float().requires_grad_(), v.half().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16), (kernels.allocation_models() if path == "plan" else
                                                      torch.autograd.set_grad_enabled(True)):
        o = kernels.attention(q, k, v)
        assert o.dtype == torch.float16
        if path == "plan":
            return
    o.backward(g.half())
    assert q.grad.dtype == k.grad.dtype == torch.float32 and v.grad.dtype == torch.float16
    want = kernels.attention_ref(q.double(), k.double(), v.double())
    torch.testing.assert_close(o.double(), want, rtol=0, atol=5e-3)


def test_attention_ref_matches_sdpa():
    """The oracle itself agrees with PyTorch's SDPA, causal and not, Lq != Lk."""
    q, k, v, _ = _inputs(2, 2, 13, 21, 40)
    torch.testing.assert_close(kernels.attention_ref(q, k, v), F.scaled_dot_product_attention(q, k, v))
    q, k, v, _ = _inputs(2, 2, 13, 13, 40)
    torch.testing.assert_close(kernels.attention_ref(q, k, v, causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))


# ----------------------------------------------------------------------------------------------
# DPO loss


def _dpo_inputs(B, shape, dtype=torch.float32, noise_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(B, *shape, generator=gen)
    # predictions near the noise (like a trained model) so the losses are O(0.1) and beta matters
    model = noise.repeat(2, 1, 1, 1) + 0.3 * torch.randn(2 * B, *shape, generator=gen)
    ref = noise.repeat(2, 1, 1, 1) + 0.3 * torch.randn(2 * B, *shape, generator=gen)
    return model.to(dtype), ref.to(dtype), noise.to(noise_dtype or dtype)


def _dpo_by_hand(model, ref, noise, beta):
    """The formula written out in float64, with autograd for the reference gradient."""
    m = model.detach().double().requires_grad_()
    B = noise.shape[0]
    n = noise.double()
    mse = lambda x: ((x - torch.cat([n, n])) ** 2).mean(dim=(1, 2, 3))  # noqa: E731  (2B,)
    mm, rm = mse(m), mse(ref.double())
    inner = -0.5 * beta * ((mm[:B] - mm[B:]) - (rm[:B] - rm[B:]))
    loss = -F.logsigmoid(inner).mean()
    (grad,) = torch.autograd.grad(loss, m)
    return loss.detach(), grad, inner.detach(), mm.detach(), rm.detach()


@needs_interpreter
@pytest.mark.parametrize("B,shape", [(1, (4, 5, 7)), (3, (4, 5, 7)), (2, (4, 33, 35))])  # last: 3 chunks
@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_dpo_loss_matches_hand_formula(monkeypatch, impl, B, shape):
    monkeypatch.setenv("DPO_KERNELS", "triton")
    beta = 50.0
    model, ref, noise = _dpo_inputs(B, shape)
    model.requires_grad_()
    fn = kernels.dpo_loss if impl == "triton" else kernels.dpo_loss_ref
    loss, stats = fn(model, ref, noise, beta)
    loss.backward()
    loss64, grad64, inner, mm, rm = _dpo_by_hand(model, ref, noise, beta)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.grad.double(), grad64, rtol=1e-4, atol=1e-9)
    expected = {
        "implicit_acc": (inner > 0).double().mean(), "model_mse": mm.mean(), "ref_mse": rm.mean(),
        "model_mse_w": mm[:B].mean(), "model_mse_l": mm[B:].mean(),
        "ref_mse_w": rm[:B].mean(), "ref_mse_l": rm[B:].mean(),
        "reward_margin": ((rm[:B] - mm[:B]) - (rm[B:] - mm[B:])).mean(),
    }
    for key, val in expected.items():
        assert stats[key].dim() == 0 and not stats[key].requires_grad, key
        torch.testing.assert_close(stats[key].double(), val, rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")


@needs_interpreter
def test_dpo_loss_triton_equals_ref_with_grad_scaling(triton_path):
    """Kernel vs dpo_loss_ref under autograd, with a non-unit upstream gradient; ref_pred gets no grad."""
    model, ref, noise = _dpo_inputs(3, (4, 5, 7), seed=3)
    m1, m2 = model.clone().requires_grad_(), model.clone().requires_grad_()
    r1 = ref.clone().requires_grad_()
    loss1, stats1 = kernels.dpo_loss(m1, r1, noise, 20.0)
    loss2, stats2 = kernels.dpo_loss_ref(m2, ref, noise, 20.0)
    (3.0 * loss1).backward()
    (3.0 * loss2).backward()
    torch.testing.assert_close(loss1, loss2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m1.grad, m2.grad, rtol=1e-4, atol=1e-9)
    assert r1.grad is None
    assert stats1.keys() == stats2.keys()
    for key in stats1:
        torch.testing.assert_close(stats1[key], stats2[key], rtol=1e-5, atol=1e-7)


@needs_interpreter
@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_dpo_loss_identical_policy_and_reference_is_ln2(monkeypatch, impl):
    monkeypatch.setenv("DPO_KERNELS", impl if impl == "triton" else "torch")
    model, _, noise = _dpo_inputs(2, (4, 5, 7), seed=4)
    loss, stats = kernels.dpo_loss(model.clone().requires_grad_(), model.clone(), noise, 1000.0)
    assert abs(loss.item() - math.log(2)) < 1e-6
    assert stats["implicit_acc"].item() == 0.0  # inner == 0 exactly: ties count as not accurate
    assert abs(stats["reward_margin"].item()) < 1e-7


@needs_interpreter
def test_dpo_loss_fp16_preds_fp32_noise(triton_path):
    """Half-precision predictions with fp32 noise: upcast in the kernel, fp32 accumulation, fp16 grad."""
    model, ref, noise = _dpo_inputs(2, (4, 9, 11), dtype=torch.float16, noise_dtype=torch.float32, seed=5)
    model.requires_grad_()
    loss, stats = kernels.dpo_loss(model, ref, noise, 100.0)
    loss.backward()
    assert loss.dtype == torch.float32 and model.grad.dtype == torch.float16
    loss64, grad64, *_ = _dpo_by_hand(model, ref, noise, 100.0)  # same fp16 values, float64 math
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    # the only fp16 rounding is the final store of the gradient
    torch.testing.assert_close(model.grad.double(), grad64, rtol=2e-3, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# dispatcher


def test_use_triton_reads_env_at_call_time(monkeypatch):
    t = torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("DPO_KERNELS", "triton")
    assert kernels.use_triton(t)
    monkeypatch.setenv("DPO_KERNELS", "torch")
    assert not kernels.use_triton(t)
    monkeypatch.delenv("DPO_KERNELS")
    assert kernels.use_triton(t) == t.is_cuda
    monkeypatch.setenv("DPO_KERNELS", "cuda-please")
    with pytest.raises(ValueError):
        kernels.use_triton(t)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_bad_shapes_are_clear_errors(monkeypatch, path):
    """User input is checked with errors that say what was expected (not asserts, which python -O drops)."""
    monkeypatch.setenv("DPO_KERNELS", path)
    q = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"expects \(B, H, L, D\) tensors, got q \(2, 8, 16\)"):
        kernels.attention(q[0], q, q)
    with pytest.raises(ValueError, match=r"do not fit \(B, H, Lq, D\)"):
        kernels.attention(q, torch.zeros(1, 2, 8, 32), torch.zeros(1, 2, 8, 32))
    with pytest.raises(ValueError, match="causal attention needs Lq == Lk, got 8 and 4"):
        kernels.attention(q, q[:, :, :4], q[:, :, :4], causal=True)
    if path == "triton":
        with pytest.raises(ValueError, match="must share a dtype"):
            kernels.attention(q, q.double(), q.double())
    pred, noise = torch.zeros(4, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    for args in ((pred, pred[:2], noise), (pred[:3], pred[:3], noise), (pred, pred, noise[:1])):
        with pytest.raises(ValueError, match=r"dpo_loss expects model_pred and ref_pred \(2B, C, H, W\)"):
            kernels.dpo_loss(*args, 1.0)


def _spy(monkeypatch, module, name):
    """Replace module.name with a pass-through wrapper that counts calls."""
    calls = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _set_mode(monkeypatch, mode):
    """DPO_KERNELS=mode, or unset for None."""
    if mode is None:
        monkeypatch.delenv("DPO_KERNELS", raising=False)
    else:
        monkeypatch.setenv("DPO_KERNELS", mode)


@needs_interpreter
@pytest.mark.parametrize("mode", ["triton", "torch", None])
def test_attention_dispatch(monkeypatch, mode):
    _set_mode(monkeypatch, mode)
    launches = _spy(monkeypatch, attn_mod, "_attn_forward")
    sdpa_calls = _spy(monkeypatch, F, "scaled_dot_product_attention")
    q, k, v, _ = _inputs(1, 2, 9, 11, 16)
    q, k, v = q.float(), k.float(), v.float()
    o = kernels.attention(q, k, v)
    torch.testing.assert_close(o, kernels.attention_ref(q, k, v), rtol=1e-4, atol=1e-5)
    used_triton = mode == "triton"  # unset on CPU -> PyTorch
    assert len(launches) == int(used_triton) and len(sdpa_calls) == int(not used_triton)


@needs_interpreter
@pytest.mark.parametrize("mode", ["triton", "torch", None])
def test_dpo_loss_dispatch(monkeypatch, mode):
    _set_mode(monkeypatch, mode)
    kernel_calls = _spy(monkeypatch, dpo_mod.DPOLoss, "apply")  # the Triton autograd.Function
    ref_calls = _spy(monkeypatch, dpo_mod, "dpo_loss_ref")
    model, ref, noise = _dpo_inputs(2, (4, 5, 7))
    loss, _ = kernels.dpo_loss(model, ref, noise, 10.0)
    torch.testing.assert_close(loss, dpo_mod.dpo_loss_ref(model, ref, noise, 10.0)[0], rtol=1e-5, atol=1e-6)
    used_triton = mode == "triton"
    assert len(ref_calls) == 1 + int(not used_triton)  # +1: the comparison call above
    assert len(kernel_calls) == int(used_triton)


def test_fp32_dot_precision_follows_torch_tf32_setting(monkeypatch):
    """fp32 on CUDA uses TF32 exactly when torch allows it for matmuls; on CPU (interpreter) always exact."""
    cuda32 = types.SimpleNamespace(dtype=torch.float32, is_cuda=True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert attn_mod._precision(cuda32) == "tf32"
    assert attn_mod._precision(torch.zeros(1)) == "ieee"
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert attn_mod._precision(cuda32) == "ieee"


def test_autotune_prunes_big_tiles_for_large_head_dims():
    """D=160 pads to 256: only tiles up to 64x64 are kept; D<=128 keeps the full list."""
    for kernel in (attn_mod._attn_fwd_kernel, attn_mod._attn_bwd_dkdv_kernel, attn_mod._attn_bwd_dq_kernel):
        configs = attn_mod._configs(kernel)
        small = attn_mod._prune(configs, {}, BLOCK_D=256)
        assert small and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 for c in small)
        assert len(small) < len(configs)
        assert attn_mod._prune(configs, {}, BLOCK_D=64) == configs


_IMPORT_ORDER_SNIPPET = """
import os, torch
{pre}
import kernels
os.environ["DPO_KERNELS"] = "triton"
q = torch.randn(1, 2, 37, 40)
try:
    err = (kernels.attention(q, q, q) - kernels.attention_ref(q, q, q)).abs().max().item()
    print("OK" if err < 1e-4 else f"WRONG {err}")
except RuntimeError as e:
    print("ERROR", e)
"""


@needs_interpreter
@pytest.mark.parametrize("pre,expected", [
    ("", "OK"),  # `import kernels` turns the interpreter on by itself on a CPU-only machine
    ("import triton.language", "ERROR Triton kernels on CPU tensors need TRITON_INTERPRET=1"),  # too late
])
def test_interpreter_switch_depends_on_import_order(pre, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DPO_KERNELS")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _IMPORT_ORDER_SNIPPET.replace("{pre}", pre)], env=env, cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().startswith(expected), out.stdout + out.stderr


# bench.py runs bf16, which the interpreter computes wrongly (values are not checked here); it can overflow exp2
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")
def test_bench_script_runs_on_cpu_with_a_stub_timer(monkeypatch, triton_path, tmp_path):
    """kernels/bench.py needs a GPU for real numbers; here every code path runs once on tiny CPU shapes."""
    bench = importlib.import_module("kernels.bench")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "ATTN_SHAPES", [("tiny cross", 2, 37, 77, 40)])
    monkeypatch.setattr(bench, "LOSS_LATENT", (4, 8, 8))
    monkeypatch.setattr(bench, "COPY_NUMEL", 4096)
    monkeypatch.setattr(bench, "COMPILE", lambda fn: fn)  # inductor on CPU takes minutes; not under test

    def do_bench(fn, grad_to_none=None):
        fn()
        return 2.0  # ms

    args = argparse.Namespace(quick=False, batch=1, verbose=False)
    header = {"device": "cpu", "torch": torch.__version__, "triton": "interp"}
    attn = bench.bench_attention(args, do_bench, header)
    loss = bench.bench_dpo_loss(args, do_bench, header)
    ours = [r for r in attn if r["impl"] == "triton"]
    assert len(ours) == 1 and ours[0]["fwd_tflops"] is not None
    flops = 4 * 1 * 2 * 37 * 77 * 40  # 4 B H Lq Lk D
    assert ours[0]["flops_fwd"] == flops
    assert ours[0]["fwdbwd_tflops"] == pytest.approx(3.5 * flops / 2e-3 / 1e12)
    assert {r["impl"] for r in attn} >= {"triton", "sdpa_math"}
    assert [r["impl"] for r in loss] == ["triton", "eager_ref", "compiled_ref"] * 2
    assert all(r["gbs"] is not None for r in loss)
    bench.write_csv(tmp_path / "attention.csv", attn)
    assert (tmp_path / "attention.csv").read_text().startswith("device,torch,triton,shape")


def _no_launch(monkeypatch, module, *kernels):
    """The launchers' own allocations only: the Triton kernels (which allocate nothing on a GPU) are not run."""
    class Grid:
        def __getitem__(self, grid):
            return lambda *a, **k: None
    for k in kernels:
        monkeypatch.setattr(module, k, Grid())
    if hasattr(module, "_launch"):
        monkeypatch.setattr(module, "_launch", lambda *a, **k: None)


def _allocations(fn, *inputs, grad=None):
    """The sizes of what fn allocates, forward then backward, and the peak (on inputs without gradients yet)."""
    for x in inputs:
        x.grad = None
    c = shadow.Counter(shadow=False)
    with c:
        first = c.mark("forward")
        out = fn(*inputs)
        c.mark("backward")
        out.backward(grad if grad is not None else torch.ones_like(out))
        last = c.mark("end")
    return [c.size[e] for e in c.events if e >= 0], c.replay(first, last)[0]


def test_attention_allocation_model_is_what_the_kernel_allocates(monkeypatch):
    _no_launch(monkeypatch, attn_mod, "_attn_bwd_preprocess_kernel")
    q, k, v = (torch.randn(2, 3, n, 40, dtype=torch.bfloat16, requires_grad=True) for n in (40, 24, 24))
    do = torch.randn(2, 40, 3, 40, dtype=torch.bfloat16).transpose(1, 2)  # not contiguous, as in the UNet
    kernel = _allocations(lambda *a: attn_mod.FlashAttention.apply(*a, False, 0.25), q, k, v, grad=do)
    plan = _allocations(lambda *a: attn_mod.FlashAttentionMemory.apply(*a, False, 0.25), q, k, v, grad=do)
    assert kernel == plan
    assert 2 * 3 * 40 * 40 * 4 not in kernel[0]  # no L x L matrix (fp32 scores would be this size)


def test_dpo_loss_allocation_model_is_what_the_kernel_allocates(monkeypatch):
    _no_launch(monkeypatch, dpo_mod, "_dpo_sse_kernel", "_dpo_grad_kernel")
    pred = torch.randn(4, 4, 16, 16, dtype=torch.bfloat16, requires_grad=True)
    ref, noise = torch.randn(4, 4, 16, 16, dtype=torch.bfloat16), torch.randn(2, 4, 16, 16)
    kernel = _allocations(lambda *a: dpo_mod.DPOLoss.apply(*a, 5000.0, {}), pred, ref, noise)
    plan = _allocations(lambda *a: dpo_mod.DPOLossMemory.apply(*a, 5000.0), pred, ref, noise)
    assert kernel == plan


def test_allocation_models_stand_in_for_the_kernels_inside_the_switch(monkeypatch):
    """Inside kernels.allocation_models() the public functions run each file's allocation model (no compute: the
    outputs are the models' empty tensors), and callers are told the kernels' path; outside, nothing changes
    (kernels.sdpa is torch's SDPA)."""
    calls = []

    def record(name, real):
        def apply(*a):
            calls.append(name)
            return real(*a)
        return apply
    for mod, name in ((attn_mod, "FlashAttentionMemory"), (dpo_mod, "DPOLossMemory")):
        monkeypatch.setattr(getattr(mod, name), "apply", record(name, getattr(mod, name).apply))
    q = torch.randn(1, 2, 8, 16)
    model, ref, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.randn(1, 4, 4, 4)
    with kernels.allocation_models():
        assert kernels.use_triton(q)
        assert kernels.attention(q, q, q).shape == q.shape
        assert kernels.sdpa(q, q, q).shape == q.shape  # the VAE's attention, modelled the same way
        loss, stats = kernels.dpo_loss(model, ref, noise, 10.0)
        assert loss.shape == () and stats == {}
    assert calls == ["FlashAttentionMemory", "FlashAttentionMemory", "DPOLossMemory"]
    assert not kernels.use_triton(q)  # a CPU tensor outside the switch: the references
    torch.testing.assert_close(kernels.attention(q, q, q), kernels.attention_ref(q, q, q))
    torch.testing.assert_close(kernels.sdpa(q, q, q), F.scaled_dot_product_attention(q, q, q))


@pytest.mark.parametrize("name", ["flash_attention", "fused_dpo_loss"])
def test_each_kernel_file_checks_itself(name):
    """`python kernels/<file>.py` compares the kernel with its reference (under the interpreter here) and says ok."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", f"{name}.py")
    r = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) >= 2 and all(line.startswith("ok ") for line in lines), r.stdout
