"""Data as the paper used it, and the objectives beside dpo_loss: Pick-a-Pic splits, the windowed shuffle,
IPO / hinge / MaPO / KTO against formulas written out independently (value and gradient, fp64 by hand), each on
every data path and under DDP, single-image data for KTO, the official-compatibility switches, and the model's own
size as the default resolution."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import data
import dpo
import tiny
from test_dpo import ENV, ROOT, run, write_parquet

pytestmark = pytest.mark.usefixtures("one_thread")


def _grad(fn, model):
    x = model.clone().double().requires_grad_(True)
    fn(x).backward()
    return x.grad


def _check(ours, theirs, model):
    """The loss and its gradient with respect to the policy's predictions, ours against the written-out formula."""
    x = model.clone().requires_grad_(True)
    loss = ours(x)
    loss.backward()
    want = theirs(model.double().clone().requires_grad_(False))
    g_want = _grad(theirs, model)
    assert abs(loss.item() - want.item()) < 1e-6 * max(1.0, abs(want.item())), (loss.item(), want.item())
    assert (x.grad.double() - g_want).abs().max() < 1e-5 * g_want.abs().max()


@pytest.mark.parametrize("form", ["ipo", "hinge"])
def test_ipo_and_hinge_by_hand(form):
    model, ref, noise = tiny.preds(B=4)
    beta, B = 40.0, 4
    e = torch.cat([noise, noise]).double()

    def theirs(x):
        m = ((x - e) ** 2).flatten(1).mean(1)
        r = ((ref.double() - e) ** 2).flatten(1).mean(1)
        h = -0.5 * ((m[:B] - m[B:]) - (r[:B] - r[B:]))  # the log-likelihood-ratio margin, official convention
        if form == "ipo":  # Azar et al.: (h - 1/(2 tau))^2 with tau = beta
            return ((h - 1 / (2 * beta)) ** 2).mean()
        return torch.clamp(1 - beta * h, min=0).mean()  # max(0, 1 - beta h)
    _check(lambda x: dpo.dpo_loss(x, ref, noise, beta, form)[0], theirs, model)


def test_mapo_by_hand():
    model, _, noise = tiny.preds(B=4, seed=1)
    beta, T, w, B = 0.1, 1000, 0.5, 4
    target = torch.cat([noise, noise])

    def theirs(x):
        m = ((x - target.double()) ** 2).flatten(1).mean(1)
        s = w * m / (torch.exp(w * m) - 1)
        return m[:B].mean() - beta * torch.log(torch.sigmoid(T * (s[:B] - s[B:]))).mean()
    _check(lambda x: dpo.mapo_loss(x, target, beta, T)[0], theirs, model)


@pytest.mark.parametrize("shift", [0.0, 0.05])  # 0.05: the batch's mean reward > 0, so the reference point is used
def test_kto_by_hand(shift):
    model, ref, noise = tiny.preds(B=4, seed=2)
    target = torch.cat([noise, noise])
    ref = ref + shift * torch.randn_like(ref)  # a worse reference: positive rewards
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0])
    beta = 30.0

    def theirs(x):
        m = ((x - target.double()) ** 2).flatten(1).mean(1)
        r = ((ref.double() - target.double()) ** 2).flatten(1).mean(1)
        g = r - m
        z = max(0.0, g.detach().mean().item())
        h = torch.where(labels.bool(), torch.sigmoid(beta * (g - z)), torch.sigmoid(beta * (z - g)))
        return (1 - h).mean()
    _check(lambda x: dpo.kto_loss(x, ref, target, beta, labels)[0], theirs, model)


# ----------------------------------------------------------------------------------------------------
# Data: splits, the shuffle, single images


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
    train = data.Pairs(root)  # train only: 2 x 9 usable pairs (a tie per shard)
    assert len(train) == 18 and all("train-" in f for f in train.files)
    assert "2 train shard(s)" in train.read and "not read: validation (1)" in train.read and "18 usable" in train.read
    val = data.Pairs(str(tmp_path / "pap"), split="validation")  # the folder above works too
    assert len(val) == 5 and all("validation-" in f for f in val.files)
    with pytest.raises(ValueError, match=r"--split test matches no shard in .* \(its splits: train, validation\)"):
        data.Pairs(root, split="test")
    plain = _pick_a_pic(tmp_path / "plain", {"a.parquet": 10, "b.parquet": 10})  # no split names: read whole
    assert len(data.Pairs(plain)) == 18 and "no split in their names: all read" in data.Pairs(plain).read
    folders = tmp_path / "folders"  # splits as folders
    _pick_a_pic(folders / "train", {"x.parquet": 10})
    _pick_a_pic(folders / "test", {"y.parquet": 10})
    assert [os.path.basename(f) for f in data.Pairs(str(folders)).files] == ["x.parquet"]
    assert data.Pairs(str(tmp_path / "pap" / "data" / "*.parquet"), split="validation").files == val.files


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
    pairs = data.Pairs(root)
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
    real = data._pq().ParquetFile.read_row_group

    def read_row_group(self, i, **kw):
        reads.append(i)
        return real(self, i, **kw)
    monkeypatch.setattr(data._pq().ParquetFile, "read_row_group", read_row_group)
    for i in first:  # a whole epoch in the order training reads it: each row group decoded once
        pairs.raw(i)
    assert len(reads) == len(set(groups))


def test_kto_on_single_images_and_on_pairs(tmp_path, sdxl_dir, jsonl, capsys):
    src = [json.loads(line) for line in open(jsonl)]
    root = os.path.dirname(jsonl)
    singles = tmp_path / "singles.jsonl"
    with open(singles, "w") as f:  # each pair as two records, paths made absolute
        for r in src:
            for k, label in ((0, 1), (1, 0)):
                f.write(json.dumps({"caption": r["caption"], "image": os.path.join(root, r[f"image_{k}"]),
                                    "label": label}) + "\n")
    p = data.Pairs(str(singles))
    assert p.singles and len(p) == 18 and p.raw(0)[2] == 1 and len(p.raw(0)[1]) == 1
    m = run(tmp_path / "kto1", sdxl_dir, str(singles), "--loss", "kto", steps=2)
    assert abs(m[0]["loss"] - 0.5) < 1e-6 and all(math.isfinite(r["loss"]) for r in m)  # 1 - sigmoid(0) at step 0
    m = run(tmp_path / "kto2", sdxl_dir, jsonl, "--loss", "kto", "--cache", steps=2)  # pairs as two records
    assert abs(m[0]["loss"] - 0.5) < 1e-6
    for flags in ((), ("--cache",)):
        with pytest.raises(SystemExit):
            run(tmp_path / "dpo", sdxl_dir, str(singles), *flags, steps=1)
        err = capsys.readouterr().err.strip()
        assert err == f"error: {singles} holds single labelled images: train them with --loss kto"
        assert not (tmp_path / "dpo" / "cache").exists()  # refused before anything is written
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(singles.read_text().splitlines()[0] + "\n" + json.dumps(src[0]) + "\n")
    with pytest.raises(ValueError, match=rf"{mixed}:2: pairs and single images mixed in one file"):
        data.Pairs(str(mixed))


@pytest.mark.parametrize("loss", ["ipo", "hinge", "mapo", "kto", "rpo", "sft"])
def test_every_objective_on_every_data_path(tmp_path, sdxl_dir, sd15_dir, jsonl, loss):
    """JSONL images, the latent cache, parquet; SDXL and SD1.5. The step-0 loss is what the formula gives when
    the policy equals the reference."""
    at_zero = {"ipo": (1 / (2 * 5000.0)) ** 2, "hinge": 1.0, "kto": 0.5, "rpo": math.log(2)}
    pq = write_parquet(tmp_path / "a.parquet")
    for k, (model, data_path, flags) in enumerate([(sdxl_dir, jsonl, ()), (sdxl_dir, jsonl, ("--cache",)),
                                                   (sd15_dir, pq, ("--optimizer", "adamw"))]):
        m = run(tmp_path / f"run{k}", model, data_path, "--loss", loss, *flags, steps=2)
        assert all(math.isfinite(r["loss"]) for r in m) and len(m) == 2
        if loss in at_zero:
            assert m[0]["loss"] == pytest.approx(at_zero[loss], rel=1e-5)
    if loss == "mapo":  # reference-free: no second UNet
        assert "ref_mse" not in m[0] or m[0]["ref_mse"] is None


def test_every_objective_under_ddp_matches_one_process(tmp_path, sdxl_dir, jsonl):
    """One torchrun of 2 ranks x 1 pair trains each objective in turn (tests/ddp_runs.py); each equals the same
    objective on 1 rank x 2 pairs."""
    losses = ["ipo", "hinge", "mapo", "kto"]
    common = ["--model", sdxl_dir, "--data", jsonl, "--resolution", "32", "--grad_accum", "2", "--max_steps", "2",
              "--log_every", "1", "--lr", "1e-4", "--warmup", "0", "--device", "cpu", "--batch_size", "1"]
    runs = []
    for loss in losses:  # small beta: eq. 14 multiplies fp32 rounding of the MSEs by beta/2
        runs += ["::", "--loss", loss, "--beta", str(dpo.BETA[loss] * 0.02), "--out_dir", str(tmp_path / f"two_{loss}")]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "tests", "ddp_runs.py"), *common, *runs],
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for loss in losses:
        beta = dpo.BETA[loss] * 0.02  # small beta: eq. 14 multiplies fp32 rounding of the MSEs by beta/2
        one = run(tmp_path / f"one_{loss}", sdxl_dir, jsonl, "--device", "cpu", "--loss", loss, "--beta", str(beta),
                  steps=2)
        two = [json.loads(line) for line in open(tmp_path / f"two_{loss}" / "metrics.jsonl")]
        for a, b in zip(one, two):
            for k in ("loss", "model_mse"):
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (loss, k, a, b)
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (loss, a, b)


# ----------------------------------------------------------------------------------------------------
# The official code's choices, behind switches; the model's own size


def test_time_ids_official_and_latents_sample(tmp_path, sdxl_dir, jsonl, monkeypatch):
    import unet as unetlib
    seen = []
    real_load = unetlib.load

    def spy(*a, **k):
        u = real_load(*a, **k)
        fwd = u.forward

        def forward(x, t, ctx, pooled=None, time_ids=None):
            seen.append((x.detach().clone(), time_ids))
            return fwd(x, t, ctx, pooled, time_ids)
        u.forward = forward
        return u
    monkeypatch.setattr(unetlib, "load", spy)
    run(tmp_path / "official", sdxl_dir, jsonl, "--time_ids", "official", steps=1)
    assert all(torch.equal(ids, torch.tensor([[32.0, 32, 0, 0, 32, 32]]).expand(len(ids), 6)) for _, ids in seen)
    seen.clear()
    run(tmp_path / "image", sdxl_dir, jsonl, steps=1)
    assert any(not torch.equal(ids[:, :2], torch.full_like(ids[:, :2], 32.0)) for _, ids in seen)  # true sizes
    # --latents sample: z = mean + std * n with n keyed by the position: the same draw with or without the cache
    # (no flips: the cache freezes one crop and flip per pair, the images path draws them per position)
    a = run(tmp_path / "sample", sdxl_dir, jsonl, "--latents", "sample", "--no_flip", steps=1)
    b = run(tmp_path / "sample_cache", sdxl_dir, jsonl, "--latents", "sample", "--no_flip", "--cache", steps=1)
    c = run(tmp_path / "mean", sdxl_dir, jsonl, "--no_flip", steps=1)
    d = run(tmp_path / "mean_cache", sdxl_dir, jsonl, "--no_flip", "--cache", steps=1)
    assert a[0]["model_mse"] == pytest.approx(b[0]["model_mse"], rel=1e-5)
    assert c[0]["model_mse"] == pytest.approx(d[0]["model_mse"], rel=1e-5)
    assert abs(a[0]["model_mse"] - c[0]["model_mse"]) > 1e-4 * c[0]["model_mse"]  # other latents, other errors
    with pytest.raises(SystemExit):  # a cache of means cannot give samples
        run(tmp_path / "mixed", sdxl_dir, jsonl, "--latents", "sample", "--cache", "--cache_dir",
            str(tmp_path / "mean_cache" / "cache"), steps=1)


def test_default_resolution_is_the_models_own(tmp_path, sdxl_dir, jsonl, capsys):
    """No --resolution: the UNet's sample_size x the VAE's downsampling (the tiny SDXL: 16 x 2 = 32 px)."""
    dpo.main(["--model", sdxl_dir, "--data", jsonl, "--out_dir", str(tmp_path / "run"), "--batch_size", "2",
              "--grad_accum", "1", "--max_steps", "1", "--log_every", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "pairs, 32px" in out
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["args"]["resolution"] == 32
    import vae as vaelib
    folder = tiny.make_sdxl(str(tmp_path / "f8"), vae_channels=(8, 8, 16, 16))
    assert vaelib.downsample(folder) == 8 and vaelib.downsample(sdxl_dir) == 2


def test_bench_data_measures_the_three_orders(tmp_path, capsys):
    """bench_data.py at toy size: its synthetic folder is Pick-a-Pic's layout, and the numbers it reports are the
    orders' properties (one decode per row group for block and window; micro-batches from one group for block)."""
    import bench_data
    bench_data.make(str(tmp_path), shards=2, groups=3, rows=8, size=32)
    pairs = data.Pairs(str(tmp_path))
    assert len(pairs) == 48 and len(pairs.files) == 2 and "2 train shard(s)" in pairs.read
    for order in ("block", "window", "uniform"):
        rate, decodes, micro, step = bench_data.measure(str(tmp_path), order, 48, 32)
        assert rate > 0 and math.isnan(step)  # fewer than 2048 pairs: no whole step
        if order != "uniform":
            assert decodes == pytest.approx(100 * 6 / 48)  # each of the 6 row groups once in an epoch
        if order == "block":
            assert micro <= 2.0
    assert micro > 2.0  # uniform: a micro-batch of 16 spans many of the 6 groups
    capsys.readouterr()
    bench_data.main([str(tmp_path), "--pairs", "8", "--resolution", "32"])
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["order", "pairs/s", "decodes/100", "pairs", "groups/16", "pairs", "groups/2048", "pairs"]
    assert [line.split()[0] for line in out[2:5]] == ["block", "window", "uniform"]
