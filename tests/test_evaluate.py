"""The paper's evaluation and AI feedback (sample.py --compare --score, --relabel) on tiny models: base and tuned
images from the same noise, scores.json / scores.csv / scores.png, ties counting 0.5, per-category results, a rerun
reusing the images; relabelled labels equal the sign of transformers' CLIPModel score difference, the JSONL (also
pointing into parquet shards) is what dpo.py reads; the built-in PartiPrompts; bad input as one line."""
import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import demo
import reward
import sample
import unet as unetlib
from test_sample import cli_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny transformers CLIPModel folder with its tokenizer (a PickScore_v1 look-alike): (folder, model)."""
    from transformers import CLIPConfig, CLIPModel
    root = str(tmp_path_factory.mktemp("pickscore"))
    n = demo.write_tokenizer(root)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=n, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1),
                     vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=3, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # every weight off its init, so no score can hide behind a zero
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    model.save_pretrained(root)
    return root, model


def transformers_pickscore(model, folder, images, prompts):
    """PickScore by transformers' CLIPModel: logit_scale.exp() * cos(image, prompt); pixels as reward.preprocess
    makes them (tests/test_reward.py checks that against transformers' image processor)."""
    from transformers import CLIPTokenizer
    ids = torch.tensor(CLIPTokenizer.from_pretrained(folder)(prompts, padding="max_length", max_length=77,
                                                             truncation=True).input_ids)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=reward.preprocess(images, 32))
    cos = (out.image_embeds * out.text_embeds).sum(-1) / (out.image_embeds.norm(dim=-1) * out.text_embeds.norm(dim=-1))
    return model.logit_scale.exp().detach() * cos


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


def png(path):
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


# ----------------------------------------------------------------------------------------------------
# Evaluation: --compare --score


def test_compare_scores_both_models_per_category_and_reuses_images(sd15_dir, tuned, clip_dir, tmp_path, capsys,
                                                                     monkeypatch, one_thread):
    folder, model = clip_dir
    out = tmp_path / "eval"
    argv = ["--model", sd15_dir, "--unet", tuned, "--compare", "--prompts", prompts_tsv(tmp_path / "p.tsv"),
            "--per_prompt", "2", "--steps", "2", "--seed", "5", "--batch_size", "3", "--score", "area",
            "--score", f"pickscore={folder}", "--score_batch", "3", "--device", "cpu", "--out", str(out)]
    sample.main(argv)
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
    assert res["pickscore"]["win_rate"] == pytest.approx(sample.win_rate(base, tuned_scores)["win_rate"])
    in_a = torch.tensor([r["category"] == "A" for r in rows])
    assert res["pickscore"]["categories"]["A"]["tuned"] == pytest.approx(float(tuned_scores[in_a].mean()), rel=1e-5)
    # the scores are transformers' PickScore of the PNG files
    images = torch.stack([png(out / r["base_image"]) for r in rows])
    want = transformers_pickscore(model, folder, images, [r["prompt"] for r in rows])
    torch.testing.assert_close(base, want, rtol=1e-4, atol=1e-4)
    # same seed, same initial noise: the base image is the base pipeline's with that seed, the tuned one the tuned's
    r = rows[3]  # prompt 1, its second image (made in a batch of 3: within one 8-bit step of making it alone)
    for side, unet in (("base", None), ("tuned", tuned)):
        pipe = sample.load(sd15_dir, unet=unet)
        pipe.progress = False
        x = pipe([r["prompt"]], steps=2, seed=int(r["seed"]), guidance=7.5)
        assert (png(out / r[f"{side}_image"]) - png_of(x[0])).abs().max() <= 1 / 255 + 1e-6
    assert (png(out / r["base_image"]) - png(out / r["tuned_image"])).abs().max() > 0.1
    assert Image.open(out / "scores.png").size[0] > 300 and os.path.isfile(out / "compare_seed5.png")
    # a rerun makes nothing: every image is reused (and scored again, to the same numbers)
    monkeypatch.setattr(sample.Pipeline, "__call__", lambda *a, **k: pytest.fail("generated again"))
    sample.main(argv)
    assert "images: 10 of 10 pairs reused, 0 to make" in capsys.readouterr().out
    assert json.load(open(out / "scores.json")) == res
    # a slice names and seeds its images as the whole set did: reused too
    sample.main(argv[:-2] + ["--categories", "B", "--per_category", "1", "--out", str(out)])
    assert "images: 2 of 2 pairs reused" in capsys.readouterr().out
    assert json.load(open(out / "scores.json"))["area"]["categories"]["B"]["n"] == 2
    # other settings: refused, never mixed with the old images
    err = cli_error(argv[:-2] + ["--steps", "3", "--out", str(out)], capsys)
    assert f"error: {out} holds images made with other settings: --steps 2 (now 3)" in err


def png_of(x):
    """What a [3,H,W] sample becomes once saved as an 8-bit PNG and read back."""
    return torch.from_numpy(np.asarray(sample.to_pil(x), dtype=np.float32) / 255).permute(2, 0, 1)


def test_win_rate_counts_ties_half(sd15_dir, tmp_path, capsys, one_thread):
    r = sample.win_rate(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 2.0, 1.0, 5.0]))
    assert r["win_rate"] == (1 + 0.5 + 0 + 1) / 4 and r["base"] == 2.5 and r["tuned"] == 2.5 and r["n"] == 4
    assert r["ci95"] == list(sample.wilson(2.5, 4))
    # the base model against itself: every pair ties, the win rate is exactly 0.5
    sample.main(["--model", sd15_dir, "--unet", sd15_dir, "--compare", "--prompt", "a cat", "--prompt", "a dog",
                 "--per_prompt", "2", "--steps", "2", "--score", "area", "--out", str(tmp_path)])
    res = json.load(open(tmp_path / "scores.json"))["area"]
    assert res["win_rate"] == 0.5 and res["base"] == res["tuned"] and res["n"] == 4 and "categories" not in res
    assert res["ci95"][0] < 0.5 < res["ci95"][1]
    table = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["area", "all", "4"] in [t[:3] for t in table]


def test_parti_prompts_built_in():
    rows = sample.read_prompts("parti")
    assert len(rows) == 1632 and rows[0] == ("bond", "Abstract")
    counts = {c: sum(1 for _, k in rows if k == c) for c in dict.fromkeys(k for _, k in rows)}
    assert len(counts) == 12 and counts["Animals"] == 314 and counts["World Knowledge"] == 214
    assert sum('"' in p for p, _ in rows) == 22  # quotes inside prompts are kept as they are
    assert os.path.isfile(os.path.join(os.path.dirname(sample.PARTI), "LICENSE"))
    a = sample.parse_args(["--model", "m", "--prompts", "parti", "--per_category", "2", "--seed", "1"])
    items = sample.prompt_items(a)
    assert len(items) == 24 and {it["category"] for it in items} == set(counts)
    whole = {it["name"]: it for it in sample.prompt_items(sample.parse_args(["--model", "m", "--prompts", "parti",
                                                                              "--seed", "1"]))}
    assert all(whole[it["name"]] == it for it in items)  # the slice's images are the whole set's


# ----------------------------------------------------------------------------------------------------
# AI feedback: --relabel


def pairs_jsonl(root, sizes=((40, 36), (32, 32), (36, 48), (32, 40), (44, 32))):
    """Pairs of random images (sizes vary, also within a pair) and a last pair of one image twice (a score tie);
    the third pair's own label is a tie."""
    rng = np.random.default_rng(0)
    os.makedirs(root / "img", exist_ok=True)
    with open(root / "pairs.jsonl", "w") as f:
        for i, (h, w) in enumerate(sizes):
            for j in (0, 1):
                Image.fromarray(rng.integers(0, 255, (h, w + 4 * j, 3), dtype=np.uint8)).save(root / f"img/{i}_{j}.png")
            label = 0.5 if i == 2 else float(i % 2)
            f.write(json.dumps(dict(caption=demo.WORDS[i] + " cat", image_0=f"img/{i}_0.png", image_1=f"img/{i}_1.png",
                                    label_0=label)) + "\n")
        f.write(json.dumps(dict(caption="a cat", image_0="img/0_0.png", image_1="img/0_0.png", label_0=1.0)) + "\n")
    return str(root / "pairs.jsonl")


def test_relabel_labels_are_the_sign_of_the_transformers_score_difference(clip_dir, tmp_path, capsys, one_thread):
    folder, model = clip_dir
    src = pairs_jsonl(tmp_path / "src")
    out = tmp_path / "aif" / "pairs.jsonl"
    sample.main(["--relabel", src, "--score", f"pickscore={folder}", "--score_batch", "2", "--device", "cpu",
                 "--out", str(out)])
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    lines = [json.loads(line) for line in open(out)]
    assert len(lines) == 6 and summary.startswith("relabel pairs=6 ") and "ties=1 (label 0.5" in summary
    for line, row in zip(lines, map(json.loads, open(src))):
        images = [png(os.path.join(out.parent, line[f"image_{k}"])) for k in (0, 1)]  # paths relative to the JSONL
        s0, s1 = (transformers_pickscore(model, folder, x[None], [row["caption"]])[0] for x in images)
        assert line["score_0"] == pytest.approx(float(s0), rel=1e-4) and line["score_1"] == pytest.approx(float(s1),
                                                                                                          rel=1e-4)
        assert line["label_0"] == (1.0 if s0 > s1 else 0.0 if s0 < s1 else 0.5), (line, s0, s1)
        assert line["label_0_before"] == row["label_0"] and line["scorer"] == "pickscore"
    assert lines[-1]["label_0"] == 0.5 and lines[-1]["score_0"] == lines[-1]["score_1"]  # one image twice: a tie
    # dpo.py's reader: ties dropped, the preferred image first
    pairs = data.Pairs(str(out))
    assert len(pairs) == 5
    for i, line in enumerate(lines[:5]):
        winner = line["image_0"] if line["label_0"] == 1.0 else line["image_1"]
        assert pairs.raw(i)[1][0] == os.path.join(out.parent, winner)
    # the official rule: a score tie keeps image_0 as the winner, pairs labelled a tie are not used
    sample.main(["--relabel", src, "--score", f"pickscore={folder}", "--ties", "official", "--device", "cpu",
                 "--out", str(out)])
    assert "skipped 1 pairs labelled a tie" in capsys.readouterr().out
    official = [json.loads(line) for line in open(out)]
    assert [x["label_0"] for x in official] == [x["label_0"] for i, x in enumerate(lines[:-1]) if i != 2] + [1.0]
    assert len(data.Pairs(str(out))) == 5


def test_relabel_pick_a_pic_parquet_references_its_images(tmp_path, capsys):
    """Parquet in, JSONL out: each image is a reference "shard.parquet#row=R&col=jpg_k" into the shard, which
    dpo.py's reader resolves (a window of row groups decoded at a time)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(1)
    rows = []
    for i in range(6):  # the demo's world: larger shape wins; label_0 the opposite of the rule on purpose
        imgs = [demo.random_image("a red circle", rng, radius=r) for r in ((3.0, 5.0) if i % 2 else (5.0, 3.0))]
        blobs = []
        for x in imgs:
            buf = io.BytesIO()
            Image.fromarray((x * 255).round().astype(np.uint8)).save(buf, format="PNG")
            blobs.append(buf.getvalue())
        rows.append(dict(caption="a red circle", jpg_0=blobs[0], jpg_1=blobs[1], label_0=float(i % 2),
                         label_1=1.0 - i % 2, model_0="m", model_1="m"))
    (tmp_path / "pap").mkdir()
    shard = tmp_path / "pap" / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), shard, row_group_size=4)  # two row groups: rows 0-3 and 4-5
    out = tmp_path / "aif.jsonl"
    sample.main(["--relabel", str(tmp_path / "pap"), "--score", "area", "--out", str(out)])
    assert "agreement_with_former_labels=0.000" in capsys.readouterr().out
    lines = [json.loads(line) for line in open(out)]
    assert [x["image_1"] for x in lines] == [f"pap/train-00000-of-00001.parquet#row={i}&col=jpg_1" for i in range(6)]
    assert [x["label_0"] for x in lines] == [1.0 - i % 2 for i in range(6)]  # the larger circle wins
    pairs = data.Pairs(str(out))
    assert len(pairs) == 6 and len(set(pairs.group.tolist())) == 2  # shuffled in windows of row groups
    for i in range(6):
        caption, (win, lose), _ = pairs.raw(i)
        w = "jpg_0" if i % 2 == 0 else "jpg_1"
        assert win == rows[i][w] and lose == rows[i]["jpg_1" if w == "jpg_0" else "jpg_0"]
    item = data.PairDataset(pairs, 16, seed=0, random_crop=False, flip=False)[0]
    assert item["pixels"].shape == (2, 3, 16, 16) and item["bad"] == []
    assert data.open_image(str(shard) + "#row=5&col=jpg_0").size == (16, 16)
    # a reference to a row the shard does not have is named by file:line when the JSONL is read
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(out).read() + json.dumps(dict(lines[0], image_0=lines[0]["image_0"].replace("row=0", "row=9")))
                   + "\n")
    with pytest.raises(ValueError, match=rf"{bad}:7: .*train-00000-of-00001.parquet has 6 rows, no row 9"):
        data.Pairs(str(bad))


def test_relabel_with_the_demo_rule_gives_the_rule_labels(tmp_path, capsys):
    """The demo's coin-flip pairs relabelled by its rule (--score area) carry the labels the rule gives."""
    src = demo.write_pairs(str(tmp_path), "sft", 48, seed=3, biased=False)
    sample.main(["--relabel", src, "--score", "area", "--out", str(tmp_path / "aif.jsonl")])
    for line in open(tmp_path / "aif.jsonl"):
        x = json.loads(line)
        a = demo.area_scorer(torch.stack([demo.load_png(tmp_path / x[f"image_{k}"]) for k in (0, 1)]))
        assert x["label_0"] == (1.0 if a[0] > a[1] else 0.0 if a[0] < a[1] else 0.5)


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
    rel = ["--relabel", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "r.jsonl")]
    assert "needs one --score" in cli_error(rel, capsys)
    assert "give --out FILE.jsonl" in cli_error(rel[:2] + ["--score", "area", "--out", str(tmp_path)], capsys)
    assert "data file not found" in cli_error(rel + ["--score", "area"], capsys)
    assert "--model is required" in cli_error(["--prompt", "a cat"], capsys)


# ----------------------------------------------------------------------------------------------------
# The README's commands on the CPU demo (slow: runs the demo)


@pytest.mark.slow
def test_readme_evaluation_and_ai_feedback_commands(tmp_path):
    """Every command of the README's evaluation and AI-feedback blocks, run on a fresh demo: each printed line the
    README quotes under a command (`#   ...`) is printed by it."""
    readme = open(os.path.join(ROOT, "README.md")).read().splitlines()
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
    assert any("--relabel" in c for c in commands) and any("--compare" in c for c in commands), commands
    for c in commands:
        argv = c.replace("demo_out", str(root)).split()[1:]
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, (c, r.stderr[-2000:])
        for q in quoted[c]:
            assert q in r.stdout.splitlines(), (c, q, r.stdout)
