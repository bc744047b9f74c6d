"""memplan.py on tiny models: shadow tensors count what real ones allocate, torch's MemTracker agrees, CUDA's autocast
and kernels stood in for on the CPU, the plan's parts, and the --plan command."""
import json

import pytest
import torch

import bench_step
import dpo
import memplan
import optim
import shadow
import tiny
import unet as unetlib

# A tiny SDXL-shaped model: 32 px images, 16 x 16 latents (its VAE halves once)
MODEL = dict(name="tiny", unet=tiny.sdxl_unet_config(), resolution=32, vae=dict(block_out_channels=[16, 32]),
             text=[tiny._text_config(1000, "quick_gelu", 32).to_dict(), tiny._text_config(1000, "gelu", 32).to_dict()])
CONFIGS = [(True, 2), (False, 2)]  # (gradient checkpointing, pairs)


@pytest.fixture(scope="module")
def timelines():
    """The tiny model's full and LoRA steps, counted on shadow tensors and on real CPU tensors."""
    return {(mode, shadows): memplan.family_timelines(MODEL, mode, CONFIGS, shadow=shadows, lora_rank=4)
            for mode in ("full", "lora") for shadows in (True, False)}


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
    monkeypatch.setattr(shadow, "ROUND", 1)
    import diffusion
    targs = memplan.settings(MODEL, 2, False)  # no checkpointing: no recomputed forward, half the ops to track
    c = shadow.Counter(shadow=False)
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
            loss = dpo.pair_loss(policy, ref, dict(z=z, eps=eps, t=t, T=1000, cond=cond), targs, acp, "epsilon")[0]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
        last = c.mark("end")
    theirs = sum(v["Total"] for v in mt.get_tracker_snapshot("peak").values())
    # made before MemTracker started, and not counted by it as a module's input (the time ids reach one as they are)
    inputs = sum(x.numel() * x.element_size() for x in (z, eps, t, acp, *cond) if x.untyped_storage() not in mt._WINFO)
    assert c.replay(first, last)[0] == theirs + inputs


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

    class Watch(shadow.Counter):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            phase = self.marks[-1][1] if self.marks else None
            if phase in ("forward", "reference") and has(func.name(), "AutocastCUDA") \
                    and not has(func.name(), "AutocastCPU") and func.name() != "aten::convolution":
                seen.update(str(a.dtype) for a in shadow.leaves((args, kwargs)) if isinstance(a, torch.Tensor)
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
    a = shadow.allocated
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
