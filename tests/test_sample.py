"""sample.py against diffusers: schedulers step by step, whole SDXL / SD1.5 text-to-image and SDEdit runs on the
tiny random models (same seeds -> same latents and images), the CLI's files, the implicit-reward evaluation,
and bad input."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion
import sample
import unet as unetlib
from weights import CheckpointError

CFG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def toy_model(x, t):
    """A deterministic stand-in for a UNet, so scheduler chains can be compared without one."""
    return 0.7 * torch.tanh(x) + 0.1 * torch.cos(x * float(t) / 100)


def run_chain(ours, ref, x):
    """The same toy model through our scheduler and diffusers', step by step."""
    y = x.clone()
    for i, t in enumerate(ref.timesteps):
        assert float(ours.timesteps[i]) == float(t)
        x = ref.step(toy_model(ref.scale_model_input(x, t), t), t, x).prev_sample
        y = ours.step(toy_model(ours.scale_input(y, i), ours.timesteps[i]), i, y)
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5 * x.abs().max().item())
    return x


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 4, 30])
def test_euler_matches_diffusers(spacing, pred, steps):
    from diffusers import EulerDiscreteScheduler
    cfg = dict(diffusion.SD_SCHEDULE, **CFG, timestep_spacing=spacing, prediction_type=pred)
    ref = EulerDiscreteScheduler(**CFG, timestep_spacing=spacing, prediction_type=pred)
    ref.set_timesteps(steps)
    ours = sample.Euler(cfg, steps)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=1e-6, atol=0)
    assert abs(float(ours.init_sigma) - float(ref.init_noise_sigma)) <= 1e-6 * float(ref.init_noise_sigma)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * float(ref.init_noise_sigma)
    run_chain(ours, ref, x)
    # add_noise at a later start (SDEdit): the scheduler's sigma at that step
    i = steps // 2
    ref = EulerDiscreteScheduler(**CFG, timestep_spacing=spacing, prediction_type=pred)  # fresh: no step index yet
    ref.set_timesteps(steps)
    ref.set_begin_index(i)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(ours.add_noise(x0, noise, i), ref.add_noise(x0, noise, ref.timesteps[i:i + 1]))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("pred,alpha_one,clip", [("epsilon", False, False), ("v_prediction", False, False),
                                                 ("epsilon", True, True)])
@pytest.mark.parametrize("steps", [1, 4, 30])
def test_ddim_matches_diffusers(spacing, pred, alpha_one, clip, steps):
    from diffusers import DDIMScheduler
    kw = dict(timestep_spacing=spacing, prediction_type=pred, set_alpha_to_one=alpha_one, clip_sample=clip)
    ref = DDIMScheduler(**CFG, **kw)
    ref.set_timesteps(steps)
    ours = sample.DDIM(dict(diffusion.SD_SCHEDULE, **CFG, **kw), steps)
    assert ours.init_sigma == ref.init_noise_sigma == 1.0
    run_chain(ours, ref, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    i = steps // 2
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(ours.add_noise(x0, noise, i), ref.add_noise(x0, noise, ref.timesteps[i:i + 1]))


# ----------------------------------------------------------------------------------------------------
# Whole pipelines vs diffusers on the tiny random models


def diffusers_scheduler(kind):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler
    kw = dict(**CFG, timestep_spacing="leading", prediction_type="epsilon")
    # SD's released configs: no x0 clipping, final alpha = alpha_0 (the tiny folders' configs omit these fields)
    return EulerDiscreteScheduler(**kw) if kind == "euler" else DDIMScheduler(**kw, clip_sample=False,
                                                                               set_alpha_to_one=False)


@pytest.fixture(scope="module")
def models(sdxl_dir, sd15_dir):
    """Per family: (our pipeline, diffusers text-to-image pipeline, diffusers img2img pipeline)."""
    from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline)
    out = {}
    for fam, path, T, I in [("sdxl", sdxl_dir, StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline),
                            ("sd15", sd15_dir, StableDiffusionPipeline, StableDiffusionImg2ImgPipeline)]:
        ref = T.from_pretrained(path)
        i2i = I(**ref.components)
        for p in (ref, i2i):
            p.set_progress_bar_config(disable=True)
        pipe = sample.load(path)
        pipe.progress = False
        out[fam] = pipe, ref, i2i
    return out


def gens(seed, n):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def assert_close(ours, ref):
    """fp32 parity: max abs error <= 1e-4 x the output's scale."""
    scale = max(ref.abs().max().item(), 1.0)
    assert (ours - ref).abs().max().item() <= 1e-4 * scale, (ours - ref).abs().max().item()


@pytest.mark.parametrize("fam", ["sdxl", "sd15"])
@pytest.mark.parametrize("kind", ["euler", "ddim"])
@pytest.mark.parametrize("negative", [None, "a blue dog"])
def test_text_to_image_matches_diffusers(models, fam, kind, negative):
    pipe, ref, _ = models[fam]
    ref.scheduler = diffusers_scheduler(kind)
    prompts = ["a photo of a cat", "a red circle on the square"]
    kw = dict(negative_prompt=[negative] * 2 if negative else None, num_inference_steps=4, guidance_scale=5.0)
    lat = ref(prompts, generator=gens(3, 2), output_type="latent", **kw).images
    img = ref(prompts, generator=gens(3, 2), output_type="pt", **kw).images
    ours = pipe(prompts, negative=negative, steps=4, guidance=5.0, scheduler=kind, seed=3)
    assert ours.shape == img.shape == (2, 3, 32, 32)  # default size: unet sample_size 16 x VAE factor 2
    assert_close(pipe.last_latents, lat)
    assert_close(ours, img)


@pytest.mark.parametrize("fam", ["sdxl", "sd15"])
def test_given_latents_guidance_one_and_non_square(models, fam):
    """latents are the noise before init scaling (as diffusers' latents=); guidance 1 = no CFG; H != W."""
    pipe, ref, _ = models[fam]
    ref.scheduler = diffusers_scheduler("euler")
    noise = torch.randn(1, 4, 24, 16, generator=torch.Generator().manual_seed(9))
    for g in (1.0, 7.5):
        kw = dict(num_inference_steps=3, guidance_scale=g, height=48, width=32, latents=noise.clone())
        lat = ref(["a green square"], output_type="latent", **kw).images
        ours = pipe(["a green square"], steps=3, guidance=g, latents=noise.clone(), height=48, width=32)
        assert ours.shape == (1, 3, 48, 32)
        assert_close(pipe.last_latents, lat)


@pytest.mark.parametrize("fam", ["sdxl", "sd15"])
@pytest.mark.parametrize("kind", ["euler", "ddim"])
def test_sdedit_matches_diffusers_img2img(models, fam, kind, monkeypatch):
    """SDEdit vs diffusers' img2img. The one deliberate difference: we encode the image to its latent MEAN,
    diffusers samples the VAE posterior with the generator; the test makes diffusers use the mean too (so its
    generators then draw exactly our noise), and everything else must match."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    pipe, _, i2i = models[fam]
    i2i.scheduler = diffusers_scheduler(kind)
    init = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = ["a red circle", "a photo of a dog"]
    kw = dict(image=init, strength=0.6, num_inference_steps=5, guidance_scale=5.0)
    lat = i2i(prompts, generator=gens(5, 2), output_type="latent", **kw).images
    img = i2i(prompts, generator=gens(5, 2), output_type="pt", **kw).images
    ours = pipe(prompts, steps=5, guidance=5.0, scheduler=kind, seed=5, init_image=init, strength=0.6)
    assert_close(pipe.last_latents, lat)
    assert_close(ours, img)


@pytest.fixture(scope="module")
def sdxl_f8(tmp_path_factory):
    """The tiny SDXL with a VAE that downsamples by 8, as the real ones: 8k px give latent sides that the UNet's
    two halvings do not divide (40 px -> 5)."""
    import tiny
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    path = tiny.make_sdxl(str(tmp_path_factory.mktemp("sdxl_f8")), vae_channels=(8, 8, 16, 16))
    ref = StableDiffusionXLPipeline.from_pretrained(path)
    i2i = StableDiffusionXLImg2ImgPipeline(**ref.components)
    for p in (ref, i2i):
        p.set_progress_bar_config(disable=True)
        p.scheduler = diffusers_scheduler("euler")
    pipe = sample.load(path)
    pipe.progress = False
    return pipe, ref, i2i


@pytest.mark.parametrize("height, width", [(40, 56), (8, 24), (104, 72)])
def test_every_multiple_of_8_as_diffusers(sdxl_f8, height, width, monkeypatch):
    """Text-to-image and SDEdit at sizes diffusers generates whose latent sides (height / 8) the UNet's
    downsampling does not divide: the UNet upsamples to each skip's size, as diffusers' does."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    pipe, ref, i2i = sdxl_f8
    kw = dict(num_inference_steps=3, guidance_scale=5.0, height=height, width=width)
    lat = ref(["a red circle"], generator=gens(2, 1), output_type="latent", **kw).images
    img = ref(["a red circle"], generator=gens(2, 1), output_type="pt", **kw).images
    ours = pipe(["a red circle"], steps=3, guidance=5.0, seed=2, height=height, width=width)
    assert ours.shape == img.shape == (1, 3, height, width) and lat.shape[-2:] == (height // 8, width // 8)
    assert_close(pipe.last_latents, lat)
    assert_close(ours, img)
    init = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(1))
    kw = dict(image=init, strength=0.6, num_inference_steps=5, guidance_scale=5.0)
    img = i2i(["a red circle"], generator=gens(5, 1), output_type="pt", **kw).images
    ours = pipe(["a red circle"], steps=5, guidance=5.0, seed=5, init_image=init, strength=0.6)
    assert ours.shape == (1, 3, height, width)
    assert_close(ours, img)


@pytest.mark.parametrize("fam", ["sdxl", "sd15"])
def test_single_file_checkpoint(models, fam, sdxl_dir, sd15_dir, tmp_path):
    """One original-layout .safetensors (+ --tokenizer): no scheduler/ or model_index.json, so SD's released
    scheduler settings and SDXL's zero negative embeddings are the defaults; same images as the folder."""
    import clip
    import vae as vaelib
    from safetensors import safe_open
    from safetensors.torch import save_file
    pipe = models[fam][0]
    tensors, meta = {}, {}
    for name, mod, save in [("u", pipe.unet, unetlib.save), ("v", pipe.vae, vaelib.save), ("t", pipe.te, clip.save)]:
        save(mod, str(tmp_path / f"{name}.safetensors"), layout="single")
        with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
            meta.update(f.metadata() or {})
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata=meta)
    single = sample.load(str(tmp_path / "model.safetensors"), tokenizer=sdxl_dir if fam == "sdxl" else sd15_dir)
    single.progress = False
    assert single.sched_cfg == pipe.sched_cfg
    torch.testing.assert_close(single(["a cat"], steps=2, seed=1), pipe(["a cat"], steps=2, seed=1), rtol=0, atol=1e-5)


def test_each_image_reproducible_alone(models):
    pipe = models["sdxl"][0]
    both = pipe(["a red circle", "a blue square"], steps=2, seed=10)
    alone = pipe(["a blue square"], steps=2, seed=11)
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-5)
    assert (both[0] - alone[0]).abs().max() > 1e-3  # different seeds, different images


# ----------------------------------------------------------------------------------------------------
# Command line


def png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_cli_generate_batches_and_names(models, sd15_dir, tmp_path, capsys):
    pipe = models["sd15"][0]
    out = tmp_path / "out"
    sample.main(["--model", sd15_dir, "--prompt", "a red circle", "--prompt", "a cat", "--prompt", "a dog",
                 "--steps", "2", "--seed", "7", "--batch_size", "2", "--scheduler", "ddim", "--out", str(out)])
    printed = capsys.readouterr().out.split()
    names = [f"{i:04d}_seed{7 + i}.png" for i in range(3)]
    assert printed == [str(out / n) for n in names]
    ref = pipe(["a dog"], steps=2, seed=9, scheduler="ddim", guidance=7.5)  # CLI default guidance for SD1.5
    assert np.array_equal(png(out / names[2]), np.asarray(sample.to_pil(ref[0])))


def test_cli_progress_on_stderr(sd15_dir, tmp_path, capsys):
    sample.main(["--model", sd15_dir, "--prompt", "a cat", "--steps", "3", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "sampling: step 1/3" in err and "sampling: step 3/3" in err


@pytest.fixture(scope="module")
def tuned_unet(sd15_dir, tmp_path_factory):
    """The SD1.5 UNet with perturbed weights, saved as dpo.py saves it (out_dir/unet/, diffusers layout)."""
    u = unetlib.load(sd15_dir)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in u.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    out = tmp_path_factory.mktemp("run")
    unetlib.save(u, str(out / "unet"))
    return str(out)


def test_cli_compare_grid(models, sd15_dir, tuned_unet, tmp_path, capsys):
    sample.main(["--model", sd15_dir, "--unet", tuned_unet, "--compare", "--prompt", "a red circle",
                 "--prompt", "a cat", "--steps", "2", "--seed", "3", "--batch_size", "2", "--out", str(tmp_path)])
    path = capsys.readouterr().out.split()[-1]
    g = png(path)
    assert g.shape == (2 * 32 + 4, 2 * 32 + 4, 3)  # rows = prompts, columns = base, tuned
    base = models["sd15"][0](["a red circle", "a cat"], steps=2, seed=3, guidance=7.5)
    tuned = sample.load(sd15_dir, unet=tuned_unet)
    tuned.progress = False
    tuned = tuned(["a red circle", "a cat"], steps=2, seed=3, guidance=7.5)
    for r in range(2):
        assert np.array_equal(g[r * 36:r * 36 + 32, :32], np.asarray(sample.to_pil(base[r])))
        assert np.array_equal(g[r * 36:r * 36 + 32, 36:], np.asarray(sample.to_pil(tuned[r])))
    assert not np.array_equal(g[:32, :32], g[:32, 36:])


def test_cli_sdedit(models, sdxl_dir, tmp_path, capsys):
    init = (np.random.default_rng(0).random((48, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(init).save(tmp_path / "in.png")
    sample.main(["--model", sdxl_dir, "--init_image", str(tmp_path / "in.png"), "--strength", "0.5",
                 "--prompt", "a cat", "--steps", "4", "--out", str(tmp_path / "o")])
    out = png(capsys.readouterr().out.split()[-1])
    assert out.shape == (48, 32, 3)  # keeps the input's size
    ref = models["sdxl"][0](["a cat"], steps=4, init_image=torch.from_numpy(init / 255).float().permute(2, 0, 1),
                            strength=0.5)
    assert np.array_equal(out, np.asarray(sample.to_pil(ref[0])))


# ----------------------------------------------------------------------------------------------------
# Implicit-reward evaluation and AI feedback


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
    sample.main(["--model", sd15_dir, "--eval_pairs", pairs_jsonl, "--eval_k", "2", "--height", "32",
                 "--batch_size", "4", "--out", str(tmp_path)])
    res = json.load(open(tmp_path / "eval.json"))
    assert res["pairs"] == 6 and res["accuracy"] == 0.5 and "baseline_accuracy" not in res  # no --eval_baseline
    lo, hi = res["ci95"]
    assert lo < 0.5 < hi
    assert "accuracy=0.5000" in capsys.readouterr().out


def test_eval_reads_pick_a_pic_parquet_like_jsonl(sd15_dir, tuned_unet, pairs_jsonl, tmp_path):
    """The same pairs as Pick-a-Pic v2 parquet (JPEG bytes replaced by PNG bytes) give the same reward differences."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import data
    rows = [json.loads(line) for line in open(pairs_jsonl)]
    root = os.path.dirname(pairs_jsonl)
    blob = [[open(os.path.join(root, r[k]), "rb").read() for r in rows] for k in ("image_0", "image_1")]
    pq.write_table(pa.table({"caption": [r["caption"] for r in rows], "jpg_0": blob[0], "jpg_1": blob[1],
                             "label_0": [r["label_0"] for r in rows], "label_1": [1 - r["label_0"] for r in rows],
                             "model_0": ["m"] * len(rows), "model_1": ["m"] * len(rows)}), tmp_path / "p.parquet")
    pipe = sample.load(sd15_dir, unet=tuned_unet)
    pipe.progress = False
    ref = unetlib.load(sd15_dir)
    a = sample.implicit_accuracy(pipe, ref, data.read_pairs(pairs_jsonl), k=1, size=32)
    b = sample.implicit_accuracy(pipe, ref, data.read_pairs(str(tmp_path)), k=1, size=32)
    assert a == b and len(a[1]) == 6 and all(d != 0 for d in a[1])


def test_eval_sign_convention(models, pairs_jsonl):
    """A policy that denoises image_0 perfectly (and is the reference elsewhere) has the higher implicit reward
    for image_0 on every pair: accuracy = the fraction of pairs labelled image_0."""
    import data
    pipe = models["sd15"][0]
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

    def encode(images):
        x0["z"] = orig(images)
        return x0["z"]
    pipe.encode_images, pipe.unet = encode, oracle
    try:
        acc, diffs = sample.implicit_accuracy(pipe, ref, pairs, k=2, size=32, batch_size=len(pairs))
    finally:
        pipe.encode_images, pipe.unet = orig, ref
    base, same = sample.implicit_accuracy(pipe, ref, pairs, k=2, size=32, batch_size=len(pairs))  # ref vs itself
    assert all(d > 0 for d in diffs) and all(d == 0 for d in same)
    assert acc == pytest.approx(sum(p["label_0"] == 1.0 for p in pairs) / len(pairs)) and base == 0.5


def shapes_pairs(folder, split, n, rng):
    """Pairs of one red square of random size on white; the larger square is preferred (demo.py's rule)."""
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
    sample.main(["--model", sd15_dir, "--unet", str(tmp_path / "run"), "--eval_pairs", test, "--eval_k", "4",
                 "--height", "32", "--batch_size", "64", "--out", str(tmp_path / "eval"), "--eval_baseline", sd15_dir])
    res = json.load(open(tmp_path / "eval" / "eval.json"))
    print(capsys.readouterr().out)
    assert res["pairs"] == 64 and res["ci95"][0] > 0.5, res
    assert res["baseline_accuracy"] == 0.5  # the base UNet scored against itself (the reference)
    # roles swapped: --eval_baseline gets the same draws, so it reproduces the trained UNet's accuracy exactly
    sample.main(["--model", sd15_dir, "--unet", sd15_dir, "--eval_pairs", test, "--eval_k", "4", "--height", "32",
                 "--batch_size", "64", "--out", str(tmp_path / "swap"), "--eval_baseline", str(tmp_path / "run")])
    swap = json.load(open(tmp_path / "swap" / "eval.json"))
    assert swap["accuracy"] == 0.5 and swap["baseline_accuracy"] == res["accuracy"] and swap["ci95"] != res["ci95"]


def test_wilson_interval():
    lo, hi = sample.wilson(8, 10)  # textbook value: 0.490 .. 0.943
    assert abs(lo - 0.4902) < 1e-4 and abs(hi - 0.9433) < 1e-4
    assert sample.wilson(0, 5)[0] == 0.0 and sample.wilson(5, 5)[1] == 1.0


def test_relabel_with_a_scorer():
    bright, dark = torch.full((3, 8, 8), 0.9), torch.full((3, 8, 8), 0.1)

    def brightness(images, prompts):  # a Scorer: [B,3,H,W] in [0,1], prompts -> [B]
        assert images.shape == (2, 3, 8, 8) and prompts == ["p", "p"]
        return images.mean((1, 2, 3))
    pairs = [{"caption": "p", "image_0": bright, "image_1": dark, "label_0": 0.0},
             {"caption": "p", "image_0": dark, "image_1": bright, "label_0": 1.0},
             {"caption": "p", "image_0": dark, "image_1": dark, "label_0": 1.0}]
    assert [p["label_0"] for p in sample.relabel(pairs, brightness)] == [1.0, 0.0, 0.5]
    assert pairs[0]["label_0"] == 0.0  # the input is not modified


# ----------------------------------------------------------------------------------------------------
# Bad input


def cli_error(argv, capsys):
    """sample.main's one error line (and a non-zero exit); test_evaluate.py uses it too."""
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_cli_bad_input(sd15_dir, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o"), "--steps", "2", "--prompt", "a cat"]
    assert "model path does not exist: /no/such/model" in cli_error(["--model", "/no/such/model"] + out, capsys)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    bad, missing = str(tmp_path / "bad.png"), str(tmp_path / "x.png")
    assert "cannot read image" in cli_error(["--model", sd15_dir, "--init_image", bad] + out, capsys)
    assert "init image not found" in cli_error(["--model", sd15_dir, "--init_image", missing] + out, capsys)
    assert "--strength must be in (0, 1]" in cli_error(["--model", sd15_dir, "--strength", "1.5"] + out, capsys)
    assert "invalid choice: 'foo'" in cli_error(["--model", sd15_dir, "--scheduler", "foo"] + out, capsys)
    assert "--compare needs --unet" in cli_error(["--model", sd15_dir, "--compare"] + out, capsys)
    assert "give --prompt" in cli_error(["--model", sd15_dir, "--out", str(tmp_path)], capsys)
    nodata = str(tmp_path / "none.parquet")
    assert "no data at" in cli_error(["--model", sd15_dir, "--eval_pairs", nodata] + out, capsys)
    assert "UNet path does not exist" in cli_error(["--model", sd15_dir, "--unet", "/no/unet"] + out, capsys)
    assert "go with --eval_pairs" in cli_error(["--model", sd15_dir, "--eval_baseline", sd15_dir] + out, capsys)


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
        sample.main(["--model", sd15_dir, "--eval_pairs", str(bad), "--eval_k", "1", "--height", "32",
                     "--batch_size", "1", "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "eval: 2/6 pairs" in err  # the progress line came first
    last = err.splitlines()[-1]
    assert last.startswith(f"error: {bad}:3: cannot read an image of the pair: ") and "broken.png" in last, err


def test_api_bad_input(models):
    pipe = models["sd15"][0]
    with pytest.raises(CheckpointError, match="model path does not exist"):
        sample.load("/no/such/model")
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        pipe(["a cat"], strength=0.0, init_image=torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="leaves no denoising step"):
        pipe(["a cat"], steps=2, strength=0.3, init_image=torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="unknown scheduler 'pndm'"):
        pipe(["a cat"], scheduler="pndm")
    for h, w in ((36, 32), (32, 0), (-8, 32)):  # diffusers' rule: positive multiples of 8 (40 is fine, see above)
        with pytest.raises(ValueError, match="height and width must be positive multiples of 8"):
            pipe(["a cat"], height=h, width=w)
    with pytest.raises(ValueError, match="image is smaller than 8x8 pixels"):  # SDEdit from a 4x6 image
        pipe(["a cat"], init_image=torch.rand(1, 3, 4, 6))
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 4, 16, 16\)"):
        pipe(["a cat"], latents=torch.randn(1, 4, 8, 8))
