"""A training run's state on disk: the checkpoint that `dpo.py --resume` continues from.

It holds the policy, the optimizer state, the step, the data position and every rank's RNG state, so a resumed
run computes what an uninterrupted one would (bit for bit at the same world size; the draws of t, eps, dropout
and crops are keyed by the global pair position, so a new world size reads the same pairs). The file is written
to a temporary name and renamed, so a crash mid-write keeps the previous checkpoint.
"""
import json
import os
import random

import numpy as np
import torch
import torch.distributed as dist

# flags that --resume must keep (max_steps, logging, paths and world size may change: draws are keyed by position)
RESUME_SAME = ("loss", "beta", "pairs_per_step", "lr", "warmup", "optimizer", "weight_decay", "grad_clip", "seed",
               "resolution", "random_crop", "no_flip", "prompt_dropout", "dreamlike_only", "rpo_tau")


def _flags(args) -> dict:
    """args as the checkpoint stores them: JSON values (dtypes and paths as strings)."""
    return json.loads(json.dumps(vars(args), default=str))


def load(path, args, policy, opt, rank, world, log):
    """(step, data position) to start from: (0, 0), or the checkpoint's, with its weights, optimizer state and RNG
    loaded. Metrics logged past that step are dropped from out_dir/metrics.jsonl (they are logged again)."""
    step, position = 0, 0
    if args.resume and os.path.exists(path):
        ck = torch.load(path, map_location="cpu", weights_only=True)
        now = _flags(args)
        changed = [f"--{k} {ck['args'].get(k)} -> {now[k]}" for k in RESUME_SAME if ck["args"].get(k) != now[k]]
        if changed:  # data position, draws and schedule would silently mean something else
            raise ValueError(f"--resume with flags that change the run: {', '.join(changed)}; use a new --out_dir")
        policy.load_state_dict(ck["policy"])
        opt.load_state_dict(ck["optimizer"])
        step, position = ck["step"], ck["position"]
        if len(ck["rng"]) == world:
            set_rng_state(ck["rng"][rank])
        log(f"resumed {path} at step {step}")
    elif args.resume:
        log(f"--resume: no checkpoint in {args.out_dir}, starting fresh")
    if rank == 0:
        mpath = os.path.join(args.out_dir, "metrics.jsonl")
        lines = open(mpath).read().splitlines() if os.path.exists(mpath) and step > 0 else []
        with open(mpath + ".tmp", "w") as f:
            f.writelines(line + "\n" for line in lines if json.loads(line)["step"] <= step)
        os.replace(mpath + ".tmp", mpath)
    return step, position


def save(path, policy, opt, step, position, args, rank):
    """Everything --resume needs, in one file written atomically; every rank takes part (RNG states)."""
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng_state())  # every rank's RNG state, restored rank by rank
    if rank == 0:
        state = dict(policy=policy.state_dict(), optimizer=opt.state_dict(), step=step, position=position, rng=rngs,
                     schedule=dict(lr=args.lr, warmup=args.warmup), args=_flags(args))
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, path)
    dist.barrier()


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
