"""sample.py against diffusers: whole SDXL / SD1.5 text-to-image and SDEdit runs on the tiny random models (same
seeds -> same latents and images, every multiple of 8 px, single files), the CLI's files and names, the prompt sets
(PartiPrompts built in, slices naming their images as the whole set), and bad input."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import images
import sample
import tiny
import unet as unetlib
from weights import CheckpointError


def cli_error(argv, capsys):
    """sample.main's one error line (and a non-zero exit)."""
    return tiny.cli_error(sample.main, argv, capsys)


# ----------------------------------------------------------------------------------------------------
# Whole pipelines vs diffusers on the tiny random models


def diffusers_scheduler(kind):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler
    kw = dict(**tiny.SD_SCHEDULER, timestep_spacing="leading", prediction_type="epsilon")
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
    assert np.array_equal(png(out / names[2]), np.asarray(images.to_pil(ref[0])))


def test_cli_progress_on_stderr(sd15_dir, tmp_path, capsys):
    sample.main(["--model", sd15_dir, "--prompt", "a cat", "--steps", "3", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "sampling: step 1/3" in err and "sampling: step 3/3" in err


def test_cli_sdedit(models, sdxl_dir, tmp_path, capsys):
    init = (np.random.default_rng(0).random((48, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(init).save(tmp_path / "in.png")
    sample.main(["--model", sdxl_dir, "--init_image", str(tmp_path / "in.png"), "--strength", "0.5",
                 "--prompt", "a cat", "--steps", "4", "--out", str(tmp_path / "o")])
    out = png(capsys.readouterr().out.split()[-1])
    assert out.shape == (48, 32, 3)  # keeps the input's size
    ref = models["sdxl"][0](["a cat"], steps=4, init_image=torch.from_numpy(init / 255).float().permute(2, 0, 1),
                            strength=0.5)
    assert np.array_equal(out, np.asarray(images.to_pil(ref[0])))


# ----------------------------------------------------------------------------------------------------
# Implicit-reward evaluation and AI feedback


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_cli_bad_input(sd15_dir, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o"), "--steps", "2", "--prompt", "a cat"]
    assert "model path does not exist: /no/such/model" in cli_error(["--model", "/no/such/model"] + out, capsys)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    bad, missing = str(tmp_path / "bad.png"), str(tmp_path / "x.png")
    assert "cannot read image" in cli_error(["--model", sd15_dir, "--init_image", bad] + out, capsys)
    assert "init image not found" in cli_error(["--model", sd15_dir, "--init_image", missing] + out, capsys)
    assert "--strength must be in (0, 1]" in cli_error(["--model", sd15_dir, "--strength", "1.5"] + out, capsys)
    assert "invalid choice: 'foo'" in cli_error(["--model", sd15_dir, "--scheduler", "foo"] + out, capsys)
    assert "give --prompt" in cli_error(["--model", sd15_dir, "--out", str(tmp_path)], capsys)
    assert "UNet path does not exist" in cli_error(["--model", sd15_dir, "--unet", "/no/unet"] + out, capsys)
    assert "LoRA" in cli_error(["--model", sd15_dir, "--lora", "/dev/null"] + out, capsys)
    assert not os.path.exists(tmp_path / "o")  # a failed run leaves no empty --out behind


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


def test_parti_prompts_built_in():
    rows = data.read_prompts("parti")
    assert len(rows) == 1632 and rows[0] == ("bond", "Abstract")
    counts = {c: sum(1 for _, k in rows if k == c) for c in dict.fromkeys(k for _, k in rows)}
    assert len(counts) == 12 and counts["Animals"] == 314 and counts["World Knowledge"] == 214
    assert sum('"' in p for p, _ in rows) == 22  # quotes inside prompts are kept as they are
    assert os.path.isfile(os.path.join(os.path.dirname(data.PARTI), "LICENSE"))
    a = sample.parse_args(["--model", "m", "--prompts", "parti", "--per_category", "2", "--seed", "1"])
    items = sample.prompt_items(a)
    assert len(items) == 24 and {it["category"] for it in items} == set(counts)
    whole = {it["name"]: it for it in sample.prompt_items(sample.parse_args(["--model", "m", "--prompts", "parti",
                                                                             "--seed", "1"]))}
    assert all(whole[it["name"]] == it for it in items)  # the slice's images are the whole set's
