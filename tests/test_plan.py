"""bench/plan.py on tiny models: shadow tensors count what real ones allocate (UNets and the flow transformers, and
the online step's sampling in bench/plan_online.py), torch's MemTracker agrees, CUDA's autocast and kernels stood in
for on the CPU, the plan's parts, FSDP's units and the encoders of the flow families, and the --plan command."""
import json

import pytest
import torch

import cache
import clip
import dpo
import families
import optim
import parallel
import t5
import tiny
import unet as unetlib
import qwen_vae
import tiny_qwen
import vae as vaelib
from bench import models, shadow
from bench import plan
from bench import plan_online
from bench import step as bench_step

# A tiny SDXL-shaped model: 32 px images, 16 x 16 latents (its VAE halves once); its spec as bench/models.py makes them
TEXT = [tiny._text_config(1000, "quick_gelu", 32).to_dict(), tiny._text_config(1000, "gelu", 32).to_dict()]
MODEL = dict(name="tiny", title="tiny", family=families.SDXL, config=tiny.sdxl_unet_config(), resolution=32,
             vae=dict(vaelib.FULL_CONFIG, block_out_channels=[16, 32]), text=TEXT, lengths=[77, 77], path=None)
CONFIGS = [(True, 2), (False, 2)]  # (gradient checkpointing, pairs)
# Tiny SD3.5- and FLUX-dev-shaped models at 32 px (16 x 16 latents, 64 image tokens), 8 T5 tokens
T5_TINY = dict(t5.XXL, vocab_size=64, d_model=tiny.T5_WIDTH, d_kv=8, d_ff=40, num_layers=2, num_heads=4)
VAE_TINY = dict(vaelib.FULL_CONFIG, block_out_channels=[16, 32], latent_channels=16, use_quant_conv=False,
                use_post_quant_conv=False, layers_per_block=1, norm_num_groups=8)
FLOW = {"sd3": dict(MODEL, name="tiny-sd3", title="tiny-sd3", family=families.SD3, text=TEXT + [T5_TINY],
                    lengths=[77, 77, 8], vae=VAE_TINY,
                    config=dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=tiny.T5_WIDTH, caption_projection_dim=32,
                                pooled_projection_dim=64, out_channels=16, pos_embed_max_size=32, qk_norm="rms_norm",
                                dual_attention_layers=(0,))),
        "flux": dict(MODEL, name="tiny-flux", title="tiny-flux", family=families.FLUX, text=TEXT[:1] + [T5_TINY],
                     lengths=[77, 8], vae=VAE_TINY,
                     config=dict(in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=tiny.T5_WIDTH, pooled_projection_dim=32,
                                 guidance_embeds=True, axes_dims_rope=(4, 6, 6))),
        # Qwen-Image's causal VAE downsamples by 8 (4 x 4 latents) and its template's 34 tokens are dropped (8 left)
        "qwen-image": dict(MODEL, name="tiny-qwen-image", title="tiny-qwen-image", family=families.QWEN_IMAGE,
                           text=[dict(tiny_qwen.QWEN25_VL_TINY, model_type="qwen2_5_vl")], lengths=[42],
                           vae=dict(qwen_vae.DEFAULTS, **tiny_qwen.QWEN_VAE),
                           config=dict(tiny_qwen.QWEN_IMAGE_TINY, joint_attention_dim=512)),
        "z-image": dict(MODEL, name="tiny-z-image", title="tiny-z-image", family=families.Z_IMAGE,
                        text=[dict(tiny_qwen.QWEN3_TINY, model_type="qwen3")], lengths=[8], vae=VAE_TINY,
                        config=dict(tiny_qwen.Z_IMAGE_TINY, in_channels=16, cap_feat_dim=48))}
LLM_FAMS = ["qwen-image", "z-image"]

# The tiny SDXL with a VAE that decodes, and a tiny CLIP scorer (an open_clip config, as reward.VIT_H_14 is PickScore's)
ONLINE = dict(MODEL, vae=dict(vaelib.FULL_CONFIG, block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8))
SCORER = {"embed_dim": 16, "vision_cfg": dict(image_size=16, layers=1, width=32, head_width=16, patch_size=8),
          "text_cfg": dict(context_length=77, vocab_size=1000, width=32, heads=2, layers=1)}


@pytest.fixture(scope="module")
def timelines():
    """The tiny model's full and LoRA steps, counted on shadow tensors and on real CPU tensors."""
    return {(mode, shadows): plan.family_timelines(MODEL, mode, CONFIGS, shadow=shadows, lora_rank=4)
            for mode in ("full", "lora") for shadows in (True, False)}


@pytest.fixture(scope="module")
def flow_timelines():
    """The tiny flow models' full and LoRA steps, counted on shadow tensors and on real CPU tensors."""
    return {(fam, mode, shadows): plan.family_timelines(FLOW[fam], mode, CONFIGS, shadow=shadows, lora_rank=4)
            for fam in FLOW for mode in ("full", "lora") for shadows in (True, False)}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_shadow_tensors_count_what_real_tensors_allocate(timelines, mode):
    """The same step on shadow tensors and on real CPU tensors: the same storages, made in the same order (two
    dying together may be freed in either order), the same peaks."""
    same_counts(timelines[(mode, True)], timelines[(mode, False)])


@pytest.mark.parametrize("fam", ["sd3", "flux"] + LLM_FAMS)
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_flow_step_on_shadows_counts_what_real_tensors_allocate(flow_timelines, fam, mode):
    """dpo.train's flow step (sigma, velocity, guidance) counts on shadows what it allocates on real tensors."""
    s, r = flow_timelines[(fam, mode, True)], flow_timelines[(fam, mode, False)]
    same_counts(s, r)
    assert s["optimizer_name"] == "adamw"  # dpo.resolve's recipe for the flow transformers


def same_counts(s, r):
    """Two timelines of one step count the same storages in the same order and give the same peaks."""
    cs, cr = s["counter"], r["counter"]
    assert cs.size == cr.size and cs.kind == cr.kind and len(cs.events) == len(cr.events)
    assert [e for e in cs.events if e >= 0] == [e for e in cr.events if e >= 0]
    assert [p for _, p in cs.marks] == [p for _, p in cr.marks]
    for key in CONFIGS:
        for wrapper, world in (("none", 1), ("ddp", 1), ("fsdp", 8)):
            assert plan.best(s, s["windows"][key], wrapper, world) == plan.best(r, r["windows"][key], wrapper,
                                                                                      world)


def live_at(counter, mark):
    """Bytes per kind alive when a mark opens."""
    live = dict.fromkeys(shadow.KINDS, 0)
    for e in counter.events[:counter.marks[mark][0]]:
        s = e if e >= 0 else ~e
        live[counter.kind[s]] += counter.size[s] if e >= 0 else -counter.size[s]
    return live


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_online_sampling_on_shadows_counts_what_real_tensors_allocate(timelines, mode):
    """online.Feed.generate's phase (text encoders, CFG denoising at 2K, the VAE decode, a CLIP scorer) counts on
    shadows what it allocates on real CPU tensors; it starts from what the training step holds between steps plus
    the encoders and the scorer; the online peak is the larger of the sampling and the training peaks."""
    s, r = (plan_online.sampler_timeline(ONLINE, mode, K=2, shadow=sh, lora_rank=4, scorer=SCORER)
            for sh in (True, False))
    cs, cr = s["counter"], r["counter"]
    assert len(cs.size) == len(cr.size) and cs.kind == cr.kind
    assert [e for e in cs.events if e >= 0] == [e for e in cr.events if e >= 0]
    assert [p for _, p in cs.marks] == [p for _, p in cr.marks]
    assert plan_online.sampler_peak(s) == plan_online.sampler_peak(r)
    # the scorer's bf16 layer norms (outside autocast): CUDA's kernel and the meta one keep fp32 mean and rstd, the
    # CPU's bf16 ones; those storages, made and freed while scoring, are the only ones that differ
    made = {e: i for i, e in enumerate(cs.events) if e >= 0}
    differ = [k for k, (a, b) in enumerate(zip(cs.size, cr.size)) if a != b]
    assert all(made[k] >= cs.marks[s["window"][0] + 3][0] and cs.size[k] > cr.size[k] for k in differ)
    assert s["batch"] == 4 and [p for _, p in cs.marks[s["window"][0]:]] == ["conditions", "denoise", "decode",
                                                                             "score", "idle"]
    tl = timelines[(mode, True)]
    start, train = live_at(cs, s["window"][0]), live_at(tl["counter"], tl["windows"][(True, 2)][0])
    assert all(start[k] == train[k] for k in ("weights", "reference", "optimizer", "grads"))
    with torch.device("meta"):
        clip_model = plan_online.reward.CLIPModel(*plan_online.reward.from_open_clip(SCORER))
    assert s["scorer"] == sum(shadow.allocated(p.numel() * 2) for p in clip_model.parameters())
    assert start["encoders"] == plan.encode(ONLINE, 1)[0] + s["scorer"] and s["trained"] == tl["trained"]
    value, phase, parts = plan_online.sampler_peak(s)
    assert sum(parts.values()) == pytest.approx(value) and parts["wrapper"] == tl["trained"]
    row = plan_online.row(ONLINE, mode, s, plan_online.training_row(ONLINE, mode, s))
    assert row["sampling_bytes"] == int(value) and row["peak_bytes"] == max(row["sampling_bytes"],
                                                                            row["training_bytes"])
    assert row["training_bytes"] == plan_online.training_row(ONLINE, mode, s)["peak_bytes"] + s["scorer"]
    assert row["fits"] == {str(g): plan.fits(row["peak_bytes"], g) for g in plan.GPUS}


def test_online_sampling_holds_autocast_copies_until_the_decode():
    """With autocast's cache (torch's default, a what-if: online.py turns it off) a bf16 copy of each fp32 weight
    lives through the denoising loop, freed before the VAE decodes; without it only a few copies live at once."""
    casts = dict.fromkeys(shadow.KINDS, 0.0) | {"casts": 1.0}
    held = {}
    for cached in (True, False):
        s = plan_online.sampler_timeline(ONLINE, "full", K=2, lora_rank=4, scorer=SCORER, autocast_cache=cached)
        c, (first, last) = s["counter"], s["window"]
        held[cached] = c.replay(first, last, casts)[0]
        assert live_at(c, first + 2)["casts"] == 0  # the decode's mark: autocast has exited
    assert held[True] > 4 * held[False] > 0
    assert held[True] >= 0.9 * s["trained"] / 2  # nearly every fp32 weight is a matmul's or a convolution's


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
    targs = plan.settings(MODEL, 2, False)  # no checkpointing: no recomputed forward, half the ops to track
    c = shadow.Counter(shadow=False)
    with plan.cuda_like(), c:
        policy, ref, trained = plan.build(MODEL, targs, c)
        opt = optim.build("adamw", trained, targs.lr, targs.weight_decay, fused=True)
        acp = diffusion.alphas_cumprod(families.SD_SCHEDULE)
        z, eps, t = torch.randn(4, 4, 16, 16), torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
        cond = (torch.randn(4, 77, 64), torch.randn(4, 32), torch.randn(4, 6))
        mt = MemTracker()
        mt.track_external(policy, ref, opt)
        first = c.mark("step")
        with mt:
            loss = dpo.pair_loss(policy, ref, dict(z=z, eps=eps, t=t, T=1000, cond=cond),
                                 dpo.objective("dpo", targs.beta), "epsilon", acp, targs.amp_dtype)[0]
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
        with plan.cuda_like():
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
    monkey = plan.Counter
    plan.Counter = Watch
    try:
        plan.family_timelines(MODEL, "full", [(True, 1)])
    finally:
        plan.Counter = monkey
    assert seen == {"torch.float32"}


def test_the_parts_of_the_plan(timelines):
    """Persistent state as counted equals its bytes computed directly; the parallel plans and LoRA cost less."""
    tl, lo = timelines[("full", True)], timelines[("lora", True)]
    a = shadow.allocated
    with torch.device("meta"):
        u = unetlib.UNet(MODEL["config"])
    weights = sum(a(p.numel() * 4) for p in u.parameters())
    ref = dpo.reference(unetlib.UNet(MODEL["config"]), torch.bfloat16)
    reference = sum(a(p.numel() * p.element_size()) for p in ref.parameters())
    real = unetlib.UNet(MODEL["config"])  # Adafactor's state after one step, on real tensors
    opt = optim.build("adafactor", real.parameters(), 1e-5, 0.01)
    for p in real.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    state = sum(a(v.numel() * v.element_size()) for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    value, phase, live = plan.peak(tl, tl["optimizer"])
    assert (live["weights"], live["reference"], live["optimizer"], live["grads"]) == (weights, reference, state,
                                                                                      weights)
    assert tl["trained"] == weights and lo["trained"] < weights / 4
    for t in (tl, lo):
        for key in CONFIGS:
            for wrapper, world in (("none", 1), ("ddp", 1), ("fsdp", 8)):
                value, phase, parts = plan.peak(t, t["windows"][key], wrapper, world)
                assert sum(parts.values()) == pytest.approx(value)
    ckpt_on, ckpt_off = (plan.peak(tl, tl["windows"][k])[2]["activations"] for k in CONFIGS)
    assert ckpt_on < ckpt_off
    for key in CONFIGS:
        full = plan.best(tl, tl["windows"][key], "ddp")[0]
        assert plan.best(tl, tl["windows"][key], "fsdp", 8)[0] < full
        assert plan.best(lo, lo["windows"][key], "ddp")[0] < full
    # DDP holds the gradient buckets during the forward too, where no gradient exists without it
    none, ddp = (plan.peak(tl, tl["windows"][(True, 2)], w) for w in ("none", "ddp"))
    assert ddp[2]["wrapper"] >= weights and ddp[0] > none[0]


@pytest.mark.parametrize("fam", ["sd3", "flux"] + LLM_FAMS)
def test_fsdp_units_of_flow_models_are_the_blocks_parallel_shard_wraps(flow_timelines, fam):
    """The units the plan gathers are the ones parallel.shard makes, once each, in forward order; the root the rest."""
    from torch.distributed.fsdp import FSDPModule
    parallel.setup("cpu")  # a 1-process gloo group, as dpo.train makes one
    model = FLOW[fam]["family"].model(FLOW[fam]["config"])
    sizes = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_modules()}
    parallel.shard(model, torch.bfloat16, FLOW[fam]["family"].blocks)
    units = [name for name, m in model.named_modules() if isinstance(m, FSDPModule) and m is not model]
    tl = flow_timelines[(fam, "full", True)]
    assert len(units) == {"sd3": 2, "flux": 4, "qwen-image": 2, "z-image": 4}[fam] and tl["unit_names"] == units
    assert tl["units"] == [sizes[n] for n in units] and tl["root"] == sizes[""] - sum(tl["units"])


@pytest.mark.parametrize("fam", ["sd3", "flux"] + LLM_FAMS)
def test_flow_encoders_are_what_clip_load_holds_and_none_with_cache(request, fam, capsys):
    """Encoders on the GPU weigh what clip.load + vae.load hold and give the step's input shapes; --cache has none."""
    root = request.getfixturevalue({"sd3": "sd3_dir", "flux": "flux_dir", "qwen-image": "qwen_image_dir",
                                    "z-image": "z_image_dir"}[fam])
    native = models.spec(root)["resolution"]  # SD3's sample_size x 8 (x 2 here); FLUX's: 1024, as dpo.py
    spec = models.spec(root, 32)  # bench/step.py --plan --model FOLDER: the folder's own configs
    assert spec["family"].name == fam and native == {"sd3": 32}.get(fam, 1024)
    te, v = clip.load(root, "cpu", torch.bfloat16), vaelib.load(root, "cpu", torch.float32)
    held = sum(shadow.allocated(p.numel() * p.element_size()) for p in [*te.parameters(), *v.parameters()])
    enc = plan.encode(spec, 2)
    assert enc[0] == held and enc[1] > 0 and len(te.encoders) == len(spec["text"])
    args = plan.settings(spec, 2, True)
    batch = {"pixels": torch.zeros(2, 2, 3, 32, 32), "caption": ["a photo", "a cat"], "time_ids": torch.zeros(2, 2, 6)}
    z, cond = cache.model_inputs(batch, torch.tensor([False, True]), torch.device("cpu"), spec["family"],
                                 (te.float(), v), guidance=args.guidance)
    mz, eps, t, mcond = models.inputs(spec, 2, guidance=args.guidance)
    lengths = (lambda c: c.shape[:1] + c.shape[2:]) if fam in LLM_FAMS else (lambda c: c.shape)  # (a language
    assert mz.shape == z.shape and [lengths(c) for c in mcond] == [lengths(c) for c in cond]  # model's: the batch's)
    assert eps.shape == (2, *z.shape[1:]) and t.dtype == torch.float32  # one sigma per pair
    tl = plan.family_timelines(spec, "lora", [(True, 2)], lora_rank=4)
    for wrapper, world in (("ddp", 1), ("fsdp", 8)):
        gpu, cached = (plan.best(tl, tl["windows"][(True, 2)], wrapper, world, e) for e in (enc, None))
        assert cached[2]["encoders"] == 0 and gpu[2]["encoders"] >= enc[0] and gpu[0] >= cached[0] + enc[0]
        rows = [plan.row(spec, "lora", world, True, 2, e, tl, enc) for e in ("gpu", "cache")]
        assert [r["peak_bytes"] for r in rows] == [int(gpu[0]), int(cached[0])]
    rows = bench_step.main(["--plan", "--model", root, "--resolution", "32", "--plan_batches", "2"])
    # full (DDP, FSDP) and LoRA x ckpt x encoders, the what-ifs, LoRA on each quantized base x ckpt x 3 encoders
    assert len(rows) == 3 * 2 * 2 + 2 + 3 * 2 * 3 and "| model | mode | ranks |" in capsys.readouterr().out
    by = {(r["mode"], r["fsdp_world"], r["gradient_checkpointing"], r["encoders"], r["autocast_cache"]): r
          for r in rows}
    assert all(r["peak_bytes"] >= by[k[:3] + ("cache", k[4])]["peak_bytes"] + enc[0] for k, r in by.items()
               if k[3] == "gpu" and k[0] in ("full", "lora"))
    for fmt in plan.QUANTIZED:  # a quantized base: its encoders quantized too; offloaded, they cost only at the inputs
        gpu, off, cached = (by[(f"lora-{fmt}", 1, True, e, False)] for e in ("gpu", "offload", "cache"))
        assert cached["peak_bytes"] <= off["peak_bytes"] <= gpu["peak_bytes"] <= by[("lora", 1, True, "gpu", False)][
            "peak_bytes"]  # (the tiny model's widths are not nf4's: the fp8 and int8 rows are smaller)
        assert gpu["quantize"] == fmt and gpu["lora_rank"] == plan.LORA_RANK
    assert by[("lora-fp8", 1, True, "gpu", False)]["peak_bytes"] < by[("lora", 1, True, "gpu", False)]["peak_bytes"]


def test_plan_cli_writes_the_table_and_json(sdxl_dir, tmp_path, capsys):
    out = tmp_path / "plan.json"
    rows = bench_step.main(["--plan", "--model", sdxl_dir, "--plan_out", str(out), "--plan_batches", "1"])
    text = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(rows))
    main = [r for r in saved if not r["autocast_cache"]]  # dpo.pair_loss's: no autocast weight cache
    # (full, lora, fsdp-8) x ckpt x encoders, and LoRA on each quantized base x ckpt x (gpu, offload, cache)
    assert len(main) == 3 * 2 * 2 + 3 * 2 * 3 and len(saved) == len(main) + 2
    need = {"model", "mode", "fsdp_world", "gradient_checkpointing", "batch_size", "resolution", "peak_gb"}
    assert all(need <= set(r) for r in saved)
    assert {(r["mode"], r["fsdp_world"]) for r in saved} == {("full", 1), ("lora", 1), ("full", 8)} | {
        (f"lora-{f}", 1) for f in plan.QUANTIZED}
    assert all(r["resolution"] == 32 and r["peak_gb"] > 0 and set(r["fits"]) == {str(g) for g in plan.GPUS}
               for r in saved)
    by = {(r["mode"], r["fsdp_world"], r["gradient_checkpointing"], r["encoders"]): r for r in main}
    assert by[("full", 1, True, "gpu")]["peak_gb"] > by[("full", 1, True, "cache")]["peak_gb"]
    assert text.count("| model | mode | fsdp_world | ckpt | batch | res | encoders | peak GiB |") == 2
    # the two tables of every row, then the README's, one line per configuration with both encoder settings, then
    # the online rows (full and LoRA, each with the what-ifs)
    online = 2 * (1 + len(plan_online.WHATIFS)) + 1  # (LoRA on an nf4 base: no what-ifs)
    configurations = len({(r["mode"], r["fsdp_world"], r["gradient_checkpointing"], r["batch_size"]) for r in main})
    assert sum(line.startswith(f"| {saved[0]['model']} |") for line in text.splitlines()) == len(saved) + \
        configurations + online
    assert text.count("| model | mode | ranks | ckpt | pairs/rank | peak GiB (encoders on GPU) | fits |") == 1
    assert text.count("| model | mode | samples (denoiser batch) | sampling peak GiB |") == 1  # the online rows


@pytest.mark.slow
def test_the_flow_rows_of_the_real_models():
    """The real flow models' rows: a line per goal, fp32 master weights as counted, FSDP / LoRA / --cache cheaper."""
    names = ("sd35-medium", "sd35-large", "flux-dev")
    rows = plan.plan([models.spec(m) for m in names], batches=(1,), log=lambda msg: None)
    assert len(plan.goals(rows).splitlines()) == len([g for g in plan.GOALS if g[0] in names])
    by = {(r["model"], r["mode"], r["fsdp_world"], r["gradient_checkpointing"], r["encoders"]): r for r in rows
          if not r["autocast_cache"]}
    for m in names:
        spec = models.spec(m)
        with torch.device("meta"):
            net = spec["family"].model(spec["config"])
        fp32 = sum(shadow.allocated(p.numel() * 4) for p in net.parameters()) / plan.GiB
        full, fsdp, lo = (by[(m, mode, world, True, "gpu")] for mode, world in (("full", 1), ("full", 8), ("lora", 1)))
        assert full["breakdown_gb"]["weights"] == pytest.approx(fp32, abs=1e-3)
        assert fsdp["peak_bytes"] < full["peak_bytes"] and lo["peak_bytes"] < full["peak_bytes"]
        assert by[(m, "lora", 1, True, "cache")]["peak_bytes"] < lo["peak_bytes"]


@pytest.mark.slow
def test_rl_rows_are_online_dpos_phases_with_the_trained_step_and_nfts_old_policy():
    """GRPO and NFT sample as online DPO does; a micro-step trains K x batch images (the training plan's step at half
    as many pairs); NFT holds its old policy, a copy of the trained tensors, through both phases."""
    online = plan_online.plan([ONLINE], log=lambda msg: None)
    rows = plan_online.rl_rows([ONLINE], online, log=lambda msg: None)
    modes = ("full", "lora", "lora-nf4")
    assert {(r["mode"], r["loss"]) for r in rows} == {(m, x) for m in modes for x in ("grpo", "nft")}
    for mode in modes:
        grpo, nft = (next(r for r in rows if (r["mode"], r["loss"]) == (mode, x)) for x in ("grpo", "nft"))
        tl = plan_online.sampler_timeline(ONLINE, mode)
        train = plan_online.training_row(ONLINE, mode, dict(tl, batch_size=max(1, tl["batch"] // 2)))
        assert grpo["training_gb"] == round((train["peak_bytes"] + tl["scorer"]) / 2 ** 30, 3)
        assert grpo["old_policy_gb"] == 0 and nft["old_policy_gb"] == round(tl["trained"] / 2 ** 30, 3) > 0
        assert nft["peak_bytes"] - grpo["peak_bytes"] == tl["trained"]
        dpo_row = next(r for r in online if r["mode"] == mode and not plan_online.whatif(r))
        assert grpo["sampling_gb"] == dpo_row["sampling_gb"] and grpo["peak_bytes"] >= dpo_row["sampling_bytes"]
