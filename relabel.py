"""AI feedback (paper Sec. 5.4): a reward model labels a set of preference pairs, written as a JSONL dpo.py trains on.

    python relabel.py pickapic_v2/ --score pickscore=DIR --out aif/pairs.jsonl
    python relabel.py demo_out/data/dpo.jsonl --score area --out demo_out/aif/pairs.jsonl

Every pair of the input (Pick-a-Pic parquet shards or a JSONL of pairs, ties included) is scored by one --score
(reward.py: images (B, 3, H, W) in [0, 1] and their prompts -> (B,) scores, higher is better) and labelled by the
sign of the difference. Images are referenced, not copied: paths relative to the JSONL, or data.parquet_ref strings
pointing into the parquet shards.
"""
import json
import os
from collections import Counter, OrderedDict

import torch

import cli
import data
import images
import reward
import weights
from images import cell_image, parquet_layout, parquet_ref, parse_ref, pyarrow_parquet, read_cell
from weights import CheckpointError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def relabel(pairs, scorer, ties="drop", batch_size=1, skipped=None):
    """Yields a copy of each pair {caption, image_0, image_1, label_0, ...} labelled by the scorer: label_0 1.0 if
    image_0 scores higher, 0.0 if lower, with score_0, score_1 beside it and the former label as label_0_before.

    A tie is 0.5 with ties="drop" (dpo.py drops ties); with ties="official" it is 1.0, as in the official code, which
    swaps a pair only when score_1 > score_0 (a tie keeps image_0 as the winner) and had already dropped the pairs
    whose own label is a tie (label_0 0.5: skipped here too). batch_size pairs are scored together; images of one
    size share a scorer call, so every image is scored at its own size, as it would be alone. A pair whose image
    cannot be read, or whose caption is not text, is skipped, as training skips it: (where, why) goes to skipped."""
    if ties not in ("drop", "official"):
        raise ValueError(f"ties must be 'drop' or 'official', got {ties!r}")
    skipped = [] if skipped is None else skipped
    batch = []
    for p in pairs:
        if ties == "official" and p.get("label_0") == 0.5:
            continue
        try:
            if not isinstance(p["caption"], str):
                raise ValueError(f"its caption is {p['caption']!r}, not text")
            batch.append((p, [images.load_image(p[f"image_{k}"]) for k in (0, 1)]))  # (1, 3, H, W) each
        except ValueError as e:
            skipped.append((p.get("source", "a pair"), str(e)))
            continue
        if len(batch) == batch_size:
            yield from _label(batch, scorer, ties)
            batch = []
    if batch:
        yield from _label(batch, scorer, ties)


def _label(batch, scorer, ties) -> list:
    """relabel's work on one batch of B (pair, its two images) items."""
    pixels = [im[k] for k in (0, 1) for _, im in batch]  # 2B tensors (1, 3, H, W): all image_0, then all image_1
    prompts = [p["caption"] for p, _ in batch] * 2
    by_size = {}  # (H, W) -> positions of the images of that size
    for i, x in enumerate(pixels):
        by_size.setdefault(tuple(x.shape[-2:]), []).append(i)
    scores = torch.zeros(len(pixels))
    with torch.no_grad():
        for idx in by_size.values():
            scores[idx] = scorer(torch.cat([pixels[i] for i in idx]), [prompts[i] for i in idx]).float().cpu()
    out, B = [], len(batch)
    for (p, _), s0, s1 in zip(batch, scores[:B].tolist(), scores[B:].tolist()):
        label = 1.0 if s0 > s1 else 0.0 if s0 < s1 else 0.5 if ties == "drop" else 1.0
        out.append({**p, "label_0": label, "score_0": s0, "score_1": s1, "label_0_before": p.get("label_0")})
    return out


# ----------------------------------------------------------------------------------------------------
# The pairs to label


class PairRows:
    """Every pair of a parquet set or a JSONL file in file order, ties included (AI feedback labels them all), as
    dicts {caption, image_0, image_1: what open_image reads (bytes or a path); ref_0, ref_1: where each image lies
    (a path, or a parquet_ref); label_0: the data's own label (0.5 a tie; None if it has none); source: where the
    pair is}. A parquet row group is decoded once. columns: --columns' map of our names to another set's."""

    def __init__(self, path: str, split: str = "train", columns: dict = None):
        self.path, self.jsonl = path, path.endswith(".jsonl")
        self.c = {k: (columns or {}).get(k, k) for k in ("caption", "jpg_0", "jpg_1", "label_0")}  # -> the set's
        if self.jsonl:
            self.n = sum(1 for _ in data.read_jsonl(path, labelled=False))
            self.read = path
        else:
            self.files, self.read = data.parquet_files(path, split)
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
        for n, caption, refs, label, single in data.read_jsonl(self.path, labelled=False):
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
            pf = pyarrow_parquet().ParquetFile(f)
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


def relabel_file(args):
    """AI feedback for a pair set, written as a JSONL that dpo.py trains on. Images are referenced, not
    copied: paths relative to the JSONL, or parquet_ref strings pointing into the Pick-a-Pic shards. The JSONL is
    written to a temporary name and renamed at the end: a failure or Ctrl-C leaves no partial file."""
    columns = cli.parse_map(args.columns, "--columns", data.COLUMN_MAP) if args.columns else None
    rows = PairRows(args.pairs, args.split or "train", columns)
    (kind, scorer), = reward.load_all(args.score, args.device, DTYPES[args.dtype]).items()
    root = os.path.dirname(os.path.abspath(args.out))
    labels, agree, skipped, count = Counter(), [], [], Counter()

    def write(tmp):
        with open(tmp, "w") as f:
            for p in relabel(rows, scorer, args.ties, args.score_batch, skipped):
                line = dict(caption=p["caption"], image_0=os.path.relpath(p["ref_0"], root),
                            image_1=os.path.relpath(p["ref_1"], root), label_0=p["label_0"], score_0=p["score_0"],
                            score_1=p["score_1"], scorer=kind, label_0_before=p["label_0_before"])
                f.write(json.dumps(line) + "\n")
                count["pairs"] += 1
                labels[p["label_0"]] += 1
                count["tied"] += p["score_0"] == p["score_1"]
                if p["label_0"] != 0.5 and p["label_0_before"] in (0.0, 1.0):
                    agree.append(p["label_0"] == p["label_0_before"])
                if count["pairs"] % args.score_batch == 0:
                    cli.progress(f"relabel: {count['pairs'] + len(skipped)}/{len(rows)} pairs")
        cli.end_progress()
        if not count["pairs"]:
            first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
            raise ValueError(f"{args.pairs}: no pair could be labelled{first}")
    weights.atomic(args.out, write)
    k, tied = count["pairs"], count["tied"]
    if args.ties == "drop":
        ties = f"ties={tied} (label 0.5: dpo.py drops them)"
    else:
        official = len(rows) - k - len(skipped)
        ties = f"ties={tied} (image_0 wins, as the official code; skipped {official} pairs labelled a tie)"
    before = f" agreement_with_former_labels={sum(agree) / len(agree):.3f}" if agree else ""
    bad = f" unreadable={len(skipped)} (skipped; first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
    print(f"relabel pairs={k} image_0_preferred={labels[1.0]} image_1_preferred={labels[0.0]} {ties}{before}{bad} "
          f"-> {args.out}")


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = cli.Parser(description="AI feedback: label the pairs of PAIRS with one reward model and write a JSONL that "
                   "dpo.py trains on (images referenced, not copied).")
    add = p.add_argument
    add("pairs", metavar="PAIRS", help="the pairs to label: Pick-a-Pic parquet (file, folder or glob) or JSONL")
    add("--score", action="append", default=[], metavar="KIND[=PATH][,OPTION=VALUE...]",
        help="the one reward model that labels: pickscore=DIR, clip=DIR, hps=FILE.pt,tokenizer=DIR, aesthetic=DIR,"
        "head=FILE.pth, or area (the demo's rule)")
    add("--out", required=True, help="the JSONL file to write (never one it reads; an existing one only with "
        "--overwrite)")
    add("--overwrite", action="store_true", help="replace an existing --out")
    add("--ties", choices=["drop", "official"], default="drop", help="a score tie is label 0.5, which dpo.py drops; "
        "official: image_0 wins a tie and pairs labelled a tie are skipped")
    add("--score_batch", type=int, default=16, help="pairs per reward-model call (2N images)")
    add("--split", help="which split of a Pick-a-Pic folder [train] (a JSONL file has none)")
    add("--columns", help="another parquet set's column names, OURS=THEIRS (as dpo.py --columns), e.g. "
        "caption=prompt,jpg_0=chosen,jpg_1=rejected")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--dtype", choices=list(DTYPES), default="fp32")
    args = p.parse_args(argv)
    if args.score_batch < 1:
        p.error("--score_batch must be >= 1")
    try:
        args.score = [reward.parse_spec(s) for s in args.score]
    except ValueError as e:
        p.error(str(e))
    if len(args.score) != 1:
        p.error(f"relabel needs one --score KIND[=PATH] (the model that labels), got {len(args.score)}")
    if not args.out.endswith(".jsonl"):
        p.error(f"relabel writes a JSONL file: give --out FILE.jsonl, got {args.out}")
    if args.split and args.pairs.endswith(".jsonl"):
        p.error(f"--split picks the shards of a Pick-a-Pic folder; {args.pairs} is a JSONL file: drop --split")
    if args.columns and args.pairs.endswith(".jsonl"):
        p.error(f"--columns maps a parquet set's column names; {args.pairs} is a JSONL file: drop --columns")
    try:
        cli.parse_map(args.columns or "", "--columns", data.COLUMN_MAP)
    except ValueError as e:
        p.error(str(e))
    return args


def run(args):
    cli.check_output(args.out, reads=[args.pairs], replace=args.overwrite, make_folder=True)  # before scoring
    relabel_file(args)


def main(argv=None):
    cli.guard(run, parse_args(argv), (CheckpointError, ValueError, OSError))


if __name__ == "__main__":
    main()
