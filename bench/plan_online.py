"""The peak GPU memory of an online DPO step (dpo.py --online, online.py), predicted on a machine without a GPU.

    python bench/step.py --plan        # after the training table: one online row per model and mode
    from bench import models, plan_online; rows = plan_online.plan([models.spec("sdxl")])

An online step has two phases, and its peak is the larger of their peaks:
  sampling  online.Feed.generate, K = --samples_per_prompt images of one prompt: diffusion.conditions (the text
            encoders; classifier-free guidance stacks K negatives on the K prompts, FLUX-dev takes its guidance input
            instead), diffusion.denoise (no grad, autocast in the compute dtype as online.py opens it: without the
            cache of bf16 copies of the fp32 weights, as dpo.pair_loss in training), the VAE's decode of the K
            latents one at a time (no grad, fp32, outside autocast), then one scorer on the K images (reward.py's
            Scorer, its weights in the compute dtype). The what-ifs: autocast's cache on (torch's default), all K
            latents in one decode. Counted on shadow tensors (bench/plan.py's cuda_like, bench/shadow.py's Counter) as
            bench/plan.py counts the training step, two Euler steps (every step allocates as the second does; the first
            fills autocast's cache), with what is resident between steps: the policy and the frozen reference (or
            the LoRA adapters), the optimizer's state (plan.ready), DDP's gradient buckets (the gradients
            themselves are set to None by zero_grad, or live in the buckets), the encoders (online has no --cache),
            the scorer's weights.
  training  the offline step on the sampled pairs with the encoders on the GPU (the plan's row at dpo.py's batch size
            and checkpointing) plus the scorer's weights, which stay loaded.
The noise, the latents between Euler steps and the decoded images live on the CPU in a real run (diffusion.denoise
and decode move them); the plan counts them with the rest, a slight overestimate.
Not counted: a second scorer (--eval_score: its weights come on top), --ref_update's base loaded again on resume.
"""
import argparse
import time

import torch

import diffusion
import online
import reward
from bench import models
from bench import plan as memplan
from bench import shadow
from bench.shadow import META, Counter, allocated, materialize

GiB = memplan.GiB
SCORER = ("pickscore", reward.VIT_H_14)  # PickScore_v1: a CLIP ViT-H/14 (the shape of open_clip's ViT-H-14 config)


class SamplingCounter(Counter):
    """shadow.Counter taking CPU tensors made from data (sigmas, torch.tensor) as meta ones: sampling mixes them in."""

    def run_shadow(self, func, args, kwargs):
        def down(a):
            real = isinstance(a, torch.Tensor) and not isinstance(a, shadow.Shadow) and not a.is_meta
            return a.to(META) if real else a
        return super().run_shadow(func, shadow.apply(down, args), shadow.apply(down, kwargs))


def online_defaults():
    """online.py's flag defaults (--samples_per_prompt, --sample_guidance, ...), so the plan samples as a run does."""
    p = argparse.ArgumentParser(add_help=False)
    online.add_flags(p)
    return p.parse_args([])


def scorer_model(cfg, dtype, counter):
    """A reward.Scorer made under the counter as reward.load makes one (the CLIP of an open_clip config, in dtype)."""
    with torch.device("meta"):
        model = reward.CLIPModel(*reward.from_open_clip(cfg))
    model = materialize(model, dtype).eval().requires_grad_(False)
    counter.tag(model.parameters(), "encoders")
    return reward.Scorer(SCORER[0], model, memplan.tokenizer(model.config["max_position_embeddings"]))


def sampler_timeline(model, mode, K=None, shadow=True, lora_rank=memplan.LORA_RANK, scorer=SCORER[1],
                     autocast_cache=False, vae_batch=1):
    """online.Feed.generate counted on shadows (shadow=False: on real tensors, to check them); the rest: what-ifs."""
    flags = online_defaults()
    K = K or flags.samples_per_prompt
    rank, fmt = memplan.modes(mode)
    args = memplan.settings(model, 1, None, lora_rank if rank else None, fmt)
    fam, res, cfg = model["family"], model["resolution"], model["config"]
    default = fam.sampling_defaults(cfg)[0]  # online.Feed's guidance: the family pipeline's
    cfg_scale, embed = diffusion.guidance_inputs(fam, cfg, default if flags.sample_guidance is None
                                                 else flags.sample_guidance)
    h = res // models.downsample(model["vae"])
    C, zeros = models.latent_channels(model["vae"]), diffusion.zeros_for_empty("", fam)  # as online.Feed samples
    sched_cfg = diffusion.scheduler_config("", fam)
    sched = diffusion.sampler(fam, sched_cfg, "euler", 2, (C, h, h))  # made from data, before the counter
    counter = SamplingCounter(shadow)
    with memplan.cuda_like(), counter:
        for k, val in vars(sched).items():  # its tensors made under the counter, as shadows or real ones
            if isinstance(val, torch.Tensor):
                setattr(sched, k, val.clone())
        policy, ref, trained, opt = memplan.ready(model, args, counter, torch.amp.GradScaler("cpu", enabled=False))
        te, v = memplan.encoders(model, args.amp_dtype, counter, fmt)
        score = scorer_model(scorer, args.amp_dtype, counter)
        prompts, noise = ["a photo"] * K, torch.randn(K, C, h, h)
        first = counter.mark("conditions")
        with torch.no_grad():
            with torch.autocast("cpu", dtype=args.amp_dtype, enabled=args.amp_dtype != torch.float32,
                                cache_enabled=autocast_cache):  # online.Feed.generate's (on CUDA)
                cond = diffusion.conditions(te, prompts, None, cfg_scale > 1, zeros, (res, res), embed)
                counter.mark("denoise")
                x = diffusion.denoise(policy, sched, noise * sched.init_sigma, cond, cfg_scale, torch.float32)
                del cond
            counter.mark("decode")
            n = vae_batch or K
            img = torch.cat([diffusion.decode(v, x[i:i + n]) for i in range(0, K, n)]) if n < K else \
                diffusion.decode(v, x)
            counter.mark("score")
            s = score(img, prompts)
            del img, s, x, noise
        last = counter.mark("idle")
    size = [allocated(p.numel() * p.element_size()) for ps in (trained, score.model.parameters()) for p in ps]
    return dict(counter=counter, window=(first, last), scorer=sum(size[len(trained):]), trained=sum(
        size[:len(trained)]), samples=K, batch=K * (2 if cfg_scale > 1 else 1), guidance=cfg_scale if cfg_scale > 1
        else embed, steps=flags.sample_steps, optimizer_name=args.optimizer, autocast_cache=autocast_cache,
        vae_batch=n, gradient_checkpointing=args.gradient_checkpointing, batch_size=args.batch_size)


def sampler_peak(tl, wrapper="ddp"):
    """(bytes, phase, parts) at the sampling peak of one DDP rank: its buckets ("wrapper") hold the gradients."""
    buckets = tl["trained"] if wrapper == "ddp" else 0
    c = tl["counter"]
    value, phase, live = c.replay(*tl["window"], {"grads": 0.0} if wrapper == "ddp" else {},
                                  {p: buckets for _, p in c.marks})
    parts = dict(live, encoders=live["encoders"] - tl["scorer"], scorer=tl["scorer"], wrapper=buckets)
    if wrapper == "ddp":
        parts["grads"] = 0
    return value, phase, parts


def training_row(model, mode, tl, rows=()):
    """memplan's row of an online run's training step (DDP, encoders on GPU, dpo.py's defaults), found or counted."""
    ckpt, B = tl["gradient_checkpointing"], tl["batch_size"]
    for r in rows:
        if (r["model"], r["mode"], r["fsdp_world"], r["gradient_checkpointing"], r["batch_size"], r["encoders"],
                r["autocast_cache"]) == (model["name"], mode, 1, ckpt, B, "gpu", False):
            return r
    train = memplan.family_timelines(model, mode, [(ckpt, B)])
    return memplan.row(model, mode, 1, ckpt, B, "gpu", train, memplan.encode(model, B, memplan.modes(mode)[1]))


def row(model, mode, tl, train):
    """One online row: the sampling peak beside the training step's (scorer loaded), since the larger one decides."""
    value, phase, parts = sampler_peak(tl)
    training = train["peak_bytes"] + tl["scorer"]
    top = max(value, training)
    return dict(model=model["name"], mode=mode, resolution=model["resolution"], samples=tl["samples"],
                denoiser_batch=tl["batch"], guidance=tl["guidance"], sample_steps=tl["steps"], scorer=SCORER[0],
                optimizer=tl["optimizer_name"], gradient_checkpointing=tl["gradient_checkpointing"],
                lora_rank=memplan.modes(mode)[0], quantize=memplan.modes(mode)[1], autocast_cache=tl["autocast_cache"],
                vae_batch=tl["vae_batch"], sampling_bytes=int(value), sampling_gb=round(value / GiB, 3),
                sampling_phase=phase, sampling_breakdown_gb={k: round(v / GiB, 3) for k, v in parts.items()},
                training_bytes=int(training), training_gb=round(training / GiB, 3), training_phase=train["phase"],
                peak_bytes=int(top), peak_gb=round(top / GiB, 3), at="sampling" if value >= training else "training",
                fits={str(g): memplan.fits(top, g) for g in memplan.GPUS})


WHATIFS = ((True, None), (True, 1))  # (autocast cache, latents per VAE decode: None all K) other than online.py's


def plan(models, training_rows=(), modes=("full", "lora", "lora-nf4"), log=print):
    """The online rows (full, LoRA, LoRA on an nf4 base; DDP) reusing the training plan's rows, and the first model's
    WHATIFS as well."""
    out = []
    for i, model in enumerate(models):
        for mode in modes:
            tic = time.time()
            tl = sampler_timeline(model, mode)
            train = training_row(model, mode, tl, training_rows)
            out.append(row(model, mode, tl, train))
            for cache, n in WHATIFS if i == 0 and mode != "lora-nf4" else ():
                out.append(row(model, mode, sampler_timeline(model, mode, autocast_cache=cache, vae_batch=n), train))
            log(f"# {model['name']} {mode} online sampling on shadow tensors in {time.time() - tic:.1f} s")
    return out


def whatif(r):
    """Whether a row is one of WHATIFS rather than what online.py does, so the tables can say so."""
    return r["autocast_cache"] or r["vae_batch"] != 1


def summary(rows):
    """docs/memory.md's online table: both phases' peaks, what fills the sampling peak, the GPU that fits."""
    names = {"wrapper": "DDP buckets", "casts": "autocast copies"}
    lines = ["| model | mode | samples (denoiser batch) | sampling peak GiB | at | training step GiB (+ scorer) | "
             "online peak GiB | fits | largest parts while sampling, GiB |", "|---" * 9 + "|"]
    for r in rows:
        parts = sorted(r["sampling_breakdown_gb"].items(), key=lambda kv: -kv[1])[:4]
        how = "" if not whatif(r) else "; " + ", ".join(
            (["autocast cache on"] if r["autocast_cache"] else [])
            + ([f"decode {r['vae_batch']} at a time"] if r["vae_batch"] != 1 else []))
        mode = memplan.mode_title(r["mode"]) + how
        cells = [memplan.title(r["model"]), mode, f"{r['samples']} ({r['denoiser_batch']})",
                 f"{r['sampling_gb']:.1f}", r["sampling_phase"], f"{r['training_gb']:.1f}",
                 f"{r['peak_gb']:.1f} ({r['at']})", memplan.smallest_gpu(r),
                 ", ".join(f"{names.get(k, k)} {v:.1f}" for k, v in parts)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Online RL (rl.py): GRPO and NFT


def rl_rows(models, online_rows, training_rows=(), modes=("full", "lora", "lora-nf4"), log=print):
    """GRPO and NFT rows beside online DPO's: rl.py samples as online.py does (the trajectories and their
    log-probabilities are kept on the CPU, the SDE adds one noise tensor a step), so the sampling phase is online
    DPO's row; each micro-step then trains one denoising step of the K x batch_size samples (twice the images
    with classifier-free guidance) with the reference's forward beside it (GRPO's KL, NFT's), which the training
    plan counts as its own step at that many images (half as many pairs); NFT adds its old policy, a copy of the
    trained tensors, and one more forward without grad (transient, as the reference's)."""
    out = []
    for model in models:
        for mode in modes:
            tic = time.time()
            dpo_row = next(r for r in online_rows if (r["model"], r["mode"]) == (model["name"], mode)
                           and not whatif(r))
            tl = sampler_timeline(model, mode)
            images = tl["batch"]  # K x batch_size (1 prompt, dpo.py's default), x2 with CFG: one trained step's
            pairs = max(1, images // 2)
            train = training_row(model, mode, dict(tl, batch_size=pairs), training_rows)
            for loss in ("grpo", "nft"):
                old = tl["trained"] if loss == "nft" else 0  # NFT's old policy: the trained tensors again
                training = train["peak_bytes"] + tl["scorer"] + old
                top = max(dpo_row["sampling_bytes"] + old, training)
                out.append(dict(model=model["name"], mode=mode, loss=loss, samples=tl["samples"], images=images,
                                sampling_gb=round((dpo_row["sampling_bytes"] + old) / GiB, 3),
                                training_gb=round(training / GiB, 3), old_policy_gb=round(old / GiB, 3),
                                peak_bytes=int(top), peak_gb=round(top / GiB, 3),
                                at="sampling" if dpo_row["sampling_bytes"] + old >= training else "training",
                                fits={str(g): memplan.fits(top, g) for g in memplan.GPUS}))
            log(f"# {model['name']} {mode} online RL rows in {time.time() - tic:.1f} s")
    return out


def rl_summary(rows):
    """docs/memory.md's online RL table."""
    lines = ["| model | mode | loss | samples (images a trained step) | sampling peak GiB | training step GiB (+ scorer"
             ", + old policy) | old policy GiB | peak GiB | fits |", "|---" * 9 + "|"]
    for r in rows:
        mode = memplan.mode_title(r["mode"])
        cells = [memplan.title(r["model"]), mode, r["loss"], f"{r['samples']} ({r['images']})",
                 f"{r['sampling_gb']:.1f}", f"{r['training_gb']:.1f}", f"{r['old_policy_gb']:.1f}",
                 f"{r['peak_gb']:.1f} ({r['at']})", memplan.smallest_gpu(r)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
