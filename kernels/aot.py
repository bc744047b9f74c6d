"""Compile the Triton kernels for a GPU that is not here, and report what each config costs.

The interpreter tests prove the kernels compute the right thing; they cannot prove that the
kernels compile, fit in shared memory or keep their tiles in registers. This script compiles
every kernel x autotune config for a CUDA target (default sm_90, the H100) on any machine,
using Triton's bundled ptxas, with the exact argument specialization the JIT would use at the
real SDXL / SD1.5 call (strides of 1 become constants, multiples of 16 are marked divisible) and,
for the quantized linear, at FLUX.1's and SDXL's linears in each weight format,
then reads registers, spill (stack) bytes and shared memory off the cubin:

    python kernels/aot.py [--arch 90] [--quick] [--csv out.csv]

Exit status 1 if some (shape, kernel) has no config that fits the target at all, i.e. the
autotuner would have nothing to run. Spills are reported, not fatal: the autotuner may still pick
a spilling config if it is the fastest. Uses Triton internals (the JIT's binder); tested on 3.6, 3.9.
"""
import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile for real; must precede the first `import triton`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import torch  # noqa: E402
import triton  # noqa: E402

try:  # Triton internals: the JIT's own argument binder, so the specialization matches a real launch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
except ImportError as e:
    sys.exit(f"error: kernels/aot.py needs Triton's compiler internals (tested on 3.6 and 3.9), "
             f"triton {triton.__version__}: {e}")

import cli  # noqa: E402
from kernels import flash_attention as A  # noqa: E402
from kernels import fused_dpo_loss as L  # noqa: E402
from kernels import quantized_linear as Q  # noqa: E402
from kernels.bench import QLINEAR_SHAPES  # noqa: E402  (name, M, N, K)

# max dynamic shared memory per block (bytes) by compute capability; registers are 255 / thread
SMEM = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}

# (name, B, H, Lq, Lk, D, causal): each kind of attention call the UNets (cf. bench.py) and CLIP make
SHAPES = [
    ("sdxl self 64x64", 1, 10, 4096, 4096, 64, False),
    ("sdxl cross 64x64", 1, 10, 4096, 77, 64, False),
    ("sd15 self 64x64", 1, 8, 4096, 4096, 40, False),
    ("sd15 self 32x32", 1, 8, 1024, 1024, 80, False),
    ("sd15 self 16x16", 1, 8, 256, 256, 160, False),
    ("clip-g causal", 1, 20, 77, 77, 64, True),
    ("sd3 joint 1024^2", 1, 24, 4096 + 333, 4096 + 333, 64, False),  # image + CLIP/T5 tokens: not a multiple of 16
    ("flux joint 1024^2", 1, 24, 4096 + 512, 4096 + 512, 128, False),
]
QUICK = {"sdxl self 64x64", "sd15 self 16x16", "sd3 joint 1024^2", "flux joint 1024^2"}

# the quantized linear at FLUX.1's and SDXL's linears: the shapes kernels/bench.py times
QLINEAR_QUICK = {"flux qkv", "sdxl 640"}


def compile_for(fn, args, kwargs, arch):
    """triton.compile `fn` as `fn[grid](*args, **kwargs)` would on a GPU of compute capability `arch`."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def resources(compiled):
    """Registers per thread, stack bytes (register spills) and shared memory bytes of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    regs, stack = (int(re.search(rf"{k}:(\d+)", out).group(1)) for k in ("REG", "STACK"))
    return {"regs": regs, "spill_bytes": stack, "shared": compiled.metadata.shared}


class _NoLaunch:
    """Stands in for a kernel that must not run here: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def record_launches(B, H, Lq, Lk, D, causal, dtype):
    """The (kernel, args, meta) of every autotuned launch of one attention forward + backward, as the
    launchers make them (captured by swapping out `_launch`); q, k, v are strided views like the UNet's."""
    launches = []
    real = A._launch, A._attn_bwd_preprocess_kernel
    A._launch = lambda kernel, tile_len, B, H, *args, **meta: launches.append((kernel, args, meta))
    A._attn_bwd_preprocess_kernel = _NoLaunch()  # fixed config: compiled by simple_launches
    try:
        q, k, v = (torch.zeros(B, n, H * D, dtype=dtype).view(B, n, H, D).transpose(1, 2) for n in (Lq, Lk, Lk))
        o, lse = A._attn_forward(q, k, v, causal, D ** -0.5)
        A._attn_backward(torch.zeros_like(o), q, k, v, o, lse, causal, D ** -0.5)
    finally:
        A._launch, A._attn_bwd_preprocess_kernel = real
    return launches


def simple_launches(B, H, Lq, D, dtype):
    """The kernels with one fixed config: attention's backward preprocess and the two DPO-loss kernels."""
    o = torch.zeros(B, H, Lq, D, dtype=dtype)
    delta = torch.zeros(B, H, Lq)
    block_d = A._meta(o, D, False)["BLOCK_D"]  # the padded head dim, as _attn_backward launches it
    pred = torch.zeros(2 * B, 4, 128, 128, dtype=dtype)  # SDXL latents at 1024^2
    noise, N = torch.zeros(B, 4, 128, 128), 4 * 128 * 128
    n_chunks = triton.cdiv(N, L.BLOCK)
    return [
        ("bwd_preprocess", A._attn_bwd_preprocess_kernel, (o, o, delta, Lq, D), dict(BLOCK_M=64, BLOCK_D=block_d)),
        ("dpo_sse", L._dpo_sse_kernel, (pred, pred, noise, torch.zeros(4, B, n_chunks), B, N, n_chunks),
         dict(BLOCK=L.BLOCK)),
        ("dpo_grad", L._dpo_grad_kernel, (pred, noise, torch.zeros(2 * B), pred, B, N), dict(BLOCK=L.BLOCK)),
    ]


def empty_quantized(fmt, N, K):
    """A Quantized (N, K) weight in fmt's layout, its tensors empty: what the compiler sees is dtypes and sizes."""
    if fmt == "nf4":
        blocks = N * K // Q.BLOCK
        tensors = {"codes": torch.empty(N * K // 2, dtype=torch.uint8), "absmax_codes": torch.empty(blocks,
                   dtype=torch.uint8), "absmax_scales": torch.empty(-(-blocks // Q.ABSMAX_BLOCK)),
                   "absmax_mean": torch.empty(())}
    else:
        tensors = {"codes": torch.empty(N, K, dtype=torch.float8_e4m3fn if fmt == "fp8" else torch.int8),
                   "scales": torch.empty(N)}
    return Q.Quantized(fmt, (N, K), torch.bfloat16, tensors)


def qlinear_launches(M, N, K, fmt, dtype):
    """The (kernel, args, meta) of the quantized linear's forward (with a bias) and dx launches, as its launchers make
    them (captured by swapping out `_launch`)."""
    launches = []
    real = Q._launch
    Q._launch = lambda kernel, M, C, *args, **meta: launches.append((kernel, args, meta))
    try:
        q = empty_quantized(fmt, N, K)
        Q._qlinear_forward(torch.empty(M, K, dtype=dtype), q, torch.empty(N, dtype=dtype))
        Q._qlinear_dx(torch.empty(M, N, dtype=dtype), q)
    finally:
        Q._launch = real
    return launches


def report(arch=90, quick=False, dtype=torch.bfloat16, ieee=False, log=print):
    """Compile everything; returns one row per (shape, kernel, config). fp32: TF32 dots unless ieee."""
    names = {A._attn_fwd_kernel: "fwd", A._attn_bwd_dkdv_kernel: "bwd_dkdv", A._attn_bwd_dq_kernel: "bwd_dq"}
    limit = SMEM.get(arch, 101376)
    rows = []

    def add(shape, kernel, config, fn, args, meta):
        try:
            r = resources(compile_for(fn, args, meta, arch))
            r["fits"] = r["shared"] <= limit
        except Exception as e:  # a compile error or a resource the target does not have
            r = {"regs": None, "spill_bytes": None, "shared": None, "fits": False, "error": str(e).splitlines()[0]}
        rows.append({"shape": shape, "kernel": kernel, "config": config, **r})
        fits = "yes" if r["fits"] else "NO"
        err = r.get("error", "")[:60]
        spill = "-" if r["spill_bytes"] is None else r["spill_bytes"]
        smem = "-" if r["shared"] is None else r["shared"] // 1024
        log(f"{shape:<18} {kernel:<16} {config:<17} {r['regs'] or '-':>5} {spill:>6} {smem:>7} {fits:>5} {err}")

    dots = "exact fp32" if ieee and dtype == torch.float32 else "tensor-core"
    log(f"sm_{arch} (shared memory limit {limit // 1024} KiB/block), {dtype}, {dots} dots, triton {triton.__version__}")
    log(f"{'shape':<18} {'kernel':<16} {'config':<17} {'regs':>5} {'spill':>6} {'smem KiB':>7} {'fits':>5}")
    for shape, B, H, Lq, Lk, D, causal in SHAPES:
        if quick and shape not in QUICK:
            continue
        for fn, args, meta in record_launches(B, H, Lq, Lk, D, causal, dtype):
            meta["PRECISION"] = "ieee" if ieee else "tf32"  # CPU tensors say ieee; a CUDA run with TF32 on, tf32
            for cfg in A._prune(A._configs(fn), {}, **meta):
                blocks = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                tag = "{BLOCK_M}x{BLOCK_N} w{num_warps} s{num_stages}".format(**blocks)
                add(shape, names[fn], tag, fn, args, {**meta, **blocks})
    for shape, M, N, K in QLINEAR_SHAPES:
        if quick and shape not in QLINEAR_QUICK:
            continue
        for fmt in Q.FORMATS:
            for fn, args, meta in qlinear_launches(M, N, K, fmt, dtype):
                meta["PRECISION"] = "ieee" if ieee else "tf32"
                kernel = f"qlinear_{'fwd' if fn is Q._qlinear_fwd_kernel else 'dx'}_{fmt}"
                for cfg in Q._prune(Q._configs(fn), {}, **meta):
                    blocks = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                    tag = "{BLOCK_M}x{BLOCK_N}x{BLOCK_K} w{num_warps} s{num_stages}".format(**blocks)
                    add(shape, kernel, tag, fn, args, {**meta, **blocks})
    for kernel, fn, args, meta in simple_launches(1, 10, 4096, 64, dtype):
        add("fixed", kernel, "default", fn, args, meta)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10: 80 A100, 90 H100, 100 B200")
    p.add_argument("--quick", action="store_true", help="four attention shapes (SDXL self-attention, SD1.5 D=160, "
                   "SD3 and FLUX joint) and two quantized-linear ones (FLUX qkv, SDXL at 640 channels)")
    p.add_argument("--dtype", choices=list(cli.DTYPES), default="bf16")
    p.add_argument("--ieee", action="store_true", help="fp32: exact fp32 dots, as with torch's TF32 off")
    p.add_argument("--csv", help="also write the rows to this CSV file")
    args = p.parse_args()
    rows = report(args.arch, args.quick, cli.DTYPES[args.dtype], args.ieee)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["shape", "kernel", "config", "regs", "spill_bytes", "shared", "fits",
                                              "error"])
            w.writeheader()
            w.writerows(rows)
    groups = {}
    for r in rows:
        groups.setdefault((r["shape"], r["kernel"]), []).append(r)
    none_fit = [k for k, rs in groups.items() if not any(r["fits"] for r in rs)]
    clean = sum(any(r["fits"] and r["spill_bytes"] == 0 for r in rs) for rs in groups.values())
    print(f"{len(rows)} compiles; {clean}/{len(groups)} (shape, kernel) have a config that fits without spills")
    if none_fit:
        sys.exit("error: no config fits for " + ", ".join(f"{s} {k}" for s, k in none_fit))


if __name__ == "__main__":
    main()
