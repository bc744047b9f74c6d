"""Qwen-Image and Z-Image as whole pipelines: the text side against the pipelines' encode_prompt, sampling against
QwenImagePipeline / ZImagePipeline, training (log 2 at step 0 in fp32 and bf16, resume, --cache, LoRA that diffusers
loads), the online losses, and the refusals of what does not fit."""
import math
import os

import pytest
import torch

import clip
import families
import flux
import lora
import sample
import tiny
import vae
from tiny import spy_on
from weights import CheckpointError

PROMPTS = ["a photo of a cat", "a red dog on the mat, a photo"]


def folder_of(request, family):
    return request.getfixturevalue({"qwen-image": "qwen_image_dir", "z-image": "z_image_dir"}[family])


def diffusers_pipe(folder, family):
    from diffusers import QwenImagePipeline, ZImagePipeline
    pipe = (QwenImagePipeline if family == "qwen-image" else ZImagePipeline).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["qwen-image", "z-image"])
def test_text_side_equals_the_pipelines_encode_prompt(request, family):
    """clip.load's (context, mask) = encode_prompt's padded states and mask (Qwen-Image), or its list of each
    prompt's real tokens (Z-Image); the record's family, the context's width = the transformer's."""
    folder = folder_of(request, family)
    te = clip.load(folder)
    assert te.family is families.of(folder) and te.family.name == family
    with torch.no_grad():
        ctx, mask = te.encode(PROMPTS)
        pipe = diffusers_pipe(folder, family)
        if family == "qwen-image":
            want, want_mask = pipe.encode_prompt(PROMPTS, device="cpu")
            want_mask = torch.ones(want.shape[:2], dtype=torch.bool) if want_mask is None else want_mask.bool()
            assert ctx.shape == want.shape and torch.equal(mask, want_mask)
            assert (ctx - want).abs().max() <= 1e-5 * want.abs().max()
        else:
            want, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
            assert mask.sum(1).tolist() == [len(w) for w in want] and ctx.shape[1] == max(len(w) for w in want)
            for row, m, w in zip(ctx, mask, want):
                assert (row[m] - w).abs().max() <= 1e-5 * w.abs().max() and not row[~m].any()
    width = te.family.text.width(te.family.read_config(folder))
    assert ctx.shape[-1] == width


def test_qwen_image_vae_scales_per_channel_as_the_pipeline(qwen_image_dir):
    """vae.load reads AutoencoderKLQwenImage; scale() = (z - latents_mean) / latents_std, per channel."""
    from diffusers import AutoencoderKLQwenImage
    v, ref = vae.load(qwen_image_dir), AutoencoderKLQwenImage.from_pretrained(qwen_image_dir, subfolder="vae")
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = v.encode(img)
        want = ref.encode(img[:, :, None]).latent_dist.mean[:, :, 0]
        assert (z - want).abs().max() < 1e-4
        mean = torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(ref.config.latents_std).view(1, -1, 1, 1)
        assert torch.allclose(v.scale(z), (z - mean) / std, atol=1e-6)
        assert torch.allclose(v.unscale(v.scale(z)), z, atol=1e-5)
    assert vae.downsample(qwen_image_dir) == 8


@pytest.mark.parametrize("family,negative,guidance,steps,size", [
    ("qwen-image", " ", 4.0, 3, (32, 32)), ("qwen-image", None, 4.0, 2, (32, 48)),
    ("z-image", None, 5.0, 3, (32, 32)), ("z-image", "blurry", 2.0, 2, (48, 32)), ("z-image", None, 0.0, 2, (32, 32))])
def test_sampler_equals_the_diffusers_pipeline(request, family, negative, guidance, steps, size):
    """sample.load(path)(...) = QwenImagePipeline (true CFG with its renorm only with a negative prompt, the dynamic
    shift and shift_terminal) / ZImagePipeline (cond + g (cond - uncond), off at 0), from the same initial noise."""
    folder = folder_of(request, family)
    ours, ref = sample.load(folder), diffusers_pipe(folder, family)
    ours.progress = False
    h, w = size
    f = ours.f
    latents = torch.randn(1, 16, h // f, w // f, generator=torch.Generator().manual_seed(steps))
    if family == "qwen-image":
        want = ref(PROMPTS[0], negative_prompt=negative, true_cfg_scale=guidance, num_inference_steps=steps,
                   height=h, width=w, latents=flux.pack(latents), output_type="pt").images
    else:
        want = ref(PROMPTS[0], negative_prompt=negative, guidance_scale=guidance, num_inference_steps=steps,
                   height=h, width=w, latents=latents, output_type="pt").images
    got = ours(PROMPTS[0], negative=negative, steps=steps, guidance=guidance, height=h, width=w, latents=latents)
    assert got.shape == want.shape == (1, 3, h, w)
    assert (got - want).abs().max() < 2e-3


# ----------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("family", ["qwen-image", "z-image"])
def test_run_starts_at_log2_and_leaves_a_transformer_diffusers_loads(request, tmp_path, jsonl, monkeypatch, family):
    """fp32: log 2 at step 0, the reference frozen, winner and loser of a pair share sigma and prompt (states and
    mask); the saved transformer/ is the policy and diffusers' class loads it."""
    folder = folder_of(request, family)
    fam = families.of(folder)
    loaded, calls = spy_on(monkeypatch, fam.module)
    m = tiny.run(tmp_path, folder, jsonl)
    assert abs(m[0]["loss"] - math.log(2)) < 1e-6 and math.isfinite(m[-1]["loss"]) and len(m) == 2
    policy, ref = loaded[0], loaded[1]
    base = families.load(folder)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), base.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), base.state_dict().values()))
    for t, cond in calls:
        B = len(t) // 2
        assert len(cond) == 2 and cond[1].dtype == torch.bool and cond[1].shape == cond[0].shape[:2]
        assert torch.equal(t[:B], t[B:]) and torch.equal(cond[0][:B], cond[0][B:]) and torch.equal(cond[1][:B],
                                                                                                    cond[1][B:])
    for name in getattr(policy, "unused", list)():  # Qwen-Image's last text path feeds nothing: not trained
        assert torch.equal(policy.get_parameter(name), base.get_parameter(name))
    out = os.path.join(tmp_path, "transformer")
    ours = families.load(out)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), policy.state_dict().values()))
    import diffusers
    hf = getattr(diffusers, fam.diffusers_class).from_pretrained(out)
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in ours.parameters())


@pytest.mark.parametrize("family", ["qwen-image", "z-image"])
def test_bf16_reference_equals_policy_at_step0(request, tmp_path, jsonl, family):
    m = tiny.run(tmp_path, folder_of(request, family), jsonl, "--dtype", "bf16", steps=1)
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-7) and m[0]["model_mse"] == m[0]["ref_mse"]


@pytest.mark.parametrize("family", ["qwen-image", "z-image"])
def test_resume_is_bit_exact_and_cache_equals_no_cache(request, tmp_path, jsonl, family):
    """--resume continues bit for bit; --cache (states and masks padded to one length per shard) = encoding each
    batch (padding to other lengths changes nothing)."""
    folder = folder_of(request, family)
    full = tiny.run(tmp_path / "full", folder, jsonl, "--ckpt_every", "2", "--no_flip", steps=4)
    tiny.run(tmp_path / "cut", folder, jsonl, "--ckpt_every", "2", "--no_flip", steps=2)
    resumed = tiny.run(tmp_path / "cut", folder, jsonl, "--ckpt_every", "2", "--no_flip", "--resume", steps=4)
    keys = ("step", "loss", "implicit_acc", "model_mse", "ref_mse", "grad_norm")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]
    cached = tiny.run(tmp_path / "cached", folder, jsonl, "--cache", "--no_flip", steps=4)
    for a, b in zip(full, cached):
        for k in ("loss", "model_mse", "ref_mse", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), k


@pytest.mark.parametrize("family", ["qwen-image", "z-image"])
def test_lora_loads_in_diffusers_and_equals_the_merged_transformer(request, tmp_path, jsonl, family):
    """The LoRA file (the record's targets: diffusers' LoRA scripts' to_q, to_k, to_v, to_out.0) loads into the
    diffusers pipeline, whose transformer then equals our merged transformer/."""
    folder = folder_of(request, family)
    tiny.run(tmp_path, folder, jsonl, "--lora", "4", "--lr", "1e-2")
    from safetensors.torch import load_file
    keys = list(load_file(str(tmp_path / "lora" / lora.FILE)))
    assert keys and all(k.startswith("transformer.") for k in keys)
    targets = families.of(folder).lora_targets
    assert all(k.split(".lora_")[0].endswith(targets) for k in keys)
    assert {t for t in targets if any(k.split(".lora_")[0].endswith(t) for k in keys)} == set(targets)
    pipe = diffusers_pipe(folder, family)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    import diffusers
    cls = getattr(diffusers, families.of(folder).diffusers_class)
    merged = cls.from_pretrained(str(tmp_path / "transformer"))
    base = cls.from_pretrained(folder, subfolder="transformer")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 4, 4, generator=g)
    width = families.of(folder).text.width(merged.config)
    ctx = torch.randn(1, 7, width, generator=g)

    def out(m):
        with torch.no_grad():
            if family == "qwen-image":
                return m(flux.pack(x), ctx, torch.ones(1, 7), torch.tensor([0.5]), [[(1, 2, 2)]]).sample
            return torch.stack(m([x[0, :, None]], torch.tensor([0.5]), [ctx[0]]).sample)
    lora_out, merged_out, base_out = out(pipe.transformer), out(merged), out(base)
    assert (lora_out - merged_out).abs().max() < 1e-4
    assert (merged_out - base_out).abs().max() > 1e-3  # the adapters changed something


@pytest.mark.parametrize("family", ["qwen-image", "z-image"])
def test_two_ranks_ddp_and_fsdp_equal_one_process(request, tmp_path, jsonl, family):
    """2 ranks x 1 pair = 1 rank x 2 pairs under DDP (full: Qwen-Image's unused last text path left out of
    training), FSDP2 over the record's blocks (full and LoRA); FSDP's gathered transformer = one process's."""
    import json
    import subprocess
    import sys
    folder = folder_of(request, family)
    one = tiny.run(tmp_path / "one", folder, jsonl, "--device", "cpu", steps=2)
    one_lora = tiny.run(tmp_path / "one_lora", folder, jsonl, "--device", "cpu", "--lora", "4", steps=2)
    common = ["--model", folder, "--data", jsonl, "--resolution", "32", "--grad_accum", "2", "--max_steps", "2",
              "--log_every", "1", "--lr", "1e-4", "--warmup", "0", "--batch_size", "1", "--device", "cpu"]
    runs = [["--out_dir", tmp_path / "ddp"], ["--out_dir", tmp_path / "fsdp", "--fsdp"],
            ["--out_dir", tmp_path / "fsdp_lora", "--fsdp", "--lora", "4"]]
    argv = [str(a) for flags_ in runs for a in ["::", *flags_]]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(tiny.ROOT, "tests", "ddp_runs.py"), *common, *argv],
                       env=tiny.ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for ref, name in ((one, "ddp"), (one, "fsdp"), (one_lora, "fsdp_lora")):
        got = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        assert len(got) == 2
        for a, b in zip(ref, got):
            for k in ("loss", "model_mse", "ref_mse", "implicit_acc"):
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (name, k, a, b)
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (name, a, b)
    base = families.load(folder).state_dict()
    for name in ("ddp", "fsdp"):
        a, b = families.load(str(tmp_path / name)).state_dict(), families.load(str(tmp_path / "one")).state_dict()
        assert max((a[k] - b[k]).abs().max() for k in base) <= 1e-5 * max(b[k].abs().max() for k in base), name


# ----------------------------------------------------------------------------------------------------
# What does not fit: one line each


def test_what_does_not_fit_is_refused_in_one_line(qwen_image_dir, z_image_dir, flux_dir, tmp_path, capsys):
    """A text encoder whose hidden size is not the transformer's, a LoRA of another family (FLUX's, Z-Image's and
    Qwen-Image's all sit under transformer.), a transformer folder of another class."""
    import shutil
    mixed = str(tmp_path / "mixed")
    shutil.copytree(qwen_image_dir, mixed)
    shutil.rmtree(os.path.join(mixed, "text_encoder"))
    shutil.copytree(os.path.join(z_image_dir, "text_encoder"), os.path.join(mixed, "text_encoder"))
    with pytest.raises(CheckpointError, match="text encoder's hidden size 48 is not the 512 its Qwen-Image "
                                              "transformer takes"):
        clip.load(mixed)
    z_lora = {f"transformer.layers.0.attention.to_q.lora_{ab}.weight": torch.zeros(*shape)
              for ab, shape in (("A", (2, 64)), ("B", (64, 2)))}
    lora.save(z_lora, str(tmp_path / "z_lora"))
    err = tiny.cli_error(sample.main, ["--model", qwen_image_dir, "--lora", str(tmp_path / "z_lora"), "--prompt", "a",
                                       "--out", str(tmp_path / "out")], capsys)
    assert "LoRA layer layers.0.attention.to_q: this Qwen-Image transformer has no Linear of that name" in err
    assert not os.path.exists(tmp_path / "out" / "0000_seed0.png")
    import qwen_image
    import z_image
    with pytest.raises(CheckpointError, match="FluxTransformer2DModel"):
        qwen_image.load(flux_dir)
    with pytest.raises(CheckpointError, match="QwenImageTransformer2DModel"):
        z_image.load(qwen_image_dir)


@pytest.mark.parametrize("family", ["qwen-image", "z-image"])
def test_split_text_encoder_file_with_a_tokenizer_folder(request, tmp_path, family):
    """ComfyUI's split text encoder files (qwen_2.5_vl_7b.safetensors, qwen_3_4b.safetensors: the language model's
    keys, model.*) through clip.load(file, tokenizer=FOLDER): the family from its keys, the folder's encodings."""
    from safetensors.torch import load_file, save_file
    folder = folder_of(request, family)
    sd = load_file(os.path.join(folder, "text_encoder", "model.safetensors"))
    f = str(tmp_path / "te.safetensors")
    save_file({k: v for k, v in sd.items() if not k.startswith("lm_head.")}, f)
    te, ref = clip.load(f, tokenizer=folder), clip.load(folder)
    assert te.family.name == family
    with torch.no_grad():
        (ctx, mask), (want, want_mask) = te.encode(PROMPTS), ref.encode(PROMPTS)
    assert torch.equal(mask, want_mask) and torch.equal(ctx, want)


# ----------------------------------------------------------------------------------------------------
# The other tools


@pytest.mark.parametrize("family", ["qwen-image", "z-image"])
def test_sdedit_implicit_accuracy_and_a_quantized_base(request, tmp_path, jsonl, family):
    """SDEdit (noised on the straight path, then denoised: a lower strength stays nearer the image), evaluate.py's
    implicit accuracy (the model against itself ties every pair), a LoRA run on an int8 base (the language model
    quantized with it) starting at log 2."""
    import numpy as np
    from PIL import Image

    import data
    import evaluate
    folder = folder_of(request, family)
    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(img)
    pipe = sample.load(folder)
    pipe.progress = False
    x = torch.from_numpy(np.array(Image.open(img))).permute(2, 0, 1).float()[None] / 255
    z0 = pipe.encode_images(x)  # (the random tiny models' images are not near x whatever the start; their latents are)
    ends = []
    for strength in (0.25, 1.0):
        pipe("a cat", steps=4, init_image=str(img), strength=strength)
        ends.append(pipe.last_latents)
    assert (ends[0] - z0).abs().mean() < (ends[1] - z0).abs().mean()
    acc, diffs = evaluate.implicit_accuracy(pipe, families.load(folder), data.read_pairs(jsonl), k=2, size=32)
    assert acc == 0.5 and all(d == 0 for d in diffs)
    m = tiny.run(tmp_path / "q", folder, jsonl, "--lora", "4", "--quantize", "int8", steps=1)
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
