"""How much memory a quantized base really takes: the resident memory of a loaded FLUX transformer in bf16 and with
--quantize fp8 / int8 / nf4, measured on the CPU, and the peak while it loads.

    python bench/resident.py [--sizes tiny,wide] [--out FILE.json]

Each load runs in a fresh process (python bench/resident.py --load FOLDER FMT), which reports its resident memory
(/proc/self/status VmRSS) after import, after the load (every tensor read once, so that the pages of the memory-mapped
checkpoint a bf16 load keeps, as safetensors hands tensors out, are resident; freed memory returned by malloc_trim),
and the largest seen while loading (sampled every 5 ms), in all and of its own allocations (RssAnon: without the
pages of the mapped checkpoint, which the page cache holds and the kernel can drop). The models: FLUX.1-dev's own
transformer config with fewer blocks, random bf16 weights written as a diffusers folder once:
  tiny  width 256 (2 heads of 128), 1 double and 2 single blocks: 6 M parameters
  wide  FLUX.1-dev's width 3072 (24 heads of 128) and its MLPs, 2 double and 4 single blocks: 1.31 B parameters,
        every layer at its full-size shape (the released model has 19 and 38; its bytes are bench/plan.py's)
Linear layers hold nearly all of FLUX's parameters, so the ratio to bf16 is what the format stores per weight:
fp8 and int8 one byte and a scale per row, nf4 4.127 bits.
"""
import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import torch  # noqa: E402

import families  # noqa: E402
import kernels  # noqa: E402
import weights  # noqa: E402

SIZES = {"tiny": dict(num_layers=1, num_single_layers=2, num_attention_heads=2),
         "wide": dict(num_layers=2, num_single_layers=4, num_attention_heads=24)}


def rss(kind="VmRSS") -> int:
    """This process's resident bytes: all (VmRSS) or its anonymous memory only (RssAnon: no mapped file pages)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(kind + ":"))


def write(folder, size, seed=0):
    """A FLUX.1-dev-shaped transformer/ folder of random bf16 weights (std 0.02), made one tensor at a time."""
    fam, _, config = families.released("flux-dev")
    config = dict(config, **SIZES[size])
    with torch.device("meta"):
        m = fam.model(config)
    g = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16) for k, v in m.state_dict().items()}
    weights.save_diffusers(state, {"_class_name": "FluxTransformer2DModel", **m.config,
                                   "axes_dims_rope": list(m.config["axes_dims_rope"])}, folder)
    return sum(t.numel() for t in state.values())


def settle():
    """Garbage collected and freed heap returned to the system (malloc_trim), so that VmRSS is what lives."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def touched(m):
    """m with every tensor read (one value per 4 KiB page): a bf16 load's memory-mapped pages become resident."""
    for x in [*m.parameters(), *m.buffers()]:
        x.view(-1)[::1024].float().sum()
    return m


def load(folder, fmt):
    """(In a fresh process.) Load the folder in bf16 or fmt; print the resident bytes as one JSON line. A first load,
    then dropped, pays the one-time costs (libraries, allocator pools) so that the second one counts the model."""
    quantize = None if fmt == "bf16" else fmt
    touched(families.load(folder, "cpu", torch.bfloat16, quantize=quantize))  # (dropped at once)
    settle()
    before, anon, peak, done = rss(), rss("RssAnon"), [0, 0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0], peak[1] = max(peak[0], rss()), max(peak[1], rss("RssAnon"))
            time.sleep(0.005)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    tic = time.time()
    m = families.load(folder, "cpu", torch.bfloat16, quantize=quantize)
    seconds = time.time() - tic
    done.set()
    t.join()
    touched(m)
    settle()
    after = rss()
    n = sum(isinstance(x, kernels.QuantLinear) for x in m.modules())
    print(json.dumps(dict(format=fmt, resident=after - before, peak=max(peak[0], after) - before,
                          peak_anon=max(peak[1], rss("RssAnon")) - anon, seconds=seconds, quantized_layers=n)))


def measure(folder, fmt):
    """One load in a fresh process (python bench/resident.py --load FOLDER FMT): its JSON line."""
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--load", folder, fmt], capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if r.returncode:
        raise SystemExit(f"loading {folder} as {fmt} failed: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="tiny,wide", help="which models: tiny, wide (comma-separated)")
    p.add_argument("--out", help="write the rows as JSON to this file")
    p.add_argument("--load", nargs=2, metavar=("FOLDER", "FMT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.load:
        return load(*a.load)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes.split(","):
            folder = os.path.join(tmp, size, "transformer")
            params = write(folder, size)
            base = None
            for fmt in ("bf16", *kernels.FORMATS):
                r = dict(measure(folder, fmt), size=size, params=params)
                base = base or r
                r["ratio"] = r["resident"] / base["resident"]
                rows.append(r)
                print(f"{size} ({params / 1e6:.1f} M parameters) {fmt}: resident {r['resident'] / 2 ** 20:.1f} MiB "
                      f"({r['ratio']:.3f}x bf16), peak while loading {r['peak'] / 2 ** 20:.1f} MiB (its own "
                      f"allocations {r['peak_anon'] / 2 ** 20:.1f} MiB, the rest the mapped checkpoint's pages), "
                      f"{r['quantized_layers']} quantized Linears, {r['seconds']:.1f} s", flush=True)
    if a.out:
        weights.save_json(rows, a.out)


if __name__ == "__main__":
    main()
