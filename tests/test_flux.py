"""flux.py against diffusers' FluxTransformer2DModel (the oracle) on tiny random dev / schnell models: outputs in
fp32 and bf16, BFL's single-file layout (checked with diffusers' own converter), the full-size structures on the
meta device, saving, bad inputs, gradients and the Triton attention path."""
import json

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

import flux
import kernels
from tests.tiny import _randomize
from weights import CheckpointError

# in_channels is the packed count: 16 = 4 latent channels x 2x2. Head dim 16 split (4, 6, 6) by the RoPE axes.
TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))
CONFIGS = {"dev": dict(TINY, guidance_embeds=True), "schnell": dict(TINY, guidance_embeds=False),
           # a single file holds no RoPE split: flux reads FLUX.1's 1:7:7 off the head dim, (4, 14, 14) of 32
           "file": dict(TINY, attention_head_dim=32, axes_dims_rope=(4, 14, 14), guidance_embeds=True)}


def oracle(kind, seed=0):
    torch.manual_seed(seed)
    ref = FluxTransformer2DModel(**CONFIGS[kind]).eval()
    _randomize(ref, seed=seed)
    return ref


def inputs(B=2, h=8, w=12, L=7, guidance=True, seed=0):
    """Latents (B, 4, h, w), t = sigma * 1000, T5 states, CLIP pooled, guidance scales (or None)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, h, w, generator=g)
    t = torch.tensor([1000.0, 37.5][:B])
    ctx, pooled = torch.randn(B, L, 32, generator=g), torch.randn(B, 24, generator=g)
    return x, t, ctx, pooled, torch.tensor([3.5, 1.0][:B]) if guidance else None


def reference(ref, x, t, ctx, pooled, guidance):
    """diffusers' model on the pipeline's packing and ids: it takes sigma (not sigma * 1000) and the plain scale."""
    B, C, h, w = x.shape
    ids = FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, x.device, x.dtype)
    packed = FluxPipeline._pack_latents(x, B, C, h, w)
    with torch.no_grad():
        out = ref(hidden_states=packed, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t / 1000,
                  img_ids=ids, txt_ids=torch.zeros(ctx.shape[1], 3, dtype=x.dtype), guidance=guidance).sample
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


def assert_close(out, ref, rel=1e-4):
    assert out.shape == ref.shape
    err, scale = (out.float() - ref.float()).abs().max().item(), ref.float().abs().max().item()
    assert scale > 0.1 and err <= rel * scale, f"max abs err {err:.3g} vs output scale {scale:.3g}"


@pytest.fixture(params=["dev", "schnell"])
def pair(request, tmp_path):
    ref = oracle(request.param)
    ref.save_pretrained(tmp_path / "transformer")
    return ref, tmp_path, request.param == "dev"


def test_matches_diffusers_fp32(pair):
    ref, root, dev = pair
    m = flux.load(str(root))  # the model root, holding transformer/
    assert m.config["guidance_embeds"] == dev and m.prediction_type == "flow"
    for shape in (dict(h=8, w=12, L=7), dict(B=1, h=6, w=4, L=13)):  # non-square, text lengths not multiples of 16
        args = inputs(guidance=dev, **shape)
        with torch.no_grad():
            assert_close(m(*args), reference(ref, *args))


def test_matches_diffusers_bf16(pair):
    ref, root, dev = pair
    m = flux.load(str(root / "transformer"), dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16
    x, t, ctx, pooled, g = inputs(guidance=dev)
    truth = reference(ref, x, t, ctx, pooled, g)
    with torch.no_grad():
        ours = m(x.bfloat16(), t, ctx.bfloat16(), pooled.bfloat16(), g)
    theirs = reference(ref.to(torch.bfloat16), x.bfloat16(), t, ctx.bfloat16(), pooled.bfloat16(), g)
    assert ours.dtype == torch.bfloat16
    err_ours = (ours.float() - truth).abs().max().item()
    err_theirs = (theirs.float() - truth).abs().max().item()
    assert err_ours <= 2 * err_theirs + 1e-3, (err_ours, err_theirs)


def test_gradients_and_checkpointing(pair):
    _, root, dev = pair
    args = inputs(guidance=dev)
    grads = []
    for ckpt in (False, True):
        m = flux.load(str(root))
        m.train()
        m.gradient_checkpointing = ckpt
        m(*args).square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def bfl_layout(ref, prefix=""):
    """diffusers weights written in BFL's single-file layout by inverting flux's table (rows fused back in order)."""
    m = flux.Flux(ref.config)
    dim = m.config["num_attention_heads"] * m.config["attention_head_dim"]
    sd, whole, parts = ref.state_dict(), {}, {}
    for name in m.state_dict():
        key, rows = flux.bfl_name(name)
        if rows is None:
            whole[prefix + key] = sd[name].clone()
            continue
        start = 0
        for a, b in rows:  # our rows start:start+(b-a)*dim are its rows a*dim:b*dim
            parts.setdefault(prefix + key, {})[a] = sd[name][start:start + (b - a) * dim]
            start += (b - a) * dim
    fused = {k: torch.cat([p[a] for a in sorted(p)]) for k, p in parts.items()}
    return {**whole, **fused}


def diffusers_convert(orig, monkeypatch):
    """diffusers' converter. It hard-codes FLUX.1's width (3072) where it splits linear1: scale that split down."""
    real = torch.split

    def split(t, sizes, dim=0):
        if sizes == (3072, 3072, 3072, 12288):
            sizes = (t.shape[0] // 7,) * 3 + (4 * t.shape[0] // 7,)
        return real(t, sizes, dim)
    monkeypatch.setattr(torch, "split", split)
    out = convert_flux_transformer_checkpoint_to_diffusers(dict(orig))
    monkeypatch.setattr(torch, "split", real)
    return out


@pytest.mark.parametrize("prefix", ["", flux.PREFIX])
def test_single_file_is_bfls_layout(prefix, tmp_path, monkeypatch):
    ref = oracle("file")
    orig = bfl_layout(ref, prefix)
    back = diffusers_convert(orig, monkeypatch)  # diffusers' own converter takes it with or without the prefix
    want = ref.state_dict()
    assert back.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(back[k], want[k], rtol=0, atol=0, msg=k)
    ref.save_pretrained(tmp_path / "folder")
    path = tmp_path / "flux1-dev.safetensors"
    extra = {"vae.decoder.conv_in.weight": torch.zeros(1)} if prefix else {}  # whole-model files carry more
    save_file({**orig, **extra}, str(path))
    m, folder = flux.load(str(path)), flux.load(str(tmp_path / "folder"))
    assert m.config == folder.config
    args = inputs()
    with torch.no_grad():
        torch.testing.assert_close(m(*args), folder(*args), rtol=0, atol=0)
        assert_close(m(*args), reference(ref, *args))


def test_single_file_keeps_no_view_of_fused_tensors(tmp_path):
    """Loaded in the file's dtype, a slice of linear1 / qkv must be a copy: a view would keep the whole fused tensor
    alive once per slice (4x linear1 per single block)."""
    path = tmp_path / "flux1-dev.safetensors"
    save_file({k: v.bfloat16() for k, v in bfl_layout(oracle("file")).items()}, str(path))
    m = flux.load(str(path), dtype=torch.bfloat16)
    for name, p in m.named_parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), name


def test_save_loads_in_diffusers(pair, tmp_path):
    ref, root, dev = pair
    flux.save(flux.load(str(root)), str(tmp_path / "out"))
    back = FluxTransformer2DModel.from_pretrained(str(tmp_path / "out")).eval()
    args = inputs(guidance=dev)
    torch.testing.assert_close(reference(back, *args), reference(ref, *args), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["DEV", "SCHNELL"])
def test_full_size_parameter_count(name):
    cfg = getattr(flux, name)
    with torch.device("meta"):
        ours = flux.Flux(cfg)
        theirs = FluxTransformer2DModel(**cfg)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert n > 11e9


def test_bad_inputs(tmp_path):
    sd3 = tmp_path / "sd3.5_large.safetensors"
    save_file({flux.PREFIX + "joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(3, 1),
               flux.PREFIX + "pos_embed": torch.zeros(1, 4, 1)}, str(sd3))
    with pytest.raises(CheckpointError, match="an SD3 file, not FLUX") as e:
        flux.load(str(sd3))
    assert "\n" not in str(e.value)
    ref = oracle("file")
    orig = bfl_layout(ref)
    whole = tmp_path / "flux.safetensors"
    save_file(orig, str(whole))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        flux.load(str(cut))
    save_file({**orig, "single_blocks.0.extra.weight": torch.zeros(1)}, str(whole))
    with pytest.raises(CheckpointError, match="unexpected keys: single_blocks.0.extra.weight"):
        flux.load(str(whole))
    orig.pop("single_blocks.1.linear1.bias")
    save_file(orig, str(whole))
    with pytest.raises(CheckpointError, match="keys missing: single_blocks.1.linear1.bias"):
        flux.load(str(whole))
    folder = tmp_path / "sd3" / "transformer"
    ref.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, _class_name="SD3Transformer2DModel")))
    with pytest.raises(CheckpointError, match="holds SD3Transformer2DModel, not FluxTransformer2DModel"):
        flux.load(str(tmp_path / "sd3"))
    dev, schnell = flux.Flux(CONFIGS["dev"]), flux.Flux(CONFIGS["schnell"])
    x, t, ctx, pooled, g = inputs()
    with pytest.raises(ValueError, match="guidance-distilled: pass guidance"):
        dev(x, t, ctx, pooled)
    with pytest.raises(ValueError, match="no guidance embedding"):
        schnell(x, t, ctx, pooled, g)
    with pytest.raises(ValueError, match="must be even"):
        schnell(x[:, :, :7], t, ctx, pooled)
    with pytest.raises(ValueError, match="axes_dims_rope"):
        flux.Flux(dict(TINY, axes_dims_rope=(4, 6, 8)))


def test_triton_attention_path(tmp_path, monkeypatch):
    ref = oracle("dev")
    ref.save_pretrained(tmp_path)
    m = flux.load(str(tmp_path))
    args = inputs(B=1, h=4, w=6, L=5)
    calls, real = [], kernels.flash_attention.FlashAttention.apply

    def counted(*a):
        calls.append(a[0].shape)
        return real(*a)
    with torch.no_grad():
        want = m(*args)
        monkeypatch.setenv("DPO_KERNELS", "triton")
        monkeypatch.setattr(kernels.flash_attention.FlashAttention, "apply", staticmethod(counted))
        assert_close(m(*args), want)
    assert calls == [(1, 2, 5 + 2 * 3, 16)] * 4  # every block's attention: (B, H, text + image tokens, D)
