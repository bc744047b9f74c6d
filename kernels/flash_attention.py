"""FlashAttention-2 (forward + backward) in Triton, plus the plain-PyTorch reference.

Reading order: forward kernel, backward kernels (preprocess, dK/dV, dQ), launchers,
autograd.Function, its allocation model, public `attention`, `attention_ref`, and the self-check
`python kernels/flash_attention.py` (against the reference; on a GPU it also times itself).

Notation: q (B, H, Lq, D), k/v (B, H, Lk, D), S = scale * q k^T, P = softmax(S), O = P v.
The head dim D (40, 64, 80, 128, 160, ...) is padded to BLOCK_D = next power of two inside the
kernels (masked loads with d < D), and ragged sequence lengths are masked (keys get -inf).
Only plain pointer arithmetic is used (no block pointers / tensor descriptors) so the same code
runs on Triton 3.6 (GPU machines) and 3.9 (CI interpreter).
"""
import math
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

from .dispatch import interpreting, planning, use_triton  # noqa: E402

# softmax is computed with exp2: e^x = 2^(x * log2 e), and the log-sum-exp kept in natural log: ln x = log2 x * ln 2
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Tests set this to e.g. (16, 32) so the interpreter exercises multi-block loops on short sequences.
FORCE_BLOCKS = None  # (BLOCK_M, BLOCK_N) or None
INTERPRET_BLOCKS = (64, 64)  # used by the interpreter, which cannot autotune


# ----------------------------------------------------------------------------------------------
# forward


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqm, sqd,  # q strides (B, H, Lq, D)
    skb, skh, skn, skd,  # k strides (B, H, Lk, D)
    svb, svh, svn, svd,  # v strides (B, H, Lk, D)
    sob, soh, som, sod,  # o strides (B, H, Lq, D), contiguous
    H, Lq, Lk, D, sm_scale,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program = one BLOCK_M tile of queries of one (batch, head); streams over all keys."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    O += b * sob + h * soh
    LSE += bh.to(tl.int64) * Lq

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) key columns within a tile
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) padded head dim
    m_ok = offs_m < Lq
    d_ok = offs_d < D

    q = tl.load(Q + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    qk_scale = sm_scale * LOG2E  # fold log2(e) in: scores live in log2 units

    # online-softmax state per query row: running max m_i, running denominator l_i, unnormalised O
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = Lk
    if CAUSAL:  # keys past the last query row of this tile are all masked: skip them
        hi = tl.minimum((start_m + 1) * BLOCK_M, Lk)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < Lk
        kT = tl.load(K + cols[None, :] * skn + offs_d[:, None] * skd,
                     mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), fp32
        s = tl.where(n_ok[None, :], s, float("-inf"))  # padded keys get -inf, not 0
        if CAUSAL:
            s = tl.where(offs_m[:, None] >= cols[None, :], s, float("-inf"))
        # 1) new running max; 2) rescale old state by 2^(m_old - m_new); 3) add this tile
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # (BLOCK_M,) correction for the old partial sums
        p = tl.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N) unnormalised probabilities
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * svn + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new

    # normalise once at the end (FA2), and keep logsumexp (natural log) for the backward pass
    acc = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * LN2  # (BLOCK_M,)
    tl.store(LSE + offs_m, lse, mask=m_ok)
    tl.store(O + offs_m[:, None] * som + offs_d[None, :] * sod, acc.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# backward: dS = P * (dP - delta), delta = rowsum(dO * O); P is recomputed from q, k and the LSE


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, Lq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta_i = sum_d dO_id * O_id, fp32 (B, H, Lq); O and dO are contiguous (B, H, Lq, D)."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
    ptrs = bh * Lq * D + offs_m[:, None] * D + offs_d[None, :]
    o = tl.load(O + ptrs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,  # dO strides (contiguous, like O)
    sgb, sgh, sgn, sgd,  # dK / dV strides (contiguous (B, H, Lk, D))
    H, Lq, Lk, D, sm_scale,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program = one BLOCK_N tile of keys; loops over query tiles accumulating dK, dV."""
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sob + h * soh
    DK += b * sgb + h * sgh
    DV += b * sgb + h * sgh
    LSE += bh.to(tl.int64) * Lq
    DELTA += bh.to(tl.int64) * Lq

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Lk
    d_ok = offs_d < D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E

    lo = 0
    if CAUSAL:  # query tiles entirely above the diagonal never see these keys
        lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for start_m in range(lo, Lq, BLOCK_M):
        rows = start_m + offs_m
        m_ok = rows < Lq
        qT = tl.load(Q + rows[None, :] * sqm + offs_d[:, None] * sqd,
                     mask=d_ok[:, None] & m_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_M)
        do = tl.load(DO + rows[:, None] * som + offs_d[None, :] * sod,
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        lse = tl.load(LSE + rows, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + rows, mask=m_ok, other=0.0)
        # recompute P^T for this tile from the saved logsumexp: P = exp(S - lse)
        sT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        pT = tl.exp2(sT - lse[None, :] * LOG2E)
        keep = m_ok[None, :]
        if CAUSAL:
            keep = keep & (rows[None, :] >= offs_n[:, None])
        pT = tl.where(keep, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)  # dV += P^T dO
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (dO V^T)^T, (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])  # softmax backward
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION)  # dK += dS^T Q

    dk = dk * sm_scale
    out = offs_n[:, None] * sgn + offs_d[None, :] * sgd
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,  # dO and dQ strides (both contiguous (B, H, Lq, D))
    H, Lq, Lk, D, sm_scale,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program = one BLOCK_M tile of queries; loops over key tiles accumulating dQ (no atomics)."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sob + h * soh
    DQ += b * sob + h * soh
    LSE += bh.to(tl.int64) * Lq
    DELTA += bh.to(tl.int64) * Lq

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * som + offs_d[None, :] * sod, mask=q_mask, other=0.0)
    lse = tl.load(LSE + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E

    hi = Lk
    if CAUSAL:
        hi = tl.minimum((start_m + 1) * BLOCK_M, Lk)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < Lk
        kv_mask = d_ok[:, None] & n_ok[None, :]
        kT = tl.load(K + cols[None, :] * skn + offs_d[:, None] * skd, mask=kv_mask, other=0.0)  # (BLOCK_D, BLOCK_N)
        vT = tl.load(V + cols[None, :] * svn + offs_d[:, None] * svd, mask=kv_mask, other=0.0)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse[:, None] * LOG2E)  # recomputed softmax
        keep = n_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= cols[None, :])
        p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)  # dP = dO V^T
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)  # dQ += dS K

    dq = dq * sm_scale
    tl.store(DQ + offs_m[:, None] * som + offs_d[None, :] * sod, dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------
# launchers: autotuned on CUDA; fixed blocks in the interpreter (it cannot benchmark) or when forced


# (BLOCK_M, BLOCK_N, num_warps, num_stages): short curated lists, since every new (Lq, Lk, D) benchmarks
# all of them. Each compiles for sm_90 without register spills at the SDXL shapes (D=64), checked without
# a GPU by `python kernels/aot.py`. dK/dV keeps a key tile and two fp32 accumulators in registers, so it
# gets 8 warps and a larger key tile (BLOCK_N) than query tile; with 4 warps, 128-wide tiles spill there.
_Q_CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3),  # fwd, dQ
              (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)]
_KV_CONFIGS = [(64, 128, 8, 2), (32, 128, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2),  # dK/dV
               (64, 64, 4, 3), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2)]


def _configs(kernel):
    table = _KV_CONFIGS if kernel is _attn_bwd_dkdv_kernel else _Q_CONFIGS
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in table]


def _prune(configs, named_args, **kwargs):
    """Large head dims (D=160 pads to 256) only fit small tiles in registers / shared memory."""
    if kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64)) > 128:
        small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
        return small or configs[:1]
    return configs


_KEY = ["Lq", "Lk", "D", "CAUSAL"]
_tuned = {fn: triton.autotune(_configs(fn), key=_KEY, prune_configs_by={"early_config_prune": _prune})(fn)
          for fn in (_attn_fwd_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel)}


def _launch(kernel, tile_len, B, H, *args, **meta):
    """Run `kernel` on a (cdiv(tile_len, BLOCK), B*H) grid; BLOCK is BLOCK_M (fwd, dq) or BLOCK_N (dkdv)."""
    tile = "BLOCK_N" if kernel is _attn_bwd_dkdv_kernel else "BLOCK_M"
    if FORCE_BLOCKS is not None or interpreting():
        bm, bn = FORCE_BLOCKS or INTERPRET_BLOCKS
        blocks = {"BLOCK_M": bm, "BLOCK_N": bn}
        kernel[(triton.cdiv(tile_len, blocks[tile]), B * H)](*args, **meta, **blocks, num_warps=4)
    else:
        _tuned[kernel][lambda c: (triton.cdiv(tile_len, c[tile]), B * H)](*args, **meta)


def _meta(q, D, causal):
    return dict(CAUSAL=causal, PRECISION=_precision(q), BLOCK_D=max(16, triton.next_power_of_2(D)))


def _precision(q):
    """How tl.dot treats fp32 inputs, following torch's matmul setting: TF32 tensor cores where torch allows
    TF32 on CUDA (dpo.py turns it on), else exact fp32 (the interpreter tests compare fp32 tightly). Exact
    fp32 dots run as FMA loops: slower to compile and run, and they spill at the larger tiles."""
    if q.dtype != torch.float32:
        return "tf32"  # ignored: fp16 / bf16 dots always use the tensor cores
    return "tf32" if q.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _attn_forward(q, k, v, causal, scale):
    """Returns O (B, H, Lq, D) contiguous and LSE (B, H, Lq) fp32."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    o = torch.empty((B, H, Lq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    _launch(_attn_fwd_kernel, Lq, B, H, q, k, v, o, lse,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            H, Lq, Lk, D, scale, **_meta(q, D, causal))
    return o, lse


def _attn_backward(do, q, k, v, o, lse, causal, scale):
    """Returns dq, dk, dv (contiguous, input dtype)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    do = do.contiguous()  # same layout as o, so both share o's strides
    meta = _meta(q, D, causal)
    delta = torch.empty_like(lse)  # (B, H, Lq)
    _attn_bwd_preprocess_kernel[(triton.cdiv(Lq, 64), B * H)](o, do, delta, Lq, D,
                                                              BLOCK_M=64, BLOCK_D=meta["BLOCK_D"])
    dq = torch.empty((B, H, Lq, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, H, Lk, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, H, Lk, D), device=q.device, dtype=v.dtype)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    _launch(_attn_bwd_dkdv_kernel, Lk, B, H, q, k, v, do, lse, delta, dk, dv,
            *strides, *dk.stride(), H, Lq, Lk, D, scale, **meta)
    _launch(_attn_bwd_dq_kernel, Lq, B, H, q, k, v, do, lse, delta, dq,
            *strides, H, Lq, Lk, D, scale, **meta)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """Saves only q, k, v, O and the LSE (O(L) memory), recomputing P in the backward pass."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        o, lse = _attn_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _attn_backward(do, q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


class FlashAttentionMemory(torch.autograd.Function):
    """FlashAttention's allocation model: the tensors its launchers allocate (_attn_forward, _attn_backward), made
    empty, in the same order, with no kernel run (bench/plan.py counts the CUDA step with it). No L x L matrix."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        B, H, Lq, D = q.shape  # k, v (B, H, Lk, D)
        o = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)  # log-sum-exp, kept for backward
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = do.contiguous()  # (B, H, Lq, D), laid out like O
        delta = torch.empty_like(lse)  # (B, H, Lq): rowsum(dO * O), read by both backward kernels
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # dQ, dK, dV: contiguous, in the inputs' dtypes
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        del do, delta  # freed as the launcher returns
        return dq, dk, dv, None, None


# ----------------------------------------------------------------------------------------------
# public API and reference


def attention(q, k, v, causal=False, scale=None):
    """softmax(q k^T * scale) v for q (B, H, Lq, D), k/v (B, H, Lk, D); Triton or SDPA per DPO_KERNELS."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects (B, H, L, D) tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
                         "(B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D)")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs Lq == Lk, got {q.shape[2]} and {k.shape[2]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if torch.is_autocast_enabled(q.device.type):  # as autocast casts SDPA's inputs (fp32 q, k after an fp32 qk-norm)
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if planning():  # bench/plan.py: what the kernels would allocate, no compute
        return FlashAttentionMemory.apply(q, k, v, causal, scale)
    if use_triton(q):
        if not q.dtype == k.dtype == v.dtype:
            raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        return FlashAttention.apply(q, k, v, causal, scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def sdpa(q, k, v):
    """Attention at shapes the kernel does not take (the VAE's one head of 512 channels): torch's SDPA (its
    memory-efficient kernel on CUDA); inside allocation_models(), modelled as FlashAttention (O and the LSE)."""
    if planning():
        return FlashAttentionMemory.apply(q, k, v, False, 1.0 / math.sqrt(q.shape[-1]))
    return F.scaled_dot_product_attention(q, k, v)


def attention_ref(q, k, v, causal=False, scale=None):
    """The textbook math in fp32 (or fp64 if given fp64): the oracle the kernels are tested against."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = (q.to(dt) @ k.to(dt).transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if causal:
        Lq, Lk = s.shape[-2:]
        s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return (s.softmax(-1) @ v.to(dt)).to(q.dtype)  # (B, H, Lq, D)


# ----------------------------------------------------------------------------------------------
# self-check: python kernels/flash_attention.py


def check(shapes, dtype, tol):
    """Forward and every gradient of the Triton path against attention_ref at each (B, H, Lq, Lk, D, causal)."""
    for B, H, Lq, Lk, D, causal in shapes:
        g = torch.Generator().manual_seed(0)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        q, k, v = (torch.randn(B, H, L, D, generator=g).to(dev, dtype).requires_grad_() for L in (Lq, Lk, Lk))
        do = torch.randn(B, H, Lq, D, generator=g).to(dev, dtype)
        out = {}
        for name, fn in (("triton", lambda: FlashAttention.apply(q, k, v, causal, D ** -0.5)),
                         ("ref", lambda: attention_ref(q, k, v, causal))):
            o = fn()
            o.backward(do)
            out[name] = [o.detach().float()] + [x.grad.float() for x in (q, k, v)]
            for x in (q, k, v):
                x.grad = None
        errs = [((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item() for a, b in zip(out["triton"], out["ref"])]
        ok = all(e <= tol for e in errs)
        print(f"{'ok ' if ok else 'BAD'} B={B} H={H} Lq={Lq} Lk={Lk} D={D} causal={causal} {str(dtype)[6:]}: "
              f"max rel err o {errs[0]:.1e}, dq {errs[1]:.1e}, dk {errs[2]:.1e}, dv {errs[3]:.1e}", flush=True)
        if not ok:
            raise SystemExit(f"attention differs from its reference by more than {tol}")


def bench(shapes):
    """Forward + backward time (ms) of the Triton kernels and of torch's SDPA at each (B, H, Lq, Lk, D), bf16."""
    from triton.testing import do_bench
    for B, H, Lq, Lk, D in shapes:
        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for L in (Lq, Lk, Lk))
        do = torch.randn(B, H, Lq, D, device="cuda", dtype=torch.bfloat16)
        ms = {name: do_bench(lambda: fn(q, k, v).backward(do), grad_to_none=[q, k, v])
              for name, fn in (("triton", attention), ("sdpa", F.scaled_dot_product_attention))}
        tflops = 3.5 * 4 * B * H * Lq * Lk * D / 1e12
        print(f"B={B} H={H} Lq={Lq} Lk={Lk} D={D} fwd+bwd: triton {ms['triton']:.3f} ms "
              f"({tflops / ms['triton'] * 1e3:.0f} TFLOP/s), sdpa {ms['sdpa']:.3f} ms "
              f"({tflops / ms['sdpa'] * 1e3:.0f} TFLOP/s)", flush=True)


if __name__ == "__main__":
    if torch.cuda.is_available():  # the UNets' shapes: SDXL self/cross attention at 64x64 latents, SD1.5's D = 160
        check([(2, 10, 4096, 4096, 64, False), (2, 10, 4096, 77, 64, False), (2, 8, 256, 256, 160, False),
               (2, 8, 77, 77, 64, True)], torch.bfloat16, 2e-2)
        bench([(2, 10, 4096, 4096, 64), (2, 10, 4096, 77, 64), (2, 8, 256, 256, 160)])
    else:  # Triton's interpreter: small shapes (ragged lengths, padded head dims, several key blocks)
        check([(1, 2, 70, 70, 40, False), (1, 2, 70, 77, 64, False), (1, 1, 77, 77, 32, True)], torch.float32, 1e-4)
