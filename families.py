"""One record per model family: everything the rest of the code asks about SD1.5, SDXL, SD3 / SD3.5, FLUX.1,
Qwen-Image or Z-Image.

A family is its model files (the denoiser: unet.py, mmdit.py, flux.py, qwen_image.py, z_image.py; the text side:
clip.py's CLIP, t5.py, llm.py's language models; the VAE: vae.py, qwen_vae.py) and one record below: how a
checkpoint of it is recognised, where diffusers keeps its parts, its text side and VAE, its noise schedule and
sampler, its sampling and training defaults, its LoRA targets and FSDP units, and its released sizes. Code
elsewhere asks the record (`families.of(path)`, then `fam.subfolder`, `fam.text`, `fam.recipe`, ...) and never
compares a family's name. To add a family: docs/models.md's checklist.

    fam = families.of("stable-diffusion-xl-base-1.0")    # the SDXL record (from unet/config.json)
    unet = fam.load(path, "cuda", torch.bfloat16)         # its denoiser, straight into the dtype
"""
import json
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F

import diffusion
import flux
import kernels
import llm
import mmdit
import qwen_image
import qwen_vae
import t5
import unet
import weights
import z_image
from weights import CheckpointError

# ----------------------------------------------------------------------------------------------------
# What a record holds


@dataclass(frozen=True)
class Encoder:
    """One text encoder: where it lies, what tokenizes it, its full size."""
    folder: str  # its subfolder in a diffusers model folder ("text_encoder_2")
    tokenizer: str  # its tokenizer's subfolder ("tokenizer_2")
    config: dict  # the released encoder's config: what a single file holds, and the memory plan's size
    module: ModuleType = None  # its module (load, Tokenizer) and model class; None: a CLIP text encoder (clip.py)
    model: type = None
    length: object = 77  # tokens: a number, or a function of the denoiser's config
    single: tuple = None  # CLIP in a single file: (key prefix, layout "hf" | "open_clip", metadata key of a config)
    projection: bool = False  # CLIP with its text_projection in a single file (a folder says it by its keys)
    pad: str = None  # the pad token of a single file's CLIP tokenizer (clip_bpe/): "!" for OpenCLIP-bigG
    optional: bool = False  # may be absent (SD3's T5): zeros of its width in its place, as diffusers does
    template: str = None  # a language model's prompt template (the pipeline's: each prompt goes in its {})
    options: tuple = ()  # (name, value) pairs its module's load takes besides (path, device, dtype, quantize)

    def tokens(self, config) -> int:
        return self.length(config) if callable(self.length) else self.length


@dataclass(frozen=True)
class Text:
    """The text side: the encoders, and how their outputs become what the denoiser is given."""
    encoders: tuple
    combine: Callable  # the encoders' outputs (a CLIP's dict, T5's states) -> (context, pooled)
    context: Callable  # the encoders' token counts -> the context's length (the plans' and benchmarks' shapes)
    width: Callable = None  # a denoiser config -> the hidden size its text input has (checked against a language
    # model encoder's when loading); None: fixed by the released encoders

    def lengths(self, config) -> list:
        """Each encoder's token count for a denoiser config, as the family's pipeline encodes prompts."""
        return [e.tokens(config) for e in self.encoders]


@dataclass(frozen=True)
class VAE:
    """The VAE: latent channels, and the latents' scale and shift when a single file does not say."""
    channels: int
    scaling_factor: float
    shift_factor: float = 0.0
    quant_conv: bool = True  # SD's VAE has 1x1 quant convs around the latent; SD3's and FLUX's none
    standalone: bool = False  # a VAE-only single file of these channels is this family's (FLUX's ae.safetensors)
    # a VAE architecture of its own: its module (load(path, device, dtype, scaling_factor, shift_factor)), and the
    # class its vae/config.json names; no module: vae.py's AutoencoderKL
    module: ModuleType = None
    diffusers_class: str = "AutoencoderKL"
    model: type = None  # that module's VAE class, built from config: the released one's (the plans' and benchmarks')
    config: dict = None


@dataclass(frozen=True)
class Sampling:
    """How the family's diffusers pipeline samples by default."""
    guidance: float
    steps: int
    guidance_input: bool = False  # the scale is the denoiser's input (FLUX-dev), no classifier-free guidance
    without_guidance_input: tuple = None  # (guidance, steps) of a config without that input (FLUX-schnell)
    zeros_for_empty: bool = False  # no negative prompt: all-zero negative embeddings (SDXL, unless model_index says)
    sigmas: str = None  # "linspace": the pipeline's own sigmas, linspace(1, 1/steps) (FLUX), shifted
    cfg_offset: float = 0.0  # the pipeline's guidance + this = the CFG scale (Z-Image: cond + g (cond - uncond))
    needs_negative: bool = False  # the pipeline guides only when given a negative prompt (Qwen-Image)
    renorm: bool = False  # the guided prediction rescaled to the conditional's norm per token (Qwen-Image)


@dataclass(frozen=True)
class Recipe:
    """dpo.py's defaults for the family, as the official launchers and diffusers' scripts train it."""
    resolution: int
    warmup: int
    optimizer: str
    gradient_checkpointing: bool
    beta: dict = field(default_factory=dict)  # beta per objective where not the objective's own (dpo.BETA)
    guidance: float = None  # the guidance input in training, for a config that has one (FLUX-dev)
    prompt_dropout: float = 0.0  # P(prompt -> ""), offline: the official launchers' 0.2 for the UNets; no flow recipe


@dataclass(frozen=True)
class Family:
    name: str  # what the code calls it ("sdxl")
    title: str  # what messages call it ("SDXL")
    module: ModuleType  # the denoiser's module: load, save, read_config
    model: type  # the denoiser's class, built from a diffusers config
    diffusers_class: str  # its config.json's _class_name
    file_keys: tuple  # key prefixes of its single files: a file is the family of the most specific (longest) it has
    subfolder: str  # where diffusers keeps the denoiser (unet/, transformer/), and its LoRA keys' prefix
    kind: str  # what the denoiser is, in messages
    inputs: tuple  # what the denoiser takes after (x, t), in order: context, pooled | mask, time_ids, guidance
    input_shapes: Callable  # (config, tokens) -> name -> shape of one row (the plans' and benchmarks' inputs)
    blocks: tuple  # the module types FSDP shards one by one and gradient checkpointing recomputes
    lora_targets: tuple  # the Linear layers LoRA adapts, matched as name suffixes (PEFT's target_modules)
    flow: bool  # rectified flow (x_sigma = (1 - sigma) x0 + sigma eps, predicts eps - x0), else DDPM
    schedule: dict  # the released scheduler's settings; a folder's scheduler_config.json overrides them
    text: Text
    vae: VAE
    sampling: Sampling
    recipe: Recipe
    released: dict  # name -> (title, full-size denoiser config): what --model NAME, the plans and benchmarks use
    recognise: Callable = lambda config: True  # config -> bool, among the families of one diffusers class
    layouts: tuple = ("diffusers",)  # how a trained denoiser can be saved ("single": the original single file)
    time_ids: bool = False  # SDXL's size and crop conditioning

    def load(self, path, device="cpu", dtype=torch.float32, norm_dtype=None, quantize=None):
        """The denoiser of a model path, straight into dtype (norms and other non-layer tensors into norm_dtype; its
        Linear layers into a quantize format, kernels.quantized_linear)."""
        return self.module.load(path, device, dtype, norm_dtype=norm_dtype, quantize=quantize)

    def save(self, model, path, layout="diffusers", metadata=None):
        """path/ config.json + diffusion_pytorch_model.safetensors that diffusers loads; "single": one original file."""
        if layout not in self.layouts:
            raise ValueError(f"{self.title} {self.kind}s are saved in the {' or '.join(self.layouts)} layout only "
                             "(no --save_single)")
        self.module.save(model, path, layout, metadata)

    def read_config(self, path) -> dict:
        """The denoiser's config (diffusers' config.json names) without reading its weights."""
        return self.module.read_config(path)

    def conditioning(self, context, pooled, time_ids=None, guidance=None) -> tuple:
        """What the denoiser takes after (x, t), from the text side's (context, pooled), SDXL's time ids and the
        guidance input (a number, given to every row; None without one). A language model's text side gives its
        token mask (B, L) where the CLIPs give a pooled vector: the denoiser's `mask` input."""
        g = None if guidance is None else torch.full((len(context),), float(guidance), device=context.device)
        given = dict(context=context, pooled=pooled, mask=pooled, time_ids=time_ids, guidance=g)
        return tuple(given[k] for k in self.inputs)

    def sampling_defaults(self, config) -> tuple:
        """(guidance, steps) of the family's pipeline for this denoiser config."""
        s = self.sampling
        if s.without_guidance_input and not config.get("guidance_embeds"):
            return s.without_guidance_input
        return s.guidance, s.steps


# ----------------------------------------------------------------------------------------------------
# The text sides: the released encoders, and how each family's pipeline combines their outputs


# transformers' CLIPTextConfig fields of the two released CLIP text encoders (what single files hold)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
              eos_token_id=2)  # OpenAI CLIP ViT-L/14's: 123,060,480 parameters
BIG_G = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
             hidden_act="gelu", projection_dim=1280)  # OpenCLIP ViT-bigG/14's: 694,659,840 with its projection


def sd15_text(outs):
    """CLIP-L's final (layer-normed) states (B, 77, 768); no pooled vector."""
    return outs[0]["last"], None


def sdxl_text(outs):
    """CLIP-L's and bigG's penultimate states side by side (B, 77, 2048); bigG's projected pooled output (B, 1280)."""
    return torch.cat([outs[0]["penultimate"], outs[1]["penultimate"]], dim=-1), outs[1]["projected"]


def sd3_text(outs):
    """The two CLIPs' penultimate states (B, 77, 2048) zero-padded to T5's width and followed by T5's states
    (B, 77 + 256, 4096; zeros without T5, as diffusers allows); both projected pooled outputs side by side (B, 2048)."""
    clip = torch.cat([outs[0]["penultimate"], outs[1]["penultimate"]], dim=-1)  # (B, 77, 2048)
    t5_states = outs[2] if outs[2] is not None else clip.new_zeros(len(clip), 256, t5.XXL["d_model"])
    context = torch.cat([F.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1])), t5_states], dim=1)
    return context, torch.cat([outs[0]["projected"], outs[1]["projected"]], dim=-1)


def flux_text(outs):
    """T5's states (B, 512 or 256, 4096) and CLIP-L's pooled output, not projected (B, 768)."""
    return outs[1], outs[0]["pooled"]


def flux_t5_tokens(config) -> int:
    """FLUX-dev's pipeline encodes 512 T5 tokens, schnell's (no guidance input) 256."""
    return 512 if config.get("guidance_embeds", True) else 256


QWEN_IMAGE_TOKENS = 512  # QwenImagePipeline's max_sequence_length: the prompt's states after the template, at most
Z_IMAGE_TOKENS = llm.Z_IMAGE_MAX_LENGTH  # ZImagePipeline's: the chat-templated prompt, at most


def masked_states(states, mask, cap):
    """A language model's states with zeros at the padding (B, L, D) and its mask (B, L), cut to the batch's longest
    prompt, at most cap tokens: what the pipelines' encode_prompt gives (QwenImagePipeline pads with zeros; Z-Image's
    keeps each prompt's real tokens, the same rows without the padding)."""
    longest = mask.shape[1] if kernels.planning() else int(mask.sum(1).max()) if mask.numel() else 0  # (the plan:
    n = min(longest, cap)  # shapes without values, every token real)
    states, mask = states[:, :n], mask[:, :n]
    return states * mask[..., None].to(states.dtype), mask


def qwen_image_text(outs):
    """Qwen2.5-VL's final-normed states after the template's first 34 tokens, zeros at the padding, and their mask:
    (B, L, 3584), (B, L) bool, L the batch's longest prompt (at most 512), as QwenImagePipeline.encode_prompt."""
    states, mask = outs[0]
    return masked_states(states[:, llm.QWEN_IMAGE_DROP:], mask[:, llm.QWEN_IMAGE_DROP:], QWEN_IMAGE_TOKENS)


def z_image_text(outs):
    """Qwen3's second-to-last hidden states of the chat-templated prompt, zeros at the padding, and their mask:
    (B, L, 2560), (B, L) bool (ZImagePipeline's list of each prompt's real tokens, padded)."""
    states, mask = outs[0]
    return masked_states(states, mask, Z_IMAGE_TOKENS)


# ----------------------------------------------------------------------------------------------------
# The denoisers' inputs at full size (the plans and the benchmarks make them)


def unet_inputs(config, tokens) -> dict:
    """A UNet's context (and SDXL's pooled text embedding and 6 size / crop ids), one row each."""
    c = unet.check_config(config)
    out = {"context": (tokens, c["cross_attention_dim"])}
    if c["addition_embed_type"] == "text_time":
        out.update(pooled=(c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"],),
                   time_ids=(6,))
    return out


def transformer_inputs(config, tokens) -> dict:
    """SD3's and FLUX's context and pooled vector (FLUX-dev's guidance input is a number per row)."""
    out = {"context": (tokens, config["joint_attention_dim"]), "pooled": (config["pooled_projection_dim"],)}
    return dict(out, guidance=()) if config.get("guidance_embeds") else out


def llm_inputs(config, tokens) -> dict:
    """Qwen-Image's and Z-Image's context (a language model's states) and its token mask, one row each."""
    return {"context": (tokens, config.get("joint_attention_dim") or config["cap_feat_dim"]), "mask": (tokens,)}


# ----------------------------------------------------------------------------------------------------
# The records

# SD1.5 / SDXL's released DDPM schedule (their scheduler/scheduler_config.json)
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   timestep_spacing="leading", steps_offset=1, prediction_type="epsilon", set_alpha_to_one=False,
                   clip_sample=False)
UNET_LORA = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")  # attention + feed-forward
# both streams' attention and feed-forward: diffusers' FLUX LoRA script (its SD3 script adapts the attention only)
FLOW_LORA = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
             "ff_context.net.2")
FLOW_BETA = dict(dpo=100.0, rpo=100.0, ipo=100.0, hinge=100.0)  # flow_grpo's Flow-DPO recipe (Liu et al. 2025)
UNET = dict(module=unet, model=unet.UNet, diffusers_class="UNet2DConditionModel", subfolder="unet", kind="UNet",
            inputs=("context", "pooled", "time_ids"), input_shapes=unet_inputs, lora_targets=UNET_LORA, flow=False,
            blocks=(unet.ResBlock, unet.SpatialTransformer, unet.Resample), layouts=("diffusers", "single"),
            schedule=SD_SCHEDULE)
TRANSFORMER = dict(subfolder="transformer", kind="transformer", input_shapes=transformer_inputs, lora_targets=FLOW_LORA,
                   flow=True)
# a language model's states and their token mask in (Qwen-Image, Z-Image); LoRA on the attention, as diffusers'
# Qwen-Image LoRA script (its last block's text-side projections feed nothing: qwen_image.QwenImage.unused)
LLM_TRANSFORMER = dict(subfolder="transformer", kind="transformer", input_shapes=llm_inputs, inputs=("context", "mask"),
                       flow=True)
QWEN_IMAGE_LORA = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
Z_IMAGE_LORA = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")

SD15 = Family(
    "sd15", "SD1.5", **UNET, recognise=lambda config: config.get("addition_embed_type") != "text_time",
    file_keys=("cond_stage_model.", "model.diffusion_model.", "first_stage_model."),
    text=Text((Encoder("text_encoder", "tokenizer", CLIP_L, single=("cond_stage_model.transformer.", "hf",
                                                                    "text_encoder_config")),),
              sd15_text, lambda lengths: lengths[0]),
    vae=VAE(4, 0.18215), sampling=Sampling(7.5, 30),
    recipe=Recipe(512, 500, "adamw", False, prompt_dropout=0.2), released={"sd15": ("SD1.5", unet.SD15)})

SDXL = Family(
    "sdxl", "SDXL", **UNET, recognise=lambda config: config.get("addition_embed_type") == "text_time",
    file_keys=("conditioner.embedders.", "model.diffusion_model.label_emb."), time_ids=True,
    text=Text((Encoder("text_encoder", "tokenizer", CLIP_L, single=("conditioner.embedders.0.transformer.", "hf",
                                                                    "text_encoder_config")),
               Encoder("text_encoder_2", "tokenizer_2", BIG_G, projection=True, pad="!",
                       single=("conditioner.embedders.1.model.", "open_clip", "text_encoder_2_config"))),
              sdxl_text, lambda lengths: lengths[0]),  # both CLIPs' states side by side
    vae=VAE(4, 0.13025), sampling=Sampling(5.0, 30, zeros_for_empty=True),
    recipe=Recipe(1024, 200, "adafactor", True, prompt_dropout=0.2), released={"sdxl": ("SDXL", unet.SDXL)})

SD3 = Family(
    "sd3", "SD3", **TRANSFORMER, module=mmdit, model=mmdit.MMDiT, diffusers_class="SD3Transformer2DModel",
    file_keys=("joint_blocks.", "model.diffusion_model.joint_blocks.", "text_encoders."),
    inputs=("context", "pooled"), blocks=(mmdit.JointBlock,), schedule=dict(diffusion.FLOW_SCHEDULE, shift=3.0),
    text=Text((Encoder("text_encoder", "tokenizer", CLIP_L, projection=True,
                       single=("text_encoders.clip_l.transformer.", "hf", "text_encoder_config")),
               Encoder("text_encoder_2", "tokenizer_2", BIG_G, projection=True, pad="!",
                       single=("text_encoders.clip_g.transformer.", "hf", "text_encoder_2_config")),
               Encoder("text_encoder_3", "tokenizer_3", t5.XXL, t5, t5.T5Encoder, length=256, optional=True)),
              sd3_text, lambda lengths: lengths[0] + lengths[2]),  # the CLIPs' states, then T5's
    vae=VAE(16, 1.5305, 0.0609, quant_conv=False), sampling=Sampling(7.0, 28),
    recipe=Recipe(1024, 200, "adamw", True, FLOW_BETA),
    released={"sd3-medium": ("SD3-medium", mmdit.SD3_MEDIUM), "sd35-medium": ("SD3.5-medium", mmdit.SD35_MEDIUM),
              "sd35-large": ("SD3.5-large", mmdit.SD35_LARGE)})

FLUX = Family(
    "flux", "FLUX", **TRANSFORMER, module=flux, model=flux.Flux, diffusers_class="FluxTransformer2DModel",
    file_keys=("double_blocks.", "model.diffusion_model.double_blocks.", "text_model.embeddings.",
               "embeddings.token_embedding."),  # its split files: the transformer's, and clip_l.safetensors
    inputs=("context", "pooled", "guidance"), blocks=(flux.DoubleBlock, flux.SingleBlock),
    schedule=dict(diffusion.FLOW_SCHEDULE, shift=3.0, use_dynamic_shifting=True),
    text=Text((Encoder("text_encoder", "tokenizer", CLIP_L, single=("", "hf", "text_encoder_config")),
               Encoder("text_encoder_2", "tokenizer_2", t5.XXL, t5, t5.T5Encoder, length=flux_t5_tokens)),
              flux_text, lambda lengths: lengths[1]),  # T5's states
    vae=VAE(16, 0.3611, 0.1159, quant_conv=False, standalone=True),
    sampling=Sampling(flux.GUIDANCE, 28, guidance_input=True, without_guidance_input=(0.0, 4), sigmas="linspace"),
    recipe=Recipe(1024, 200, "adamw", True, FLOW_BETA, guidance=flux.GUIDANCE),
    released={"flux-dev": ("FLUX.1-dev", flux.DEV), "flux-schnell": ("FLUX.1-schnell", flux.SCHNELL)})

QWEN_IMAGE = Family(
    "qwen-image", "Qwen-Image", **LLM_TRANSFORMER, lora_targets=QWEN_IMAGE_LORA, module=qwen_image,
    model=qwen_image.QwenImage, diffusers_class=qwen_image.CLASS, blocks=(qwen_image.Block,),
    file_keys=("img_in.", "txt_norm.", "model.diffusion_model.img_in.", "model.diffusion_model.txt_norm.",
               "model.layers.0.self_attn.q_proj.bias"),  # and ComfyUI's split qwen_2.5_vl_7b (q/k/v biases)
    schedule=dict(diffusion.FLOW_SCHEDULE, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                  max_image_seq_len=8192, shift_terminal=0.02),  # Qwen/Qwen-Image's scheduler_config.json
    text=Text((Encoder("text_encoder", "tokenizer", llm.QWEN25_VL_7B, llm, llm.LanguageModel,
                       length=llm.QWEN_IMAGE_MAX_LENGTH, template=llm.QWEN_IMAGE_TEMPLATE),),
              qwen_image_text, lambda lengths: min(lengths[0] - llm.QWEN_IMAGE_DROP, QWEN_IMAGE_TOKENS),
              width=lambda config: config["joint_attention_dim"]),
    vae=VAE(16, 1.0, quant_conv=False, module=qwen_vae, diffusers_class=qwen_vae.CLASS, model=qwen_vae.QwenVAE,
            config=qwen_vae.QWEN_IMAGE_VAE),  # scaled per channel: its config's latents_mean / latents_std
    sampling=Sampling(4.0, 50, sigmas="linspace", needs_negative=True, renorm=True),  # true_cfg_scale
    recipe=Recipe(1024, 200, "adamw", True, FLOW_BETA),
    released={"qwen-image": ("Qwen-Image", qwen_image.QWEN_IMAGE)})

Z_IMAGE = Family(
    "z-image", "Z-Image", **LLM_TRANSFORMER, lora_targets=Z_IMAGE_LORA, module=z_image, model=z_image.ZImage,
    diffusers_class="ZImageTransformer2DModel", blocks=(z_image.Block,),
    file_keys=("noise_refiner.", "context_refiner.", "model.diffusion_model.noise_refiner.",
               "model.diffusion_model.context_refiner.", "model.layers.0.self_attn.q_norm."),  # (qwen_3_4b: qk-norm)
    schedule=dict(diffusion.FLOW_SCHEDULE, shift=3.0),  # Z-Image's scheduler_config.json
    text=Text((Encoder("text_encoder", "tokenizer", llm.QWEN3_4B, llm, llm.LanguageModel,
                       length=llm.Z_IMAGE_MAX_LENGTH, template=llm.Z_IMAGE_TEMPLATE, options=(("layer", -2),)),),
              z_image_text, lambda lengths: lengths[0], width=lambda config: config["cap_feat_dim"]),
    vae=VAE(16, 0.3611, 0.1159, quant_conv=False),  # FLUX.1's AutoencoderKL
    sampling=Sampling(5.0, 50, sigmas="linspace", cfg_offset=1.0),  # guidance_scale
    recipe=Recipe(1024, 200, "adamw", True, FLOW_BETA),
    released={"z-image": ("Z-Image", z_image.Z_IMAGE)})

FAMILIES = (SD15, SDXL, SD3, FLUX, QWEN_IMAGE, Z_IMAGE)  # in the order they were released: how messages list them


# ----------------------------------------------------------------------------------------------------
# Which family


def names(fams=None) -> str:
    """'SD1.5, SDXL, SD3 or FLUX': for messages (fams: these records, else all)."""
    titles = [f.title for f in (FAMILIES if fams is None else fams)]
    return ", ".join(titles[:-1]) + (" or " if len(titles) > 1 else "") + titles[-1]


def of_config(config, where="the model") -> Family:
    """The family of a denoiser config: its diffusers class (UNet2DConditionModel when the config does not say),
    then the record that recognises it."""
    cls = config.get("_class_name", UNET["diffusers_class"])
    for fam in FAMILIES:
        if fam.diffusers_class == cls and fam.recognise(config):
            return fam
    raise CheckpointError(f"{where} holds a {cls}, not the denoiser of {names()} "
                          f"({', '.join(dict.fromkeys(f.diffusers_class for f in FAMILIES))})")


def of_keys(ckpt, where) -> Family:
    """The family of a single file without a stored config: the longest of the records' key prefixes it has."""
    keys = list(ckpt.keys())
    best, length = None, 0
    for fam in FAMILIES:
        for prefix in fam.file_keys:
            if len(prefix) > length and any(k.startswith(prefix) for k in keys):
                best, length = fam, len(prefix)
    if best is None:
        prefixes = ", ".join(dict.fromkeys(p.split(".")[0] + "." for f in FAMILIES for p in f.file_keys))
        raise CheckpointError(f"{where}: not a checkpoint of {names()} (no {prefixes} keys)")
    return best


def of(path) -> Family:
    """The family of a model path: a diffusers root, its denoiser's folder (unet/, transformer/), or one
    .safetensors file, from configs and key names only."""
    if os.path.isfile(path):
        ckpt = weights.Checkpoint(path)
        if "config" in ckpt.metadata:  # unet.save(layout="single") records its config
            return of_config(json.loads(ckpt.metadata["config"]), path)
        return of_keys(ckpt, path)
    if not os.path.isdir(path):
        raise CheckpointError(f"model path does not exist: {path}")
    subs = list(dict.fromkeys(f.subfolder for f in FAMILIES))
    for sub in subs[::-1] + [""]:
        if os.path.isfile(os.path.join(path, sub, "config.json")):
            return of_config(weights.read_config(os.path.join(path, sub)), os.path.join(path, sub))
    raise CheckpointError(f"{path} is neither a diffusers model folder (no {'/ or '.join(subs)}/) nor a denoiser "
                          "folder")


def load(path, device="cpu", dtype=torch.float32, norm_dtype=None, quantize=None):
    """The denoiser of a model path, whatever its family (of), straight into dtype (its Linears into quantize)."""
    return of(path).load(path, device, dtype, norm_dtype, quantize)


def of_model(model) -> Family:
    """The family of a built denoiser."""
    return next(f for f in FAMILIES if isinstance(model, f.model) and f.recognise(model.config))


def released(name):
    """(family, title, full-size denoiser config) of a released model's name ("flux-dev"), None for another."""
    return next(((f, *f.released[name]) for f in FAMILIES if name in f.released), None)


RELEASED = [name for f in FAMILIES for name in f.released]  # every released model's name
SUBFOLDERS = tuple(dict.fromkeys(f.subfolder + "/" for f in FAMILIES))  # where a diffusers model keeps its denoiser
