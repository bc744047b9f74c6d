"""relabel.py (AI feedback) on tiny inputs: labels are the sign of transformers' CLIPModel score difference, ties as
dpo.py or as the official code, the JSONL (also pointing into parquet shards) is what dpo.py reads, the demo's rule
gives the rule's labels, and bad input as one line."""
import errno
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import cache
import data
import demo
import images
import relabel
import tiny
import toy
from tiny import cli_error, read_png, transformers_pickscore


def test_relabel_with_a_scorer():
    bright, dark = torch.full((3, 8, 8), 0.9), torch.full((3, 8, 8), 0.1)

    def brightness(pixels, prompts):  # a Scorer: [B,3,H,W] in [0,1], prompts -> [B]
        assert pixels.shape == (2, 3, 8, 8) and prompts == ["p", "p"]
        return pixels.mean((1, 2, 3))
    pairs = [{"caption": "p", "image_0": bright, "image_1": dark, "label_0": 0.0},
             {"caption": "p", "image_0": dark, "image_1": bright, "label_0": 1.0},
             {"caption": "p", "image_0": dark, "image_1": dark, "label_0": 1.0}]
    assert [p["label_0"] for p in relabel.relabel(pairs, brightness)] == [1.0, 0.0, 0.5]
    assert pairs[0]["label_0"] == 0.0  # the input is not modified


def relabel_pairs(root, sizes=((40, 36), (32, 32), (36, 48), (32, 40), (44, 32))):
    """Pairs of random images (sizes vary, also within a pair) and a last pair of one image twice (a score tie);
    the third pair's own label is a tie."""
    rng = np.random.default_rng(0)
    os.makedirs(root / "img", exist_ok=True)
    with open(root / "pairs.jsonl", "w") as f:
        for i, (h, w) in enumerate(sizes):
            for j in (0, 1):
                Image.fromarray(rng.integers(0, 255, (h, w + 4 * j, 3), dtype=np.uint8)).save(root / f"img/{i}_{j}.png")
            label = 0.5 if i == 2 else float(i % 2)
            f.write(json.dumps(dict(caption=toy.WORDS[i] + " cat", image_0=f"img/{i}_0.png", image_1=f"img/{i}_1.png",
                                    label_0=label)) + "\n")
        f.write(json.dumps(dict(caption="a cat", image_0="img/0_0.png", image_1="img/0_0.png", label_0=1.0)) + "\n")
    return str(root / "pairs.jsonl")


def test_relabel_labels_are_the_sign_of_the_transformers_score_difference(clip_dir, tmp_path, capsys, one_thread):
    folder, model = clip_dir
    src = relabel_pairs(tmp_path / "src")
    out = tmp_path / "aif" / "pairs.jsonl"
    relabel.main([src, "--score", f"pickscore={folder}", "--score_batch", "2", "--device", "cpu",
                 "--out", str(out)])
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    lines = [json.loads(line) for line in open(out)]
    assert len(lines) == 6 and summary.startswith("relabel pairs=6 ") and "ties=1 (label 0.5" in summary
    for line, row in zip(lines, map(json.loads, open(src))):
        pixels = [read_png(os.path.join(out.parent, line[f"image_{k}"])) for k in (0, 1)]  # paths relative to the JSONL
        s0, s1 = (transformers_pickscore(model, folder, x[None], [row["caption"]])[0] for x in pixels)
        assert line["score_0"] == pytest.approx(float(s0), rel=1e-4) and line["score_1"] == pytest.approx(float(s1),
                                                                                                          rel=1e-4)
        assert line["label_0"] == (1.0 if s0 > s1 else 0.0 if s0 < s1 else 0.5), (line, s0, s1)
        assert line["label_0_before"] == row["label_0"] and line["scorer"] == "pickscore"
    assert lines[-1]["label_0"] == 0.5 and lines[-1]["score_0"] == lines[-1]["score_1"]  # one image twice: a tie
    # dpo.py's reader: ties dropped, the preferred image first
    pairs = data.Preferences(str(out))
    assert len(pairs) == 5
    for i, line in enumerate(lines[:5]):
        winner = line["image_0"] if line["label_0"] == 1.0 else line["image_1"]
        assert pairs.raw(i)[1][0] == os.path.join(out.parent, winner)
    # the official rule: a score tie keeps image_0 as the winner, pairs labelled a tie are not used
    relabel.main([src, "--score", f"pickscore={folder}", "--ties", "official", "--device", "cpu",
                  "--out", str(out), "--overwrite"])
    assert "skipped 1 pairs labelled a tie" in capsys.readouterr().out
    official = [json.loads(line) for line in open(out)]
    assert [x["label_0"] for x in official] == [x["label_0"] for i, x in enumerate(lines[:-1]) if i != 2] + [1.0]
    assert len(data.Preferences(str(out))) == 5


def test_relabel_pick_a_pic_parquet_references_its_images(tmp_path, capsys):
    """Parquet in, JSONL out: each image is a reference "shard.parquet#row=R&col=jpg_k" into the shard, which
    dpo.py's reader resolves (a window of row groups decoded at a time)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(1)
    rows = []
    for i in range(6):  # the demo's world: larger shape wins; label_0 the opposite of the rule on purpose
        imgs = [toy.random_image("a red circle", rng, radius=r) for r in ((3.0, 5.0) if i % 2 else (5.0, 3.0))]
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
    relabel.main([str(tmp_path / "pap"), "--score", "area", "--out", str(out)])
    assert "agreement_with_former_labels=0.000" in capsys.readouterr().out
    lines = [json.loads(line) for line in open(out)]
    assert [x["image_1"] for x in lines] == [f"pap/train-00000-of-00001.parquet#row={i}&col=jpg_1" for i in range(6)]
    assert [x["label_0"] for x in lines] == [1.0 - i % 2 for i in range(6)]  # the larger circle wins
    pairs = data.Preferences(str(out))
    assert len(pairs) == 6 and len(set(pairs.group.tolist())) == 2  # shuffled in windows of row groups
    for i in range(6):
        caption, (win, lose), _ = pairs.raw(i)
        w = "jpg_0" if i % 2 == 0 else "jpg_1"
        assert win == rows[i][w] and lose == rows[i]["jpg_1" if w == "jpg_0" else "jpg_0"]
    item = cache.PreferenceDataset(pairs, 16, seed=0, random_crop=False, flip=False)[0]
    assert item["pixels"].shape == (2, 3, 16, 16) and item["bad"] == []
    assert images.open_image(str(shard) + "#row=5&col=jpg_0").size == (16, 16)
    # a reference to a row the shard does not have is named by file:line when the JSONL is read
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(out).read() + json.dumps(dict(lines[0], image_0=lines[0]["image_0"].replace("row=0", "row=9")))
                   + "\n")
    with pytest.raises(ValueError, match=rf"{bad}:7: .*train-00000-of-00001.parquet has 6 rows, no row 9"):
        data.Preferences(str(bad))


def test_relabel_a_chosen_rejected_set_with_columns(tmp_path, capsys):
    """--columns: a prompt / chosen / rejected set of Hugging Face Image structs, no labels, relabelled by the
    rule; the JSONL's references point at its own columns and dpo.py's reader resolves them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(2)
    chosen, rejected = [], []
    for i in range(4):  # chosen is the smaller circle in pairs 0 and 2: the rule disagrees there
        radii = (3.0, 5.0) if i % 2 == 0 else (5.0, 3.0)
        for col, r in zip((chosen, rejected), radii):
            buf = io.BytesIO()
            Image.fromarray((toy.random_image("a red circle", rng, radius=r) * 255).round().astype(np.uint8)).save(
                buf, format="PNG")
            col.append({"bytes": buf.getvalue(), "path": None})
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    src = tmp_path / "cr.parquet"
    pq.write_table(pa.table({"prompt": ["a red circle"] * 4, "chosen": pa.array(chosen, struct),
                             "rejected": pa.array(rejected, struct)}), src)
    out = tmp_path / "aif.jsonl"
    relabel.main([str(src), "--score", "area", "--out", str(out), "--columns",
                  "caption=prompt,jpg_0=chosen,jpg_1=rejected"])
    lines = [json.loads(line) for line in open(out)]
    assert [x["label_0"] for x in lines] == [0.0, 1.0, 0.0, 1.0]
    assert lines[0]["image_0"] == "cr.parquet#row=0&col=chosen" and lines[0]["label_0_before"] is None
    pairs = data.Preferences(str(out))
    win = {pairs.raw(i)[1][0] for i in range(4)}
    assert win == {rejected[0]["bytes"], chosen[1]["bytes"], rejected[2]["bytes"], chosen[3]["bytes"]}
    assert "missing columns nope" in cli_error(relabel.main, [str(src), "--score", "area", "--out",
                                                              str(tmp_path / "x.jsonl"), "--columns",
                                                              "caption=prompt,jpg_0=nope,jpg_1=rejected"], capsys)
    assert "is a JSONL file: drop --columns" in cli_error(relabel.main, [str(out), "--score", "area", "--out", str(
        tmp_path / "y.jsonl"), "--columns", "caption=prompt"], capsys)


def test_relabel_with_the_demo_rule_gives_the_rule_labels(tmp_path, capsys):
    """The demo's coin-flip pairs relabelled by its rule (--score area) carry the labels the rule gives."""
    src = demo.write_pairs(str(tmp_path), "sft", 48, seed=3, biased=False)
    relabel.main([src, "--score", "area", "--out", str(tmp_path / "aif.jsonl")])
    for line in open(tmp_path / "aif.jsonl"):
        x = json.loads(line)
        a = toy.area(torch.stack([images.load_image(str(tmp_path / x[f"image_{k}"]))[0] for k in (0, 1)]))
        assert x["label_0"] == (1.0 if a[0] > a[1] else 0.0 if a[0] < a[1] else 0.5)


def test_bad_input(tmp_path, capsys):
    rel = [str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "r.jsonl")]
    assert "needs one --score" in cli_error(relabel.main, rel, capsys)
    assert "give --out FILE.jsonl" in cli_error(relabel.main, rel[:1] + ["--score", "area", "--out", str(tmp_path)],
                                                capsys)
    assert "data file not found" in cli_error(relabel.main, rel + ["--score", "area"], capsys)
    assert "is a JSONL file: drop --split" in cli_error(relabel.main, rel + ["--score", "area", "--split", "test"],
                                                        capsys)


def test_relabel_never_writes_over_what_it_reads_or_an_earlier_file(tmp_path, capsys):
    """The output may not be the input (real paths: through a link too), and an existing one only with --overwrite;
    nothing is written when refused."""
    src = demo.write_pairs(str(tmp_path), "sft", 8, seed=3, biased=False)
    before = open(src).read()
    os.symlink(src, tmp_path / "link.jsonl")
    for out, flags in ((src, ["--overwrite"]), (str(tmp_path / "link.jsonl"), ["--overwrite"])):
        err = cli_error(relabel.main, [src, "--score", "area", "--out", out, *flags], capsys)
        assert err == f"error: {out} is also an input of this command ({src}): write the output elsewhere"
    assert open(src).read() == before
    out = tmp_path / "aif.jsonl"
    relabel.main([src, "--score", "area", "--out", str(out)])
    first = out.read_text()
    out.write_text("my edits")
    err = cli_error(relabel.main, [src, "--score", "area", "--out", str(out)], capsys)
    assert err == f"error: {out} exists: pass --overwrite to replace it" and out.read_text() == "my edits"
    relabel.main([src, "--score", "area", "--out", str(out), "--overwrite"])
    assert out.read_text() == first
    import fcntl
    with open(f"{out}.lock", "w") as lock:  # another relabel.py writing the same --out
        fcntl.flock(lock, fcntl.LOCK_EX)
        err = cli_error(relabel.main, [src, "--score", "area", "--out", str(out), "--overwrite"], capsys)
    assert err == f"error: --out {out} is being written by another command (it holds the lock on {out}.lock): " \
        "wait for it to end, or give another --out" and out.read_text() == first


def test_unreadable_pairs_are_skipped_and_counted_and_bad_captions_too(tmp_path, capsys):
    """As training does: a pair with an image that does not read, or a caption that is not text, is skipped, counted
    and named in the summary, never written (not as "None")."""
    src = demo.write_pairs(str(tmp_path), "sft", 6, seed=3, biased=False)
    rows = [json.loads(line) for line in open(src)]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows[1]["image_0"] = "broken.png"
    rows[3]["caption"] = None
    rows[4]["caption"] = 123
    with open(src, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    out = tmp_path / "aif.jsonl"
    relabel.main([src, "--score", "area", "--out", str(out)])
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("relabel pairs=3 ") and f"unreadable=3 (skipped; first: {src}:2: cannot read image" \
        in summary, summary
    written = [json.loads(line)["caption"] for line in open(out)]
    assert written == [rows[i]["caption"] for i in (0, 2, 5)]


def test_a_failed_relabel_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    """The disk fills while the JSONL is written: one line naming it, no OUT.tmpPID left, no OUT."""
    src = demo.write_pairs(str(tmp_path), "sft", 48, seed=3, biased=False)
    with tiny.small_disk(tmp_path / "disk", 4096) as disk:
        out = os.path.join(disk, "aif.jsonl") if disk else str(tmp_path / "aif.jsonl")
        if disk is None:
            real, seen = json.dumps, [0]

            def dumps(obj, *a, **k):
                seen[0] += 1
                if seen[0] > 20:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(obj, *a, **k)
            monkeypatch.setattr(relabel.json, "dumps", dumps)
        with pytest.raises(SystemExit) as e:
            relabel.main([src, "--score", "area", "--out", out])
        monkeypatch.undo()
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert e.value.code == 1 and err == [f"error: cannot write {out}: no space left on device"]
        assert not any(".tmp" in n for n in os.listdir(os.path.dirname(out)))
        assert not os.path.exists(out)


def test_a_scorer_giving_nan_is_one_line_and_no_file(tmp_path, capsys, monkeypatch):
    """A NaN would label every pair a tie without a word (and is not JSON): the scorer is named, nothing written."""
    src = demo.write_pairs(str(tmp_path), "sft", 4, seed=3, biased=False)
    monkeypatch.setattr(toy, "area", lambda images, prompts=None: torch.full((len(images),), float("nan")))
    err = cli_error(relabel.main, [src, "--score", "area", "--out", str(tmp_path / "aif.jsonl")], capsys)
    assert err.startswith("error: --score area gave ") and err.endswith("non-finite score(s) on the pairs: check "
                                                                        "the scorer and its weights")
    assert not os.path.exists(tmp_path / "aif.jsonl")
