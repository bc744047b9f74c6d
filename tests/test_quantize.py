"""The quantized weight formats (fp8, int8, nf4) against independent oracles, and the quantized-linear kernels against
qlinear_ref (CPU: Triton's interpreter).

Oracles: nf4 is bitsandbytes' quantize_4bit(blocksize=64, quant_type="nf4", compress_statistics=True) (its CPU path),
int8 torch.quantize_per_channel, fp8 torch's own e4m3 cast. The kernels: y, dx (and a bias's gradient) against
autograd through qlinear_ref (dequantize, then F.linear), odd shapes, several tiles, leading dims; the allocation
model against what the launchers allocate.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton` on CPU

import argparse  # noqa: E402
import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from bench import shadow  # noqa: E402
from kernels import quantized_linear as qmod  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU interpreter tests; tests/test_kernels_gpu.py covers CUDA")


def _weight(shape, dtype=torch.float32, seed=0):
    """A weight with rows of very different magnitudes (what a per-channel / per-block scale is for)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * torch.logspace(-3, 1, shape[0])[:, None]
    return w.to(dtype)


# ----------------------------------------------------------------------------------------------
# formats


def test_code_tables_are_bitsandbytes():
    import bitsandbytes.functional as bnbf
    assert torch.equal(qmod.DYNAMIC, bnbf.create_dynamic_map(signed=True))
    assert torch.equal(qmod.NF4, bnbf.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("shape", [(64, 128), (300, 192), (37, 576)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nf4_is_bitsandbytes_nf4_with_double_quantization(dtype, shape):
    import bitsandbytes.functional as bnbf
    w = _weight(shape, dtype)
    q = kernels.quantize(w, "nf4")
    t = q.tensors
    codes, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(t["codes"], codes.flatten())  # two codes a byte, the first in the high nibble
    assert torch.equal(t["absmax_scales"], state.state2.absmax)  # one fp32 absmax per 256 block absmax values
    assert torch.equal(t["absmax_mean"], state.offset)
    # The 8-bit absmax codes against bitsandbytes' own pure-PyTorch reference kernel for that step (the rule its
    # CUDA kernel follows: the nearest code). Its CPU C library (what quantize_4bit runs here) finds the code by a
    # binary search that is not always the nearest: on about 1 in 1000 absmax values it picks the neighbouring code,
    # so the native state.absmax is not the oracle; the reference kernel agrees with ours exactly.
    absmax = w.float().reshape(-1, 64).abs().amax(1)
    ref_codes, ref_scales = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
        torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd), absmax - absmax.mean(),
        bnbf.create_dynamic_map(signed=True), 256)
    assert torch.equal(t["absmax_codes"], ref_codes) and torch.equal(t["absmax_scales"], ref_scales)
    assert (t["absmax_codes"] == state.absmax).float().mean() > 0.99  # the native codes: all but a few
    # bitsandbytes' dequantize_4bit of our tensors is our dequantize, bit for bit
    ours = bnbf.QuantState(absmax=t["absmax_codes"], shape=w.shape, dtype=dtype, blocksize=64, quant_type="nf4",
                           code=bnbf.get_4bit_type("nf4", device="cpu"), offset=t["absmax_mean"],
                           state2=bnbf.QuantState(absmax=t["absmax_scales"], code=bnbf.create_dynamic_map(signed=True),
                                                  blocksize=256, dtype=torch.float32))
    deq = bnbf.dequantize_4bit(t["codes"].view(-1, 1), ours)
    assert deq.dtype == dtype and torch.equal(deq, q.dequantize())
    assert q.nbytes() * 8 / w.numel() == pytest.approx(4.127, abs=0.01)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor, torch.quantize_per_channel")  # deprecated, still right
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_is_torch_per_channel_quantization(dtype):
    w = _weight((48, 80), dtype)
    w[5] = 0  # an all-zero row: codes 0, any scale
    q = kernels.quantize(w, "int8")
    codes, scales = q.tensors["codes"], q.tensors["scales"]
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (48,)
    oracle = torch.quantize_per_channel(w.float(), scales, torch.zeros(48, dtype=torch.long), 0, torch.qint8)
    assert torch.equal(codes, oracle.int_repr())
    assert codes.abs().amax(1)[torch.arange(48) != 5].eq(127).all()  # each row's largest weight is +-127
    err = (q.dequantize(torch.float32) - w.float()).abs()
    assert (err <= scales[:, None] / 2 + 2 ** -22 * w.float().abs()).all()  # half a step, and fp32's rounding of it
    assert torch.equal(q.dequantize()[5], torch.zeros(80, dtype=dtype)) and q.dequantize().dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_is_torchs_e4m3_cast_of_the_row_scaled_weight(dtype):
    w = _weight((48, 80), dtype)
    w[7] = 0
    q = kernels.quantize(w, "fp8")
    codes, scales = q.tensors["codes"], q.tensors["scales"]
    assert codes.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
    assert torch.equal(scales[7], torch.tensor(1.0))
    expected = (w.float() / scales[:, None]).to(torch.float8_e4m3fn)
    assert torch.equal(codes.view(torch.uint8), expected.view(torch.uint8))
    assert codes.float().abs().amax(1)[torch.arange(48) != 7].eq(448).all()
    # 3 mantissa bits: relative error <= 2^-4 for normal codes; subnormal codes (below 2^-6) are 2^-9 apart
    err = (q.dequantize(torch.float32) - w.float()).abs()
    assert (err <= 2 ** -4 * w.float().abs() + 2 ** -10 * scales[:, None]).all()
    assert torch.equal(q.dequantize()[7], torch.zeros(80, dtype=dtype))


def test_all_zero_rows_dequantize_to_zero_in_every_format():
    w = _weight((4, 128))
    w[1] = 0
    for fmt in kernels.FORMATS:
        assert torch.equal(kernels.quantize(w, fmt).dequantize()[1], torch.zeros(128)), fmt


def test_shapes_a_format_cannot_store_are_refused_in_one_line():
    for shape, fmt, says in (((8, 100), "nf4", "divisible by 64"), ((8, 64, 2), "int8", "2-D"),
                             ((8, 64), "int4", "format must be one of")):
        with pytest.raises(ValueError, match=says) as e:
            kernels.quantize(torch.zeros(shape), fmt)
        assert "\n" not in str(e.value)
        assert not kernels.quantizable(fmt, shape)
    assert kernels.quantizable("nf4", (8, 192)) and kernels.quantizable("fp8", (8, 100))


# ----------------------------------------------------------------------------------------------
# kernels (interpreter)


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv("DPO_KERNELS", "triton")


def _run(fn, x0, q, bias, dy):
    """y, dx and the bias's gradient of fn on a fresh copy of x0 (and of the bias, if it requires grad)."""
    x = x0.clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_(bias.requires_grad)
    y = fn(x, q, b)
    y.backward(dy)
    return y.detach().double(), x.grad.double(), None if b is None or b.grad is None else b.grad.double()


# (leading dims, N, K, bias: None / "frozen" / "grad", forced (BLOCK_M, BLOCK_N, BLOCK_K) or None = the interpreter's)
CASES = [((37,), 70, 128, "frozen", None),  # ragged M and N tiles, four K steps of 32
         ((2, 9), 33, 192, None, (16, 16, 32)),  # leading dims, many small tiles
         ((5,), 17, 64, "grad", (16, 32, 16)),  # one M tile, BLOCK_N > N, a bias that learns
         ((3, 7), 40, 100, "frozen", (16, 16, 32))]  # K not a multiple of the tile (fp8 / int8 only: nf4 needs 64 | K)


@needs_interpreter
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("fmt,case", [(f, c) for f in ("fp8", "int8", "nf4") for c in CASES if f != "nf4" or
                                      c[2] % 64 == 0],
                         ids=lambda p: p if isinstance(p, str) else f"x{'x'.join(map(str, (*p[0], p[2])))}-N{p[1]}")
def test_qlinear_matches_dequantize_then_linear(monkeypatch, fmt, case, dtype, tol):
    lead, N, K, bias, blocks = case
    monkeypatch.setattr(qmod, "FORCE_BLOCKS", blocks)
    g = torch.Generator().manual_seed(1)
    q = kernels.quantize(torch.randn(N, K, generator=g) / K ** 0.5, fmt)
    x0 = torch.randn(*lead, K, generator=g).to(dtype)
    dy = torch.randn(*lead, N, generator=g).to(dtype)
    b = None if bias is None else torch.randn(N, generator=g).to(dtype).requires_grad_(bias == "grad")
    out = _run(qmod.QLinear.apply, x0, q, b, dy)
    ref = _run(kernels.qlinear_ref, x0, q, b, dy)
    assert out[0].shape == (*lead, N) and out[1].shape == (*lead, K)
    for name, a, r in zip(("y", "dx", "dbias"), out, ref):
        if r is None:
            assert a is None, name
            continue
        err = ((a - r).abs().max() / r.abs().max()).item()
        assert err <= tol, f"{name}: max rel err {err:.2e}"


@needs_interpreter
def test_qlinear_dispatch_and_module(monkeypatch, triton_path):
    """kernels.qlinear and QuantLinear run the kernels under DPO_KERNELS=triton and qlinear_ref under =torch; a
    QuantLinear keeps its codes and scales through .to(dtype), holds only the bias in its state_dict, and passes no
    gradient to its frozen bias; an x of the wrong width is refused in one line."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 128, generator=g)
    for fmt in kernels.FORMATS:
        q = kernels.quantize(torch.randn(48, 128, generator=g), fmt)
        m = kernels.QuantLinear(q, torch.randn(48, generator=g))
        dtypes = {k: t.dtype for k, t in m.named_buffers()}
        assert m.to(torch.bfloat16) is m and {k: t.dtype for k, t in m.named_buffers()} == dtypes
        assert m.bias.dtype == torch.bfloat16 and not m.bias.requires_grad
        assert list(m.state_dict()) == ["bias"]
        m.float()
        ref = kernels.qlinear_ref(x, q, m.bias)
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
        monkeypatch.setenv("DPO_KERNELS", "torch")
        assert torch.equal(m(x), ref) and torch.equal(kernels.qlinear(x, q, m.bias), ref)
        monkeypatch.setenv("DPO_KERNELS", "triton")
        xg = x.clone().requires_grad_()
        m(xg).sum().backward()
        assert xg.grad.shape == x.shape and m.bias.grad is None
    with pytest.raises(ValueError, match="in_features 128") as e:
        kernels.qlinear(torch.randn(3, 64), q)
    assert "\n" not in str(e.value)


@needs_interpreter
def test_qlinear_under_autocast_runs_in_the_autocast_dtype(monkeypatch, triton_path):
    """As F.linear would: x is cast to autocast's dtype first; the kernel and the reference agree there."""
    g = torch.Generator().manual_seed(3)
    q = kernels.quantize(torch.randn(40, 64, generator=g), "nf4")
    x, b = torch.randn(9, 64, generator=g), torch.randn(40, generator=g)
    with torch.autocast("cpu", dtype=torch.float16):
        y = kernels.qlinear(x, q, b)
        monkeypatch.setenv("DPO_KERNELS", "torch")
        ref = kernels.qlinear(x, q, b)
        linear = F.linear(x, q.dequantize(torch.float32), b)
    assert y.dtype == ref.dtype == linear.dtype == torch.float16
    assert torch.equal(ref, linear)
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)


def _no_launch(monkeypatch):
    """The launchers' own allocations only: the Triton kernels (which allocate nothing on a GPU) are not run."""
    monkeypatch.setattr(qmod, "_launch", lambda *a, **k: None)


def _allocations(fn, *inputs, grad):
    """The sizes of what fn allocates, forward then backward, and the peak (on inputs without gradients yet)."""
    c = shadow.Counter(shadow=False)
    with c:
        first = c.mark("forward")
        out = fn(*inputs)
        c.mark("backward")
        out.backward(grad)
        last = c.mark("end")
    return [c.size[e] for e in c.events if e >= 0], c.replay(first, last)[0]


@pytest.mark.parametrize("fmt", kernels.FORMATS)
def test_qlinear_allocation_model_is_what_the_kernel_allocates(monkeypatch, fmt):
    _no_launch(monkeypatch)
    q = kernels.quantize(torch.randn(48, 128), fmt)
    for contiguous, bias_grad in ((True, False), (False, True)):
        x = torch.randn(2, 128, 40, dtype=torch.bfloat16).transpose(1, 2)  # (2, 40, 128)
        x = (x.contiguous() if contiguous else x).requires_grad_()
        bias = torch.randn(48, dtype=torch.bfloat16).requires_grad_(bias_grad)
        dy = torch.randn(2, 48, 40, dtype=torch.bfloat16).transpose(1, 2)  # not contiguous either
        kernel = _allocations(lambda a: qmod.QLinear.apply(a, q, bias), x, grad=dy)
        x.grad, bias.grad = None, None
        plan = _allocations(lambda a: qmod.QLinearMemory.apply(a, q, bias), x, grad=dy)
        assert kernel == plan
        assert (shadow.allocated(48 * 4) in kernel[0]) == bias_grad  # the bias's fp32 gradient, only if it learns


def test_qlinear_allocation_model_stands_in_for_the_kernel_inside_the_switch(monkeypatch):
    calls = []
    real = qmod.QLinearMemory.apply
    monkeypatch.setattr(qmod.QLinearMemory, "apply", lambda *a: calls.append(1) or real(*a))
    q = kernels.quantize(torch.randn(48, 128), "nf4")
    m = kernels.QuantLinear(q, torch.randn(48))
    with kernels.allocation_models():
        y = m(torch.randn(3, 5, 128))
    assert calls == [1] and y.shape == (3, 5, 48)


# ----------------------------------------------------------------------------------------------
# the self-check and the benchmark's code path


@needs_interpreter
def test_quantized_linear_checks_itself():
    """`python kernels/quantized_linear.py` compares the kernels with qlinear_ref (interpreter here) and says ok."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "kernels", "quantized_linear.py")], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 9 and all(line.startswith("ok ") for line in lines), r.stdout


@needs_interpreter
def test_bench_qlinear_runs_on_cpu_with_a_stub_timer(monkeypatch, triton_path):
    bench = importlib.import_module("kernels.bench")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "QLINEAR_SHAPES", [("tiny", 37, 70, 128), ("tiny 2", 16, 20, 64)])
    monkeypatch.setattr(bench, "QLINEAR_QUICK", {"tiny"})
    calls = []

    def do_bench(fn, grad_to_none=None):
        calls.append(fn)
        fn()
        return 2.0  # ms

    header = {"device": "cpu", "torch": torch.__version__, "triton": "interp"}
    rows = bench.bench_qlinear(argparse.Namespace(quick=True), do_bench, header)
    assert [(r["format"], r["impl"]) for r in rows] == [("bf16", "F.linear")] + [
        (f, i) for f in ("fp8", "int8", "nf4") for i in ("triton", "dequant_ref")]
    assert len(calls) == 2 * len(rows) and all(r["fwd_ms"] == 2.0 for r in rows)
    assert rows[0]["flops_fwd"] == 2 * 37 * 70 * 128
    assert rows[0]["fwddx_tflops"] == pytest.approx(2 * rows[0]["flops_fwd"] / 2e-3 / 1e12)
