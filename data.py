"""Preference data for dpo.py: Pick-a-Pic v2 parquet shards or JSONL, read lazily; image transforms; the UNets'
inputs made from a batch (VAE latents, text embeddings); a latent cache.

Two kinds of data. Pairs (parquet, or JSONL {caption, image_0, image_1, label_0}) have a preferred and a rejected
image; ties are dropped. Single images (JSONL {caption, image, label}, label 1 desirable, 0 undesirable) are what
Diffusion-KTO learns from; it takes pairs too, as two such records. An index holds, per usable item, where it
lives (file, row group, row) and which image won; images are read on demand, so the 851K-pair Pick-a-Pic v2
(hundreds of GB) never sits in memory. A Pick-a-Pic folder holds several splits side by side (train-00000-of-00645,
validation-..., test-..., ...); training reads the train shards only, as the official code (--split picks another).
A JSONL image may also point into a parquet shard ("shard.parquet#row=17&col=jpg_0", see parquet_ref): AI feedback
(sample.py --relabel) relabels Pick-a-Pic without copying its images.

Training visits the items in a global order (`EpochOrder`): the parquet row groups are shuffled, cut into windows
of about SHUFFLE_PAIRS pairs, and the pairs of a window are shuffled uniformly, so consecutive pairs (a micro-batch,
the RPO matrix) come from many row groups, while a reader decodes each row group once per window (an LRU of one
window) instead of once per pair. Global position P maps to epoch P // len and item order(epoch)[P % len]: the
order depends on (seed, position) alone, so every rank derives it and world size and resume do not change it.
"""
import glob
import hashlib
import io
import json
import os
import re
from collections import Counter, OrderedDict

import numpy as np
import torch
from PIL import Image

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "model_0", "model_1")  # Pick-a-Pic v2 parquet
SPLITS = ("train", "validation", "test", "validation_unique", "test_unique")  # Pick-a-Pic v2's splits
SHARD = re.compile(r"^([a-z][a-z_]*)-\d{5}-of-\d{5}")  # hub shard names: train-00000-of-00645-<hash>.parquet
SHUFFLE_PAIRS = 2048  # pairs per shuffle window (one optimizer step at the paper's batch size)


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading parquet needs pyarrow (pip install pyarrow), or give a JSONL file") from None
    return pq


def _split(f, root):
    """The split a shard belongs to: its name's prefix (train-00000-of-00645...), or a folder named after one."""
    m = SHARD.match(os.path.basename(f))
    if m:
        return m.group(1)
    folders = os.path.relpath(os.path.dirname(f), root).split(os.sep) if root else []
    return next((d for d in reversed(folders) if d in SPLITS), None)


def parquet_files(path: str, split: str = "train"):
    """A .parquet file, a folder or a glob -> (sorted files, what was read). Where the shards name their split
    (Pick-a-Pic's folder), only `split`'s are read; a folder with no recognisable split is read whole."""
    pattern = any(c in path for c in "*?[")
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    elif pattern:
        files = sorted(glob.glob(path))
    else:
        files = [path] if os.path.isfile(path) else []
    if not files:
        raise FileNotFoundError(f"no data at {path} (expected a .parquet file, a folder or glob of them, or .jsonl)")
    if not (os.path.isdir(path) or pattern):
        return files, f"{path}"
    root = path if os.path.isdir(path) else os.path.dirname(path.split("*")[0].split("?")[0].split("[")[0])
    splits = {f: _split(f, root) for f in files}
    named = Counter(s for s in splits.values() if s)
    if not named:
        return files, f"{len(files)} shard(s) in {path}, no split in their names: all read"
    chosen = [f for f in files if splits[f] == split]
    if not chosen:
        raise ValueError(f"--split {split} matches no shard in {path} (its splits: {', '.join(sorted(named))})")
    others = ", ".join(f"{s} ({n})" for s, n in sorted(named.items()) if s != split)
    return chosen, f"{len(chosen)} {split} shard(s) of {path}" + (f"; not read: {others}" if others else "")


def seed_for(*keys) -> int:
    """A 63-bit seed from integers (run seed, epoch, position, stream): the same on every rank and world size."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


REF = re.compile(r"^(?P<file>.+\.parquet)#row=(?P<row>\d+)&col=(?P<col>\w+)$")


def parquet_ref(file: str, row: int, col: str) -> str:
    """An image inside a parquet shard, as a JSONL image entry: "FILE#row=R&col=C" (row R counted from 0 over the
    whole file, C the image column), so relabelled Pick-a-Pic pairs point at its images instead of copying them."""
    return f"{file}#row={row}&col={col}"


def parse_ref(src):
    """(file, row, column) of a parquet_ref string; None for anything else (a path, bytes)."""
    m = REF.match(src) if isinstance(src, str) else None
    return (m.group("file"), int(m.group("row")), m.group("col")) if m else None


def parquet_layout(file: str):
    """(first row of each row group with the row count last (groups + 1,), column names) of a parquet file."""
    try:
        pf = _pq().ParquetFile(file)
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot read parquet file {file}: {why}") from None
    sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
    return np.cumsum([0] + sizes), pf.schema_arrow.names


def check_ref(layout, file: str, row: int, col: str):
    """Refuse a reference to a row or column the file does not have."""
    starts, names = layout
    if col not in names:
        raise ValueError(f"{file} has no column {col} (its columns: {', '.join(names)})")
    if not 0 <= row < starts[-1]:
        raise ValueError(f"{file} has {starts[-1]} rows, no row {row}")


def read_cell(file: str, row: int, col: str, cache=None, layout=None):
    """The value at (row, col) of a parquet file. Its row group's column is decoded once and kept in `cache` (an
    OrderedDict the caller trims as an LRU), so reading a row group's images one by one decodes it once."""
    layout = parquet_layout(file) if layout is None else layout
    check_ref(layout, file, row, col)
    starts = layout[0]
    g = int(np.searchsorted(starts, row, side="right")) - 1
    key = (file, g, col)
    if cache is not None and key in cache:
        cache.move_to_end(key)
        column = cache[key]
    else:
        column = _pq().ParquetFile(file).read_row_group(g, columns=[col]).column(col)
        if cache is not None:
            cache[key] = column
    return column[row - int(starts[g])].as_py()


class Pairs:
    """Index of the usable data and lazy access to its images: pairs (ties dropped, optional dreamlike filter) or
    single labelled images (self.singles). raw(i) = (caption, images, label): a pair's two images preferred first
    (label None), or one image with its label (1 desirable, 0 undesirable)."""

    def __init__(self, path: str, dreamlike_only: bool = False, split: str = "train"):
        self.path, self.jsonl, self.singles = path, path.endswith(".jsonl"), False
        if self.jsonl:
            self._index_jsonl(path)
            self.read = f"{path}"
        else:
            files, self.read = parquet_files(path, split)
            self._index_parquet(files, dreamlike_only)
        if len(self) == 0:
            raise ValueError(f"{path}: no usable pairs (all ties, or filtered out by --dreamlike_only)")
        self.read += f": {len(self)} usable {'images' if self.singles else 'pairs'}"
        groups = len(np.unique(self.group))  # row groups per shuffle window: about SHUFFLE_PAIRS pairs
        self.window_groups = max(1, min(groups, round(SHUFFLE_PAIRS * groups / len(self))))
        self._groups = OrderedDict()  # (file, group) -> pyarrow table, an LRU of one shuffle window

    def _index_jsonl(self, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file not found: {path}")
        root, rows, kinds = os.path.dirname(os.path.abspath(path)), [], set()
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    single = "image" in r
                    if single:  # {caption, image, label}: label 1 desirable, 0 undesirable
                        r = (str(r["caption"]), (r["image"],), float(r["label"]), n)
                    else:  # {caption, image_0, image_1, label_0}: label_0 1 if image_0 is preferred, 0.5 a tie
                        r = (str(r["caption"]), (r["image_0"], r["image_1"]), float(r["label_0"]), n)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{path}:{n}: not a JSON object with caption, image_0, image_1, label_0 (a "
                                     f"pair) or caption, image, label (one image) ({e})") from None
                kinds.add(single)
                if len(kinds) > 1:
                    raise ValueError(f"{path}:{n}: pairs and single images mixed in one file")
                if r[2] in (0.0, 1.0):  # a pair's label_0 == 0.5 is a tie: no preference to learn from
                    rows.append(r)
        self.singles = kinds == {True}
        self.rows, self.line, group = [], [], []
        self.layouts, groups = {}, {}  # parquet file -> layout; (file, row group) -> shuffle group (from 1)
        for caption, images, label, n in rows:
            images = tuple(os.path.join(root, im) for im in images)
            g = 0  # plain images: one group
            for im in images:  # references into parquet shards: checked now, grouped by the first one's row group
                ref = parse_ref(im)
                if ref is None:
                    continue
                try:
                    if ref[0] not in self.layouts:
                        self.layouts[ref[0]] = parquet_layout(ref[0])
                    check_ref(self.layouts[ref[0]], *ref)
                except ValueError as e:
                    raise ValueError(f"{path}:{n}: {e}") from None
                if g == 0:
                    key = (ref[0], int(np.searchsorted(self.layouts[ref[0]][0], ref[1], side="right")))
                    g = groups.setdefault(key, len(groups) + 1)
            if not self.singles and label == 0.0:
                images = images[::-1]  # the preferred image first
            self.rows.append((caption, images, int(label) if self.singles else None))
            self.line.append(n)
            group.append(g)
        self.winner = np.zeros(len(self.rows), dtype=np.int64)  # (JSONL rows are already preferred-first)
        self.group = np.array(group, dtype=np.int64)  # a plain full shuffle, or windows of parquet row groups
        self._cells = OrderedDict()  # (file, row group, column) -> decoded column, an LRU like _groups

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
        self.group = self.file * (1 << 32) + self.rg  # shuffle unit = one row group

    def __len__(self):
        return len(self.winner)

    def where(self, i: int) -> str:
        """Item i's place in the data, for messages: file:line (JSONL) or file, row (parquet, 0-based)."""
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
        return {"digest": h.hexdigest()[:16], "files": len(files), "pairs": len(self),
                "path": os.path.abspath(self.path)}

    def raw(self, i: int):
        """(caption, images preferred first (bytes for parquet and JSONL references into it, paths for other JSONL
        images), label or None)."""
        if self.jsonl:
            caption, images, label = self.rows[i]
            return caption, tuple(self._image(im) for im in images), label
        key = (int(self.file[i]), int(self.rg[i]))
        if key not in self._groups:
            f = _pq().ParquetFile(self.files[key[0]])
            self._groups[key] = f.read_row_group(key[1], columns=["caption", "jpg_0", "jpg_1"])
            while len(self._groups) > self.window_groups + 1:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        t, r = self._groups[key], int(self.row[i])
        imgs = (t.column("jpg_0")[r].as_py(), t.column("jpg_1")[r].as_py())
        w = int(self.winner[i])
        return str(t.column("caption")[r].as_py()), (imgs[w], imgs[1 - w]), None

    def _image(self, src):
        """A JSONL image: its path, or the bytes a parquet reference points at (a window's row groups kept)."""
        ref = parse_ref(src)
        if ref is None:
            return src
        value = read_cell(*ref, cache=self._cells, layout=self.layouts[ref[0]])
        while len(self._cells) > 2 * (self.window_groups + 1):  # two image columns per row group
            self._cells.popitem(last=False)
        return value


def read_pairs(path: str, dreamlike_only: bool = False, split: str = "train") -> list:
    """All usable pairs as dicts {caption, image_0 (preferred), image_1 (bytes or path), label_0, source (where it
    is)}; for evaluation-sized sets."""
    p = Pairs(path, dreamlike_only, split)
    if p.singles:
        raise ValueError(f"{path} holds single labelled images, not preference pairs")
    out = []
    for i in range(len(p)):
        caption, (preferred, other), _ = p.raw(i)
        out.append(dict(caption=caption, image_0=preferred, image_1=other, label_0=1.0, source=p.where(i)))
    return out


class PairRows:
    """Every pair of a parquet set or a JSONL file in file order, ties included (AI feedback labels them all), as
    dicts {caption, image_0, image_1: what open_image reads (bytes or a path); ref_0, ref_1: where each image lies
    (a path, or a parquet_ref); label_0: the data's own label (0.5 a tie; None if it has none); source: where the
    pair is}. A parquet row group is decoded once."""

    def __init__(self, path: str, split: str = "train"):
        self.path, self.jsonl = path, path.endswith(".jsonl")
        if self.jsonl:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"data file not found: {path}")
            with open(path) as f:
                self.n = sum(1 for line in f if line.strip())
            self.read = path
        else:
            self.files, self.read = parquet_files(path, split)
            self.layouts = [parquet_layout(f) for f in self.files]
            for f, (_, names) in zip(self.files, self.layouts):
                missing = [c for c in ("caption", "jpg_0", "jpg_1") if c not in names]
                if missing:
                    raise ValueError(f"{f}: missing columns {', '.join(missing)} (a pair needs caption, jpg_0, jpg_1)")
            self.n = sum(int(starts[-1]) for starts, _ in self.layouts)
        if self.n == 0:
            raise ValueError(f"{path}: no pairs")

    def __len__(self):
        return self.n

    def __iter__(self):
        return self._jsonl() if self.jsonl else self._parquet()

    def _jsonl(self):
        root, cells = os.path.dirname(os.path.abspath(self.path)), OrderedDict()
        with open(self.path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    caption = str(r["caption"])
                    refs = [os.path.join(root, r["image_0"]), os.path.join(root, r["image_1"])]
                    label = None if r.get("label_0") is None else float(r["label_0"])
                    images = [ref if parse_ref(ref) is None else read_cell(*parse_ref(ref), cache=cells)
                              for ref in refs]
                except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
                    raise ValueError(f"{self.path}:{n}: not a pair {{caption, image_0, image_1}} with readable "
                                     f"references ({e})") from None
                while len(cells) > 4:  # a row group's two image columns, and the next one's
                    cells.popitem(last=False)
                yield dict(caption=caption, image_0=images[0], image_1=images[1], ref_0=refs[0],
                           ref_1=refs[1], label_0=label, source=f"{self.path}:{n}")

    def _parquet(self):
        for f, (starts, names) in zip(self.files, self.layouts):
            pf = _pq().ParquetFile(f)
            cols = ["caption", "jpg_0", "jpg_1"] + (["label_0"] if "label_0" in names else [])
            for g in range(len(starts) - 1):
                t = pf.read_row_group(g, columns=cols).to_pydict()
                labels = t.get("label_0", [None] * len(t["caption"]))
                for r in range(len(t["caption"])):
                    row = int(starts[g]) + r
                    yield dict(caption=str(t["caption"][r]), image_0=t["jpg_0"][r], image_1=t["jpg_1"][r],
                               ref_0=parquet_ref(f, row, "jpg_0"), ref_1=parquet_ref(f, row, "jpg_1"),
                               label_0=None if labels[r] is None else float(labels[r]), source=f"{f}, row {row}")


def open_image(src) -> Image.Image:
    """Decode JPEG/PNG bytes, a file path or a parquet_ref to RGB (raises on corrupt or missing images)."""
    ref = parse_ref(src)
    if ref is not None:
        src = read_cell(*ref)
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
    """Global position -> item index. Epoch e = pos // n puts the groups (parquet row groups) in random order, cuts
    them into windows of `window` groups and shuffles the items of each window uniformly: a reader holding one
    window's row groups decodes each once per epoch. window=1 is a block shuffle; all groups, a uniform one."""

    def __init__(self, group: np.ndarray, seed: int, window: int = 1):
        self.group, self.seed, self.window, self._epoch, self._order = group, seed, window, None, None

    def order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(seed_for(self.seed, epoch, 0xD47A))
        groups = np.unique(self.group)
        rank = np.empty(len(groups), dtype=np.int64)
        rank[rng.permutation(len(groups))] = np.arange(len(groups))
        window = rank[np.searchsorted(groups, self.group)] // self.window  # (n,) each item's window
        return np.lexsort((rng.random(len(self.group)), window))

    def __call__(self, pos: int) -> int:
        epoch, k = divmod(int(pos), len(self.group))
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.order(epoch)
        return int(self._order[k])


class PairDataset(torch.utils.data.Dataset):
    """Global position -> the item's images (a pair's two, preferred first, or one with its label). An unreadable
    item is reported (its index in "bad") and replaced by the next readable one in the epoch order (deterministic,
    so every world size sees the same data)."""

    def __init__(self, pairs: Pairs, res: int, seed: int, random_crop: bool, flip: bool):
        self.pairs, self.res, self.seed, self.random_crop, self.flip = pairs, res, seed, random_crop, flip
        self.index = EpochOrder(pairs.group, seed, pairs.window_groups)
        self.per_item = 1 if pairs.singles else 2  # images per item

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, pos: int) -> dict:
        return dict(pos=pos, **self.read(lambda k: self.index(pos + k), pos))

    def read(self, candidate, key: int) -> dict:
        """Try pairs candidate(0), candidate(1), ... until one decodes; crop/flip drawn from (seed, key)."""
        bad = []  # the indices of the unreadable items passed over
        for k in range(len(self.pairs)):
            i = candidate(k)
            try:
                caption, images, label = self.pairs.raw(i)
                rng = np.random.default_rng(seed_for(self.seed, key, k, 0xC409))
                out = [transform(open_image(im), self.res, rng, self.random_crop, self.flip) for im in images]
            except Exception as e:  # corrupt bytes, missing file, decoder error: skip and report, never crash
                print(f"warning: skipping unreadable pair {self.pairs.where(i)} ({type(e).__name__}: {str(e)[:80]})",
                      flush=True)
                bad.append(i)
                continue
            item = dict(index=i, caption=caption, pixels=torch.stack([x for x, _ in out]),  # (k, 3, H, W)
                        time_ids=torch.stack([ids for _, ids in out]), bad=bad)  # (k, 6)
            if label is not None:
                item["label"] = label
            return item
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


def model_inputs(batch, drop, dev, args, encoders=None, empty=None, latent_noise=None):
    """What the UNets take for B items of k images each (pairs: k = 2): clean latents z (kB, C, h, w), all first
    images first (the winners), and cond = (context, pooled, time_ids) with kB rows. A dropped prompt is the
    encoders' embedding of "" (as the official code, for SDXL too; not zeros). --latents sample draws z from the
    VAE posterior with latent_noise (B, k, C, h, w) (the official code); the default is the posterior mean.
    --time_ids official gives every image the constants the official code used."""
    with torch.no_grad():
        if "latents" in batch:  # --cache: latents and text embeddings were computed once
            z = batch["latents"].to(dev).float()  # (B, k, C, h, w)
            std = batch["latents_std"].to(dev).float() if latent_noise is not None else None
            ctx = torch.where(drop[:, None, None], empty["context"], batch["context"].to(dev))
            pooled = batch.get("pooled")
            if pooled is not None:
                pooled = torch.where(drop[:, None], empty["pooled"], pooled.to(dev))
        else:  # the VAE and the text encoders run here, on the GPU
            te, v = encoders
            px = batch["pixels"].to(dev)  # (B, k, 3, H, W)
            with torch.autocast(dev.type, torch.bfloat16, enabled=args.amp_dtype == torch.bfloat16):
                one = [v.encode(x[None], std=True) for x in px.flatten(0, 1)]  # an image at a time: 1/Bk the peak
            z, std = torch.cat([m for m, _ in one]), torch.cat([s for _, s in one])  # (Bk, C, h, w) each, unscaled
            z = z.float().unflatten(0, px.shape[:2]) * v.scaling_factor  # (B, k, C, h, w) scaled latent means
            std = std.float().unflatten(0, px.shape[:2]) * v.scaling_factor
            ctx, pooled = te.encode(["" if d else c for c, d in zip(batch["caption"], drop.tolist())])
        if latent_noise is not None:
            z = z + std * latent_noise.to(dev)  # a sample of the posterior instead of its mean
        k = z.shape[1]
        z = z.transpose(0, 1).flatten(0, 1)  # (kB, C, h, w): all first images, then all second ones
        time_ids = None  # SDXL (the family with a pooled embedding) is also told each image's size and crop
        if pooled is not None:
            time_ids = batch["time_ids"].to(dev).float().transpose(0, 1).flatten(0, 1)  # (B, k, 6) -> (kB, 6)
            if args.time_ids == "official":
                r = float(args.resolution)
                time_ids = torch.tensor([r, r, 0.0, 0.0, r, r], device=dev).expand(len(time_ids), 6)
            pooled = pooled.repeat(k, 1)
    return z, (ctx.repeat(k, 1, 1), pooled, time_ids)


def rpo_embeddings(batch, dev, scorer):
    """Diffusion-RPO's CLIP embeddings of B pairs (B, 3, P): prompt, winner, loser (unit length, fp32), from the
    cache (--cache) or from the images with scorer (a reward.Scorer: its CLIP towers)."""
    if "rpo_clip" in batch:
        return batch["rpo_clip"].to(dev).float()
    return clip_triples(scorer, batch["pixels"].to(dev), batch["caption"])


def clip_triples(scorer, pixels, captions):
    """pixels (B, 2, 3, H, W) in [-1, 1] and B captions -> (B, 3, P): each pair's prompt, winner, loser embedding."""
    with torch.no_grad():
        img = scorer.image_embeds((pixels.flatten(0, 1) + 1) / 2).unflatten(0, pixels.shape[:2])  # (B, 2, P)
        txt = scorer.text_embeds(list(captions))  # (B, P)
    return torch.cat([txt[:, None], img], 1)  # (B, 3, P)


def training_set(args, pairs, dev, rank, world, log):
    """(dataset, (text encoders, VAE) or None, embeddings of "" or None, VAE downsampling): the latent cache with
    --cache or without --data (built first if missing), else the images themselves."""
    meta = cache_meta(args.cache_dir)
    singles = pairs.singles if pairs is not None else bool(meta and meta.get("singles"))
    if singles and args.loss != "kto":  # one image has no second to compare with; refused before anything is written
        raise ValueError(f"{args.data or args.cache_dir} holds single labelled images: train them with --loss kto")
    if not args.cache and pairs is not None:
        import clip
        import vae as vaelib
        te = clip.load(args.model, dev, args.amp_dtype, tokenizer=args.tokenizer)
        v = vaelib.load(args.model, dev, torch.float32)
        dataset = PairDataset(pairs, args.resolution, args.seed, args.random_crop, not args.no_flip)
        return dataset, (te, v), None, v.downsample
    if meta is None and pairs is None:
        raise FileNotFoundError(f"no --data and no cache in {args.cache_dir}")
    if meta is None:
        log(f"building the latent cache in {args.cache_dir}")
        build_cache(args, pairs, dev, rank, world)
    elif meta["resolution"] != args.resolution or (pairs is not None and meta["pairs"] != len(pairs)):
        raise ValueError(f"the cache in {args.cache_dir} was built for other data or resolution; "
                         "use another --cache_dir")
    elif args.rpo_clip and meta.get("rpo_clip") != os.path.abspath(args.rpo_clip):
        raise ValueError(f"the cache in {args.cache_dir} holds no CLIP embeddings of --rpo_clip {args.rpo_clip} "
                         f"(built {'with ' + meta['rpo_clip'] if meta.get('rpo_clip') else 'without it'}): "
                         "use another --cache_dir")
    elif args.latents == "sample" and not meta.get("latents_std"):
        raise ValueError(f"the cache in {args.cache_dir} holds latent means only, --latents sample needs their "
                         "standard deviations too: use another --cache_dir")
    dataset = Cache(args.cache_dir, args.seed)
    empty = {k: None if v is None else v.to(dev) for k, v in dataset.empty.items()}
    return dataset, None, empty, dataset.meta["downsample"]


# ----------------------------------------------------------------------------------------------------
# The latent cache: scaled VAE latents + text embeddings, computed once, so training needs neither VAE nor
# text encoders. One crop/flip per pair is frozen into it (drawn as in epoch 0).

CACHE_KEYS = ("latents", "latents_std", "context", "pooled", "time_ids", "label", "rpo_clip")


def cache_meta(cache_dir: str):
    p = os.path.join(cache_dir, "meta.json")
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return json.load(f)


class Cache(torch.utils.data.Dataset):
    """A cache written by build_cache: global position -> latents (k, C, h, w) preferred first, context, pooled,
    time_ids (and label, for single images); memory-mapped, one row at a time. The order is a plain shuffle of all
    cached items per epoch."""

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
        self.per_item = 1 if self.meta.get("singles") else 2  # images per item
        self.empty = torch.load(os.path.join(cache_dir, "empty.pt"), weights_only=True)  # embeddings of ""

    def __len__(self):
        return self.meta["pairs"]

    def __getitem__(self, pos: int) -> dict:
        k, r = self.where[self.index(pos)]
        h = self.shards[k]
        item = dict(pos=pos, bad=[], **{n: h.get_slice(n)[r:r + 1][0] for n in CACHE_KEYS if n in h.keys()})
        if "label" in item:
            item["label"] = int(item["label"])
        return item


def build_cache(args, pairs, dev, rank, world):
    """Each rank encodes items rank, rank+world, ...; crop/flip are frozen per item (drawn as for key = its index).
    Latents (and with --latents sample their posterior std) are stored in fp16 (fp32 for fp32 runs), text
    embeddings in the compute dtype."""
    import torch.distributed as dist

    import clip
    import vae as vaelib
    from weights import save_json, save_safetensors
    te = clip.load(args.model, dev, args.amp_dtype, tokenizer=args.tokenizer)
    v = vaelib.load(args.model, dev, torch.float32)
    scorer = None
    if args.rpo_clip:  # Diffusion-RPO's CLIP embeddings of each pair, stored beside its latents
        import reward
        scorer = reward.load("clip", args.rpo_clip, dev, args.amp_dtype)
    ds, n = PairDataset(pairs, args.resolution, args.seed, args.random_crop, not args.no_flip), len(pairs)
    store = torch.float32 if args.amp_dtype == torch.float32 else torch.float16
    mine, bad, done = list(range(rank, n, world)), set(), 0
    os.makedirs(args.cache_dir, exist_ok=True)
    for s in range(0, len(mine), 1024):  # one shard file per 1024 pairs
        out = {k: [] for k in ("index", *CACHE_KEYS)}
        for b in range(s, min(s + 1024, len(mine)), 8):
            items = [ds.read(lambda k, i=i: (i + k) % n, i) for i in mine[b:b + 8]]
            bad.update(i for d in items for i in d["bad"])
            px = torch.stack([d["pixels"] for d in items]).to(dev)  # (b, k, 3, H, W)
            with torch.no_grad():
                z, std = v.encode(px.flatten(0, 1), std=True)  # (bk, C, h, w) each
                ctx, pooled = te.encode([d["caption"] for d in items])
            out["index"].append(torch.tensor(mine[b:b + 8]))
            out["latents"].append((z.float() * v.scaling_factor).unflatten(0, px.shape[:2]).to(store).cpu())
            if args.latents == "sample":
                out["latents_std"].append((std.float() * v.scaling_factor).unflatten(0, px.shape[:2]).to(store).cpu())
            out["context"].append(ctx.cpu())
            if scorer is not None:
                out["rpo_clip"].append(clip_triples(scorer, px, [d["caption"] for d in items]).cpu())
            out["time_ids"].append(torch.stack([d["time_ids"] for d in items]))
            out["pooled"].append(None if pooled is None else pooled.cpu())
            if pairs.singles:
                out["label"].append(torch.tensor([d["label"] for d in items]))
        done += len(out["index"])
        save_safetensors({k: torch.cat(v) for k, v in out.items() if v and v[0] is not None},
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
                    data=os.path.abspath(args.data), downsample=v.downsample, fingerprint=pairs.fingerprint(),
                    singles=pairs.singles, latents_std=args.latents == "sample",
                    rpo_clip=os.path.abspath(args.rpo_clip) if args.rpo_clip else None)
        save_json(meta, os.path.join(args.cache_dir, "meta.json"))
    dist.barrier()
