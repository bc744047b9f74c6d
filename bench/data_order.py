"""Time the pair loader on Pick-a-Pic-style parquet shards, with the three data orders one could use.

    python bench/data_order.py --make bench_out/pap          # write a synthetic Pick-a-Pic-like folder first (once)
    python bench/data_order.py bench_out/pap [--pairs 600] [--resolution 512]

  block    row groups shuffled, pairs in each group shuffled (this project before the windowed shuffle): a micro-
           batch, the RPO matrix and an optimizer step come from one or two row groups
  window   row groups shuffled and cut into windows of about data.SHUFFLE_PAIRS pairs, pairs shuffled uniformly
           inside a window, an LRU of one window's row groups (the default now)
  uniform  one uniform shuffle of all pairs, read with an LRU of 2 row groups (what a plain shuffle costs)
For each: pairs/s of PreferenceDataset (one process: decode both JPEGs, resize, crop), row groups decoded per 100 pairs,
and how many distinct row groups 16 consecutive pairs (a micro-batch, an RPO matrix) and one optimizer step of 2048
pairs touch (from the order alone, averaged over the dataset).
"""
import io
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import cache  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import images  # noqa: E402


def make(folder, shards=4, groups=8, rows=100, size=512, seed=0):
    """Shards named as on the hub (train-0000k-of-0000n-<hash>.parquet) of smooth random JPEGs (~40 KB each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageFilter
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)

    def jpeg():
        small = Image.fromarray(rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8))
        img = small.resize((size, size), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        return buf.getvalue()
    for k in range(shards):
        n = groups * rows
        cols = dict(caption=[f"a photo {k} {i}" for i in range(n)], jpg_0=pa.array([jpeg() for _ in range(n)]),
                    jpg_1=pa.array([jpeg() for _ in range(n)]), label_0=[float(i % 2) for i in range(n)],
                    label_1=[float(1 - i % 2) for i in range(n)], model_0=["sdxl"] * n, model_1=["sdxl"] * n)
        pq.write_table(pa.table(cols), os.path.join(folder, f"train-{k:05d}-of-{shards:05d}-synthetic.parquet"),
                       row_group_size=rows)
        print(f"wrote shard {k + 1}/{shards}", flush=True)


def measure(path, order, n_pairs, resolution):
    """(pairs/s, row groups decoded per 100 pairs, distinct row groups per 16 and per 2048 consecutive pairs)."""
    pairs = data.Preferences(path)
    groups = len(np.unique(pairs.group))
    window = {"block": 1, "window": pairs.window_groups, "uniform": groups}[order]
    if order == "uniform":
        pairs.window_groups = 1  # an LRU of 2 row groups
    index = data.EpochOrder(pairs.group, seed=0, window=window)
    group = [int(pairs.group[index(p)]) for p in range(len(pairs))]
    micro = [len(set(group[s:s + 16])) for s in range(0, len(group) - 15, 16)]
    step = [len(set(group[s:s + 2048])) for s in range(0, len(group) - 2047, 2048)]
    decodes = []
    real = images.pyarrow_parquet().ParquetFile.read_row_group

    def read_row_group(self, i, **kw):
        decodes.append(i)
        return real(self, i, **kw)
    images.pyarrow_parquet().ParquetFile.read_row_group = read_row_group
    try:
        ds = cache.PreferenceDataset(pairs, resolution, seed=0, random_crop=False, flip=True)
        ds.index = index
        tic = time.perf_counter()
        for p in range(n_pairs):
            ds[p]
        seconds = time.perf_counter() - tic
    finally:
        images.pyarrow_parquet().ParquetFile.read_row_group = real
    return n_pairs / seconds, 100 * len(decodes) / n_pairs, np.mean(micro), (np.mean(step) if step else float("nan"))


def main(argv=None):
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("path", nargs="?", help="a parquet folder, file or glob")
    p.add_argument("--make", help="write a synthetic Pick-a-Pic-like folder here and stop")
    p.add_argument("--pairs", type=int, default=600, help="pairs read per order")
    p.add_argument("--resolution", type=int, default=512)
    args = p.parse_args(argv)
    if args.make:
        return make(args.make)
    if not args.path:
        p.error("give a parquet folder (or --make FOLDER to write one)")
    pairs = data.Preferences(args.path)
    print(f"{pairs.read}; {len(np.unique(pairs.group))} row groups, shuffle window {pairs.window_groups} groups "
          f"(~{data.SHUFFLE_PAIRS} pairs); {args.pairs} pairs read per order at {args.resolution} px, one process")
    print(f"{'order':<8} {'pairs/s':>8} {'decodes/100 pairs':>18} {'groups/16 pairs':>16} {'groups/2048 pairs':>18}")
    for order in ("block", "window", "uniform"):
        rate, decodes, micro, step = measure(args.path, order, args.pairs, args.resolution)
        print(f"{order:<8} {rate:>8.1f} {decodes:>18.1f} {micro:>16.1f} {step:>18.1f}", flush=True)


if __name__ == "__main__":
    main()
