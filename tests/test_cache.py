"""cache.py: the UNets' inputs from a batch, encoded on the fly or read from the latent cache (the same losses;
a cached run loads no VAE or text encoder), SDXL's time ids (each image's own, or the official constants), latent
samples (the same draw with or without the cache), and Diffusion-RPO's CLIP embeddings (--rpo_clip: against
transformers' CLIPModel, from the images and from the cache, the log, bad input, 2 ranks = 1 rank). RPO's loss
and weights are tested by hand in test_objectives.py."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import cache
import dpo
import objectives
import reward
from tiny import ENV, ROOT, run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_clip_triples_are_transformers_embeddings(clip_dir):
    """Each pair's (prompt, winner, loser) embeddings: transformers' text and image features, unit length."""
    from transformers import CLIPTokenizer
    folder, model = clip_dir
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, 2, 3, 40, 36, generator=g) * 2 - 1  # (B, 2, 3, H, W) in [-1, 1], as the data gives them
    captions = ["a red circle", "a blue square", "a photo of a cat"]
    got = cache.clip_triples(reward.load("clip", folder), pixels, captions)  # (B, 3, P)
    ids = torch.tensor(CLIPTokenizer.from_pretrained(folder)(captions, padding="max_length", max_length=77,
                                                             truncation=True).input_ids)
    px = reward.preprocess((pixels.flatten(0, 1) + 1) / 2, 32)  # CLIP's resize, crop and mean/std
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=px)
    img = F.normalize(out.image_embeds, dim=-1).unflatten(0, (3, 2))  # (B, 2, P)
    want = torch.cat([F.normalize(out.text_embeds, dim=-1)[:, None], img], 1)
    assert got.shape == (3, 3, 16) and (got - want).abs().max() < 1e-5
    w = objectives.rpo_weights(got, 0.5)  # (c_i, x^w_i) against (c_j, x^l_j)
    s = 0.5 * (want[:, 0] @ want[:, 0].T + want[:, 1] @ want[:, 2].T)
    assert torch.allclose(w, torch.softmax(-(1 - s) / 0.5, 1), atol=1e-6)


def test_rpo_trains_with_clip_weights_from_images_and_from_the_cache(tmp_path, sdxl_dir, jsonl, clip_dir, capsys):
    folder = clip_dir[0]
    flags = ("--loss", "rpo", "--no_flip", "--beta", "100", "--rpo_tau", "0.05")  # no flips: the cache freezes one
    a = run(tmp_path / "images", sdxl_dir, jsonl, *flags, "--rpo_clip", folder, steps=2)
    out = capsys.readouterr().out
    assert f"RPO weights: CLIP prompt + image similarity ({folder})" in out and "each weight scales its logit" in out
    assert "is DPO" not in out  # 2 pairs per micro-step: a 2x2 matrix
    b = run(tmp_path / "cache", sdxl_dir, jsonl, *flags, "--rpo_clip", folder, "--cache", steps=2)
    c = run(tmp_path / "text", sdxl_dir, jsonl, *flags, steps=2)
    assert "the UNet's text embeddings of the prompts (no --rpo_clip" in capsys.readouterr().out
    assert abs(a[0]["loss"] - math.log(2)) < 1e-4  # the policy is the reference: every logit 0, any weights
    for x, y in zip(a, b):  # the cache holds the embeddings the images give: the same weights, the same run
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["grad_norm"] == pytest.approx(y["grad_norm"],
                                                                                                   rel=1e-4)
    assert abs(a[0]["grad_norm"] - c[0]["grad_norm"]) > 1e-2 * c[0]["grad_norm"]  # other weights, other gradient
    meta = json.load(open(tmp_path / "cache" / "cache" / "meta.json"))
    assert meta["rpo_clip"] == os.path.abspath(folder)
    from safetensors.torch import load_file
    shard = load_file(str(tmp_path / "cache" / "cache" / meta["shards"][0]))
    assert shard["rpo_clip"].shape[1:] == (3, 16) and torch.allclose(shard["rpo_clip"].norm(dim=-1),
                                                                     torch.ones(1), atol=1e-5)
    run(tmp_path / "one", sdxl_dir, jsonl, *flags, "--batch_size", "1", steps=1)
    assert "RPO over one pair per micro-step (all ranks together) is DPO" in capsys.readouterr().out


def test_bad_input(tmp_path, sdxl_dir, jsonl, clip_dir, capsys):
    folder = clip_dir[0]
    with pytest.raises(SystemExit) as e:  # CLIP weights without RPO
        run(tmp_path / "dpo", sdxl_dir, jsonl, "--rpo_clip", folder, steps=1)
    assert e.value.code == 2 and "--rpo_clip weights RPO's matrix: it needs --loss rpo" in capsys.readouterr().err
    run(tmp_path / "plain", sdxl_dir, jsonl, "--loss", "rpo", "--cache", steps=1)  # a cache without embeddings
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "mixed", sdxl_dir, jsonl, "--loss", "rpo", "--cache", "--rpo_clip", folder, "--cache_dir",
            str(tmp_path / "plain" / "cache"), steps=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "holds no CLIP embeddings of --rpo_clip" in err[0], err
    assert "built without it" in err[0] and not (tmp_path / "mixed" / "checkpoint.pt").exists()
    with pytest.raises(SystemExit) as e:  # not a CLIP folder
        run(tmp_path / "wrong", sdxl_dir, jsonl, "--loss", "rpo", "--rpo_clip", sdxl_dir, steps=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and err[0].startswith("error: "), err


def test_two_ranks_with_clip_weights_match_one_rank(tmp_path, sdxl_dir, jsonl, clip_dir):
    """The weight matrix spans the gathered batch: 2 ranks x 1 pair = 1 rank x 2 pairs, CLIP embeddings included."""
    flags = ["--loss", "rpo", "--rpo_clip", clip_dir[0], "--rpo_tau", "0.05", "--beta", "100", "--device", "cpu"]
    one = run(tmp_path / "one", sdxl_dir, jsonl, *flags, steps=2)  # 1 rank x 2 pairs x 2 micro-steps
    common = ["--model", sdxl_dir, "--data", jsonl, "--resolution", "32", "--grad_accum", "2", "--max_steps", "2",
              "--log_every", "1", "--lr", "1e-4", "--warmup", "0", *flags]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "dpo.py"), *common, "--batch_size", "1", "--out_dir", str(tmp_path / "two")],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is DPO" not in r.stdout  # 1 pair per rank, 2 ranks: a 2x2 matrix
    two = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert len(two) == 2
    for a, b in zip(one, two):
        for k in ("loss", "model_mse", "ref_mse", "implicit_acc"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"]


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


def test_sd15_dpo_cache_then_cache_only(tmp_path, sd15_dir, jsonl, monkeypatch):
    folder = str(tmp_path / "cache")
    first = run(tmp_path / "a", sd15_dir, jsonl, "--cache", "--cache_dir", folder)
    assert abs(first[0]["loss"] - math.log(2)) < 1e-6
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["pairs"] == 8 and meta["downsample"] == 2
    import clip
    import vae
    monkeypatch.setattr(clip, "load", lambda *a, **k: pytest.fail("text encoders loaded although cached"))
    monkeypatch.setattr(vae, "load", lambda *a, **k: pytest.fail("VAE loaded although cached"))
    dpo.main(["--model", sd15_dir, "--cache_dir", folder, "--out_dir", str(tmp_path / "b"), "--resolution", "32",
              "--batch_size", "2", "--grad_accum", "2", "--max_steps", "2", "--log_every", "1",
              "--unet_init", str(tmp_path / "a" / "unet")])  # policy and reference start from run a's UNet
    m = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert abs(m[0]["loss"] - math.log(2)) < 1e-6
    assert m[0]["ref_mse"] != first[0]["ref_mse"]  # the same inputs, a trained reference
    assert os.path.isfile(tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors")


def test_a_cache_of_other_inputs_is_refused_by_name(tmp_path, sdxl_dir, jsonl, capsys):
    """A cache records what it was built from: the same --cache_dir with a model whose VAE weights differ, or at
    another resolution, is refused naming what differs (nothing is trained on the old latents); a copy of the same
    model elsewhere is the same cache."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file
    folder = str(tmp_path / "cache")
    run(tmp_path / "a", sdxl_dir, jsonl, "--cache", "--cache_dir", folder, steps=1)
    capsys.readouterr()
    copy = shutil.copytree(sdxl_dir, tmp_path / "copy")
    m = run(tmp_path / "b", str(copy), jsonl, "--cache", "--cache_dir", folder, steps=1)  # moved files: reused
    assert "building the latent cache" not in capsys.readouterr().out and len(m) == 1
    vae_file = str(copy / "vae" / "diffusion_pytorch_model.safetensors")
    with safe_open(vae_file, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) * 1.01 for k in f.keys()}, f.metadata()
    save_file(tensors, vae_file, metadata=meta)
    for model, flags, what in ((str(copy), (), "vae/ weights "),
                               (sdxl_dir, ("--no_flip",), "--no_flip False (now True)")):
        with pytest.raises(SystemExit) as e:
            run(tmp_path / "c", model, jsonl, "--cache", "--cache_dir", folder, *flags, steps=1)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(err) == 1 and err[0].startswith(
            f"error: the cache in {folder} was built from other inputs: {what}"), err
        assert not (tmp_path / "c" / "metrics.jsonl").exists()
