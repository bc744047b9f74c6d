"""mmdit.py against diffusers' SD3Transformer2DModel (the oracle) on tiny random SD3 / SD3.5 models, the
full-size structures on the meta device, both checkpoint layouts (checked with diffusers' own converter), and bad
checkpoints."""
import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

import mmdit
from tiny import _randomize
from weights import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# head dim 64, as every real SD3 (a single file's shapes show the width, not the head count)
TINY = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=64, num_attention_heads=2,
            joint_attention_dim=24, caption_projection_dim=128, pooled_projection_dim=20, out_channels=16,
            pos_embed_max_size=16)
CONFIGS = {"sd3": TINY, "sd35": dict(TINY, qk_norm="rms_norm", dual_attention_layers=(0, 1))}


def oracle(kind, seed=0):
    torch.manual_seed(seed)
    ref = SD3Transformer2DModel(**CONFIGS[kind]).eval()
    _randomize(ref, seed=seed)
    return ref


def inputs(B=2, h=8, w=12, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, h, w, generator=g)
    t = torch.tensor([1000.0, 37.5][:B])  # sigma * 1000
    return x, t, torch.randn(B, L, 24, generator=g), torch.randn(B, 20, generator=g)


def assert_close(out, ref, rel=1e-4):
    assert out.shape == ref.shape
    err, scale = (out.float() - ref.float()).abs().max().item(), ref.float().abs().max().item()
    assert scale > 0.1 and err <= rel * scale, f"max abs err {err:.3g} vs output scale {scale:.3g}"


@pytest.fixture(params=["sd3", "sd35"])
def pair(request, tmp_path):
    ref = oracle(request.param)
    ref.save_pretrained(tmp_path / "transformer")
    return ref, tmp_path


def test_matches_diffusers_fp32(pair):
    ref, root = pair
    m = mmdit.load(str(root))  # the model root, holding transformer/
    x, t, ctx, pooled = inputs()
    with torch.no_grad():
        want = ref(x, ctx, pooled, t).sample
        assert_close(m(x, t, ctx, pooled), want)
        small = (x[:1, :, :6, :6], ctx[:1, :3], pooled[:1])
        assert_close(m(small[0], t[:1], small[1], small[2]), ref(*small, t[:1]).sample)


def test_matches_diffusers_bf16(pair):
    ref, root = pair
    m = mmdit.load(str(root / "transformer"), dtype=torch.bfloat16)
    x, t, ctx, pooled = inputs()
    with torch.no_grad():
        truth = ref(x, ctx, pooled, t).sample
        ours = m(x.bfloat16(), t, ctx.bfloat16(), pooled.bfloat16())
        theirs = ref.to(torch.bfloat16)(x.bfloat16(), ctx.bfloat16(), pooled.bfloat16(), t).sample
    assert ours.dtype == torch.bfloat16
    err_ours = (ours.float() - truth).abs().max().item()
    err_theirs = (theirs.float() - truth).abs().max().item()
    assert err_ours <= 2 * err_theirs + 1e-3, (err_ours, err_theirs)


def test_gradient_checkpointing_same_gradients(pair):
    _, root = pair
    x, t, ctx, pooled = inputs()
    grads = []
    for ckpt in (False, True):
        m = mmdit.load(str(root))
        m.train()
        m.gradient_checkpointing = ckpt
        m(x, t, ctx, pooled).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def original_layout(ref):
    """The diffusers weights written in the original single-file layout, through our table."""
    m = mmdit.MMDiT(ref.config)
    sd, out = ref.state_dict(), {}
    for name in m.state_dict():
        key, third, swap = mmdit.original_name(name, m.config["num_layers"] - 1)
        key = mmdit.PREFIX + key
        t = sd[name]
        if swap:
            shift_first = t.chunk(2, dim=0)
            t = torch.cat([shift_first[1], shift_first[0]])
        if third is None:
            out[key] = t.clone()
        else:
            parts = out.setdefault(key, [None] * 3)
            parts[third] = t
    return {k: torch.cat(v) if isinstance(v, list) else v for k, v in out.items()}


def test_single_file_is_the_original_layout(pair, tmp_path):
    ref, root = pair
    orig = original_layout(ref)
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(orig))  # diffusers' own converter
    want = ref.state_dict()
    assert back.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(back[k], want[k], rtol=0, atol=0, msg=k)
    path = tmp_path / "sd3.5_tiny.safetensors"
    save_file({**orig, "first_stage_model.decoder.conv_in.weight": torch.zeros(1)}, str(path))
    m = mmdit.load(str(path))
    for name, p in m.named_parameters():  # a third of a fused qkv is a copy, not a view keeping all of it alive
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), name
    assert m.config["qk_norm"] == ref.config.qk_norm
    assert m.config["dual_attention_layers"] == tuple(ref.config.dual_attention_layers)
    x, t, ctx, pooled = inputs()
    with torch.no_grad():
        assert_close(m(x, t, ctx, pooled), ref(x, ctx, pooled, t).sample)


def test_save_loads_in_diffusers(pair, tmp_path):
    ref, root = pair
    m = mmdit.load(str(root))
    mmdit.save(m, str(tmp_path / "out"))
    back = SD3Transformer2DModel.from_pretrained(str(tmp_path / "out")).eval()
    x, t, ctx, pooled = inputs()
    with torch.no_grad():
        torch.testing.assert_close(back(x, ctx, pooled, t).sample, ref(x, ctx, pooled, t).sample)


@pytest.mark.parametrize("name", ["SD3_MEDIUM", "SD35_MEDIUM", "SD35_LARGE"])
def test_full_size_parameter_count(name):
    cfg = getattr(mmdit, name)
    with torch.device("meta"):
        ours = mmdit.MMDiT(cfg)
        theirs = SD3Transformer2DModel(**cfg)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert n > 2e9


def test_bad_checkpoints(tmp_path):
    flux_like = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1), "img_in.weight": torch.zeros(1, 1)},
              str(flux_like))
    with pytest.raises(CheckpointError, match="FLUX") as e:
        mmdit.load(str(flux_like))
    assert "\n" not in str(e.value)
    ref = oracle("sd3")
    orig = original_layout(ref)
    whole = tmp_path / "sd3.safetensors"
    save_file(orig, str(whole))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        mmdit.load(str(cut))
    orig.pop(mmdit.PREFIX + "joint_blocks.1.x_block.attn.qkv.bias")
    save_file(orig, str(whole))
    with pytest.raises(CheckpointError, match="joint_blocks.1.x_block.attn.qkv.bias"):
        mmdit.load(str(whole))
    folder = tmp_path / "other" / "transformer"
    ref.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, _class_name="FluxTransformer2DModel")))
    with pytest.raises(CheckpointError, match="holds FluxTransformer2DModel, not SD3Transformer2DModel"):
        mmdit.load(str(folder))
    with pytest.raises(CheckpointError, match="does not exist"):
        mmdit.load(os.path.join(str(tmp_path), "nowhere"))


MEASURE = """
import sys, torch, mmdit
def rss(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))
base = rss("VmRSS")
m = mmdit.load(sys.argv[1], dtype=torch.bfloat16)
assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
touched = sum(float(p.detach()[:1].float().abs().sum()) for p in m.parameters())  # every tensor really read
size = sum(p.numel() * p.element_size() for p in m.parameters())
print(sum(p.numel() for p in m.parameters()), size, rss("VmHWM") - base, touched >= 0, m.config["qk_norm"],
      len(m.config["dual_attention_layers"]))
"""


def test_full_size_single_file_loads_within_its_size(tmp_path):
    """SD3.5-medium's original single file (bf16, ~5 GB; fused qkv split, final norms swapped on the way):
    mmdit.load's peak RSS growth stays <= 1.2x the model's own size. The file is sparse (zeros): no disk time."""
    with torch.device("meta"):
        m = mmdit.MMDiT(mmdit.SD35_MEDIUM)
    last = m.config["num_layers"] - 1
    shapes = {}
    for name, t in m.state_dict().items():
        key, third, _ = mmdit.original_name(name, last)
        rows = t.shape[0] * (3 if third is not None else 1)
        shapes[mmdit.PREFIX + key] = (rows,) + tuple(t.shape[1:])
    header, off = {}, 0
    for k, s in shapes.items():
        n = 2 * int(torch.tensor(s).prod())
        header[k] = {"dtype": "BF16", "shape": list(s), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path = str(tmp_path / "sd3.5_medium.safetensors")
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        f.truncate(8 + len(h) + off)
    out = subprocess.run([sys.executable, "-c", MEASURE, path], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-2000:]
    params, size, growth, touched, qk, dual = out.stdout.split()
    assert int(params) == sum(p.numel() for p in m.parameters()) and touched == "True"
    assert (qk, dual) == ("rms_norm", "13")  # the config read off the file's shapes is SD3.5-medium's
    assert int(growth) <= 1.2 * int(size), f"peak RSS grew {int(growth) / 1e6:.0f} MB for a {int(size) / 1e6:.0f} MB"
