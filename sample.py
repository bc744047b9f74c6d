"""Sampling and evaluation with the from-scratch models: text-to-image, SDEdit, base-vs-tuned grids, and the
paper's implicit-reward preference accuracy (Sec. 5.5).

    python sample.py --model PATH --prompt "a photo of a cat" --out samples/
    python sample.py --model PATH --unet runs/dpo --compare --prompts prompts.txt --out samples/
    python sample.py --model PATH --init_image in.png --strength 0.6 --prompt "..." --out samples/
    python sample.py --model PATH --unet runs/dpo --eval_pairs pairs.jsonl [--eval_baseline runs/sft] --out eval/

The two schedulers are written out below (no diffusers): each is a table of noise levels over the chosen
timesteps plus a one-line update. They reproduce diffusers' EulerDiscreteScheduler / DDIMScheduler (eta=0)
and its SDXL / SD1.5 pipelines step for step; tests/test_sample.py checks that on tiny random models.
"""
import math
import os
from typing import Callable, List

import numpy as np
import torch
from PIL import Image

import cli
import clip
import data
import diffusion
import lora as loralib
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
        shape = (self.unet.config["in_channels"], height // self.f, width // self.f)
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


def relabel(pairs, scorer: Scorer, size=None) -> List[dict]:
    """Copies of the pairs with label_0 set by the scorer: 1.0 if image_0 scores higher, 0.0 if lower, 0.5 tied."""
    out = []
    for p in pairs:
        x0 = load_image(p["image_0"], size, size)
        imgs = torch.cat([x0, load_image(p["image_1"], *x0.shape[-2:])])  # (2, 3, H, W) at one size
        s = scorer(imgs, [p["caption"]] * 2)
        out.append({**p, "label_0": 1.0 if s[0] > s[1] else 0.0 if s[0] < s[1] else 0.5})
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
# Command line


def parse_args(argv=None):
    p = cli.Parser(description="Generate images, base-vs-tuned grids, SDEdit edits, or preference accuracy.")
    p.add_argument("--model", required=True, help="diffusers folder or single .safetensors (SDXL / SD1.5)")
    p.add_argument("--unet", help="fine-tuned UNet: dpo.py's --out_dir, a diffusers unet/ folder or one file")
    p.add_argument("--lora", help="a LoRA on top of the UNet: dpo.py --lora's out_dir, its lora/ folder, or a "
                   "diffusers pytorch_lora_weights.safetensors")
    p.add_argument("--tokenizer", help="tokenizer folder(s) for a single-file checkpoint")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="text file, one prompt per line")
    p.add_argument("--negative", help="negative prompt (default: empty; SDXL: zero embeddings)")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, help="classifier-free guidance (default 5.0 SDXL, 7.5 SD1.5)")
    p.add_argument("--scheduler", choices=["euler", "ddim"], default="euler")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--compare", action="store_true", help="one grid: rows = prompts, columns = base, --unet")
    p.add_argument("--init_image", help="SDEdit: start from this image")
    p.add_argument("--strength", type=float, default=0.6, help="SDEdit noise level in (0, 1]")
    p.add_argument("--eval_pairs", help="preference pairs (parquet or JSONL): report implicit-reward accuracy")
    p.add_argument("--eval_k", type=int, default=4, help="(t, eps) draws per pair")
    p.add_argument("--split", default="test_unique", help="--eval_pairs: which split of a Pick-a-Pic folder")
    p.add_argument("--eval_ref", help="reference UNet for --eval_pairs (default: --model's UNet)")
    p.add_argument("--eval_baseline", help="--eval_pairs: also score this UNet (e.g. an SFT run) with the same draws")
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch_size < 1 or a.eval_k < 1:
        p.error("--steps, --batch_size and --eval_k must be >= 1")
    if not 0 < a.strength <= 1:
        p.error(f"--strength must be in (0, 1], got {a.strength}")
    if a.compare and not (a.unet or a.lora):
        p.error("--compare needs --unet or --lora (the tuned model to compare with the base)")
    if a.compare and a.eval_pairs:
        p.error("--compare and --eval_pairs are separate runs (--eval_pairs evaluates --unet against --eval_ref)")
    if (a.eval_ref or a.eval_baseline) and not a.eval_pairs:
        p.error("--eval_ref and --eval_baseline go with --eval_pairs")
    if not a.eval_pairs and not (a.prompt or a.prompts):
        p.error("give --prompt, --prompts FILE or --eval_pairs DATA")
    return a


def run(a):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    if a.init_image and not os.path.isfile(a.init_image):
        raise ValueError(f"init image not found: {a.init_image}")
    prompts = list(a.prompt)
    if a.prompts:
        try:
            with open(a.prompts) as f:
                prompts += [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise ValueError(f"cannot read prompts file {a.prompts}: {e.strerror}") from None
    pairs = data.read_pairs(a.eval_pairs, split=a.split) if a.eval_pairs else None
    pipe = load(a.model, unet=None if a.compare else a.unet, device=a.device, dtype=dtype, tokenizer=a.tokenizer,
                lora=None if a.compare else a.lora)
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
        if not prompts:
            return
    guidance = a.guidance if a.guidance is not None else (5.0 if pipe.sdxl else 7.5)
    kw = dict(negative=a.negative, steps=a.steps, guidance=guidance, scheduler=a.scheduler, height=a.height,
              width=a.width, init_image=a.init_image, strength=a.strength)
    tuned = load_unet(a.model, a.unet, a.lora, a.device, dtype) if a.compare else None
    rows = []
    for s in range(0, len(prompts), a.batch_size):
        batch = prompts[s:s + a.batch_size]
        imgs = pipe(batch, seed=a.seed + s, **kw)
        if tuned is not None:  # same seeds, hence the same initial latents, through the tuned UNet
            base_unet, pipe.unet = pipe.unet, tuned
            rows += [[x, y] for x, y in zip(imgs, pipe(batch, seed=a.seed + s, **kw))]
            pipe.unet = base_unet
            continue
        for j, x in enumerate(imgs):
            path = os.path.join(a.out, f"{s + j:04d}_seed{a.seed + s + j}.png")
            save_png(to_pil(x), path)
            print(path)
    if rows:
        path = os.path.join(a.out, f"compare_seed{a.seed}.png")
        save_png(grid(rows), path)
        print(path)


def main(argv=None):
    a = parse_args(argv)
    try:
        run(a)
    except (CheckpointError, ValueError, OSError) as e:
        cli.fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


if __name__ == "__main__":
    main()
