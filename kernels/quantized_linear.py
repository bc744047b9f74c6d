"""A frozen Linear layer stored in fewer bits: fp8, int8 or QLoRA's NF4, dequantized inside the matmul.

A LoRA run's base model is read and never written, so it can live in 8 or 4 bits: y = x W^T + b with W rebuilt from
its codes tile by tile inside the matmul, and the input gradient dx = dy W the same way (the base is frozen: no
weight gradient). The three formats (W is (out, in), row n is output channel n):

  fp8   float8 e4m3 (4 exponent bits, 3 mantissa bits, largest 448) with one fp32 scale per output channel:
        s_n = max_k |W_nk| / 448,  code = e4m3(W / s_n) (round to nearest even, as torch's cast),  W^ = code * s_n.
        (kohya's --fp8_base and ai-toolkit's qfloat8 store e4m3; a per-channel scale keeps small rows precise.)
  int8  symmetric, one fp32 scale per output channel: s_n = max_k |W_nk| / 127, code = round(W / s_n) in [-127, 127]
        (round half to even, as torch.quantize_per_channel), W^ = code * s_n.
  nf4   QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, arXiv:2305.14314, sec. 3 and appendix E): W flattened row
        by row into blocks of 64; each block's absmax a_b; code = the nearest of the 16 NF4 values (quantiles of
        N(0, 1), scaled to [-1, 1], an exact 0) to W / a_b; two codes per byte, the first in the high nibble.
        Double quantization (sec. 3): the absmax values less their mean m are stored in 8 bits in blocks of 256 with
        bitsandbytes' signed dynamic code (DYNAMIC: 7 decades of linearly spaced fractions, +-, 0 and 1) and one fp32
        absmax c_j each: a_b = DYNAMIC[q_b] * c_(b // 256) + m. W^ = NF4[code] * a_b. Bytes per weight: 0.5 + 1/64
        + 4/(64 * 256), i.e. 4.127 bits (bf16: 16). The layout is bitsandbytes' quantize_4bit(blocksize=64,
        quant_type="nf4", compress_statistics=True), so its codes are checked against bitsandbytes (tests).
nf4 needs in % 64 == 0 (a block never spans two rows: the kernels find a weight's absmax from its row and column);
every Linear of SDXL, SD3 and FLUX and their text encoders has it, models keep the others in bf16.

Beside the formats: the Triton kernels (forward: tiles of y over K, each W tile rebuilt from its codes in registers,
the fp8 / int8 scales once in the epilogue; dx: tiles of dx over N, each W tile scaled before its dot), their
launcher, the autograd.Function, its allocation model, the public qlinear (one function that dispatches), qlinear_ref
(dequantize, then F.linear) and QuantLinear (the module the loaders put in place of a Linear, weights.load_module).
Self-check: python kernels/quantized_linear.py.
"""
import os
import sys

if __package__ in (None, ""):  # run as a script: be the package's module (kernels/__init__ sets the interpreter up)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "kernels"
    import kernels  # noqa: F401

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .dispatch import interpreting, planning, use_triton  # noqa: E402

FORMATS = ("fp8", "int8", "nf4")
BITS = {"fp8": 8, "int8": 8, "nf4": 4}
FP8_MAX, INT8_MAX = 448.0, 127.0  # torch.finfo(torch.float8_e4m3fn).max; symmetric int8 leaves out -128
BLOCK, ABSMAX_BLOCK = 64, 256  # nf4: weights per absmax; absmax values per second-level scale

# The 16 NF4 values (QLoRA appendix E; bitsandbytes' get_4bit_type("nf4")), in code order 0..15.
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (Dettmers et al. 2022, 8-bit optimizers, sec. 2): for each decade
    10^-6 .. 10^0, the midpoints of 2^i + 1 linearly spaced points in [0.1, 1] (i = 0..6) times the decade, with both
    signs, then 0 and 1: 127 + 127 + 2 = 256 values, sorted."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)
        values += mids.tolist() + (-mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC = dynamic_code()
_TABLES = {}  # device -> (NF4, DYNAMIC) there: copied once per device, for the kernels and the reference alike


def tables(device):
    """(NF4, DYNAMIC) on device (a torch.device)."""
    if device not in _TABLES:
        _TABLES[device] = NF4.to(device), DYNAMIC.to(device)
    return _TABLES[device]


def _nearest(x, code):
    """Index of the nearest value of the sorted 1-D code for each element of x (fp32), ties to the lower value."""
    mids = (code[1:] + code[:-1]) / 2  # the decision boundaries
    return torch.bucketize(x, mids.to(x.device), right=False).to(torch.uint8)


class Quantized:
    """One weight matrix in a format: its codes and scales (tensors, see the module docstring), its shape and the
    dtype it dequantizes to. kernels.quantize makes one; .dequantize() gives W^ back."""

    def __init__(self, fmt, shape, dtype, tensors: dict):
        self.fmt, self.shape, self.dtype, self.tensors = fmt, tuple(shape), dtype, dict(tensors)

    def __repr__(self):
        return f"Quantized({self.fmt}, {self.shape}, {str(self.dtype)[6:]})"

    @property
    def device(self):
        return self.tensors["codes"].device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def absmax(self) -> torch.Tensor:
        """nf4: each block's absmax a_b (fp32, (blocks,)) from its 8-bit code, its block's scale and the mean."""
        t = self.tensors
        return tables(t["absmax_codes"].device)[1][t["absmax_codes"].long()] * \
            t["absmax_scales"].repeat_interleave(ABSMAX_BLOCK)[:t["absmax_codes"].numel()] + t["absmax_mean"]

    def dequantize(self, dtype=None) -> torch.Tensor:
        """W^ (out, in) in dtype (default: the quantized weight's own), computed in fp32."""
        t, (n, k) = self.tensors, self.shape
        if self.fmt == "nf4":
            packed = t["codes"]  # (n * k / 2,) uint8
            codes = torch.stack([packed >> 4, packed & 15], -1).flatten().long()  # (n * k,): high nibble first
            w = tables(packed.device)[0][codes].view(-1, BLOCK) * self.absmax()[:, None]  # (blocks, 64)
        else:
            w = t["codes"].float() * t["scales"][:, None]  # (n, k)
        return w.view(n, k).to(dtype or self.dtype)


def check_format(fmt, shape):
    """One line if fmt cannot store a weight of this shape."""
    if fmt not in FORMATS:
        raise ValueError(f"quantize: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if len(shape) != 2:
        raise ValueError(f"quantize: a weight (out, in) is 2-D, got shape {tuple(shape)}")
    if fmt == "nf4" and shape[1] % BLOCK:
        raise ValueError(f"quantize: nf4 needs in_features divisible by {BLOCK}, got {shape[1]}")


def quantizable(fmt, shape) -> bool:
    """Whether fmt stores a weight of this shape (the loaders keep the others in the compute dtype)."""
    try:
        check_format(fmt, shape)
        return True
    except ValueError:
        return False


@torch.no_grad()
def quantize(w: torch.Tensor, fmt: str) -> Quantized:
    """w (out, in) in fmt (module docstring), on w's device; statistics in fp32 whatever w's dtype."""
    check_format(fmt, w.shape)
    x = w.detach().float()
    if fmt in ("fp8", "int8"):
        top = FP8_MAX if fmt == "fp8" else INT8_MAX
        amax = x.abs().amax(1)  # (out,)
        scales = torch.where(amax > 0, amax / top, torch.ones_like(amax))  # an all-zero row: any scale, codes 0
        y = (x / scales[:, None]).clamp(-top, top)
        codes = y.to(torch.float8_e4m3fn) if fmt == "fp8" else torch.round(y).to(torch.int8)
        return Quantized(fmt, w.shape, w.dtype, {"codes": codes, "scales": scales})
    blocks = x.reshape(-1, BLOCK)  # (n * k / 64, 64)
    absmax = blocks.abs().amax(1)  # (blocks,)
    idx = _nearest((blocks * (1 / torch.where(absmax > 0, absmax, 1.0))[:, None]).flatten(), tables(x.device)[0])
    packed = (idx[0::2] << 4) | idx[1::2]  # (n * k / 2,) uint8, even positions in the high nibble
    mean = absmax.mean()
    centred = absmax - mean
    pad = -len(centred) % ABSMAX_BLOCK
    groups = F.pad(centred, (0, pad)).view(-1, ABSMAX_BLOCK)  # (ceil(blocks / 256), 256)
    scales = groups.abs().amax(1)  # (groups,)
    normed = groups * (1 / torch.where(scales > 0, scales, 1.0))[:, None]  # (as bitsandbytes: x * (1 / a))
    absmax_codes = _nearest(normed.flatten()[:len(centred)], tables(x.device)[1])  # (blocks,) uint8
    return Quantized(fmt, w.shape, w.dtype, {"codes": packed, "absmax_codes": absmax_codes, "absmax_scales": scales,
                                            "absmax_mean": mean})


# ----------------------------------------------------------------------------------------------
# kernels: y = x W^T (+ b) and dx = dy W, with W^'s tiles rebuilt from the codes inside the loop


@triton.jit
def _w_tile(W, S, AC, AS, AM, NF4T, DYN, offs_n, k0, N, K,
            FMT: tl.constexpr, SCALED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W^'s (BLOCK_N, BLOCK_K) tile at rows offs_n, columns k0..: nf4 as fp32 NF4 values times their block's absmax
    (one per row, as BLOCK_K divides 64); fp8 / int8 as the bare codes, or times the row's scale in fp32 if SCALED."""
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    if FMT == "nf4":
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # (BLOCK_K / 2,) byte columns: two weights a byte
        b = tl.load(W + rows[:, None] * (K // 2) + j[None, :], mask=n_ok[:, None], other=0)  # (BLOCK_N, BLOCK_K / 2)
        codes = tl.reshape(tl.join(b >> 4, b & 15), (BLOCK_N, BLOCK_K))  # column 2j from the high nibble, 2j+1 low
        blk = rows * (K // 64) + k0 // 64  # (BLOCK_N,) each row's absmax block
        dyn = tl.load(DYN + tl.load(AC + blk, mask=n_ok, other=0).to(tl.int32))  # its 8-bit code, decoded
        absmax = dyn * tl.load(AS + blk // 256, mask=n_ok, other=0.0) + tl.load(AM)
        w = tl.load(NF4T + codes.to(tl.int32)) * tl.where(n_ok, absmax, 0.0)[:, None]
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(W + rows[:, None] * K + offs_k[None, :], mask=n_ok[:, None] & (offs_k < K)[None, :], other=0.0)
        if SCALED:
            w = w.to(tl.float32) * tl.load(S + offs_n, mask=n_ok, other=0.0)[:, None]
    return w


@triton.jit
def _tile(M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row tile, column tile) of an (M, C) output, GROUP_M row tiles at a time down each column (so
    the weight tiles they share are read from L2)."""
    pid = tl.program_id(0)
    per_group = GROUP_M * tl.cdiv(C, BLOCK_C)
    first = (pid // per_group) * GROUP_M
    rows = tl.minimum(tl.cdiv(M, BLOCK_M) - first, GROUP_M)
    return first + (pid % per_group) % rows, (pid % per_group) // rows


@triton.jit
def _qlinear_fwd_kernel(X, W, S, AC, AS, AM, NF4T, DYN, BIAS, Y, M, N, K,
                        FMT: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One program = one (BLOCK_M, BLOCK_N) tile of y = x W^T (+ b): loops over K, accumulates in fp32."""
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        x = tl.load(X + offs_m[:, None].to(tl.int64) * K + cols[None, :],
                    mask=m_ok[:, None] & (cols < K)[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        w = _w_tile(W, S, AC, AS, AM, NF4T, DYN, offs_n, k0, N, K, FMT, False, BLOCK_N, BLOCK_K)  # (BLOCK_N, BLOCK_K)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
    if FMT != "nf4":  # fp8 / int8: the per-output-channel scale, once
        acc = acc * tl.load(S + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _qlinear_dx_kernel(DY, W, S, AC, AS, AM, NF4T, DYN, DX, M, N, K,
                       FMT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One program = one (BLOCK_M, BLOCK_K) tile of dx = dy W^: loops over N, where the scales / absmax sit, so each
    W tile is scaled before its dot (in fp32, then cast: W^ as qlinear_ref rounds it)."""
    pid_m, pid_k = _tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs_n
        dy = tl.load(DY + offs_m[:, None].to(tl.int64) * N + rows[None, :],
                     mask=m_ok[:, None] & (rows < N)[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
        w = _w_tile(W, S, AC, AS, AM, NF4T, DYN, rows, pid_k * BLOCK_K, N, K, FMT, True, BLOCK_N, BLOCK_K)
        acc = tl.dot(dy, w.to(dy.dtype), acc, input_precision=PRECISION)  # (BLOCK_N, BLOCK_K) tile of W^
    tl.store(DX + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], acc.to(DX.dtype.element_ty),
             mask=m_ok[:, None] & (offs_k < K)[None, :])


# ----------------------------------------------------------------------------------------------
# launchers: autotuned on CUDA; fixed blocks in the interpreter (it cannot benchmark) or when forced

# Tests set this to e.g. (16, 16, 32) so the interpreter runs several tiles and loop steps on small shapes.
FORCE_BLOCKS = None  # (BLOCK_M, BLOCK_N, BLOCK_K) or None
INTERPRET_BLOCKS = (32, 32, 32)  # used by the interpreter, which cannot autotune
GROUP_M = 8

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), short lists: each new (M, N, K, format) benchmarks them all.
# nf4 needs BLOCK_K to divide 64 (one absmax per row of a W tile): 64 in the forward's reduction and in the dx
# kernel's output tiles; fp8 / int8 also try 128-wide dx tiles and 256-wide forward ones (_prune). Each compiles for
# sm_90 and fits, checked without a GPU by `python kernels/aot.py`.
_FWD_CONFIGS = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]
_DX_CONFIGS = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 128, 8, 3)]


def _configs(kernel):
    table = _FWD_CONFIGS if kernel is _qlinear_fwd_kernel else _DX_CONFIGS
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M}, num_warps=w,
                          num_stages=s) for bm, bn, bk, w, s in table]


def _prune(configs, named_args, **kwargs):
    """nf4 keeps the configs whose BLOCK_K divides 64 and whose W tile is at most 128 x 64 (its unpacked codes and
    their gather indices take registers: a 256 x 64 tile spills)."""
    if kwargs.get("FMT", named_args.get("FMT")) == "nf4":
        return [c for c in configs if BLOCK % c.kwargs["BLOCK_K"] == 0 and c.kwargs["BLOCK_N"] <= 128]
    return configs


_tuned = {fn: triton.autotune(_configs(fn), key=["M", "N", "K", "FMT"],
                              prune_configs_by={"early_config_prune": _prune})(fn)
          for fn in (_qlinear_fwd_kernel, _qlinear_dx_kernel)}


def _launch(kernel, M, C, *args, **meta):
    """Run kernel on a 1-D grid of the (M, C) output's tiles; C is N (forward, BLOCK_N) or K (dx, BLOCK_K)."""
    tile = "BLOCK_N" if kernel is _qlinear_fwd_kernel else "BLOCK_K"
    if M == 0:
        return
    if FORCE_BLOCKS is not None or interpreting():
        bm, bn, bk = FORCE_BLOCKS or INTERPRET_BLOCKS
        if meta["FMT"] == "nf4" and BLOCK % bk:
            raise ValueError(f"qlinear: nf4 needs BLOCK_K dividing {BLOCK}, got {bk}")
        blocks = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
        kernel[(triton.cdiv(M, bm) * triton.cdiv(C, blocks[tile]),)](*args, **meta, **blocks, GROUP_M=GROUP_M,
                                                                     num_warps=4)
    else:
        _tuned[kernel][lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(C, c[tile]),)](*args, **meta)


def _precision(x):
    """How tl.dot treats fp32 inputs, as in flash_attention: TF32 where torch allows TF32 matmuls on CUDA, else exact
    fp32 (torch's default, and always in the interpreter). fp16 / bf16 dots ignore it."""
    return "tf32" if x.dtype != torch.float32 or (x.is_cuda and torch.backends.cuda.matmul.allow_tf32) else "ieee"


def _operands(q):
    """The pointer arguments both kernels take for q: codes, scales, absmax codes, absmax scales, absmax mean, NF4,
    DYNAMIC (those a format has no use for point at one of its tensors; the kernel never reads them)."""
    t = q.tensors
    if q.fmt == "nf4":
        return t["codes"], t["absmax_scales"], t["absmax_codes"], t["absmax_scales"], t["absmax_mean"], \
            *tables(q.device)
    return t["codes"], t["scales"], t["scales"], t["scales"], t["scales"], *tables(q.device)


def _qlinear_forward(x, q, bias):
    """y (M, N) in x's dtype for x (M, K) contiguous."""
    M, K = x.shape
    N = q.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    _launch(_qlinear_fwd_kernel, M, N, x, *_operands(q), y if bias is None else bias, y, M, N, K,
            FMT=q.fmt, HAS_BIAS=bias is not None, PRECISION=_precision(x))
    return y


def _qlinear_dx(dy, q):
    """dx (M, K) in dy's dtype for dy (M, N) contiguous."""
    M, N = dy.shape
    K = q.shape[1]
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    _launch(_qlinear_dx_kernel, M, K, dy, *_operands(q), dx, M, N, K, FMT=q.fmt, PRECISION=_precision(dy))
    return dx


class QLinear(torch.autograd.Function):
    """x (..., K) -> y (..., N) from W's codes; saves no tensor (dx needs only W, the frozen model's own buffers). A
    bias that requires grad gets one (dy summed over the rows by torch, in fp32): simpler than refusing it."""

    @staticmethod
    def forward(ctx, x, q, bias):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)
        y = _qlinear_forward(x2, q, None if bias is None else bias.contiguous())  # (M, N)
        ctx.q, ctx.lead, ctx.bias_dtype = q, x.shape[:-1], None if bias is None else bias.dtype
        return y.view(*ctx.lead, q.shape[0])

    @staticmethod
    def backward(ctx, dy):
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()  # (M, N)
        dx = _qlinear_dx(dy2, ctx.q).view(*ctx.lead, ctx.q.shape[1]) if ctx.needs_input_grad[0] else None
        db = dy2.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None  # (N,)
        return dx, None, db


class QLinearMemory(torch.autograd.Function):
    """QLinear's allocation model: the tensors its launchers allocate (_qlinear_forward, _qlinear_dx, the bias
    gradient), made empty, in the same order, with no kernel run (bench/plan.py counts the CUDA step with it)."""

    @staticmethod
    def forward(ctx, x, q, bias):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K): a copy only if x is not contiguous
        if bias is not None:
            bias.contiguous()
        y = torch.empty((x2.shape[0], q.shape[0]), dtype=x.dtype, device=x.device)  # (M, N)
        ctx.q, ctx.lead, ctx.bias_dtype = q, x.shape[:-1], None if bias is None else bias.dtype
        return y.view(*ctx.lead, q.shape[0])

    @staticmethod
    def backward(ctx, dy):
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()  # (M, N)
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty((dy2.shape[0], ctx.q.shape[1]), dtype=dy.dtype, device=dy.device)  # (M, K)
            dx = dx.view(*ctx.lead, ctx.q.shape[1])
        if ctx.needs_input_grad[2]:  # the fp32 row sum, then its cast to the bias's dtype
            db = torch.empty(dy2.shape[1], dtype=torch.float32, device=dy.device).to(ctx.bias_dtype)
        return dx, None, db


# ----------------------------------------------------------------------------------------------
# public API and reference


def qlinear(x, q: Quantized, bias=None):
    """y = x W^T + b with W the quantized weight, x (..., in) -> (..., out); Triton or qlinear_ref per DPO_KERNELS.
    Gradients flow to x (and to a bias that requires one), never to W (the base is frozen)."""
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"qlinear: x's last dim must be the weight's in_features {q.shape[1]}, got {tuple(x.shape)}")
    if torch.is_autocast_enabled(x.device.type):  # as autocast casts F.linear's input
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if planning():  # bench/plan.py: what the kernels would allocate, no compute
        return QLinearMemory.apply(x, q, bias)
    if use_triton(x):
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"qlinear: x must be fp16, bf16 or fp32, got {x.dtype}")
        return QLinear.apply(x, q, bias)
    return qlinear_ref(x, q, bias)


def qlinear_ref(x, q: Quantized, bias=None):
    """Readable PyTorch version: W^ whole in x's dtype, then F.linear (autograd gives dx = dy W^)."""
    return F.linear(x, q.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))


class QuantLinear(nn.Module):
    """A frozen Linear whose weight is stored quantized (a Quantized's tensors as buffers, the bias as is)."""

    def __init__(self, q: Quantized, bias=None):
        super().__init__()
        self.fmt, self.shape, self.dtype = q.fmt, q.shape, q.dtype
        self.out_features, self.in_features = q.shape
        for name, t in q.tensors.items():
            self.register_buffer(name, t, persistent=False)  # not in state_dict: checkpoints hold the bf16 weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> Quantized:
        return Quantized(self.fmt, self.shape, self.dtype, self._buffers)

    def forward(self, x):  # x (..., in) -> (..., out)
        return qlinear(x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):
        """Move the codes and scales with the module (.to(device), .cuda()) but never cast them: a model-wide
        .to(bfloat16) must leave fp32 scales fp32 and fp8 codes fp8."""
        kept = dict(self._buffers)
        self._buffers.clear()
        super()._apply(fn, recurse)  # the bias, as any module's
        for name, t in kept.items():
            self._buffers[name] = t.to(fn(t.new_empty(0)).device)  # where fn sends tensors; its dtype is not used
        return self

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt}, {str(self.dtype)[6:]}"


def quantize_linears(module, fmt, dtype=None):
    """module's Linears that fmt can store, each a QuantLinear of its weight in dtype (default: its own), for models
    built in memory (bench/step.py, the memory plan's shadows); loaders quantize as they read (weights.load_module)."""
    for name, m in list(module.named_modules()):
        if type(m) is nn.Linear and quantizable(fmt, m.weight.shape):
            dt = dtype or m.weight.dtype
            bias = None if m.bias is None else m.bias.detach().to(dt)
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent), child, QuantLinear(quantize(m.weight.to(dt), fmt), bias))
    return module


# ----------------------------------------------------------------------------------------------
# self-check: python kernels/quantized_linear.py


def check(shapes, dtype, tol):
    """y and dx of the Triton path against qlinear_ref (autograd through it), every format, with a bias, at each
    (leading dims, N, K)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for lead, N, K in shapes:
        g = torch.Generator().manual_seed(0)
        w, b = torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(N, generator=g).to(dev, dtype)
        x0, dy = torch.randn(*lead, K, generator=g).to(dev, dtype), torch.randn(*lead, N, generator=g).to(dev, dtype)
        for fmt in FORMATS:
            q = quantize(w.to(dev), fmt)
            out = []
            for fn in (QLinear.apply, qlinear_ref):
                x = x0.clone().requires_grad_()
                y = fn(x, q, b)
                y.backward(dy)
                out.append((y.detach().float(), x.grad.float()))
            errs = [((a - r).abs().max() / r.abs().max()).item() for a, r in zip(*out)]
            ok = all(e <= tol for e in errs)
            print(f"{'ok ' if ok else 'BAD'} {fmt:<4} x {(*lead, K)} -> N={N} {str(dtype)[6:]}: max rel err "
                  f"y {errs[0]:.1e}, dx {errs[1]:.1e}", flush=True)
            if not ok:
                raise SystemExit(f"qlinear differs from its reference by more than {tol}")


def bench(shapes):
    """Forward and forward + dx time (ms) of qlinear and of dequantize-then-F.linear (qlinear_ref), bf16."""
    from triton.testing import do_bench
    for M, N, K in shapes:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        for fmt in FORMATS:
            q = quantize(torch.randn(N, K, device="cuda") / K ** 0.5, fmt)
            ms = {name: (do_bench(lambda: fn(x, q)), do_bench(lambda: fn(x, q).backward(dy), grad_to_none=[x]))
                  for name, fn in (("triton", qlinear), ("ref", qlinear_ref))}
            print(f"M={M} N={N} K={K} {fmt:<4} fwd / fwd+dx: triton {ms['triton'][0]:.3f} / {ms['triton'][1]:.3f} ms,"
                  f" dequantize + F.linear {ms['ref'][0]:.3f} / {ms['ref'][1]:.3f} ms", flush=True)


if __name__ == "__main__":
    if torch.cuda.is_available():  # FLUX.1's linears at 1024^2 (4096 image + 512 text tokens): qkv, mlp up, mlp down
        flux = [(4608, 9216, 3072), (4608, 12288, 3072), (4608, 3072, 12288)]
        check([((M,), N, K) for M, N, K in flux], torch.bfloat16, 2e-2)
        bench(flux)
    else:  # Triton's interpreter: ragged tiles on every dim, several K steps, leading dims
        check([((37,), 70, 128), ((2, 9), 33, 192)], torch.float32, 1e-4)
        check([((37,), 70, 128)], torch.float16, 1e-2)
