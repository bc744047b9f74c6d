"""bench/step.py's baseline: the same DPO step as a diffusers-based trainer does it.

The family's own diffusers model (its record's diffusers class: UNet2DConditionModel, SD3Transformer2DModel,
FluxTransformer2DModel, QwenImageTransformer2DModel, ZImageTransformer2DModel), built from the same config, with
its default SDPA attention and its gradient checkpointing; the frozen reference a copy in the compute dtype (norms
fp32, as dpo.reference). LoRA through peft on the family's LoRA targets (LoraConfig with gaussian init, as diffusers'
LoRA scripts add it; the adapters in fp32, as their cast_training_params), the reference the same model with
disable_adapters(), as diffusers' DPO example takes it.
Eq. 14 written out in PyTorch on the pipelines' conventions (FLUX: packed latents, position ids, t / 1000; Qwen-Image
packed, t / 1000; Z-Image lists of frames and captions, its reversed time, its negated output).
"""
import torch
import torch.nn.functional as F

import diffusion
import dpo


def unet_call(net):
    """A diffusers UNet behind our call signature (x, t, context, pooled, time_ids)."""
    def call(x, t, ctx, pooled=None, tids=None):
        extra = None if pooled is None else {"text_embeds": pooled, "time_ids": tids}
        return net(x, t, encoder_hidden_states=ctx, added_cond_kwargs=extra).sample
    return call


def sd3_call(net):
    """diffusers' SD3 transformer behind our call signature (x, t = sigma * 1000, context, pooled)."""
    return lambda x, t, ctx, pooled: net(hidden_states=x, timestep=t, encoder_hidden_states=ctx,
                                         pooled_projections=pooled, return_dict=False)[0]


def flux_call(net):
    """diffusers' FLUX transformer behind our call signature (x, t = sigma * 1000, context, pooled, guidance), with
    the packing, position ids and timestep scale of diffusers' FLUX pipeline and training scripts."""
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


def qwen_image_call(net):
    """diffusers' Qwen-Image transformer behind our call signature (x, t = sigma * 1000, context, mask), with the
    packing, image shapes and timestep scale of QwenImagePipeline."""
    def call(x, t, ctx, mask):
        B, C, h, w = x.shape
        packed = x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, h // 2 * (w // 2), 4 * C)
        out = net(hidden_states=packed, encoder_hidden_states=ctx, encoder_hidden_states_mask=mask, timestep=t / 1000,
                  img_shapes=[[(1, h // 2, w // 2)]] * B, return_dict=False)[0]
        return out.view(B, h // 2, w // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)  # unpacked
    return call


def z_image_call(net):
    """diffusers' Z-Image transformer behind our call signature (x, t = sigma * 1000, context, mask), as
    ZImagePipeline calls it: one frame per image, each caption's real tokens, time (1000 - t) / 1000, negated."""
    def call(x, t, ctx, mask):
        out = net([f[:, None] for f in x], (1000 - t) / 1000, [c[m] for c, m in zip(ctx, mask)], return_dict=False)[0]
        return -torch.stack(out)[:, :, 0]  # (B, C, h, w): the velocity eps - x0
    return call


# diffusers' model class -> how to call it as ours is called; a family whose class is not here has no baseline
CALLS = {"UNet2DConditionModel": unet_call, "SD3Transformer2DModel": sd3_call, "FluxTransformer2DModel": flux_call,
         "QwenImageTransformer2DModel": qwen_image_call, "ZImageTransformer2DModel": z_image_call}


def add_peft_lora(model, rank, alpha, targets):
    """LoRA through peft, as diffusers' LoRA scripts add it (gaussian A, zero B, alpha = rank unless given), on our
    targets; the adapters in fp32 (diffusers' cast_training_params), as lora.py keeps them."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                 target_modules=list(targets)))
    cast_training_params(model, torch.float32)


def models(family, config, dev, args):
    """(policy, reference (a module; None for LoRA: the policy with its adapters off), trained parameters)."""
    import diffusers
    cls = getattr(diffusers, family.diffusers_class)
    with torch.device(dev):
        policy = cls.from_config(config)
    ref = None
    if args.lora:  # the frozen base in the compute dtype (norms fp32), as ours
        policy = dpo.reference(policy, args.amp_dtype)
        add_peft_lora(policy, args.lora, args.lora_alpha, family.lora_targets)
    else:
        with torch.device(dev):
            ref = cls.from_config(config)
        ref.load_state_dict(policy.state_dict())  # the reference starts as the policy, as in training
        ref = dpo.reference(ref, args.amp_dtype)
    if args.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    return policy, ref, [p for p in policy.parameters() if p.requires_grad]


def adapters_off(policy, call):
    """The reference of a peft LoRA run, as diffusers' DPO example takes it: the policy with disable_adapters()."""
    def forward(*a):
        policy.disable_adapters()
        try:
            with torch.no_grad():
                return call(*a)
        finally:
            policy.enable_adapters()
    return forward


def loss_fn(family, policy, ref, args, alphas_cumprod=None):
    """(z, eps, t, cond) -> eq. 14 as a diffusers-based trainer writes it: one t (a flow model's sigma) and eps per
    pair, the forward process (DDPM's, or the straight path (1 - sigma) x0 + sigma eps given sigma * 1000), the
    target (eps, or the velocity eps - x0), per-image mean squared errors, -log sigmoid of eq. 14's argument."""
    call = CALLS[family.diffusers_class](policy)
    ref_call = adapters_off(policy, call) if ref is None else CALLS[family.diffusers_class](ref)

    def loss(z, eps, t, cond):
        B = eps.shape[0]
        t2, e2 = torch.cat([t, t]), torch.cat([eps, eps])  # (2B,), (2B, C, h, w): winner i and loser i share them
        if family.flow:
            s = t2.view(-1, 1, 1, 1)
            x, target, t_in = (1 - s) * z + s * e2, e2 - z, t2 * 1000
        else:
            x, target, t_in = diffusion.forward_process(z, e2, t2, alphas_cumprod), e2, t2
        amp = torch.autocast(z.device.type, dtype=args.amp_dtype, enabled=args.amp_dtype != torch.float32)
        with amp:
            pred = call(x, t_in, *cond)  # (2B, C, h, w)
        with torch.no_grad(), amp:
            ref_pred = ref_call(x, t_in, *cond)
        err = (pred.float() - target.float()).pow(2).mean((1, 2, 3))  # (2B,)
        ref_err = (ref_pred.float() - target.float()).pow(2).mean((1, 2, 3))
        logits = -0.5 * args.beta * ((err[:B] - err[B:]) - (ref_err[:B] - ref_err[B:]))  # (B,)
        return -F.logsigmoid(logits).mean()
    return loss
