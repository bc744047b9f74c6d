"""The paper's evaluation with the from-scratch models: base-vs-tuned comparisons scored by reward models
(PartiPrompts, per category, win rates with 95% intervals) and the implicit-reward preference accuracy (Sec. 5.5).

    python evaluate.py --model PATH --unet runs/dpo --compare --prompts parti --score pickscore=DIR --out eval/
    python evaluate.py --model PATH --unet runs/dpo --eval_pairs pairs.jsonl [--eval_baseline runs/sft] --out eval/

--compare makes every prompt's base and tuned image from the same initial noise (sample.py's pipeline), keeps them
in out/base and out/tuned (a rerun with the same settings makes only the missing ones), scores the PNG files with
each --score (reward.py) and writes scores.json, scores.csv and scores.png. --eval_pairs asks how often eq. 14's
implicit reward, computed by the function training uses (objectives.preference_logits), ranks a pair as its label
does.
"""
import csv
import os
from typing import Dict, Tuple

import torch
from PIL import Image, ImageDraw

import cli
import data
import diffusion
import families
import images
import objectives
import reward
import sample
from images import grid, save_png, to_pil
from reward import wilson, win_rate
from sample import image_size, initial_noise, load, load_unet, prompt_items, sampling_options
from weights import CheckpointError, atomic, read_json, save_json

# ----------------------------------------------------------------------------------------------------
# The paper's evaluation: base and tuned images from the same noise, scored by reward models


def _readable(path) -> bool:
    """Whether a PNG file is there whole (a run killed while writing one, or a copy cut short, is not)."""
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # missing, truncated, not an image
        return False


def _stamp(path):
    """A path and the time its newest file changed (a UNet retrained in place is not taken for the old one)."""
    if not path:
        return None
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    return [os.path.abspath(path), max((os.path.getmtime(f) for f in files), default=0.0)]


def compare(args, items, dtype, scorers):
    """--compare: every item's base and tuned image from the same initial noise, kept in --out/base and --out/tuned
    (a rerun with the same settings makes only the missing ones, and again any that no longer reads), a grid, and
    with --score the evaluation."""
    settings = dict(model=_stamp(args.model), unet=_stamp(args.unet), lora=_stamp(args.lora),
                    tokenizer=args.tokenizer, negative=args.negative, steps=args.steps, guidance=args.guidance,
                    scheduler=args.scheduler, height=args.height, width=args.width, dtype=args.dtype,
                    init_image=_stamp(args.init_image), strength=args.strength if args.init_image else None)
    index_path = os.path.join(args.out, "images.json")  # settings, and name -> prompt of every pair made so far
    index = read_json(index_path, {"settings": settings, "images": {}})
    changed = [k for k in settings if index["settings"].get(k) != settings[k]]
    made = index["images"]
    other = [it for it in items if made.get(it["name"], it["prompt"]) != it["prompt"]]
    if changed or other:
        said = [f"--{k} {index['settings'].get(k)} (now {settings[k]})" if k in ("steps", "guidance", "scheduler",
                "height", "width", "dtype", "negative", "strength") else f"--{k} (another path or newer files)"
                for k in changed]
        if other:
            said.append(f"--prompts ({other[0]['name']} was made for {made[other[0]['name']]!r}, now "
                        f"{other[0]['prompt']!r})")
        raise ValueError(f"{args.out} holds images made with other settings: {', '.join(said)}; give another --out, "
                         f"or delete {index_path} to make them all again")
    for sub in ("base", "tuned"):  # (left empty by a run that fails or is stopped before its first image: removed)
        cli.make_folders(os.path.join(args.out, sub))

    def path(sub, it):
        return os.path.join(args.out, sub, it["name"] + ".png")
    todo = [it for it in items if it["name"] not in made or not all(_readable(path(s, it)) for s in ("base", "tuned"))]
    broken = sum(it["name"] in made for it in todo)  # made before, but a file is missing or cut short now
    print(f"images: {len(items) - len(todo)} of {len(items)} pairs reused, {len(todo)} to make "
          f"({args.out}/base, {args.out}/tuned" + (f"; {broken} made again: a file missing or unreadable)" if broken
                                                   else ")"), flush=True)
    if todo:
        pipe = load(args.model, device=args.device, dtype=dtype, tokenizer=args.tokenizer)
        pipe.progress = False
        base, tuned = pipe.unet, load_unet(args.model, args.unet, args.lora, args.device, dtype)
        kw, (h, w) = sampling_options(args, pipe), image_size(pipe, args)
        done = 0
        try:
            for s in range(0, len(todo), args.batch_size):
                batch = todo[s:s + args.batch_size]
                latents = initial_noise(pipe, batch, h, w)  # the same noise through both UNets
                for sub, u in (("base", base), ("tuned", tuned)):
                    pipe.unet = u
                    for it, x in zip(batch, pipe([it["prompt"] for it in batch], latents=latents, **kw)):
                        save_png(to_pil(x), path(sub, it))
                made.update({it["name"]: it["prompt"] for it in batch})
                save_json(index, index_path)
                done += len(batch)
                cli.progress(f"compare: {done}/{len(todo)} pairs made")
        except KeyboardInterrupt:
            raise cli.Interrupted(f"interrupted: {done} of {len(todo)} pairs made, kept in {args.out} (a rerun "
                                  "makes the rest)") from None
        cli.end_progress()
        del pipe, base, tuned
    if scorers:
        report(args, items, score_pairs(items, scorers, path, args.score_batch))
    rows = {}  # the grid: the first 16 prompts, base | tuned for each of their first 4 images
    for it in items:
        if it["copy"] < 4 and (it["index"] in rows or len(rows) < 16):
            rows.setdefault(it["index"], []).extend(images.load_image(path(sub, it))[0] for sub in ("base", "tuned"))
    out = os.path.join(args.out, f"compare_seed{args.seed}.png")
    save_png(grid(list(rows.values())), out)
    print(out)


def score_pairs(items, scorers, path, batch_size=16) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """kind -> (base scores (n,), tuned scores (n,)) of the PNG files (what a user sees), batch_size pairs a call."""
    out = {}
    for kind, scorer in scorers.items():
        base, tuned = [], []
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            pixels = torch.cat([images.load_image(path(sub, it)) for sub in ("base", "tuned") for it in chunk])
            with torch.no_grad():  # pixels (2B, 3, H, W)
                scores = reward.finite(kind, scorer(pixels, [it["prompt"] for it in chunk] * 2).float().cpu(),
                                       f"on the pairs {chunk[0]['name']} to {chunk[-1]['name']}")
            base.append(scores[:len(chunk)])
            tuned.append(scores[len(chunk):])
            cli.progress(f"scoring {kind}: {s + len(chunk)}/{len(items)} pairs")
        cli.end_progress()
        out[kind] = torch.cat(base), torch.cat(tuned)
    return out


def report(args, items, scores):
    """Print the table and write scores.json (per scorer: means, win rate, ci95, n; per category too), scores.csv
    (one row per image pair) and scores.png (the win rates as bars)."""
    categories = list(dict.fromkeys(it["category"] for it in items if it["category"]))
    res = {}
    for kind, (b, t) in scores.items():
        res[kind] = win_rate(b, t)
        if categories:
            mask = {c: torch.tensor([it["category"] == c for it in items]) for c in categories}
            res[kind]["categories"] = {c: win_rate(b[m], t[m]) for c, m in mask.items()}
    save_json(res, os.path.join(args.out, "scores.json"))

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "copy", "seed", "category", "prompt", "base_image", "tuned_image"]
                       + [f"{k}_{side}" for k in scores for side in ("base", "tuned")])
            for i, it in enumerate(items):
                w.writerow([it["index"], it["copy"], it["seed"], it["category"], it["prompt"],
                            f"base/{it['name']}.png", f"tuned/{it['name']}.png"]
                           + [f"{scores[k][side][i]:.6g}" for k in scores for side in (0, 1)])
    atomic(os.path.join(args.out, "scores.csv"), write_csv)
    save_png(chart(res), os.path.join(args.out, "scores.png"))
    print(f"{'scorer':<10} {'category':<22} {'n':>5} {'base':>9} {'tuned':>9} {'win_rate':>8}  ci95")
    for kind, r in res.items():
        for c, x in [("all", r)] + list(r.get("categories", {}).items()):
            print(f"{kind:<10} {c:<22} {x['n']:>5} {x['base']:>9.4f} {x['tuned']:>9.4f} {x['win_rate']:>8.3f}  "
                  f"[{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}]")
    print(f"scores: {args.out}/scores.json, scores.csv, scores.png (win rate of tuned over base; ties count 0.5)")


def chart(res) -> Image.Image:
    """A bar chart of res (report's dict): per category ("all" first), one bar per scorer, the win rate of tuned
    over base with its 95% interval as a whisker; a grey line at 0.5, no change."""
    kinds = list(res)
    cats = ["all"] + list(res[kinds[0]].get("categories", {}))
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    bar, gap, left, width = 12, 8, 150, 400
    top = 24 + 14 * len(kinds)  # title and legend
    height = top + len(cats) * (len(kinds) * bar + gap) + 24
    img = Image.new("RGB", (left + width + 20, height), "white")
    d = ImageDraw.Draw(img)

    def x(v):
        return left + round(v * width)
    d.text((4, 4), "win rate of tuned over base, 95% interval (0.5 = no change)", fill="black")
    for k, kind in enumerate(kinds):
        d.rectangle([4, 22 + 14 * k, 14, 31 + 14 * k], fill=colours[k % len(colours)])
        d.text((20, 21 + 14 * k), kind, fill="black")
    for ci, cat in enumerate(cats):
        y0 = top + ci * (len(kinds) * bar + gap)
        d.text((4, y0), cat[:24], fill="black")
        for k, kind in enumerate(kinds):
            r = res[kind] if cat == "all" else res[kind]["categories"][cat]
            y = y0 + k * bar
            d.rectangle([x(0), y + 1, x(r["win_rate"]), y + bar - 2], fill=colours[k % len(colours)])
            d.line([x(r["ci95"][0]), y + bar // 2, x(r["ci95"][1]), y + bar // 2], fill="black")
    bottom = height - 22
    d.line([x(0), top - 4, x(0), bottom], fill="black")
    d.line([x(0.5), top - 4, x(0.5), bottom], fill=(150, 150, 150))
    for v in (0, 0.25, 0.5, 0.75, 1):
        d.text((x(v) - 8, bottom + 4), f"{v:g}", fill="black")
    return img


# ----------------------------------------------------------------------------------------------------
# Preference accuracy of the implicit reward


@torch.no_grad()
def implicit_accuracy(pipe: sample.Pipeline, ref, pairs, k=4, seed=0, size=None, batch_size=4):
    """How often the DPO implicit reward ranks a pair like the human label (paper Sec. 5.5, Tab. 2).

    The implicit reward of an image, r(x) = beta*T*E_{t,eps}[|eps - eps_ref(x_t)|^2 - |eps - eps_theta(x_t)|^2]
    up to constants, is what eq. 14 compares between winner and loser (objectives.preference_logits at beta = 2,
    as training computes it). It is estimated with k draws of (t, eps), each shared by both images of a pair and by both
    models, as in training; the same seed gives the same draws to every UNet evaluated. A zero difference is a
    tie and counts 0.5 (pipe.unet = ref gives exactly 0.5). Returns (accuracy of pipe.unet against ref, per-pair
    reward differences r(image_0) - r(image_1) / (beta*T)).
    """
    size = size or pipe.size
    g = torch.Generator().manual_seed(seed)
    prediction_type = "flow" if pipe.flow else pipe.sched_cfg["prediction_type"]
    ac = None if pipe.flow else diffusion.alphas_cumprod(pipe.sched_cfg)
    diffs = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        B = len(chunk)
        xs, ids = [], []  # all image_0, then all image_1
        for j in (0, 1):
            for p in chunk:  # centre crop at `size` and SDXL size conditioning exactly as dpo.py trains
                try:
                    x, i = images.transform(images.open_image(p[f"image_{j}"]), size, None, False, False)
                except Exception as e:  # one line that says which pair
                    raise ValueError(f"{p.get('source', 'a pair')}: cannot read an image of the pair: {e}") from None
                xs.append(x)
                ids.append(i)
        z = pipe.encode_images((torch.stack(xs) + 1) / 2).cpu()  # (2B, C, h, w)
        ctx, pooled = pipe.te.encode([p["caption"] for p in chunk] * 2)
        time_ids = torch.stack(ids).to(pipe.device, ctx.dtype)  # (2B, 6)
        guided = pipe.family.sampling.guidance_input and pipe.unet.config["guidance_embeds"]  # FLUX-dev
        embed = pipe.family.recipe.guidance if guided else None  # the guidance input it is trained with
        cond = pipe.family.conditioning(ctx, pooled, time_ids, embed)
        d = torch.zeros(B)
        for _ in range(k):
            if pipe.flow:  # sigma as training draws it (logit-normal, the schedule's shift)
                t = diffusion.training_sigmas(diffusion.density("logit_normal", B, g), pipe.sched_cfg).repeat(2)
            else:
                t = torch.randint(0, len(ac), (B,), generator=g).repeat(2)  # (2B,) same t for both images of a pair
            eps = torch.randn((B, *z.shape[1:]), generator=g).repeat(2, 1, 1, 1)  # same noise, too
            xt, t_in, target = diffusion.noised(z, eps, t, prediction_type, ac)
            m = objectives.mse(diffusion.predict(pipe.unet, xt, t_in, cond, pipe.dtype).cpu(), target)  # (2B,)
            r = objectives.mse(diffusion.predict(ref, xt, t_in, cond, pipe.dtype).cpu(), target)  # (2B,)
            d += objectives.preference_logits(m[:B], m[B:], r[:B], r[B:], beta=2.0) / k  # (B,) eq. 14's margin
        diffs += d.tolist()
        if pipe.progress:
            cli.progress(f"eval: {s + B}/{len(pairs)} pairs")
    cli.end_progress()
    right = [0.5 if x == 0 else float((x > 0) == (p["label_0"] > 0.5)) for x, p in zip(diffs, pairs)]  # ties: 0.5
    return sum(right) / len(pairs), diffs


def eval_pairs(args, dtype):
    """--eval_pairs: the implicit-reward accuracy of --unet against --eval_ref (and of --eval_baseline with the same
    draws), printed and written to out/eval.json."""
    pairs = data.read_pairs(args.eval_pairs, split=args.split or "test_unique", columns=data.column_map(args.columns))
    if not pairs:
        raise ValueError(f"{args.eval_pairs}: no preference pairs (after dropping ties)")
    pipe = load(args.model, unet=args.unet, device=args.device, dtype=dtype, tokenizer=args.tokenizer, lora=args.lora)
    ref = pipe.family.load(args.eval_ref or args.model, device=args.device, dtype=dtype)
    kw, n = dict(k=args.eval_k, seed=args.seed, size=args.height, batch_size=args.batch_size), len(pairs)
    acc = implicit_accuracy(pipe, ref, pairs, **kw)[0]
    res = {"pairs": n, "k": args.eval_k, "accuracy": acc, "ci95": wilson(acc * n, n)}
    print(f"eval pairs={n} k={args.eval_k} accuracy={acc:.4f} ci95=[{res['ci95'][0]:.4f}, {res['ci95'][1]:.4f}] "
          "(implicit reward of --unet against the reference; chance is 0.5)")
    if args.eval_baseline:  # another UNet, the same reference and draws: a paired comparison
        pipe.unet = pipe.family.load(args.eval_baseline, device=args.device, dtype=dtype)
        base = implicit_accuracy(pipe, ref, pairs, **kw)[0]
        res.update(baseline_accuracy=base, baseline_ci95=wilson(base * n, n))
        lo, hi = res["baseline_ci95"]
        print(f"eval baseline accuracy={base:.4f} ci95=[{lo:.4f}, {hi:.4f}] (--eval_baseline, the same draws)")
    save_json(res, os.path.join(args.out, "eval.json"))


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = cli.Parser(description="Evaluate a fine-tuned model against its base: --compare (images from the same "
                   "noise, scored by reward models) or --eval_pairs (implicit-reward preference accuracy).")
    sample.add_flags(p, "evaluate")
    add = p.add_argument
    add("--compare", action="store_true", help="base and --unet/--lora images from the same noise, in out/base and "
        "out/tuned (a rerun reuses them), and a grid: rows = prompts, columns = base, tuned")
    add("--score", action="append", default=[], metavar="KIND[=PATH][,OPTION=VALUE...]",
        help="a reward model (repeatable): pickscore=DIR, clip=DIR, hps=FILE.pt,tokenizer=DIR, aesthetic=DIR,"
        "head=FILE.pth, or area (the demo's rule); win rates in out/scores.json, .csv, .png")
    add("--score_batch", type=int, default=16, help="pairs per reward-model call (2N images)")
    add("--eval_pairs", help="preference pairs (parquet or JSONL): report implicit-reward accuracy")
    add("--eval_k", type=int, default=4, help="(t, eps) draws per pair")
    add("--split", help="which split of a Pick-a-Pic folder (default test_unique)")
    add("--columns", help="--eval_pairs: another parquet set's column names, OURS=THEIRS (as dpo.py --columns)")
    add("--eval_ref", help="reference UNet for --eval_pairs (default: --model's UNet)")
    add("--eval_baseline", help="--eval_pairs: also score this UNet (e.g. an SFT run) with the same draws")
    args = p.parse_args(argv)
    sample.check_flags(p, args)
    if min(args.eval_k, args.score_batch) < 1:
        p.error("--eval_k and --score_batch must be >= 1")
    args.score = reward.parse_flags(p, args.score)
    if args.score and not args.compare:
        p.error("--score goes with --compare")
    if (args.eval_ref or args.eval_baseline) and not args.eval_pairs:
        p.error("--eval_ref and --eval_baseline go with --eval_pairs")
    if args.columns and not (args.eval_pairs and not args.eval_pairs.endswith(".jsonl")):
        p.error("--columns maps the column names of --eval_pairs' parquet set: give a parquet --eval_pairs")
    data.check_flags(p, args.eval_pairs, args.split, args.columns)
    if args.compare == bool(args.eval_pairs):
        p.error("give --compare (with --prompt or --prompts) or --eval_pairs DATA, one of them")
    if args.compare and not (args.unet or args.lora):
        p.error("--compare needs --unet or --lora (the tuned model to compare with the base)")
    if args.compare and not (args.prompt or args.prompts):
        p.error("--compare needs --prompt or --prompts FILE")
    return args


def run(args):
    denoiser = dict(only=families.SUBFOLDERS)
    sample.fetch(args, dict(eval_ref=denoiser, eval_baseline=denoiser, eval_pairs=dict(repo_type="dataset")))
    dtype = cli.DTYPES[args.dtype]
    if args.init_image and not os.path.isfile(args.init_image):
        raise ValueError(f"init image not found: {args.init_image}")
    reads = [args.prompts, args.init_image, args.eval_pairs]
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file, not a folder")
    if args.compare:  # a folder of an earlier --compare is reused (its images); another non-empty one is refused
        mine = os.path.isfile(os.path.join(args.out, "images.json"))
        if os.path.isdir(args.out) and os.listdir(args.out) and not mine and not args.overwrite:
            raise ValueError(f"--out {args.out} holds files evaluate.py did not make: give a new --out, or "
                             "--overwrite to write into it")
        for name in ("images.json", "scores.json", "scores.csv", "scores.png", f"compare_seed{args.seed}.png"):
            cli.check_output(os.path.join(args.out, name), reads, replace=True, make_folder=True)
        cli.hold(args.out)  # one command writes into --out at a time
        compare(args, prompt_items(args), dtype, reward.load_all(args.score, args.device, dtype))
    else:
        cli.check_output(os.path.join(args.out, "eval.json"), reads, replace=args.overwrite, make_folder=True)
        cli.hold(args.out)
        eval_pairs(args, dtype)


def main(argv=None):
    cli.guard(run, parse_args(argv), (CheckpointError, ValueError, OSError))


if __name__ == "__main__":
    main()
