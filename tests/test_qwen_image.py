"""qwen_image.py against diffusers' QwenImageTransformer2DModel (the oracle) on tiny random models: outputs in fp32
(unequal per-row text masks) and bf16, its RoPE table, padding invariance, ComfyUI single files, saving, strict loading,
refusals, the full-size structure on the meta device, and gradients with checkpointing."""
import json

import pytest
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope
from safetensors.torch import load_file, save_file

import qwen_image
from tiny_qwen import QWEN_IMAGE_TINY, make_qwen_image_transformer
from weights import CheckpointError

TEXT = QWEN_IMAGE_TINY["joint_attention_dim"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_qwen_image_transformer(tmp_path_factory.mktemp("qwen") / "transformer")


@pytest.fixture(scope="module")
def ref(folder):
    return QwenImageTransformer2DModel.from_pretrained(folder).eval()


def inputs(B=2, h=8, w=12, L=7, seed=0):
    """Latents (B, 16, h, w), t = sigma * 1000, text states (B, L, TEXT), mask with unequal rows (row 0 padded at
    the end, row 1 a hole in the middle as well)."""
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(B, 16, h, w, generator=g), torch.randn(B, L, TEXT, generator=g)
    t = torch.tensor([1000.0, 37.5, 512.0][:B])
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, L - 3:] = False
    if B > 1:
        mask[1, 1:3] = False
        mask[1, L - 1:] = False
    return x, t, ctx, mask


def reference(ref, x, t, ctx, mask):
    """diffusers' model on the pipeline's packing and img_shapes: it takes sigma (not sigma * 1000)."""
    B, C, h, w = x.shape
    packed = QwenImagePipeline._pack_latents(x, B, C, h, w)
    with torch.no_grad():
        out = ref(hidden_states=packed, encoder_hidden_states=ctx, encoder_hidden_states_mask=mask, timestep=t / 1000,
                  img_shapes=[[(1, h // 2, w // 2)]] * B).sample
    return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, 8)[:, :, 0]  # (B, C, 1, h, w) -> (B, C, h, w)


def assert_close(out, ref, rel=1e-5):
    assert out.shape == ref.shape
    err, scale = (out.float() - ref.float()).abs().max().item(), ref.float().abs().max().item()
    assert scale > 0.1 and err <= rel * scale, f"max abs err {err:.3g} vs output scale {scale:.3g}"


def test_matches_diffusers_fp32(folder, ref):
    m = qwen_image.load(str(folder))
    assert m.prediction_type == "flow" and m.latent_channels == 16 and m.dtype == torch.float32
    # non-square, odd token grids (3 x 5: the centring), text lengths not multiples of 16, masked and unmasked
    for shape in (dict(h=8, w=12, L=7), dict(B=1, h=6, w=10, L=13), dict(B=3, h=4, w=4, L=5)):
        x, t, ctx, mask = inputs(**shape)
        with torch.no_grad():
            assert_close(m(x, t, ctx, mask), reference(ref, x, t, ctx, mask))
            assert_close(m(x, t, ctx), reference(ref, x, t, ctx, None))


def test_zero_cond_t_changes_nothing_here(tmp_path, ref):
    """Edit-2511's zero_cond_t modulates reference-image tokens from t = 0: with none, diffusers' output is the
    plain one, and so is ours."""
    other = QwenImageTransformer2DModel.from_pretrained(make_qwen_image_transformer(tmp_path, zero_cond_t=True))
    m = qwen_image.load(str(tmp_path))
    assert m.config["zero_cond_t"]
    x, t, ctx, mask = inputs()
    with torch.no_grad():
        assert_close(m(x, t, ctx, mask), reference(other.eval(), x, t, ctx, mask))
        assert_close(m(x, t, ctx, mask), reference(ref, x, t, ctx, mask))


def test_rope_matches_diffusers():
    """Qwen-Image's full-size table (16, 56, 56) at an odd x even token grid and 1000 text tokens: the centred
    image positions, text after the image's extent, and the fp32 rounding of the angles."""
    h, w, n = 63, 96, 1000
    img, txt = QwenEmbedRope(10000, [16, 56, 56], scale_rope=True)([(1, h, w)], max_txt_seq_len=n, device="cpu")
    cos, sin = qwen_image.rope(qwen_image.position_ids(n, h, w, "cpu"), (16, 56, 56))
    theirs = torch.cat([txt, img])  # (n + h*w, 64) complex, text first as in the joint sequence
    torch.testing.assert_close(cos[:, ::2], theirs.real, rtol=0, atol=2e-6)
    torch.testing.assert_close(sin[:, ::2], theirs.imag, rtol=0, atol=2e-6)
    torch.testing.assert_close(cos[:, 1::2], cos[:, ::2], rtol=0, atol=0)  # one angle per channel pair


def test_padding_does_not_change_the_image(folder):
    """The same prompt (5 tokens) padded with junk to 7 and to 12 tokens, and not padded at all: the same velocity."""
    m = qwen_image.load(str(folder))
    x, t, ctx, _ = inputs(L=5)
    g = torch.Generator().manual_seed(1)
    outs = []
    with torch.no_grad():
        for n in (7, 12):
            padded = torch.cat([ctx, 5 * torch.randn(2, n - 5, TEXT, generator=g)], dim=1)
            mask = torch.arange(n)[None].expand(2, n) < 5
            outs.append(m(x, t, padded, mask))
        outs.append(m(x, t, ctx))  # mask None: kernels.attention's path
        outs.append(m(x, t, ctx, torch.ones(2, 5, dtype=torch.bool)))  # all True: the same path
    for out in outs[1:]:
        assert_close(out, outs[0], rel=1e-5)


def test_matches_diffusers_bf16(folder, ref):
    m = qwen_image.load(str(folder), dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in m.parameters())
    x, t, ctx, mask = inputs()
    truth = reference(ref, x, t, ctx, mask)
    with torch.no_grad():
        ours = m(x.bfloat16(), t, ctx.bfloat16(), mask)
    theirs = reference(QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval(),
                       x.bfloat16(), t, ctx.bfloat16(), mask)
    assert ours.dtype == torch.bfloat16
    err_ours, err_theirs = (ours.float() - truth).abs().max().item(), (theirs.float() - truth).abs().max().item()
    assert err_ours <= 2 * err_theirs + 1e-3, (err_ours, err_theirs)
    m32 = qwen_image.load(str(folder), dtype=torch.bfloat16, norm_dtype=torch.float32)
    assert m32.txt_norm.weight.dtype == torch.float32 and m32.img_in.weight.dtype == torch.bfloat16


# The last block's text stream after its attention's keys and values feeds nothing (as in diffusers): no gradient.
DEAD = {f"transformer_blocks.1.{n}" for n in (
    "attn.add_q_proj.weight", "attn.add_q_proj.bias", "attn.norm_added_q.weight", "attn.to_add_out.weight",
    "attn.to_add_out.bias", "txt_mlp.net.0.proj.weight", "txt_mlp.net.0.proj.bias", "txt_mlp.net.2.weight",
    "txt_mlp.net.2.bias")}


def test_gradients_and_checkpointing(folder):
    x, t, ctx, mask = inputs()
    grads = []
    for ckpt in (False, True):
        m = qwen_image.load(str(folder))
        m.train()
        m.gradient_checkpointing = ckpt
        m(x, t, ctx, mask).square().mean().backward()
        dead = {n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0}
        assert dead == DEAD
        grads.append(torch.cat([p.grad.flatten() for n, p in m.named_parameters() if n not in dead]))
    torch.testing.assert_close(grads[0], grads[1])
    assert isinstance(m.transformer_blocks[0], qwen_image.Block)


def test_save_round_trip_and_diffusers_loads_it(folder, ref, tmp_path):
    m = qwen_image.load(str(folder))
    qwen_image.save(m, str(tmp_path / "out"), metadata={"step": "3"})
    back = qwen_image.load(str(tmp_path / "out"))
    assert back.config == m.config
    theirs = QwenImageTransformer2DModel.from_pretrained(str(tmp_path / "out")).eval()
    x, t, ctx, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, ctx, mask), m(x, t, ctx, mask), rtol=0, atol=0)
    torch.testing.assert_close(reference(theirs, x, t, ctx, mask), reference(ref, x, t, ctx, mask), rtol=0, atol=0)
    with pytest.raises(ValueError, match="diffusers layout only"):
        qwen_image.save(m, str(tmp_path / "x"), layout="comfy")


@pytest.mark.parametrize("prefix", ["", qwen_image.PREFIX])
def test_comfyui_single_file(prefix, tmp_path):
    """ComfyUI's files hold diffusers' names (bare, or under model.diffusion_model. beside other models' weights);
    the config is read off the shapes (head dim 32: the 1:7:7 RoPE split is (4, 14, 14)); bf16 stays bf16."""
    cfg = dict(attention_head_dim=32, axes_dims_rope=(4, 14, 14))
    ref = QwenImageTransformer2DModel.from_pretrained(make_qwen_image_transformer(tmp_path / "folder", **cfg)).eval()
    sd = {prefix + k: v.bfloat16() for k, v in ref.state_dict().items()}
    extra = {"vae.decoder.conv_in.weight": torch.zeros(1), prefix + qwen_image.MARKER: torch.zeros(0)} if prefix else {}
    path = tmp_path / "qwen_image_bf16.safetensors"
    save_file({**sd, **extra}, str(path))
    m, folder = qwen_image.load(str(path), dtype=torch.bfloat16), qwen_image.load(str(tmp_path / "folder"))
    assert m.config == dict(folder.config, zero_cond_t=bool(prefix))  # the marker: Edit-2511's zero_cond_t
    assert qwen_image.read_config(str(path)) == m.config
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    x, t, ctx, mask = inputs()
    with torch.no_grad():
        assert_close(qwen_image.load(str(path))(x, t, ctx, mask), reference(ref, x, t, ctx, mask), rel=1e-2)
    sd.pop(prefix + "proj_out.bias")
    save_file({**sd, prefix + "proj_out.scale_weight": torch.ones(1)}, str(path))  # a scaled-fp8 file's key
    with pytest.raises(CheckpointError, match="missing keys: proj_out.bias; unexpected keys: proj_out.scale_weight"):
        qwen_image.load(str(path))


def test_strict_load_names_keys(folder, tmp_path):
    sd = load_file(f"{folder}/diffusion_pytorch_model.safetensors")
    sd.pop("transformer_blocks.1.attn.add_k_proj.bias")
    sd["transformer_blocks.0.attn.to_qkv.weight"] = torch.zeros(1)
    (tmp_path / "transformer").mkdir()
    save_file(sd, str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "transformer" / "config.json").write_text(open(f"{folder}/config.json").read())
    with pytest.raises(CheckpointError) as e:
        qwen_image.load(str(tmp_path))  # the model root, holding transformer/
    msg = str(e.value)
    assert "missing keys: transformer_blocks.1.attn.add_k_proj.bias" in msg and "\n" not in msg
    assert "unexpected keys: transformer_blocks.0.attn.to_qkv.weight" in msg


def test_refusals(folder, tmp_path):
    cfg = json.loads(open(f"{folder}/config.json").read())
    for cls, said in (("FluxTransformer2DModel", "holds FluxTransformer2DModel, not QwenImageTransformer2DModel"),
                      ("QwenImage21Transformer2DModel", r"Qwen-Image 2.x \(QwenImage21Transformer2DModel\)")):
        other = tmp_path / cls
        other.mkdir()
        (other / "config.json").write_text(json.dumps(dict(cfg, _class_name=cls)))
        with pytest.raises(CheckpointError, match=said) as e:
            qwen_image.load(str(other))
        assert "\n" not in str(e.value)
    flux_file = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1), "img_in.weight": torch.zeros(1, 1)},
              str(flux_file))
    with pytest.raises(CheckpointError, match="not a Qwen-Image transformer file"):
        qwen_image.load(str(flux_file))
    layered = tmp_path / "layered"
    (layered / "transformer").mkdir(parents=True)
    (layered / "transformer" / "config.json").write_text(json.dumps(dict(cfg, use_additional_t_cond=True)))
    save_file({"x": torch.zeros(1)}, str(layered / "transformer" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="use_additional_t_cond=True") as e:
        qwen_image.load(str(layered))
    assert "\n" not in str(e.value)
    for bad, said in ((dict(guidance_embeds=True), "guidance_embeds"), (dict(axes_dims_rope=(4, 6, 8)), "axes_dims"),
                      (dict(out_channels=None), "4 x out_channels"), (dict(patch_size=1), "patch_size"),
                      (dict(use_layer3d_rope=True), "use_layer3d_rope")):
        with pytest.raises(ValueError, match=said):
            qwen_image.QwenImage(dict(QWEN_IMAGE_TINY, **bad))
    m = qwen_image.QwenImage(QWEN_IMAGE_TINY)
    x, t, ctx, mask = inputs()
    with pytest.raises(ValueError, match="must be even"):
        m(x[:, :, :7], t, ctx, mask)
    with pytest.raises(ValueError, match="must be"):
        m(x, t, ctx, mask[:, :3])


def test_full_size_parameter_count():
    with torch.device("meta"):
        ours = qwen_image.QwenImage(qwen_image.QWEN_IMAGE)
        theirs = QwenImageTransformer2DModel(**qwen_image.QWEN_IMAGE)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert 20e9 < n < 21e9
