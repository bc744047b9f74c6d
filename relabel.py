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
from collections import Counter

import torch

import cli
import data
import hub
import images
import reward
import weights
from weights import CheckpointError


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


def relabel_file(args):
    """AI feedback for a pair set, written as a JSONL that dpo.py trains on. Images are referenced, not
    copied: paths relative to the JSONL, or parquet_ref strings pointing into the Pick-a-Pic shards. The JSONL is
    written to a temporary name and renamed at the end: a failure or Ctrl-C leaves no partial file."""
    rows = data.PairRows(args.pairs, args.split or "train", data.column_map(args.columns))
    (kind, scorer), = reward.load_all(args.score, args.device, cli.DTYPES[args.dtype]).items()
    root = os.path.dirname(os.path.abspath(args.out))
    labels, agree, skipped, count = Counter(), [], [], Counter()

    def write(tmp):
        with open(tmp, "w") as f:
            checked = lambda x, prompts: reward.finite(kind, scorer(x, prompts), "on the pairs")  # noqa: E731
            for p in relabel(rows, checked, args.ties, args.score_batch, skipped):
                ref = [x if hub.remote(x) else os.path.relpath(x, root) for x in (p["ref_0"], p["ref_1"])]
                line = dict(caption=p["caption"], image_0=ref[0], image_1=ref[1], label_0=p["label_0"],
                            score_0=p["score_0"], score_1=p["score_1"], scorer=kind, label_0_before=p["label_0_before"])
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
    p = cli.Parser(description="AI feedback: label the pairs of PAIRS with a reward model (a JSONL dpo.py trains on).")
    add = p.add_argument
    add("pairs", metavar="PAIRS", help="the pairs to label: Pick-a-Pic parquet (file, folder or glob) or JSONL")
    add("--score", action="append", default=[], metavar="KIND[=PATH][,OPTION=VALUE...]",
        help="the one reward model that labels (reward.py's kinds: pickscore=DIR, hps=FILE.pt, area, ...)")
    add("--out", required=True, help="the JSONL file to write (never one it reads; an existing one with --overwrite)")
    add("--overwrite", action="store_true", help="replace an existing --out")
    add("--ties", choices=["drop", "official"], default="drop", help="a tie is label 0.5, which dpo.py drops; "
        "official: image_0 wins it, and pairs labelled a tie are skipped")
    add("--score_batch", type=int, default=16, help="pairs per reward-model call (2N images)")
    add("--split", help="which split of a Pick-a-Pic folder [train] (a JSONL file has none)")
    add("--columns", help="another parquet set's column names, OURS=THEIRS, as dpo.py --columns")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--dtype", choices=list(cli.DTYPES), default="fp32")
    args = p.parse_args(argv)
    if args.score_batch < 1:
        p.error("--score_batch must be >= 1")
    args.score = reward.parse_flags(p, args.score)
    if len(args.score) != 1:
        p.error(f"relabel needs one --score KIND[=PATH] (the model that labels), got {len(args.score)}")
    if not args.out.endswith(".jsonl"):
        p.error(f"relabel writes a JSONL file: give --out FILE.jsonl, got {args.out}")
    data.check_flags(p, args.pairs, args.split, args.columns)
    return args


def run(args):
    hub.resolve(args, dict(pairs=dict(repo_type="dataset")))
    cli.check_output(args.out, reads=[args.pairs], replace=args.overwrite, make_folder=True)  # before scoring
    cli.hold(args.out, folder=False)  # one command writes --out at a time
    relabel_file(args)


def main(argv=None):
    cli.guard(run, parse_args(argv), (CheckpointError, ValueError, OSError))


if __name__ == "__main__":
    main()
