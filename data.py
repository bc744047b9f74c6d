"""Preference pairs for dpo.py: Pick-a-Pic v2 parquet shards or JSONL, read lazily; image transforms; the UNets'
inputs made from a batch (VAE latents, text embeddings); a latent cache.

An index holds, per usable pair, where it lives (file, row group, row) and which image won; images are read on
demand, one parquet row group at a time, so the 851K-pair Pick-a-Pic v2 (hundreds of GB) never sits in memory.
Training visits pairs in a global order (`EpochOrder`): row groups shuffled, rows shuffled inside each group
(a block shuffle, so a rank reads a row group once instead of once per pair). Global position P of the run maps
to epoch P // len and pair order(epoch)[P % len]; every rank derives the same order and takes its own positions.
"""
import glob
import hashlib
import io
import json
import os
from collections import OrderedDict

import numpy as np
import torch
from PIL import Image

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "model_0", "model_1")  # Pick-a-Pic v2 parquet


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading parquet needs pyarrow (pip install pyarrow), or give a JSONL file") from None
    return pq


def parquet_files(path: str) -> list:
    """A .parquet file, a folder of them, or a glob -> sorted file list."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    elif any(c in path for c in "*?["):
        files = sorted(glob.glob(path))
    else:
        files = [path] if os.path.isfile(path) else []
    if not files:
        raise FileNotFoundError(f"no data at {path} (expected a .parquet file, a folder or glob of them, or .jsonl)")
    return files


def seed_for(*keys) -> int:
    """A 63-bit seed from integers (run seed, epoch, position, stream): the same on every rank and world size."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class Pairs:
    """Index of usable pairs (ties dropped, optional dreamlike filter) and lazy access to their images."""

    def __init__(self, path: str, dreamlike_only: bool = False):
        self.path, self.jsonl = path, path.endswith(".jsonl")
        if self.jsonl:
            self._index_jsonl(path)
        else:
            self._index_parquet(parquet_files(path), dreamlike_only)
        if len(self) == 0:
            raise ValueError(f"{path}: no usable pairs (all ties, or filtered out by --dreamlike_only)")
        self._groups = OrderedDict()  # (file, group) -> pyarrow table, a small LRU cache

    def _index_jsonl(self, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file not found: {path}")
        root, rows = os.path.dirname(os.path.abspath(path)), []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    r = (str(r["caption"]), r["image_0"], r["image_1"], float(r["label_0"]))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{path}:{n}: not a JSON object with caption, image_0, image_1, label_0 "
                                     f"({e})") from None
                if r[3] in (0.0, 1.0):  # label_0 == 0.5 is a tie: no preference to learn from
                    rows.append(r + (n,))
        self.rows = [(c, os.path.join(root, a), os.path.join(root, b), int(lab == 0.0)) for c, a, b, lab, _ in rows]
        self.line = [r[4] for r in rows]  # where each pair is, for messages
        self.winner = np.array([r[3] for r in self.rows], dtype=np.int64)  # index (0/1) of the preferred image
        self.group = np.zeros(len(self.rows), dtype=np.int64)  # one group: a plain full shuffle

    def _index_parquet(self, files, dreamlike_only):
        pq = _pq()
        self.files, fi, gi, ri, win = files, [], [], [], []
        self.group_start = []  # per file: the first row of each row group, for messages
        for k, f in enumerate(files):
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ValueError(f"cannot read parquet file {f}: {why}") from None
            missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(f"{f}: missing columns {', '.join(missing)} (Pick-a-Pic v2 has {', '.join(COLUMNS)})")
            meta = pf.read(columns=["label_0", "model_0", "model_1"]).to_pydict()  # small columns only, no images
            lab = np.asarray(meta["label_0"], dtype=np.float64)
            keep = (lab == 0.0) | (lab == 1.0)
            if dreamlike_only:  # as the official code: both generations from a model whose name contains "dream"
                both = [("dream" in str(a)) and ("dream" in str(b)) for a, b in zip(meta["model_0"], meta["model_1"])]
                keep &= np.array(both, dtype=bool)
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            self.group_start.append(np.cumsum([0] + sizes))
            group = np.repeat(np.arange(len(sizes)), sizes)
            row = np.concatenate([np.arange(s) for s in sizes]) if sizes else np.zeros(0, np.int64)
            fi.append(np.full(keep.sum(), k))
            gi.append(group[keep])
            ri.append(row[keep])
            win.append((lab[keep] == 0.0).astype(np.int64))
        self.file, self.rg, self.row, self.winner = (np.concatenate(a).astype(np.int64) for a in (fi, gi, ri, win))
        self.group = self.file * (1 << 32) + self.rg  # block-shuffle unit = one row group

    def __len__(self):
        return len(self.winner)

    def where(self, i: int) -> str:
        """Pair i's place in the data, for messages: file:line (JSONL) or file, row (parquet, 0-based)."""
        if self.jsonl:
            return f"{self.path}:{self.line[i]}"
        f = int(self.file[i])
        return f"{self.files[f]}, row {int(self.group_start[f][self.rg[i]] + self.row[i])}"

    def fingerprint(self) -> dict:
        """What the data is, wherever it lies: the files' names (relative to one another), sizes and the pair count
        after filtering, plus a JSONL file's content. Moving the same files keeps it."""
        files = [self.path] if self.jsonl else self.files
        root = os.path.commonpath([os.path.abspath(f) for f in files]) if len(files) > 1 else None
        h = hashlib.sha256(f"{len(self)} pairs\n".encode())
        for f in files:
            h.update(f"{os.path.relpath(os.path.abspath(f), root) if root else ''}:{os.path.getsize(f)}\n".encode())
        if self.jsonl:
            with open(self.path, "rb") as fh:
                h.update(fh.read())
        return {"digest": h.hexdigest()[:16], "files": len(files), "pairs": len(self), "path": os.path.abspath(self.path)}

    def raw(self, i: int):
        """(caption, preferred image, other image): bytes (parquet) or file paths (JSONL)."""
        if self.jsonl:
            c, a, b, w = self.rows[i]
            return (c, a, b) if w == 0 else (c, b, a)
        key = (int(self.file[i]), int(self.rg[i]))
        if key not in self._groups:
            f = _pq().ParquetFile(self.files[key[0]])
            self._groups[key] = f.read_row_group(key[1], columns=["caption", "jpg_0", "jpg_1"])
            while len(self._groups) > 2:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        t, r = self._groups[key], int(self.row[i])
        imgs = (t.column("jpg_0")[r].as_py(), t.column("jpg_1")[r].as_py())
        w = int(self.winner[i])
        return str(t.column("caption")[r].as_py()), imgs[w], imgs[1 - w]


def read_pairs(path: str, dreamlike_only: bool = False) -> list:
    """All usable pairs as dicts {caption, image_0, image_1 (bytes or path), label_0, source (where it is)}; for
    evaluation-sized sets."""
    p = Pairs(path, dreamlike_only)
    return [dict(zip(("caption", "image_0", "image_1"), p.raw(i)), label_0=1.0, source=p.where(i))
            for i in range(len(p))]


def open_image(src) -> Image.Image:
    """Decode JPEG/PNG bytes or a file path to RGB (raises on corrupt or missing images)."""
    img = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
    img.load()
    return img.convert("RGB")


def transform(img: Image.Image, res: int, rng: np.random.Generator, random_crop: bool, flip: bool):
    """Resize the short side to res, crop res x res (center or random), maybe flip.

    Returns pixels (3, res, res) in [-1, 1] and SDXL's size conditioning (orig_h, orig_w, crop_top, crop_left,
    res, res), taken from this image's true size and crop (the official code passed constants).
    """
    w, h = img.size
    s = res / min(w, h)
    nw, nh = max(res, round(w * s)), max(res, round(h * s))
    img = img.resize((nw, nh), Image.BILINEAR)
    top = int(rng.integers(0, nh - res + 1)) if random_crop else (nh - res) // 2
    left = int(rng.integers(0, nw - res + 1)) if random_crop else (nw - res) // 2
    img = img.crop((left, top, left + res, top + res))
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        left = nw - res - left  # the crop as seen in the mirrored image
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0  # (3, res, res)
    return x, torch.tensor([h, w, top, left, res, res], dtype=torch.float32)


class EpochOrder:
    """Global position -> pair index. Epoch e = pos // n visits the pairs with groups (parquet row groups) in random
    order and rows shuffled within their group: a rank reads each row group once per epoch, not once per pair."""

    def __init__(self, group: np.ndarray, seed: int):
        self.group, self.seed, self._epoch, self._order = group, seed, None, None

    def order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(seed_for(self.seed, epoch, 0xD47A))
        groups = np.unique(self.group)
        rank = np.empty(len(groups), dtype=np.int64)
        rank[rng.permutation(len(groups))] = np.arange(len(groups))
        return np.lexsort((rng.random(len(self.group)), rank[np.searchsorted(groups, self.group)]))

    def __call__(self, pos: int) -> int:
        epoch, k = divmod(int(pos), len(self.group))
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.order(epoch)
        return int(self._order[k])


class PairDataset(torch.utils.data.Dataset):
    """Global position -> the pair's two images, preferred first. An unreadable pair is reported (its index in
    "bad") and replaced by the next readable one in the epoch order (deterministic, so every world size sees the
    same data)."""

    def __init__(self, pairs: Pairs, res: int, seed: int, random_crop: bool, flip: bool):
        self.pairs, self.res, self.seed, self.random_crop, self.flip = pairs, res, seed, random_crop, flip
        self.index = EpochOrder(pairs.group, seed)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, pos: int) -> dict:
        return dict(pos=pos, **self.read(lambda k: self.index(pos + k), pos))

    def read(self, candidate, key: int) -> dict:
        """Try pairs candidate(0), candidate(1), ... until one decodes; crop/flip drawn from (seed, key)."""
        bad = []  # the indices of the unreadable pairs passed over
        for k in range(len(self.pairs)):
            i = candidate(k)
            try:
                cap, a, b = self.pairs.raw(i)
                rng = np.random.default_rng(seed_for(self.seed, key, k, 0xC409))
                xa, ida = transform(open_image(a), self.res, rng, self.random_crop, self.flip)
                xb, idb = transform(open_image(b), self.res, rng, self.random_crop, self.flip)
            except Exception as e:  # corrupt bytes, missing file, decoder error: skip and report, never crash
                print(f"warning: skipping unreadable pair {self.pairs.where(i)} ({type(e).__name__}: {str(e)[:80]})",
                      flush=True)
                bad.append(i)
                continue
            return dict(index=i, caption=cap, pixels=torch.stack([xa, xb]), time_ids=torch.stack([ida, idb]), bad=bad)
        raise ValueError(f"{self.pairs.path}: no readable image pair")


def distinct(indices) -> set:
    """The union over all ranks of each rank's set of pair indices (an unreadable pair met twice counts once)."""
    import torch.distributed as dist
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, set(indices))
    return set().union(*parts)


def collate(items: list) -> dict:
    """Stack tensors, list strings, join the lists of skipped pairs."""
    out = {}
    for k, v in items[0].items():
        vals = [d[k] for d in items]
        if torch.is_tensor(v):
            out[k] = torch.stack(vals)
        elif k == "bad":
            out[k] = [i for v in vals for i in v]
        else:
            out[k] = torch.tensor(vals) if isinstance(v, int) else vals
    return out


def model_inputs(batch, drop, dev, amp_dtype, encoders=None, empty=None):
    """What the UNets take: clean latents z (2B, C, h, w) winners first, and cond = (context, pooled, time_ids) with
    2B rows. A dropped prompt is the encoders' embedding of "" (as the official code, for SDXL too; not zeros)."""
    with torch.no_grad():
        if "latents" in batch:  # --cache: latents and text embeddings were computed once
            z = batch["latents"].to(dev).transpose(0, 1).flatten(0, 1).float()  # (B, 2, C, h, w) -> (2B, ...)
            ctx = torch.where(drop[:, None, None], empty["context"], batch["context"].to(dev))
            pooled = batch.get("pooled")
            if pooled is not None:
                pooled = torch.where(drop[:, None], empty["pooled"], pooled.to(dev))
        else:  # the VAE and the text encoders run here, on the GPU
            te, v = encoders
            px = batch["pixels"].to(dev).transpose(0, 1).flatten(0, 1)  # (2B, 3, H, W) winners first
            with torch.autocast(dev.type, torch.bfloat16, enabled=amp_dtype == torch.bfloat16):
                z = v.encode(px).float() * v.scaling_factor  # (2B, C, h, w) scaled latent means
            ctx, pooled = te.encode(["" if d else c for c, d in zip(batch["caption"], drop.tolist())])
        time_ids = None  # SDXL (the family with a pooled embedding) is also told each image's size and crop
        if pooled is not None:
            time_ids = batch["time_ids"].to(dev).float().transpose(0, 1).flatten(0, 1)  # (B, 2, 6) -> (2B, 6)
            pooled = torch.cat([pooled, pooled])
    return z, (torch.cat([ctx, ctx]), pooled, time_ids)


def training_set(args, pairs, dev, rank, world, log):
    """(dataset, (text encoders, VAE) or None, embeddings of "" or None, VAE downsampling): the latent cache with
    --cache or without --data (built first if missing), else the images themselves."""
    if not args.cache and pairs is not None:
        import clip
        import vae as vaelib
        te = clip.load(args.model, dev, args.amp_dtype, tokenizer=args.tokenizer)
        v = vaelib.load(args.model, dev, torch.float32)
        dataset = PairDataset(pairs, args.resolution, args.seed, args.random_crop, not args.no_flip)
        return dataset, (te, v), None, v.downsample
    meta = cache_meta(args.cache_dir)
    if meta is None and pairs is None:
        raise FileNotFoundError(f"no --data and no cache in {args.cache_dir}")
    if meta is None:
        log(f"building the latent cache in {args.cache_dir}")
        build_cache(args, pairs, dev, rank, world)
    elif meta["resolution"] != args.resolution or (pairs is not None and meta["pairs"] != len(pairs)):
        raise ValueError(f"the cache in {args.cache_dir} was built for other data or resolution; "
                         "use another --cache_dir")
    dataset = Cache(args.cache_dir, args.seed)
    empty = {k: None if v is None else v.to(dev) for k, v in dataset.empty.items()}
    return dataset, None, empty, dataset.meta["downsample"]


# ----------------------------------------------------------------------------------------------------
# The latent cache: scaled VAE latents + text embeddings, computed once, so training needs neither VAE nor
# text encoders. One crop/flip per pair is frozen into it (drawn as in epoch 0).

CACHE_KEYS = ("latents", "context", "pooled", "time_ids")


def cache_meta(cache_dir: str):
    p = os.path.join(cache_dir, "meta.json")
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return json.load(f)


class Cache(torch.utils.data.Dataset):
    """A cache written by dpo.build_cache: global position -> latents (2, C, h, w) preferred first, context, pooled,
    time_ids; memory-mapped, one row at a time. The order is a plain shuffle of all cached pairs per epoch."""

    def __init__(self, cache_dir: str, seed: int):
        from safetensors import safe_open
        self.meta = cache_meta(cache_dir)
        if self.meta is None:
            raise FileNotFoundError(f"no cache at {cache_dir} (meta.json missing): run with --cache and --data first")
        self.shards = [safe_open(os.path.join(cache_dir, s), "pt") for s in self.meta["shards"]]
        self.where = {}  # pair index -> (shard, row)
        for k, h in enumerate(self.shards):
            for r, i in enumerate(h.get_tensor("index").tolist()):
                self.where[i] = (k, r)
        self.index = EpochOrder(np.zeros(self.meta["pairs"], dtype=np.int64), seed)
        self.empty = torch.load(os.path.join(cache_dir, "empty.pt"), weights_only=True)  # embeddings of ""

    def __len__(self):
        return self.meta["pairs"]

    def __getitem__(self, pos: int) -> dict:
        k, r = self.where[self.index(pos)]
        h = self.shards[k]
        return dict(pos=pos, bad=[], **{n: h.get_slice(n)[r:r + 1][0] for n in CACHE_KEYS if n in h.keys()})


def build_cache(args, pairs, dev, rank, world):
    """Each rank encodes pairs rank, rank+world, ...; crop/flip are frozen per pair (drawn as for key = pair index).
    Latents are stored in fp16 (fp32 for fp32 runs), text embeddings in the compute dtype."""
    import torch.distributed as dist

    import clip
    import vae as vaelib
    from weights import save_json, save_safetensors
    te = clip.load(args.model, dev, args.amp_dtype, tokenizer=args.tokenizer)
    v = vaelib.load(args.model, dev, torch.float32)
    ds, n = PairDataset(pairs, args.resolution, args.seed, args.random_crop, not args.no_flip), len(pairs)
    store = torch.float32 if args.amp_dtype == torch.float32 else torch.float16
    mine, bad, done = list(range(rank, n, world)), set(), 0
    os.makedirs(args.cache_dir, exist_ok=True)
    for s in range(0, len(mine), 1024):  # one shard file per 1024 pairs
        out = {k: [] for k in ("index", "latents", "context", "pooled", "time_ids")}
        for b in range(s, min(s + 1024, len(mine)), 8):
            items = [ds.read(lambda k, i=i: (i + k) % n, i) for i in mine[b:b + 8]]
            bad.update(i for d in items for i in d["bad"])
            px = torch.stack([d["pixels"] for d in items]).to(dev)  # (b, 2, 3, H, W)
            with torch.no_grad():
                z = v.encode(px.flatten(0, 1)).float() * v.scaling_factor  # (2b, C, h, w)
                ctx, pooled = te.encode([d["caption"] for d in items])
            out["index"].append(torch.tensor(mine[b:b + 8]))
            out["latents"].append(z.unflatten(0, (len(items), 2)).to(store).cpu())
            out["context"].append(ctx.cpu())
            out["time_ids"].append(torch.stack([d["time_ids"] for d in items]))
            out["pooled"].append(None if pooled is None else pooled.cpu())
        done += len(out["index"])
        save_safetensors({k: torch.cat(v) for k, v in out.items() if v[0] is not None},
                         os.path.join(args.cache_dir, f"r{rank:03d}_{s // 1024:05d}.safetensors"))
        if rank == 0:
            print(f"cache: rank 0 encoded {min(s + 1024, len(mine))}/{len(mine)} pairs", flush=True)
    bad_all = distinct(bad)
    if len(bad_all) > args.max_bad_frac * max(n, 100):
        raise ValueError(f"{len(bad_all)} of {n} pairs in {args.data} are unreadable (more than --max_bad_frac "
                         f"{args.max_bad_frac})")
    if rank == 0:
        with torch.no_grad():
            ctx, pooled = te.encode([""])
        empty = {"context": ctx[0].cpu(), "pooled": None if pooled is None else pooled[0].cpu()}
        torch.save(empty, os.path.join(args.cache_dir, "empty.pt"))
        shards = sorted(f for f in os.listdir(args.cache_dir) if f.endswith(".safetensors"))
        meta = dict(pairs=n, shards=shards, resolution=args.resolution, model=os.path.abspath(args.model),
                    data=os.path.abspath(args.data), downsample=v.downsample, fingerprint=pairs.fingerprint())
        save_json(meta, os.path.join(args.cache_dir, "meta.json"))
    dist.barrier()
