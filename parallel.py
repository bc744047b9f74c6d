"""Data parallelism, one code path for 1 and N processes: DDP (each rank holds the whole policy) or FSDP2
(`--fsdp`: torch.distributed.fsdp.fully_shard, each rank holds 1/N of the parameters, gradients and optimizer
state, and gathers one block's parameters at a time to compute).

Sharding units are the denoiser's blocks (its family's record: a UNet's ResBlocks, SpatialTransformers and
Resamples, MMDiT's joint blocks, FLUX's double and single blocks) plus the root for the rest (the embeddings, the
output layers): the forward of each unit is called by the model's own forward, so FSDP2's hooks gather its
parameters just in time and free them after use. Parameters are gathered in the compute
dtype (MixedPrecisionPolicy(param_dtype=bf16)) from fp32 master shards, and gradients are reduce-scattered in fp32.
The frozen reference is sharded the same way, with the same policy: it costs 1/N of its memory per rank, and
computes exactly what the policy computes at step 0 (the same bf16 weights, norms included), so eq. 14 starts at
log 2. A LoRA run shards its one model; its base weights are frozen and only the adapters are reduce-scattered.

Checkpoints are gathered to rank 0 (`full`), one tensor at a time, into the layout a DDP run writes: the same
checkpoint.pt resumes under DDP or FSDP at any world size, and the final unet/ is written from it as always
(torch.distributed.checkpoint would write one shard per rank: faster for 100s of GB, but tied to a sharded
layout that a 10 GB UNet does not need).
"""
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

import kernels


def setup(device):
    """torchrun's env:// rendezvous, or a 1-process group of our own, so the loop is the same for 1 and N."""
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def shard(model, dtype, blocks):
    """FSDP2 over the model's blocks (its family's record: the module types), then the root; parameters gathered in
    dtype, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # torch >= 2.6: only --fsdp needs it
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for m in list(model.modules()):
        if isinstance(m, blocks):
            fully_shard(m, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def wrap(policy, fsdp, dtype, dev, blocks):
    """The model the loop calls: the policy under DDP, or itself once sharded (FSDP2 changes it in place)."""
    if fsdp:
        return shard(policy, dtype, blocks)
    ids = [dev.index] if dev.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel
    # a quantized base's codes and scales (kernels.QuantLinear's buffers) are each rank's own load of the same file:
    # DDP neither broadcasts them at the start (gigabytes for FLUX; fp8 has no collective) nor before each forward
    codes = [f"{n}.{b}" for n, m in policy.named_modules() if isinstance(m, kernels.QuantLinear) for b in m._buffers]
    ddp._set_params_and_buffers_to_ignore_for_model(policy, codes)
    return ddp(policy, device_ids=ids, gradient_as_bucket_view=True)


def full(t):
    """The whole tensor of a (maybe sharded) one: a collective for a DTensor, every rank must call it."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gathered(state: dict) -> dict:
    """A state dict (nested dicts of tensors), its DTensors gathered one at a time, on the CPU of rank 0 (None on
    the other ranks, which take part in the gathers)."""
    rank0 = dist.get_rank() == 0
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            v = gathered(v)
        elif isinstance(v, torch.Tensor):
            v = full(v.detach())
            v = v.cpu() if rank0 else None
        out[k] = v
    return out if rank0 else None


def scatter(saved: dict, like: dict) -> dict:
    """saved's full tensors cut like the (maybe sharded) tensors of like: each rank keeps its own shard, read
    from its own copy of the file (no communication)."""
    out = {}
    for k, v in saved.items():
        ref = like.get(k) if isinstance(like, dict) else None
        if isinstance(v, dict):
            out[k] = scatter(v, ref if isinstance(ref, dict) else {})
        elif isinstance(ref, DTensor) and isinstance(v, torch.Tensor):
            v = v.to(ref.device, ref.dtype)
            out[k] = distribute_tensor(v, ref.device_mesh, ref.placements, src_data_rank=None)
        else:
            out[k] = v
    return out


def optimizer_like(opt, saved: dict) -> dict:
    """The (maybe sharded) tensors that opt's state will hold, for scatter: a state tensor shaped like its
    parameter is sharded like it (AdamW's moments, Adafactor's vectors), a smaller one (Adafactor's row and
    column statistics) is replicated, as the optimizers create them on DTensor parameters; 0-d ones stay local."""
    params = [p for g in opt.param_groups for p in g["params"]]
    like = {}
    for i, st in saved["state"].items():
        p = params[int(i)]
        if not isinstance(p, DTensor):
            continue
        like[i] = {}
        for k, v in st.items():
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                continue
            same = tuple(v.shape) == tuple(p.shape)
            like[i][k] = p if same else _replicated(p, v)
    return {"state": like}


def _replicated(p, v):
    """A stand-in with v's shape, replicated over p's mesh (only its placement and device are read)."""
    return DTensor.from_local(torch.empty(v.shape, device=p.device, dtype=v.dtype), p.device_mesh,
                              [Replicate()] * p.device_mesh.ndim, run_check=False)


def mean_over_ranks(acc: dict, seen: int, dev):
    """The means over ranks of a step's logged numbers (acc: name -> 0-d fp64 tensor), and the items seen, summed
    over ranks: one all-reduce."""
    keys = sorted(acc)
    red = torch.cat([torch.stack([acc[k] for k in keys]), torch.tensor([float(seen)], dtype=torch.float64, device=dev)])
    dist.all_reduce(red)
    return {k: red[i].item() / dist.get_world_size() for i, k in enumerate(keys)}, int(red[-1].item())
