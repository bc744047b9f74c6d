"""The peak GPU memory of one Diffusion-DPO training step, predicted on a machine without a GPU.

    python bench/step.py --plan [--plan_out plan.json]     # the README's table: SDXL, SD1.5, SD3.5, FLUX.1-dev
    from bench import models, plan; rows = plan.plan([models.spec("sdxl")], batches=(1,))

How. The real step runs on shadow tensors (bench/shadow.py): dpo.pair_loss (the policy on both images of each pair, the
frozen reference, eq. 14; for SD3.5 and FLUX.1 the flow step: one sigma per pair, the velocity target, the family's
conditioning) on the denoiser built from the released configs (the family's record: unet.UNet, mmdit.MMDiT, flux.Flux)
by dpo.build_models, backward, and optim.update (gradient clipping, optim.build's optimizer), and for the
encoders on the GPU cache.model_inputs with the VAE and the record's text encoders (CLIP-L, bigG, T5-XXL);
shadow.Counter counts the bytes of each storage while it lives, rounded as CUDA's caching allocator rounds them. A step
of the real SDXL takes a few seconds. The optimizer's state is made first, by a step on zero gradients, so the step
that is counted is a steady one.
Checked (tests/test_memplan.py, tests/test_shadow.py): the same step on real CPU tensors counts the same bytes, event
for event (tiny UNets, MMDiT and FLUX); torch's own MemTracker agrees with the Counter on real tensors; torch's
FakeTensorMode gives the same peak on every SDXL / SD1.5 row of the plan.

Where a CPU build of torch differs from CUDA, and how the plan makes it the same:
  - autocast: torch.autocast("cuda") turns itself off without CUDA, and CUDA tensors (fake or not) cannot pass
    through autograd in a CPU build. Shadows are CPU tensors under CPU autocast, which casts the same matmuls and
    convolutions to bf16 and keeps the same cache of bf16 copies of the fp32 weights, but leaves two ops in bf16 that
    CUDA autocast runs in fp32: layer_norm and nearest upsampling. cuda_like registers autocast kernels that cast
    them to fp32 as CUDA's do (torch.library, for the plan's duration).
  - the kernels: inside kernels.allocation_models(), kernels.attention and kernels.dpo_loss run each kernel file's
    own allocation model (FlashAttentionMemory: forward O and the fp32 log-sum-exp (B, H, Lq), saved with q, k, v;
    backward a contiguous dO, the fp32 delta (B, H, Lq), dQ, dK, dV, no L x L matrix; DPOLossMemory: per-chunk
    partial sums, one gradient). The VAE's attention (head dim 512: kernels.sdpa, PyTorch's memory-efficient kernel
    on CUDA, under no_grad) is modelled as FlashAttention.
  - AdamW: fused=True, as dpo.py asks for on CUDA (no foreach temporaries).
Not modelled: the CUDA context and the cuBLAS / cuDNN workspaces (cuDNN's go through torch's allocator: some 100 MB
at the largest convolutions), and fragmentation (reserved > allocated). fits() leaves room for them: a GPU of
G GiB fits a step whose allocated peak is P when 1.05 P + 0.75 GiB <= G.

One process, N ranks. The timeline is one process with no wrapper, which is what bench/step.py runs ("none"). The
training plan's rows compose it with what dpo.py's wrapper (parallel.wrap) holds on each rank at every moment t:
  ddp   timeline(t) - gradients(t) + buckets + (backward) the largest trained parameter: DDP keeps one fp32 copy of
        the trained parameters' gradients in its buckets from the moment it wraps the model (gradient_as_bucket_view
        makes each .grad a view of them), and each fresh gradient lives until it is copied in.
  fsdp  (parallel.shard: units = the family's blocks, a UNet's ResBlocks, SpatialTransformers and Resamples, MMDiT's
        joint blocks, FLUX's double and single blocks, plus the root; parameters gathered in bf16 from fp32 shards,
        gradients reduce-scattered in fp32; the reference sharded the same way)
        (weights + reference + optimizer + gradients(t)) / N + activations(t) + gathered units(phase), without the
        timeline's autocast weight copies (the gathered parameters are bf16 already). Gathered units: the root
        throughout (FSDP2 keeps the root's parameters between forward and backward); forward and reference forward:
        two consecutive units (the one computing, the one prefetched); backward: two consecutive units, the bf16
        gradients of the first, and the fp32 reduce-scatter inputs of it and of the unit before it (one
        reduce-scatter in flight).
Encoders on the GPU (not --cache): their weights are added to every moment, and the encode phase of cache.model_inputs
(counted the same way, once per model and batch size) is added where the step starts.
"""
import contextlib
import time

import torch

import cache
import clip
import diffusion
import dpo
import families
import kernels
import optim
import vae as vaelib
from bench import models
from bench.shadow import Counter, allocated, materialize

GiB = 2 ** 30
GPUS = (8, 12, 16, 24, 32, 40, 48, 80)  # GiB of the GPUs each row is checked against
LORA_RANK = 64
# What the tiers are for: (model, mode, FSDP ranks (1: DDP), encoders ("gpu", "cache"; None: either), GPU GiB); a mode
# "lora-FMT" is a LoRA run with --quantize FMT (its text encoders quantized too: "gpu" is encoders in the run itself)
RUN = ("gpu", "offload")  # the encoders in the run itself (on the GPU throughout, or only while encoding): no --cache
GOALS = (("flux-dev", "lora", 1, "gpu", 40), ("flux-dev", "lora", 1, "cache", 24), ("sd35-large", "lora", 1, None, 24),
         ("sd35-medium", "lora", 1, None, 16), ("flux-dev", "full", 8, None, 80), ("flux-dev", "full", 8, None, 40),
         ("flux-dev", "lora-fp8", 1, RUN, 24), ("flux-dev", "lora-nf4", 1, RUN, 16),
         ("sd35-large", "lora-nf4", 1, RUN, 16), ("sdxl", "lora-nf4", 1, RUN, 8),
         ("qwen-image", "lora", 1, None, 80), ("qwen-image", "full", 8, None, 80), ("z-image", "lora", 1, None, 24),
         ("qwen-image", "lora-nf4", 1, RUN, 24), ("z-image", "lora-nf4", 1, RUN, 16))
QUANTIZED = kernels.FORMATS  # the --quantize formats planned


def modes(mode):
    """(LoRA rank or None, --quantize format or None) of a plan mode: "full", "lora" or "lora-FMT"."""
    kind, _, fmt = mode.partition("-")
    return (LORA_RANK if kind == "lora" else None), (fmt or None)


def mode_title(mode) -> str:
    """A plan mode in the tables' words."""
    rank, fmt = modes(mode)
    return "full" if rank is None else f"LoRA {rank}" + (f", {fmt} base" if fmt else "")


def title(name) -> str:
    """The tables' name of a model: a released one's title (families.py), else its own."""
    found = families.released(name)
    return found[1] if found else name


# ----------------------------------------------------------------------------------------------------
# Where a CPU build of torch differs from CUDA


# The ops our models call that CUDA autocast runs in fp32 and CPU autocast leaves in bf16: aten (op, overload)
CUDA_FP32 = (("native_layer_norm", "default"), ("upsample_nearest2d", "default"), ("upsample_nearest2d", "vec"))


def in_fp32(op):
    """An autocast kernel for op as CUDA autocast's fp32 list has it: floating inputs cast to fp32, then op."""
    def kernel(*args, **kwargs):
        def cast(a):
            floating = isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64
            return a.float() if floating else a
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
            return op(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})
    return kernel


@contextlib.contextmanager
def cuda_like():
    """The CUDA step's memory on the CPU: the kernels' allocation models (kernels.allocation_models), and CPU
    autocast casting as CUDA autocast does (kernels registered with torch's dispatcher for the AutocastCPU key,
    removed again on exit; they hold through gradient checkpointing's recomputation)."""
    lib = torch.library.Library("aten", "IMPL")
    for name, overload in CUDA_FP32:
        op = getattr(getattr(torch.ops.aten, name), overload)
        lib.impl(name if overload == "default" else f"{name}.{overload}", in_fp32(op), "AutocastCPU")
    try:
        with kernels.allocation_models():
            yield
    finally:
        lib._destroy()


# ----------------------------------------------------------------------------------------------------
# The step on shadow tensors


def settings(model, batch_size, gradient_checkpointing, lora_rank=None, quantize=None):
    """dpo.py's resolved arguments on CUDA for this model (optimizer, lr, beta, bf16, ...) and these choices."""
    return models.settings(model, "cuda", batch_size=batch_size, gradient_checkpointing=gradient_checkpointing,
                           lora=lora_rank, quantize=quantize)


def codes(module):
    """The tensors of module's quantized layers (their codes and scales), to tag as weights."""
    return [b for m in module.modules() if isinstance(m, kernels.QuantLinear) for b in m.buffers()]


def build(model, args, counter):
    """(policy, reference, trained parameters) as dpo.train builds them (dpo.build_models), tagged for the counter."""
    fam = model["family"]

    def source(dtype, quantize=None):  # a fresh fp32 denoiser of the model, its tensors made under the counter (fp32,
        with torch.device("meta"):  # as dpo.reference casts its layers to the compute dtype), its Linears quantized
            u = fam.model(model["config"])
        u = materialize(u, torch.float32)
        return kernels.quantize_linears(u, quantize, dtype) if quantize else u  # (on shadows: shapes, no values)
    policy, ref, trained = dpo.build_models(source, args.amp_dtype, args.lora, args.lora_alpha, fam.lora_targets,
                                            args.seed, args.loss in dpo.REFERENCE_FREE, args.gradient_checkpointing,
                                            args.quantize)
    if not args.lora:
        counter.tag(ref.parameters(), "reference")
    counter.tag([*policy.parameters(), *codes(policy)], "weights")
    counter.casting = {counter.serial(p) for p in policy.parameters() if p.dtype == torch.float32 and p.requires_grad}
    policy.train()
    return policy, ref, trained


def unit_order(policy, blocks):
    """Forward pre-hooks that list parallel.shard's units (the family's blocks) as they run: FSDP gathers in that
    order."""
    order, hooks = [], []
    for name, m in policy.named_modules():
        if isinstance(m, blocks):
            hooks.append(m.register_forward_pre_hook(lambda m, a, name=name: order.append(name)))
    return order, hooks


def ready(model, args, counter, scaler):
    """(policy, reference, trained, optimizer) as dpo.train holds them between steps (under the counter): the
    optimizer's state made by a step on zero gradients, so the steps counted after it are steady ones."""
    counter.mark("build")
    policy, ref, trained = build(model, args, counter)
    opt = optim.build(args.optimizer, trained, args.lr, args.weight_decay, fused=True)  # as dpo.py on CUDA
    for p in trained:
        p.grad = torch.zeros_like(p)
    optim.update(opt, scaler, trained, args.lr, args.warmup, args.grad_clip, 0)
    counter.tag([v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)], "optimizer")
    return policy, ref, trained, opt


def family_timelines(model, mode, configs, args=None, shadow=True, lora_rank=LORA_RANK, autocast_cache=False):
    """Steps of one model and mode ("full", "lora", "lora-FMT": modes) on one pair of models: the optimizer's window
    once, then one window (inputs .. end of backward) per (gradient_checkpointing, batch_size) in configs. args:
    dpo.py's resolved arguments (default: dpo.py's on CUDA for this model); shadow=False runs on real CPU tensors (to
    check counts); autocast_cache: as if dpo.pair_loss's autocast had this cache_enabled (False: dpo.py's run)."""
    counter = Counter(shadow)
    out = dict(counter=counter, windows={})
    if args is None:
        rank, fmt = modes(mode)
        args = settings(model, configs[0][1], configs[0][0], lora_rank if rank else None, fmt)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # dpo.py's, unless fp16
    fam = model["family"]
    with cuda_like(), counter:
        policy, ref, trained, opt = ready(model, args, counter, scaler)
        first = counter.mark("optimizer")  # gradients as backward leaves them, clipping, the optimizer step
        for p in trained:
            p.grad = torch.zeros_like(p)
        counter.tag([p.grad for p in trained], "grads")
        optim.update(opt, scaler, trained, args.lr, args.warmup, args.grad_clip, 1)
        out["optimizer"] = (first, counter.mark("idle"))
        sched = diffusion.scheduler_config("", fam)  # a flow model: sigma in place of t, no alphas_cumprod
        acp = None if fam.flow else diffusion.alphas_cumprod(sched)
        objective = dpo.objective(args.loss, args.beta, args.rpo_tau, args.rpo_form)
        order, hooks = unit_order(policy, fam.blocks)
        for ckpt, B in configs:
            policy.gradient_checkpointing = ckpt
            first = counter.mark("inputs")  # what the cache (or the encoders) hands the step
            z, eps, t, cond = models.inputs(model, B, guidance=args.guidance)

            def policy_fn(*x):
                counter.mark("forward")
                return policy(*x)

            def ref_fn(*x):
                counter.mark("reference")
                for hk in hooks:  # the units' order is the first policy forward's (a LoRA reference is the policy)
                    hk.remove()
                return ref(*x)
            inputs = dict(z=z, eps=eps, t=t, T=sched["num_train_timesteps"], cond=cond)
            loss = dpo.pair_loss(policy_fn, ref_fn, inputs, objective, policy.prediction_type, acp, args.amp_dtype,
                                 autocast_cache)[0]
            counter.mark("backward")
            loss.backward()
            counter.tag([p.grad for p in trained], "grads")
            opt.zero_grad(set_to_none=True)
            del loss, z, eps, t, cond, inputs
            out["windows"][(ckpt, B)] = (first, counter.mark("idle"))
        in_units = {id(p) for name in order for p in policy.get_submodule(name).parameters()}
        out.update(unit_names=list(order), units=[sum(p.numel() for p in policy.get_submodule(n).parameters())
                                                  for n in order],
                   root=sum(p.numel() for p in policy.parameters() if id(p) not in in_units),
                   largest=max(allocated(p.numel() * p.element_size()) for p in trained),
                   trained=sum(allocated(p.numel() * p.element_size()) for p in trained),
                   optimizer_name=args.optimizer, params=sum(p.numel() for p in policy.parameters()),
                   autocast_cache=autocast_cache)
    return out


class Kept:
    """cache.model_inputs's prompt-dropout flags, none dropped, read with .tolist() (a Shadow holds no values)."""

    def __init__(self, n):
        self.n = n

    def tolist(self):
        return [False] * self.n


def tokenizer(n):
    """(B, n) token ids, as clip.Tokenizer (n = 77) and t5.Tokenizer give them (a Shadow holds no values)."""
    return lambda prompts: torch.zeros((len(prompts), n), dtype=torch.long)


def encoders(model, amp_dtype, counter, quantize=None):
    """(text encoders, VAE) made under the counter as clip.load(amp_dtype, quantize=) and vae.load(fp32) make them,
    tagged."""
    fam = model["family"]
    with torch.device("meta"):
        text = [clip.TextTransformer(c, projection=e.projection) if e.module is None else e.model(c, **dict(e.options))
                for e, c in zip(fam.text.encoders, model["text"])]
        v = fam.vae.model(model["vae"]) if fam.vae.model else vaelib.AutoencoderKL(
            model["vae"], fam.vae.scaling_factor, shift_factor=fam.vae.shift_factor)
    tokenizers = [tokenizer(n) for n in model["lengths"]]
    te = materialize(clip.TextEncoders(text, tokenizers, fam), amp_dtype)
    te = kernels.quantize_linears(te, quantize, amp_dtype) if quantize else te
    v = materialize(v, torch.float32)  # as cache.training_set: vae.load(..., torch.float32)
    counter.tag([*te.parameters(), *codes(te), *v.parameters()], "encoders")
    return te, v


def encode(model, batch_size, quantize=None):
    """(encoder weights, cache.model_inputs's peak above them) in bytes, built as clip.load and vae.load build them."""
    args = settings(model, batch_size, True)
    res = model["resolution"]
    counter = Counter()
    with cuda_like(), counter:
        te, v = encoders(model, args.amp_dtype, counter, quantize)
        first = counter.mark("encode")
        B = batch_size
        batch = {"pixels": torch.empty(B, 2, 3, res, res), "caption": ["a photo"] * B, "time_ids": torch.empty(B, 2, 6)}
        out = cache.model_inputs(batch, Kept(B), torch.device("cpu"), model["family"], (te, v), None, None,
                                 args.amp_dtype == torch.bfloat16, None, args.guidance)
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


def peak(tl, window, wrapper="none", world=1, enc=None, offload=False):
    """One rank's peak (bytes), the phase it is in, and what is alive then (bytes per kind, plus "wrapper": the DDP
    buckets or the gathered FSDP units) for one window of a family's timeline. enc: (encoder weights, encode peak);
    offload: the encoders on the GPU only while they encode (--offload_encoders)."""
    scale, extra, const = {}, {}, 0
    if wrapper == "ddp":
        scale, const, extra = {"grads": 0.0}, tl["trained"], {"backward": tl["largest"]}
    elif wrapper == "fsdp":
        scale = {k: 1.0 / world for k in ("weights", "reference", "optimizer", "grads")} | {"casts": 0.0}
        extra = fsdp_units(tl)
    phases = {p for _, p in tl["counter"].marks}
    total = {p: extra.get(p, 0) + const + (enc[0] if enc and not offload else 0) for p in phases}
    if enc is not None:
        total["inputs"] += enc[1] + (enc[0] if offload else 0)  # the encode phase, before the step's inputs exist
    value, phase, live = tl["counter"].replay(*window, scale, total)
    parts = {k: scale.get(k, 1.0) * v for k, v in live.items()}
    parts["encoders"] = (enc[0] * (not offload or phase == "inputs") + (enc[1] if phase == "inputs" else 0)) \
        if enc else 0
    parts["wrapper"] = extra.get(phase, 0) + const
    return value, phase, parts


def fits(peak_bytes, gpu_gib):
    """A GPU of gpu_gib GiB fits an allocated peak with 5% for fragmentation and 0.75 GiB for the CUDA context."""
    return peak_bytes * 1.05 + 0.75 * GiB <= gpu_gib * GiB


def best(tl, window, wrapper="none", world=1, enc=None, offload=False):
    """The peak of a step: its window's (inputs .. backward) or the optimizer's, whichever is higher."""
    step = peak(tl, window, wrapper, world, enc, offload)
    update = peak(tl, tl["optimizer"], wrapper, world, enc, offload)
    return step if step[0] >= update[0] else update


def row(model, mode, world, ckpt, B, encoders, tl, enc):
    """One configuration of the training plan (dpo.py: DDP on one rank or more, FSDP over world ranks); encoders:
    "gpu", "offload" (--offload_encoders) or "cache"."""
    value, phase, parts = best(tl, tl["windows"][(ckpt, B)], "fsdp" if world > 1 else "ddp", world,
                               enc if encoders in ("gpu", "offload") else None, encoders == "offload")
    return dict(model=model["name"], mode=mode, fsdp_world=world, gradient_checkpointing=ckpt, batch_size=B,
                resolution=model["resolution"], encoders=encoders, parallel="fsdp" if world > 1 else "ddp",
                peak_gb=round(value / GiB, 3),
                peak_bytes=int(value), phase=phase, optimizer=tl["optimizer_name"],
                lora_rank=modes(mode)[0], quantize=modes(mode)[1],
                autocast_cache=tl["autocast_cache"],
                breakdown_gb={k: round(v / GiB, 3) for k, v in parts.items()},
                fits={str(g): fits(value, g) for g in GPUS})


def plan(specs, batches=(1, 2, 4), log=print, formats=QUANTIZED):
    """Every row of the README's table: model x (full + DDP, LoRA + DDP, full + FSDP over 8 ranks) x checkpointing
    on/off x batch x encoders (on the GPU, or --cache), and LoRA on a quantized base in each of formats (the first
    batch size, encoders quantized with it); then, for the first model, the full fine-tune at batch 1 with
    checkpointing as if dpo.pair_loss's autocast cached its bf16 weight copies (what-if rows). specs: the models
    (bench/models.py's spec)."""
    rows, whatif = [], []
    for model in specs:
        tic = time.time()
        enc = {B: encode(model, B) for B in batches}
        log(f"# {model['name']} encoders: {time.time() - tic:.1f} s")
        if not whatif:
            tl = family_timelines(model, "full", [(True, batches[0])], autocast_cache=True)
            whatif = [row(model, "full", 1, True, batches[0], e, tl, enc[batches[0]]) for e in ("gpu", "cache")]
        for mode in ("full", "lora"):
            tic = time.time()
            configs = [(ckpt, B) for ckpt in (True, False) for B in batches]
            tl = family_timelines(model, mode, configs)
            log(f"# {model['name']} {mode}: {len(configs)} steps on shadow tensors in {time.time() - tic:.1f} s")
            for world in ((1, 8) if mode == "full" else (1,)):
                for ckpt, B in configs:
                    for encoders in ("gpu", "cache"):
                        rows.append(row(model, mode, world, ckpt, B, encoders, tl, enc[B]))
        for fmt in formats:
            tic, B = time.time(), batches[0]
            configs, enc_q = [(True, B), (False, B)], encode(model, B, fmt)
            tl = family_timelines(model, f"lora-{fmt}", configs)
            log(f"# {model['name']} lora, {fmt} base: {len(configs)} steps on shadow tensors in "
                f"{time.time() - tic:.1f} s")
            rows += [row(model, f"lora-{fmt}", 1, ckpt, B, e, tl, enc_q) for ckpt, B in configs
                     for e in ("gpu", "offload", "cache")]
    return rows + whatif


def predict(model, args):
    """The peak of the step bench/step.py times (one process, no wrapper, inputs on the device): bytes, phase,
    parts."""
    mode = "full" if not args.lora else f"lora-{args.quantize}" if args.quantize else "lora"
    tl = family_timelines(model, mode, [(args.gradient_checkpointing, args.batch_size)], args)
    return best(tl, tl["windows"][(args.gradient_checkpointing, args.batch_size)])


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


def largest(r, n=3):
    """The phase of a row's peak and its n largest parts: why a configuration needs what it needs."""
    names = {"wrapper": "FSDP units" if r["fsdp_world"] > 1 else "DDP buckets", "casts": "autocast copies"}
    parts = sorted(r["breakdown_gb"].items(), key=lambda kv: (-kv[1], kv[0] != "wrapper"))[:n]
    return f"{r['phase']}: " + ", ".join(f"{names.get(k, k)} {v:.1f}" for k, v in parts)


def smallest_gpu(r):
    """The smallest of GPUS that fits the row, the question a reader of the table asks."""
    ok = [g for g in GPUS if r["fits"][str(g)]]
    return f"{ok[0]} GiB" if ok else "> 80 GiB"


def summary(rows):
    """The README's table: one line per configuration, encoders on the GPU beside --offload_encoders (planned for the
    quantized bases) and --cache, and what fills the peak."""
    lines = ["| model | mode | ranks | ckpt | pairs/rank | peak GiB (encoders on GPU) | fits | peak GiB "
             "(`--offload_encoders`) | fits | peak GiB (`--cache`) | fits | largest parts at the peak (encoders on "
             "GPU), GiB |", "|---" * 12 + "|"]
    by = {(r["model"], r["mode"], r["fsdp_world"], r["gradient_checkpointing"], r["batch_size"], r["encoders"]): r
          for r in rows}
    for key in dict.fromkeys(k[:5] for k in by):
        gpu, off, cached = (by.get(key + (e,)) for e in ("gpu", "offload", "cache"))
        model, mode, world, ckpt, B = key
        cells = [title(model), mode_title(mode),
                 f"FSDP {world}" if world > 1 else "DDP", "on" if ckpt else "off", B]
        for r in (gpu, off, cached):
            cells += [f"{r['peak_gb']:.1f}", smallest_gpu(r)] if r else ["-", "-"]
        cells.append(largest(gpu or cached))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def goals(rows, wanted=GOALS):
    """Each goal of GOALS met (its fastest fitting configuration) or missed (by how much, and what fills the peak)."""
    def said(r):  # a row's configuration, peak, and the GPU memory it needs with fits()'s margins
        P = r["peak_bytes"] / GiB
        return (f"checkpointing {'on' if r['gradient_checkpointing'] else 'off'}, {r['batch_size']} "
                f"pair{'s' if r['batch_size'] > 1 else ''}/rank: {P:.2f} GiB (1.05 P + 0.75 = {1.05 * P + 0.75:.2f})")
    lines = []
    for model, mode, world, encoders, gpu in wanted:
        what = (f"{title(model)} {'full fine-tune' if mode == 'full' else mode_title(mode)}, "
                f"{'FSDP over ' + str(world) + ' ranks' if world > 1 else 'DDP'}, <= {gpu} GB")
        parts = []
        for enc in (encoders if isinstance(encoders, tuple) else (encoders,)) if encoders else ("gpu", "cache"):
            mine = [r for r in rows if not r["autocast_cache"]
                    and (r["model"], r["mode"], r["fsdp_world"], r["encoders"]) == (model, mode, world, enc)]
            if not mine:
                continue
            where = {"gpu": "encoders on the GPU", "offload": "--offload_encoders", "cache": "--cache"}[enc]
            small = min(mine, key=lambda r: r["peak_bytes"])
            ok = [r for r in mine if fits(r["peak_bytes"], gpu)]
            if ok:
                r = max(ok, key=lambda r: (not r["gradient_checkpointing"], r["batch_size"]))
                also = "" if r is small else f"; smallest {said(small)}"
                parts.append(f"{where}: met; fastest fitting {said(r)}{also}")
            else:
                need = 1.05 * small["peak_bytes"] / GiB + 0.75
                parts.append(f"{where}: missed by {need - gpu:.2f} GiB; smallest {said(small)}; at the peak, "
                             f"{largest(small)}")
        if parts:
            lines.append(f"- {what}: " + "; ".join(parts))
    return "\n".join(lines)
