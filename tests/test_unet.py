"""unet.py against diffusers' UNet2DConditionModel (the oracle) on tiny random SDXL / SD1.5 models, plus
the full-size structures on the meta device, both checkpoint layouts, and bad checkpoints."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import load_file, save_file

import kernels
import unet
import weights
from weights import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def inputs(u, B=2, hw=16, seed=0):
    """Random latents, timesteps, text states (and SDXL's pooled + time_ids) sized from the UNet config."""
    g, cfg = torch.Generator().manual_seed(seed), u.config
    x = torch.randn(B, cfg["in_channels"], hw, hw, generator=g)
    t = torch.tensor([17.0, 901.0, 3.5, 500.0][:B])
    ctx = torch.randn(B, 77, cfg["cross_attention_dim"], generator=g)
    kw = {}
    if u.is_sdxl:
        pooled_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        kw = dict(pooled=torch.randn(B, pooled_dim, generator=g),
                  time_ids=torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0],
                                         [512.0, 512.0, 32.0, 0.0, 768.0, 1024.0]][:B]))
    return x, t, ctx, kw


def reference(ref, x, t, ctx, kw):
    add = {"text_embeds": kw["pooled"], "time_ids": kw["time_ids"]} if kw else None
    with torch.no_grad():
        return ref(x, t, ctx, added_cond_kwargs=add).sample


def run(u, x, t, ctx, kw):
    with torch.no_grad():
        return u(x, t, ctx, **kw)


def assert_close(out, ref, rel=1e-4):
    assert out.shape == ref.shape
    err, scale = (out - ref).abs().max().item(), ref.abs().max().item()
    assert scale > 0.1 and err <= rel * scale, f"max abs err {err:.3g} vs output scale {scale:.3g}"


@pytest.fixture(params=["sdxl", "sd15"])
def tiny_dir(request, sdxl_dir, sd15_dir):
    return {"sdxl": sdxl_dir, "sd15": sd15_dir}[request.param]


def test_matches_diffusers(tiny_dir):
    ref = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet").eval()
    u = unet.load(tiny_dir).eval()
    assert u.is_sdxl == (ref.config.addition_embed_type == "text_time") and u.prediction_type == "epsilon"
    x, t, ctx, kw = inputs(u)
    # The required bound is 1e-4 x scale; the ops match diffusers' one for one, so hold them to fp32 rounding:
    # 1e-4 would let e.g. a wrong GroupNorm eps (1e-5 instead of 1e-6 in the transformers, ~1e-5 rel.) through.
    assert_close(run(u, x, t, ctx, kw), reference(ref, x, t, ctx, kw), rel=2e-6)
    # a scalar timestep is broadcast over the batch
    assert_close(run(u, x, 250, ctx, kw), reference(ref, x, torch.tensor([250, 250]), ctx, kw))


def test_all_attention_goes_through_kernels(sdxl_dir, monkeypatch):
    u = unet.load(sdxl_dir).eval()
    calls = []
    real = kernels.attention

    def attention(q, k, v):
        calls.append(q.shape)
        return real(q, k, v)
    monkeypatch.setattr(kernels, "attention", attention)
    run(u, *inputs(u, B=1, hw=8))
    n_blocks = sum(isinstance(m, unet.TransformerBlock) for m in u.modules())
    assert len(calls) == 2 * n_blocks  # self- and cross-attention of every transformer block
    assert all(len(s) == 4 for s in calls)  # (B, H, L, D)


@pytest.mark.parametrize("name", ["sdxl", "sd15"])
def test_triton_attention_matches_diffusers(name, sdxl_dir, sd15_dir, monkeypatch):
    path = {"sdxl": sdxl_dir, "sd15": sd15_dir}[name]
    ref = UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval()
    u = unet.load(path).eval()
    x, t, ctx, kw = inputs(u, B=1, hw=8)
    expected = reference(ref, x, t, ctx, kw)
    monkeypatch.setenv("DPO_KERNELS", "triton")
    assert kernels.use_triton(x)
    assert_close(run(u, x, t, ctx, kw), expected)


def test_bf16_load_and_autocast(sdxl_dir):
    ref = UNet2DConditionModel.from_pretrained(sdxl_dir, subfolder="unet").eval()
    x, t, ctx, kw = inputs(unet.load(sdxl_dir))
    expected = reference(ref, x, t, ctx, kw)
    u = unet.load(sdxl_dir, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in u.parameters()} == {torch.bfloat16} and u.dtype == torch.bfloat16
    out = run(u, x.bfloat16(), t, ctx.bfloat16(), {k: v.bfloat16() for k, v in kw.items()})
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), expected, rel=5e-2)
    u32 = unet.load(sdxl_dir).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(u32, x, t, ctx, kw)
    assert_close(out.float(), expected, rel=5e-2)


def test_sdxl_needs_pooled_and_time_ids(sdxl_dir):
    u = unet.load(sdxl_dir)
    x, t, ctx, kw = inputs(u, B=1, hw=8)
    with pytest.raises(ValueError, match="needs pooled"):
        u(x, t, ctx, pooled=kw["pooled"])


def test_prediction_type_from_scheduler_config(sdxl_dir, tmp_path):
    shutil.copytree(os.path.join(sdxl_dir, "unet"), tmp_path / "unet")
    os.makedirs(tmp_path / "scheduler")
    with open(tmp_path / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump({"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction"}, f)
    assert unet.load(str(tmp_path)).prediction_type == "v_prediction"
    assert unet.load(str(tmp_path / "unet")).prediction_type == "v_prediction"
    shutil.rmtree(tmp_path / "scheduler")
    assert unet.load(str(tmp_path)).prediction_type == "epsilon"


# ----------------------------------------------------------------------------------------------------
# Saving and the other file layouts


def test_save_diffusers_layout_loads_in_diffusers(tiny_dir, tmp_path):
    u = unet.load(tiny_dir).eval()
    unet.save(u, str(tmp_path / "unet"))
    with open(tmp_path / "unet" / "config.json") as f:
        assert json.load(f)["_class_name"] == "UNet2DConditionModel"
    ref = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet")).eval()
    x, t, ctx, kw = inputs(u)
    expected = run(u, x, t, ctx, kw)
    assert_close(reference(ref, x, t, ctx, kw), expected)
    assert_close(run(unet.load(str(tmp_path / "unet")), x, t, ctx, kw), expected)


def test_save_single_file_read_by_diffusers_converter(tiny_dir, tmp_path):
    u = unet.load(tiny_dir).eval()
    u.prediction_type = "v_prediction"
    path = str(tmp_path / "model.safetensors")
    unet.save(u, path, layout="single")
    sd = load_file(path)
    assert sd and all(k.startswith("model.diffusion_model.") for k in sd)
    ref = UNet2DConditionModel(**u.config).eval()
    ref.load_state_dict(convert_ldm_unet_checkpoint(sd, u.config), strict=True)
    x, t, ctx, kw = inputs(u)
    expected = run(u, x, t, ctx, kw)
    assert_close(reference(ref, x, t, ctx, kw), expected)
    u2 = unet.load(path)
    assert u2.prediction_type == "v_prediction" and u2.config == u.config
    assert_close(run(u2, x, t, ctx, kw), expected)


def test_single_file_without_config_uses_family_default(sdxl_dir, sd15_dir, tmp_path, monkeypatch):
    """Real single files carry no config: SDXL vs SD1.5 comes from the keys (full-size configs patched tiny)."""
    for name, path in [("SDXL", sdxl_dir), ("SD15", sd15_dir)]:
        u = unet.load(path).eval()
        monkeypatch.setattr(unet, name, u.config)
        f = str(tmp_path / f"{name}.safetensors")
        unet.save(u, f, layout="single")
        sd = load_file(f)
        save_file(sd, f)  # no metadata, as in a real single-file checkpoint
        sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # a whole-pipeline file
        save_file(sd, f + ".whole.safetensors")
        x, t, ctx, kw = inputs(u)
        for p in (f, f + ".whole.safetensors"):
            assert_close(run(unet.load(p), x, t, ctx, kw), run(u, x, t, ctx, kw))


def test_fp16_variant_and_sharded_index(sdxl_dir, tmp_path):
    u = unet.load(sdxl_dir).eval()
    x, t, ctx, kw = inputs(u)
    expected = run(u, x, t, ctx, kw)
    sd = load_file(os.path.join(sdxl_dir, "unet", "diffusion_pytorch_model.safetensors"))
    # fp16 variant file
    v = tmp_path / "fp16"
    os.makedirs(v)
    shutil.copy(os.path.join(sdxl_dir, "unet", "config.json"), v)
    save_file({k: t_.half() for k, t_ in sd.items()}, str(v / "diffusion_pytorch_model.fp16.safetensors"))
    assert_close(run(unet.load(str(v)), x, t, ctx, kw), expected, rel=1e-2)
    # two shards and an index
    s = tmp_path / "sharded"
    os.makedirs(s)
    shutil.copy(os.path.join(sdxl_dir, "unet", "config.json"), s)
    keys, weight_map = sorted(sd), {}
    for i, part in enumerate([keys[::2], keys[1::2]]):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(s / name))
        weight_map.update({k: name for k in part})
    with open(s / "diffusion_pytorch_model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    assert_close(run(unet.load(str(s)), x, t, ctx, kw), expected)


# ----------------------------------------------------------------------------------------------------
# Full-size structures (meta device: shapes only, no memory)


@pytest.mark.parametrize("name,params", [("SDXL", 2_567_463_684), ("SD15", 859_520_964)])
def test_full_size_matches_diffusers_structure(name, params):
    cfg = getattr(unet, name)
    with torch.device("meta"):
        u = unet.UNet(cfg)
        ref = UNet2DConditionModel(**cfg)
    assert sum(p.numel() for p in u.parameters()) == params
    ours = {k: tuple(v.shape) for k, v in u.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    # single-file layout: a bijection that diffusers' own converter maps back to the diffusers names
    table = unet.layout_map(cfg)
    inverse = {s: d for d, s in table.items()}
    assert len(inverse) == len(table)
    single = {unet.PREFIX + weights.rename(k, table): v for k, v in u.state_dict().items()}
    assert len(single) == len(ours)
    assert all(weights.rename(weights.rename(k, table), inverse) == k for k in ours)
    assert {k: tuple(v.shape) for k, v in convert_ldm_unet_checkpoint(single, u.config).items()} == ours
    known = {"SDXL": ["label_emb.0.2.weight", "input_blocks.3.0.op.weight", "output_blocks.2.2.conv.bias",
                      "middle_block.1.transformer_blocks.9.attn2.to_k.weight",
                      "input_blocks.7.0.skip_connection.weight"],
             "SD15": ["input_blocks.1.1.proj_in.weight", "output_blocks.2.1.conv.weight", "out.2.bias",
                      "middle_block.2.emb_layers.1.weight", "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight"]}
    assert all(unet.PREFIX + k in single for k in known[name])  # names in the released single-file checkpoints


def test_unsupported_config_is_refused():
    with pytest.raises(ValueError, match="unsupported UNet config: class_embed_type='timestep'"):
        unet.UNet(dict(unet.SD15, class_embed_type="timestep"))
    with pytest.raises(ValueError, match="unsupported UNet block type 'AttnDownBlock2D'"):
        unet.UNet(dict(unet.SD15, down_block_types=["AttnDownBlock2D"] * 4))


# ----------------------------------------------------------------------------------------------------
# Training support


def test_gradient_checkpointing_same_gradients(sdxl_dir):
    u = unet.load(sdxl_dir).train()
    x, t, ctx, kw = inputs(u, hw=8)
    res, calls = next(m for m in u.modules() if isinstance(m, unet.ResBlock)), []
    res.register_forward_pre_hook(lambda *a: calls.append(1))  # (recompute stops early, before post-hooks)

    def grads():
        u.zero_grad()
        (u(x, t, ctx, **kw) ** 2).mean().backward()
        return {n: p.grad.clone() for n, p in u.named_parameters()}

    plain = grads()
    assert len(calls) == 1
    u.gradient_checkpointing = True
    assert u.gradient_checkpointing
    ckpt = grads()
    assert len(calls) == 3  # forward, then recomputed in backward
    for n, g in plain.items():
        assert torch.allclose(ckpt[n], g, rtol=1e-5, atol=1e-7 * g.abs().max().item()), n
    u.gradient_checkpointing = False
    assert not any(getattr(m, "checkpointing", False) for m in u.modules())


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_nonexistent_path():
    with pytest.raises(CheckpointError, match="model path does not exist: /no/such/model"):
        unet.load("/no/such/model")


def test_truncated_file(sdxl_dir, tmp_path):
    u = unet.load(sdxl_dir)
    path = str(tmp_path / "u.safetensors")
    unet.save(u, path, layout="single")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match="truncated"):
        unet.load(path)


def test_missing_key(sdxl_dir, tmp_path):
    shutil.copytree(os.path.join(sdxl_dir, "unet"), tmp_path / "unet")
    f = str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    sd = load_file(f)
    del sd["up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight"]
    save_file(sd, f)
    missing = r"missing keys: up_blocks\.0\.attentions\.1\.transformer_blocks\.0\.attn2\.to_k\.weight"
    with pytest.raises(CheckpointError, match=missing):
        unet.load(str(tmp_path))


def test_wrong_family(sdxl_dir, sd15_dir, tmp_path):
    # a diffusers VAE weights file given as a single-file checkpoint
    with pytest.raises(CheckpointError, match="not an SDXL, SD1.5, SD3 or FLUX checkpoint"):
        unet.load(os.path.join(sdxl_dir, "vae", "diffusion_pytorch_model.safetensors"))
    # a flow model's single file given as a UNet
    for key, name in (("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "SD3"),
                      ("double_blocks.0.img_attn.qkv.weight", "FLUX")):
        save_file({key: torch.zeros(3, 1)}, str(tmp_path / "flow.safetensors"))
        with pytest.raises(CheckpointError, match=f"an {name} file, not an SDXL / SD1.5 UNet"):
            unet.load(str(tmp_path / "flow.safetensors"))
    # the VAE folder given as a UNet folder
    with pytest.raises(CheckpointError, match="holds a AutoencoderKL, not a UNet2DConditionModel"):
        unet.load(os.path.join(sdxl_dir, "vae"))
    # an original-layout text-encoder-only file
    f = str(tmp_path / "te.safetensors")
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(4)}, f)
    with pytest.raises(CheckpointError, match=r"no UNet weights in this file \(no model\.diffusion_model\.\* keys\)"):
        unet.load(f)
    # SD1.5 weights where the config says SDXL
    shutil.copytree(os.path.join(sd15_dir, "unet"), tmp_path / "unet")
    shutil.copy(os.path.join(sdxl_dir, "unet", "config.json"), tmp_path / "unet" / "config.json")
    with pytest.raises(CheckpointError, match=r"checkpoint does not match the model; missing keys: add_embedding"):
        unet.load(str(tmp_path))


# ----------------------------------------------------------------------------------------------------
# Memory: load straight into the target dtype, one tensor at a time


def _write_streamed(path, shapes, metadata=None, seed=0):
    """A bf16 safetensors file written tensor by tensor, so the test itself never holds the model."""
    header, off = {}, 0
    for k, s in shapes.items():
        n = 2 * math.prod(s)
        header[k] = {"dtype": "BF16", "shape": list(s), "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for s in shapes.values():
            f.write(torch.randn(s, generator=g).bfloat16().view(torch.uint8).numpy().tobytes())


MEASURE = """
import sys, torch, unet
def rss(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))
base = rss("VmRSS")
u = unet.load(sys.argv[1], dtype=torch.bfloat16)
assert {p.dtype for p in u.parameters()} == {torch.bfloat16}
touched = sum(float(p.detach().float().abs().sum()) for p in u.parameters())  # every page really in RAM
size = sum(p.numel() * p.element_size() for p in u.parameters())
print(sum(p.numel() for p in u.parameters()), size, rss("VmHWM") - base, touched > 0)
"""


def test_bf16_load_peak_memory(tmp_path):
    """Peak RSS growth of unet.load(dtype=bf16) of a full-size SD1.5 single file (1.7 GB, no config inside:
    the family picks the SD1.5 config) stays <= 1.2x the model's own size."""
    with torch.device("meta"):
        table = unet.layout_map(unet.SD15)
        state = unet.UNet(unet.SD15).state_dict()
        shapes = {unet.PREFIX + weights.rename(k, table): tuple(v.shape) for k, v in state.items()}
    path = str(tmp_path / "sd15_unet.safetensors")
    try:
        _write_streamed(path, shapes)
        out = subprocess.run([sys.executable, "-c", MEASURE, path], cwd=ROOT, capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=ROOT))
    finally:
        os.remove(path)
    assert out.returncode == 0, out.stderr[-2000:]
    params, size, growth, touched = out.stdout.split()
    assert int(params) == 859_520_964 and touched == "True"
    assert int(growth) <= 1.2 * int(size), f"peak RSS grew {int(growth) / 1e6:.0f} MB for a {int(size) / 1e6:.0f} MB"
