"""data.py: Pick-a-Pic parquet and JSONL readers (winner first, ties dropped, the dreamlike filter, splits of a
folder, shards named or in split folders), the windowed shuffle (mixing row groups, each decoded once per window)
and the block order, the one JSONL parser, bad-row accounting over ranks."""
import json
import math
import os

import pytest

import data
import images
import tiny
from tiny import run, write_parquet


def test_read_pairs_parquet_and_jsonl(tmp_path, jsonl):
    pq = write_parquet(tmp_path / "a.parquet")
    rows = data.read_pairs(pq)
    assert len(rows) == 9 and all(isinstance(r["image_0"], bytes) for r in rows)  # the tie is dropped
    raw = data.Preferences(pq)
    import pyarrow.parquet as pqm
    t = pqm.read_table(pq).to_pydict()
    keep = [i for i in range(10) if i != 3]
    for k, i in enumerate(keep):  # winner first, chosen from label_0
        win = t["jpg_0"][i] if t["label_0"][i] == 1.0 else t["jpg_1"][i]
        assert raw.raw(k)[1][0] == win and raw.raw(k)[0] == t["caption"][i]
    dream = data.Preferences(pq, dreamlike_only=True)  # both model names contain "dream": rows 1, 2, 4, 5 (3: tie)
    assert sorted(dream.row + 4 * dream.rg) == [1, 2, 4, 5]
    assert len(data.read_pairs(jsonl)) == 8 and data.read_pairs(jsonl)[0]["image_0"].endswith("img/0_1.png")  # label 0
    assert len(data.read_pairs(str(tmp_path / "*.parquet"))) == 9 and len(data.read_pairs(str(tmp_path))) == 9


def test_epoch_order_blocks_row_groups(tmp_path):
    p = data.Preferences(write_parquet(tmp_path / "a.parquet", n=20, rg=5))
    o = data.EpochOrder(p.group, seed=0)
    first = [o(k) for k in range(len(p))]
    assert sorted(first) == list(range(len(p)))
    groups = [p.group[i] for i in first]
    assert sum(a != b for a, b in zip(groups, groups[1:])) == len(set(groups)) - 1  # each row group read once
    assert [o(len(p) + k) for k in range(len(p))] != first  # a new shuffle next epoch


def _pick_a_pic(folder, shards):
    """A Pick-a-Pic-like folder: name -> rows of a small shard (hub names: <split>-00000-of-0000N.parquet)."""
    os.makedirs(folder, exist_ok=True)
    for name, n in shards.items():
        write_parquet(os.path.join(folder, name), n=n)
    return str(folder)


def test_splits_of_a_pick_a_pic_folder(tmp_path, capsys):
    root = _pick_a_pic(tmp_path / "pap" / "data", {"train-00000-of-00002-a1.parquet": 10,
                                                   "train-00001-of-00002-b2.parquet": 10,
                                                   "validation-00000-of-00001-c3.parquet": 6})
    train = data.Preferences(root)  # train only: 2 x 9 usable pairs (a tie per shard)
    assert len(train) == 18 and all("train-" in f for f in train.files)
    assert "2 train shard(s)" in train.read and "not read: validation (1)" in train.read and "18 usable" in train.read
    val = data.Preferences(str(tmp_path / "pap"), split="validation")  # the folder above works too
    assert len(val) == 5 and all("validation-" in f for f in val.files)
    with pytest.raises(ValueError, match=r"--split test matches no shard in .* \(its splits: train, validation\)"):
        data.Preferences(root, split="test")
    plain = _pick_a_pic(tmp_path / "plain", {"a.parquet": 10, "b.parquet": 10})  # no split names: read whole
    assert len(data.Preferences(plain)) == 18 and "no split in their names: all read" in data.Preferences(plain).read
    folders = tmp_path / "folders"  # splits as folders
    _pick_a_pic(folders / "train", {"x.parquet": 10})
    _pick_a_pic(folders / "test", {"y.parquet": 10})
    assert [os.path.basename(f) for f in data.Preferences(str(folders)).files] == ["x.parquet"]
    assert data.Preferences(str(tmp_path / "pap" / "data" / "*.parquet"), split="validation").files == val.files


def test_dpo_reads_the_train_split_and_says_so(tmp_path, sdxl_dir, capsys):
    root = _pick_a_pic(tmp_path / "pap", {"train-00000-of-00001-a.parquet": 10, "test-00000-of-00001-b.parquet": 10})
    run(tmp_path / "run", sdxl_dir, root, steps=1)
    out = capsys.readouterr().out
    assert f"data: 1 train shard(s) of {root}; not read: test (1): 9 usable pairs" in out
    with pytest.raises(SystemExit):
        run(tmp_path / "bad", sdxl_dir, root, "--split", "validation", steps=1)
    err = capsys.readouterr().err.strip()
    assert err == f"error: --split validation matches no shard in {root} (its splits: test, train)"
    assert not (tmp_path / "bad").exists()


def test_windowed_shuffle_mixes_row_groups_and_reads_each_once(tmp_path, monkeypatch):
    root = _pick_a_pic(tmp_path, {f"train-0000{k}-of-00004-x.parquet": 40 for k in range(4)})  # 4 x 10 groups of 4
    monkeypatch.setattr(data, "SHUFFLE_PAIRS", 24)  # windows of ~24 pairs: 6 row groups of the 40
    pairs = data.Preferences(root)
    assert pairs.window_groups == 6
    order = data.EpochOrder(pairs.group, seed=3, window=pairs.window_groups)
    first = [order(k) for k in range(len(pairs))]
    assert sorted(first) == list(range(len(pairs)))
    groups = [int(pairs.group[i]) for i in first]
    runs = sum(a != b for a, b in zip(groups, groups[1:]))
    assert runs > len(pairs) // 2  # consecutive pairs come from different row groups (the block shuffle: 39)
    block = data.EpochOrder(pairs.group, seed=3)  # window 1: the old block shuffle
    block_groups = [int(pairs.group[block(k)]) for k in range(len(pairs))]
    assert sum(a != b for a, b in zip(block_groups, block_groups[1:])) == len(set(block_groups)) - 1
    reads = []
    real = images.pyarrow_parquet().ParquetFile.read_row_group

    def read_row_group(self, i, **kw):
        reads.append(i)
        return real(self, i, **kw)
    monkeypatch.setattr(images.pyarrow_parquet().ParquetFile, "read_row_group", read_row_group)
    for i in first:  # a whole epoch in the order training reads it: each row group decoded once
        pairs.raw(i)
    assert len(reads) == len(set(groups))


def test_one_jsonl_parser_for_pairs_and_single_images(tmp_path):
    """read_jsonl: pairs and single images, paths joined to the file's folder, a missing label_0 allowed only
    where asked (AI feedback labels pairs that have none), a bad line named by file:line."""
    f = tmp_path / "d.jsonl"
    f.write_text('{"caption": "a", "image_0": "x.png", "image_1": "y.png", "label_0": 0}\n\n'
                 '{"caption": "b", "image": "z.png", "label": 1}\n{"caption": "c", "image_0": "u", "image_1": "v"}\n')
    rows = list(data.read_jsonl(str(f), labelled=False))
    assert rows == [(1, "a", (str(tmp_path / "x.png"), str(tmp_path / "y.png")), 0.0, False),
                    (3, "b", (str(tmp_path / "z.png"),), 1.0, True),
                    (4, "c", (str(tmp_path / "u"), str(tmp_path / "v")), None, False)]
    with pytest.raises(ValueError, match=rf"{f}:4: not a JSON object with caption, image_0, image_1, label_0"):
        list(data.read_jsonl(str(f)))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        list(data.read_jsonl(str(tmp_path / "none.jsonl")))


def test_unreadable_items_are_counted_once_and_stop_past_the_limit():
    import parallel
    parallel.setup("cpu")  # a one-process group: the same collectives as N ranks
    bad = data.Unreadable(0.02, "pairs of d.jsonl")
    bad.add([3, 5])
    bad.add([5])
    assert bad.check(100) == 2  # 2 of 100 is the limit, not past it
    bad.add([7])
    with pytest.raises(ValueError, match=r"^3 of 120 pairs of d.jsonl were unreadable \(more than --max_bad_frac "
                                         r"0.02\)$"):
        bad.check(120)


def test_labels_that_are_none_of_0_half_1_are_counted_and_said(tmp_path):
    """Ties and invalid labels are left out, and the summary says how many of each (and where the first bad label
    is); a file with nothing usable says what it found instead of blaming ties."""
    rows = [dict(caption="a", image_0="x.png", image_1="y.png", label_0=v) for v in (1, 0, 0.5, 2, 0.25, 1)]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = data.Preferences(str(f))
    assert len(p) == 3 and p.read == f"{f}: 3 usable pairs; left out 1 ties, 2 with a label not 0, 0.5 or 1 (first: " \
        f"{f}:4)"
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'empty.jsonl'}: no usable pairs: it has no rows$"):
        data.Preferences(str(tmp_path / "empty.jsonl"))
    f.write_text("".join(json.dumps(r) + "\n" for r in rows[2:5]))
    with pytest.raises(ValueError, match=r"no usable pairs: 1 ties, 2 with a label not 0, 0.5 or 1 \(first: "):
        data.Preferences(str(f))
    empty = write_parquet(tmp_path / "empty.parquet", n=0)  # a shard of no rows: said so, not ""
    with pytest.raises(ValueError, match=r"no usable pairs: it has no rows$"):
        data.Preferences(empty)
    pq = write_parquet(tmp_path / "a.parquet")  # row 3 a tie; dreamlike_only leaves out the rest but rows 1, 2, 4, 5
    assert data.Preferences(pq, dreamlike_only=True).read.endswith("4 usable pairs; left out 1 ties, 5 not both from "
                                                                   "a dreamlike model (--dreamlike_only)")


def test_a_caption_that_is_not_text_is_a_bad_row(tmp_path, sdxl_dir, jsonl, capsys):
    """A null or numeric caption is not trained as "None" or "123": the row is skipped, named by file:line and
    counted like an unreadable image."""
    rows = [json.loads(line) for line in open(jsonl)]
    root = os.path.dirname(jsonl)
    rows = [dict(r, image_0=os.path.join(root, r["image_0"]), image_1=os.path.join(root, r["image_1"])) for r in rows]
    rows[0]["caption"], rows[2]["caption"] = None, 123
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=rf"{f}:1: its caption is None, not text"):
        data.read_pairs(str(f))
    m = run(tmp_path / "run", sdxl_dir, str(f), "--max_bad_frac", "0.5", steps=2)
    printed = capsys.readouterr().out
    assert f"skipping unreadable pair {f}:1 (ValueError: its caption is None, not text)" in printed
    assert f"skipping unreadable pair {f}:3 (ValueError: its caption is 123, not text)" in printed
    assert m[-1]["bad_pairs"] == 2


def test_columns_map_reads_another_preference_set(tmp_path):
    """--columns: a chosen / rejected set (Hugging Face Image structs, no label: the first image preferred) and a
    Pick-a-Pic shard under other names read as the original; a missing mapped column is named in one line."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    src = tiny.write_parquet(tmp_path / "pick.parquet")
    t = pq.read_table(src)
    renamed = t.rename_columns([{"caption": "text", "jpg_0": "a", "jpg_1": "b", "label_0": "pref"}.get(c, c)
                                for c in t.column_names])
    pq.write_table(renamed, tmp_path / "renamed.parquet", row_group_size=4)
    import cli

    def columns(spec):
        return cli.parse_map(spec, "--columns", data.COLUMN_MAP)
    m = columns("caption=text,jpg_0=a,jpg_1=b,label_0=pref")
    a, b = data.Preferences(src), data.Preferences(str(tmp_path / "renamed.parquet"), columns=m)
    assert len(a) == len(b) == 9 and [a.raw(i) for i in range(9)] == [b.raw(i) for i in range(9)]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    chosen = [{"bytes": x, "path": None} for x in t.column("jpg_0").to_pylist()]
    rejected = [{"bytes": x, "path": None} for x in t.column("jpg_1").to_pylist()]
    pq.write_table(pa.table({"prompt": t.column("caption"), "chosen": pa.array(chosen, struct),
                             "rejected": pa.array(rejected, struct)}), tmp_path / "cr.parquet", row_group_size=4)
    c = data.Preferences(str(tmp_path / "cr.parquet"), columns=columns("caption=prompt,jpg_0=chosen,jpg_1=rejected"))
    assert len(c) == 10  # no labels: no ties either
    assert c.raw(2) == (t.column("caption")[2].as_py(), (chosen[2]["bytes"], rejected[2]["bytes"]), None)
    assert c.fingerprint()["digest"] != data.Preferences(src).fingerprint()["digest"]
    with pytest.raises(ValueError, match="no column nope"):
        data.Preferences(str(tmp_path / "cr.parquet"), columns=columns("caption=prompt,jpg_0=chosen,jpg_1=nope"))
    with pytest.raises(ValueError, match="not OURS=THEIRS"):
        columns("prompt=caption")


def test_columns_flag_trains_and_refuses_a_missing_column(tmp_path, sd3_dir, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import dpo
    t = pq.read_table(tiny.write_parquet(tmp_path / "pick.parquet"))
    pq.write_table(pa.table({"prompt": t.column("caption"), "chosen": t.column("jpg_0"),
                             "rejected": t.column("jpg_1")}), tmp_path / "cr.parquet", row_group_size=4)
    m = tiny.run(tmp_path / "run", sd3_dir, str(tmp_path / "cr.parquet"), "--columns",
                 "caption=prompt,jpg_0=chosen,jpg_1=rejected", steps=1)
    assert abs(m[0]["loss"] - math.log(2)) < 1e-6
    err = tiny.cli_error(dpo.main, ["--model", sd3_dir, "--data", str(tmp_path / "cr.parquet"), "--out_dir",
                                    str(tmp_path / "bad"), "--columns", "caption=prompt,jpg_0=chosen,jpg_1=lost"],
                         capsys)
    assert "no column lost" in err and not os.path.exists(tmp_path / "bad" / "checkpoint.pt")


def test_prompt_files_bom_header_and_tables(tmp_path):
    """A byte-order mark is not text, a Prompt header is found in any case, and a table naming no Prompt column is
    refused in one line instead of training on its header and its whole rows."""
    f = tmp_path / "p.tsv"
    f.write_bytes("\ufeffPrompt\tCategory\na cat\tAnimals\na dog\tAnimals\n".encode("utf-8"))
    assert data.read_prompts(str(f)) == [("a cat", "Animals"), ("a dog", "Animals")]
    f.write_bytes("\ufeffa cat\na dog\n".encode("utf-8"))
    assert data.read_prompts(str(f)) == [("a cat", ""), ("a dog", "")]
    f.write_text("prompt\na cat\n")
    assert data.read_prompts(str(f)) == [("a cat", "")]
    f.write_text("Text\tCategory\na cat\tAnimals\n")
    with pytest.raises(ValueError, match=r"^.*p.tsv: a tab-separated file whose first line \('Text\\tCategory'\) "
                                         r"names no Prompt column"):
        data.read_prompts(str(f))
