"""Diffusion-RPO's CLIP weights (--rpo_clip): the embeddings against transformers' CLIPModel, training from the
images and from the cache (the same weights, the same losses), the log, and bad input. The loss itself and the
weights' formula are tested by hand in test_dpo.py."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data
import dpo
import reward
from test_dpo import ENV, ROOT, run
from test_reward import _make

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny transformers CLIPModel folder (32 px images) with its tokenizer, and the model itself."""
    folder, model, _ = _make(str(tmp_path_factory.mktemp("rpo_clip")), "quick_gelu")
    return folder, model


def test_clip_triples_are_transformers_embeddings(clip_dir):
    """Each pair's (prompt, winner, loser) embeddings: transformers' text and image features, unit length."""
    from transformers import CLIPTokenizer
    folder, model = clip_dir
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, 2, 3, 40, 36, generator=g) * 2 - 1  # (B, 2, 3, H, W) in [-1, 1], as the data gives them
    captions = ["a red circle", "a blue square", "a photo of a cat"]
    got = data.clip_triples(reward.load("clip", folder), pixels, captions)  # (B, 3, P)
    ids = torch.tensor(CLIPTokenizer.from_pretrained(folder)(captions, padding="max_length", max_length=77,
                                                             truncation=True).input_ids)
    px = reward.preprocess((pixels.flatten(0, 1) + 1) / 2, 32)  # CLIP's resize, crop and mean/std
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=px)
    img = F.normalize(out.image_embeds, dim=-1).unflatten(0, (3, 2))  # (B, 2, P)
    want = torch.cat([F.normalize(out.text_embeds, dim=-1)[:, None], img], 1)
    assert got.shape == (3, 3, 16) and (got - want).abs().max() < 1e-5
    w = dpo.rpo_weights(got, 0.5)  # (c_i, x^w_i) against (c_j, x^l_j)
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
