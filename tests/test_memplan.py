"""memplan.py: the byte counter, the shadow tensors, the CUDA kernels' memory, and the plan's parts, on tiny models."""
import json

import pytest
import torch

import bench_step
import dpo
import memplan
import optim
import tiny
import unet as unetlib
from kernels import flash_attention, fused_dpo_loss

# A tiny SDXL-shaped model: 32 px images, 16 x 16 latents (its VAE halves once)
MODEL = dict(name="tiny", unet=tiny.sdxl_unet_config(), resolution=32, vae=dict(block_out_channels=[16, 32]),
             text=[tiny._text_config(1000, "quick_gelu", 32).to_dict(), tiny._text_config(1000, "gelu", 32).to_dict()])
CONFIGS = [(True, 2), (False, 2)]  # (gradient checkpointing, pairs)


@pytest.fixture(scope="module")
def timelines():
    """The tiny model's full and LoRA steps, counted on shadow tensors and on real CPU tensors."""
    return {(mode, shadow): memplan.family_timelines(MODEL, mode, CONFIGS, shadow=shadow, lora_rank=4)
            for mode in ("full", "lora") for shadow in (True, False)}


def test_counter_counts_each_storage_once_rounded_as_cuda():
    c = memplan.Counter(shadow=False)
    with c:
        first = c.mark("a")
        x = torch.empty(10)  # 40 bytes: one 512-byte block
        v = x.view(2, 5)  # a view: no new storage
        y = x + 1  # 512
        z = torch.empty(1000, dtype=torch.bfloat16)  # 2000 bytes -> 2048
        del y
        w = torch.empty(0)  # nothing allocated
        last = c.mark("end")
    assert [c.size[e] for e in c.events if e >= 0] == [512, 512, 2048, 0]
    peak, phase, live = c.replay(first, last)
    assert peak == 512 + 512 + 2048 and phase == "a" and live["activations"] == peak
    assert c.serial(v) == c.serial(x) and c.serial(z) is not None and w.numel() == 0


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_shadow_tensors_count_what_real_tensors_allocate(timelines, mode):
    """The same step on shadow tensors and on real CPU tensors: the same storages, made in the same order (two
    dying together may be freed in either order), the same peaks."""
    s, r = timelines[(mode, True)], timelines[(mode, False)]
    cs, cr = s["counter"], r["counter"]
    assert cs.size == cr.size and cs.kind == cr.kind and len(cs.events) == len(cr.events)
    assert [e for e in cs.events if e >= 0] == [e for e in cr.events if e >= 0]
    assert [p for _, p in cs.marks] == [p for _, p in cr.marks]
    for key in CONFIGS:
        for wrapper, world in (("none", 1), ("ddp", 1), ("fsdp", 8)):
            assert memplan.best(s, s["windows"][key], wrapper, world) == memplan.best(r, r["windows"][key], wrapper,
                                                                                   world)


def test_counter_agrees_with_torch_memtracker(monkeypatch):
    """torch's MemTracker, on real tensors, finds the same peak for one full step (no rounding on the CPU). AdamW
    fused: MemTracker's bookkeeping costs milliseconds per op, and Adafactor's step is thousands of small ops."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Handle:
        def remove(self):
            pass

    for name in ("register_hook", "register_post_accumulate_grad_hook"):  # MemTracker hooks every parameter,
        orig = getattr(torch.Tensor, name)  # frozen ones too, which torch refuses: skip those

        def hook(self, fn, orig=orig):
            return orig(self, fn) if self.requires_grad else Handle()
        monkeypatch.setattr(torch.Tensor, name, hook)
    monkeypatch.setattr(memplan, "ROUND", 1)
    import diffusion
    targs = memplan.settings(MODEL, 2, False)  # no checkpointing: no recomputed forward, half the ops to track
    c = memplan.Counter(shadow=False)
    with memplan.cuda_like(), c:
        policy, ref, trained = memplan.build(MODEL, targs, c)
        opt = optim.build("adamw", trained, targs.lr, targs.weight_decay, fused=True)
        acp = diffusion.alphas_cumprod(diffusion.SD_SCHEDULE)
        z, eps, t = torch.randn(4, 4, 16, 16), torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
        cond = (torch.randn(4, 77, 64), torch.randn(4, 32), torch.randn(4, 6))
        mt = MemTracker()
        mt.track_external(policy, ref, opt)
        first = c.mark("step")
        with mt:
            loss = dpo.pair_loss(policy, ref, z, eps, t, cond, targs, acp, "epsilon")[0]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
        last = c.mark("end")
    theirs = sum(v["Total"] for v in mt.get_tracker_snapshot("peak").values())
    # made before MemTracker started, and not counted by it as a module's input (the time ids reach one as they are)
    inputs = sum(x.numel() * x.element_size() for x in (z, eps, t, acp, *cond) if x.untyped_storage() not in mt._WINFO)
    assert c.replay(first, last)[0] == theirs + inputs


def _no_launch(monkeypatch, module, *kernels):
    """The launchers' own allocations only: the Triton kernels (which allocate nothing on a GPU) are not run."""
    class Grid:
        def __getitem__(self, grid):
            return lambda *a, **k: None
    for k in kernels:
        monkeypatch.setattr(module, k, Grid())
    if hasattr(module, "_launch"):
        monkeypatch.setattr(module, "_launch", lambda *a, **k: None)


def _allocations(fn, *inputs, grad=None):
    """The sizes of what fn allocates, forward then backward, and the peak (on inputs without gradients yet)."""
    for x in inputs:
        x.grad = None
    c = memplan.Counter(shadow=False)
    with c:
        first = c.mark("forward")
        out = fn(*inputs)
        c.mark("backward")
        out.backward(grad if grad is not None else torch.ones_like(out))
        last = c.mark("end")
    return [c.size[e] for e in c.events if e >= 0], c.replay(first, last)[0]


def test_flash_plan_allocates_what_the_triton_kernel_allocates(monkeypatch):
    _no_launch(monkeypatch, flash_attention, "_attn_bwd_preprocess_kernel")
    q, k, v = (torch.randn(2, 3, n, 40, dtype=torch.bfloat16, requires_grad=True) for n in (40, 24, 24))
    do = torch.randn(2, 40, 3, 40, dtype=torch.bfloat16).transpose(1, 2)  # not contiguous, as in the UNet
    kernel = _allocations(lambda *a: flash_attention.FlashAttention.apply(*a, False, 0.25), q, k, v, grad=do)
    plan = _allocations(lambda *a: memplan.FlashPlan.apply(*a, False, 0.25), q, k, v, grad=do)
    assert kernel == plan
    assert 2 * 3 * 40 * 40 * 4 not in kernel[0]  # no L x L matrix (fp32 scores would be this size)


def test_fused_loss_plan_allocates_what_the_triton_kernel_allocates(monkeypatch):
    _no_launch(monkeypatch, fused_dpo_loss, "_dpo_sse_kernel", "_dpo_grad_kernel")
    pred = torch.randn(4, 4, 16, 16, dtype=torch.bfloat16, requires_grad=True)
    ref, noise = torch.randn(4, 4, 16, 16, dtype=torch.bfloat16), torch.randn(2, 4, 16, 16)
    kernel = _allocations(lambda *a: fused_dpo_loss.DPOLoss.apply(*a, 5000.0, {}), pred, ref, noise)
    plan = _allocations(lambda *a: memplan.FusedLossPlan.apply(*a, 5000.0), pred, ref, noise)
    assert kernel == plan


def test_autocast_runs_layer_norm_and_upsampling_in_fp32_as_on_cuda():
    """CUDA autocast's fp32 list has layer_norm and nearest upsampling, CPU autocast's has not; the plan wraps them,
    and no other op of CUDA's lists that CPU autocast lacks sees a bf16 input while the UNets run."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("aten::native_layer_norm", "AutocastCUDA") and not has("aten::native_layer_norm", "AutocastCPU")
    assert has("aten::upsample_nearest2d", "AutocastCUDA") and not has("aten::upsample_nearest2d", "AutocastCPU")
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.layer_norm(x, (4,)).dtype == torch.bfloat16  # CPU autocast alone
        with memplan.cuda_like():
            assert torch.nn.functional.layer_norm(x, (4,)).dtype == torch.float32
            assert torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest").dtype == torch.float32
    seen = set()

    class Watch(memplan.Counter):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            phase = self.marks[-1][1] if self.marks else None
            if phase in ("forward", "reference") and has(func.name(), "AutocastCUDA") \
                    and not has(func.name(), "AutocastCPU") and func.name() != "aten::convolution":
                seen.update(str(a.dtype) for a in memplan.leaves((args, kwargs)) if isinstance(a, torch.Tensor)
                            and a.is_floating_point())
            return super().__torch_dispatch__(func, types, args, kwargs)
    monkey = memplan.Counter
    memplan.Counter = Watch
    try:
        memplan.family_timelines(MODEL, "full", [(True, 1)])
    finally:
        memplan.Counter = monkey
    assert seen == {"torch.float32"}


def test_the_parts_of_the_plan(timelines):
    """Persistent state as counted equals its bytes computed directly; the parallel plans and LoRA cost less."""
    tl, lo = timelines[("full", True)], timelines[("lora", True)]
    a = memplan.allocated
    with torch.device("meta"):
        u = unetlib.UNet(MODEL["unet"])
    weights = sum(a(p.numel() * 4) for p in u.parameters())
    ref = dpo.reference(unetlib.UNet(MODEL["unet"]), "cpu", torch.bfloat16)
    reference = sum(a(p.numel() * p.element_size()) for p in ref.parameters())
    real = unetlib.UNet(MODEL["unet"])  # Adafactor's state after one step, on real tensors
    opt = optim.build("adafactor", real.parameters(), 1e-5, 0.01)
    for p in real.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    state = sum(a(v.numel() * v.element_size()) for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    value, phase, live = memplan.peak(tl, tl["optimizer"])
    assert (live["weights"], live["reference"], live["optimizer"], live["grads"]) == (weights, reference, state,
                                                                                     weights)
    assert tl["trained"] == weights and lo["trained"] < weights / 4
    for t in (tl, lo):
        for key in CONFIGS:
            for wrapper, world in (("none", 1), ("ddp", 1), ("fsdp", 8)):
                value, phase, parts = memplan.peak(t, t["windows"][key], wrapper, world)
                assert sum(parts.values()) == pytest.approx(value)
    ckpt_on, ckpt_off = (memplan.peak(tl, tl["windows"][k])[2]["activations"] for k in CONFIGS)
    assert ckpt_on < ckpt_off
    for key in CONFIGS:
        full = memplan.best(tl, tl["windows"][key], "ddp")[0]
        assert memplan.best(tl, tl["windows"][key], "fsdp", 8)[0] < full
        assert memplan.best(lo, lo["windows"][key], "ddp")[0] < full
    # DDP holds the gradient buckets during the forward too, where no gradient exists without it
    none, ddp = (memplan.peak(tl, tl["windows"][(True, 2)], w) for w in ("none", "ddp"))
    assert ddp[2]["wrapper"] >= weights and ddp[0] > none[0]


def test_plan_cli_writes_the_table_and_json(sdxl_dir, tmp_path, capsys):
    out = tmp_path / "plan.json"
    rows = bench_step.main(["--plan", "--model", sdxl_dir, "--plan_out", str(out), "--plan_batches", "1"])
    text = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(rows))
    main = [r for r in saved if r["autocast_cache"] == dpo.AUTOCAST_CACHE]
    assert len(main) == 3 * 2 * 2 and len(saved) == len(main) + 2  # (full, lora, fsdp-8) x ckpt x encoders
    need = {"model", "mode", "fsdp_world", "gradient_checkpointing", "batch_size", "resolution", "peak_gb"}
    assert all(need <= set(r) for r in saved)
    assert {(r["mode"], r["fsdp_world"]) for r in saved} == {("full", 1), ("lora", 1), ("full", 8)}
    assert all(r["resolution"] == 32 and r["peak_gb"] > 0 and set(r["fits"]) == {str(g) for g in memplan.GPUS}
               for r in saved)
    by = {(r["mode"], r["fsdp_world"], r["gradient_checkpointing"], r["encoders"]): r for r in main}
    assert by[("full", 1, True, "gpu")]["peak_gb"] > by[("full", 1, True, "cache")]["peak_gb"]
    assert text.count("| model | mode | fsdp_world | ckpt | batch | res | encoders | peak GiB |") == 2
    assert sum(line.startswith(f"| {saved[0]['model']} |") for line in text.splitlines()) == len(saved)
