"""What several test files share: tiny random-weight SDXL / SD1.5 pipelines built with the reference
implementations (diffusers, transformers), saved as real diffusers folders, so the from-scratch code can be
checked against them without any download; a tiny CLIPModel folder; pair data (JSONL, parquet); a tiny dpo.py
run; a CLI's one error line.

Pipeline layout written (as a hub snapshot): model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/, and for SDXL also text_encoder_2/, tokenizer_2/.
"""
import contextlib
import errno
import io
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import reward

from toy import write_t5_tokenizer as toy_t5_tokenizer
from toy import write_tokenizer  # the tiny CLIP BPE tokenizer writer (the demo's toy model needs one too)

T5_WIDTH = 80  # the tiny T5's d_model: wider than the two tiny CLIPs together (64), so SD3's zero padding shows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)  # for subprocesses: one thread each
# SD1.5 / SDXL's noise schedule as diffusers' scheduler classes take it
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1)


def _text_config(vocab_size, act, proj):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
                          projection_dim=proj, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                          pad_token_id=vocab_size - 1)


def _vae(scaling_factor, channels=(16, 32)):
    """A VAE that downsamples by 2^(len(channels) - 1): 2 by default, 8 (as SD's) with four levels."""
    from diffusers import AutoencoderKL
    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=channels, layers_per_block=1, norm_num_groups=8, sample_size=32,
                         scaling_factor=scaling_factor)


def _randomize(*models, seed=0):
    """Default inits leave some weights at exactly zero (zero_module'd outputs); give every weight noise so
    a wrong wiring cannot hide behind a zero."""
    g = torch.Generator().manual_seed(seed)
    for m in models:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


def sdxl_unet_config():
    """SDXL's structure (no attention at level 0, text_time embedding, linear proj) at toy width."""
    return dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2),
                attention_head_dim=(2, 4, 4), cross_attention_dim=64, norm_num_groups=8,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=32 + 6 * 8)


def sd15_unet_config():
    """SD1.5's structure (attention at levels 0-2, conv proj, fixed head count) at toy width."""
    return dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                block_out_channels=(32, 64, 64), attention_head_dim=4, cross_attention_dim=32,
                norm_num_groups=8, use_linear_projection=False)


def make_sdxl(root, seed=0, vae_channels=(16, 32)):
    """Write a tiny random SDXL pipeline folder at root; returns root."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    torch.manual_seed(seed)
    n = write_tokenizer(os.path.join(root, "tokenizer"))
    write_tokenizer(os.path.join(root, "tokenizer_2"), pad_token="!")
    te1 = CLIPTextModel(_text_config(n, "quick_gelu", 32))
    te2 = CLIPTextModelWithProjection(_text_config(n, "gelu", 32))
    unet = UNet2DConditionModel(**sdxl_unet_config())
    vae = _vae(0.13025, vae_channels)
    _randomize(te1, te2, unet, vae, seed=seed)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                   prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2,
                                     tokenizer=CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer")),
                                     tokenizer_2=CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer_2")),
                                     unet=unet, scheduler=sched)
    pipe.save_pretrained(root)
    return root


def make_sd15(root, seed=0):
    """Write a tiny random SD1.5 pipeline folder at root; returns root."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    torch.manual_seed(seed)
    n = write_tokenizer(os.path.join(root, "tokenizer"))
    te = CLIPTextModel(_text_config(n, "quick_gelu", 32))
    unet = UNet2DConditionModel(**sd15_unet_config())
    vae = _vae(0.18215)
    _randomize(te, unet, vae, seed=seed)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, steps_offset=1, skip_prk_steps=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, unet=unet, scheduler=sched,
                                   tokenizer=CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer")),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root)
    return root


CAPTIONS = ["a red circle", "a blue square", "a photo of a cat", "a green dog"]


def png(rng, h, w):
    """PNG bytes of random pixels."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_pairs_jsonl(root):
    """root/pairs.jsonl: 8 pairs (labels alternate 1/0) + one tie, PNGs of varied sizes in root/img/ (paths relative
    to the JSONL). Returns the JSONL's path."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "img"))
    with open(os.path.join(root, "pairs.jsonl"), "w") as f:
        for i in range(9):
            for j in range(2):
                with open(os.path.join(root, "img", f"{i}_{j}.png"), "wb") as img:
                    img.write(png(rng, 36 + 4 * j, 40 - 2 * i))
            lab = 0.5 if i == 8 else float(i % 2)
            row = dict(caption=CAPTIONS[i % 4], image_0=f"img/{i}_0.png", image_1=f"img/{i}_1.png", label_0=lab)
            f.write(json.dumps(row) + "\n")
    return os.path.join(root, "pairs.jsonl")


def preds(B=3, seed=0):
    """Predictions of a policy and a reference for B pairs, and the noise: model, ref (2B, 4, 8, 8) winners first,
    each the shared noise plus its own error; noise (B, 4, 8, 8)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(B, 4, 8, 8, generator=g)
    model = torch.cat([noise, noise]) + 0.3 * torch.randn(2 * B, 4, 8, 8, generator=g)
    ref = torch.cat([noise, noise]) + 0.3 * torch.randn(2 * B, 4, 8, 8, generator=g)
    return model, ref, noise


def _jpeg(rng, h, w):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_parquet(path, n=10, drop=(), rg=4):
    """A Pick-a-Pic v2 look-alike shard of n pairs (row 3 a tie), row groups of rg rows; drop: columns left out."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(1)
    lab = [0.5 if i == 3 else float(i % 2) for i in range(n)]  # row 3 is a tie
    cols = dict(caption=[CAPTIONS[i % 4] for i in range(n)],
                jpg_0=pa.array([_jpeg(rng, 40, 36) for _ in range(n)], pa.binary()),
                jpg_1=pa.array([_jpeg(rng, 36, 44) for _ in range(n)], pa.binary()),
                label_0=lab, label_1=[1 - x for x in lab],
                model_0=["dreamlike-photoreal-2.0" if i < 6 else "sdxl" for i in range(n)],
                model_1=["dreamlike-art" if i % 3 else "sd-2.1" for i in range(n)])
    pq.write_table(pa.table({k: v for k, v in cols.items() if k not in drop}), path, row_group_size=rg)
    return str(path)


def run(out, model, data, *flags, steps=2):
    """dpo.main in-process on a tiny model at 32 px (latents 16x16: the tiny VAE downsamples by 2)."""
    import dpo
    dpo.main(["--model", model, "--data", data, "--out_dir", str(out), "--resolution", "32", "--batch_size", "2",
              "--grad_accum", "2", "--max_steps", str(steps), "--log_every", "1", "--lr", "1e-4", "--warmup", "0",
              *flags])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def rel_error(a, b):
    """Largest error of a against b, relative to b's largest magnitude."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def read_tensors(path):
    """Every tensor of a .safetensors file, by name."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def spy_on(monkeypatch, module):
    """Record every denoiser train() loads from module and the (t, cond) each forward sees."""
    loaded, calls, real = [], [], module.load

    def load(*a, **k):
        m = real(*a, **k)
        loaded.append(m)
        fwd = m.forward

        def forward(x, t, *cond):
            calls.append((t, cond))
            return fwd(x, t, *cond)
        m.forward = forward
        return m
    monkeypatch.setattr(module, "load", load)
    return loaded, calls


def cli_error(main, argv, capsys):
    """A tool's main(argv) exits non-zero with one error line on stderr; returns that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


# A tiny CLIPModel in two flavours: OpenAI's (quick_gelu, the pre-2023 eos_token_id=2 configs, 32 px / 8) and
# LAION's (gelu, 28 px / 7).
CLIP_TEXT = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
CLIP_VISION = dict(hidden_size=24, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3)
CLIP_FLAVOURS = {"quick_gelu": dict(image_size=32, patch_size=8, legacy_eos=True),
                 "gelu": dict(image_size=28, patch_size=7, legacy_eos=False)}


def make_clip(root, act):
    """A transformers CLIPModel folder with a tokenizer: (folder, model, vocab size)."""
    from transformers import CLIPConfig, CLIPModel
    f = CLIP_FLAVOURS[act]
    n = write_tokenizer(root)
    eos = 2 if f["legacy_eos"] else n - 1
    cfg = CLIPConfig(text_config=dict(CLIP_TEXT, vocab_size=n, hidden_act=act, bos_token_id=n - 2, eos_token_id=eos,
                                      pad_token_id=n - 1),
                     vision_config=dict(CLIP_VISION, hidden_act=act, image_size=f["image_size"],
                                        patch_size=f["patch_size"]),
                     projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every weight off its init (layer norms are 1 and 0 there), logit_scale too
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(root)
    return root, model, n


def transformers_pickscore(model, folder, images, prompts):
    """PickScore by transformers' CLIPModel: logit_scale.exp() * cos(image, prompt); pixels as reward.preprocess
    makes them (tests/test_reward.py checks that against transformers' image processor)."""
    from transformers import CLIPTokenizer
    ids = torch.tensor(CLIPTokenizer.from_pretrained(folder)(prompts, padding="max_length", max_length=77,
                                                             truncation=True).input_ids)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=reward.preprocess(images, 32))
    cos = (out.image_embeds * out.text_embeds).sum(-1) / (out.image_embeds.norm(dim=-1) * out.text_embeds.norm(dim=-1))
    return model.logit_scale.exp().detach() * cos


def read_png(path):
    """A PNG file as a (3, H, W) tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


@contextlib.contextmanager
def small_disk(folder, size):
    """folder on a filesystem of `size` bytes (a tmpfs, where this user may mount one), or None where it may not:
    the tests then make the disk full by injecting ENOSPC instead."""
    os.makedirs(folder, exist_ok=True)
    size = -(-size // 4096) * 4096
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield str(folder)
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill_disk_after(monkeypatch, module, name, calls):
    """module.name(obj, path) writes part of its file then fails as a full disk does, from its calls-th call on a
    file path."""
    real, seen = getattr(module, name), [0]

    def write(obj, path, *a, **k):
        if not isinstance(path, (str, os.PathLike)):  # into memory (torch pickles tensors through torch.save)
            return real(obj, path, *a, **k)
        seen[0] += 1
        if seen[0] < calls:
            return real(obj, path, *a, **k)
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(module, name, write)


# ----------------------------------------------------------------------------------------------------
# Flow models: SD3 / FLUX pipelines (T5 tokenizer, 16-channel VAE)

T5_WORDS = ["a", "photo", "of", "the", "cat", "dog", "on", "mat", "red", "astronaut", "riding", "horse", "in", "space"]


def write_t5_tokenizer(folder):
    """The tiny T5 tokenizer of the flow pipelines (toy.py's writer, these words, the pipelines' 512 cap)."""
    return toy_t5_tokenizer(folder, T5_WORDS)


def _t5(vocab_size, seed):
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=40, num_layers=2, num_heads=4,
                                   feed_forward_proj="gated-gelu", dropout_rate=0.0))


def _vae16(scaling_factor, shift_factor):
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                         scaling_factor=scaling_factor, shift_factor=shift_factor)


def make_sd3(root, seed=0, qk_norm="rms_norm", dual=(0,)):
    """Write a tiny random SD3.5 pipeline folder (SD3 with qk_norm=None, dual=()) at root; returns root."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5TokenizerFast
    torch.manual_seed(seed)
    n = write_tokenizer(os.path.join(root, "tokenizer"))
    write_tokenizer(os.path.join(root, "tokenizer_2"), pad_token="!")
    n5 = write_t5_tokenizer(os.path.join(root, "tokenizer_3"))
    te1 = CLIPTextModelWithProjection(_text_config(n, "quick_gelu", 32))
    te2 = CLIPTextModelWithProjection(_text_config(n, "gelu", 32))
    te3 = _t5(n5, seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                        caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
                                        pos_embed_max_size=32, qk_norm=qk_norm, dual_attention_layers=dual)
    vae = _vae16(1.5305, 0.0609)
    _randomize(te1, te2, te3, transformer, vae, seed=seed)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=te1, tokenizer=CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer")),
        text_encoder_2=te2, tokenizer_2=CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer_2")),
        text_encoder_3=te3, tokenizer_3=T5TokenizerFast.from_pretrained(os.path.join(root, "tokenizer_3")))
    pipe.save_pretrained(root)
    return root


def make_flux(root, seed=0, guidance=True, head_dim=16):
    """Write a tiny random FLUX.1 pipeline folder (dev; schnell with guidance=False) at root; returns root. head_dim
    32: a width of 64, which nf4's blocks of 64 can store (kernels.quantized_linear)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5TokenizerFast
    torch.manual_seed(seed)
    n = write_tokenizer(os.path.join(root, "tokenizer"))
    n5 = write_t5_tokenizer(os.path.join(root, "tokenizer_2"))
    te1 = CLIPTextModel(_text_config(n, "quick_gelu", 32))
    te2 = _t5(n5, seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=head_dim, num_attention_heads=2,
                                         joint_attention_dim=T5_WIDTH,
                                         pooled_projection_dim=32, guidance_embeds=guidance,
                                         axes_dims_rope=(4, 6, 6) if head_dim == 16 else (8, 12, 12))
    vae = _vae16(0.3611, 0.1159)
    _randomize(te1, te2, transformer, vae, seed=seed)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=sched, vae=vae, text_encoder=te1,
                        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer")), text_encoder_2=te2,
                        tokenizer_2=T5TokenizerFast.from_pretrained(os.path.join(root, "tokenizer_2")))
    pipe.save_pretrained(root)
    return root
