"""z_image.py against diffusers' ZImageTransformer2DModel (the oracle) on a tiny random model: outputs in fp32 (rows
of different caption lengths, the pipeline's time and sign conversions) and bf16, ComfyUI's single-file layout
(checked with diffusers' own converter), saving, strict loading, the full-size structure on the meta device,
gradients and checkpointing, bad inputs."""
import json

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

import kernels
import z_image
from tiny_qwen import Z_IMAGE_TINY, make_z_image_transformer
from weights import CheckpointError

CAP = 24  # the tiny model's caption feature width


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(diffusers' model, a model root holding transformer/)."""
    root = tmp_path_factory.mktemp("zimage")
    return make_z_image_transformer(root / "transformer"), root


def inputs(lengths=(5, 40), h=6, w=10, L=48, seed=0):
    """Latents (B, 4, h, w), t = sigma * 1000, caption states (B, L, 24), a right-padded mask of those lengths.
    6x10 latents: 15 patches, padded to 32 with the pad token; lengths 5 and 40 pad to 32 and 64 tokens."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    x = torch.randn(B, 4, h, w, generator=g)
    t = torch.tensor([870.5, 37.25, 500.0][:B])
    ctx = torch.randn(B, L, CAP, generator=g)
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]  # (B, L)
    return x, t, ctx, mask


def reference(ref, x, t, ctx, mask):
    """diffusers' model as ZImagePipeline calls it: per-row lists, timestep (1000 - t) / 1000, output negated."""
    with torch.no_grad():
        out = ref([xi[:, None] for xi in x], (1000 - t) / 1000, [c[m] for c, m in zip(ctx, mask)],
                  return_dict=False)[0]
    return -torch.stack(out).squeeze(2)  # (B, C, h, w)


def assert_close(out, ref, rel=1e-5):
    assert out.shape == ref.shape
    err, scale = (out.float() - ref.float()).abs().max().item(), ref.float().abs().max().item()
    assert scale > 0.1 and err <= rel * scale, f"max abs err {err:.3g} vs output scale {scale:.3g}"


def test_matches_diffusers_fp32(pair, monkeypatch):
    ref, root = pair
    m = z_image.load(str(root))  # the model root, holding transformer/
    assert m.prediction_type == "flow" and m.latent_channels == 4 and m.dtype == torch.float32
    calls, real = [], kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    # (caption lengths, latent size, kernels.attention calls): captions padded to 32 and 64 tokens (the batch's
    # padding masked: no kernels.attention call but the noise refiner's), to 32 and 32 (nothing masked), one row
    for lengths, (h, w), n_calls in [((5, 40), (6, 10), 1), ((5, 20), (8, 8), 4), ((33,), (4, 12), 4)]:
        calls.clear()
        args = inputs(lengths, h, w)
        with torch.no_grad():
            assert_close(m(*args), reference(ref, *args))
        assert len(calls) == n_calls


def test_rows_are_independent_of_batch_and_padding_side(pair):
    """Row i alone, and with its caption left-padded, gives the batch's row i."""
    m = z_image.load(str(pair[1] / "transformer"))
    x, t, ctx, mask = inputs((5, 40))
    with torch.no_grad():
        both = m(x, t, ctx, mask)
        alone = [m(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], mask[i:i + 1]) for i in range(2)]
        for i in range(2):
            torch.testing.assert_close(alone[i], both[i:i + 1])
        n = int(mask[0].sum())
        left = torch.zeros_like(ctx[:1]).index_copy(1, torch.arange(48 - n, 48), ctx[:1, :n])
        torch.testing.assert_close(m(x[:1], t[:1], left, mask[:1].flip(1)), alone[0], rtol=0, atol=0)


def test_matches_diffusers_bf16(pair):
    ref, root = pair
    m = z_image.load(str(root), dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in m.parameters())
    x, t, ctx, mask = inputs()
    truth = reference(ref, x, t, ctx, mask)
    with torch.no_grad():
        ours = m(x.bfloat16(), t, ctx.bfloat16(), mask)
    theirs = reference(ZImageTransformer2DModel.from_pretrained(str(root / "transformer"), torch_dtype=torch.bfloat16),
                       x.bfloat16(), t, ctx.bfloat16(), mask)
    assert ours.dtype == torch.bfloat16
    err_ours, err_theirs = (ours.float() - truth).abs().max().item(), (theirs.float() - truth).abs().max().item()
    assert err_ours <= 2 * err_theirs + 1e-3, (err_ours, err_theirs)
    m32 = z_image.load(str(root), dtype=torch.bfloat16, norm_dtype=torch.float32)  # norms and pad tokens in fp32
    assert m32.x_pad_token.dtype == m32.layers[0].ffn_norm1.weight.dtype == torch.float32
    assert m32.layers[0].attention.to_q.weight.dtype == torch.bfloat16


def test_gradients_and_checkpointing(pair):
    args = inputs()
    grads = []
    for ckpt in (False, True):
        m = z_image.load(str(pair[1]))
        m.train()
        m.gradient_checkpointing = ckpt
        m(*args).square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_save_loads_in_diffusers(pair, tmp_path):
    ref, root = pair
    m = z_image.load(str(root))
    z_image.save(m, str(tmp_path / "out"))
    back = ZImageTransformer2DModel.from_pretrained(str(tmp_path / "out")).eval()
    args = inputs()
    torch.testing.assert_close(reference(back, *args), reference(ref, *args), rtol=0, atol=0)
    again = z_image.load(str(tmp_path / "out"))
    assert again.config == m.config and z_image.read_config(str(tmp_path / "out"))["dim"] == 64
    with torch.no_grad():
        torch.testing.assert_close(again(*args), m(*args), rtol=0, atol=0)


def comfy_layout(ref, prefix=""):
    """diffusers weights written in ComfyUI's single-file layout by inverting z_image's table (qkv fused in order)."""
    sd, whole, thirds = ref.state_dict(), {}, {}
    for name in z_image.ZImage(ref.config).state_dict():
        key, rows = z_image.comfy_name(name)  # rows: [(i, i + 1)], the i-th third of qkv
        if rows is None:
            whole[prefix + key] = sd[name].clone()
        else:
            thirds.setdefault(prefix + key, {})[rows[0][0]] = sd[name]
    return {**whole, **{k: torch.cat([p[0], p[1], p[2]]) for k, p in thirds.items()}}


@pytest.mark.parametrize("prefix", ["", z_image.PREFIX])
def test_single_file_is_comfys_layout(pair, prefix, tmp_path):
    ref, root = pair
    orig = comfy_layout(ref, prefix)
    assert prefix + "layers.0.attention.qkv.weight" in orig and prefix + "final_layer.linear.weight" in orig
    back = convert_z_image_transformer_checkpoint_to_diffusers(dict(orig))  # diffusers' own converter
    want = ref.state_dict()
    assert back.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(back[k], want[k], rtol=0, atol=0, msg=k)
    path = tmp_path / "z_image_turbo_bf16.safetensors"
    save_file({**orig, prefix + "norm_final.weight": torch.ones(64)}, str(path))  # unused, in some files
    m, folder = z_image.load(str(path)), z_image.load(str(root))
    assert m.config == folder.config == z_image.read_config(str(path))
    args = inputs()
    with torch.no_grad():
        torch.testing.assert_close(m(*args), folder(*args), rtol=0, atol=0)
    m = z_image.load(str(path), dtype=torch.bfloat16)  # in the file's dtype: a third of qkv must be a copy
    for name, p in m.named_parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), name


def test_strict_loading_names_keys(pair, tmp_path):
    ref, _ = pair
    folder = tmp_path / "transformer"
    ref.save_pretrained(folder)
    file = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(file))
    sd.pop("layers.1.feed_forward.w3.weight")
    save_file({**sd, "layers.0.extra.weight": torch.zeros(1)}, str(file))
    with pytest.raises(CheckpointError, match="missing keys: layers.1.feed_forward.w3.weight; "
                                              "unexpected keys: layers.0.extra.weight") as e:
        z_image.load(str(tmp_path))
    assert "\n" not in str(e.value)
    orig = comfy_layout(ref)
    single = tmp_path / "z.safetensors"
    save_file({**orig, "layers.0.attention.extra.weight": torch.zeros(1)}, str(single))
    with pytest.raises(CheckpointError, match="unexpected keys: layers.0.attention.extra.weight"):
        z_image.load(str(single))
    orig.pop("context_refiner.0.attention.qkv.weight")
    save_file(orig, str(single))
    with pytest.raises(CheckpointError, match="keys missing: context_refiner.0.attention.qkv.weight"):
        z_image.load(str(single))


def test_refusals_are_one_line(pair, tmp_path):
    ref, _ = pair
    folder = tmp_path / "flux" / "transformer"
    ref.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, _class_name="FluxTransformer2DModel")))
    with pytest.raises(CheckpointError, match="holds FluxTransformer2DModel, not ZImageTransformer2DModel") as e:
        z_image.load(str(tmp_path / "flux"))
    assert "\n" not in str(e.value)
    (folder / "config.json").write_text(json.dumps(dict(cfg, siglip_feat_dim=32)))
    with pytest.raises(CheckpointError, match="siglip_feat_dim .* is not built") as e:
        z_image.load(str(folder))
    assert "\n" not in str(e.value)
    other = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1)}, str(other))
    with pytest.raises(CheckpointError, match="not a Z-Image file"):
        z_image.load(str(other))
    for bad, what in [(dict(axes_dims=(4, 6, 8)), "axes_dims"),
                      (dict(all_patch_size=(2, 4), all_f_patch_size=(1, 1)), "one image patch size")]:
        with pytest.raises(ValueError, match=what):
            z_image.ZImage(dict(Z_IMAGE_TINY, **bad))
    # n_kv_heads: diffusers builds every k / v head all the same
    with torch.device("meta"):
        ours, theirs = z_image.ZImage(dict(Z_IMAGE_TINY, n_kv_heads=2)), ZImageTransformer2DModel(
            **dict(Z_IMAGE_TINY, n_kv_heads=2))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_bad_inputs(pair):
    m = z_image.load(str(pair[1]))
    x, t, ctx, mask = inputs()
    with pytest.raises(ValueError, match="multiples of 2"):
        m(x[:, :, :5], t, ctx, mask)
    mask[1] = False
    with pytest.raises(ValueError, match="at least one caption token"):
        m(x, t, ctx, mask)


def test_full_size_parameter_count():
    with torch.device("meta"):
        ours = z_image.ZImage(z_image.Z_IMAGE)
        theirs = ZImageTransformer2DModel(**z_image.Z_IMAGE)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert 6.1e9 < n < 6.2e9  # "6B"
