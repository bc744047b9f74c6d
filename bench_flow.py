"""bench_step.py's flow-model step: SD3 / SD3.5's MMDiT and FLUX.1's transformer, ours beside diffusers' own.

    python bench_step.py --model flux-dev --lora 64      # FLUX.1-dev's config (no weights), 1024^2, LoRA rank 64
    python bench_step.py --model sd35-medium --lora 64   # SD3.5-medium's (also flux-schnell, sd3-medium, sd35-large)
    python bench_step.py --model FLOW_DIR --lora 64      # the transformer/ config of a diffusers SD3 / FLUX folder

The step is bench_step.py's (its docstring) on the rectified-flow path, as dpo.py trains these models: ONE sigma
per pair drawn as dpo.draw draws it, both images noised onto x_sigma = (1 - sigma) x0 + sigma eps, the model given
sigma * 1000, eq. 14 on the velocity errors |(eps - x0) - v|^2; text states of the pipelines' lengths (SD3: 77 CLIP
+ 256 T5 tokens; FLUX-dev 512 T5 tokens, schnell 256) and FLUX-dev's guidance input (flux.GUIDANCE). Defaults are
dpo.py's for the flow models: 1 pair, 1024px, AdamW, gradient checkpointing on, bf16 on CUDA.
  ours       dpo.build_models + dpo.pair_loss (prediction "flow"): mmdit.MMDiT / flux.Flux, LoRA on lora.FLOW_TARGETS
  diffusers  SD3Transformer2DModel / FluxTransformer2DModel, same config, their SDPA attention and gradient
             checkpointing; LoRA through peft (LoraConfig(target_modules=lora.FLOW_TARGETS, gaussian init) as
             diffusers' FLUX LoRA script adds it, adapters in fp32 as its cast_training_params), the reference the
             same transformer with disable_adapters() as diffusers' DPO example; eq. 14 written out in PyTorch
"""
import os

import torch
import torch.nn.functional as F

import clip
import denoiser
import diffusion
import dpo
import flux
import lora
import mmdit
import optim
from weights import CheckpointError

# --model NAME: a released transformer's config (no weights): (family, config)
MODELS = {"flux-dev": ("flux", flux.DEV), "flux-schnell": ("flux", flux.SCHNELL),
          "sd3-medium": ("sd3", mmdit.SD3_MEDIUM), "sd35-medium": ("sd3", mmdit.SD35_MEDIUM),
          "sd35-large": ("sd3", mmdit.SD35_LARGE)}
CHECK = {"sd3": mmdit.check_config, "flux": flux.check_config}


def builtin(model):
    """The name of a built-in flow model, None for a path (or anything else)."""
    return model if model in MODELS and not os.path.exists(model) else None


def is_flow(model) -> bool:
    """True for a built-in flow name, or a path whose denoiser is an SD3 / FLUX transformer."""
    if model is None or builtin(model):
        return model is not None
    try:
        return os.path.exists(model) and denoiser.family(model) in denoiser.FLOW
    except CheckpointError:
        return False


def config(model):
    """(family, transformer config with diffusers' defaults filled in) of --model; no weights read."""
    fam, cfg = MODELS[model] if builtin(model) else (denoiser.family(model), denoiser.read_config(model))
    return fam, CHECK[fam](cfg)


def patch(fam, cfg) -> int:
    """Latent pixels per token side: FLUX packs 2x2, SD3 patchifies by patch_size."""
    return 2 if fam == "flux" else cfg["patch_size"]


def text_length(fam, cfg) -> int:
    """Text tokens as the pipelines encode them: SD3 77 CLIP + 256 T5, FLUX-dev 512 T5, schnell 256."""
    if fam == "sd3":
        return clip.MAX_LENGTH + clip.T5_LENGTH["sd3"]
    return clip.T5_LENGTH["flux" if cfg["guidance_embeds"] else "flux-schnell"]


def describe(fam, cfg, h) -> str:
    """The token counts of one image at h x h latents, for bench_step's header line."""
    n = (h // patch(fam, cfg)) ** 2
    return f"{n} image + {text_length(fam, cfg)} text tokens, {cfg['num_attention_heads']} heads"


def inputs(fam, cfg, args, h, dev, model=None, seed=0, text=None):
    """Clean latents z (2B, C, h, h) winners first, shared eps (B, C, h, h), one sigma per pair (B,) drawn as dpo.py
    draws it, and the transformer's conditioning with 2B rows (denoiser.conditioning; FLUX-dev: args.guidance)."""
    B, g = args.batch_size, torch.Generator().manual_seed(seed)
    C = cfg["in_channels"] // 4 if fam == "flux" else cfg["in_channels"]
    z, eps = torch.randn(2 * B, C, h, h, generator=g), torch.randn(B, C, h, h, generator=g)
    schedule = diffusion.flow_config(model or "", fam)
    sigma = diffusion.training_sigmas(diffusion.density(args.sigma_density, B, g), schedule)  # (B,)
    ctx = torch.randn(2 * B, text or text_length(fam, cfg), cfg["joint_attention_dim"], generator=g)
    pooled = torch.randn(2 * B, cfg["pooled_projection_dim"], generator=g)
    cond = denoiser.conditioning(fam, ctx.to(dev), pooled.to(dev), guidance=args.guidance)
    return z.to(dev), eps.to(dev), sigma.to(dev), cond


def diffusers_class(fam):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    return FluxTransformer2DModel if fam == "flux" else SD3Transformer2DModel


def as_ours(net, fam):
    """A diffusers transformer behind our call signature (x, t = sigma * 1000, context, pooled[, guidance]), with the
    packing, position ids and timestep scale of diffusers' FLUX pipeline and training scripts."""
    if fam == "sd3":
        return lambda x, t, ctx, pooled: net(hidden_states=x, timestep=t, encoder_hidden_states=ctx,
                                             pooled_projections=pooled, return_dict=False)[0]

    def call(x, t, ctx, pooled, guidance=None):
        B, C, h, w = x.shape
        packed = x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, h // 2 * (w // 2), 4 * C)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device)  # FluxPipeline._prepare_latent_image_ids
        img_ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        txt_ids = torch.zeros(ctx.shape[1], 3, device=x.device)
        out = net(hidden_states=packed, timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
                  encoder_hidden_states=ctx, txt_ids=txt_ids, img_ids=img_ids.view(-1, 3), return_dict=False)[0]
        return out.view(B, h // 2, w // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)  # unpacked
    return call


def add_peft_lora(model, args):
    """LoRA through peft, as diffusers' FLUX LoRA script adds it (gaussian A, zero B, alpha = rank unless given),
    on our targets; the adapters in fp32 (diffusers' cast_training_params), as lora.py keeps them."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    alpha = args.lora_alpha or args.lora
    model.add_adapter(LoraConfig(r=args.lora, lora_alpha=alpha, init_lora_weights="gaussian",
                                 target_modules=list(lora.FLOW_TARGETS)))
    cast_training_params(model, torch.float32)


def diffusers_models(fam, cfg, dev, args):
    """(policy, reference (a module, or None: LoRA's is the policy with its adapters off), trained parameters)."""
    cls = diffusers_class(fam)
    with torch.device(dev):
        policy = cls.from_config(cfg)
    ref = None
    if args.lora:  # the frozen base in the compute dtype (norms fp32), as ours
        policy = dpo.reference(policy, dev, args.amp_dtype)
        add_peft_lora(policy, args)
    else:
        with torch.device(dev):
            ref = cls.from_config(cfg)
        ref.load_state_dict(policy.state_dict())  # the reference starts as the policy, as in training
        ref = dpo.reference(ref, dev, args.amp_dtype)
    if args.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    return policy, ref, [p for p in policy.parameters() if p.requires_grad]


def adapters_off(policy, fam):
    """The reference of a peft LoRA run, as diffusers' DPO example takes it: the policy with disable_adapters()."""
    call = as_ours(policy, fam)

    def forward(*a):
        policy.disable_adapters()
        try:
            with torch.no_grad():
                return call(*a)
        finally:
            policy.enable_adapters()
    return forward


def velocity_dpo(call, ref, z, eps, sigma, cond, args):
    """Eq. 14 on velocities as a diffusers-based Flow-DPO trainer writes it: one sigma and eps per pair, the
    straight path, the velocity target eps - x0, per-image mean squared errors, -log sigmoid of eq. 14's argument."""
    B = eps.shape[0]
    s, e2 = torch.cat([sigma, sigma]), torch.cat([eps, eps])  # (2B,), (2B, C, h, w): winner i and loser i share them
    x = (1 - s.view(-1, 1, 1, 1)) * z + s.view(-1, 1, 1, 1) * e2  # (2B, C, h, w)
    target = e2 - z
    amp = torch.autocast(z.device.type, dtype=args.amp_dtype, enabled=args.amp_dtype != torch.float32)
    with amp:
        pred = call(x, s * 1000, *cond)
    with torch.no_grad(), amp:
        ref_pred = ref(x, s * 1000, *cond)
    err = (pred.float() - target).pow(2).mean((1, 2, 3))  # (2B,)
    ref_err = (ref_pred.float() - target).pow(2).mean((1, 2, 3))
    logits = -0.5 * args.beta * ((err[:B] - err[B:]) - (ref_err[:B] - ref_err[B:]))  # (B,)
    return -F.logsigmoid(logits).mean()


def build(impl, fam, cfg, dev, args):
    """(policy, ref, step) as bench_step.build: step(z, eps, sigma, cond) does one optimizer step and returns
    (loss, grad norm) tensors."""
    if impl == "ours":  # exactly dpo.py's models (dpo.build_models), from random weights

        def make():  # the same random transformer at every call: the reference starts as the policy
            torch.manual_seed(0)
            with torch.device(dev):
                return denoiser.build(cfg, fam)
        policy, ref, trained = dpo.build_models(args, dev, make)
    else:
        policy, ref, trained = diffusers_models(fam, cfg, dev, args)
    policy.train()
    net = torch.compile(policy) if args.compile else policy
    opt = optim.build(args.optimizer, trained, args.lr, args.weight_decay, fused=dev.type == "cuda")
    scaler = torch.amp.GradScaler(dev.type, enabled=False)  # bf16 or fp32: no loss scaling, as dpo.py
    theirs = None if impl == "ours" else (as_ours(net, fam), adapters_off(net, fam) if args.lora else as_ours(ref, fam))

    def loss_fn(z, eps, sigma, cond):
        if impl == "ours":  # exactly dpo.py's micro-step
            inputs = dict(z=z, eps=eps, t=sigma, T=1000, cond=cond)
            return dpo.pair_loss(net, ref, inputs, args, None, "flow")[0]
        return velocity_dpo(*theirs, z, eps, sigma, cond, args)

    def step(z, eps, sigma, cond):
        loss = loss_fn(z, eps, sigma, cond)
        loss.backward()
        _, norm = dpo.optimizer_step(opt, scaler, trained, args, args.warmup)  # past warmup: the full lr
        return loss.detach(), norm
    return policy, ref, step
