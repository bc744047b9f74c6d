"""vae.py against diffusers' AutoencoderKL on the same (tiny, random) weights, and its checkpoint layouts
against diffusers' own single-file converter."""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import vae
from weights import CheckpointError


def _reference(root):
    from diffusers import AutoencoderKL
    return AutoencoderKL.from_pretrained(root, subfolder="vae").eval()


def _images(b=2, h=32, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def _close(a, b, tol=1e-4):
    """max abs error <= tol x output scale (fp32)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert (a - b).abs().max().item() <= tol * max(b.abs().max().item(), 1.0)


def _check_same_outputs(v, ref):
    x = _images()
    with torch.no_grad():
        z_ref = ref.encode(x).latent_dist.mean
        _close(v.encode(x), z_ref)
        z = torch.randn_like(z_ref)
        _close(v.decode(z), ref.decode(z).sample)


@pytest.mark.parametrize("which", ["sdxl", "sd15"])
def test_matches_diffusers(which, sdxl_dir, sd15_dir):
    root = sdxl_dir if which == "sdxl" else sd15_dir
    ref = _reference(root)
    for path in (root, os.path.join(root, "vae")):  # the diffusers root or its vae/ folder
        v = vae.load(path)
        _check_same_outputs(v, ref)
        with open(os.path.join(root, "vae", "config.json")) as f:
            assert v.scaling_factor == json.load(f)["scaling_factor"] == {"sdxl": 0.13025, "sd15": 0.18215}[which]
        assert v.downsample == 2  # tiny VAE: 2 levels
        assert v.encode(_images()).shape == (2, 4, 16, 12)


def test_single_file_round_trip(sdxl_dir, tmp_path):
    """Our original-layout file is what diffusers' converter reads back to the diffusers weights, and loads."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    ref = _reference(sdxl_dir)
    v = vae.load(sdxl_dir)
    path = str(tmp_path / "vae_single.safetensors")
    vae.save(v, path, layout="single")
    with safe_open(path, "pt") as f:
        ckpt = {k: f.get_tensor(k) for k in f.keys()}
    assert all(k.startswith("first_stage_model.") for k in ckpt)
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in ckpt  # up.0 = last diffusers level
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in ckpt
    assert ckpt["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in the original layout
    converted = convert_ldm_vae_checkpoint(ckpt, dict(ref.config))
    expected = ref.state_dict()
    assert converted.keys() == expected.keys()
    for k, t in expected.items():
        assert torch.equal(converted[k], t), k
    v2 = vae.load(path)
    assert v2.scaling_factor == 0.13025
    _check_same_outputs(v2, ref)

    # A VAE-only file in the original layout (no prefix, as sdxl_vae.safetensors); no family: default or given.
    bare = str(tmp_path / "vae_only.safetensors")
    save_file({k[len("first_stage_model."):]: t for k, t in ckpt.items()}, bare,
              metadata={"vae_config": json.dumps({k: x for k, x in v.config.items() if k != "scaling_factor"})})
    assert vae.load(bare).scaling_factor == 0.18215
    v3 = vae.load(bare, scaling_factor=0.13025)
    assert v3.scaling_factor == 0.13025
    _check_same_outputs(v3, ref)

    # A whole-model single file without a stored scaling factor: taken from its family.
    whole = str(tmp_path / "whole_sdxl.safetensors")
    save_file({**ckpt, "conditioner.embedders.0.transformer.dummy": torch.zeros(1)}, whole,
              metadata={"vae_config": json.dumps({k: x for k, x in v.config.items() if k != "scaling_factor"})})
    assert vae.load(whole).scaling_factor == 0.13025


def test_diffusers_layout_save(sd15_dir, tmp_path):
    from diffusers import AutoencoderKL
    v = vae.load(sd15_dir)
    vae.save(v, str(tmp_path / "vae"))
    ref = AutoencoderKL.from_pretrained(str(tmp_path / "vae")).eval()
    assert ref.config.scaling_factor == 0.18215
    _check_same_outputs(v, ref)
    _check_same_outputs(vae.load(str(tmp_path / "vae")), _reference(sd15_dir))


def test_full_size_matches_diffusers():
    """The real SD1.5/SDXL VAE: parameter count and key set equal to diffusers' on the meta device."""
    from diffusers import AutoencoderKL
    cfg = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
               layers_per_block=2, norm_num_groups=32, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4)
    with torch.device("meta"):
        ours, ref = vae.AutoencoderKL(cfg), AutoencoderKL(**cfg)
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    assert sum(p.numel() for p in ref.parameters()) == 83_653_863
    assert {k: tuple(t.shape) for k, t in ours.state_dict().items()} == \
           {k: tuple(t.shape) for k, t in ref.state_dict().items()}
    assert ours.downsample == 8


def test_dtypes(sdxl_dir, tmp_path):
    """fp16 with force_upcast (SDXL's VAE) keeps fp32 weights and returns fp16; a fixed VAE runs in fp16."""
    x = _images()
    v32 = vae.load(sdxl_dir)
    v16 = vae.load(sdxl_dir, dtype=torch.float16)
    assert v16.encoder.conv_in.weight.dtype == torch.float32
    with torch.no_grad():
        z = v16.encode(x)
        assert z.dtype == torch.float16
        _close(z, v32.encode(x).half(), tol=2e-3)
        assert v16.decode(z).dtype == torch.float16
    fixed = tmp_path / "fixed"
    shutil.copytree(os.path.join(sdxl_dir, "vae"), fixed)
    cfg = json.loads((fixed / "config.json").read_text())
    (fixed / "config.json").write_text(json.dumps({**cfg, "force_upcast": False}))
    assert vae.load(str(fixed), dtype=torch.float16).encoder.conv_in.weight.dtype == torch.float16
    vb = vae.load(sdxl_dir, dtype=torch.bfloat16)
    assert vb.encoder.conv_in.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert vb.decode(v32.encode(x)).dtype == torch.bfloat16


def test_bad_input(sdxl_dir, tmp_path):
    v = vae.load(sdxl_dir)
    good = str(tmp_path / "good.safetensors")
    vae.save(v, good, layout="single")

    truncated = str(tmp_path / "truncated.safetensors")
    with open(good, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        vae.load(truncated)

    with safe_open(good, "pt") as f:
        ckpt = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    missing = str(tmp_path / "missing.safetensors")
    save_file({k: t for k, t in ckpt.items() if "mid.attn_1.q.bias" not in k}, missing, metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing: .*encoder\.mid\.attn_1\.q\.bias"):
        vae.load(missing)

    text_encoder = os.path.join(sdxl_dir, "text_encoder", "model.safetensors")  # wrong kind of file
    with pytest.raises(CheckpointError, match="holds no VAE"):
        vae.load(text_encoder)

    # A tiny VAE without a stored config is read as the full-size one, which it does not fit.
    no_meta = str(tmp_path / "no_meta.safetensors")
    save_file(ckpt, no_meta)
    with pytest.raises(CheckpointError, match=r"VAE keys missing: first_stage_model\.encoder\.down\.0\.block\.1\."):
        vae.load(no_meta)

    with pytest.raises(CheckpointError, match="does not exist"):
        vae.load(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="neither a diffusers model folder"):
        vae.load(str(tmp_path))
    with pytest.raises(ValueError, match="layout"):
        vae.save(v, str(tmp_path / "x"), layout="ldm")


@pytest.mark.parametrize("family,scale,shift", [("sd3", 1.5305, 0.0609), ("flux", 0.3611, 0.1159)])
def test_sixteen_channels(family, scale, shift, tmp_path):
    """SD3's and FLUX's VAE: 16 latent channels, no quant convs, a shift; diffusers folder and both single files."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    torch.manual_seed(0)
    ref = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=scale, shift_factor=shift).eval()
    ref.save_pretrained(tmp_path / "vae")
    v = vae.load(str(tmp_path))
    assert (v.scaling_factor, v.shift_factor) == (scale, shift) and v.quant_conv is None
    _check_same_outputs(v, ref)
    x = _images()
    with torch.no_grad():  # the pipelines' formulas: (z - shift) * scale on the way in, z / scale + shift out
        z = ref.encode(x).latent_dist.mean
        _close(v.scale(v.encode(x)), (z - ref.config.shift_factor) * ref.config.scaling_factor)
        _close(v.unscale(v.scale(z)), z)
    single = str(tmp_path / "single.safetensors")
    vae.save(v, single, layout="single")
    with safe_open(single, "pt") as f:
        ckpt = {k[len("first_stage_model."):]: f.get_tensor(k) for k in f.keys()}
    converted = convert_ldm_vae_checkpoint(dict(ckpt), dict(ref.config))
    assert converted.keys() == ref.state_dict().keys()
    assert all(torch.equal(converted[k], t) for k, t in ref.state_dict().items())
    # FLUX ships its VAE alone (ae.safetensors, no prefix); SD3.5's files hold it under first_stage_model.
    # (the tiny VAE's structure in the metadata, without its factors: those come from the file's family)
    structure = {k: x for k, x in v.config.items() if k not in ("scaling_factor", "shift_factor")}
    meta = {"vae_config": json.dumps(structure)}
    bare = str(tmp_path / "ae.safetensors")
    save_file(ckpt, bare, metadata=meta)
    whole = str(tmp_path / "sd3.5_medium.safetensors")
    save_file({**{"first_stage_model." + k: t for k, t in ckpt.items()},
               "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(3, 1)}, whole, metadata=meta)
    loaded = vae.load(bare if family == "flux" else whole)
    assert (loaded.scaling_factor, loaded.shift_factor) == (scale, shift)
    assert loaded.config["latent_channels"] == 16 and loaded.quant_conv is None
    assert vae.downsample(bare) == 2
    _check_same_outputs(loaded, ref)
