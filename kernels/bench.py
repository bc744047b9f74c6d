"""Benchmark the Triton kernels against PyTorch on a CUDA GPU: `python kernels/bench.py [--quick]`.

Attention: forward, backward and forward+backward TFLOP/s at the SDXL (1024^2) and SD1.5 (512^2) UNet shapes and
the SD3 / SD3.5 and FLUX.1-dev transformers' at 1024^2 (--quick: five, SD3.5-medium's and FLUX-dev's joint attention
among them) in bf16, vs torch SDPA with each backend it offers ('n/a' where a backend refuses).
  FLOPs: forward = 4 * B * H * Lq * Lk * D (two matmuls, 2 FLOPs per multiply-add),
         backward = 2.5x forward (five matmuls, one of them the recomputed QK^T), fwd+bwd = 3.5x.
DPO loss: time and GB/s of forward+backward vs eager dpo_loss_ref and torch.compile(dpo_loss_ref);
  bytes = the minimum traffic: read model_pred, ref_pred, noise once, write the gradient once;
  ceiling = this device's measured copy bandwidth (a large tensor .copy_, read + write).
Quantized linear (fp8, int8, nf4 weights; bf16 activations): forward and forward + input-gradient time of qlinear vs
  dequantize-then-F.linear (qlinear_ref) and vs a plain bf16 F.linear, at FLUX.1's and SDXL's linears (--quick: two);
  FLOPs: forward = 2 * M * N * K, forward + dx = 2x that (no weight gradient: the base is frozen).
Writes attention.csv, dpo_loss.csv, quantized_linear.csv and (if matplotlib is installed) bench.png to --out.
"""
import argparse
import csv
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

DEVICE = "cuda"

# (name, H, Lq, Lk, D); the batch B comes from --batch
ATTN_SHAPES = [
    ("sdxl self 64x64", 10, 4096, 4096, 64),
    ("sdxl self 32x32", 20, 1024, 1024, 64),
    ("sdxl cross 64x64", 10, 4096, 77, 64),
    ("sdxl cross 32x32", 20, 1024, 77, 64),
    ("sd15 self 64x64", 8, 4096, 4096, 40),
    ("sd15 self 32x32", 8, 1024, 1024, 80),
    ("sd15 self 16x16", 8, 256, 256, 160),
    ("sd15 cross 64x64", 8, 4096, 77, 40),
    ("sd15 cross 32x32", 8, 1024, 77, 80),
    ("sd15 cross 16x16", 8, 256, 77, 160),
    # The flow transformers at 1024^2: 64x64 = 4096 image tokens (2x2 patches of the 128x128 latent) joined by the
    # text tokens in one attention (mmdit.JointAttention, flux.Attention: every block of FLUX, single ones too)
    ("sd3 joint 1024^2", 24, 4096 + 333, 4096 + 333, 64),  # SD3 / SD3.5-medium: 77 CLIP + 256 T5 tokens
    ("sd3.5-medium attn2 1024^2", 24, 4096, 4096, 64),  # its first 13 blocks' image-only second attention
    ("sd3.5-large joint 1024^2", 38, 4096 + 333, 4096 + 333, 64),
    ("flux joint 1024^2", 24, 4096 + 512, 4096 + 512, 128),  # FLUX-dev: 512 T5 tokens, after RoPE
]
QUICK_SHAPES = {"sdxl self 64x64", "sdxl cross 64x64", "sd15 self 16x16", "sd3 joint 1024^2", "flux joint 1024^2"}
LOSS_LATENT = (4, 128, 128)  # SDXL latents at 1024^2: (C, H, W) of one image
COPY_NUMEL = 256 * 2**20  # fp32 elements (1 GiB) copied to measure the bandwidth ceiling
# (name, M, N, K): the quantized linear, x (M, K) -> (M, N). FLUX.1 at 1024^2: 4096 image + 512 text tokens, width 3072
# (attention out / modulated projections, fused qkv, MLP up, MLP down); SDXL at 1024^2: 4096 tokens at 640 channels,
# 1024 at 1280, and the 1280-wide feed-forward's up (to 4x, GEGLU's half) and down projections
QLINEAR_SHAPES = [
    ("flux linear", 4608, 3072, 3072),
    ("flux qkv", 4608, 9216, 3072),
    ("flux mlp up", 4608, 12288, 3072),
    ("flux mlp down", 4608, 3072, 12288),
    ("sdxl 640", 4096, 640, 640),
    ("sdxl 1280", 1024, 1280, 1280),
    ("sdxl ff up", 1024, 5120, 1280),
    ("sdxl ff down", 1024, 1280, 5120),
]
QLINEAR_QUICK = {"flux qkv", "sdxl ff up"}
COMPILE = torch.compile  # the compiled baseline of the loss


def sdpa_impls():
    """name -> context-manager factory for each SDPA backend this torch offers."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    names = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
    return {f"sdpa_{n.lower().replace('_attention', '')}": (lambda b=getattr(SDPBackend, n): sdpa_kernel(b))
            for n in names if hasattr(SDPBackend, n)}


def bench_attention(args, do_bench, header):
    import contextlib

    import torch.nn.functional as F

    import kernels
    impls = {"triton": contextlib.nullcontext, **sdpa_impls()}
    rows = []
    print(f"\n{'attention (bf16)':<18} {'B':>2} {'H':>3} {'Lq':>5} {'Lk':>5} {'D':>4} {'impl':<16}"
          f" {'fwd TF/s':>9} {'bwd TF/s':>9} {'f+b TF/s':>9} {'f+b ms':>8}")
    for name, H, Lq, Lk, D in ATTN_SHAPES:
        if args.quick and name not in QUICK_SHAPES:
            continue
        B = args.batch
        q, k, v = (torch.randn(B, H, L, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
                   for L in (Lq, Lk, Lk))
        g = torch.randn(B, H, Lq, D, device=DEVICE, dtype=torch.bfloat16)
        flops_fwd = 4 * B * H * Lq * Lk * D
        for impl, ctx in impls.items():
            fn = kernels.attention if impl == "triton" else F.scaled_dot_product_attention
            try:
                with ctx():
                    o = fn(q, k, v)
                    t_fwd = do_bench(lambda: fn(q, k, v))
                    t_bwd = do_bench(lambda: o.backward(g, retain_graph=True), grad_to_none=[q, k, v])
                    t_all = do_bench(lambda: fn(q, k, v).backward(g), grad_to_none=[q, k, v])
                tf = [flops_fwd * m / (t * 1e-3) / 1e12 for m, t in ((1, t_fwd), (2.5, t_bwd), (3.5, t_all))]
                cells = [f"{x:9.1f}" for x in tf] + [f"{t_all:8.3f}"]
            except Exception as e:  # a backend that does not support this shape / dtype / GPU
                tf, t_all = [None] * 3, None
                cells = [f"{'n/a':>9}"] * 3 + [f"{'n/a':>8}"]
                if args.verbose or impl == "triton":
                    print(f"  {impl}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            o = None  # free the retained graph before the next backend
            torch.cuda.empty_cache()
            print(f"{name:<18} {B:>2} {H:>3} {Lq:>5} {Lk:>5} {D:>4} {impl:<16} " + " ".join(cells))
            rows.append({**header, "shape": name, "B": B, "H": H, "Lq": Lq, "Lk": Lk, "D": D, "impl": impl,
                         "flops_fwd": flops_fwd, "fwd_tflops": tf[0], "bwd_tflops": tf[1], "fwdbwd_tflops": tf[2],
                         "fwdbwd_ms": t_all})
    return rows


def copy_bandwidth(do_bench):
    """GB/s of a 1 GiB device-to-device .copy_ (read + write): the ceiling for a memory-bound kernel."""
    x = torch.empty(COPY_NUMEL, device=DEVICE, dtype=torch.float32)
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / (do_bench(lambda: y.copy_(x)) * 1e-3) / 1e9


def bench_dpo_loss(args, do_bench, header):
    import kernels
    copy_gbs = copy_bandwidth(do_bench)
    print(f"\ndpo_loss fwd+bwd (bf16 preds, fp32 noise); copy bandwidth ceiling {copy_gbs:.0f} GB/s")
    print(f"{'shape':<20} {'impl':<14} {'ms':>8} {'GB/s':>8} {'% copy':>7}")
    rows = []
    for pairs in ([2 * args.batch] if args.quick else [2 * args.batch, 8 * args.batch]):
        shape = (2 * pairs, *LOSS_LATENT)
        model = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        ref = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)
        noise = torch.randn(pairs, *shape[1:], device=DEVICE, dtype=torch.float32)
        nbytes = 3 * model.numel() * model.element_size() + noise.numel() * noise.element_size()
        compiled = COMPILE(kernels.dpo_loss_ref)
        impls = {"triton": lambda: kernels.dpo_loss(model, ref, noise, 5000.0)[0].backward(),
                 "eager_ref": lambda: kernels.dpo_loss_ref(model, ref, noise, 5000.0)[0].backward(),
                 "compiled_ref": lambda: compiled(model, ref, noise, 5000.0)[0].backward()}
        for impl, fn in impls.items():
            try:
                ms = do_bench(fn, grad_to_none=[model])
                gbs = nbytes / (ms * 1e-3) / 1e9
                print(f"{str(list(shape)):<20} {impl:<14} {ms:8.3f} {gbs:8.0f} {100 * gbs / copy_gbs:6.0f}%")
            except Exception as e:  # e.g. torch.compile without a working compiler toolchain
                ms = gbs = None
                print(f"{str(list(shape)):<20} {impl:<14} {'n/a':>8}  ({type(e).__name__})")
            rows.append({**header, "shape": "x".join(map(str, shape)), "impl": impl, "bytes": nbytes,
                         "ms": ms, "gbs": gbs, "copy_gbs": copy_gbs})
    return rows


def bench_qlinear(args, do_bench, header):
    """qlinear (Triton) vs qlinear_ref (dequantize, then F.linear) per format, and a bf16 F.linear, at each shape."""
    import torch.nn.functional as F

    import kernels
    print(f"\n{'quantized linear (bf16 x)':<26} {'M':>5} {'N':>6} {'K':>6} {'fmt':<5} {'impl':<12} {'fwd ms':>8} "
          f"{'f+dx ms':>8} {'fwd TF/s':>9} {'f+dx TF/s':>9}")
    rows = []
    for name, M, N, K in QLINEAR_SHAPES:
        if args.quick and name not in QLINEAR_QUICK:
            continue
        gen = torch.Generator().manual_seed(0)
        w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(DEVICE)
        x = torch.randn(M, K, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
        dy = torch.randn(M, N, generator=gen).to(DEVICE, torch.bfloat16)
        impls = [("bf16", "F.linear", lambda wb=w.bfloat16(): F.linear(x, wb))]  # the unquantized matmul
        for fmt in kernels.FORMATS:
            q = kernels.quantize(w, fmt)
            impls += [(fmt, "triton", lambda q=q: kernels.qlinear(x, q)),
                      (fmt, "dequant_ref", lambda q=q: kernels.qlinear_ref(x, q))]
        flops = 2 * M * N * K
        for fmt, impl, fn in impls:
            try:
                t_fwd = do_bench(fn)
                t_all = do_bench(lambda: fn().backward(dy), grad_to_none=[x])
                tf = [flops * m / (t * 1e-3) / 1e12 for m, t in ((1, t_fwd), (2, t_all))]
                cells = f"{t_fwd:8.3f} {t_all:8.3f} {tf[0]:9.1f} {tf[1]:9.1f}"
            except Exception as e:  # say so and go on: the other formats' and shapes' numbers still count
                t_fwd = t_all = None
                tf, cells = [None] * 2, f"{'n/a':>8} {'n/a':>8} {'n/a':>9} {'n/a':>9}"
                print(f"  {fmt} {impl}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            print(f"{name:<26} {M:>5} {N:>6} {K:>6} {fmt:<5} {impl:<12} {cells}")
            rows.append({**header, "shape": name, "M": M, "N": N, "K": K, "format": fmt, "impl": impl,
                         "flops_fwd": flops, "fwd_ms": t_fwd, "fwddx_ms": t_all, "fwd_tflops": tf[0],
                         "fwddx_tflops": tf[1]})
        impls = q = None  # free this shape's weights before the next
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


def plot(path, attn_rows, loss_rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(16, 5), gridspec_kw={"width_ratios": [3, 1]})
    shapes = list(dict.fromkeys(r["shape"] for r in attn_rows))
    impls = list(dict.fromkeys(r["impl"] for r in attn_rows))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        vals = {r["shape"]: r["fwdbwd_tflops"] or 0 for r in attn_rows if r["impl"] == impl}
        a1.bar([j + i * width for j in range(len(shapes))], [vals.get(s, 0) for s in shapes], width, label=impl)
    a1.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=30, ha="right")
    a1.set_ylabel("fwd+bwd TFLOP/s (bf16)")
    a1.legend()
    labels = [f"{r['impl']}\n{r['shape']}" for r in loss_rows]
    a2.bar(range(len(loss_rows)), [r["gbs"] or 0 for r in loss_rows])
    a2.axhline(loss_rows[0]["copy_gbs"], color="k", ls="--", label="copy bandwidth")
    a2.set_xticks(range(len(loss_rows)), labels, rotation=30, ha="right", fontsize=7)
    a2.set_ylabel("dpo_loss fwd+bwd GB/s")
    a2.legend()
    fig.suptitle(f"{attn_rows[0]['device']}  torch {attn_rows[0]['torch']}  triton {attn_rows[0]['triton']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def stub_timer(fn, grad_to_none=None):
    """--dry_run's timer: runs fn once and says 2 ms."""
    fn()
    return 2.0


def dry_run():
    """Tiny CPU shapes for --dry_run (needs TRITON_INTERPRET=1 set before triton is imported)."""
    global DEVICE, ATTN_SHAPES, QUICK_SHAPES, LOSS_LATENT, COPY_NUMEL, COMPILE, QLINEAR_SHAPES, QLINEAR_QUICK
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--dry_run runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1")
    DEVICE, LOSS_LATENT, COPY_NUMEL = "cpu", (4, 8, 8), 4096
    ATTN_SHAPES = [("tiny cross", 2, 37, 77, 40), ("tiny joint", 2, 24 + 9, 24 + 9, 128)]  # FLUX's head dim too
    QUICK_SHAPES = {"tiny cross", "tiny joint"}
    QLINEAR_SHAPES = [("tiny linear", 37, 70, 128)]  # ragged M and N; K a multiple of 64 for nf4
    QLINEAR_QUICK = {"tiny linear"}
    COMPILE = lambda fn: fn  # noqa: E731  inductor on CPU takes minutes; not what a dry run checks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out", help="output folder for CSV / PNG")
    p.add_argument("--quick", action="store_true", help="five attention shapes (the flow models' joint ones among "
                   "them), one loss shape")
    p.add_argument("--batch", type=int, default=2, help="attention batch; the loss uses 2x and 8x as many pairs")
    p.add_argument("--verbose", action="store_true", help="print why a backend is n/a")
    p.add_argument("--dry_run", action="store_true", help="every code path once on tiny CPU shapes with a stub timer "
                   "(TRITON_INTERPRET=1): the numbers mean nothing, the script is checked without a GPU")
    args = p.parse_args(argv)
    os.environ["DPO_KERNELS"] = "triton"
    if args.dry_run:
        dry_run()
    elif not torch.cuda.is_available():
        sys.exit("bench.py needs a CUDA GPU (or --dry_run)")
    import triton
    import triton.testing
    do_bench = stub_timer if args.dry_run else triton.testing.do_bench

    device = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    header = {"device": device, "torch": torch.__version__, "triton": triton.__version__}
    print(f"device: {header['device']} | torch {header['torch']} | triton {header['triton']}")
    os.makedirs(args.out, exist_ok=True)
    attn_rows = bench_attention(args, do_bench, header)
    loss_rows = bench_dpo_loss(args, do_bench, header)
    qlinear_rows = bench_qlinear(args, do_bench, header)
    write_csv(os.path.join(args.out, "attention.csv"), attn_rows)
    write_csv(os.path.join(args.out, "dpo_loss.csv"), loss_rows)
    write_csv(os.path.join(args.out, "quantized_linear.csv"), qlinear_rows)
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib not installed: skipping bench.png")
    else:
        plot(os.path.join(args.out, "bench.png"), attn_rows, loss_rows)


if __name__ == "__main__":
    main()
