"""bench/step.py: runs both impls at toy size on CPU (UNets and the flow transformers, LoRA through peft), the two
impls time the same work (same loss, same update), the released configs are the released models, and it refuses what
cannot fit."""
import math
import sys

import pytest
import torch

from bench import models
from bench import step as bench_step

TINY = ["--resolution", "32", "--steps", "2", "--warmup", "1", "--dtype", "fp32", "--device", "cpu"]


def _rows(out):
    """impl -> the numbers of its table row (s/step, pairs/s, s/pair, GFLOP/fwd, MFU%, peak GiB, plan GiB, loss@0)."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("impl "))
    rows = {}
    for line in lines[head + 1:]:
        f = line.split()
        if f and f[0] in ("ours", "diffusers"):
            rows[f[0]] = f[1:]
    return rows



def _same_step(step_o, step_d, inputs, pol_o, pol_d, before, theirs, off_log2):
    """Ours and diffusers' step on the same inputs: the same loss (not step 0's log 2) and gradient norm, and the
    same update of every trained tensor (before: ours before the step; theirs: our key -> diffusers' key)."""
    loss_o, norm_o = step_o(*inputs)
    loss_d, norm_d = step_d(*inputs)
    assert abs(loss_o.item() - math.log(2)) > off_log2  # not the trivial step-0 value
    assert loss_o.item() == pytest.approx(loss_d.item(), rel=1e-4, abs=1e-5)
    assert norm_o.item() == pytest.approx(norm_d.item(), rel=1e-3)
    after_o, after_d = pol_o.state_dict(), pol_d.state_dict()
    d_o = torch.cat([(after_o[k] - before[k]).flatten() for k in before])  # one step's update, every trained tensor
    d_d = torch.cat([(after_d[theirs[k]] - before[k]).flatten() for k in before])
    assert d_o.abs().max() > 1e-4  # the step really moved the weights
    assert (d_o - d_d).norm() / d_o.norm() < 1e-3

def test_bench_runs_both_impls_on_the_tiny_sdxl(sdxl_dir, capsys, tmp_path):
    csv = tmp_path / "b.csv"
    rows = bench_step.main(["--model", sdxl_dir, *TINY, "--csv", str(csv)])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("# ") and f"torch {torch.__version__}" in lines[0] and "triton" in lines[0]
    assert lines[1] == f"# python bench/step.py --model {sdxl_dir} {' '.join(TINY)} --csv {csv}"
    assert all(s in lines[2] for s in ("SDXL-shaped UNet, 32px (16x16 latents)", "adafactor", "checkpointing on"))
    table = _rows(out)
    assert set(table) == {"ours", "diffusers"}
    for impl, f in table.items():
        s_step, pairs_s, s_pair, gflop, mfu, peak, plan, loss0 = f
        assert float(s_step) > 0 and float(pairs_s) == pytest.approx(1 / float(s_step), rel=1e-2)
        assert all(math.isfinite(float(x)) for x in (s_step, pairs_s, s_pair, gflop, mfu, loss0))
        assert float(gflop) > 0 and peak == "-"  # no CUDA: no peak memory
        assert (float(plan) > 0) if impl == "ours" else plan == "-"  # memplan's prediction of our step
        assert float(loss0) == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    # same architecture, same inputs: the same FLOP count (convs and linears; SDPA is not counted on CPU)
    assert table["ours"][3] == table["diffusers"][3]
    assert "speedup ours/diffusers:" in out
    assert [r["impl"] for r in rows] == ["ours", "diffusers"]
    assert all(r["loss0"] == pytest.approx(math.log(2), abs=1e-6) for r in rows)
    text = csv.read_text().splitlines()
    assert len(text) == 3 and text[0].startswith("date,") and ",ours," in text[1] and ",diffusers," in text[2]


def test_diffusers_missing_skips_the_baseline(sdxl_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    bench_step.main(["--model", sdxl_dir, *TINY, "--steps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "diffusers baseline skipped: cannot import diffusers" in out
    assert set(_rows(out)) == {"ours"} and "speedup" not in out


@pytest.mark.parametrize("argv, msg", [(["--impl", "ours,flax"], "--impl takes ours and/or diffusers"),
                                       (["--steps", "0"], "--steps must be >= 1"),
                                       (["--resolution", "36"], "not divisible by the UNet's 4")])
def test_bad_flags_one_line(sdxl_dir, capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        bench_step.main(["--model", sdxl_dir, "--device", "cpu", *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and err.startswith("error: ") and msg in err and "\n" not in err


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_ours_and_diffusers_do_the_same_step(family, request):
    """Same weights in both (strict state_dict load), policy != reference: the same loss, gradient norm and update."""
    model = request.getfixturevalue(f"{family}_dir")
    spec, dev, sdxl = models.spec(model, 32), torch.device("cpu"), family == "sdxl"
    targs = bench_step.settings(bench_step.parse_args(["--model", model, *TINY]), spec, "cpu")
    # dpo.py's recipes: SDXL Adafactor + checkpointing, SD1.5 AdamW
    recipe = ("adafactor", True) if sdxl else ("adamw", False)
    assert (targs.optimizer, targs.gradient_checkpointing, targs.beta) == recipe + (5000.0,)
    targs.lr = 1e-3  # an update well above fp32 rounding of the weights
    torch.manual_seed(0)
    pol_o, ref_o, step_o, _ = bench_step.build("ours", spec, dev, targs)
    pol_d, ref_d, step_d, _ = bench_step.build("diffusers", spec, dev, targs)
    assert type(pol_d).__name__ == "UNet2DConditionModel" and type(pol_d).__module__.startswith("diffusers.")
    assert pol_d.is_gradient_checkpointing == sdxl and not ref_d.training
    assert not any(p.requires_grad for p in ref_d.parameters())
    with torch.no_grad():
        for p in pol_o.parameters():
            p.add_(torch.randn_like(p) * 1e-3)  # the policy moves away from the reference
    pol_d.load_state_dict(pol_o.state_dict(), strict=True)
    ref_d.load_state_dict(ref_o.state_dict(), strict=True)
    before = {k: v.clone() for k, v in pol_o.state_dict().items()}
    z, eps, t, cond = models.inputs(spec, 2, dev, torch.Generator().manual_seed(0))  # 2 pairs, 16x16 latents
    _same_step(step_o, step_d, (z, eps, t, cond), pol_o, pol_d, before, {k: k for k in before}, 1e-2)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_bench_runs_both_impls_on_the_tiny_flow_models(family, request, capsys, tmp_path, one_thread):
    """A flow transformer's LoRA step, ours and diffusers' (peft), on the real pipelines' text lengths: one row each
    in the table and the CSV, log 2 at step 0, the same FLOP count."""
    model, csv = request.getfixturevalue(f"{family}_dir"), tmp_path / "b.csv"
    rows = bench_step.main(["--model", model, *TINY, "--lora", "4", "--csv", str(csv)])
    out = capsys.readouterr().out
    name, text = {"sd3": ("SD3", 333), "flux": ("FLUX", 512)}[family]  # SD3: 77 CLIP + 256 T5; FLUX-dev: 512 T5
    head = f"{name}-shaped transformer, 32px (16x16 latents, 64 image + {text} text"
    assert head in out.splitlines()[2] and "LoRA rank 4, adamw, checkpointing on" in out.splitlines()[2]
    assert "baseline skipped" not in out and "speedup ours/diffusers:" in out
    table = _rows(out)
    assert set(table) == {"ours", "diffusers"} and table["ours"][3] == table["diffusers"][3]  # GFLOP/fwd
    assert [r["impl"] for r in rows] == ["ours", "diffusers"]
    assert all(r["loss0"] == pytest.approx(math.log(2), abs=1e-6) and r["gflop_fwd"] > 0 for r in rows)
    lines = csv.read_text().splitlines()
    assert len(lines) == 3 and ",ours," in lines[1] and ",diffusers," in lines[2] and "--lora 4" in lines[1]


def _peft_names(sd, adapted):
    """Our LoRA policy's state dict in peft's names: base_layer.weight, lora_A.default.weight, ..."""
    out = {}
    for k, v in sd.items():
        layer, _, param = k.rpartition(".")
        if layer.endswith((".lora_A", ".lora_B")) and layer.rpartition(".")[0] in adapted:
            out[f"{layer}.default.{param}"] = v
        else:
            out[f"{layer}.base_layer.{param}" if layer in adapted else k] = v
    return out


@pytest.mark.parametrize("family", ["sd3", "flux", "qwen_image", "z_image"])
@pytest.mark.parametrize("rank", [None, 4])
def test_ours_and_diffusers_do_the_same_flow_step(family, rank, request, one_thread):
    """Our transformer (dpo.pair_loss) and diffusers' (eq. 14 written out; LoRA through peft on the same layers), the
    same weights, policy != reference: the same loss, gradient norm and update (full fine-tune and LoRA)."""
    from peft.tuners.lora import LoraLayer

    import lora
    model, dev = request.getfixturevalue(f"{family}_dir"), torch.device("cpu")
    opts = bench_step.parse_args(["--model", model, *TINY, *(["--lora", str(rank)] if rank else [])])
    spec = models.spec(model, 32)
    targs = bench_step.settings(opts, spec, "cpu")
    assert spec["family"].name == family.replace("_", "-")
    assert (targs.optimizer, targs.gradient_checkpointing, targs.beta) == ("adamw", True, 100.0)
    assert targs.guidance == (3.5 if family == "flux" else None)  # FLUX-dev's guidance input, as dpo.py trains it
    targs.lr = 1e-3
    pol_o, ref_o, step_o, _ = bench_step.build("ours", spec, dev, targs)
    pol_d, ref_d, step_d, _ = bench_step.build("diffusers", spec, dev, targs)
    assert type(pol_d).__module__.startswith("diffusers.") and pol_d.is_gradient_checkpointing
    adapted = set(lora.layers(pol_o))
    assert adapted == {n for n, m in pol_d.named_modules() if isinstance(m, LoraLayer)} and bool(adapted) == bool(rank)
    with torch.no_grad():
        for n, p in pol_o.named_parameters():  # the policy moves away from the reference (LoRA: B off zero)
            if not rank or "lora_B" in n:
                p.add_(torch.randn_like(p) * (1e-2 if rank else 3e-3))
    pol_d.load_state_dict(_peft_names(pol_o.state_dict(), adapted), strict=True)
    if not rank:
        ref_d.load_state_dict(ref_o.state_dict(), strict=True)
    before = {k: v.clone() for k, v in pol_o.state_dict().items() if not rank or "lora_" in k}
    theirs = {k: next(iter(_peft_names({k: 0}, adapted))) for k in before}
    targs.batch_size = 2  # 2 pairs, a short text (the layers see the same shapes, faster)
    z, eps, sigma, cond = models.inputs(spec, 2, dev, torch.Generator().manual_seed(0), targs.sigma_density,
                                        targs.guidance, tokens=24)
    _same_step(step_o, step_d, (z, eps, sigma, cond), pol_o, pol_d, before, theirs, 3e-3)


def test_builtin_flow_configs_are_the_released_models_and_the_bench_shapes():
    """--model flux-dev / sd35-medium: ours and diffusers' transformer of the same size, and kernels/bench.py's
    attention shapes are theirs at 1024^2 (heads, image + text tokens, head dim)."""
    import diffusers
    from kernels import bench
    shapes = {name: rest for name, *rest in bench.ATTN_SHAPES}
    for model, size, shape in (("flux-dev", 11_901_408_320, "flux joint 1024^2"),
                               ("sd35-medium", 2_243_171_520, "sd3 joint 1024^2")):
        spec = models.spec(model)
        fam, cfg = spec["family"], spec["config"]
        with torch.device("meta"):
            ours = sum(p.numel() for p in fam.model(cfg).parameters())
            theirs = sum(p.numel() for p in getattr(diffusers, fam.diffusers_class).from_config(cfg).parameters())
        assert ours == theirs == size
        h = 1024 // 8 // 2  # 64x64 tokens (2x2 latent patches)
        L = h * h + fam.text.context(spec["lengths"])
        assert shapes[shape] == [cfg["num_attention_heads"], L, L, cfg["attention_head_dim"]]
        assert shape in bench.QUICK_SHAPES
    assert models.spec("flux-dev")["config"]["guidance_embeds"] and models.spec("sd35-medium")["config"]["qk_norm"]


def test_bench_step_refuses_what_cannot_fit(monkeypatch, capsys):
    monkeypatch.setattr(bench_step, "available_bytes", lambda dev: 8 * 2 ** 30)
    with pytest.raises(SystemExit) as e:
        bench_step.main(["--device", "cpu"])  # no flags: SDXL at 1024 px
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1
    assert err[0].startswith("error: this step needs at least 28.7 GiB on the cpu") and "8.0 GiB are free" in err[0]
    with pytest.raises(SystemExit) as e:
        bench_step.main(["--device", "cpu", "--model", "flux-dev", "--lora", "64"])  # the base, built in fp32
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and err[0].startswith("error: this step needs at least 44.3 GiB")
    assert "11.90 B-parameter transformer" in err[0]


def test_plan_outputs_are_checked_before_the_plan_runs(tmp_path, capsys, monkeypatch):
    """A --plan_out that cannot be written (no such folder), or that exists without --overwrite, is refused in one
    line before a single configuration is planned."""
    from bench import plan
    monkeypatch.setattr(plan, "plan", lambda *a, **k: pytest.fail("planned before checking the output"))
    for path, msg in ((str(tmp_path / "no" / "dir" / "x.json"), f"cannot write {tmp_path / 'no' / 'dir' / 'x.json'}: "
                       f"no folder {tmp_path / 'no' / 'dir'}"), (__file__, f"{__file__} exists: pass --overwrite")):
        with pytest.raises(SystemExit) as e:
            bench_step.main(["--plan", "--plan_out", path])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(err) == 1 and err[0].startswith(f"error: {msg}"), err


@pytest.mark.parametrize("family", ["flux", "qwen_image", "z_image"])
def test_a_bf16_lora_step_runs_as_the_gpu_check_runs_it(family, request, capsys, one_thread):
    """The GPU check's LoRA steps in their own dtype (bf16): the base made in bf16 (norms fp32, as dpo.py loads it),
    the FLOP count under autocast as the step; ours and diffusers' start at log 2 with the same FLOPs (Z-Image:
    diffusers' final layer also runs over the caption tokens it then drops; ours over the image's only)."""
    model = request.getfixturevalue(f"{family}_dir")
    rows = bench_step.main(["--model", model, *[("bf16" if a == "fp32" else a) for a in TINY], "--lora", "4"])
    assert [r["impl"] for r in rows] == ["ours", "diffusers"]
    assert all(r["loss0"] == pytest.approx(math.log(2), abs=1e-6) for r in rows)
    ours, theirs = rows[0]["gflop_fwd"], rows[1]["gflop_fwd"]
    assert 0 < ours == theirs if family != "z_image" else 0.95 * theirs < ours < theirs
