"""Tiny random-weight SDXL / SD1.5 pipelines built with the reference implementations (diffusers,
transformers), saved as real diffusers folders, so the from-scratch code can be checked against them
without any download.

Layout written (as a hub snapshot): model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/,
and for SDXL also text_encoder_2/, tokenizer_2/.
"""
import io
import json
import os

import numpy as np
import torch
from PIL import Image

from demo import write_tokenizer  # the tiny CLIP BPE tokenizer writer lives in demo.py (the demo needs one too)


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
