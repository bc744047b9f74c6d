"""The CPU demos behind `python dpo.py` (SDXL's architecture), `python dpo.py --demo flow` (FLUX.1-dev's) and
`--demo zimage` (Z-Image's): Diffusion-DPO in a toy world where the preference is visible by eye.

World (toy.py): prompts "a <colour> <shape>" (red/green/blue x circle/square); 16x16 images of one shape at a
random size and place on white. Rule (the "human" preference): the larger shape wins, area = pixels far from the
background (toy.area, a scorer like reward.py's real ones: `--score area`). Fidelity: the shape's dominant colour
is the prompt's colour.

Steps (all with the repo's own code, results in demo_out/, or demo_out_flow/, demo_out_zimage/ for the others):
  1. data/: JSONL + PNG pairs in dpo.py's --data format: 1536 unbiased pairs (random labels) for the reference,
     1536 rule-labelled pairs for DPO, 96 held-out rule-labelled pairs (for `evaluate.py --eval_pairs`).
  2. init/: a diffusers-layout model with random frozen text encoders and a vae.py VAE trained 300 steps to
     reconstruct the world (scaling_factor = 1/latent std; the flow model's also shift_factor = latent mean).
     sdxl: a 3-level UNet with text_time embedding, two CLIP text encoders, pooled embedding, time ids.
     flow: FLUX.1-dev's transformer (double and single blocks, RoPE, the guidance input) with CLIP-L's pooled
     embedding and a T5 encoder whose tokenizer caps prompts at 8 tokens; FLUX's flow-matching scheduler.
     zimage: Z-Image's single-stream transformer (refiners, then joint blocks over [image; caption]) reading a
     Qwen3 language model's second-to-last states of the chat-templated prompt; Z-Image's scheduler (shift 3).
  3. base/: the reference = init with its denoiser pretrained by dpo.train(loss="sft") on the unbiased pairs
     (noise prediction for the UNet, flow matching for the transformers).
  4. dpo/: dpo.train(loss="dpo") from base/ on the rule-labelled pairs (latent cache, CPU, fp32; the flow models
     with their family's beta, families.FLOW_BETA, eq. 14 on the velocity errors).
  5. Reference and DPO model sample the same prompts from the same initial noise with sample.py's pipeline
     (16 per prompt, Euler 20 steps; the UNet with guidance 3, FLUX-dev with its guidance input 3.5, no CFG, as
     its pipeline, Z-Image with guidance 0: no CFG); win rate = how often the DPO sample's shape is larger (ties
     0.5); grid.png shows the pairs side by side (rows = prompts, columns = reference | DPO for 4 noises).
     prompts.txt lists the prompts for evaluate.py (`--compare --prompts demo_out/prompts.txt --score area` is
     the same evaluation, other noise).

The defaults (beta, lr) are the settings that move the samples without losing their colours; the README has the
measured numbers of the demos, their beta and lr sweeps and times. A second run reuses base/ and data/ (the stamp
base/demo_world.json must match the demo's world).
"""
import argparse
import json
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import clip
import dashboard
import families
import flux
import images
import llm
import online
import sample
import t5
import unet as unetlib
import vae as vaelib
import z_image
from reward import win_rate
from toy import (PROMPTS, RADIUS, SIZE, area, fidelity, random_image, write_qwen_tokenizer, write_t5_tokenizer,
                 write_tokenizer)
from weights import save_json, save_jsonl, save_safetensors

# ----------------------------------------------------------------------------------------------------
# The data set: JSONL + PNG files in dpo.py's --data format


def write_pairs(folder: str, name: str, n: int, seed: int, biased: bool) -> str:
    """n pairs of one prompt each, as folder/name.jsonl + folder/name/*.png.

    biased=False: label_0 is a coin flip (the SFT reference learns the unbiased size distribution from the
    winners); biased=True: the rule decides (larger area wins; equal areas are ties, label 0.5)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    rows = []
    for i in range(n):
        prompt = PROMPTS[i % len(PROMPTS)]
        pair = [random_image(prompt, rng) for _ in range(2)]
        if biased:
            a = area(torch.from_numpy(np.stack(pair)).permute(0, 3, 1, 2))
            label = 1.0 if a[0] > a[1] else 0.0 if a[0] < a[1] else 0.5
        else:
            label = float(rng.integers(0, 2))
        paths = []
        for k, img in enumerate(pair):
            paths.append(f"{name}/{i:05d}_{k}.png")
            Image.fromarray((img * 255).round().astype(np.uint8)).save(os.path.join(folder, paths[-1]))
        rows.append(dict(caption=prompt, image_0=paths[0], image_1=paths[1], label_0=label))
    path = os.path.join(folder, f"{name}.jsonl")
    save_jsonl(rows, path)
    return path


# ----------------------------------------------------------------------------------------------------
# The toy model: SDXL's architecture (two text encoders, pooled embedding, time ids, text_time embedding,
# attention only below the top level) at a width that trains on a laptop CPU in minutes

LATENT = SIZE // 2  # the VAE below downsamples by 2
UNET_CONFIG = dict(sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1,
                   down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                   up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                   block_out_channels=[32, 64, 64], transformer_layers_per_block=1, attention_head_dim=[2, 4, 4],
                   cross_attention_dim=64, norm_num_groups=8, use_linear_projection=True,
                   addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=32 + 6 * 8)  # pooled (32) + 6 time ids x 8
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32], layers_per_block=1,
                  norm_num_groups=8, sample_size=SIZE, force_upcast=False)
SCHEDULER = dict(_class_name="EulerDiscreteScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
                 interpolation_type="linear", use_karras_sigmas=False)


def text_config(vocab: int, projection: bool) -> dict:
    """A 2-layer, 32-wide CLIP text encoder (CLIP-L-like first, bigG-like second: gelu + projection)."""
    return dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="gelu" if projection else "quick_gelu", layer_norm_eps=1e-5,
                projection_dim=32, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
                model_type="clip_text_model",
                architectures=["CLIPTextModelWithProjection" if projection else "CLIPTextModel"])


def train_vae(steps: int, seed: int, log=print, shift=False):
    """A from-scratch vae.AutoencoderKL trained to reconstruct the world's images (latent noise makes the decoder
    forgiving of imperfect diffusion samples); scaling_factor = 1 / std of the latents, as SD's was chosen, and
    with shift the latents' mean as shift_factor, as FLUX's and SD3's were."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.stack([random_image(PROMPTS[i % len(PROMPTS)], rng) for i in range(1536)]))
    x = x.permute(0, 3, 1, 2) * 2 - 1  # (N, 3, H, W) in [-1, 1]
    v = vaelib.AutoencoderKL(VAE_CONFIG, scaling_factor=1.0)
    opt = torch.optim.AdamW(v.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for s in range(steps):
        batch = x[torch.randint(0, len(x), (32,), generator=g)]
        z = v.encode(batch)  # (32, 4, h, w)
        rec = v.decode(z + 0.1 * torch.randn(z.shape, generator=g))
        loss = F.mse_loss(rec, batch) + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (s + 1) % 50 == 0:
            log(f"vae: step {s + 1}/{steps} reconstruction mse {loss.item():.4f}")
    v.eval()
    with torch.no_grad():
        z = v.encode(x[:512])
    if shift:
        v.shift_factor = v.config["shift_factor"] = round(float(z.mean()), 5)
    v.scaling_factor = v.config["scaling_factor"] = round(1.0 / float((z - v.shift_factor).std()), 5)
    return v


def build_model(root: str, vae_steps: int, seed: int, log=print) -> str:
    """A complete diffusers-layout SDXL-architecture folder (random UNet, trained VAE, random frozen text encoders,
    tokenizers, scheduler, model_index.json), written with the repo's own code; loadable by unet/vae/clip/sample."""
    torch.manual_seed(seed)
    vocab = write_tokenizer(os.path.join(root, "tokenizer"))
    write_tokenizer(os.path.join(root, "tokenizer_2"), pad_token="!")  # SDXL's second tokenizer pads with "!"
    for sub, proj in (("text_encoder", False), ("text_encoder_2", True)):
        cfg = text_config(vocab, proj)
        te = clip.TextTransformer(cfg, projection=proj)
        save_safetensors(te.state_dict(), os.path.join(root, sub, "model.safetensors"))
        save_json(cfg, os.path.join(root, sub, "config.json"))
    unetlib.save(unetlib.UNet(dict(UNET_CONFIG)), os.path.join(root, "unet"), layout="diffusers")
    vaelib.save(train_vae(vae_steps, seed, log), os.path.join(root, "vae"), layout="diffusers")
    os.makedirs(os.path.join(root, "scheduler"), exist_ok=True)
    save_json(SCHEDULER, os.path.join(root, "scheduler", "scheduler_config.json"))
    index = dict(_class_name="StableDiffusionXLPipeline", _diffusers_version="0.42.1",
                 force_zeros_for_empty_prompt=False,  # training drops prompts to "", so guide with "" too
                 scheduler=["diffusers", "EulerDiscreteScheduler"], unet=["diffusers", "UNet2DConditionModel"],
                 vae=["diffusers", "AutoencoderKL"], text_encoder=["transformers", "CLIPTextModel"],
                 text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                 tokenizer=["transformers", "CLIPTokenizer"], tokenizer_2=["transformers", "CLIPTokenizer"])
    save_json(index, os.path.join(root, "model_index.json"))
    return root


# The flow toy: FLUX.1-dev's architecture (CLIP-L's pooled embedding, T5's token embeddings, double and single
# blocks with RoPE, the guidance input; 2x2-packed 4-channel latents), its pipeline's flow-matching scheduler

FLUX_CONFIG = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                   axes_dims_rope=[4, 6, 6])  # 16 channels = 4 latent channels x one 2x2 patch
T5_TOKENS = 8  # the toy T5 tokenizer's model_max_length: "a red circle" and </s> fit, and 8 text tokens keep the
# transformer's sequence short (FLUX-dev's pipeline pads to 512; diffusers: pass max_sequence_length=8)
FLOW_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0,
                      use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)  # FLUX.1-dev's


def t5_config(vocab: int) -> dict:
    """A 2-layer, 32-wide T5 v1.1 encoder (gated-gelu, relative position buckets), transformers' config.json."""
    return dict(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True, model_type="t5",
                architectures=["T5EncoderModel"])


def build_flux(root: str, vae_steps: int, seed: int, log=print) -> str:
    """A complete diffusers-layout FLUX.1-dev-architecture folder (random transformer, trained VAE with FLUX's
    shift, random frozen CLIP-L and T5, tokenizers, scheduler, model_index.json), written with the repo's code."""
    torch.manual_seed(seed)
    vocab = write_tokenizer(os.path.join(root, "tokenizer"))
    n5 = write_t5_tokenizer(os.path.join(root, "tokenizer_2"), model_max_length=T5_TOKENS)
    cfg = text_config(vocab, False)
    save_safetensors(clip.TextTransformer(cfg, projection=False).state_dict(),
                     os.path.join(root, "text_encoder", "model.safetensors"))
    save_json(cfg, os.path.join(root, "text_encoder", "config.json"))
    cfg = t5_config(n5)
    save_safetensors(t5.T5Encoder(cfg).state_dict(), os.path.join(root, "text_encoder_2", "model.safetensors"))
    save_json(cfg, os.path.join(root, "text_encoder_2", "config.json"))
    flux.save(flux.Flux(dict(FLUX_CONFIG)), os.path.join(root, "transformer"))
    vaelib.save(train_vae(vae_steps, seed, log, shift=True), os.path.join(root, "vae"), layout="diffusers")
    os.makedirs(os.path.join(root, "scheduler"), exist_ok=True)
    save_json(FLOW_SCHEDULER, os.path.join(root, "scheduler", "scheduler_config.json"))
    index = dict(_class_name="FluxPipeline", _diffusers_version="0.42.1",
                 scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"],
                 transformer=["diffusers", "FluxTransformer2DModel"], vae=["diffusers", "AutoencoderKL"],
                 text_encoder=["transformers", "CLIPTextModel"], text_encoder_2=["transformers", "T5EncoderModel"],
                 tokenizer=["transformers", "CLIPTokenizer"], tokenizer_2=["transformers", "T5TokenizerFast"])
    save_json(index, os.path.join(root, "model_index.json"))
    return root


# The Z-Image toy: its single-stream transformer (a refiner block each for the image's 2x2 patches and the caption,
# then joint blocks over both, sequences padded to 32 tokens) reading a random frozen Qwen3's second-to-last states
# of the chat-templated prompt (11 tokens), Z-Image's scheduler; the flow toy's VAE

# the text encoder's config.json in transformers' Qwen3 names, less vocab_size (the tokenizer's)
QWEN3_TOY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, hidden_act="silu", rms_norm_eps=1e-6, attention_bias=False,
                 max_position_embeddings=512, rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
                 tie_word_embeddings=True, model_type="qwen3", architectures=["Qwen3ForCausalLM"])
Z_CONFIG = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=4, dim=64, n_layers=2, n_refiner_layers=1,
                n_heads=4, n_kv_heads=4, norm_eps=1e-5, qk_norm=True, cap_feat_dim=QWEN3_TOY["hidden_size"],
                rope_theta=256.0, t_scale=1000.0, axes_dims=[4, 6, 6], axes_lens=[1536, 512, 512])  # head dim 16
Z_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0,
                   use_dynamic_shifting=False)  # Z-Image's
# Qwen3's chat template for plain turns: one user message with add_generation_prompt renders llm.Z_IMAGE_TEMPLATE
# (what ZImagePipeline asks apply_chat_template for)
CHAT_TEMPLATE = ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
                 "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def build_z_image(root: str, vae_steps: int, seed: int, log=print) -> str:
    """A complete diffusers-layout Z-Image-architecture folder (random transformer, trained VAE with a shift, a random
    frozen Qwen3 language model and its byte-level BPE tokenizer, Z-Image's scheduler, model_index.json), written with
    the repo's own code; ZImagePipeline.from_pretrained loads it."""
    torch.manual_seed(seed)
    cfg = dict(QWEN3_TOY, vocab_size=write_qwen_tokenizer(os.path.join(root, "tokenizer"), llm.PRETOKENIZE_REGEX,
                                                          chat_template=CHAT_TEMPLATE))
    lm = llm.LanguageModel(cfg)  # every layer and the final norm, keyed as Qwen3ForCausalLM saves them (lm_head tied)
    save_safetensors({"model." + k: v for k, v in lm.state_dict().items()},
                     os.path.join(root, "text_encoder", "model.safetensors"))
    save_json(cfg, os.path.join(root, "text_encoder", "config.json"))
    z_image.save(z_image.ZImage(dict(Z_CONFIG)), os.path.join(root, "transformer"))
    vaelib.save(train_vae(vae_steps, seed, log, shift=True), os.path.join(root, "vae"), layout="diffusers")
    os.makedirs(os.path.join(root, "scheduler"), exist_ok=True)
    save_json(Z_SCHEDULER, os.path.join(root, "scheduler", "scheduler_config.json"))
    index = dict(_class_name="ZImagePipeline", _diffusers_version="0.42.1",
                 scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"],
                 transformer=["diffusers", "ZImageTransformer2DModel"], vae=["diffusers", "AutoencoderKL"],
                 text_encoder=["transformers", "Qwen3ForCausalLM"], tokenizer=["transformers", "Qwen2Tokenizer"])
    save_json(index, os.path.join(root, "model_index.json"))
    return root


# ----------------------------------------------------------------------------------------------------
# The run: world -> reference (SFT) -> DPO -> side-by-side evaluation

# Everything the base model depends on; a stamp of it lets a second run reuse demo_out/base.
WORLD = dict(size=SIZE, radius=RADIUS, prompts=PROMPTS, unet=UNET_CONFIG, vae=VAE_CONFIG, vae_steps=300,
             sft_pairs=1536, sft=dict(max_steps=400, batch_size=32, lr=1e-3, warmup=20), seed=0, version=1)
FLOW_WORLD = dict(size=SIZE, radius=RADIUS, prompts=PROMPTS, transformer=FLUX_CONFIG, t5_tokens=T5_TOKENS,
                  vae=VAE_CONFIG, vae_steps=300, sft_pairs=1536,
                  sft=dict(max_steps=1500, batch_size=32, lr=1e-3, warmup=20), seed=0, version=1)
Z_WORLD = dict(size=SIZE, radius=RADIUS, prompts=PROMPTS, transformer=Z_CONFIG, text_encoder=QWEN3_TOY,
               vae=VAE_CONFIG, vae_steps=300, sft_pairs=1536,
               sft=dict(max_steps=1500, batch_size=32, lr=1e-3, warmup=20), seed=0, version=1)
# DPO defaults (each one overridden by the same dpo.py flag when given); batch_size counts pairs over all ranks;
# beta is the loss's own default (dpo.BETA: 5000 for eq. 14; families.FLOW_BETA for the flow models)
DPO_DEFAULTS = dict(lr=5e-6, max_steps=100, batch_size=16, grad_accum=1, warmup=10)
FLOW_DPO_DEFAULTS = dict(lr=2e-5, max_steps=100, batch_size=16, grad_accum=1, warmup=10)
Z_DPO_DEFAULTS = dict(lr=5e-5, max_steps=100, batch_size=16, grad_accum=1, warmup=10)  # (2e-5 wins less often)
DPO_PAIRS, HELDOUT_PAIRS = 1536, 96
EVAL = dict(noises=16, steps=20, guidance=3.0, seed=1234)  # guidance: the UNet's CFG scale
FLOW_EVAL = dict(noises=16, steps=20, guidance=flux.GUIDANCE, seed=1234)  # FLUX-dev's guidance input, no CFG
# ZImagePipeline's guidance_scale: 0 = no CFG (CFG grows the reference's shapes too, and DPO wins less often)
Z_EVAL = dict(noises=16, steps=20, guidance=0.0, seed=1234)
# Online DPO from the same reference, no labels: the policy's own samples scored by the rule (dpo.py --online)
ONLINE_DEFAULTS = dict(lr=2e-6, max_steps=100, batch_size=8, grad_accum=1, warmup=10)  # 8 prompts x 4 samples a step
# (the other online flags keep online.py's defaults, or the user's values)
ONLINE = dict(online=True, score=["area"], score_specs=online.specs(["area"]), eval_specs=[], sample_steps=10,
              sample_guidance=EVAL["guidance"], eval_every=25, eval_n=24, save_pairs=True, data=None, cache=False)
# Flow-GRPO, DiffusionNFT and online DPO from the flow demo's reference (its toy FLUX.1-dev), the rule as the reward,
# no labels, the same 640 sampled images: 40 steps x 4 prompts x 4 samples, 10 sampling steps (GRPO: the SDE; 3 of
# them trained per step, rl.py), each loss at the learning rate that keeps the shapes (NFT at 1e-4 turns every
# sample into a full-frame square; online DPO is eq. 14 on each prompt's best vs worst, flow beta)
RL_DEFAULTS = dict(max_steps=40, batch_size=4, grad_accum=1, warmup=0)
RL = dict(online=True, score=["area"], score_specs=online.specs(["area"]), eval_specs=[], sample_steps=10,
          eval_steps=FLOW_EVAL["steps"], sample_guidance=FLOW_EVAL["guidance"], eval_every=10, eval_n=24,
          save_pairs=False, data=None, cache=False, samples_per_prompt=4)
RL_LOSSES = {"grpo": dict(loss="grpo", sampler="sde", kl=0.04, beta=0.0, lr=1e-4, train_steps=0.3),
             "nft": dict(loss="nft", sampler="ode", kl=1e-4, beta=1.0, lr=1e-5, train_steps=0.3),
             "online_flow": dict(loss="dpo", sampler="ode", beta=families.FLOW_BETA["dpo"], lr=2e-5)}
# The demos: (world, model builder, DPO defaults, evaluation, default out_dir, what the model is)
DEMOS = {"sdxl": (WORLD, build_model, DPO_DEFAULTS, EVAL, "demo_out", "SDXL-architecture"),
         "flow": (FLOW_WORLD, build_flux, FLOW_DPO_DEFAULTS, FLOW_EVAL, "demo_out_flow", "FLUX.1-dev-architecture"),
         "zimage": (Z_WORLD, build_z_image, Z_DPO_DEFAULTS, Z_EVAL, "demo_out_zimage", "Z-Image-architecture"),
         "online": (WORLD, build_model, ONLINE_DEFAULTS, EVAL, "demo_out", "SDXL-architecture"),
         "grpo": (FLOW_WORLD, build_flux, RL_DEFAULTS, FLOW_EVAL, "demo_out_flow", "FLUX.1-dev-architecture"),
         "nft": (FLOW_WORLD, build_flux, RL_DEFAULTS, FLOW_EVAL, "demo_out_flow", "FLUX.1-dev-architecture"),
         "online_flow": (FLOW_WORLD, build_flux, RL_DEFAULTS, FLOW_EVAL, "demo_out_flow", "FLUX.1-dev-architecture")}
OFFLINE = ("sdxl", "flow", "zimage")  # the offline DPO demos: dpo/ and grid.png in their own out_dir


def _train_args(args, user=(), **kw):
    """Training arguments: the demo's settings (CPU, fp32, latent cache, ...) and kw on top of args (parsed by
    dpo.parse_args), except the flags named in user, which keep the user's value (the world's paths and image
    size always stay the demo's). kw's batch_size is split over the ranks, so every world size trains the same."""
    if "batch_size" in kw:
        kw["batch_size"] = max(1, kw["batch_size"] // dist.get_world_size())
    a = argparse.Namespace(**vars(args))
    settings = dict(dict(device="cpu", dtype="fp32", optimizer="adamw", weight_decay=0.0, cache=True,
                         gradient_checkpointing=False, num_workers=0, resume=False, tokenizer=None, prompt_dropout=0.1,
                         log_every=25, ckpt_every=10 ** 9, lora=None, lora_alpha=None, quantize=None), **kw)
    for k in set(user) - {"model", "data", "out_dir", "cache_dir"}:
        settings.pop(k, None)
    a.__dict__.update(settings, resolution=SIZE, unet_init=None, cache_dir=kw.get("cache_dir"))
    return a


def _copy_model(src: str, dst: str, tuned: str):
    """dst = the model folder src with its denoiser (unet/ or transformer/) replaced by the folder tuned (written
    to a temporary name, then renamed)."""
    sub = os.path.basename(os.path.normpath(tuned))
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(sub))
    shutil.copytree(tuned, os.path.join(tmp, sub))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def build_world(root: str, args, train, log, demo="sdxl"):
    """data/ (SFT, DPO and held-out pairs) and base/ (the SFT-pretrained reference model), reused when the stamp
    in base/ matches the demo's world. Rank 0 writes the files; every rank takes part in the SFT run."""
    world, build, *_, what = DEMOS[demo]
    stamp = os.path.join(root, "base", "demo_world.json")
    if os.path.isfile(stamp) and json.load(open(stamp)) == json.loads(json.dumps(world)):
        log(f"reusing {root}/base and {root}/data (delete them to rebuild)")
        return
    seed, data, init = world["seed"], os.path.join(root, "data"), os.path.join(root, "init")
    sft_dir = os.path.join(root, "sft")
    if dist.get_rank() == 0:
        t = time.time()
        shutil.rmtree(data, ignore_errors=True)  # with its latent cache of the old world
        write_pairs(data, "sft", world["sft_pairs"], seed + 1, biased=False)
        write_pairs(data, "dpo", DPO_PAIRS, seed + 2, biased=True)
        write_pairs(data, "heldout", HELDOUT_PAIRS, seed + 3, biased=True)
        log(f"data: {world['sft_pairs']} unbiased pairs (SFT), {DPO_PAIRS} + {HELDOUT_PAIRS} held-out rule-labelled "
            f"pairs in {data} ({time.time() - t:.0f}s)")
        t = time.time()
        shutil.rmtree(init, ignore_errors=True)
        build(init, world["vae_steps"], seed, log)
        log(f"model: tiny {what} folder {init} ({time.time() - t:.0f}s)")
        shutil.rmtree(sft_dir, ignore_errors=True)
    dist.barrier()
    t = time.time()
    log("reference: SFT on the unbiased pairs' (random) winners")
    train(_train_args(args, model=init, data=os.path.join(data, "sft.jsonl"), out_dir=sft_dir, loss="sft",
                      seed=seed, grad_accum=1, **world["sft"]))
    if dist.get_rank() == 0:
        tuned = os.path.join(sft_dir, families.of(init).subfolder)  # sft/unet or sft/transformer
        _copy_model(init, os.path.join(root, "base"), tuned)
        save_json(world, stamp)
        log(f"reference: {root}/base ({time.time() - t:.0f}s)")
    dist.barrier()


@torch.no_grad()
def side_by_side(root: str, tuned: str, demo="sdxl", grid="grid.png"):
    """Sample reference and DPO model from the same prompts and initial noise (sample.py's pipeline: the
    sampler of the family, as diffusers' pipelines run it); score with the rule and fidelity."""
    ev = DEMOS[demo][3]
    pipe = sample.load(os.path.join(root, "base"))
    pipe.progress = False
    n = ev["noises"]
    prompts = [p for p in PROMPTS for _ in range(n)]
    g = torch.Generator().manual_seed(ev["seed"])
    latents = torch.randn((len(prompts), *pipe.latent_shape(SIZE, SIZE)), generator=g)  # (B, C, h, w) for both

    def samples():  # (B, 3, H, W) in [0, 1]
        return pipe(prompts, steps=ev["steps"], guidance=ev["guidance"], latents=latents, height=SIZE, width=SIZE)
    ref_img = samples()
    pipe.unet = pipe.family.load(tuned)
    dpo_img = samples()
    res = dict(win_rate=win_rate(area(ref_img), area(dpo_img))["win_rate"],
               fidelity_ref=float(fidelity(ref_img, prompts).mean()),
               fidelity_dpo=float(fidelity(dpo_img, prompts).mean()),
               area_ref=float(area(ref_img).mean()), area_dpo=float(area(dpo_img).mean()))
    k = min(n, 4)  # grid: one row per prompt, (reference, DPO) column pairs for its first k noises
    rows = [[im for j in range(k) for im in (ref_img[i * n + j], dpo_img[i * n + j])] for i in range(len(PROMPTS))]
    img = images.grid(rows)
    img = img.resize((img.width * 4, img.height * 4), Image.NEAREST)
    images.save_png(img, os.path.join(root, grid))
    return res


def run(args, train):
    """`python dpo.py [--demo flow|zimage|...]` with no --model: build the toy world (cached in its out_dir), DPO-tune,
    evaluate, print. args: dpo.parse_args(); train: dpo.train, which runs both training stages in the process
    group dpo.py set up."""
    t0 = time.time()
    demo = args.demo or "sdxl"
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // world)))  # 2 cores: more threads only contend
    log = (lambda m: print(f"[demo {time.time() - t0:5.0f}s] {m}", flush=True)) if rank == 0 else (lambda m: None)
    root = args.out_dir if "out_dir" in args.given else DEMOS[demo][4]
    mark = os.path.join(root, ".dpo_demo")  # the demo rewrites data/, init/, sft/, base/, dpo/ in folders it made
    if os.path.exists(root) and not os.path.isdir(root):
        raise ValueError(f"--out_dir {root} is a file, not a folder: give the demo a new or empty folder")
    if os.path.isdir(root) and os.listdir(root) and not os.path.isfile(mark):  # every rank, before anyone writes
        raise ValueError(f"--out_dir {root} exists and is not a demo folder: the demo rewrites subfolders of its "
                         "out_dir, so give it a new or empty folder")
    dist.barrier()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        open(mark, "w").close()
        with open(os.path.join(root, "prompts.txt"), "w") as f:  # for sample.py / evaluate.py --prompts
            f.write("\n".join(PROMPTS) + "\n")
    dist.barrier()
    build_world(root, args, train, log, demo)
    out = os.path.join(root, "dpo" if demo in OFFLINE else demo)
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)  # the demo's own previous result
    dist.barrier()
    base = os.path.join(root, "base")
    if demo == "online":
        log("online dpo: the reference samples its own pairs, the rule scores them (no labels)")
        done = train(_train_args(args, user=args.given, model=base, out_dir=out,
                                 prompts=os.path.join(root, "prompts.txt"), **ONLINE_DEFAULTS, **ONLINE))
    elif demo in RL_LOSSES:
        name = {"grpo": "Flow-GRPO", "nft": "DiffusionNFT", "online_flow": "online DPO"}[demo]
        log(f"{name}: the policy's own samples of the flow demo's reference, scored by the rule (no labels)")
        done = train(_train_args(args, user=args.given, model=base, out_dir=out, prompt_dropout=0.0,
                                 prompts=os.path.join(root, "prompts.txt"), **RL_DEFAULTS, **RL, **RL_LOSSES[demo]))
    else:
        log("dpo: fine-tuning the reference on the rule-labelled pairs")
        done = train(_train_args(args, user=args.given, model=base, data=os.path.join(root, "data", "dpo.jsonl"),
                          out_dir=out, cache_dir=os.path.join(root, "data", "dpo_cache"), **DEMOS[demo][2]))
    if rank != 0:
        return
    log("eval: sampling reference and DPO model from the same prompts and noise")
    grid = "grid.png" if demo in OFFLINE else f"grid_{demo}.png"
    r = side_by_side(root, os.path.join(out, families.of(base).subfolder), demo, grid)
    dashboard.start(dashboard.parse(args.report_to), out, {}, resume=True)  # --report_to: the grid too
    dashboard.image(done["step"], "demo/grid", Image.open(os.path.join(root, grid)))
    dashboard.close()
    log(f"mean shape area: reference {r['area_ref']:.3f}, DPO {r['area_dpo']:.3f}; grid: {root}/{grid} "
        f"(rows = prompts, columns = reference | DPO pairs); held-out pairs: {root}/data/heldout.jsonl")
    print(f"demo win_rate={r['win_rate']:.3f} fidelity_ref={r['fidelity_ref']:.3f} "
          f"fidelity_dpo={r['fidelity_dpo']:.3f}", flush=True)
