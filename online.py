"""Online preference optimization: the policy makes its own pairs, a reward model judges them.

    python dpo.py --online --model SDXL_DIR --prompts parti --score pickscore=PickScore_v1 --samples_per_prompt 4 \
        --eval_score hps=HPS_v2.1_compressed.pt,tokenizer=CLIP-ViT-H-14 --lr 1e-6 --out_dir runs/online

Each micro-step, each rank takes the prompts at the global positions the offline loader would read (a shuffle of
--prompts per epoch, keyed by the seed), samples K = --samples_per_prompt images of each with the current policy
(no grad, autocast in the compute dtype, Euler with --sample_steps and the family's guidance: diffusion.py's loop,
the one sample.py runs; each image's noise keyed by (seed, position)), scores them with --score (reward.py; several
scorers add up with their weight= option), and makes pairs:
  best_worst (the default): each prompt's best image against its worst, one pair per prompt. The largest margin the
      group holds is the clearest signal a scorer gives (flow_grpo's online DPO takes it), and one pair per prompt
      keeps every rank's micro-batch the same size, so 2 ranks train as 1 rank does.
  margin: every pair of a prompt's images whose scores differ by more than --min_margin (up to K(K-1)/2; a prompt
      with none gives its best-worst pair), more pairs per sample; ranks' micro-batches then differ in size.
The pairs then take the offline path: 8-bit images, cropped and flipped as cache.PreferenceDataset does from (seed,
position), encoded by the VAE, one (t, eps) per pair: the objective's loss on them is the offline loss on the
pairs.jsonl they are written to. The reference is the frozen base, or with --ref_update N the policy copied after
every N steps. Every --eval_every steps, the base's and the policy's images of --eval_prompts from the same noise
are scored by --score and --eval_score: their win rates against the step in the log, online_eval.json and
online_eval.png; the run's last line says when the training reward rose while a held-out win rate fell.
"""
import argparse
import contextlib
import hashlib
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

import cache
import dashboard
import data
import diffusion
import lora
import reward
from images import grid, save_png, to_pil, transform
from weights import append_jsonl, load_jsonl, read_json, save_json, save_jsonl

SAVE_PAIRS_UP_TO = 20000  # a run that makes at most this many pairs writes them (out_dir/pairs.jsonl) by default
DEFAULT_EVALS = 4  # held-out checks in a run without --eval_every (and one at step 0)
NO_SIGNAL_STEPS = 5  # steps in a row whose every group scored its K images alike before the log says so


def add_flags(p):
    """dpo.py's online flags (not in dpo.DEFAULTS: repeatable ones, and their own defaults)."""
    a = p.add_argument
    a("--online", action="store_true", help="sample the pairs with the policy and score them (no --data)")
    a("--score", action="append", default=[], metavar="KIND[=PATH][,weight=W]", help="online: the reward (reward.py's "
      "scorers, repeatable: the weighted sum)")
    a("--prompts", help="online: prompts file (one per line, or TSV with a Prompt column) or parti")
    a("--samples_per_prompt", type=int, default=4, help="online: K images per prompt")
    a("--pairs", choices=["best_worst", "margin"], default="best_worst", help="online: best vs worst of each prompt, "
      "or every pair whose score margin exceeds --min_margin")
    a("--min_margin", type=float, default=0.0, help="online: the margin a pair needs (--pairs margin; counted "
      "as kept for best_worst)")
    a("--ref_update", type=int, help="online: copy the policy into the reference every N steps [frozen base]")
    a("--sample_steps", type=int, default=20, help="online: Euler steps per sample")
    a("--sample_from", choices=["policy", "ref"], default="policy", help="online: the model that samples: the policy "
      "(on-policy), or the reference (flow_grpo's online DPO; with --ref_update, the policy of the last refresh)")
    a("--sample_batch", type=int, default=8, help="online: images per sampling and scoring call (a prompt's K "
      "images are made in calls of this many)")
    a("--sample_guidance", type=float, help="online: guidance of the samples [the family pipeline's]")
    a("--eval_every", type=int, help=f"online: held-out check every N steps [max_steps / {DEFAULT_EVALS}]")
    a("--eval_prompts", help="online: held-out prompts (file or parti) [--prompts, other noise]")
    a("--eval_score", action="append", default=[], metavar="KIND[=PATH]", help="online: held-out scorers besides "
      "--score (repeatable)")
    a("--eval_n", type=int, default=32, help="online: held-out images per check")
    a("--save_pairs", action=argparse.BooleanOptionalAction, help=f"online: write the pairs [on up to "
      f"{SAVE_PAIRS_UP_TO} pairs]")


# add_flags' flags besides --online itself
FLAGS = ("score", "prompts", "samples_per_prompt", "pairs", "min_margin", "ref_update", "sample_steps", "sample_from",
         "sample_batch", "sample_guidance", "eval_every", "eval_prompts", "eval_score", "eval_n", "save_pairs")


def check(p, args):
    """Refusals at parse time, one line each (p.error); fills the online defaults that depend on other flags."""
    if not args.online:  # an online flag set offline would be ignored without a word
        named = [f for f in FLAGS if f in args.given]
        if named:
            p.error(f"--{named[0]} is an online flag: add --online (or drop it)")
        if args.offload_encoders and (args.cache or not args.data):  # (where the offline refusal can be said first)
            p.error("--offload_encoders moves the encoders of a run that encodes each batch; with --cache (or no "
                    "--data) the run loads none: drop --offload_encoders")
        return
    if args.data:
        p.error("--online makes its own pairs: drop --data (or --online to train on it)")
    if args.offload_encoders:
        p.error("--offload_encoders is for offline runs: an online run samples with its encoders every step, which "
                "keep them on the GPU (with --quantize they are quantized as the base)")
    if not args.prompts:
        p.error("--online needs --prompts FILE (one prompt per line) or --prompts parti")
    if not args.score:
        p.error("--online needs a reward: --score KIND[=PATH] (reward.py's scorers, e.g. pickscore=DIR, or area)")
    if args.samples_per_prompt < 2:
        p.error(f"--samples_per_prompt must be >= 2 (a pair needs two images), got {args.samples_per_prompt}")
    for k in ("sample_steps", "sample_batch", "eval_n", "ref_update", "eval_every"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k} must be >= 1, got {getattr(args, k)}")
    if args.cache:
        p.error("--cache stores a fixed data set's latents; --online makes new images every step: drop --cache")
    if args.sample_from == "ref" and args.loss in ("sft", "mapo"):
        p.error(f"--sample_from ref samples the reference; --loss {args.loss} has none: drop --sample_from")
    if args.loss == "kto":
        p.error("--loss kto trains single labelled images; --online makes pairs: use dpo, ipo, hinge, rpo, mapo or sft")
    for k in ("ckpt_every", "max_steps"):  # (the last checkpoint is at --max_steps: where a longer run resumes)
        if args.ref_update and getattr(args, k) % args.ref_update:
            p.error(f"--{k} {getattr(args, k)} must be a multiple of --ref_update {args.ref_update}: a resumed run "
                    "takes its reference from the policy at the checkpoint")
    args.grad_accum = args.grad_accum or 1  # (offline: 2048 pairs per step; each online pair costs K samples)
    try:
        for path in filter(None, (args.prompts, args.eval_prompts)):  # a missing or empty file: one line now
            data.read_prompts(path)
        args.score_specs, args.eval_specs = specs(args.score), specs(args.eval_score)
    except ValueError as e:
        p.error(str(e))
    kinds = [s[0] for s in args.score_specs + args.eval_specs]
    if len(set(kinds)) < len(kinds):  # scores, columns and win rates are keyed by kind
        p.error(f"--score / --eval_score: each kind once (scores are keyed by kind), got {', '.join(kinds)}")
    if not any(w for *_, w in args.score_specs):
        p.error("--score: every weight is 0, so every image would score 0 and every pair tie: give a weight")


def specs(flags) -> list:
    """--score values -> (kind, path, options without weight, weight) each (ValueError: one line)."""
    return [weighted(reward.parse_spec(s)) for s in flags]


def weighted(spec):
    """(kind, path, options) -> (kind, path, options without weight, weight): a finite number."""
    kind, path, options = spec
    w = options.pop("weight", "1")
    try:
        weight = float(w)
    except ValueError:
        raise ValueError(f"--score {kind}: weight={w} is not a number") from None
    if not math.isfinite(weight):
        raise ValueError(f"--score {kind}: weight={w} is not a finite number")
    return kind, path, options, weight


class Prompts(torch.utils.data.Dataset):
    """The prompt stream: position -> prompt index, a fresh shuffle of the prompts each epoch, keyed by the seed."""

    per_item = 2

    def __init__(self, prompts, seed):
        self.prompts, self.seed, self.perm = prompts, seed, {}

    def __len__(self):
        return len(self.prompts)

    def index(self, pos):
        epoch = pos // len(self.prompts)
        if epoch not in self.perm:
            g = torch.Generator().manual_seed(data.seed_for(self.seed, epoch, 0x0A11))
            self.perm = {epoch: torch.randperm(len(self.prompts), generator=g).tolist()}
        return self.perm[epoch][pos % len(self.prompts)]


def make_pairs(scores, rule="best_worst", min_margin=0.0):
    """(winner, loser) indices into one prompt's K scores, as --pairs documents; ties keep the first index."""
    s = scores.tolist()
    best = max(range(len(s)), key=lambda i: (s[i], -i))
    worst = min((i for i in range(len(s)) if i != best), key=lambda i: (s[i], i))
    if rule == "best_worst":
        return [(best, worst)]
    out = [(i, j) if s[i] >= s[j] else (j, i) for i in range(len(s)) for j in range(i + 1, len(s))
           if abs(s[i] - s[j]) > min_margin]
    return out or [(best, worst)]


class Feed(cache.Feed):
    """cache.Feed whose batches the policy samples and the scorers label, at the offline loader's positions."""

    def __init__(self, args, family, policy, ref, channels, dev, rank, world, log):
        self.scorers = load_scorers(args.score_specs, dev, args.amp_dtype)  # first: a bad path fails in seconds
        self.eval_scorers = load_scorers(args.eval_specs, dev, args.amp_dtype)
        prompts = [p for p, _ in data.read_prompts(args.prompts)]
        self.eval_prompts = [p for p, _ in data.read_prompts(args.eval_prompts or args.prompts)]
        te, v = cache.encoders(args.model, dev, args.amp_dtype, args.tokenizer, quantize=args.quantize)
        source = (Prompts(prompts, args.seed), (te, v), None, v.downsample)  # (dataset, encoders, empty, downsampling)
        super().__init__(args, family, None, channels, dev, rank, world, log, source=source)
        self.policy, self.ref, self.rank, self.world, self.log = policy, ref, rank, world, log
        self.K, self.items = args.samples_per_prompt, "prompts"
        self.sampler = ref if args.sample_from == "ref" else policy  # (flow_grpo's online DPO samples its reference)
        self.sched_cfg = diffusion.scheduler_config(args.model, family, policy.prediction_type)
        self.force_zeros = diffusion.zeros_for_empty(args.model, family)  # as sample.py's pipeline guides
        default = family.sampling_defaults(policy.config)[0]
        self.guidance = default if args.sample_guidance is None else args.sample_guidance
        text = "\n".join(prompts) + "\0" + "\n".join(args.score)
        self.fingerprint = dict(path=args.prompts, files=1, prompts=len(prompts),
                                digest=hashlib.sha256(text.encode()).hexdigest()[:16])
        self.eval_every = args.eval_every or max(1, args.max_steps // DEFAULT_EVALS)
        self.save = args.save_pairs if args.save_pairs is not None else \
            args.max_steps * args.pairs_per_step <= SAVE_PAIRS_UP_TO
        self.rows, self.history, self.rewards, self.seconds = [], [], [], dict(sampling=0.0, start=time.time())
        # this step's non-finite training scores per scorer, then its groups without signal and all its groups
        self.counts, self.flat_steps = torch.zeros(len(self.scorers) + 2, dtype=torch.float64), 0
        log(f"online: {len(prompts)} prompts x {self.K} samples ({args.sample_steps} Euler steps, guidance "
            f"{self.guidance}), reward {' + '.join(args.score)}, pairs {args.pairs}; reference "
            f"{'the policy every %d steps' % args.ref_update if args.ref_update else 'the frozen base'}")

    # -- sampling and scoring

    @torch.no_grad()
    def generate(self, unet, prompts, noise, steps=None):
        """Images (B, 3, H, W) in [0, 1] of unet for prompts from noise (B, C, h, w), as sample.py's pipeline, in
        `steps` Euler steps (--sample_steps)."""
        a, (te, v) = self.args, self.encoders
        cfg_scale, embed = diffusion.guidance_inputs(self.family, self.policy.config, self.guidance)
        res = (a.resolution, a.resolution)
        # no weight cache: it would hold a bf16 copy of every fp32 weight all loop long (as in training, dpo.py)
        amp = torch.autocast(self.dev.type, dtype=a.amp_dtype, enabled=a.amp_dtype != torch.float32,
                             cache_enabled=False)
        tic = time.time()
        with amp:
            cond = diffusion.conditions(te, prompts, None, cfg_scale > 1, self.force_zeros, res, embed)
            sched = diffusion.sampler(self.family, self.sched_cfg, "euler", steps or a.sample_steps, noise.shape[1:])
            x = diffusion.denoise(unet, sched, noise * sched.init_sigma, cond, cfg_scale, torch.float32,
                                  renorm=self.family.sampling.renorm)
        img = torch.cat([diffusion.decode(v, z[None]) for z in x])  # one at a time: the fp32 decode's peak is 1 image
        self.seconds["sampling"] += time.time() - tic
        return img

    @torch.no_grad()
    def score(self, scorers, images, prompts):
        """(kind -> (B,) scores, their weighted sum) for images (B, 3, H, W) in [0, 1]."""
        out, total, n = {}, torch.zeros(len(images)), self.args.sample_batch
        for (kind, weight), fn in scorers.items():
            out[kind] = torch.cat([fn(images[i:i + n].to(self.dev), prompts[i:i + n]).float().cpu()
                                   for i in range(0, len(images), n)])
            total += weight * torch.nan_to_num(out[kind])  # a non-finite one: counted, stops the run
        return out, total

    def noise(self, key, n, stream):
        g = torch.Generator().manual_seed(data.seed_for(self.args.seed, key, stream))
        return torch.randn((n, *self.latent_shape), generator=g)  # (n, C, h, w)

    def batch(self, positions, step):
        """The micro-batch of these global positions: K samples per prompt, scored, paired, as data.collate makes."""
        a, items, ties, rewards, margins, kept = self.args, [], [], [], [], []
        for p in positions:
            i = self.dataset.index(p)
            prompt = self.dataset.prompts[i]
            noise = self.noise(p, self.K, 0x5A3).split(a.sample_batch)  # K noises, made in calls of sample_batch
            pil, x = eight_bit(torch.cat([self.generate(self.sampler, [prompt] * len(n), n) for n in noise]))
            each, s = self.score(self.scorers, x, [prompt] * self.K)  # (K,) on the 8-bit images, as saved
            self.counts += torch.tensor([float((~torch.isfinite(v)).sum()) for v in each.values()] +
                                        [float(s.max() == s.min()), 1.0], dtype=torch.float64)
            pairs = make_pairs(s, a.pairs, a.min_margin)
            rewards.append(float(s.mean()))
            margins.append(float(s.max() - s.min()))
            kept.append(sum(float(s[w] - s[l] > a.min_margin) for w, l in pairs) / len(pairs))
            for j, (w, l) in enumerate(pairs):
                key = p if a.pairs == "best_worst" else p * self.K ** 2 + j  # the pair's (t, eps) and crop key
                rng = np.random.default_rng(data.seed_for(a.seed, key, 0, 0xC409))
                out = [transform(pil[k], a.resolution, rng, a.random_crop, not a.no_flip) for k in (w, l)]
                item = dict(pos=key, index=i, caption=prompt, pixels=torch.stack([o for o, _ in out]),
                            time_ids=torch.stack([ids for _, ids in out]), bad=[])
                (items if s[w] > s[l] else ties).append(item)  # a tie: label 0.5, trained by neither path
                if self.save:
                    self.rows.append(self.write_pair(key, step, prompt, pil[w], pil[l], float(s[w]), float(s[l])))
        self.rewards.extend(rewards)
        b = data.collate(items or ties[:1])  # every pair a tie: one of them, its loss counted 0
        b["weight"] = len(items) / (len(items) + len(ties))  # the loop weighs the loss and its numbers by it
        b["stats"] = {k: torch.tensor(sum(v) / len(v), dtype=torch.float64, device=self.dev)  # the loop logs them
                      for k, v in (("score_mean", rewards), ("score_margin", margins), ("pairs_kept", kept))}
        return b

    def write_pair(self, key, step, prompt, win, lose, s_w, s_l):
        """Both images as out_dir/pairs/KEY_{0,1}.png; the JSONL row dpo.py --data reads (label 0.5: a tie)."""
        names = [f"pairs/{key:09d}_{k}.png" for k in (0, 1)]
        os.makedirs(os.path.join(self.args.out_dir, "pairs"), exist_ok=True)
        for name, im in zip(names, (win, lose)):
            save_png(im, os.path.join(self.args.out_dir, name))
        return dict(caption=prompt, image_0=names[0], image_1=names[1], label_0=1.0 if s_w > s_l else 0.5,
                    score_0=s_w, score_1=s_l, step=step)

    # -- the loop's hooks

    def loader(self, position, step, world, rank, device):
        """Batches from optimizer step `step` on, at the offline loader's positions, sampled when asked for (with the
        weights of that moment)."""
        self.begin(step)
        for s, micro in self.positions(position, step, world, rank):
            yield self.batch(micro, s)

    def begin(self, step):
        """A fresh run's or a resumed one's state: the reference, pairs.jsonl cut to the steps done, the base's
        held-out images and scores (at step 0 the policy is the base; later the frozen reference, a LoRA policy with
        its adapters off, or the base loaded again when --ref_update has moved the reference or there is none)."""
        a = self.args
        if step and a.ref_update:
            if step % a.ref_update:
                raise ValueError(f"cannot resume at step {step} with --ref_update {a.ref_update}: the reference of "
                                 "that moment is not saved (checkpoints at multiples of it are)")
            self.refresh()
        jsonl = os.path.join(a.out_dir, "pairs.jsonl")
        if self.rank == 0 and os.path.isfile(jsonl):
            save_jsonl([r for r in load_jsonl(jsonl, self.log) if r["step"] < step], jsonl)
        path = os.path.join(a.out_dir, "online_eval.json")
        self.history = [h for h in read_json(path, []) if h["step"] <= step] if step else []
        if step == 0 or (self.ref is not None and not a.ref_update):
            base = self.policy if step == 0 else self.ref
        elif a.lora:
            base = lora.reference(self.policy)  # a LoRA run's base: the policy with its adapters off
        else:  # the base loaded again: the reference moved (--ref_update), or a reference-free objective has none
            base = self.family.load(a.unet_init or a.model, self.dev, a.amp_dtype, norm_dtype=torch.float32)
        self.base_scores = self.held_out_scores(self.held_out(base))
        if step == 0:
            self.record(0, self.base_scores)  # the policy is the base: every image ties

    def held_out(self, unet):
        """(eval_n, 3, H, W): the held-out prompts cycled, each image's noise from its index (the same for both)."""
        n, P, chunk = self.args.eval_n, self.eval_prompts, min(self.K, self.args.sample_batch)
        out = []
        for s in range(0, n, chunk):
            idx = list(range(s, min(n, s + chunk)))
            noise = torch.cat([self.noise(e, 1, 0xE7A1) for e in idx])
            out.append(self.generate(unet, [P[e % len(P)] for e in idx], noise, self.args.eval_steps))
        return torch.cat(out)

    def held_out_scores(self, images):
        """Every scorer's scores of the held-out images (the same on every rank: a non-finite one stops them all)."""
        prompts = [self.eval_prompts[e % len(self.eval_prompts)] for e in range(len(images))]
        scores, total = self.score(self.scorers, images, prompts)
        held = self.score(self.eval_scorers, images, prompts)[0]
        for kind, v in {**scores, **held}.items():
            reward.finite(kind, v, "on the held-out images")
        return {**scores, **({"reward": total} if len(scores) > 1 else {}), **held}

    def record(self, step, mine=None):
        """One held-out check: the policy's images against the base's, a win rate per scorer (ties 0.5)."""
        if mine is None:
            with self.ema.swapped(self.policy) if self.ema else contextlib.nullcontext():  # --ema: the average
                images = self.held_out(self.policy)
            mine = self.held_out_scores(images)
            if self.rank == 0:  # --report_to: the policy's first held-out images, one row
                dashboard.image(step, "held_out/samples", grid([list(images[:8].float().cpu())]))
        r = torch.tensor([sum(self.rewards), float(len(self.rewards))], dtype=torch.float64, device=self.dev)
        dist.all_reduce(r)  # the training reward since the last check, every rank's samples
        self.rewards = []
        h = dict(step=step, train_reward=float(r[0] / r[1]) if r[1] else None,
                 win={k: reward.win_rate(self.base_scores[k], v)["win_rate"] for k, v in mine.items()})
        self.history.append(h)
        wins = ", ".join(f"{k} {v:.3f}" for k, v in h["win"].items())
        self.log(f"online eval step {step}: held-out win rate vs base: {wins}; training reward "
                 f"{'-' if h['train_reward'] is None else '%.4g' % h['train_reward']}")
        if self.rank == 0:
            save_json(self.history, os.path.join(self.args.out_dir, "online_eval.json"))
            dashboard.scalars(step, {"held_out/train_reward": h["train_reward"],
                                     **{f"held_out/win_rate/{k}": v for k, v in h["win"].items()}})

    @torch.no_grad()
    def refresh(self):
        """--ref_update: the reference becomes the policy (each tensor cast to the reference's dtype; under FSDP
        shard by shard, both models resharded first: a root keeps its gathered parameters after a forward). A LoRA
        run's reference is the same model: it takes a copy of the adapters (lora.Reference)."""
        if isinstance(self.ref, lora.Reference):
            self.ref.adapters = [p.detach().clone() for p in self.policy.parameters() if p.requires_grad]
            return
        for m in (*self.policy.modules(), *self.ref.modules()):
            if hasattr(m, "reshard"):
                m.reshard()
        src = dict(self.policy.named_parameters())
        for n, p in self.ref.named_parameters():
            s = src[n].detach()
            (p.to_local() if hasattr(p, "to_local") else p).copy_(s.to_local() if hasattr(s, "to_local") else s)

    def after_step(self, step):
        """After optimizer step `step` (1-based): its scores checked (every rank's), the pairs written, the reference
        refreshed, the held-out check."""
        a, counts = self.args, self.counts.to(self.dev)
        dist.all_reduce(counts)
        self.counts = torch.zeros_like(self.counts)
        for (kind, _), n in zip(self.scorers, counts.tolist()):  # every rank's samples: every rank stops, or none
            if n:
                raise ValueError(f"--score {kind} gave {int(n)} non-finite score(s) in step {step}: stopped (the last "
                                 "checkpoint is kept); check the scorer and its weights")
        flat, groups = counts[-2:].tolist()
        self.flat_steps = self.flat_steps + 1 if flat == groups else 0
        if self.flat_steps == NO_SIGNAL_STEPS:
            self.log(f"online: WARNING: for {NO_SIGNAL_STEPS} steps every prompt's {self.K} samples scored alike "
                     f"(every pair a tie): the reward ({' + '.join(a.score)}) tells them apart no more")
        if self.save:
            parts = [None] * self.world
            dist.all_gather_object(parts, self.rows)
            self.rows = []
            if self.rank == 0:
                append_jsonl(sorted(sum(parts, []), key=lambda r: r["image_0"]), os.path.join(a.out_dir, "pairs.jsonl"))
        if a.ref_update and step % a.ref_update == 0:
            self.refresh()
            self.log(f"online: reference = the policy at step {step}")
        if step % self.eval_every == 0 or step == a.max_steps:
            self.record(step)

    def finish(self, step):
        """The share of time spent sampling, the plot, and the run's last line: the held-out trend (read from
        online_eval.json when this process ran no step: a finished run resumed)."""
        if self.seconds["sampling"]:
            share = self.seconds["sampling"] / max(1e-9, time.time() - self.seconds["start"])
            self.log(f"online: sampling took {share:.0%} of this rank's time since the start")
        path = os.path.join(self.args.out_dir, "online_eval.json")
        history = self.history or [h for h in read_json(path, []) if h["step"] <= step]
        if self.rank == 0 and history:
            save_png(chart(history), os.path.join(self.args.out_dir, "online_eval.png"))
            self.log(verdict(history))


def eight_bit(images):
    """Images (B, 3, H, W) in [0, 1] -> (their 8-bit PIL images, as saved, and those as (B, 3, H, W) in [0, 1]): what
    the scorers rank and the training reads, the same as a run's pairs.jsonl gives offline."""
    pil = [to_pil(x) for x in images]
    return pil, torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in pil]) / 255.0


def load_scorers(specs, dev, dtype) -> dict:
    """(kind, weight) -> Scorer, loaded before anything is sampled."""
    loaded = reward.load_all([s[:3] for s in specs], dev, dtype)
    return {(kind, w): loaded[kind] for kind, _, _, w in specs}


def verdict(history) -> str:
    """One line: the training reward and each held-out win rate from the first check to the last; a warning when
    the reward rose while a held-out win rate fell below its best by more than 0.05 (reward hacking?)."""
    first, last = history[0], history[-1]
    rewards = [h["train_reward"] for h in history if h["train_reward"] is not None]
    rose = len(rewards) >= 2 and rewards[-1] > rewards[0]
    fell = [k for k in last["win"] if last["win"][k] < max(h["win"][k] for h in history) - 0.05]
    wins = ", ".join(f"{k} {first['win'][k]:.3f} -> {last['win'][k]:.3f}" for k in last["win"])
    trend = f"training reward {rewards[0]:.4g} -> {rewards[-1]:.4g}; " if rewards else ""
    line = f"online: {trend}held-out win rate vs base (step {first['step']} -> {last['step']}): {wins}"
    if rose and fell:
        return line + f"; WARNING: the training reward rose while the held-out win rate by {', '.join(fell)} fell " \
            "from its best: reward hacking? compare the samples of earlier checkpoints"
    return line


def chart(history) -> Image.Image:
    """Held-out win rates (one line per scorer) and the training reward (grey, scaled to its range) per step."""
    W, H, left, top = 480, 260, 40, 30
    img = Image.new("RGB", (W + left + 20, H + top + 30), "white")
    d = ImageDraw.Draw(img)
    steps = [h["step"] for h in history]
    span = max(1, max(steps) - min(steps))

    def xy(step, v):
        return left + (step - min(steps)) / span * W, top + (1 - v) * H
    d.text((4, 4), "held-out win rate vs base (0.5: no change); grey: training reward (scaled)", fill="black")
    d.line([xy(min(steps), 0.5), xy(max(steps), 0.5)], fill=(200, 200, 200))
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for k, kind in enumerate(history[-1]["win"]):
        pts = [xy(h["step"], h["win"][kind]) for h in history]
        if len(pts) > 1:
            d.line(pts, fill=colours[k % len(colours)], width=2)
        d.text((W + left - 120, top + 4 + 12 * k), kind, fill=colours[k % len(colours)])
    r = [(h["step"], h["train_reward"]) for h in history if h["train_reward"] is not None]
    if len(r) > 1:
        lo, hi = min(v for _, v in r), max(v for _, v in r)
        d.line([xy(s, (v - lo) / (hi - lo or 1)) for s, v in r], fill=(150, 150, 150), width=1)
    d.text((left, top + H + 8), f"step {min(steps)}", fill="black")
    d.text((left + W - 60, top + H + 8), f"step {max(steps)}", fill="black")
    return img
