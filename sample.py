"""Image generation with the from-scratch models: text-to-image and SDEdit, as diffusers' SDXL / SD1.5 / SD3 / FLUX /
Qwen-Image / Z-Image pipelines.

    python sample.py --model PATH --prompt "a photo of a cat" --out samples/
    python sample.py --model PATH --unet runs/dpo --prompts parti --per_category 4 --out samples/
    python sample.py --model PATH --init_image in.png --strength 0.6 --prompt "..." --out samples/

The sampling loop itself (schedulers, guidance, the denoising loop) is diffusion.py's; this file loads a pipeline
(a fine-tuned UNet or transformer, or a LoRA on top of the base), starts SDEdit from an image, names and writes
the PNG files.
Comparisons scored by reward models and preference accuracy are evaluate.py's; AI feedback is relabel.py's.
"""
import os
import sys
from collections import Counter
from typing import List

import torch

import cache
import cli
import data
import diffusion
import families
import hub
import images
import lora as loralib
from weights import CheckpointError

# ----------------------------------------------------------------------------------------------------
# Pipeline


class Pipeline:
    """Text encoder + denoiser (UNet, or a transformer: self.unet all the same) + VAE + a scheduler config; call it
    like diffusers' StableDiffusion(XL)Pipeline, StableDiffusion3Pipeline, FluxPipeline, QwenImagePipeline or
    ZImagePipeline."""

    def __init__(self, unet, vae, te, sched_cfg, force_zeros=False, device="cpu", dtype=torch.float32):
        self.unet, self.vae, self.te, self.sched_cfg = unet, vae, te, sched_cfg
        self.device, self.dtype, self.f = torch.device(device), dtype, vae.downsample
        self.family, self.flow = te.family, te.family.flow  # its record (families.py)
        self.size = unet.config.get("sample_size", 128) * self.f  # default output side in pixels (FLUX: 1024)
        self.force_zeros = force_zeros  # SDXL: no negative prompt -> all-zero negative embeddings
        self.multiple = 2 * self.f if self.flow else max(8, self.f)  # the transformers take 2x2 latent patches
        self.progress = True

    def latent_shape(self, height=None, width=None):
        """(C, h, w) of the initial noise for images of height x width pixels (default: the model's size)."""
        return self.unet.latent_channels, (height or self.size) // self.f, (width or self.size) // self.f

    def scheduler(self, name, steps, shape):
        """The sampler as the family's pipeline runs it (diffusion.sampler): Euler or DDIM for a UNet, the
        flow-matching Euler for the transformers."""
        return diffusion.sampler(self.family, self.sched_cfg, name, steps, shape)  # (__call__ checked the name)

    def noise(self, n, shape, seed):
        """Image i's initial noise comes from its own generator seeded seed+i (reproducible one image at a time)."""
        gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        return torch.cat([torch.randn((1, *shape), generator=g) for g in gens])

    def encode_images(self, pixels):
        """[B,3,H,W] in [0,1] -> scaled latent means (SDEdit and evaluation start from the posterior mean)."""
        return self.vae.scale(self.vae.encode(pixels.to(self.device, self.vae.dtype) * 2 - 1).float())

    def conditions(self, prompts, negative=None, guided=True, size=None, guidance_embed=None):
        """The denoiser's conditioning for these prompts, as diffusion.conditions makes it for this model."""
        return diffusion.conditions(self.te, prompts, negative, guided, self.force_zeros, size, guidance_embed)

    @torch.no_grad()
    def __call__(self, prompts, negative=None, steps=30, guidance=5.0, scheduler="euler", seed=0, latents=None,
                 height=None, width=None, init_image=None, strength=0.6):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a string or a non-empty list of strings")
        if scheduler not in diffusion.SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r} (euler or ddim)")
        if self.flow and scheduler != "euler":
            raise ValueError(f"{self.family.title} samples with the flow-matching Euler scheduler: "
                             f"scheduler='euler', not {scheduler!r}")
        if not isinstance(steps, int) or not 1 <= steps <= self.sched_cfg["num_train_timesteps"]:
            raise ValueError(f"steps must be an integer in [1, {self.sched_cfg['num_train_timesteps']}], got {steps}")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        B, m = len(prompts), self.multiple  # as diffusers: multiples of 8 px for a UNet, 16 for the transformers
        if (height is not None and (height <= 0 or height % m)) or (width is not None and (width <= 0 or width % m)):
            raise ValueError(f"height and width must be positive multiples of {m}, got {height}x{width}")
        if init_image is not None:  # SDEdit's output keeps the input's size unless told otherwise
            init_image = images.load_image(init_image, height, width, multiple=m)
            height, width = init_image.shape[-2:]
        height, width = height or self.size, width or self.size
        shape = self.latent_shape(height, width)
        if latents is not None and tuple(latents.shape) != (B, *shape):
            raise ValueError(f"latents must have shape {(B, *shape)}, got {tuple(latents.shape)}")

        # classifier-free guidance when guidance > 1; FLUX has none: dev is given the scale as an input instead
        cfg_scale, embed = diffusion.guidance_inputs(self.family, self.unet.config, guidance, negative)
        cond = self.conditions(prompts, negative, cfg_scale > 1, (height, width), embed)  # scale <= 1: no negatives
        sched = self.scheduler(scheduler, steps, shape)
        noise = (self.noise(B, shape, seed) if latents is None else latents).float()
        if init_image is None:
            start, x = 0, noise * sched.init_sigma
        else:  # SDEdit (Meng et al. 2022): noise the image to the level `strength` and denoise from there
            start = steps - min(int(steps * strength), steps)
            if start == steps:
                raise ValueError(f"strength {strength} with {steps} steps leaves no denoising step; raise either")
            z0 = self.encode_images(init_image).cpu().expand(B, -1, -1, -1)
            x = sched.add_noise(z0, noise, start)
        x = diffusion.denoise(self.unet, sched, x, cond, cfg_scale, self.dtype, start, self.progress,
                              self.family.sampling.renorm)
        self.last_latents = x  # (B, C, h, w), scaled: what diffusers returns with output_type="latent" (unpacked)
        return diffusion.decode(self.vae, x)


def run_weights(path):
    """A dpo.py run folder trained with --ema stands for its average (out_dir/ema/, as flow_grpo evaluates); any other
    path for itself (out_dir/unet, out_dir/lora for the last weights)."""
    ema = os.path.join(path, "ema") if path and os.path.isdir(path) else None
    if ema and os.path.isdir(ema) and os.path.isfile(os.path.join(path, "checkpoint.pt")):
        print(f"{path}: its --ema average ({ema}); {path}/{{unet,transformer,lora}} for the last weights",
              file=sys.stderr)
        return ema
    return path


def load_unet(path, unet=None, lora=None, device="cpu", dtype=torch.float32):
    """The denoiser to sample with: path's own or a fine-tuned one (unet), with a LoRA (a dpo.py --lora run's
    out_dir, its lora/ folder, or a diffusers LoRA file) merged in. A fine-tuned one of another family is refused."""
    if unet is not None and not os.path.exists(unet):
        raise CheckpointError(f"UNet path does not exist: {unet}")
    unet, lora = (run_weights(p) for p in (unet, lora))
    fam = families.of(path)
    if unet is not None and families.of(unet) is not fam:
        raise CheckpointError(f"--unet {unet} is {families.of(unet).title}, the model {path} is {fam.title}: give "
                              "a denoiser of the model's family")
    u = fam.load(unet or path, device=device, dtype=dtype)
    return loralib.merge(u, loralib.read(lora, fam.subfolder + ".")) if lora else u


def load(path, unet=None, device="cpu", dtype=torch.float32, tokenizer=None, lora=None) -> Pipeline:
    """A Pipeline from a diffusers folder or single-file checkpoint; `unet` swaps in a fine-tuned UNet, `lora`
    merges a LoRA into the UNet."""
    if not os.path.exists(path):
        raise CheckpointError(f"model path does not exist: {path}")
    u = load_unet(path, unet, lora, device, dtype)
    te, v = cache.encoders(path, device, dtype, tokenizer, vae_dtype=dtype)  # (VAE: fp32 where fp16 overflows)
    sched = diffusion.scheduler_config(path, te.family, u.prediction_type)
    return Pipeline(u, v, te, sched, diffusion.zeros_for_empty(path, te.family), device, dtype)


# ----------------------------------------------------------------------------------------------------
# What to make: prompts, their seeds and file names


def prompt_items(args) -> List[dict]:
    """The images to make: --prompt's prompts, then --prompts' (cut by --categories, --per_category), --per_prompt
    images of each. Image j of prompt i has seed --seed + i * per_prompt + j and the name {i:04d}_seed{seed}, both
    from the prompt's place in the whole set, so a slice makes the same images as the whole set does."""
    prompts = [(p, "") for p in args.prompt] + (data.read_prompts(args.prompts) if args.prompts else [])
    wanted = None
    if args.categories:
        wanted = [c.strip() for c in args.categories.split(",") if c.strip()]
        known = list(dict.fromkeys(c for _, c in prompts))
        unknown = [c for c in wanted if c not in known]
        if unknown:
            raise ValueError(f"--categories: no prompt of category {', '.join(unknown)} (the prompts' categories: "
                             f"{', '.join(c or '(none)' for c in known)})")
    taken, items = Counter(), []
    for i, (prompt, category) in enumerate(prompts):
        if wanted is not None and category not in wanted:
            continue
        taken[category] += 1
        if args.per_category and taken[category] > args.per_category:
            continue
        for j in range(args.per_prompt):
            seed = args.seed + i * args.per_prompt + j
            items.append(dict(index=i, copy=j, seed=seed, prompt=prompt, category=category, name=f"{i:04d}_seed{seed}"))
    return items


def image_size(pipe: Pipeline, args):
    """(height, width) of the images made: SDEdit keeps its input's size unless --height / --width say otherwise."""
    if args.init_image:
        return tuple(images.load_image(args.init_image, args.height, args.width, multiple=pipe.multiple).shape[-2:])
    return args.height or pipe.size, args.width or pipe.size


def initial_noise(pipe: Pipeline, items, height, width) -> torch.Tensor:
    """(B, C, h, w): each image's own noise, drawn from its seed alone (as pipe(seed=) draws it)."""
    return torch.cat([pipe.noise(1, pipe.latent_shape(height, width), it["seed"]) for it in items])


def sampling_options(args, pipe: Pipeline) -> dict:
    """The pipeline's keyword arguments from the flags, guidance and steps by family as diffusers' pipelines: 5.0 SDXL,
    7.5 SD1.5 (30 steps here), SD3 7.0 and FLUX-dev 3.5 (28 steps), FLUX-schnell 0 (4 steps), Qwen-Image 4.0 and
    Z-Image 5.0 (50 steps)."""
    default = pipe.family.sampling_defaults(pipe.unet.config)
    guidance = args.guidance if args.guidance is not None else default[0]
    steps = args.steps if args.steps is not None else default[1]
    return dict(negative=args.negative, steps=steps, guidance=guidance, scheduler=args.scheduler,
                height=args.height, width=args.width, init_image=args.init_image, strength=args.strength)


# ----------------------------------------------------------------------------------------------------
# Command line


def add_flags(p, what="generate"):
    """The flags of the pipeline and of what it makes, shared with evaluate.py (which adds its own)."""
    add = p.add_argument
    add("--model", help="diffusers folder or single .safetensors (SDXL / SD1.5 / SD3 / FLUX)")
    add("--unet", help="fine-tuned UNet (SD3 / FLUX: transformer): dpo.py's --out_dir, a diffusers unet/ or "
        "transformer/ folder, or one file")
    add("--lora", help="a LoRA on top of the UNet: dpo.py --lora's out_dir, its lora/ folder, or a diffusers "
        "pytorch_lora_weights.safetensors")
    add("--tokenizer", help="tokenizer folder(s) for a single-file checkpoint")
    add("--revision", help="the hub revision (commit, branch or tag) of --model when it is a hub id ORG/NAME")
    add("--prompt", action="append", default=[], help="a prompt (repeatable)")
    add("--prompts", help="a text file (one prompt per line), a TSV file with Prompt and Category columns, or parti: "
        "the built-in PartiPrompts (1,632 prompts, 12 categories)")
    add("--categories", help="only these categories of --prompts, comma-separated (e.g. Animals,Vehicles)")
    add("--per_category", type=int, help="only the first N prompts of each category")
    add("--per_prompt", type=int, default=1, help="images per prompt (each with its own seed)")
    add("--negative", help="negative prompt (default: empty; SDXL: zero embeddings; Qwen-Image: none, so no CFG)")
    add("--out", default="samples" if what == "generate" else "eval", help="output folder")
    add("--steps", type=int, help="denoising steps (default 30; SD3, FLUX-dev 28; FLUX-schnell 4; Qwen-Image, "
        "Z-Image 50)")
    add("--guidance", type=float, help="classifier-free guidance (default 5.0 SDXL, 7.5 SD1.5, 7.0 SD3); FLUX-dev: "
        "its guidance input (3.5); Qwen-Image: true_cfg_scale (4.0, with --negative); Z-Image: guidance_scale (5.0, "
        "0 = off)")
    add("--scheduler", choices=list(diffusion.SCHEDULERS), default="euler")
    add("--seed", type=int, default=0, help="image i uses seed + i")
    add("--height", type=int)
    add("--width", type=int)
    add("--batch_size", type=int, default=1)
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--dtype", choices=list(cli.DTYPES), default="fp32")
    add("--init_image", help="SDEdit: start from this image")
    add("--strength", type=float, default=0.6, help="SDEdit noise level in (0, 1]")
    add("--overwrite", action="store_true", help="replace files of an earlier run in --out (sample.py: its images; "
        "evaluate.py: an eval.json, or write into a folder it did not make)")


def fetch(args, more=None):
    """The flags that name models (and more's), resolved where they hold hub ids (hub.py); --revision pins --model."""
    denoiser = dict(only=families.SUBFOLDERS)
    hub.resolve(args, dict(model={}, unet=denoiser, lora={}, tokenizer=dict(tokenizer=True), **(more or {})),
                args.revision)


def check_flags(p, args):
    """The checks of add_flags' values (p.error exits with one line)."""
    if min(args.steps or 1, args.batch_size, args.per_prompt, args.per_category or 1) < 1:
        p.error("--steps, --batch_size, --per_prompt and --per_category must be >= 1")
    if not 0 < args.strength <= 1:
        p.error(f"--strength must be in (0, 1], got {args.strength}")
    if not args.model:
        p.error("--model is required")


def parse_args(argv=None):
    p = cli.Parser(description="Generate images (text-to-image, or SDEdit from --init_image) with a base model, a "
                   "fine-tuned UNet or a LoRA.")
    add_flags(p)
    args = p.parse_args(argv)
    check_flags(p, args)
    if not (args.prompt or args.prompts):
        p.error("give --prompt or --prompts FILE")
    return args


def run(args):
    fetch(args)
    if args.init_image and not os.path.isfile(args.init_image):
        raise ValueError(f"init image not found: {args.init_image}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file, not a folder")
    items = prompt_items(args)
    paths = [os.path.join(args.out, it["name"] + ".png") for it in items]
    for p in paths:  # before the model is loaded: the input image, and an earlier run's images unless --overwrite
        cli.check_output(p, reads=[args.init_image, args.prompts], replace=args.overwrite, make_folder=True)
    cli.hold(args.out)  # one command writes into --out at a time; a failed run leaves no empty --out (cli.finish)
    pipe = load(args.model, unet=args.unet, device=args.device, dtype=cli.DTYPES[args.dtype], tokenizer=args.tokenizer,
                lora=args.lora)
    kw = sampling_options(args, pipe)
    h, w = image_size(pipe, args)
    for s in range(0, len(items), args.batch_size):
        batch = items[s:s + args.batch_size]
        imgs = pipe([it["prompt"] for it in batch], latents=initial_noise(pipe, batch, h, w), **kw)
        for it, x in zip(batch, imgs):
            path = os.path.join(args.out, it["name"] + ".png")
            images.save_png(images.to_pil(x), path)
            print(path)


def main(argv=None):
    cli.guard(run, parse_args(argv), (CheckpointError, ValueError, OSError))


if __name__ == "__main__":
    main()
