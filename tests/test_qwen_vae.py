"""qwen_vae.py against diffusers' AutoencoderKLQwenImage (the oracle) on the same tiny random weights, given as
diffusers takes an image (one frame, (B, 3, 1, H, W)); the pipelines' latent normalisation; the diffusers folder and
Wan 2.1's single-file layout (checked with diffusers' own converter); the full-size structure on the meta device."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qwen_vae
from tiny import _vae
from tiny_qwen import QWEN_VAE, make_qwen_vae
from weights import CheckpointError


def _images(b=2, h=32, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def _close(a, b, tol=1e-5):
    """max abs error <= tol x output scale (fp32)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    err, scale = (a - b).abs().max().item(), max(b.abs().max().item(), 1.0)
    assert err <= tol * scale, f"max abs err {err:.3g} vs output scale {scale:.3g}"


def _reference(folder):
    from diffusers import AutoencoderKLQwenImage
    return AutoencoderKLQwenImage.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A model root holding a tiny vae/ folder."""
    r = tmp_path_factory.mktemp("qwen")
    make_qwen_vae(str(r / "vae"))
    return str(r)


@pytest.fixture(scope="module")
def ref(root):
    return _reference(os.path.join(root, "vae"))


def _check_same_outputs(v, ref):
    """encode's mean and std, and decode (clamped: latents big enough that some pixels pass +-1), as diffusers on
    the same image as one frame."""
    x = _images()
    with torch.no_grad():
        post = ref.encode(x[:, :, None]).latent_dist  # (B, 16, 1, H/8, W/8)
        mean, std = v.encode(x, std=True)
        _close(mean, post.mean[:, :, 0])
        _close(std, post.std[:, :, 0])
        _close(v.encode(x), post.mean[:, :, 0])
        z = 8 * torch.randn_like(mean)
        out = ref.decode(z[:, :, None]).sample[:, :, 0]  # (B, 3, H, W)
        assert (out.abs() == 1).any() and (out.abs() < 1).any()  # the clamp is at work
        _close(v.decode(z), out)


def test_matches_diffusers(root, ref):
    for path in (root, os.path.join(root, "vae")):  # the diffusers root or its vae/ folder
        v = qwen_vae.load(path)
        _check_same_outputs(v, ref)
        assert v.downsample == qwen_vae.downsample(path) == 8 and v.encode(_images()).shape == (2, 16, 4, 3)
        assert v.dtype == v.weight_dtype == torch.float32
        assert v.config["latents_mean"] == ref.config.latents_mean


def test_other_structures(tmp_path):
    """Temporal flags elsewhere (other time convs to load, not run), one residual block per level, three levels."""
    for i, cfg in enumerate([dict(temperal_downsample=[True, False, True]),
                             dict(dim_mult=[1, 3, 2], num_res_blocks=1, temperal_downsample=[True, False])]):
        folder = make_qwen_vae(str(tmp_path / f"v{i}"), seed=i, **cfg)
        v = qwen_vae.load(folder)
        _check_same_outputs(v, _reference(folder))
        assert v.downsample == 2 ** len(cfg["temperal_downsample"])


def test_scale_matches_pipeline(root, ref):
    """(z - mean) * (1 / std) in, latents / (1 / std) + mean out: QwenImagePipeline's and its img2img's formulas."""
    v = qwen_vae.load(root)
    assert v.shift_factor.shape == v.scaling_factor.shape == (1, 16, 1, 1)
    z = torch.randn(2, 16, 1, 4, 3)  # as the pipelines hold latents: (B, 16, 1, h, w)
    latents_mean = torch.tensor(ref.config.latents_mean).view(1, ref.config.z_dim, 1, 1, 1).to(z.device, z.dtype)
    latents_std = 1.0 / torch.tensor(ref.config.latents_std).view(1, ref.config.z_dim, 1, 1, 1).to(z.device, z.dtype)
    assert torch.equal(v.scale(z[:, :, 0]), ((z - latents_mean) * latents_std)[:, :, 0])
    assert torch.equal(v.unscale(z[:, :, 0]), (z / latents_std + latents_mean)[:, :, 0])
    assert (v.shift_factor.std() > 0.1) and (v.scaling_factor.std() > 0.1)  # per channel, not one number
    zb = z[:, :, 0].bfloat16()  # the factors follow the latents' dtype (and device)
    assert v.scale(zb).dtype == v.unscale(zb).dtype == torch.bfloat16
    # overrides: one number for all channels, or one per channel
    v2 = qwen_vae.load(root, scaling_factor=0.5, shift_factor=list(range(16)))
    assert torch.allclose(v2.scale(z[:, :, 0]), (z[:, :, 0] - torch.arange(16.0).view(1, 16, 1, 1)) * 0.5)
    assert v2.config["latents_std"] == [2.0] * 16


def test_save_round_trip(root, ref, tmp_path):
    """Our folder is what diffusers loads (same config and tensors) and what we load back."""
    v = qwen_vae.load(root)
    qwen_vae.save(v, str(tmp_path / "vae"))
    back = _reference(str(tmp_path / "vae"))
    assert {k: back.config[k] for k in qwen_vae.DEFAULTS} == {k: ref.config[k] for k in qwen_vae.DEFAULTS}
    assert back.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], t) for k, t in ref.state_dict().items())
    _check_same_outputs(qwen_vae.load(str(tmp_path)), ref)
    with pytest.raises(ValueError, match="layout"):
        qwen_vae.save(v, str(tmp_path / "x"), layout="ldm")


def test_single_file(root, ref, tmp_path):
    """Our Wan-layout file is what diffusers' Wan converter reads back to the diffusers weights; it loads with the
    config read off its shapes and the released latent statistics."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    path = str(tmp_path / "qwen_image_vae.safetensors")
    qwen_vae.save(qwen_vae.load(root), path, layout="single")
    with safe_open(path, "pt") as f:
        ckpt = {k: f.get_tensor(k) for k in f.keys()}
    for k in ("encoder.conv1.weight", "encoder.downsamples.0.residual.2.weight", "encoder.middle.1.to_qkv.weight",
              "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.11.resample.1.weight", "decoder.head.2.bias",
              "decoder.upsamples.7.time_conv.weight", "encoder.downsamples.5.time_conv.weight", "conv2.weight"):
        assert k in ckpt, k
    converted = convert_wan_vae_to_diffusers(dict(ckpt))
    assert converted.keys() == ref.state_dict().keys()
    assert all(torch.equal(converted[k], t) for k, t in ref.state_dict().items())
    v = qwen_vae.load(path)
    assert v.config == qwen_vae.check_config(dict(QWEN_VAE, latents_mean=qwen_vae.LATENTS_MEAN,
                                                  latents_std=qwen_vae.LATENTS_STD))
    assert qwen_vae.read_config(path) == v.config and qwen_vae.downsample(path) == 8
    _check_same_outputs(v, ref)
    assert torch.equal(v.shift_factor.flatten(), torch.tensor(qwen_vae.LATENTS_MEAN))

    missing = str(tmp_path / "missing.safetensors")
    save_file({k: t for k, t in ckpt.items() if k != "decoder.upsamples.4.shortcut.bias"}, missing)
    with pytest.raises(CheckpointError, match=r"keys missing: decoder\.upsamples\.4\.shortcut\.bias"):
        qwen_vae.load(missing)
    extra = str(tmp_path / "extra.safetensors")
    save_file({**ckpt, "decoder.extra.weight": torch.zeros(1)}, extra)
    with pytest.raises(CheckpointError, match=r"unexpected keys: decoder\.extra\.weight"):
        qwen_vae.load(extra)
    wan22 = str(tmp_path / "wan22.safetensors")
    save_file({**ckpt, "decoder.upsamples.0.upsamples.0.residual.2.weight": torch.zeros(1)}, wan22)
    with pytest.raises(CheckpointError, match="Wan 2.2"):
        qwen_vae.load(wan22)
    narrow = str(tmp_path / "narrow.safetensors")  # 4 latent channels: the released statistics do not fit
    save_file({**ckpt, "conv2.weight": torch.zeros(4, 4, 1, 1, 1)}, narrow)
    with pytest.raises(CheckpointError, match="latents_mean must hold z_dim = 4"):
        qwen_vae.load(narrow)


def _one_line(match, fn, *args):
    with pytest.raises(CheckpointError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)


def test_refusals(root, tmp_path):
    sd_vae = tmp_path / "sd" / "vae"
    _vae(0.18215).save_pretrained(str(sd_vae))
    _one_line("holds AutoencoderKL, not AutoencoderKLQwenImage", qwen_vae.load, str(tmp_path / "sd"))
    _one_line("holds AutoencoderKL, not AutoencoderKLQwenImage", qwen_vae.downsample, str(sd_vae))
    _one_line("not a Qwen-Image VAE file", qwen_vae.load, str(sd_vae / "diffusion_pytorch_model.safetensors"))

    # a folder whose weights lack a tensor / hold one too many: strict, and named
    state = dict(_reference(os.path.join(root, "vae")).state_dict())
    cfg = json.loads(open(os.path.join(root, "vae", "config.json")).read())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    state.pop("decoder.mid_block.attentions.0.proj.bias")
    state["encoder.spare.weight"] = torch.zeros(2)
    save_file(state, str(bad / "diffusion_pytorch_model.safetensors"))
    _one_line(r"missing keys: decoder\.mid_block\.attentions\.0\.proj\.bias; unexpected keys: encoder\.spare\.weight",
              qwen_vae.load, str(bad))
    (bad / "config.json").write_text(json.dumps({**cfg, "attn_scales": [0.5]}))
    _one_line(r"attn_scales \[0\.5\]", qwen_vae.load, str(bad))
    _one_line("does not exist", qwen_vae.load, str(tmp_path / "nope"))


def test_full_size_matches_diffusers():
    """The released VAE: parameter count, names and shapes equal to diffusers' on the meta device."""
    from diffusers import AutoencoderKLQwenImage
    with torch.device("meta"):
        ours, ref = qwen_vae.QwenVAE(qwen_vae.QWEN_IMAGE_VAE), AutoencoderKLQwenImage()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 126_892_531
    assert {k: tuple(t.shape) for k, t in ours.state_dict().items()} == \
           {k: tuple(t.shape) for k, t in ref.state_dict().items()}
    assert ours.downsample == 8 and dict(ref.config)["latents_std"] == qwen_vae.LATENTS_STD
    assert ours.shift_factor.device.type == "cpu"  # real numbers, also when built on meta


def test_bf16(root, ref):
    """Loaded straight into bf16: weights, outputs and the computation stay bf16, off diffusers' fp32 by no more
    than diffusers' own bf16 is."""
    from diffusers import AutoencoderKLQwenImage
    v = qwen_vae.load(root, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in v.parameters()) and v.weight_dtype == v.dtype == torch.bfloat16
    ref16 = AutoencoderKLQwenImage.from_pretrained(os.path.join(root, "vae"), torch_dtype=torch.bfloat16).eval()
    x = _images()
    with torch.no_grad():
        z = ref.encode(x[:, :, None]).latent_dist.mean  # (B, 16, 1, h, w), fp32
        mean, std = v.encode(x, std=True)
        assert mean.dtype == std.dtype == torch.bfloat16
        theirs = ref16.encode(x[:, :, None].bfloat16()).latent_dist.mean
        assert (mean.float() - z[:, :, 0]).abs().max() <= 1.5 * (theirs.float() - z).abs().max() + 1e-3
        img = v.decode(z[:, :, 0])
        assert img.dtype == torch.bfloat16
        want, theirs = ref.decode(z).sample[:, :, 0], ref16.decode(z.bfloat16()).sample[:, :, 0].float()
        assert (img.float() - want).abs().max() <= 1.5 * (theirs - want).abs().max() + 1e-3
