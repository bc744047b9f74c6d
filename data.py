"""Preference data for dpo.py: Pick-a-Pic v2 parquet shards or JSONL, read lazily; every pair of a set in file order
(what AI feedback labels); prompt sets; the order training visits the data in; batches. (The items' images, cropped
and flipped, and the denoiser's inputs made from a batch, now or once ahead in a latent cache, are cache.py's.)

Two kinds of data. Pairs (parquet, or JSONL {caption, image_0, image_1, label_0}) have a preferred and a rejected
image; ties are dropped. Single images (JSONL {caption, image, label}, label 1 desirable, 0 undesirable) are what
Diffusion-KTO learns from; it takes pairs too, as two such records. An index holds, per usable item, where it
lives (file, row group, row) and which image won; images are read on demand, so the 851K-pair Pick-a-Pic v2
(hundreds of GB) never sits in memory. A Pick-a-Pic folder holds several splits side by side (train-00000-of-00645,
validation-..., test-..., ...); training reads the train shards only, as the official code (--split picks another).
A JSONL image may also point into a parquet shard ("shard.parquet#row=17&col=jpg_0", see images.parquet_ref): AI
feedback (relabel.py) relabels Pick-a-Pic without copying its images.

Training visits the items in a global order (`EpochOrder`): the parquet row groups are shuffled, cut into windows
of about SHUFFLE_PAIRS pairs, and the pairs of a window are shuffled uniformly, so consecutive pairs (a micro-batch,
the RPO matrix) come from many row groups, while a reader decodes each row group once per window (an LRU of one
window) instead of once per pair. Global position P maps to epoch P // len and item order(epoch)[P % len]: the
order depends on (seed, position) alone, so every rank derives it and world size and resume do not change it.
"""
import glob
import hashlib
import json
import os
import re
from collections import Counter, OrderedDict
from typing import List, Tuple

import numpy as np
import torch
import torch.distributed as dist

import cli
import hub
from images import cell_image, check_ref, parquet_file, parquet_layout, parquet_ref, parse_ref, read_cell

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "model_0", "model_1")  # Pick-a-Pic v2 parquet
COLUMN_MAP = COLUMNS[:4] + COLUMNS[5:]  # what --columns maps to another set's names (label_1 follows label_0)
SPLITS = ("train", "validation", "test", "validation_unique", "test_unique")  # Pick-a-Pic v2's splits
SHARD = re.compile(r"^([a-z][a-z_]*)-\d{5}-of-\d{5}")  # hub shard names: train-00000-of-00645-<hash>.parquet
SHUFFLE_PAIRS = 2048  # pairs per shuffle window (one optimizer step at the paper's batch size)


def column_map(columns):
    """--columns "OURS=THEIRS,..." -> {ours: theirs} (None without it): another parquet set read as Pick-a-Pic."""
    return cli.parse_map(columns, "--columns", COLUMN_MAP) if columns else None


def check_flags(p, path, split, columns):
    """The data flags' refusals when a tool parses them (p.error: one line): --split and --columns pick a parquet
    set's shards and name its columns, which a JSONL file has not; --columns must read as OURS=THEIRS."""
    jsonl = bool(path) and path.endswith(".jsonl")
    if split and jsonl:
        p.error(f"--split picks the shards of a Pick-a-Pic folder; {path} is a JSONL file: drop --split")
    if columns and jsonl:
        p.error(f"--columns maps a parquet set's column names; {path} is a JSONL file: drop --columns")
    try:
        column_map(columns)
    except ValueError as e:
        p.error(str(e))


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
    if hub.remote(path):  # a hub dataset's shards, listed and read where they lie
        files, pattern = hub.find(path), True
    elif os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    elif pattern:
        files = sorted(glob.glob(path))
    else:
        files = [path] if os.path.isfile(path) else []
    if not files:
        raise FileNotFoundError(f"no data at {path} (expected a .parquet file, a folder or glob of them, or .jsonl)")
    if not (os.path.isdir(path) or pattern):
        return files, f"{path}"
    stem = path.split("*")[0].split("?")[0].split("[")[0]
    root = path if os.path.isdir(path) or hub.remote(path) else os.path.dirname(stem)
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


def read_jsonl(path: str, labelled: bool = True):
    """Each non-empty line of a JSONL data file as (line number, caption, images, label, single): a pair {caption,
    image_0, image_1, label_0} (label_0 1: image_0 preferred, 0: image_1, 0.5: a tie) or one image {caption, image,
    label} (1 desirable, 0 undesirable, single=True). Image paths are joined to the file's folder (parquet_ref
    strings too). labelled=False: a pair's label_0 may be missing (label None)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    root = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                single = "image" in r
                if single:
                    images, label = (r["image"],), float(r["label"])
                else:
                    images = (r["image_0"], r["image_1"])
                    label = None if not labelled and r.get("label_0") is None else float(r["label_0"])
                caption = r["caption"]  # text; anything else is a bad row, met (and counted) when it is read
                images = tuple(im if hub.remote(im) else os.path.join(root, im) for im in images)  # (hf:// refs)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
                raise ValueError(f"{path}:{n}: not a JSON object with caption, image_0, image_1, label_0 (a pair) or "
                                 f"caption, image, label (one image) ({e})") from None
            yield n, caption, images, label, single


class Preferences:
    """Index of the usable preference data and lazy access to its images: pairs (ties dropped, optional dreamlike
    filter) or single labelled images (self.singles). raw(i) = (caption, images, label): a pair's two images
    preferred first (label None), or one image with its label (1 desirable, 0 undesirable)."""

    def __init__(self, path: str, dreamlike_only: bool = False, split: str = "train", columns: dict = None):
        self.path, self.jsonl, self.singles = path, path.endswith(".jsonl"), False
        self.columns = dict(columns or {})  # our column name -> the set's (cli.parse_map of --columns)
        self.dropped, self.first_invalid = Counter(), None  # rows left out, by why; where the first bad label is
        if self.jsonl:
            self._index_jsonl(path)
            self.read = f"{path}"
        else:
            files, self.read = parquet_files(path, split)
            self._index_parquet(files, dreamlike_only)
        what = "images" if self.singles else "pairs"
        if len(self) == 0:
            raise ValueError(f"{path}: no usable {what}: " + (self.said() or "it has no rows"))
        self.read += f": {len(self)} usable {what}" + (f"; left out {self.said()}" if self.said() else "")
        groups = len(np.unique(self.group))  # row groups per shuffle window: about SHUFFLE_PAIRS pairs
        self.window_groups = max(1, min(groups, round(SHUFFLE_PAIRS * groups / len(self))))
        self._groups = OrderedDict()  # (file, group) -> pyarrow table, an LRU of one shuffle window

    def said(self) -> str:
        """The rows left out, in words: ties, labels that are none of 0, 0.5, 1 (where the first is), the filter."""
        parts = [f"{self.dropped['tie']} ties"] if self.dropped["tie"] else []
        if self.dropped["invalid"]:
            valid = "0 or 1" if self.singles else "0, 0.5 or 1"
            parts.append(f"{self.dropped['invalid']} with a label not {valid} (first: {self.first_invalid})")
        if self.dropped["dreamlike"]:
            parts.append(f"{self.dropped['dreamlike']} not both from a dreamlike model (--dreamlike_only)")
        return ", ".join(parts)

    def _index_jsonl(self, path):
        rows, kinds = [], set()
        for n, caption, images, label, single in read_jsonl(path):
            kinds.add(single)
            if len(kinds) > 1:
                raise ValueError(f"{path}:{n}: pairs and single images mixed in one file")
            if label in (0.0, 1.0):
                rows.append((caption, images, label, n))
            elif label == 0.5 and not single:  # a tie: no preference to learn from
                self.dropped["tie"] += 1
            else:
                self.dropped["invalid"] += 1
                self.first_invalid = self.first_invalid or f"{path}:{n}"
        self.singles = kinds == {True}
        self.rows, self.line, group = [], [], []
        self.layouts, groups = {}, {}  # parquet file -> layout; (file, row group) -> shuffle group (from 1)
        for caption, images, label, n in rows:
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
        self.files, fi, gi, ri, win = files, [], [], [], []
        self.group_start = []  # per file: the first row of each row group, for messages
        for k, f in enumerate(files):
            if hub.remote(f):  # footers and small columns by byte ranges: the images wait for the loader
                cli.progress(f"indexing {k + 1}/{len(files)} shards of {hub.commit(f)} (labels only)")
            try:
                pf = parquet_file(f)
            except Exception as e:
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ValueError(f"cannot read parquet file {f}: {why}") from None
            names, col = pf.schema_arrow.names, self.col
            if self.columns:  # another set's names: caption and both images needed, label_0 and models optional
                needed = ["caption", "jpg_0", "jpg_1"] + [c for c in ("label_0",) if c in self.columns]
                needed += ["model_0", "model_1"] if dreamlike_only else []
                missing = [c for c in needed if col(c) not in names]
                if missing:
                    raise ValueError(f"{f}: no column {', '.join(col(c) for c in missing)} (--columns maps "
                                     f"{', '.join(f'{c}={col(c)}' for c in missing)}; the file has "
                                     f"{', '.join(names[:12])})")
            else:
                missing = [c for c in COLUMNS if c not in names]
                if missing:
                    raise ValueError(f"{f}: missing columns {', '.join(missing)} (Pick-a-Pic v2 has "
                                     f"{', '.join(COLUMNS)}; another set's names: --columns)")
            small = [col(c) for c in ("label_0", "model_0", "model_1") if col(c) in names]
            meta = pf.read(columns=small).to_pydict()  # small columns only, no images
            if col("label_0") in meta:
                lab = np.asarray([np.nan if x is None else x for x in meta[col("label_0")]], dtype=np.float64)
            else:  # a chosen / rejected set: the first image is the preferred one
                lab = np.ones(pf.metadata.num_rows, dtype=np.float64)
            keep = (lab == 0.0) | (lab == 1.0)
            invalid = ~keep & (lab != 0.5)
            self.dropped["tie"] += int((lab == 0.5).sum())
            self.dropped["invalid"] += int(invalid.sum())
            if invalid.any() and self.first_invalid is None:
                self.first_invalid = f"{f}, row {int(np.argmax(invalid))}"
            if dreamlike_only:  # as the official code: both generations from a model whose name contains "dream"
                m0, m1 = meta[col("model_0")], meta[col("model_1")]
                both = [("dream" in str(a)) and ("dream" in str(b)) for a, b in zip(m0, m1)]
                self.dropped["dreamlike"] += int((keep & ~np.array(both, dtype=bool)).sum())
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

    def col(self, name: str) -> str:
        """The set's name for one of our columns (--columns; Pick-a-Pic's own by default)."""
        return self.columns.get(name, name)

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
        if self.columns:
            h.update(f"columns {sorted(self.columns.items())}\n".encode())
        for f in files:
            size = hub.size(f) if hub.remote(f) else os.path.getsize(f)
            h.update(f"{os.path.relpath(os.path.abspath(f), root) if root else ''}:{size}\n".encode())
        if self.jsonl:
            with open(self.path, "rb") as fh:
                h.update(fh.read())
        return {"digest": h.hexdigest()[:16], "files": len(files), "pairs": len(self),
                "path": os.path.abspath(self.path)}

    def raw(self, i: int):
        """(caption, images preferred first (bytes for parquet and JSONL references into it, paths for other JSONL
        images), label or None). A caption that is not text (null, a number) is a bad row: ValueError."""
        if self.jsonl:
            caption, images, label = self.rows[i]
            return _text(caption), tuple(self._image(im) for im in images), label
        key = (int(self.file[i]), int(self.rg[i]))
        if key not in self._groups:
            f = parquet_file(self.files[key[0]])
            self._groups[key] = f.read_row_group(key[1], columns=[self.col(c) for c in ("caption", "jpg_0", "jpg_1")])
            while len(self._groups) > self.window_groups + 1:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        t, r = self._groups[key], int(self.row[i])
        imgs = tuple(cell_image(t.column(self.col(c))[r].as_py()) for c in ("jpg_0", "jpg_1"))
        w = int(self.winner[i])
        return _text(t.column(self.col("caption"))[r].as_py()), (imgs[w], imgs[1 - w]), None

    def _image(self, src):
        """A JSONL image: its path, or the bytes a parquet reference points at (a window's row groups kept)."""
        ref = parse_ref(src)
        if ref is None:
            return src
        value = read_cell(*ref, cache=self._cells, layout=self.layouts[ref[0]])
        while len(self._cells) > 2 * (self.window_groups + 1):  # two image columns per row group
            self._cells.popitem(last=False)
        return value


class PairRows:
    """Every pair of a parquet set or a JSONL file in file order, ties included (AI feedback labels them all), as
    dicts {caption, image_0, image_1: what open_image reads (bytes or a path); ref_0, ref_1: where each image lies
    (a path, or a parquet_ref); label_0: the data's own label (0.5 a tie; None if it has none); source: where the
    pair is}. A parquet row group is decoded once. columns: --columns' map of our names to another set's."""

    def __init__(self, path: str, split: str = "train", columns: dict = None):
        self.path, self.jsonl = path, path.endswith(".jsonl")
        self.c = {k: (columns or {}).get(k, k) for k in ("caption", "jpg_0", "jpg_1", "label_0")}  # -> the set's
        if self.jsonl:
            self.n = sum(1 for _ in read_jsonl(path, labelled=False))
            self.read = path
        else:
            self.files, self.read = parquet_files(path, split)
            self.layouts = [parquet_layout(f) for f in self.files]
            for f, (_, names) in zip(self.files, self.layouts):
                missing = [self.c[k] for k in ("caption", "jpg_0", "jpg_1") if self.c[k] not in names]
                if missing:
                    raise ValueError(f"{f}: missing columns {', '.join(missing)} (a pair needs caption, jpg_0, jpg_1"
                                     f"{'; --columns maps them' if self.c != {k: k for k in self.c} else ''})")
            self.n = sum(int(starts[-1]) for starts, _ in self.layouts)
        if self.n == 0:
            raise ValueError(f"{path}: no pairs")

    def __len__(self):
        return self.n

    def __iter__(self):
        return self._jsonl() if self.jsonl else self._parquet()

    def _jsonl(self):
        cells = OrderedDict()
        for n, caption, refs, label, single in read_jsonl(self.path, labelled=False):
            if single:
                raise ValueError(f"{self.path}:{n}: one labelled image, not a pair (AI feedback labels pairs)")
            try:
                images = [ref if parse_ref(ref) is None else read_cell(*parse_ref(ref), cache=cells) for ref in refs]
            except ValueError as e:
                raise ValueError(f"{self.path}:{n}: not a pair with readable references ({e})") from None
            while len(cells) > 4:  # a row group's two image columns, and the next one's
                cells.popitem(last=False)
            yield dict(caption=caption, image_0=images[0], image_1=images[1], ref_0=refs[0],
                       ref_1=refs[1], label_0=label, source=f"{self.path}:{n}")

    def _parquet(self):
        c = self.c
        for f, (starts, names) in zip(self.files, self.layouts):
            pf = parquet_file(f)
            cols = [c["caption"], c["jpg_0"], c["jpg_1"]] + ([c["label_0"]] if c["label_0"] in names else [])
            for g in range(len(starts) - 1):
                t = pf.read_row_group(g, columns=cols).to_pydict()
                labels = t.get(c["label_0"], [None] * len(t[c["caption"]]))
                for r in range(len(t[c["caption"]])):
                    row = int(starts[g]) + r
                    yield dict(caption=t[c["caption"]][r], image_0=cell_image(t[c["jpg_0"]][r]),
                               image_1=cell_image(t[c["jpg_1"]][r]), ref_0=parquet_ref(f, row, c["jpg_0"]),
                               ref_1=parquet_ref(f, row, c["jpg_1"]),
                               label_0=None if labels[r] is None else float(labels[r]), source=f"{f}, row {row}")


def _text(caption) -> str:
    """A row's caption, which must be text: trained as "None" or "123" it would teach the model nonsense."""
    if not isinstance(caption, str):
        raise ValueError(f"its caption is {caption!r}, not text")
    return caption


def read_pairs(path: str, dreamlike_only: bool = False, split: str = "train", columns: dict = None) -> list:
    """All usable pairs as dicts {caption, image_0 (preferred), image_1 (bytes or path), label_0, source (where it
    is)}; for evaluation-sized sets. columns: as Preferences'."""
    p = Preferences(path, dreamlike_only, split, columns)
    if p.singles:
        raise ValueError(f"{path} holds single labelled images, not preference pairs")
    out = []
    for i in range(len(p)):
        try:
            caption, (preferred, other), _ = p.raw(i)
        except ValueError as e:
            raise ValueError(f"{p.where(i)}: {e}") from None
        out.append(dict(caption=caption, image_0=preferred, image_1=other, label_0=1.0, source=p.where(i)))
    return out


# PartiPrompts (Yu et al. 2022, google-research/parti, Apache-2.0): 1,632 prompts in 12 categories, the prompt set
# of the paper's evaluation. Shipped in prompts/parti/ with its license and attribution.
PARTI = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts", "parti", "PartiPrompts.tsv")


def read_prompts(path) -> List[Tuple[str, str]]:
    """(prompt, category) pairs from a text file (one prompt per line, no category), a TSV file whose header names a
    Prompt column and maybe a Category column (PartiPrompts' format), or "parti": the built-in PartiPrompts."""
    path = PARTI if path == "parti" else path
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark, as some editors write, is not text
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompts file {path}: {getattr(e, 'strerror', None) or e}") from None
    head = [h.strip().lower() for h in lines[0].split("\t")] if lines else []
    if len(head) > 1 and "prompt" not in head:  # a table, but which column holds the prompts?
        raise ValueError(f"{path}: a tab-separated file whose first line ({lines[0].strip()!r}) names no Prompt column:"
                         " name it Prompt (as PartiPrompts' TSV does), or give one prompt per line")
    if "prompt" not in head:
        out = [(line.strip(), "") for line in lines if line.strip()]
    else:
        p, c = head.index("prompt"), (head.index("category") if "category" in head else None)
        out = []
        for n, line in enumerate(lines[1:], 2):
            cells = line.split("\t")
            if not line.strip():
                continue
            if len(cells) <= max(p, c or 0):
                raise ValueError(f"{path}:{n}: {len(cells)} tab-separated column(s), the header has {len(head)}")
            if cells[p].strip():
                out.append((cells[p].strip(), "" if c is None else cells[c].strip()))
    if not out:
        raise ValueError(f"{path}: no prompts (a text file with one prompt per line, or a TSV with a Prompt column)")
    return out


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


class Unreadable:
    """The items found unreadable so far, over all ranks, each counted once (one met twice, or by two ranks, counts
    once), against --max_bad_frac: a few bad images are skipped and said, many stop the run."""

    def __init__(self, max_frac: float, what: str):  # what: "pairs of DATA", for the message
        self.max_frac, self.what, self.mine, self.all = max_frac, what, set(), set()

    def add(self, indices):
        self.mine.update(indices)

    def check(self, seen: int) -> int:
        """Every rank's items so far (a collective: every rank calls it); raises past the limit. seen: items read."""
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.mine)
        self.all = set().union(*parts)
        if len(self.all) > self.max_frac * max(seen, 100):
            raise ValueError(f"{len(self.all)} of {seen} {self.what} were unreadable (more than --max_bad_frac "
                             f"{self.max_frac})")
        return len(self.all)


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
