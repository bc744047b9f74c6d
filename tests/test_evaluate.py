"""evaluate.py on tiny models: --compare (base and tuned images from the same noise, scores.json / scores.csv /
scores.png, ties counting 0.5, per-category results, a rerun reusing the images, the grid) and --eval_pairs (the
implicit-reward accuracy: exactly chance for the reference against itself, its sign convention, parquet = JSONL,
above chance after DPO training); win rates and Wilson intervals against values computed by hand; bad input as
one line."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import diffusion
import evaluate
import images
import reward
import sample
import unet as unetlib
from tiny import ROOT, read_png, transformers_pickscore
from tiny import cli_error as tool_error


def cli_error(argv, capsys):
    """evaluate.main's one error line (and a non-zero exit)."""
    return tool_error(evaluate.main, argv, capsys)


@pytest.fixture(scope="module")
def pipe15(sd15_dir):
    """Our pipeline of the tiny SD1.5 (no progress lines)."""
    pipe = sample.load(sd15_dir)
    pipe.progress = False
    return pipe


@pytest.fixture(scope="module")
def tuned(sd15_dir, tmp_path_factory):
    """The tiny SD1.5 UNet with perturbed weights, saved as dpo.py leaves it (out_dir/unet/)."""
    u = unetlib.load(sd15_dir)
    with torch.no_grad():
        for p in u.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    out = tmp_path_factory.mktemp("tuned")
    unetlib.save(u, str(out / "unet"))
    return str(out)


def prompts_tsv(path):
    """PartiPrompts' layout: 3 prompts of category A, 2 of B (and a Challenge column we do not use)."""
    rows = [("a red circle", "A"), ("a blue square", "B"), ("a photo of a cat", "A"), ("a green dog", "B"),
            ("a cat", "A")]
    with open(path, "w") as f:
        f.write("Prompt\tCategory\tChallenge\tNote\n")
        f.writelines(f"{p}\t{c}\tBasic\t\n" for p, c in rows)
    return str(path)


# ----------------------------------------------------------------------------------------------------
# Evaluation: --compare --score


def test_compare_scores_both_models_per_category_and_reuses_images(sd15_dir, tuned, clip_dir, tmp_path, capsys,
                                                                   monkeypatch, one_thread):
    folder, model = clip_dir
    out = tmp_path / "eval"
    argv = ["--model", sd15_dir, "--unet", tuned, "--compare", "--prompts", prompts_tsv(tmp_path / "p.tsv"),
            "--per_prompt", "2", "--steps", "2", "--seed", "5", "--batch_size", "3", "--score", "area",
            "--score", f"pickscore={folder}", "--score_batch", "3", "--device", "cpu", "--out", str(out)]
    evaluate.main(argv)
    printed = capsys.readouterr().out
    assert "images: 0 of 10 pairs reused, 10 to make" in printed
    res = json.load(open(out / "scores.json"))
    assert list(res) == ["area", "pickscore"]
    for r in res.values():
        assert r["n"] == 10 and set(r) == {"base", "tuned", "win_rate", "ci95", "n", "categories"}
        assert {c: x["n"] for c, x in r["categories"].items()} == {"A": 6, "B": 4}
        assert r["ci95"][0] <= r["win_rate"] <= r["ci95"][1]
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [(int(r["index"]), int(r["copy"]), int(r["seed"])) for r in rows] == \
        [(i, j, 5 + 2 * i + j) for i in range(5) for j in range(2)]  # image j of prompt i: seed + 2i + j
    base = torch.tensor([float(r["pickscore_base"]) for r in rows])
    tuned_scores = torch.tensor([float(r["pickscore_tuned"]) for r in rows])
    assert res["pickscore"]["win_rate"] == pytest.approx(reward.win_rate(base, tuned_scores)["win_rate"])
    in_a = torch.tensor([r["category"] == "A" for r in rows])
    assert res["pickscore"]["categories"]["A"]["tuned"] == pytest.approx(float(tuned_scores[in_a].mean()), rel=1e-5)
    # the scores are transformers' PickScore of the PNG files
    pixels = torch.stack([read_png(out / r["base_image"]) for r in rows])
    want = transformers_pickscore(model, folder, pixels, [r["prompt"] for r in rows])
    torch.testing.assert_close(base, want, rtol=1e-4, atol=1e-4)
    # same seed, same initial noise: the base image is the base pipeline's with that seed, the tuned one the tuned's
    r = rows[3]  # prompt 1, its second image (made in a batch of 3: within one 8-bit step of making it alone)
    for side, unet in (("base", None), ("tuned", tuned)):
        pipe = sample.load(sd15_dir, unet=unet)
        pipe.progress = False
        x = pipe([r["prompt"]], steps=2, seed=int(r["seed"]), guidance=7.5)
        assert (read_png(out / r[f"{side}_image"]) - png_of(x[0])).abs().max() <= 1 / 255 + 1e-6
    assert (read_png(out / r["base_image"]) - read_png(out / r["tuned_image"])).abs().max() > 0.1
    assert Image.open(out / "scores.png").size[0] > 300 and os.path.isfile(out / "compare_seed5.png")
    # a rerun makes nothing: every image is reused (and scored again, to the same numbers)
    monkeypatch.setattr(sample.Pipeline, "__call__", lambda *a, **k: pytest.fail("generated again"))
    evaluate.main(argv)
    assert "images: 10 of 10 pairs reused, 0 to make" in capsys.readouterr().out
    assert json.load(open(out / "scores.json")) == res
    # a slice names and seeds its images as the whole set did: reused too
    evaluate.main(argv[:-2] + ["--categories", "B", "--per_category", "1", "--out", str(out)])
    assert "images: 2 of 2 pairs reused" in capsys.readouterr().out
    assert json.load(open(out / "scores.json"))["area"]["categories"]["B"]["n"] == 2
    # other settings: refused, never mixed with the old images
    err = cli_error(argv[:-2] + ["--steps", "3", "--out", str(out)], capsys)
    assert f"error: {out} holds images made with other settings: --steps 2 (now 3)" in err


def png_of(x):
    """What a [3,H,W] sample becomes once saved as an 8-bit PNG and read back."""
    return torch.from_numpy(np.asarray(images.to_pil(x), dtype=np.float32) / 255).permute(2, 0, 1)


def test_the_base_against_itself_ties_every_pair(sd15_dir, tmp_path, capsys, one_thread):
    """The base model against itself: every pair ties, the win rate is exactly 0.5."""
    evaluate.main(["--model", sd15_dir, "--unet", sd15_dir, "--compare", "--prompt", "a cat", "--prompt", "a dog",
                   "--per_prompt", "2", "--steps", "2", "--score", "area", "--out", str(tmp_path)])
    res = json.load(open(tmp_path / "scores.json"))["area"]
    assert res["win_rate"] == 0.5 and res["base"] == res["tuned"] and res["n"] == 4 and "categories" not in res
    assert res["ci95"][0] < 0.5 < res["ci95"][1]
    table = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["area", "all", "4"] in [t[:3] for t in table]


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit


def test_bad_input(sd15_dir, tuned, clip_dir, tmp_path, capsys):
    folder, _ = clip_dir
    out = tmp_path / "o"
    cmp = ["--model", sd15_dir, "--unet", tuned, "--compare", "--steps", "2", "--out", str(out)]
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert cli_error(cmp + ["--prompts", str(tmp_path / "empty.txt")], capsys) == f"error: {tmp_path / 'empty.txt'}: " \
        "no prompts (a text file with one prompt per line, or a TSV with a Prompt column)"
    assert "cannot read prompts file" in cli_error(cmp + ["--prompts", str(tmp_path / "none.txt")], capsys)
    (tmp_path / "short.tsv").write_text("Note\tPrompt\tCategory\nx\n")
    assert "short.tsv:2: 1 tab-separated column(s), the header has 3" in cli_error(
        cmp + ["--prompts", str(tmp_path / "short.tsv")], capsys)
    assert "--categories: no prompt of category Plants (the prompts' categories: Abstract" in cli_error(
        cmp + ["--prompts", "parti", "--categories", "Plants", "--score", "area"], capsys)
    # a model folder of the wrong kind, a missing path, a head that does not fit: before any image is made
    cmp += ["--prompt", "a cat"]
    assert f"error: pickscore: {sd15_dir} is not a transformers CLIPModel folder (no config.json)" == cli_error(
        cmp + ["--score", f"pickscore={sd15_dir}"], capsys)
    assert "pickscore: no such file or folder: /no/such" in cli_error(cmp + ["--score", "pickscore=/no/such"], capsys)
    torch.save({"layers.0.weight": torch.zeros(3, 3)}, tmp_path / "head.pth")
    assert "aesthetic head" in cli_error(cmp + ["--score", f"aesthetic={folder},head={tmp_path / 'head.pth'}"], capsys)
    assert "area: the demo's rule has no weights, so no path" in cli_error(cmp + ["--score", "area=x"], capsys)
    assert not os.path.exists(out / "base") or not os.listdir(out / "base")
    # flags
    assert "unknown kind 'pick'" in cli_error(cmp + ["--score", "pick=x"], capsys)
    assert "after KIND=PATH come OPTION=VALUE items" in cli_error(cmp + ["--score", f"clip={folder},tok"], capsys)
    assert "each kind once" in cli_error(cmp + ["--score", "area", "--score", "area"], capsys)
    assert "--score goes with --compare" in cli_error(["--model", sd15_dir, "--prompt", "a", "--score", "area"], capsys)
    assert "--model is required" in cli_error(["--prompt", "a cat"], capsys)
    out = ["--out", str(tmp_path / "o"), "--steps", "2", "--prompt", "a cat"]
    assert "--compare needs --unet" in cli_error(["--model", sd15_dir, "--compare"] + out, capsys)
    nodata = str(tmp_path / "none.parquet")
    assert "no data at" in cli_error(["--model", sd15_dir, "--eval_pairs", nodata] + out, capsys)
    assert "go with --eval_pairs" in cli_error(["--model", sd15_dir, "--eval_baseline", sd15_dir] + out, capsys)
    assert "one of them" in cli_error(["--model", sd15_dir] + out, capsys)
    split = ["--model", sd15_dir, "--eval_pairs", str(tmp_path / "p.jsonl"), "--split", "test"]
    assert "is a JSONL file: drop --split" in cli_error(split, capsys)


# ----------------------------------------------------------------------------------------------------
# The commands of docs/evaluation.md on the CPU demo (slow: runs the demo)


@pytest.mark.slow
def test_documented_evaluation_and_ai_feedback_commands(tmp_path):
    """Every command of docs/evaluation.md's evaluation and AI-feedback blocks, run on a fresh demo: each printed
    line the page quotes under a command (`#   ...`) is printed by it."""
    readme = open(os.path.join(ROOT, "docs", "evaluation.md")).read().splitlines()
    root = tmp_path / "demo"
    r = subprocess.run([sys.executable, "dpo.py", "--out_dir", str(root)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    commands, quoted = [], {}  # the demo's commands with --score or an aif/ path, and the lines quoted below each
    for line in readme:
        if line.startswith("python ") and "demo_out" in line and ("--score" in line or "demo_out/aif" in line):
            commands.append(line)
            quoted[line] = []
        elif line.startswith("#   ") and commands and line[4:].strip():
            quoted[commands[-1]].append(line[4:].replace("demo_out", str(root)))
    assert any("relabel.py" in c for c in commands) and any("--compare" in c for c in commands), commands
    for c in commands:
        argv = c.replace("demo_out", str(root)).split()[1:]
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, (c, r.stderr[-2000:])
        for q in quoted[c]:
            assert q in r.stdout.splitlines(), (c, q, r.stdout)


def test_cli_compare_grid(pipe15, sd15_dir, tuned, tmp_path, capsys):
    evaluate.main(["--model", sd15_dir, "--unet", tuned, "--compare", "--prompt", "a red circle",
                   "--prompt", "a cat", "--steps", "2", "--seed", "3", "--batch_size", "2", "--out", str(tmp_path)])
    path = capsys.readouterr().out.split()[-1]
    g = np.asarray(Image.open(path).convert("RGB"))
    assert g.shape == (2 * 32 + 4, 2 * 32 + 4, 3)  # rows = prompts, columns = base, tuned
    base = pipe15(["a red circle", "a cat"], steps=2, seed=3, guidance=7.5)
    pipe = sample.load(sd15_dir, unet=tuned)
    pipe.progress = False
    made = pipe(["a red circle", "a cat"], steps=2, seed=3, guidance=7.5)
    for r in range(2):
        assert np.array_equal(g[r * 36:r * 36 + 32, :32], np.asarray(images.to_pil(base[r])))
        assert np.array_equal(g[r * 36:r * 36 + 32, 36:], np.asarray(images.to_pil(made[r])))
    assert not np.array_equal(g[:32, :32], g[:32, 36:])


@pytest.fixture(scope="module")
def pairs_jsonl(tmp_path_factory):
    """Six preference pairs of random 40x36 images (a non-square size: the eval centre-crops like training)."""
    d = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    with open(d / "pairs.jsonl", "w") as f:
        for i in range(7):
            for j in (0, 1):
                Image.fromarray((rng.random((36, 40, 3)) * 255).astype(np.uint8)).save(d / f"{i}_{j}.png")
            label = 0.5 if i == 6 else float(i % 2)  # the last one is a tie: dropped
            f.write(json.dumps({"caption": ["a cat", "a red circle"][i % 2], "image_0": f"{i}_0.png",
                                "image_1": f"{i}_1.png", "label_0": label}) + "\n")
    return str(d / "pairs.jsonl")


def test_eval_reference_against_itself_is_exactly_chance(sd15_dir, pairs_jsonl, tmp_path, capsys):
    evaluate.main(["--model", sd15_dir, "--eval_pairs", pairs_jsonl, "--eval_k", "2", "--height", "32",
                   "--batch_size", "4", "--out", str(tmp_path)])
    res = json.load(open(tmp_path / "eval.json"))
    assert res["pairs"] == 6 and res["accuracy"] == 0.5 and "baseline_accuracy" not in res  # no --eval_baseline
    lo, hi = res["ci95"]
    assert lo < 0.5 < hi
    assert "accuracy=0.5000" in capsys.readouterr().out


def test_eval_reads_pick_a_pic_parquet_like_jsonl(sd15_dir, tuned, pairs_jsonl, tmp_path):
    """The same pairs as Pick-a-Pic v2 parquet (JPEG bytes replaced by PNG bytes) give the same reward differences."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [json.loads(line) for line in open(pairs_jsonl)]
    root = os.path.dirname(pairs_jsonl)
    blob = [[open(os.path.join(root, r[k]), "rb").read() for r in rows] for k in ("image_0", "image_1")]
    pq.write_table(pa.table({"caption": [r["caption"] for r in rows], "jpg_0": blob[0], "jpg_1": blob[1],
                             "label_0": [r["label_0"] for r in rows], "label_1": [1 - r["label_0"] for r in rows],
                             "model_0": ["m"] * len(rows), "model_1": ["m"] * len(rows)}), tmp_path / "p.parquet")
    pipe = sample.load(sd15_dir, unet=tuned)
    pipe.progress = False
    ref = unetlib.load(sd15_dir)
    a = evaluate.implicit_accuracy(pipe, ref, data.read_pairs(pairs_jsonl), k=1, size=32)
    b = evaluate.implicit_accuracy(pipe, ref, data.read_pairs(str(tmp_path)), k=1, size=32)
    assert a == b and len(a[1]) == 6 and all(d != 0 for d in a[1])


def test_eval_pairs_of_another_set_through_columns(sd15_dir, tuned, pairs_jsonl, tmp_path, capsys):
    """evaluate.py --eval_pairs with --columns: the same pairs under other column names give the same accuracy line
    as the JSONL; a JSONL with --columns is refused in one line."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [json.loads(line) for line in open(pairs_jsonl)]
    root = os.path.dirname(pairs_jsonl)
    blob = [[open(os.path.join(root, r[k]), "rb").read() for r in rows] for k in ("image_0", "image_1")]
    pq.write_table(pa.table({"text": [r["caption"] for r in rows], "a": blob[0], "b": blob[1],
                             "pref": [r["label_0"] for r in rows]}), tmp_path / "p.parquet")
    common = ["--model", sd15_dir, "--unet", tuned, "--eval_k", "1", "--height", "32", "--batch_size", "4"]
    evaluate.main(common + ["--eval_pairs", pairs_jsonl, "--out", str(tmp_path / "j")])
    evaluate.main(common + ["--eval_pairs", str(tmp_path / "p.parquet"), "--columns", "caption=text,jpg_0=a,jpg_1=b,"
                            "label_0=pref", "--split", "train", "--out", str(tmp_path / "q")])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("eval pairs=")]
    assert len(lines) == 2 and lines[0] == lines[1] and "pairs=6" in lines[0]  # the tie dropped in both
    err = cli_error(common + ["--eval_pairs", pairs_jsonl, "--columns", "caption=text", "--out", str(tmp_path / "r")],
                    capsys)
    assert "give a parquet --eval_pairs" in err


def test_eval_sign_convention(pipe15, pairs_jsonl):
    """A policy that denoises image_0 perfectly (and is the reference elsewhere) has the higher implicit reward
    for image_0 on every pair: accuracy = the fraction of pairs labelled image_0."""
    pipe = pipe15
    pairs = data.read_pairs(pairs_jsonl)  # image_0 = the preferred image
    pairs = [dict(p, image_0=p["image_1"], image_1=p["image_0"], label_0=0.0) if i % 3 == 0 else p
             for i, p in enumerate(pairs)]  # swap a third of them back: label_0 = 0 there
    ac = diffusion.alphas_cumprod(pipe.sched_cfg)
    x0 = {}

    def oracle(x, t, context, pooled=None, time_ids=None):  # eps = (x_t - sqrt(a) z0) / sqrt(1 - a) for image_0
        out = ref(x, t, context, pooled, time_ids)
        B = x.shape[0] // 2
        a = ac[t.long()].view(-1, 1, 1, 1)[:B]
        out[:B] = (x[:B] - a.sqrt() * x0["z"][:B]) / (1 - a).sqrt()
        return out

    ref, orig = pipe.unet, pipe.encode_images

    def encode(pixels):
        x0["z"] = orig(pixels)
        return x0["z"]
    pipe.encode_images, pipe.unet = encode, oracle
    try:
        acc, diffs = evaluate.implicit_accuracy(pipe, ref, pairs, k=2, size=32, batch_size=len(pairs))
    finally:
        pipe.encode_images, pipe.unet = orig, ref
    base, same = evaluate.implicit_accuracy(pipe, ref, pairs, k=2, size=32, batch_size=len(pairs))  # ref vs itself
    assert all(d > 0 for d in diffs) and all(d == 0 for d in same)
    assert acc == pytest.approx(sum(p["label_0"] == 1.0 for p in pairs) / len(pairs)) and base == 0.5


def shapes_pairs(folder, split, n, rng):
    """Pairs of one red square of random size on white; the larger square is preferred (the demo's rule)."""
    y, x = np.mgrid[:32, :32] + 0.5

    def square(r):
        img = np.ones((32, 32, 3))
        cx, cy = rng.uniform(r + 1, 31 - r, 2)
        img[(abs(x - cx) <= r) & (abs(y - cy) <= r)] = (0.85, 0.1, 0.1)
        return Image.fromarray((img * 255).astype(np.uint8))
    with open(folder / f"{split}.jsonl", "w") as f:
        for i in range(n):
            small, big = sorted(rng.uniform(3, 11, 2))
            big_first = bool(rng.random() < 0.5)
            for j, r in enumerate((big, small) if big_first else (small, big)):
                square(r).save(folder / f"{split}{i}_{j}.png")
            f.write(json.dumps({"caption": "a red square", "image_0": f"{split}{i}_0.png",
                                "image_1": f"{split}{i}_1.png", "label_0": float(big_first)}) + "\n")
    return str(folder / f"{split}.jsonl")


def test_eval_after_dpo_training_beats_chance(sd15_dir, tmp_path, capsys):
    """End to end: dpo.py trains the tiny SD1.5 on 'larger square wins' pairs; on HELD-OUT pairs the implicit
    reward of the trained UNet agrees with the labels clearly more often than chance (95% CI above 0.5)."""
    import dpo
    rng = np.random.default_rng(0)
    train, test = shapes_pairs(tmp_path, "train", 128, rng), shapes_pairs(tmp_path, "test", 64, rng)
    dpo.main(["--model", sd15_dir, "--data", train, "--out_dir", str(tmp_path / "run"), "--batch_size", "8",
              "--grad_accum", "1", "--max_steps", "30", "--lr", "3e-4", "--warmup", "5", "--resolution", "32",
              "--beta", "500", "--log_every", "30", "--seed", "0"])
    evaluate.main(["--model", sd15_dir, "--unet", str(tmp_path / "run"), "--eval_pairs", test, "--eval_k", "4",
                   "--height", "32", "--batch_size", "64", "--out", str(tmp_path / "eval"),
                   "--eval_baseline", sd15_dir])
    res = json.load(open(tmp_path / "eval" / "eval.json"))
    print(capsys.readouterr().out)
    assert res["pairs"] == 64 and res["ci95"][0] > 0.5, res
    assert res["baseline_accuracy"] == 0.5  # the base UNet scored against itself (the reference)
    # roles swapped: --eval_baseline gets the same draws, so it reproduces the trained UNet's accuracy exactly
    evaluate.main(["--model", sd15_dir, "--unet", sd15_dir, "--eval_pairs", test, "--eval_k", "4", "--height", "32",
                   "--batch_size", "64", "--out", str(tmp_path / "swap"), "--eval_baseline", str(tmp_path / "run")])
    swap = json.load(open(tmp_path / "swap" / "eval.json"))
    assert swap["accuracy"] == 0.5 and swap["baseline_accuracy"] == res["accuracy"] and swap["ci95"] != res["ci95"]


def test_unreadable_eval_pair_is_named_on_a_fresh_line(sd15_dir, pairs_jsonl, tmp_path, capsys):
    """An error during --eval_pairs ends the progress line first and names the pair by file:line."""
    rows = open(pairs_jsonl).read().splitlines()
    root = os.path.dirname(pairs_jsonl)
    bad = tmp_path / "pairs.jsonl"
    (tmp_path / "broken.png").write_bytes(b"not a png")
    row = json.loads(rows[2])
    rows = [json.dumps({**json.loads(r), "image_0": os.path.join(root, json.loads(r)["image_0"]),
                        "image_1": os.path.join(root, json.loads(r)["image_1"])}) for r in rows]
    rows[2] = json.dumps({**row, "image_0": "broken.png", "image_1": os.path.join(root, row["image_1"])})
    bad.write_text("\n".join(rows) + "\n")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", sd15_dir, "--eval_pairs", str(bad), "--eval_k", "1", "--height", "32",
                       "--batch_size", "1", "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "eval: 2/6 pairs" in err  # the progress line came first
    last = err.splitlines()[-1]
    assert last.startswith(f"error: {bad}:3: cannot read an image of the pair: ") and "broken.png" in last, err


# ----------------------------------------------------------------------------------------------------
# Nothing given is lost: Ctrl-C, cut files, other prompts, earlier outputs


def test_compare_keeps_what_it_made_and_refuses_what_would_mix(sd15_dir, tuned, tmp_path, capsys, monkeypatch):
    """Ctrl-C while making images: exit 130, one line, no temporary file, and a rerun makes only the rest; an image
    cut short is made again, not counted as reused; other prompts for the same --out are refused like other
    settings; a folder evaluate.py did not make is refused; an eval.json is only replaced with --overwrite."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\na red circle\n")
    out = tmp_path / "cmp"
    argv = ["--model", sd15_dir, "--unet", tuned, "--compare", "--prompts", str(prompts), "--steps", "2",
            "--out", str(out)]
    real, calls = sample.Pipeline.__call__, [0]

    def ctrl_c(self, *a, **k):
        calls[0] += 1
        if calls[0] == 3:  # the second pair's base image
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(sample.Pipeline, "__call__", ctrl_c)
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    monkeypatch.undo()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 130 and err[-1] == f"error: interrupted: 1 of 3 pairs made, kept in {out} (a rerun " \
        "makes the rest)"
    assert not [n for d, _, ns in os.walk(out) for n in ns if ".tmp" in n]
    evaluate.main(argv)
    assert "images: 1 of 3 pairs reused, 2 to make" in capsys.readouterr().out
    cut = out / "base" / "0001_seed1.png"
    cut.write_bytes(cut.read_bytes()[:len(cut.read_bytes()) // 2])  # a copy cut short
    evaluate.main(argv)
    assert "images: 2 of 3 pairs reused, 1 to make" in capsys.readouterr().out
    assert images.load_image(str(cut)).shape == (1, 3, 32, 32)  # whole again
    prompts.write_text("a cat\na blue dog\na red circle\n")
    assert cli_error(argv, capsys) == f"error: {out} holds images made with other settings: --prompts (0001_seed1 " \
        f"was made for 'a dog', now 'a blue dog'); give another --out, or delete {out / 'images.json'} to make them " \
        "all again"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert "holds files evaluate.py did not make" in cli_error(argv[:-1] + [str(tmp_path / "mine")], capsys)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(dict(caption="a cat", image_0=str(cut), image_1=str(out / "tuned" / cut.name),
                                     label_0=1)) + "\n")
    ev = ["--model", sd15_dir, "--eval_pairs", str(pairs), "--eval_k", "1", "--out", str(tmp_path / "ev")]
    evaluate.main(ev)
    capsys.readouterr()
    assert cli_error(ev, capsys) == f"error: {tmp_path / 'ev' / 'eval.json'} exists: pass --overwrite to replace it"
    evaluate.main(ev + ["--overwrite"])


def test_compare_stopped_before_its_first_image_reruns(sd15_dir, sdxl_dir, tuned, tmp_path, capsys, monkeypatch):
    """Ctrl-C before the first image, or a --unet of another family: the rerun is not refused as a folder of
    someone else's (the empty folders it made are gone), and makes every image; --out held by another command is
    refused in one line."""
    out = tmp_path / "cmp"
    argv = ["--model", sd15_dir, "--compare", "--prompt", "a cat", "--steps", "2", "--out", str(out)]
    monkeypatch.setattr(sample.Pipeline, "__call__", lambda self, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv + ["--unet", tuned])
    monkeypatch.undo()
    assert e.value.code == 130 and not os.path.exists(out)
    capsys.readouterr()
    assert "is SDXL, the model" in cli_error(argv + ["--unet", os.path.join(sdxl_dir, "unet")], capsys)
    assert not os.path.exists(out)
    evaluate.main(argv + ["--unet", tuned])
    assert "images: 0 of 1 pairs reused, 1 to make" in capsys.readouterr().out
    import fcntl
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another evaluate.py writing into it
    assert cli_error(argv + ["--unet", tuned], capsys) == f"error: --out {out} is being written by another command " \
        f"(it holds the lock on {out}): wait for it to end, or give another --out"
    os.close(fd)
    import toy
    monkeypatch.setattr(toy, "area", lambda images, prompts=None: torch.full((len(images),), float("nan")))
    err = cli_error(argv + ["--unet", tuned, "--score", "area"], capsys)
    assert err == "error: --score area gave 2 non-finite score(s) on the pairs 0000_seed0 to 0000_seed0: check " \
        "the scorer and its weights"
    assert not os.path.exists(out / "scores.json")
