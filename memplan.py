"""The peak GPU memory of one Diffusion-DPO training step, predicted on a machine without a GPU.

    python bench_step.py --plan [--plan_out plan.json]     # the README's table, SDXL and SD1.5, about a minute
    import memplan; rows = memplan.plan([memplan.MODELS["sdxl"]], batches=(1,))

How. The real step runs on shadow tensors: dpo.pair_loss (the policy on both images of each pair, the frozen
reference, eq. 14) on unet.UNet built from the real SDXL / SD1.5 configs as dpo.train builds it (dpo.reference,
lora.add), backward, gradient clipping and optim.build's optimizer, and for the encoders on the GPU
data.model_inputs with the VAE and the text encoders. A TorchDispatchMode (Counter) makes every tensor a Shadow: a
CPU tensor to autograd and autocast, held as a meta tensor, so every op runs on torch's meta kernels (shapes, dtypes,
strides; no data, no compute). The Counter counts the bytes of each storage while it lives, once (views share it),
rounded up to 512 bytes as the CUDA caching allocator rounds what torch.cuda.max_memory_allocated counts. A step of
the real SDXL takes a few seconds. The optimizer's state is made first, by a step on zero gradients, so the step that
is counted is a steady one. Checked (tests/test_memplan.py): the same step on real CPU tensors counts the same
bytes, event for event; torch's own MemTracker agrees with the Counter on real tensors; torch's FakeTensorMode gives
the same peak on every row of the plan (4x slower).

Where a CPU build of torch differs from CUDA, and how the plan makes it the same:
  - autocast: torch.autocast("cuda") turns itself off without CUDA, and CUDA tensors (fake or not) cannot pass
    through autograd in a CPU build. Shadows are CPU tensors under CPU autocast, which casts the same matmuls and
    convolutions to bf16 and keeps the same cache of bf16 copies of the fp32 weights, but leaves two ops in bf16 that
    CUDA autocast runs in fp32: layer_norm and nearest upsampling. Both are wrapped to run in fp32 (CUDA_FP32).
  - attention: kernels.attention is the Triton FlashAttention kernel on CUDA; FlashPlan allocates what it allocates:
    forward O and the fp32 log-sum-exp (B, H, Lq), saved with q, k, v; backward a contiguous dO, the fp32 delta
    (B, H, Lq), dQ, dK, dV. No L x L matrix. The VAE's SDPA (head dim 512: PyTorch's memory-efficient kernel on
    CUDA, under no_grad) is modelled the same way.
  - the loss: kernels.dpo_loss's fused Function (FusedLossPlan: per-chunk partial sums, one gradient).
  - AdamW: fused=True, as dpo.py asks for on CUDA (no foreach temporaries).
Not modelled: the CUDA context and the cuBLAS / cuDNN workspaces (cuDNN's go through torch's allocator: some 100 MB
at the largest convolutions), and fragmentation (reserved > allocated). fits() leaves room for them: a GPU of
G GiB fits a step whose allocated peak is P when 1.05 P + 0.75 GiB <= G.

One process, N ranks. The timeline is one process with no wrapper, which is what bench_step.py runs ("none"). The
training plan's rows compose it with what dpo.py's wrapper (parallel.wrap) holds on each rank at every moment t:
  ddp   timeline(t) - gradients(t) + buckets + (backward) the largest trained parameter: DDP keeps one fp32 copy of
        the trained parameters' gradients in its buckets from the moment it wraps the model (gradient_as_bucket_view
        makes each .grad a view of them), and each fresh gradient lives until it is copied in.
  fsdp  (parallel.shard: units = every ResBlock, SpatialTransformer and Resample, plus the root; parameters gathered
        in bf16 from fp32 shards, gradients reduce-scattered in fp32; the reference sharded the same way)
        (weights + reference + optimizer + gradients(t)) / N + activations(t) + gathered units(phase), without the
        timeline's autocast weight copies (the gathered parameters are bf16 already). Gathered units: the root
        throughout (FSDP2 keeps the root's parameters between forward and backward); forward and reference forward:
        two consecutive units (the one computing, the one prefetched); backward: two consecutive units, the bf16
        gradients of the first, and the fp32 reduce-scatter inputs of it and of the unit before it (one
        reduce-scatter in flight).
Encoders on the GPU (not --cache): their weights are added to every moment, and the encode phase of data.model_inputs
(counted the same way, once per model and batch size) is added where the step starts.
"""
import argparse
import contextlib
import time
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import clip
import data
import diffusion
import dpo
import kernels
import lora
import optim
import unet as unetlib
import vae as vaelib
from kernels.fused_dpo_loss import BLOCK, _epilogue

GiB = 2 ** 30
ROUND = 512  # the CUDA caching allocator's block size: every allocation it counts is a multiple of it
KINDS = ("weights", "grads", "optimizer", "reference", "encoders", "casts", "activations")
GPUS = (12, 16, 24, 32, 40, 48, 80)  # GiB of the GPUs each row is checked against
MODELS = {  # the real models: UNet config, native resolution, text encoder configs, VAE config
    "sdxl": dict(name="sdxl", unet=unetlib.SDXL, resolution=1024, text=[clip.CLIP_L, clip.BIG_G],
                 vae=vaelib.FULL_CONFIG),
    "sd15": dict(name="sd15", unet=unetlib.SD15, resolution=512, text=[clip.CLIP_L], vae=vaelib.FULL_CONFIG),
}
LORA_RANK = 64
SHAPES = {}  # shadow ops: (op, its inputs' shapes, strides, dtypes) -> its outputs' (Counter.run_shadow)


def allocated(nbytes):
    """What the CUDA caching allocator counts for a request of nbytes (an empty tensor allocates nothing)."""
    return -(-nbytes // ROUND) * ROUND


def apply(fn, x):
    """fn on every leaf of x (nested lists, tuples, dicts): torch's pytree, the few containers ops take, faster."""
    if isinstance(x, (list, tuple)) and not isinstance(x, torch.Size):
        return type(x)(apply(fn, a) for a in x)
    if isinstance(x, dict):
        return {k: apply(fn, v) for k, v in x.items()}
    return fn(x)


def leaves(x):
    """The leaves of x, as apply visits them."""
    out = []
    apply(out.append, x)
    return out


class Like:
    """A remembered output of an op: its shape, strides and dtype."""

    def __init__(self, t):
        self.shape, self.stride, self.dtype = t.shape, t.stride(), t.dtype


class Shadow(torch.Tensor):
    """A CPU tensor as autograd and autocast see it, held as a meta tensor (shape, dtype, storage size): no data."""

    @staticmethod
    def __new__(cls, meta):
        t = torch.Tensor._make_wrapper_subclass(cls, meta.shape, strides=meta.stride(), dtype=meta.dtype, device=CPU,
                                                storage_offset=meta.storage_offset(), layout=meta.layout)
        t.meta = meta
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self):
        return f"Shadow({tuple(self.shape)}, {self.dtype})"

    @property
    def data(self):
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, new):  # Module.to(dtype) swaps parameters in place by `param.data = new`: the meta tensor too
        torch._C.TensorBase.data.__set__(self, new)
        self.meta = new.meta

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a memplan.Shadow tensor outside its Counter")


CPU, META = torch.device("cpu"), torch.device("meta")


class Counter(TorchDispatchMode):
    """The live bytes of every storage made under it, each storage once, on a timeline to read peaks from.

    shadow=True: every tensor made under it is a Shadow, and every op runs on the meta tensors inside (torch's meta
    kernels compute shapes, dtypes and strides only), so a step of the real SDXL takes seconds; shadow=False: real
    CPU tensors (to check the counts). Each storage gets a serial number and a kind (KINDS: "activations" until
    tagged as something else); the timeline records serial when it is made and ~serial when it dies; marks name
    the phases of the step."""

    def __init__(self, shadow=True):
        super().__init__()
        self.shadow = shadow
        self.live = {}  # storage address -> serial, while it lives
        self.size, self.kind = [], []  # serial -> bytes, kind
        self.events = []  # serial (made) or ~serial (freed), in order
        self.marks = []  # (index into events, phase name)
        self.refs = {}  # serial -> weakref of its storage, whose callback records the free
        self.casting = set()  # serials of the fp32 parameters whose bf16 copies autocast caches ("casts")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self.run_shadow(func, args, kwargs) if self.shadow else func(*args, **kwargs)
        for t in leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        if func is torch.ops.aten._to_copy.default and self.serial(args[0]) in self.casting:
            self.kind[self.serial(out)] = "casts"
        return out

    def run_shadow(self, func, args, kwargs):
        """func on the meta tensors inside the Shadows; an op that returns one of its inputs returns its Shadow.
        Ops that make new tensors are remembered by their inputs' shapes, strides and dtypes: the next call with
        the same ones makes empty meta tensors like the last outputs instead of running torch's (Python) meta code."""
        inputs = {}

        def down(a):
            if isinstance(a, Shadow):
                inputs[id(a.meta)] = a
                return a.meta
            return META if isinstance(a, torch.device) and a.type == "cpu" else a

        def up(t):
            if not isinstance(t, torch.Tensor):
                return t
            same = inputs.get(id(t))
            return Shadow(t) if same is None else same

        args, kwargs = apply(down, args), apply(down, kwargs)
        if kwargs.get("generator") is not None:  # random numbers on meta: none drawn, no generator needed
            kwargs["generator"] = None
        key = self.key(func, args, kwargs)
        like = SHAPES.get(key)
        if like is not None:
            out = apply(lambda m: torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device=META), like)
        else:
            out = func(*args, **kwargs)
            if key is not None and key not in SHAPES:
                held = {m.untyped_storage()._cdata for m in leaves((args, kwargs)) if isinstance(m, torch.Tensor)}
                made = leaves(out)
                fresh = all(isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in held for t in made)
                SHAPES[key] = apply(Like, out) if fresh and made else None
        return apply(up, out)

    @staticmethod
    def key(func, args, kwargs):
        """What func's outputs depend on (None: the op writes its inputs, or says it returns a view of one, or takes
        arguments that do not hash); an op found to return a view anyway (aten._unsafe_view) is never remembered."""
        schema = func._schema
        if schema.is_mutable or any(r.alias_info is not None for r in schema.returns):
            return None

        def freeze(a):
            if isinstance(a, torch.Tensor):
                return ("tensor", tuple(a.shape), a.stride(), a.dtype)
            if isinstance(a, (list, tuple)):
                return tuple(freeze(x) for x in a)
            if isinstance(a, dict):
                return tuple((k, freeze(v)) for k, v in sorted(a.items()))
            hash(a)
            return a
        try:
            return func, freeze(args), freeze(kwargs)
        except TypeError:
            return None

    def add(self, t):
        """Count t's storage if it is new."""
        st = (t.meta if isinstance(t, Shadow) else t).untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        serial = len(self.size)
        self.live[key] = serial
        self.size.append(allocated(st.nbytes()))
        self.kind.append("activations")
        self.events.append(serial)
        self.refs[serial] = weakref.ref(st, lambda _, key=key, serial=serial: self._free(key, serial))

    def _free(self, key, serial):
        if self.live.get(key) == serial:
            del self.live[key], self.refs[serial]
            self.events.append(~serial)

    def serial(self, t):
        """The serial of t's storage (None: not made under this counter)."""
        if isinstance(t, torch.Tensor):
            return self.live.get((t.meta if isinstance(t, Shadow) else t).untyped_storage()._cdata)
        return None

    def tag(self, tensors, kind):
        """Say what these tensors' storages hold (weights, grads, ...), for the breakdown and the parallel plans."""
        for t in tensors:
            s = self.serial(t)
            if s is not None:
                self.kind[s] = kind

    def mark(self, phase):
        """Everything from here on belongs to this phase; returns the mark's index, to replay a window from it."""
        self.marks.append((len(self.events), phase))
        return len(self.marks) - 1

    def replay(self, first, last, scale=None, extra=None):
        """The peak over the marks [first, last) of sum_kind scale[kind] * live bytes of that kind + extra[phase]:
        (peak bytes, phase at the peak, live bytes per kind at the peak)."""
        scale = {k: 1.0 for k in KINDS} | (scale or {})
        extra = extra or {}
        live = dict.fromkeys(KINDS, 0)
        for e in self.events[:self.marks[first][0]]:  # what is alive when the window opens
            s = e if e >= 0 else ~e
            live[self.kind[s]] += self.size[s] if e >= 0 else -self.size[s]
        best = (-1.0, None, None)
        for (begin, phase), (end, _) in zip(self.marks[first:last], self.marks[first + 1:last + 1]):
            value = sum(scale[k] * v for k, v in live.items()) + extra.get(phase, 0)
            if value > best[0]:
                best = (value, phase, dict(live))
            for e in self.events[begin:end]:
                s = e if e >= 0 else ~e
                if e >= 0:
                    live[self.kind[s]] += self.size[s]
                    value += scale[self.kind[s]] * self.size[s]
                    if value > best[0]:
                        best = (value, phase, dict(live))
                else:
                    live[self.kind[s]] -= self.size[s]
                    value -= scale[self.kind[s]] * self.size[s]
        return best


# ----------------------------------------------------------------------------------------------------
# What the CUDA kernels allocate


class FlashPlan(torch.autograd.Function):
    """kernels.attention's memory, as its Triton kernels allocate it (kernels/flash_attention.py)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        B, H, Lq, D = q.shape  # k, v (B, H, Lk, D)
        o = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)  # log-sum-exp, kept for backward
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = do.contiguous()  # (B, H, Lq, D), laid out like O
        delta = torch.empty_like(lse)  # (B, H, Lq): rowsum(dO * O), read by both backward kernels
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # dQ, dK, dV: contiguous, in the inputs' dtypes
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        del do, delta  # freed as the kernel's launcher returns
        return dq, dk, dv, None, None


def flash_attention(q, k, v, causal=False, scale=None):
    """kernels.attention's signature."""
    return FlashPlan.apply(q, k, v, causal, scale)


def sdpa(q, k, v, *args, **kwargs):
    """F.scaled_dot_product_attention as CUDA's flash / memory-efficient kernels allocate it (no L x L matrix)."""
    return FlashPlan.apply(q, k, v, False, None)


class FusedLossPlan(torch.autograd.Function):
    """kernels.dpo_loss's memory, as its fused Triton kernels allocate it (kernels/fused_dpo_loss.py)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, noise, beta):
        model_pred, ref_pred, noise = model_pred.contiguous(), ref_pred.contiguous(), noise.contiguous()
        B = noise.shape[0]
        N = noise.numel() // B
        partial = torch.empty((4, B, -(-N // BLOCK)), device=noise.device, dtype=torch.float32)
        loss, inner, _ = _epilogue(partial.sum(-1), N, beta)
        c = beta * torch.sigmoid(-inner) / (B * N)  # (B,)
        ctx.save_for_backward(model_pred, noise, torch.cat([c, -c]))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        model_pred, noise, coef = ctx.saved_tensors
        coef = (coef * grad_loss).contiguous()  # (2B,)
        return torch.empty_like(model_pred), None, None, None


def fused_loss(model_pred, ref_pred, noise, beta):
    """kernels.dpo_loss's signature."""
    return FusedLossPlan.apply(model_pred, ref_pred.detach(), noise.detach(), float(beta)), {}


def in_fp32(fn):
    """fn as CUDA autocast runs an op of its fp32 list: floating inputs cast to fp32, autocast off inside."""
    def call(*args, **kwargs):
        if not torch.is_autocast_enabled("cpu"):
            return fn(*args, **kwargs)

        def cast(a):
            floating = isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64
            return a.float() if floating else a
        torch.set_autocast_enabled("cpu", False)
        try:
            return fn(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})
        finally:
            torch.set_autocast_enabled("cpu", True)
    return call


CUDA_FP32 = ("layer_norm", "interpolate")  # the F.* our models call that CUDA autocast (not CPU's) runs in fp32


@contextlib.contextmanager
def cuda_like(autocast_cache=None):
    """The CUDA kernels' memory (FlashPlan, FusedLossPlan) and CUDA autocast's fp32 ops in place; restored after.
    autocast_cache: dpo.pair_loss's autocast cache_enabled (dpo.AUTOCAST_CACHE unless given: what-if rows)."""
    saved = [(kernels, "attention"), (kernels, "dpo_loss"), (kernels, "use_triton"),
             (F, "scaled_dot_product_attention"), (dpo, "AUTOCAST_CACHE")] + [(F, name) for name in CUDA_FP32]
    old = [getattr(m, n) for m, n in saved]
    if autocast_cache is not None:  # pair_loss passes it to its autocast (the step's only one with trained weights)
        dpo.AUTOCAST_CACHE = autocast_cache
    kernels.attention, kernels.dpo_loss, kernels.use_triton = flash_attention, fused_loss, lambda t: True
    F.scaled_dot_product_attention = sdpa
    for name in CUDA_FP32:
        setattr(F, name, in_fp32(getattr(F, name)))
    try:
        yield
    finally:
        for (m, n), f in zip(saved, old):
            setattr(m, n, f)


# ----------------------------------------------------------------------------------------------------
# The step on shadow tensors


def materialize(module, dtype):
    """A meta-built module's parameters and buffers made anew under the Counter, in dtype (floating ones)."""
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            want = dtype if p.is_floating_point() else p.dtype
            setattr(m, name, torch.nn.Parameter(torch.empty(p.shape, dtype=want), requires_grad=p.requires_grad))
        for name, b in list(m.named_buffers(recurse=False)):
            m._buffers[name] = torch.empty(b.shape, dtype=dtype if b.is_floating_point() else b.dtype)
    return module


def settings(model, batch_size, gradient_checkpointing, lora_rank=None):
    """dpo.py's resolved arguments on CUDA for this model (optimizer, lr, beta, bf16, ...) and these choices."""
    targs = dpo.parse_args([])
    targs.batch_size, targs.gradient_checkpointing, targs.lora = batch_size, gradient_checkpointing, lora_rank
    sdxl = unetlib.check_config(model["unet"])["addition_embed_type"] == "text_time"
    return dpo.resolve(targs, sdxl, 1, "cuda", model["resolution"])


def build(model, targs, counter):
    """(policy, reference, trained parameters) as dpo.train builds them, tagged for the counter."""
    with torch.device("meta"):
        policy, ref = unetlib.UNet(model["unet"]), unetlib.UNet(model["unet"])
    policy = materialize(policy, torch.float32)  # unet.load(..., torch.float32)
    if targs.lora:  # one frozen UNet in the compute dtype (norms fp32) with fp32 adapters; the reference is the base
        policy = dpo.reference(policy, None, targs.amp_dtype)
        trained = lora.add(policy, targs.lora, targs.lora_alpha)
        ref = lora.reference(policy)
    else:  # fp32 master weights, and a frozen reference: conv/linear in the compute dtype, norms fp32
        ref = dpo.reference(materialize(ref, torch.float32), None, targs.amp_dtype)
        counter.tag(ref.parameters(), "reference")
        trained = list(policy.parameters())
    counter.tag(policy.parameters(), "weights")
    counter.casting = {counter.serial(p) for p in policy.parameters() if p.dtype == torch.float32 and p.requires_grad}
    policy.gradient_checkpointing = targs.gradient_checkpointing
    policy.train()
    return policy, ref, trained


def unit_order(policy):
    """Forward pre-hooks that list parallel.shard's units (ResBlock, SpatialTransformer, Resample) as they run."""
    order, hooks = [], []
    for name, m in policy.named_modules():
        if isinstance(m, (unetlib.ResBlock, unetlib.SpatialTransformer, unetlib.Resample)):
            hooks.append(m.register_forward_pre_hook(lambda m, a, name=name: order.append(name)))
    return order, hooks


def family_timelines(model, mode, configs, targs=None, shadow=True, lora_rank=LORA_RANK, autocast_cache=None):
    """Steps of one model and mode ("full" or "lora") on one pair of models: the optimizer's window once, then one
    window (inputs .. end of backward) per (gradient_checkpointing, batch_size) in configs. targs: dpo.py's resolved
    arguments (default: dpo.py's on CUDA for this model); shadow=False runs on real CPU tensors (to check counts);
    autocast_cache: as if dpo.pair_loss's autocast had this cache_enabled (None: what it has, dpo.AUTOCAST_CACHE)."""
    counter = Counter(shadow)
    out = dict(counter=counter, windows={})
    if targs is None:
        targs = settings(model, configs[0][1], configs[0][0], lora_rank if mode == "lora" else None)
    targs = argparse.Namespace(**vars(targs))
    c = unetlib.check_config(model["unet"])
    h = model["resolution"] // 2 ** (len(model["vae"]["block_out_channels"]) - 1)  # latent side
    with cuda_like(autocast_cache), counter:
        counter.mark("build")
        policy, ref, trained = build(model, targs, counter)
        opt = optim.build(targs.optimizer, trained, targs.lr, targs.weight_decay, fused=True)  # as dpo.py on CUDA
        for p in trained:  # the optimizer's state as after a first step
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        counter.tag([v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)], "optimizer")
        first = counter.mark("optimizer")  # gradients as backward leaves them, clipping, the optimizer step
        for p in trained:
            p.grad = torch.zeros_like(p)
        counter.tag([p.grad for p in trained], "grads")
        torch.nn.utils.clip_grad_norm_(trained, targs.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out["optimizer"] = (first, counter.mark("idle"))
        acp = diffusion.alphas_cumprod(diffusion.SD_SCHEDULE)
        order, hooks = unit_order(policy)
        for ckpt, B in configs:
            policy.gradient_checkpointing = targs.gradient_checkpointing = ckpt
            first = counter.mark("inputs")  # what the cache (or the encoders) hands the step
            z = torch.empty(2 * B, c["in_channels"], h, h)  # clean latents, winners first
            eps, t = torch.empty(B, c["in_channels"], h, h), torch.zeros(B, dtype=torch.long)
            cond = [torch.empty(2 * B, 77, c["cross_attention_dim"]), None, None]  # context, pooled, time ids
            if c["addition_embed_type"] == "text_time":  # SDXL: pooled text embedding (B, 1280), size conditioning
                pooled = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
                cond[1], cond[2] = torch.empty(2 * B, pooled), torch.empty(2 * B, 6)

            def policy_fn(*args):
                counter.mark("forward")
                return policy(*args)

            def ref_fn(*args):
                counter.mark("reference")
                for hk in hooks:  # the units' order is the first policy forward's (a LoRA reference is the policy)
                    hk.remove()
                return ref(*args)

            loss = dpo.pair_loss(policy_fn, ref_fn, z, eps, t, tuple(cond), targs, acp, "epsilon")[0]
            counter.mark("backward")
            loss.backward()
            counter.tag([p.grad for p in trained], "grads")
            opt.zero_grad(set_to_none=True)
            del loss, z, eps, t, cond
            out["windows"][(ckpt, B)] = (first, counter.mark("idle"))
        in_units = {id(p) for name in order for p in policy.get_submodule(name).parameters()}
        out.update(units=[sum(p.numel() for p in policy.get_submodule(n).parameters()) for n in order],
                   root=sum(p.numel() for p in policy.parameters() if id(p) not in in_units),
                   largest=max(allocated(p.numel() * p.element_size()) for p in trained),
                   trained=sum(allocated(p.numel() * p.element_size()) for p in trained),
                   optimizer_name=targs.optimizer, params=sum(p.numel() for p in policy.parameters()))
    return out


class Kept:
    """data.model_inputs's prompt-dropout flags, none dropped, read with .tolist() (a Shadow holds no values)."""

    def __init__(self, n):
        self.n = n

    def tolist(self):
        return [False] * self.n


def encode(model, batch_size):
    """The encoders on the GPU: (their weights, the peak of data.model_inputs above them), in bytes."""
    targs = settings(model, batch_size, True)
    res = model["resolution"]
    counter = Counter()
    with cuda_like(), counter:
        with torch.device("meta"):
            text = [clip.TextTransformer(cfg, projection=i == 1) for i, cfg in enumerate(model["text"])]
            v = vaelib.AutoencoderKL(model["vae"])

        def tokens(prompts):  # (B, 77) token ids, as clip.Tokenizer gives them
            return torch.zeros((len(prompts), clip.MAX_LENGTH), dtype=torch.long)

        te = materialize(clip.TextEncoders(text, [tokens] * len(text)), targs.amp_dtype)  # as clip.load(amp_dtype)
        v = materialize(v, torch.float32)  # as data.training_set: vae.load(..., torch.float32)
        counter.tag([*te.parameters(), *v.parameters()], "encoders")
        first = counter.mark("encode")
        B = batch_size
        batch = {"pixels": torch.empty(B, 2, 3, res, res), "caption": ["a photo"] * B, "time_ids": torch.empty(B, 2, 6)}
        out = data.model_inputs(batch, Kept(B), torch.device("cpu"), targs, (te, v), None)
        del out, batch
        peak, _, live = counter.replay(first, counter.mark("end"))
    return live["encoders"], peak - live["encoders"]


# ----------------------------------------------------------------------------------------------------
# One rank's peak under a wrapper


def fsdp_units(tl):
    """Bytes of the gathered FSDP units per phase of the step (see the module docstring)."""
    o, root = tl["units"], 2 * tl["root"]
    pairs = max((2 * (a + b) for a, b in zip(o, o[1:])), default=0)
    r = o[::-1]  # backward runs the units in reverse
    back = max((2 * (a + b) + 2 * a + 4 * (a + p) for p, a, b in zip(r, r[1:], r[2:])), default=pairs)
    return {"forward": root + pairs, "reference": 2 * root + pairs, "backward": root + back}


def peak(tl, window, wrapper="none", world=1, enc=None):
    """One rank's peak (bytes), the phase it is in, and what is alive then (bytes per kind, plus "wrapper": the DDP
    buckets or the gathered FSDP units) for one window of a family's timeline. enc: (encoder weights, encode peak)."""
    scale, extra, const = {}, {}, 0
    if wrapper == "ddp":
        scale, const, extra = {"grads": 0.0}, tl["trained"], {"backward": tl["largest"]}
    elif wrapper == "fsdp":
        scale = {k: 1.0 / world for k in ("weights", "reference", "optimizer", "grads")} | {"casts": 0.0}
        extra = fsdp_units(tl)
    phases = {p for _, p in tl["counter"].marks}
    total = {p: extra.get(p, 0) + const + (enc[0] if enc else 0) for p in phases}
    if enc is not None:
        total["inputs"] += enc[1]  # the encode phase, before the step's inputs exist
    value, phase, live = tl["counter"].replay(*window, scale, total)
    parts = {k: scale.get(k, 1.0) * v for k, v in live.items()}
    parts["encoders"] = (enc[0] + (enc[1] if phase == "inputs" else 0)) if enc else 0
    parts["wrapper"] = extra.get(phase, 0) + const
    return value, phase, parts


def fits(peak_bytes, gpu_gib):
    """A GPU of gpu_gib GiB fits an allocated peak with 5% for fragmentation and 0.75 GiB for the CUDA context."""
    return peak_bytes * 1.05 + 0.75 * GiB <= gpu_gib * GiB


def best(tl, window, wrapper="none", world=1, enc=None):
    """The peak of a step: its window's (inputs .. backward) or the optimizer's, whichever is higher."""
    step, update = peak(tl, window, wrapper, world, enc), peak(tl, tl["optimizer"], wrapper, world, enc)
    return step if step[0] >= update[0] else update


def row(model, mode, world, ckpt, B, encoders, tl, enc, autocast_cache=None):
    """One configuration of the training plan (dpo.py: DDP on one rank or more, FSDP over world ranks)."""
    value, phase, parts = best(tl, tl["windows"][(ckpt, B)], "fsdp" if world > 1 else "ddp", world,
                               enc if encoders == "gpu" else None)
    return dict(model=model["name"], mode=mode, fsdp_world=world, gradient_checkpointing=ckpt, batch_size=B,
                resolution=model["resolution"], encoders=encoders, parallel="fsdp" if world > 1 else "ddp",
                peak_gb=round(value / GiB, 3),
                peak_bytes=int(value), phase=phase, optimizer=tl["optimizer_name"],
                lora_rank=LORA_RANK if mode == "lora" else None,
                autocast_cache=dpo.AUTOCAST_CACHE if autocast_cache is None else autocast_cache,
                breakdown_gb={k: round(v / GiB, 3) for k, v in parts.items()},
                fits={str(g): fits(value, g) for g in GPUS})


def plan(models=(MODELS["sdxl"], MODELS["sd15"]), batches=(1, 2, 4), log=print):
    """Every row of the README's table: model x (full + DDP, LoRA + DDP, full + FSDP over 8 ranks) x checkpointing
    on/off x batch x encoders (on the GPU, or --cache); then, for the first model, the full fine-tune at batch 1
    with checkpointing as if dpo.pair_loss's autocast cached its bf16 weight copies the other way (what-if rows)."""
    rows, whatif = [], []
    for model in models:
        tic = time.time()
        enc = {B: encode(model, B) for B in batches}
        log(f"# {model['name']} encoders: {time.time() - tic:.1f} s")
        if not whatif:
            other = not dpo.AUTOCAST_CACHE
            tl = family_timelines(model, "full", [(True, batches[0])], autocast_cache=other)
            whatif = [row(model, "full", 1, True, batches[0], e, tl, enc[batches[0]], autocast_cache=other)
                      for e in ("gpu", "cache")]
        for mode in ("full", "lora"):
            tic = time.time()
            configs = [(ckpt, B) for ckpt in (True, False) for B in batches]
            tl = family_timelines(model, mode, configs)
            log(f"# {model['name']} {mode}: {len(configs)} steps on shadow tensors in {time.time() - tic:.1f} s")
            for world in ((1, 8) if mode == "full" else (1,)):
                for ckpt, B in configs:
                    for encoders in ("gpu", "cache"):
                        rows.append(row(model, mode, world, ckpt, B, encoders, tl, enc[B]))
    return rows + whatif


def predict(model, targs):
    """The peak of the step bench_step.py times (one process, no wrapper, inputs on the device): bytes, phase, parts."""
    tl = family_timelines(model, "lora" if targs.lora else "full", [(targs.gradient_checkpointing, targs.batch_size)],
                          targs)
    return best(tl, tl["windows"][(targs.gradient_checkpointing, targs.batch_size)])


def table(rows):
    """The plan as a markdown table: the peak, the phase it is reached in, what is alive then, the GPUs it fits."""
    parts = ("weights", "grads", "optimizer", "reference", "encoders", "casts", "activations", "wrapper")
    head = ("| model | mode | fsdp_world | ckpt | batch | res | encoders | peak GiB | at | weights | grads | "
            "optimizer | reference | encoders | autocast bf16 copies | activations | DDP buckets / FSDP units | "
            "smallest GPU | 24 | 40 | 48 | 80 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ok = [g for g in GPUS if r["fits"][str(g)]]
        cells = [r["model"], r["mode"], r["fsdp_world"], "on" if r["gradient_checkpointing"] else "off",
                 r["batch_size"], r["resolution"], r["encoders"], f"{r['peak_gb']:.2f}", r["phase"],
                 *(f"{r['breakdown_gb'][k]:.2f}" for k in parts), f"{ok[0]} GiB" if ok else "> 80 GiB",
                 *("yes" if r["fits"][str(g)] else "no" for g in (24, 40, 48, 80))]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
