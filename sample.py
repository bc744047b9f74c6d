"""Sampling and evaluation with the from-scratch models: text-to-image, SDEdit, base-vs-tuned comparisons scored by
reward models (the paper's PartiPrompts evaluation), the implicit-reward preference accuracy (Sec. 5.5), and AI
feedback (Sec. 5.4: a reward model labels a pair set for dpo.py).

    python sample.py --model PATH --prompt "a photo of a cat" --out samples/
    python sample.py --model PATH --unet runs/dpo --compare --prompts parti --score pickscore=DIR --out eval/
    python sample.py --model PATH --init_image in.png --strength 0.6 --prompt "..." --out samples/
    python sample.py --model PATH --unet runs/dpo --eval_pairs pairs.jsonl [--eval_baseline runs/sft] --out eval/
    python sample.py --relabel pickapic_v2/ --score pickscore=DIR --out aif/pairs.jsonl

The two schedulers are written out below (no diffusers): each is a table of noise levels over the chosen
timesteps plus a one-line update. They reproduce diffusers' EulerDiscreteScheduler / DDIMScheduler (eta=0)
and its SDXL / SD1.5 pipelines step for step; tests/test_sample.py checks that on tiny random models.
"""
import csv
import json
import math
import os
from collections import Counter
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

import cli
import clip
import data
import diffusion
import lora as loralib
import reward
import unet as unetlib
import vae as vaelib
from weights import CheckpointError, read_json, save_json

# ----------------------------------------------------------------------------------------------------
# Schedulers: the noise schedule itself (alpha_bar_t) is diffusion.py's


def timesteps(cfg, steps) -> np.ndarray:
    """The `steps` training timesteps to visit, high noise first ("Common Diffusion Noise Schedules ...", Tab. 2)."""
    n, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    if spacing == "leading":  # 1, 1+n/s, 1+2n/s, ... (SD's convention: offset 1)
        return (np.arange(steps) * (n // steps)).round()[::-1].astype(np.float32) + cfg["steps_offset"]
    if spacing == "trailing":
        return np.arange(n, 0, -n / steps).round().astype(np.float32) - 1
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    raise ValueError(f"unsupported timestep_spacing {spacing!r} (leading, trailing or linspace)")


class Euler:
    """Euler steps on the probability-flow ODE in sigma = sqrt((1-a)/a) space (Karras et al. 2022, Alg. 1 at s_churn=0).

    Latents live at x = x0 + sigma * eps; the UNet sees x / sqrt(sigma^2 + 1), i.e. the DDPM-scaled x_t.
    """

    def __init__(self, cfg, steps):
        self.v_pred = cfg["prediction_type"] == "v_prediction"
        ac = diffusion.alphas_cumprod(cfg)
        sig = ((1 - ac) / ac) ** 0.5  # (N,) sigma of every training timestep
        ts = timesteps(cfg, steps)
        # sigma at (possibly fractional) timesteps by linear interpolation, then a final sigma of 0
        sigmas = np.interp(ts, np.arange(len(sig)), sig.numpy())
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))  # (steps+1,)
        self.timesteps = torch.from_numpy(ts)
        smax = self.sigmas.max()
        # diffusers: sigma_max for linspace/trailing; for leading sqrt(sigma_max^2 + 1), the std of x0 + sigma*eps
        self.init_sigma = smax if cfg["timestep_spacing"] in ("linspace", "trailing") else (smax ** 2 + 1) ** 0.5

    def scale_input(self, x, i):
        return x / (self.sigmas[i] ** 2 + 1) ** 0.5

    def add_noise(self, x0, noise, i):
        return x0 + noise * self.sigmas[i]

    def step(self, out, i, x):
        s, s_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = out * (-s / (s ** 2 + 1) ** 0.5) + x / (s ** 2 + 1) if self.v_pred else x - s * out
        return x + (x - x0) / s * (s_next - s)  # one Euler step of dx/dsigma = (x - x0) / sigma


class DDIM:
    """Deterministic DDIM (Song et al. 2021, eta = 0): predict x0 and eps, then re-noise x0 to the previous level."""

    def __init__(self, cfg, steps):
        self.cfg, self.ac = cfg, diffusion.alphas_cumprod(cfg)
        self.timesteps = torch.from_numpy(timesteps(cfg, steps).round().astype(np.int64))
        self.gap = cfg["num_train_timesteps"] // steps  # diffusers' previous timestep is always t - N // steps
        self.final = torch.tensor(1.0) if cfg["set_alpha_to_one"] else self.ac[0]
        self.init_sigma = 1.0

    def scale_input(self, x, i):
        return x

    def add_noise(self, x0, noise, i):
        a = self.ac[self.timesteps[i]]
        return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise

    def step(self, out, i, x):
        t = int(self.timesteps[i])
        a, a_prev = self.ac[t], (self.ac[t - self.gap] if t - self.gap >= 0 else self.final)
        if self.cfg["prediction_type"] == "v_prediction":
            x0, eps = a ** 0.5 * x - (1 - a) ** 0.5 * out, a ** 0.5 * out + (1 - a) ** 0.5 * x
        else:
            x0, eps = (x - (1 - a) ** 0.5 * out) / a ** 0.5, out
        if self.cfg["clip_sample"]:
            x0 = x0.clamp(-1, 1)
        return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps


# ----------------------------------------------------------------------------------------------------
# Pipeline


class Pipeline:
    """Text encoder + UNet + VAE + a scheduler config; call it like diffusers' StableDiffusion(XL)Pipeline."""

    def __init__(self, unet, vae, te, sched_cfg, force_zeros=True, device="cpu", dtype=torch.float32):
        self.unet, self.vae, self.te, self.sched_cfg = unet, vae, te, sched_cfg
        self.device, self.dtype, self.f, self.sdxl = torch.device(device), dtype, vae.downsample, te.is_sdxl
        self.size = unet.config["sample_size"] * self.f  # default output side in pixels
        self.force_zeros = force_zeros and self.sdxl  # SDXL: no negative prompt -> all-zero negative embeddings
        self.progress = True

    def text(self, prompts, negative, cfg):
        """(context, pooled) for the UNet: [negatives; prompts] stacked along the batch when guiding."""
        ctx, pooled = self.te.encode(prompts)
        if not cfg:
            return ctx, pooled
        if negative is None and self.force_zeros:
            nctx, npooled = torch.zeros_like(ctx), (None if pooled is None else torch.zeros_like(pooled))
        else:
            neg = [negative or ""] * len(prompts) if negative is None or isinstance(negative, str) else list(negative)
            if len(neg) != len(prompts):
                raise ValueError(f"{len(neg)} negative prompts for {len(prompts)} prompts")
            nctx, npooled = self.te.encode(neg)
        return torch.cat([nctx, ctx]), (None if pooled is None else torch.cat([npooled, pooled]))

    def latent_shape(self, height=None, width=None):
        """(C, h, w) of the initial noise for images of height x width pixels (default: the model's size)."""
        return self.unet.config["in_channels"], (height or self.size) // self.f, (width or self.size) // self.f

    def noise(self, n, shape, seed):
        """Image i's initial noise comes from its own generator seeded seed+i (reproducible one image at a time)."""
        gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        return torch.cat([torch.randn((1, *shape), generator=g) for g in gens])

    def encode_images(self, images):
        """[B,3,H,W] in [0,1] -> scaled latent means (SDEdit and evaluation start from the posterior mean)."""
        return self.vae.encode(images.to(self.device, self.vae.dtype) * 2 - 1).float() * self.vae.scaling_factor

    def predict(self, u, x, t, ctx, pooled, time_ids):
        """One UNet call in the model dtype; the result comes back in fp32 (the scheduler math runs in fp32)."""
        t = t.to(self.device, torch.float32).expand(x.shape[0])
        return u(x.to(self.device, self.dtype), t, ctx, pooled=pooled, time_ids=time_ids).float()

    @torch.no_grad()
    def __call__(self, prompts, negative=None, steps=30, guidance=5.0, scheduler="euler", seed=0, latents=None,
                 height=None, width=None, init_image=None, strength=0.6):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a string or a non-empty list of strings")
        if scheduler not in ("euler", "ddim"):
            raise ValueError(f"unknown scheduler {scheduler!r} (euler or ddim)")
        if not isinstance(steps, int) or not 1 <= steps <= self.sched_cfg["num_train_timesteps"]:
            raise ValueError(f"steps must be an integer in [1, {self.sched_cfg['num_train_timesteps']}], got {steps}")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        B, m = len(prompts), max(8, self.f)  # as diffusers: any multiple of 8 px (the UNet takes any latent size)
        if (height is not None and (height <= 0 or height % m)) or (width is not None and (width <= 0 or width % m)):
            raise ValueError(f"height and width must be positive multiples of {m}, got {height}x{width}")
        if init_image is not None:  # SDEdit's output keeps the input's size unless told otherwise
            init_image = load_image(init_image, height, width, multiple=m)
            height, width = init_image.shape[-2:]
        height, width = height or self.size, width or self.size
        shape = self.latent_shape(height, width)
        if latents is not None and tuple(latents.shape) != (B, *shape):
            raise ValueError(f"latents must have shape {(B, *shape)}, got {tuple(latents.shape)}")

        cfg = guidance > 1  # as diffusers: guidance <= 1 means the conditional prediction alone
        ctx, pooled = self.text(prompts, negative, cfg)
        time_ids = None
        if self.sdxl:  # micro-conditioning: original size, crop top-left, target size
            time_ids = torch.tensor([[height, width, 0, 0, height, width]] * len(ctx), device=ctx.device).to(ctx)
        sched = (Euler if scheduler == "euler" else DDIM)(self.sched_cfg, steps)
        noise = (self.noise(B, shape, seed) if latents is None else latents).float()
        if init_image is None:
            start, x = 0, noise * sched.init_sigma
        else:  # SDEdit (Meng et al. 2022): noise the image to the level `strength` and denoise from there
            start = steps - min(int(steps * strength), steps)
            if start == steps:
                raise ValueError(f"strength {strength} with {steps} steps leaves no denoising step; raise either")
            z0 = self.encode_images(init_image).cpu().expand(B, -1, -1, -1)
            x = sched.add_noise(z0, noise, start)
        for i in range(start, steps):
            xin = sched.scale_input(torch.cat([x, x]) if cfg else x, i)
            out = self.predict(self.unet, xin, sched.timesteps[i], ctx, pooled, time_ids).cpu()
            if cfg:
                uncond, cond = out.chunk(2)
                out = uncond + guidance * (cond - uncond)
            x = sched.step(out, i, x)
            if self.progress:
                cli.progress(f"sampling: step {i + 1 - start}/{steps - start}")
        if self.progress:  # otherwise the caller's own progress line stays open
            cli.end_progress()
        self.last_latents = x  # (B, 4, h, w), scaled: what diffusers returns with output_type="latent"
        img = self.vae.decode((x / self.vae.scaling_factor).to(self.device, self.vae.dtype)).float()
        return (img / 2 + 0.5).clamp(0, 1).cpu()


def load_unet(path, unet=None, lora=None, device="cpu", dtype=torch.float32):
    """The UNet to sample with: path's own or a fine-tuned one (unet), with a LoRA (a dpo.py --lora run's out_dir,
    its lora/ folder, or a diffusers LoRA file) merged in."""
    if unet is not None and not os.path.exists(unet):
        raise CheckpointError(f"UNet path does not exist: {unet}")
    u = unetlib.load(unet or path, device=device, dtype=dtype)
    return loralib.merge(u, loralib.read(lora)) if lora else u


def load(path, unet=None, device="cpu", dtype=torch.float32, tokenizer=None, lora=None) -> Pipeline:
    """A Pipeline from a diffusers folder or single-file checkpoint; `unet` swaps in a fine-tuned UNet, `lora`
    merges a LoRA into the UNet."""
    if not os.path.exists(path):
        raise CheckpointError(f"model path does not exist: {path}")
    u = load_unet(path, unet, lora, device, dtype)
    v = vaelib.load(path, device=device, dtype=dtype)  # computes in fp32 where fp16 would overflow
    te = clip.load(path, device=device, dtype=dtype, tokenizer=tokenizer)
    sched = diffusion.scheduler_config(path, u.prediction_type)  # a single file's UNet knows its prediction type
    index = read_json(os.path.join(path, "model_index.json"), {}) if os.path.isdir(path) else {}
    return Pipeline(u, v, te, sched, index.get("force_zeros_for_empty_prompt", True), device, dtype)


# ----------------------------------------------------------------------------------------------------
# Images and files


def load_image(img, height=None, width=None, multiple=1) -> torch.Tensor:
    """A path, image bytes, PIL image or [3,H,W] / [B,3,H,W] tensor in [0,1] -> [B,3,H,W] in [0,1] at height x
    width (default: its own size rounded down to `multiple`); PIL images are scaled to cover and centre-cropped."""
    if isinstance(img, torch.Tensor):
        x = (img[None] if img.dim() == 3 else img).float()
        size = (height or x.shape[-2] // multiple * multiple, width or x.shape[-1] // multiple * multiple)
        if min(size) == 0:
            raise ValueError(f"image is smaller than {multiple}x{multiple} pixels")
        return x if size == x.shape[-2:] else torch.nn.functional.interpolate(x, size, mode="bicubic").clamp(0, 1)
    try:
        img = img.convert("RGB") if isinstance(img, Image.Image) else data.open_image(img)
    except Exception as e:
        raise ValueError(f"cannot read image {img if isinstance(img, str) else '(bytes)'}: {e}") from None
    w, h = img.size
    H, W = height or h // multiple * multiple, width or w // multiple * multiple
    if H == 0 or W == 0:
        raise ValueError(f"image is smaller than {multiple}x{multiple} pixels")
    if (h, w) != (H, W):
        s = max(H / h, W / w)  # scale to cover H x W, then crop the centre
        img = img.resize((max(W, round(w * s)), max(H, round(h * s))), Image.LANCZOS)
        left, top = (img.width - W) // 2, (img.height - H) // 2
        img = img.crop((left, top, left + W, top + H))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def to_pil(x: torch.Tensor) -> Image.Image:
    """[3,H,W] in [0,1] -> 8-bit RGB image (rounded as diffusers' numpy_to_pil)."""
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def save_png(img: Image.Image, path):
    """Write atomically: a crash never leaves a truncated PNG under the final name."""
    tmp = f"{path}.tmp{os.getpid()}.png"
    img.save(tmp)
    os.replace(tmp, path)


def grid(rows: List[List[torch.Tensor]]) -> Image.Image:
    """One image: rows[r][c] [3,H,W] tiles (rows = prompts, columns = base, tuned) with 4-pixel gaps."""
    H, W, g = rows[0][0].shape[1], rows[0][0].shape[2], 4
    out = Image.new("RGB", (len(rows[0]) * (W + g) - g, len(rows) * (H + g) - g), "white")
    for r, row in enumerate(rows):
        for c, x in enumerate(row):
            out.paste(to_pil(x), (c * (W + g), r * (H + g)))
    return out


# ----------------------------------------------------------------------------------------------------
# AI feedback and implicit-reward evaluation

# AI feedback (paper Sec. 5.4): a scorer (images [B,3,H,W] in [0,1], prompts list[str] -> scores [B], higher is
# better) labels pairs, e.g. the demo's rule demo.area_scorer ("the larger shape wins"), or a CLIP-based model.
Scorer = Callable[[torch.Tensor, List[str]], torch.Tensor]


def relabel(pairs, scorer: Scorer, ties="drop", batch_size=1):
    """Yields a copy of each pair {caption, image_0, image_1, label_0, ...} labelled by the scorer: label_0 1.0 if
    image_0 scores higher, 0.0 if lower, with score_0, score_1 beside it and the former label as label_0_before.

    A tie is 0.5 with ties="drop" (dpo.py drops ties); with ties="official" it is 1.0, as in the official code, which
    swaps a pair only when score_1 > score_0 (a tie keeps image_0 as the winner) and had already dropped the pairs
    whose own label is a tie (label_0 0.5: skipped here too). batch_size pairs are scored together; images of one
    size share a scorer call, so every image is scored at its own size, as it would be alone."""
    if ties not in ("drop", "official"):
        raise ValueError(f"ties must be 'drop' or 'official', got {ties!r}")
    batch = []
    for p in pairs:
        if ties == "official" and p.get("label_0") == 0.5:
            continue
        batch.append(p)
        if len(batch) == batch_size:
            yield from _label(batch, scorer, ties)
            batch = []
    if batch:
        yield from _label(batch, scorer, ties)


def _label(batch, scorer: Scorer, ties) -> List[dict]:
    """relabel's work on one batch of B pairs."""
    images = []  # 2B tensors (1, 3, H, W): all image_0, then all image_1
    for k in (0, 1):
        for p in batch:
            try:
                images.append(load_image(p[f"image_{k}"]))
            except ValueError as e:
                raise ValueError(f"{p.get('source', 'a pair')}: {e}") from None
    prompts = [p["caption"] for p in batch] * 2
    by_size = {}  # (H, W) -> positions of the images of that size
    for i, x in enumerate(images):
        by_size.setdefault(tuple(x.shape[-2:]), []).append(i)
    scores = torch.zeros(len(images))
    with torch.no_grad():
        for idx in by_size.values():
            scores[idx] = scorer(torch.cat([images[i] for i in idx]), [prompts[i] for i in idx]).float().cpu()
    out, B = [], len(batch)
    for p, s0, s1 in zip(batch, scores[:B].tolist(), scores[B:].tolist()):
        label = 1.0 if s0 > s1 else 0.0 if s0 < s1 else 0.5 if ties == "drop" else 1.0
        out.append({**p, "label_0": label, "score_0": s0, "score_1": s1, "label_0_before": p.get("label_0")})
    return out


def wilson(successes, n, z=1.96):
    """95% Wilson score interval for a proportion (stays inside [0, 1] even for small n)."""
    p, d = successes / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z / d * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, c - h), min(1.0, c + h)


@torch.no_grad()
def implicit_accuracy(pipe: Pipeline, ref, pairs, k=4, seed=0, size=None, batch_size=4):
    """How often the DPO implicit reward ranks a pair like the human label (paper Sec. 5.5, Tab. 2).

    The implicit reward of an image, r(x) = beta*T*E_{t,eps}[|eps - eps_ref(x_t)|^2 - |eps - eps_theta(x_t)|^2]
    up to constants, is what eq. 14 compares between winner and loser. It is estimated with k draws of (t, eps),
    each shared by both images of a pair and by both models, as in training; the same seed gives the same draws
    to every UNet evaluated. A zero difference is a tie and counts 0.5 (pipe.unet = ref gives exactly 0.5).
    Returns (accuracy of pipe.unet against ref, per-pair reward differences r(image_0) - r(image_1) / (beta*T)).
    """
    size = size or pipe.size
    g = torch.Generator().manual_seed(seed)
    ac, prediction_type = diffusion.alphas_cumprod(pipe.sched_cfg), pipe.sched_cfg["prediction_type"]
    diffs = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        B = len(chunk)
        xs, ids = [], []  # all image_0, then all image_1
        for j in (0, 1):
            for p in chunk:  # centre crop at `size` and SDXL size conditioning exactly as dpo.py trains
                try:
                    x, i = data.transform(data.open_image(p[f"image_{j}"]), size, None, False, False)
                except Exception as e:  # one line that says which pair
                    raise ValueError(f"{p.get('source', 'a pair')}: cannot read an image of the pair: {e}") from None
                xs.append(x)
                ids.append(i)
        z = pipe.encode_images((torch.stack(xs) + 1) / 2).cpu()  # (2B, 4, h, w)
        ctx, pooled = pipe.te.encode([p["caption"] for p in chunk] * 2)
        time_ids = torch.stack(ids).to(pipe.device, ctx.dtype)  # (2B, 6)
        d = torch.zeros(B)
        for _ in range(k):
            t = torch.randint(0, len(ac), (B,), generator=g).repeat(2)  # (2B,) same t for both images of a pair
            eps = torch.randn((B, *z.shape[1:]), generator=g).repeat(2, 1, 1, 1)  # same noise, too
            xt = diffusion.forward_process(z, eps, t, ac)
            target = diffusion.target(z, eps, t, ac, prediction_type)
            m = ((pipe.predict(pipe.unet, xt, t, ctx, pooled, time_ids).cpu() - target) ** 2).mean((1, 2, 3))
            r = ((pipe.predict(ref, xt, t, ctx, pooled, time_ids).cpu() - target) ** 2).mean((1, 2, 3))
            reward = r - m  # (2B,) each image's implicit reward, up to beta*T
            d += (reward[:B] - reward[B:]) / k
        diffs += d.tolist()
        if pipe.progress:
            cli.progress(f"eval: {s + B}/{len(pairs)} pairs")
    cli.end_progress()
    right = [0.5 if x == 0 else float((x > 0) == (p["label_0"] > 0.5)) for x, p in zip(diffs, pairs)]  # ties: 0.5
    return sum(right) / len(pairs), diffs


# ----------------------------------------------------------------------------------------------------
# Prompt sets and reward models

# PartiPrompts (Yu et al. 2022, google-research/parti, Apache-2.0): 1,632 prompts in 12 categories, the prompt set
# of the paper's evaluation. Shipped in prompts/parti/ with its license and attribution.
PARTI = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts", "parti", "PartiPrompts.tsv")


def read_prompts(path) -> List[Tuple[str, str]]:
    """(prompt, category) pairs from a text file (one prompt per line, no category), a TSV file whose header names a
    Prompt column and maybe a Category column (PartiPrompts' format), or "parti": the built-in PartiPrompts."""
    path = PARTI if path == "parti" else path
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompts file {path}: {getattr(e, 'strerror', None) or e}") from None
    head = lines[0].split("\t") if lines else []
    if "Prompt" not in head:
        out = [(line.strip(), "") for line in lines if line.strip()]
    else:
        p, c = head.index("Prompt"), (head.index("Category") if "Category" in head else None)
        out = []
        for n, line in enumerate(lines[1:], 2):
            cells = line.split("\t")
            if not line.strip():
                continue
            if len(cells) <= max(p, c or 0):
                raise ValueError(f"{path}:{n}: {len(cells)} tab-separated column(s), the header has {len(head)}")
            if cells[p].strip():
                out.append((cells[p].strip(), "" if c is None else cells[c].strip()))
    if not out:
        raise ValueError(f"{path}: no prompts (a text file with one prompt per line, or a TSV with a Prompt column)")
    return out


def prompt_items(a) -> List[dict]:
    """The images to make: --prompt's prompts, then --prompts' (cut by --categories, --per_category), --per_prompt
    images of each. Image j of prompt i has seed --seed + i * per_prompt + j and the name {i:04d}_seed{seed}, both
    from the prompt's place in the whole set, so a slice makes the same images as the whole set does."""
    prompts = [(p, "") for p in a.prompt] + (read_prompts(a.prompts) if a.prompts else [])
    wanted = None
    if a.categories:
        wanted = [c.strip() for c in a.categories.split(",") if c.strip()]
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
        if a.per_category and taken[category] > a.per_category:
            continue
        for j in range(a.per_prompt):
            seed = a.seed + i * a.per_prompt + j
            items.append(dict(index=i, copy=j, seed=seed, prompt=prompt, category=category, name=f"{i:04d}_seed{seed}"))
    return items


def parse_score(spec: str):
    """--score KIND[=PATH][,OPTION=VALUE...] -> (kind, path or None, options), e.g. "hps=HPS_v2.1_compressed.pt,
    tokenizer=CLIP-ViT-H-14" -> ("hps", "HPS_v2.1_compressed.pt", {"tokenizer": "CLIP-ViT-H-14"}); "area" -> the
    demo's rule, which has no path."""
    head, *rest = spec.split(",")
    kind, _, path = head.partition("=")
    options = {}
    for r in rest:
        key, eq, value = r.partition("=")
        if not (key and eq and value):
            raise ValueError(f"--score {spec}: after KIND=PATH come OPTION=VALUE items separated by commas, got {r!r}")
        options[key] = value
    if kind not in reward.OPTIONS:
        raise ValueError(f"--score {spec}: unknown kind {kind!r} (one of {', '.join(reward.OPTIONS)})")
    return kind, path or None, options


def load_scorers(specs, device="cpu", dtype=torch.float32) -> Dict[str, Scorer]:
    """kind -> scorer for the parsed --score specs. They are loaded before any image is made, so a wrong folder or
    head file fails in seconds, not after hours of sampling. config= names an open_clip model-config JSON file."""
    out = {}
    for kind, path, options in specs:
        if kind != "area" and path is not None and not os.path.exists(path):  # (area takes no path: reward says so)
            raise CheckpointError(f"{kind}: no such file or folder: {path}")
        if "config" in options:
            options = dict(options, config=read_json(options["config"]))
        out[kind] = reward.load(kind, path, device=device, dtype=dtype, **options)
    return out


# ----------------------------------------------------------------------------------------------------
# The paper's evaluation: base and tuned images from the same noise, scored by reward models


def win_rate(base: torch.Tensor, tuned: torch.Tensor) -> dict:
    """Paired scores (n,) each -> their means and the win rate of tuned over base, a tie counting 0.5, with a 95%
    Wilson interval on wins + ties / 2 out of n (each pair taken as one independent trial)."""
    n = len(base)
    wins = float((tuned > base).sum()) + 0.5 * float((tuned == base).sum())
    return dict(base=float(base.mean()), tuned=float(tuned.mean()), win_rate=wins / n, ci95=list(wilson(wins, n)), n=n)


def _stamp(path):
    """A path and the time its newest file changed (a UNet retrained in place is not taken for the old one)."""
    if not path:
        return None
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    return [os.path.abspath(path), max((os.path.getmtime(f) for f in files), default=0.0)]


def image_size(pipe: Pipeline, a):
    """(height, width) of the images made: SDEdit keeps its input's size unless --height / --width say otherwise."""
    if a.init_image:
        return tuple(load_image(a.init_image, a.height, a.width, multiple=max(8, pipe.f)).shape[-2:])
    return a.height or pipe.size, a.width or pipe.size


def initial_noise(pipe: Pipeline, items, height, width) -> torch.Tensor:
    """(B, C, h, w): each image's own noise, drawn from its seed alone (as pipe(seed=) draws it)."""
    return torch.cat([pipe.noise(1, pipe.latent_shape(height, width), it["seed"]) for it in items])


def sampling_options(a, pipe: Pipeline) -> dict:
    guidance = a.guidance if a.guidance is not None else (5.0 if pipe.sdxl else 7.5)
    return dict(negative=a.negative, steps=a.steps, guidance=guidance, scheduler=a.scheduler, height=a.height,
                width=a.width, init_image=a.init_image, strength=a.strength)


def compare(a, items, dtype, scorers):
    """--compare: every item's base and tuned image from the same initial noise, kept in --out/base and --out/tuned
    (a rerun with the same settings makes only the missing ones), a grid, and with --score the evaluation."""
    settings = dict(model=_stamp(a.model), unet=_stamp(a.unet), lora=_stamp(a.lora), tokenizer=a.tokenizer,
                    negative=a.negative, steps=a.steps, guidance=a.guidance, scheduler=a.scheduler, height=a.height,
                    width=a.width, dtype=a.dtype, init_image=_stamp(a.init_image),
                    strength=a.strength if a.init_image else None)
    index_path = os.path.join(a.out, "images.json")  # settings, and name -> prompt of every pair made so far
    index = read_json(index_path, {"settings": settings, "images": {}})
    changed = [k for k in settings if index["settings"].get(k) != settings[k]]
    if changed:
        said = [f"--{k} {index['settings'].get(k)} (now {settings[k]})" if k in ("steps", "guidance", "scheduler",
                "height", "width", "dtype", "negative", "strength") else f"--{k} (another path or newer files)"
                for k in changed]
        raise ValueError(f"{a.out} holds images made with other settings: {', '.join(said)}; give another --out, or "
                         f"delete {index_path} to make them all again")
    for sub in ("base", "tuned"):
        os.makedirs(os.path.join(a.out, sub), exist_ok=True)

    def path(sub, it):
        return os.path.join(a.out, sub, it["name"] + ".png")
    made = index["images"]
    todo = [it for it in items if made.get(it["name"]) != it["prompt"]
            or not (os.path.isfile(path("base", it)) and os.path.isfile(path("tuned", it)))]
    print(f"images: {len(items) - len(todo)} of {len(items)} pairs reused, {len(todo)} to make "
          f"({a.out}/base, {a.out}/tuned)", flush=True)
    if todo:
        pipe = load(a.model, device=a.device, dtype=dtype, tokenizer=a.tokenizer)
        pipe.progress = False
        base, tuned = pipe.unet, load_unet(a.model, a.unet, a.lora, a.device, dtype)
        kw, (h, w) = sampling_options(a, pipe), image_size(pipe, a)
        for s in range(0, len(todo), a.batch_size):
            batch = todo[s:s + a.batch_size]
            latents = initial_noise(pipe, batch, h, w)  # the same noise through both UNets
            for sub, u in (("base", base), ("tuned", tuned)):
                pipe.unet = u
                for it, x in zip(batch, pipe([it["prompt"] for it in batch], latents=latents, **kw)):
                    save_png(to_pil(x), path(sub, it))
            made.update({it["name"]: it["prompt"] for it in batch})
            save_json(index, index_path)
            cli.progress(f"compare: {s + len(batch)}/{len(todo)} pairs made")
        cli.end_progress()
        del pipe, base, tuned
    if scorers:
        report(a, items, score_pairs(items, scorers, path, a.score_batch))
    rows = {}  # the grid: the first 16 prompts, base | tuned for each of their first 4 images
    for it in items:
        if it["copy"] < 4 and (it["index"] in rows or len(rows) < 16):
            rows.setdefault(it["index"], []).extend(load_image(path(sub, it))[0] for sub in ("base", "tuned"))
    out = os.path.join(a.out, f"compare_seed{a.seed}.png")
    save_png(grid(list(rows.values())), out)
    print(out)


def score_pairs(items, scorers, path, batch_size=16) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """kind -> (base scores (n,), tuned scores (n,)) of the PNG files (what a user sees), batch_size pairs a call."""
    out = {}
    for kind, scorer in scorers.items():
        base, tuned = [], []
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            images = torch.cat([load_image(path(sub, it)) for sub in ("base", "tuned") for it in chunk])  # (2B,3,H,W)
            with torch.no_grad():
                scores = scorer(images, [it["prompt"] for it in chunk] * 2).float().cpu()
            base.append(scores[:len(chunk)])
            tuned.append(scores[len(chunk):])
            cli.progress(f"scoring {kind}: {s + len(chunk)}/{len(items)} pairs")
        cli.end_progress()
        out[kind] = torch.cat(base), torch.cat(tuned)
    return out


def report(a, items, scores):
    """Print the table and write scores.json (per scorer: means, win rate, ci95, n; per category too), scores.csv
    (one row per image pair) and scores.png (the win rates as bars)."""
    categories = list(dict.fromkeys(it["category"] for it in items if it["category"]))
    res = {}
    for kind, (b, t) in scores.items():
        res[kind] = win_rate(b, t)
        if categories:
            mask = {c: torch.tensor([it["category"] == c for it in items]) for c in categories}
            res[kind]["categories"] = {c: win_rate(b[m], t[m]) for c, m in mask.items()}
    save_json(res, os.path.join(a.out, "scores.json"))
    tmp = os.path.join(a.out, f"scores.csv.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "copy", "seed", "category", "prompt", "base_image", "tuned_image"]
                   + [f"{k}_{side}" for k in scores for side in ("base", "tuned")])
        for i, it in enumerate(items):
            w.writerow([it["index"], it["copy"], it["seed"], it["category"], it["prompt"], f"base/{it['name']}.png",
                        f"tuned/{it['name']}.png"] + [f"{scores[k][side][i]:.6g}" for k in scores for side in (0, 1)])
    os.replace(tmp, os.path.join(a.out, "scores.csv"))
    save_png(chart(res), os.path.join(a.out, "scores.png"))
    print(f"{'scorer':<10} {'category':<22} {'n':>5} {'base':>9} {'tuned':>9} {'win_rate':>8}  ci95")
    for kind, r in res.items():
        for c, x in [("all", r)] + list(r.get("categories", {}).items()):
            print(f"{kind:<10} {c:<22} {x['n']:>5} {x['base']:>9.4f} {x['tuned']:>9.4f} {x['win_rate']:>8.3f}  "
                  f"[{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}]")
    print(f"scores: {a.out}/scores.json, scores.csv, scores.png (win rate of tuned over base; ties count 0.5)")


def chart(res) -> Image.Image:
    """A bar chart of res (report's dict): per category ("all" first), one bar per scorer, the win rate of tuned
    over base with its 95% interval as a whisker; a grey line at 0.5, no change."""
    kinds = list(res)
    cats = ["all"] + list(res[kinds[0]].get("categories", {}))
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    bar, gap, left, width = 12, 8, 150, 400
    top = 24 + 14 * len(kinds)  # title and legend
    height = top + len(cats) * (len(kinds) * bar + gap) + 24
    img = Image.new("RGB", (left + width + 20, height), "white")
    d = ImageDraw.Draw(img)

    def x(v):
        return left + round(v * width)
    d.text((4, 4), "win rate of tuned over base, 95% interval (0.5 = no change)", fill="black")
    for k, kind in enumerate(kinds):
        d.rectangle([4, 22 + 14 * k, 14, 31 + 14 * k], fill=colours[k % len(colours)])
        d.text((20, 21 + 14 * k), kind, fill="black")
    for ci, cat in enumerate(cats):
        y0 = top + ci * (len(kinds) * bar + gap)
        d.text((4, y0), cat[:24], fill="black")
        for k, kind in enumerate(kinds):
            r = res[kind] if cat == "all" else res[kind]["categories"][cat]
            y = y0 + k * bar
            d.rectangle([x(0), y + 1, x(r["win_rate"]), y + bar - 2], fill=colours[k % len(colours)])
            d.line([x(r["ci95"][0]), y + bar // 2, x(r["ci95"][1]), y + bar // 2], fill="black")
    bottom = height - 22
    d.line([x(0), top - 4, x(0), bottom], fill="black")
    d.line([x(0.5), top - 4, x(0.5), bottom], fill=(150, 150, 150))
    for v in (0, 0.25, 0.5, 0.75, 1):
        d.text((x(v) - 8, bottom + 4), f"{v:g}", fill="black")
    return img


def relabel_file(a, dtype):
    """--relabel: AI feedback for a pair set, written as a JSONL that dpo.py trains on. Images are referenced, not
    copied: paths relative to the JSONL, or parquet_ref strings pointing into the Pick-a-Pic shards."""
    rows = data.PairRows(a.relabel, split=a.split or "train")
    (kind, scorer), = load_scorers(a.score, a.device, dtype).items()
    root = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(root, exist_ok=True)
    tmp, labels, agree, k, tied = f"{a.out}.tmp{os.getpid()}", Counter(), [], 0, 0
    with open(tmp, "w") as f:
        for k, p in enumerate(relabel(rows, scorer, a.ties, a.score_batch), 1):
            line = dict(caption=p["caption"], image_0=os.path.relpath(p["ref_0"], root),
                        image_1=os.path.relpath(p["ref_1"], root), label_0=p["label_0"], score_0=p["score_0"],
                        score_1=p["score_1"], scorer=kind, label_0_before=p["label_0_before"])
            f.write(json.dumps(line) + "\n")
            labels[p["label_0"]] += 1
            tied += p["score_0"] == p["score_1"]
            if p["label_0"] != 0.5 and p["label_0_before"] in (0.0, 1.0):
                agree.append(p["label_0"] == p["label_0_before"])
            if k % a.score_batch == 0:
                cli.progress(f"relabel: {k}/{len(rows)} pairs")
    cli.end_progress()
    os.replace(tmp, a.out)
    if a.ties == "drop":
        ties = f"ties={tied} (label 0.5: dpo.py drops them)"
    else:
        ties = f"ties={tied} (image_0 wins, as the official code; skipped {len(rows) - k} pairs labelled a tie)"
    before = f" agreement_with_former_labels={sum(agree) / len(agree):.3f}" if agree else ""
    print(f"relabel pairs={k} image_0_preferred={labels[1.0]} image_1_preferred={labels[0.0]} {ties}{before} "
          f"-> {a.out}")


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = cli.Parser(description="Generate images, base-vs-tuned comparisons scored by reward models, SDEdit edits, "
                   "preference accuracy, or AI-feedback labels for a pair set.")
    p.add_argument("--model", help="diffusers folder or single .safetensors (SDXL / SD1.5); not for --relabel")
    p.add_argument("--unet", help="fine-tuned UNet: dpo.py's --out_dir, a diffusers unet/ folder or one file")
    p.add_argument("--lora", help="a LoRA on top of the UNet: dpo.py --lora's out_dir, its lora/ folder, or a "
                   "diffusers pytorch_lora_weights.safetensors")
    p.add_argument("--tokenizer", help="tokenizer folder(s) for a single-file checkpoint")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a text file (one prompt per line), a TSV file with Prompt and Category columns, "
                   "or parti: the built-in PartiPrompts (1,632 prompts, 12 categories)")
    p.add_argument("--categories", help="only these categories of --prompts, comma-separated (e.g. Animals,Vehicles)")
    p.add_argument("--per_category", type=int, help="only the first N prompts of each category")
    p.add_argument("--per_prompt", type=int, default=1, help="images per prompt (each with its own seed)")
    p.add_argument("--negative", help="negative prompt (default: empty; SDXL: zero embeddings)")
    p.add_argument("--out", default="samples", help="output folder (--relabel: the JSONL file to write)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, help="classifier-free guidance (default 5.0 SDXL, 7.5 SD1.5)")
    p.add_argument("--scheduler", choices=["euler", "ddim"], default="euler")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--compare", action="store_true", help="base and --unet/--lora images from the same noise, in "
                   "out/base and out/tuned (a rerun reuses them), and a grid: rows = prompts, columns = base, tuned")
    p.add_argument("--score", action="append", default=[], metavar="KIND[=PATH][,OPTION=VALUE...]",
                   help="a reward model (repeatable): pickscore=DIR, clip=DIR, hps=FILE.pt,tokenizer=DIR, "
                   "aesthetic=DIR,head=FILE.pth, or area (the demo's rule); with --compare: win rates in "
                   "out/scores.json, .csv, .png; with --relabel: the one model that labels")
    p.add_argument("--score_batch", type=int, default=16, help="pairs per reward-model call (2N images)")
    p.add_argument("--relabel", metavar="DATA", help="AI feedback: label the pairs of DATA (parquet or JSONL) with "
                   "--score and write a JSONL dpo.py trains on to --out (images referenced, not copied)")
    p.add_argument("--ties", choices=["drop", "official"], default="drop", help="--relabel: a score tie is label 0.5, "
                   "which dpo.py drops; official: image_0 wins a tie and pairs labelled a tie are skipped")
    p.add_argument("--init_image", help="SDEdit: start from this image")
    p.add_argument("--strength", type=float, default=0.6, help="SDEdit noise level in (0, 1]")
    p.add_argument("--eval_pairs", help="preference pairs (parquet or JSONL): report implicit-reward accuracy")
    p.add_argument("--eval_k", type=int, default=4, help="(t, eps) draws per pair")
    p.add_argument("--split", help="which split of a Pick-a-Pic folder (--eval_pairs: test_unique; --relabel: train)")
    p.add_argument("--eval_ref", help="reference UNet for --eval_pairs (default: --model's UNet)")
    p.add_argument("--eval_baseline", help="--eval_pairs: also score this UNet (e.g. an SFT run) with the same draws")
    a = p.parse_args(argv)
    if min(a.steps, a.batch_size, a.eval_k, a.per_prompt, a.score_batch, a.per_category or 1) < 1:
        p.error("--steps, --batch_size, --eval_k, --per_prompt, --per_category and --score_batch must be >= 1")
    if not 0 < a.strength <= 1:
        p.error(f"--strength must be in (0, 1], got {a.strength}")
    try:
        a.score = [parse_score(s) for s in a.score]
    except ValueError as e:
        p.error(str(e))
    kinds = [kind for kind, _, _ in a.score]
    if len(set(kinds)) < len(kinds):
        p.error(f"--score: each kind once (scores.json is keyed by kind), got {', '.join(kinds)}")
    if a.relabel:
        if a.compare or a.eval_pairs or a.prompt or a.prompts:
            p.error("--relabel is a run of its own (no --compare, --eval_pairs, --prompt or --prompts)")
        if len(a.score) != 1:
            p.error(f"--relabel needs one --score KIND[=PATH] (the model that labels), got {len(a.score)}")
        if not a.out.endswith(".jsonl"):
            p.error(f"--relabel writes a JSONL file: give --out FILE.jsonl, got {a.out}")
        return a
    if not a.model:
        p.error("--model is required (all but --relabel generate or evaluate with it)")
    if a.compare and not (a.unet or a.lora):
        p.error("--compare needs --unet or --lora (the tuned model to compare with the base)")
    if a.compare and a.eval_pairs:
        p.error("--compare and --eval_pairs are separate runs (--eval_pairs evaluates --unet against --eval_ref)")
    if a.score and not a.compare:
        p.error("--score goes with --compare (evaluation) or --relabel (AI feedback)")
    if (a.eval_ref or a.eval_baseline) and not a.eval_pairs:
        p.error("--eval_ref and --eval_baseline go with --eval_pairs")
    if not a.eval_pairs and not (a.prompt or a.prompts):
        p.error("give --prompt, --prompts FILE or --eval_pairs DATA")
    return a


def run(a):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    if a.relabel:
        relabel_file(a, dtype)
        return
    if a.init_image and not os.path.isfile(a.init_image):
        raise ValueError(f"init image not found: {a.init_image}")
    items = prompt_items(a) if a.prompt or a.prompts else []
    if a.compare:
        compare(a, items, dtype, load_scorers(a.score, a.device, dtype))
        return
    pairs = data.read_pairs(a.eval_pairs, split=a.split or "test_unique") if a.eval_pairs else None
    pipe = load(a.model, unet=a.unet, device=a.device, dtype=dtype, tokenizer=a.tokenizer, lora=a.lora)
    os.makedirs(a.out, exist_ok=True)
    if pairs is not None:
        if not pairs:
            raise ValueError(f"{a.eval_pairs}: no preference pairs (after dropping ties)")
        ref = unetlib.load(a.eval_ref or a.model, device=a.device, dtype=dtype)
        kw, n = dict(k=a.eval_k, seed=a.seed, size=a.height, batch_size=a.batch_size), len(pairs)
        acc = implicit_accuracy(pipe, ref, pairs, **kw)[0]
        res = {"pairs": n, "k": a.eval_k, "accuracy": acc, "ci95": wilson(acc * n, n)}
        print(f"eval pairs={n} k={a.eval_k} accuracy={acc:.4f} ci95=[{res['ci95'][0]:.4f}, {res['ci95'][1]:.4f}] "
              "(implicit reward of --unet against the reference; chance is 0.5)")
        if a.eval_baseline:  # another UNet, the same reference and draws: a paired comparison
            tuned, pipe.unet = pipe.unet, unetlib.load(a.eval_baseline, device=a.device, dtype=dtype)
            base = implicit_accuracy(pipe, ref, pairs, **kw)[0]
            pipe.unet = tuned
            res.update(baseline_accuracy=base, baseline_ci95=wilson(base * n, n))
            lo, hi = res["baseline_ci95"]
            print(f"eval baseline accuracy={base:.4f} ci95=[{lo:.4f}, {hi:.4f}] (--eval_baseline, the same draws)")
        save_json(res, os.path.join(a.out, "eval.json"))
    kw, (h, w) = sampling_options(a, pipe), (image_size(pipe, a) if items else (None, None))
    for s in range(0, len(items), a.batch_size):
        batch = items[s:s + a.batch_size]
        imgs = pipe([it["prompt"] for it in batch], latents=initial_noise(pipe, batch, h, w), **kw)
        for it, x in zip(batch, imgs):
            path = os.path.join(a.out, it["name"] + ".png")
            save_png(to_pil(x), path)
            print(path)


def main(argv=None):
    a = parse_args(argv)
    try:
        run(a)
    except (CheckpointError, ValueError, OSError) as e:
        cli.fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


if __name__ == "__main__":
    main()
