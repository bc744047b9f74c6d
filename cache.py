"""A run's feed: the items it reads (a pair's images, cropped and flipped, or their latents from the latent cache) and
the denoiser's inputs made from a batch of them: VAE latents and text embeddings, computed on the fly (the encoders on
the GPU beside the denoiser) or once ahead into a latent cache, so that training needs neither VAE nor text encoders.

The cache holds scaled VAE latents (and with --latents sample their posterior std), text embeddings, SDXL's time ids
and, for Diffusion-RPO with --rpo_clip, CLIP's prompt and image embeddings, in safetensors shards of 1024 items per
rank, with meta.json saying what was cached. One crop/flip per item is frozen into it (drawn as in epoch 0).
"""
import contextlib
import json
import os

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open

import clip
import diffusion
import reward
import vae as vaelib
import weights
from data import EpochOrder, Preferences, Unreadable, collate, seed_for
from images import open_image, transform
from weights import atomic, save_json, save_safetensors

# ----------------------------------------------------------------------------------------------------
# A batch -> the denoiser's inputs


def encoders(model, dev, dtype, tokenizer=None, vae_dtype=torch.float32, quantize=None):
    """(text encoders in dtype, VAE in vae_dtype) of a model path: what turns prompts and images into the denoiser's
    inputs (training keeps the VAE in fp32, as the official code). quantize: the text encoders' Linear layers in that
    format, as the base's (--quantize; the VAE, small and convolutional, stays as it is)."""
    return clip.load(model, dev, dtype, tokenizer=tokenizer, quantize=quantize), vaelib.load(model, dev, vae_dtype)


def scaled_std(v, std):
    """The VAE posterior's std (..., C, h, w) in the denoiser's latent units: times the scaling factor, a number or
    one per channel ((1, C, 1, 1), Qwen-Image's)."""
    return std * torch.as_tensor(v.scaling_factor).to(std.device)


def model_inputs(batch, drop, dev, family, encoders=None, empty=None, latent_noise=None, bf16=False,
                 official_size=None, guidance=None):
    """What the denoiser takes for B items of k images each (pairs: k = 2): clean latents z (kB, C, h, w), all first
    images first (the winners), and cond with kB rows, as the family's record lists its inputs ((context, pooled,
    time_ids) for a UNet, (context, pooled) for SD3, (context, pooled, guidance) for FLUX). A dropped prompt is the
    encoders' embedding of "" (as the official code, for SDXL too; not zeros). latent_noise (B, k, C, h, w): z drawn
    from the VAE posterior with it (--latents sample, the official code); the default is the posterior mean.
    bf16: the VAE encodes under bf16 autocast. official_size: every image's SDXL time ids are the official code's
    constants for this size (--time_ids official). guidance: the denoiser's guidance input (FLUX-dev)."""
    with torch.no_grad():
        if "latents" in batch:  # --cache: latents and text embeddings were computed once
            z = batch["latents"].to(dev).float()  # (B, k, C, h, w)
            std = batch["latents_std"].to(dev).float() if latent_noise is not None else None
            ctx, pooled = batch["context"].to(dev), batch.get("pooled")
            pooled = None if pooled is None else pooled.to(dev)
            e_ctx, e_pooled = empty["context"][None], None if empty["pooled"] is None else empty["pooled"][None]
            n = max(ctx.shape[1], e_ctx.shape[1])  # a language model's states: the cache's length or ""'s
            ctx, pooled = diffusion.pad_text(ctx, pooled, n)
            e_ctx, e_pooled = diffusion.pad_text(e_ctx, e_pooled, n)
            ctx = torch.where(drop[:, None, None], e_ctx, ctx)
            if pooled is not None:
                pooled = torch.where(drop[:, None], e_pooled, pooled)
        else:  # the VAE and the text encoders run here, on the GPU
            te, v = encoders
            px = batch["pixels"].to(dev)  # (B, k, 3, H, W)
            with torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
                one = [v.encode(x[None], std=True) for x in px.flatten(0, 1)]  # an image at a time: 1/Bk the peak
            z, std = torch.cat([m for m, _ in one]), torch.cat([s for _, s in one])  # (Bk, C, h, w) each, unscaled
            z = v.scale(z.float().unflatten(0, px.shape[:2]))  # (B, k, C, h, w) scaled latent means
            std = scaled_std(v, std.float().unflatten(0, px.shape[:2]))
            ctx, pooled = te.encode(["" if d else c for c, d in zip(batch["caption"], drop.tolist())])
        if latent_noise is not None:
            z = z + std * latent_noise.to(dev)  # a sample of the posterior instead of its mean
        k = z.shape[1]
        z = z.transpose(0, 1).flatten(0, 1)  # (kB, C, h, w): all first images, then all second ones
        ctx, pooled = ctx.repeat(k, 1, 1), (None if pooled is None else pooled.repeat(k, 1))  # kB rows
        time_ids = None  # SDXL is also told each image's size and crop
        if family.time_ids:
            time_ids = batch["time_ids"].to(dev).float().transpose(0, 1).flatten(0, 1)  # (B, k, 6) -> (kB, 6)
            if official_size:
                r = float(official_size)
                time_ids = torch.tensor([r, r, 0.0, 0.0, r, r], device=dev).expand(len(time_ids), 6)
    return z, family.conditioning(ctx, pooled, time_ids, guidance)


def rpo_embeddings(batch, dev, scorer):
    """Diffusion-RPO's CLIP embeddings of B pairs (B, 3, P): prompt, winner, loser (unit length, fp32), from the
    cache (--cache) or from the images with scorer (a reward.Scorer: its CLIP towers)."""
    if "rpo_clip" in batch:
        return batch["rpo_clip"].to(dev).float()
    return clip_triples(scorer, batch["pixels"].to(dev), batch["caption"])


def clip_triples(scorer, pixels, captions):
    """pixels (B, 2, 3, H, W) in [-1, 1] and B captions -> (B, 3, P): each pair's prompt, winner, loser embedding."""
    with torch.no_grad():
        img = scorer.image_embeds((pixels.flatten(0, 1) + 1) / 2).unflatten(0, pixels.shape[:2])  # (B, 2, P)
        txt = scorer.text_embeds(list(captions))  # (B, P)
    return torch.cat([txt[:, None], img], 1)  # (B, 3, P)


class PreferenceDataset(torch.utils.data.Dataset):
    """Global position -> the item's images (a pair's two, preferred first, or one with its label). An unreadable
    item is reported (its index in "bad") and replaced by the next readable one in the epoch order (deterministic,
    so every world size sees the same data)."""

    def __init__(self, pairs: Preferences, res: int, seed: int, random_crop: bool, flip: bool):
        self.pairs, self.res, self.seed, self.random_crop, self.flip = pairs, res, seed, random_crop, flip
        self.index = EpochOrder(pairs.group, seed, pairs.window_groups)
        self.per_item = 1 if pairs.singles else 2  # images per item

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, pos: int) -> dict:
        return dict(pos=pos, **self.read(lambda k: self.index(pos + k), pos))

    def read(self, candidate, key: int) -> dict:
        """Try pairs candidate(0), candidate(1), ... until one decodes; crop/flip drawn from (seed, key)."""
        bad = []  # the indices of the unreadable items passed over
        for k in range(len(self.pairs)):
            i = candidate(k)
            try:
                caption, images, label = self.pairs.raw(i)
                rng = np.random.default_rng(seed_for(self.seed, key, k, 0xC409))
                out = [transform(open_image(im), self.res, rng, self.random_crop, self.flip) for im in images]
            except Exception as e:  # corrupt bytes, missing file, decoder error: skip and report, never crash
                print(f"warning: skipping unreadable pair {self.pairs.where(i)} ({type(e).__name__}: {str(e)[:80]})",
                      flush=True)
                bad.append(i)
                continue
            item = dict(index=i, caption=caption, pixels=torch.stack([x for x, _ in out]),  # (k, 3, H, W)
                        time_ids=torch.stack([ids for _, ids in out]), bad=bad)  # (k, 6)
            if label is not None:
                item["label"] = label
            return item
        raise ValueError(f"{self.pairs.path}: no readable image pair")


def training_set(args, pairs, dev, rank, world, log):
    """(dataset, (text encoders, VAE) or None, embeddings of "" or None, VAE downsampling): the latent cache with
    --cache or without --data (built first if missing), else the images themselves."""
    meta = cache_meta(args.cache_dir)
    singles = pairs.singles if pairs is not None else bool(meta and meta.get("singles"))
    if singles and args.loss != "kto":  # one image has no second to compare with; refused before anything is written
        raise ValueError(f"{args.data or args.cache_dir} holds single labelled images: train them with --loss kto")
    if not args.cache and pairs is not None:  # (--offload_encoders: kept on the CPU, Feed brings them for each batch)
        where = torch.device("cpu") if args.offload_encoders else dev
        te, v = encoders(args.model, where, args.amp_dtype, args.tokenizer, quantize=args.quantize)
        dataset = PreferenceDataset(pairs, args.resolution, args.seed, args.random_crop, not args.no_flip)
        return dataset, (te, v), None, v.downsample
    if meta is None and pairs is None:
        raise FileNotFoundError(f"no --data and no cache in {args.cache_dir}")
    if meta is None:
        log(f"building the latent cache in {args.cache_dir}")
        build_cache(args, pairs, dev, rank, world)
    elif "depends" not in meta:
        raise ValueError(f"the cache in {args.cache_dir} does not record what it was built from (an older version of "
                         "this code): use another --cache_dir, or delete it to build it again")
    elif differing(meta["depends"], depends(args, pairs)):
        raise ValueError(f"the cache in {args.cache_dir} was built from other inputs: "
                         f"{differing(meta['depends'], depends(args, pairs))}; use another --cache_dir, or delete it "
                         "to build it again")
    elif args.rpo_clip and meta.get("rpo_clip") != os.path.abspath(args.rpo_clip):
        raise ValueError(f"the cache in {args.cache_dir} holds no CLIP embeddings of --rpo_clip {args.rpo_clip} "
                         f"(built {'with ' + meta['rpo_clip'] if meta.get('rpo_clip') else 'without it'}): "
                         "use another --cache_dir")
    elif args.latents == "sample" and not meta.get("latents_std"):
        raise ValueError(f"the cache in {args.cache_dir} holds latent means only, --latents sample needs their "
                         "standard deviations too: use another --cache_dir")
    dataset = Cache(args.cache_dir, args.seed)
    empty = {k: None if v is None else v.to(dev) for k, v in dataset.empty.items()}
    return dataset, None, empty, dataset.meta["downsample"]


@contextlib.contextmanager
def on_device(models, dev):
    """--offload_encoders: models (the text encoders and the VAE) on dev only inside, on the CPU again after
    (diffusers' model CPU offload): the training step's peak does not hold them, for a copy each way per batch."""
    for m in models or ():
        m.to(dev)
    try:
        yield
    finally:
        for m in models or ():
            m.to("cpu")


class Feed:
    """Where a run's batches come from and how they become the denoiser's inputs: the latent cache (--cache, or no
    --data: built first if missing) or the images themselves with the VAE and the text encoders on the device, and
    Diffusion-RPO's CLIP embeddings beside them. family: the model's record (families.py)."""

    def __init__(self, args, family, pairs, channels, dev, rank, world, log, source=None):
        """source: (dataset, encoders, empty, VAE downsampling) made elsewhere (online.py), else training_set's."""
        self.args, self.family, self.dev, self.ema = args, family, dev, None  # ema: dpo.train's --ema, if any
        self.dataset, self.encoders, self.empty, down = source or training_set(args, pairs, dev, rank, world, log)
        self.per_item = self.dataset.per_item  # images per item: a pair's two, or one labelled image
        self.items = "pairs"  # what the dataset holds, for the log
        self.n_latent = self.per_item if args.latents == "sample" else 0  # posterior draws per item
        self.latent_shape = (channels, args.resolution // down, args.resolution // down)  # (C, h, w)
        self.fingerprint = pairs.fingerprint() if pairs is not None else getattr(self.dataset, "meta", {}).get(
            "fingerprint")
        self.rpo_clip = None  # Diffusion-RPO's CLIP model, run on each batch's images unless the cache holds them
        if args.loss == "rpo":
            if args.rpo_clip and self.encoders is not None:
                self.rpo_clip = reward.load("clip", args.rpo_clip, dev, args.amp_dtype)
            how = f"CLIP prompt + image similarity ({args.rpo_clip})" if args.rpo_clip else \
                "the UNet's text embeddings of the prompts (no --rpo_clip; Diffusion-RPO uses CLIP prompts and images)"
            log(f"RPO weights: {how}, tau {args.rpo_tau}, each weight scales its {args.rpo_form}")
            if args.batch_size * world == 1:
                log("RPO over one pair per micro-step (all ranks together) is DPO: its matrix is 1x1 with weight 1; "
                    "raise --batch_size (or the ranks) to compare across pairs")

    def positions(self, position, step, world, rank):
        """(step s, the global positions of one micro-batch) for each of this rank's micro-batches from optimizer step
        `step` on: micro-step m of step s on rank r reads p0 + (s - step)*G + m*world*B + r*B + [0, B), p0 = position
        (the data position at `step`), G pairs a step, B a micro-batch."""
        a = self.args
        B, G = a.batch_size, a.pairs_per_step
        for s in range(step, a.max_steps):
            for m in range(a.grad_accum):
                yield s, [position + (s - step) * G + m * world * B + rank * B + k for k in range(B)]

    def loader(self, position, step, world, rank, device):
        """This rank's batches from optimizer step `step` on (positions), read by a DataLoader."""
        a = self.args
        order = [p for _, micro in self.positions(position, step, world, rank) for p in micro]
        workers = (4 if device == "cuda" else 0) if a.num_workers is None else a.num_workers
        return iter(torch.utils.data.DataLoader(self.dataset, batch_size=a.batch_size, sampler=order,
                                                num_workers=workers, collate_fn=collate, pin_memory=device == "cuda"))

    def __call__(self, batch, drop, latent_noise=None):
        """(z, cond) of a batch: model_inputs with this run's encoders or cache."""
        a = self.args
        with on_device(self.encoders if a.offload_encoders else (), self.dev):
            return model_inputs(batch, drop, self.dev, self.family, self.encoders, self.empty, latent_noise,
                                a.amp_dtype == torch.bfloat16, a.resolution if a.time_ids == "official" else None,
                                a.guidance)

    def after_step(self, step):
        """What a feed does after optimizer step `step` (online.Feed: its pairs, the reference, the held-out check)."""

    def finish(self, step):
        """What a feed does at the end of the run, at step `step` (online.Feed: the held-out trend)."""

    def rpo_embeddings(self, batch):
        """(B, 3, P) CLIP embeddings of the batch's prompts, winners and losers with --rpo_clip, else None."""
        return rpo_embeddings(batch, self.dev, self.rpo_clip) if self.args.rpo_clip else None


# ----------------------------------------------------------------------------------------------------
# The latent cache

COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
# (what a cache is encoded with)


def depends(args, pairs) -> dict:
    """What the cached latents and embeddings are made from: the VAE's and the text side's files (their
    fingerprints: moving or copying them is fine), the data, and every setting that changes them (image size,
    crop and flip, drawn from the seed, the dtypes they are stored in). Not --time_ids or prompt dropout, which
    apply to the cache's contents as they are read."""
    model = args.model
    if os.path.isfile(model):  # a single file holds every component
        out = {"the model file": weights.fingerprint(model)["digest"]}
    else:
        root = model if os.path.isdir(os.path.join(model, "vae")) else os.path.dirname(os.path.abspath(model))
        out = {f"{sub}/ weights": weights.fingerprint(os.path.join(root, sub))["digest"] for sub in COMPONENTS
               if os.path.isdir(os.path.join(root, sub))}
    if args.tokenizer:
        out["--tokenizer"] = weights.fingerprint(args.tokenizer)["digest"]
    out.update({"--resolution": args.resolution, "--random_crop": args.random_crop, "--no_flip": args.no_flip,
                "--seed": args.seed, "--dtype": str(args.amp_dtype).replace("torch.", "")})
    if pairs is not None:  # a run on the cache alone has no data to compare with
        out["--data"] = pairs.fingerprint()["digest"]
    return out


def differing(built: dict, now: dict) -> str:
    """The inputs that differ between a cache and this run, in words ("" if none); keys a run lacks are skipped."""
    said = [f"{k} {built.get(k)} (now {v})" for k, v in now.items() if built.get(k) != v]
    return ", ".join(said)


CACHE_KEYS = ("latents", "latents_std", "context", "pooled", "time_ids", "label", "rpo_clip")


def cache_meta(cache_dir: str):
    p = os.path.join(cache_dir, "meta.json")
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return json.load(f)


class Cache(torch.utils.data.Dataset):
    """A cache written by build_cache: global position -> latents (k, C, h, w) preferred first, context, pooled,
    time_ids (and label, for single images); memory-mapped, one row at a time. The order is a plain shuffle of all
    cached items per epoch."""

    def __init__(self, cache_dir: str, seed: int):
        self.meta = cache_meta(cache_dir)
        if self.meta is None:
            raise FileNotFoundError(f"no cache at {cache_dir} (meta.json missing): run with --cache and --data first")
        self.shards = [safe_open(os.path.join(cache_dir, s), "pt") for s in self.meta["shards"]]
        self.where = {}  # pair index -> (shard, row)
        for k, h in enumerate(self.shards):
            for r, i in enumerate(h.get_tensor("index").tolist()):
                self.where[i] = (k, r)
        self.index = EpochOrder(np.zeros(self.meta["pairs"], dtype=np.int64), seed)
        self.per_item = 1 if self.meta.get("singles") else 2  # images per item
        self.empty = weights.torch_file(os.path.join(cache_dir, "empty.pt"), "the cache's embeddings of \"\"")
        # a language model's states are stored at each shard's longest: every item comes out at the longest of all
        self.length = max(h.get_slice("context").get_shape()[1] for h in self.shards) if self.shards else 0

    def __len__(self):
        return self.meta["pairs"]

    def __getitem__(self, pos: int) -> dict:
        k, r = self.where[self.index(pos)]
        h = self.shards[k]
        item = dict(pos=pos, bad=[], **{n: h.get_slice(n)[r:r + 1][0] for n in CACHE_KEYS if n in h.keys()})
        if "label" in item:
            item["label"] = int(item["label"])
        if "pooled" in item and item["pooled"].dtype == torch.bool:  # (L, D) states, (L,) mask: padded to the longest
            ctx, mask = diffusion.pad_text(item["context"][None], item["pooled"][None], self.length)
            item["context"], item["pooled"] = ctx[0], mask[0]
        return item


def build_cache(args, pairs, dev, rank, world):
    """Each rank encodes items rank, rank+world, ...; crop/flip are frozen per item (drawn as for key = its index).
    Latents (and with --latents sample their posterior std) are stored in fp16 (fp32 for fp32 runs), text
    embeddings in the compute dtype."""
    te, v = encoders(args.model, dev, args.amp_dtype, args.tokenizer)
    scorer = None
    if args.rpo_clip:  # Diffusion-RPO's CLIP embeddings of each pair, stored beside its latents
        scorer = reward.load("clip", args.rpo_clip, dev, args.amp_dtype)
    ds, n = PreferenceDataset(pairs, args.resolution, args.seed, args.random_crop, not args.no_flip), len(pairs)
    store = torch.float32 if args.amp_dtype == torch.float32 else torch.float16
    mine = list(range(rank, n, world))
    bad = Unreadable(args.max_bad_frac, f"pairs in {args.data}")
    os.makedirs(args.cache_dir, exist_ok=True)
    for s in range(0, len(mine), 1024):  # one shard file per 1024 pairs
        out = {k: [] for k in ("index", *CACHE_KEYS)}
        for b in range(s, min(s + 1024, len(mine)), 8):
            items = [ds.read(lambda k, i=i: (i + k) % n, i) for i in mine[b:b + 8]]
            bad.add(i for d in items for i in d["bad"])
            px = torch.stack([d["pixels"] for d in items]).to(dev)  # (b, k, 3, H, W)
            with torch.no_grad():
                z, std = v.encode(px.flatten(0, 1), std=True)  # (bk, C, h, w) each
                ctx, pooled = te.encode([d["caption"] for d in items])
            out["index"].append(torch.tensor(mine[b:b + 8]))
            out["latents"].append(v.scale(z.float()).unflatten(0, px.shape[:2]).to(store).cpu())
            if args.latents == "sample":
                out["latents_std"].append(scaled_std(v, std.float()).unflatten(0, px.shape[:2]).to(store).cpu())
            out["context"].append(ctx.cpu())
            if scorer is not None:
                out["rpo_clip"].append(clip_triples(scorer, px, [d["caption"] for d in items]).cpu())
            out["time_ids"].append(torch.stack([d["time_ids"] for d in items]))
            out["pooled"].append(None if pooled is None else pooled.cpu())
            if pairs.singles:
                out["label"].append(torch.tensor([d["label"] for d in items]))
        if out["pooled"][0] is not None:  # a language model's states: each batch its own length, the shard's longest
            longest = max(c.shape[1] for c in out["context"])
            out["context"], out["pooled"] = zip(*[diffusion.pad_text(c, m, longest) for c, m in zip(out["context"],
                                                                                                   out["pooled"])])
        save_safetensors({k: torch.cat(v) for k, v in out.items() if v and v[0] is not None},
                         os.path.join(args.cache_dir, f"r{rank:03d}_{s // 1024:05d}.safetensors"))
        if rank == 0:
            print(f"cache: rank 0 encoded {min(s + 1024, len(mine))}/{len(mine)} pairs", flush=True)
    bad.check(n)
    if rank == 0:
        with torch.no_grad():
            ctx, pooled = te.encode([""])
        empty = {"context": ctx[0].cpu(), "pooled": None if pooled is None else pooled[0].cpu()}
        atomic(os.path.join(args.cache_dir, "empty.pt"), lambda tmp: torch.save(empty, tmp))
        shards = sorted(f for f in os.listdir(args.cache_dir) if f.endswith(".safetensors"))
        meta = dict(pairs=n, shards=shards, resolution=args.resolution, model=os.path.abspath(args.model),
                    data=os.path.abspath(args.data), downsample=v.downsample, fingerprint=pairs.fingerprint(),
                    singles=pairs.singles, latents_std=args.latents == "sample",
                    rpo_clip=os.path.abspath(args.rpo_clip) if args.rpo_clip else None, depends=depends(args, pairs))
        save_json(meta, os.path.join(args.cache_dir, "meta.json"))
    dist.barrier()
