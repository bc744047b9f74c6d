"""A training run's state on disk: the checkpoint that `dpo.py --resume` continues from, and the run's log.

The checkpoint holds the policy, the optimizer state, the step, the data position and every rank's RNG state, so
a resumed run computes what an uninterrupted one would: bit for bit at the same world size (the draws of t, eps,
dropout and crops are keyed by the global pair position, so another world size reads the same pairs, but its
reductions round differently: the losses agree to about 1e-6, not bit for bit). It also holds fingerprints of
the data and the models, so --resume refuses to continue on other data or weights. Every file is written to a
temporary name and renamed, so a crash mid-write keeps the previous one; temporary files a crash leaves are
removed when the next run starts.
"""
import json
import os
import random
import re
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

import cli
import dashboard
import hub
import families
import kernels
import lora
import parallel
import weights

# flags that --resume must keep (max_steps, logging, paths and world size may change: draws are keyed by position)
RESUME_SAME = ("loss", "beta", "pairs_per_step", "lr", "warmup", "optimizer", "weight_decay", "grad_clip", "seed",
               "resolution", "random_crop", "no_flip", "prompt_dropout", "dreamlike_only", "rpo_tau", "split",
               "time_ids", "latents", "lora", "lora_alpha", "rpo_clip", "rpo_form", "sigma_density", "guidance",
               "columns", "online", "score", "prompts", "samples_per_prompt", "pairs", "min_margin", "ref_update",
               "sample_steps", "sample_guidance", "eval_score", "eval_prompts", "eval_n",  # (a held-out history of one)
               "ema", "sample_from", "sampler", "noise_level", "clip_range", "adv_clip", "kl", "train_steps",
               "sde_window", "old_decay", "eval_steps", "quantize")
# rl.py's: the samples' reward, the share of groups whose K rewards are equal (no signal), GRPO's clipped share of
# ratios, approximate KL to the sampler and KL to the reference, NFT's deviation from its old policy
RL_METRICS = ("reward_mean", "reward_std", "zero_std_groups", "clip_frac", "approx_kl", "kl", "old_deviation")
TEMP = re.compile(r"\.tmp\d*(\.png)?$")  # what weights.save_*, torch.save here and save_png write first


def clean(out_dir, log):
    """Remove the temporary files an interrupted run left in out_dir (rank 0, before anything is written)."""
    for root, _, files in os.walk(out_dir):
        for f in files:
            if TEMP.search(f):
                os.remove(os.path.join(root, f))
                log(f"removed {os.path.join(root, f)}, left by an interrupted run")


def prepare(args, rank, log) -> str:
    """out_dir/checkpoint.pt, the path this run resumes from and saves to. A new run (no --resume) refuses to
    overwrite one; rank 0 takes the folder for this run alone (cli.hold: a second run into it is refused) and
    removes the temporary files a killed run left."""
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise ValueError(f"--out_dir {args.out_dir} is a file, not a folder: give a folder for the run's outputs")
    path = os.path.join(args.out_dir, "checkpoint.pt")
    if os.path.exists(path) and not args.resume:
        raise ValueError(f"{path} exists: pass --resume to continue that run or choose another --out_dir")
    refused = [None]
    if rank == 0:
        try:
            cli.hold(args.out_dir, flag="--out_dir")
            clean(args.out_dir, log)
        except ValueError as e:
            refused[0] = str(e)
    dist.broadcast_object_list(refused)  # every rank stops, rank 0 says why
    if refused[0]:
        raise ValueError(refused[0])
    return path


def fingerprints(args, data) -> dict:
    """What --resume checks besides the flags: the data (data.Preferences.fingerprint) and the starting weights."""
    model = dict(weights.fingerprint(args.model), hub=hub.commit(args.model))  # hub: ORG/NAME@COMMIT, or None
    return {"data": data, "model": model,
            "unet_init": weights.fingerprint(args.unet_init) if args.unet_init else None}


def flags(args) -> dict:
    """args as the checkpoint stores them: JSON values (dtypes and paths as strings)."""
    return json.loads(json.dumps(vars(args), default=str))


def _resolved(flags: dict) -> dict:
    """Stored flags as the run used them: --lora_alpha unset is alpha = rank (so typing the default is no change)."""
    if flags.get("lora") and flags.get("lora_alpha") is None:
        flags = dict(flags, lora_alpha=float(flags["lora"]))
    return flags


def _describe(fp) -> str:
    what = next((f"{fp[k]} {k}" for k in ("pairs", "prompts") if k in fp), None) or f"{fp['bytes'] / 2 ** 30:.2f} GiB"
    return f"{fp['path']} ({fp['files']} file(s), {what}, fingerprint {fp['digest']})"


def load(path, args, fingerprints, policy, opt, rank, world, log, extra=None):
    """(step, data position) to start from: (0, 0), or the checkpoint's, with its weights, optimizer state and RNG
    loaded, and extra's tensors (name -> {tensor name -> tensor}: an EMA's) in place. Refuses (ValueError, one line) a
    checkpoint of another run: other flags, data or weights."""
    if not (args.resume and os.path.exists(path)):
        if args.resume:
            log(f"--resume: no checkpoint in {args.out_dir}, starting fresh")
        return 0, 0
    ck = weights.torch_file(path, "the checkpoint", mmap=True)  # ranks share the page cache
    now, then = _resolved(flags(args)), _resolved(ck["args"])
    same = [k for k in RESUME_SAME if not (k == "lora_alpha" and then.get("lora") != now.get("lora"))]  # said once
    changed = [f"--{k} {then[k]} -> {now[k]}" for k in same if k in then and then[k] != now[k]]
    if changed:  # data position, draws and schedule would silently mean something else
        raise ValueError(f"--resume with flags that change the run: {', '.join(changed)}; use a new --out_dir")
    for flag, old in ck.get("fingerprints", {}).items():
        new = fingerprints.get(flag)
        if (old is None) != (new is None) or (old is not None and old["digest"] != new["digest"]):
            was, now_ = (_describe(fp) if fp else "none" for fp in (old, new))
            flag = "prompts" if flag == "data" and args.online else flag  # an online run's data: its prompts
            raise ValueError(f"--resume with other --{flag}: {path} was trained on {was}, this run has {now_}; "
                             "use a new --out_dir")
    want = trainable(policy)
    if set(ck["policy"]) != set(want):  # e.g. a checkpoint of another version of this code
        raise ValueError(f"{path} holds {len(ck['policy'])} policy tensors, this run trains {len(want)} (first "
                         f"differing: {sorted(set(ck['policy']) ^ set(want))[0]}); use a new --out_dir")
    policy.load_state_dict(parallel.scatter(ck["policy"], want), strict=False)  # FSDP: each rank takes its shard
    opt.load_state_dict(parallel.scatter(ck["optimizer"], parallel.optimizer_like(opt, ck["optimizer"])))
    for name, tensors in (extra or {}).items():  # (in place: a sharded tensor takes its own shard)
        for k, v in parallel.scatter(ck["extra"][name], tensors).items():
            tensors[k].copy_(v)
    if len(ck["rng"]) == world:
        set_rng_state(ck["rng"][rank])
    log(f"resumed {path} at step {ck['step']}")
    return ck["step"], ck["position"]


def step_flops(policy, ref, inputs):
    """FLOPs per item of a training step: per image the policy's forward and backward (3 forwards) and the
    reference's forward (none for a reference-free objective), one denoiser forward on one image counted op by op
    (kernels.flops)."""
    z, t, cond = inputs["z"], inputs["t"], inputs["cond"]
    one = kernels.flops(policy, z[:1], t[:1], *(None if c is None else c[:1] for c in cond))
    per_item = z.shape[0] // t.shape[0]  # 2 images per pair (1 for single images and SFT's winners)
    return one * (3 * per_item + (0 if ref is None else per_item))


def log_step(args, step, rec, lr, grad_norm, bad_all, clock, flops, log):
    """One log line and (rank 0) one metrics.jsonl record: the step's means over ranks, throughput, memory."""
    pairs_per_s = args.pairs_per_step * (step - clock["logged"]) / (time.time() - clock["tic"])  # global
    clock.update(tic=time.time(), logged=step)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    last = dict(step=step, loss=rec["loss"], implicit_acc=rec.get("implicit_acc"),
                reward_margin=rec.get("reward_margin"), model_mse=rec.get("model_mse"), ref_mse=rec.get("ref_mse"),
                score_mean=rec.get("score_mean"), score_margin=rec.get("score_margin"),  # online: the samples' reward
                pairs_kept=rec.get("pairs_kept"), **{k: rec.get(k) for k in RL_METRICS},
                lr=lr, grad_norm=grad_norm, pairs_per_s=pairs_per_s, bad_pairs=bad_all,
                mfu=flops * pairs_per_s / dist.get_world_size() / kernels.H100_BF16_PEAK if flops else None,
                peak_mem_gb=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None)
    log(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items() if v is not None))
    if dist.get_rank() == 0:
        weights.append_jsonl([last], os.path.join(args.out_dir, "metrics.jsonl"))  # resume drops a cut last line
        dashboard.scalars(step, last)  # --report_to: the same numbers
    return last


def start_log(out_dir, step, log):
    """metrics.jsonl as it was at the checkpoint's step: later lines are logged again (rank 0)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    weights.save_jsonl([r for r in weights.load_jsonl(path, log) if r["step"] <= step] if step > 0 else [], path)


def trainable(policy) -> dict:
    """What a checkpoint holds of the policy: its trainable tensors (a full run's UNet, a LoRA run's adapters)."""
    names = {n for n, p in policy.named_parameters() if p.requires_grad}
    return {k: v for k, v in policy.state_dict().items() if k in names}


def save(path, policy, opt, step, position, args, fingerprints, rank, log, extra=None):
    """Everything --resume needs, in one file written atomically; every rank takes part (RNG states, FSDP shards
    gathered to rank 0); extra: more tensors by name (an EMA's). A final UNet of an earlier step (unet/, lora/,
    unet.safetensors, ema/) is removed: the run rewrites them at its end."""
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng_state())  # every rank's RNG state, restored rank by rank
    model_state, opt_state = parallel.gathered(trainable(policy)), parallel.gathered(opt.state_dict())
    extra = parallel.gathered(extra or {})
    if rank == 0:
        state = dict(policy=model_state, optimizer=opt_state, step=step, position=position, rng=rngs,
                     schedule=dict(lr=args.lr, warmup=args.warmup), args=flags(args), fingerprints=fingerprints,
                     extra=extra)
        weights.atomic(path, lambda tmp: torch.save(state, tmp))  # a full disk: one line, the old file kept
        finals = [f.subfolder for f in families.FAMILIES] + ["lora", "unet.safetensors", "ema"]
        for old in [os.path.join(args.out_dir, n) for n in dict.fromkeys(finals)]:
            if os.path.isdir(old):
                shutil.rmtree(old)
            elif os.path.exists(old):
                os.remove(old)
            else:
                continue
            log(f"removed {old}: it is older than {path} (step {step}); the run writes it again at its end")
    dist.barrier()


def _outputs(args, family) -> list:
    """The final denoiser's paths: unet/ (transformer/ for SD3 / FLUX: the family's subfolder), and unet.safetensors
    with --save_single."""
    single = [os.path.join(args.out_dir, "unet.safetensors")] if args.save_single else []
    return [os.path.join(args.out_dir, family.subfolder)] + single


def save_outputs(policy, family, args, step, log):
    """The run's final denoiser: unet/ (diffusers layout) and with --save_single unet.safetensors (original layout),
    each recording its step in the safetensors metadata; a LoRA run also writes lora/ (diffusers' LoRA file) and
    merges its adapters into an fp32 copy of the base for unet/. Every rank calls it (FSDP shards are gathered);
    rank 0 writes. A unet.safetensors that this run was not asked for is removed. SD3 / FLUX: transformer/."""
    rank0, meta = dist.get_rank() == 0, {"step": str(step)}
    if args.lora:
        adapters = parallel.gathered(lora.state_dict(policy))  # (file layout) every rank takes part in gathers
        u = family.load(args.unet_init or args.model, "cpu", torch.float32) if rank0 else None
        if rank0:
            lora.merge(u, lora.pairs(adapters, "adapters", prefix=family.subfolder + "."))
            lora.save(adapters, os.path.join(args.out_dir, "lora"), meta)
            log(f"saved {os.path.join(args.out_dir, 'lora')} (step {step})")
    else:
        state = parallel.gathered(policy.state_dict())
        u = None
        if rank0:
            with torch.device("meta"):
                u = family.model(policy.config)
            u.load_state_dict(state, assign=True)
            u.prediction_type = policy.prediction_type
    if rank0:
        for path in _outputs(args, family):
            family.save(u, path, "single" if path.endswith(".safetensors") else "diffusers", meta)
            log(f"saved {path} (step {step})")
        single = os.path.join(args.out_dir, "unet.safetensors")
        if not args.save_single and os.path.exists(single):
            os.remove(single)
            log(f"removed {single} of an earlier run (no --save_single this time)")
    dist.barrier()


def outputs_done(args, family, step) -> bool:
    """Whether save_outputs wrote this step's final denoiser to the end (rank 0 looks, every rank is told)."""
    done = [True]
    if dist.get_rank() == 0:
        files = [p if p.endswith(".safetensors") else os.path.join(p, "diffusion_pytorch_model.safetensors")
                 for p in _outputs(args, family)]
        files += [os.path.join(args.out_dir, "lora", lora.FILE)] if args.lora else []
        for f in files:
            config = os.path.join(os.path.dirname(f), "config.json")
            if not os.path.isfile(f) or (f.endswith("model.safetensors") and not os.path.isfile(config)):
                done[0] = False
            elif weights.Checkpoint(f).metadata.get("step") != str(step):
                done[0] = False
    dist.broadcast_object_list(done)
    return done[0]


def finished(path, policy, family, args, step, log) -> bool:
    """Whether the checkpoint is at --max_steps already: then nothing is done, but a final denoiser that a crash cut
    short is written again."""
    if step < args.max_steps:
        return False
    log(f"nothing to do: {path} is at step {step}, --max_steps is {args.max_steps}")
    if not outputs_done(args, family, step):
        save_outputs(policy, family, args, step, log)
    return True


def rng_state() -> dict:
    np_state = np.random.get_state()
    return dict(torch=torch.get_rng_state(), numpy=[np_state[1].tolist()] + list(np_state[2:]),
                python=random.getstate(), cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", np.array(s["numpy"][0], dtype=np.uint32), *s["numpy"][1:]))
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
