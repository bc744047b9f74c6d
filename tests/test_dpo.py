"""dpo.py: eq. 14 against the official formula (fp64, by hand) and the fused kernel, pair_loss (its targets, the
shared noise draw, the dispatch), the flags and their defaults, and tiny end-to-end runs (SDXL + SD1.5, parquet +
JSONL, cache, resume, 2-rank DDP, bad input)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import diffusion
import dpo
import families
import kernels
import unet as unetlib
import tiny
from tiny import ENV, ROOT, run, write_parquet


def inputs(z, eps, t, cond=(None, None, None)):
    """pair_loss's micro-batch: clean latents z (2B, ...), one (t, eps) per pair, the text conditioning."""
    return dict(z=z, eps=eps, t=t, T=1000, cond=cond)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------
# The loss


def test_dpo_loss_is_the_official_formula_and_its_gradient():
    model, ref, noise = tiny.preds()
    beta, B, N = 50.0, 3, 4 * 8 * 8
    m, r, e = (x.double().numpy().reshape(x.shape[0], -1) for x in (model, ref, noise))
    mse = lambda p, k: ((p[k] - e[k % B]) ** 2).mean()
    inner = np.array([-0.5 * beta * ((mse(m, i) - mse(m, B + i)) - (mse(r, i) - mse(r, B + i))) for i in range(B)])
    want = np.mean(np.log1p(np.exp(-inner)))  # -log sigmoid(x) = log(1 + e^-x), in float64
    x = model.clone().requires_grad_(True)
    loss, stats = dpo.dpo_loss(x, ref, noise, beta)
    loss.backward()
    assert abs(loss.item() - want) < 1e-6 * max(1, want)
    assert abs(stats["implicit_acc"].item() - np.mean(inner > 0)) < 1e-7
    # closed form: dL/dpred_w = c (pred_w - eps), dL/dpred_l = -c (pred_l - eps), c = beta sigmoid(-inner) / (B N)
    c = beta / (1 + np.exp(inner)) / (B * N)
    grad = np.concatenate([c[:, None] * (m[:B] - e), -c[:, None] * (m[B:] - e)])
    assert np.abs(x.grad.double().numpy().reshape(2 * B, -1) - grad).max() < 1e-6 * np.abs(grad).max()


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_dpo_loss_equals_kernels(monkeypatch, path):
    monkeypatch.setenv("DPO_KERNELS", path)
    model, ref, noise = tiny.preds(B=2, seed=1)
    a, b = model.clone().requires_grad_(True), model.clone().requires_grad_(True)
    la, sa = dpo.dpo_loss(a, ref, noise, 5000.0)
    lb, sb = kernels.dpo_loss(b, ref, noise, 5000.0)
    (la + lb).backward()
    assert abs(la.item() - lb.item()) < 1e-5 * max(1, la.item())
    assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7)
    for k in ("implicit_acc", "model_mse", "ref_mse", "reward_margin"):
        assert abs(float(sa[k]) - float(sb[k])) < 1e-5


def _recorded(fn, name, calls):
    """fn, noting name in calls at each call."""
    def wrapper(*args):
        calls.append(name)
        return fn(*args)
    return wrapper


@pytest.mark.parametrize("pred_type", ["epsilon", "v_prediction"])
def test_pair_loss_dispatches_to_the_fused_kernel_with_the_same_numbers(monkeypatch, pred_type):
    """pair_loss computes eq. 14 with the readable dpo_loss, or with kernels.dpo_loss where kernels.use_triton says
    so (CUDA tensors; here DPO_KERNELS=triton, in the interpreter): the same loss, stats and gradient."""
    g = torch.Generator().manual_seed(5)
    z, eps, t = torch.randn(4, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    abar = diffusion.alphas_cumprod(families.SD_SCHEDULE)
    loss_fn = dpo.objective("dpo", 100.0)
    ref = torch.nn.Conv2d(4, 4, 1)
    calls, results = [], {}
    for path in ("torch", "triton"):
        monkeypatch.setenv("DPO_KERNELS", path)
        policy = torch.nn.Conv2d(4, 4, 1)
        policy.load_state_dict(ref.state_dict())
        with torch.no_grad():
            policy.weight.add_(0.01)  # not the reference: a loss away from log 2
        for name, module in (("readable", dpo), ("fused", kernels)):
            monkeypatch.setattr(module, "dpo_loss", _recorded(module.dpo_loss, name, calls))
        loss, stats = dpo.pair_loss(lambda x, tt, *c: policy(x), lambda x, tt, *c: ref(x), inputs(z, eps, t), loss_fn,
                                    pred_type, abar)
        loss.backward()
        results[path] = (loss.item(), {k: float(v) for k, v in stats.items()}, policy.weight.grad.clone())
        monkeypatch.undo()
    assert calls == ["readable", "fused"]
    (la, sa, ga), (lb, sb, gb) = results["torch"], results["triton"]
    assert abs(la - math.log(2)) > 1e-3 and abs(la - lb) < 1e-5 * max(1, la)
    assert all(abs(sa[k] - sb[k]) < 1e-5 for k in ("implicit_acc", "model_mse", "ref_mse", "reward_margin"))
    assert (ga - gb).norm() < 1e-5 * ga.norm(), (ga - gb).norm() / ga.norm()


def test_pairs_share_t_noise_and_draws_depend_on_position_only(monkeypatch):
    pos = torch.tensor([5, 9, 2])
    t, eps, drop, _ = dpo.draw(pos, 0, (4, 8, 8), 1000, 0.5)
    t2, eps2, drop2, _ = dpo.draw(torch.tensor([9]), 0, (4, 8, 8), 1000, 0.5)  # another batch, another world size
    assert t[1] == t2[0] and torch.equal(eps[1], eps2[0]) and drop[1] == drop2[0]
    z = torch.randn(6, 4, 8, 8)
    cfg = diffusion.scheduler_config("", families.SDXL)
    abar, pred = diffusion.alphas_cumprod(cfg), cfg["prediction_type"]
    with pytest.raises(ValueError, match="unsupported prediction_type 'sample'"):
        diffusion.scheduler_config("", families.SDXL, "sample")
    assert pred == "epsilon" and abs(abar[0].item() - (1 - 0.00085)) < 1e-7 and abar[-1].item() < 5e-3
    seen, targets = [], []  # what pair_loss gives the policy (x_t, t) and eq. 14 (the shared eps target)

    def policy(x, tt, *cond):
        seen.append((x, tt))
        return torch.zeros_like(x)

    def loss(pred, ref_pred, noise, beta):
        targets.append(noise)
        return torch.zeros(()), {}
    monkeypatch.setattr(dpo, "dpo_loss", loss)
    dpo.pair_loss(policy, policy, inputs(z, eps, t), dpo.objective("dpo", 1.0), pred, abar)
    x, tt = seen[0]
    e2, target = torch.cat([eps, eps]), torch.cat([targets[0], targets[0]])
    assert torch.equal(target, e2) and torch.equal(e2, torch.cat([eps, eps]))
    a = abar[tt].view(-1, 1, 1, 1)
    assert torch.equal(tt[:3], tt[3:]) and torch.equal(tt[:3], t)
    from diffusers import DDPMScheduler  # the official code's forward process
    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert torch.equal(abar, ddpm.alphas_cumprod)
    assert torch.allclose(x, ddpm.add_noise(z, torch.cat([eps, eps]), torch.cat([t, t])), atol=1e-6)
    recovered = (x - a.sqrt() * z) / (1 - a).sqrt()  # the noise each image received
    assert torch.allclose(recovered[:3], eps, atol=1e-4) and torch.allclose(recovered[3:], eps, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Data


# ----------------------------------------------------------------------------------------------------
# End to end


def test_sdxl_jsonl_run(tmp_path, sdxl_dir, jsonl, monkeypatch):
    loaded, calls = [], []
    real_load = unetlib.load

    def spy(*a, **k):  # record the UNets train() builds and the inputs they see
        u = real_load(*a, **k)
        loaded.append(u)
        fwd = u.forward

        def forward(x, t, ctx, pooled=None, time_ids=None):
            calls.append((t, ctx, pooled, time_ids))
            return fwd(x, t, ctx, pooled, time_ids)
        u.forward = forward
        return u
    monkeypatch.setattr(unetlib, "load", spy)
    m = run(tmp_path, sdxl_dir, jsonl, "--ckpt_every", "1", "--save_single", steps=3)
    assert abs(m[0]["loss"] - math.log(2)) < 1e-6  # policy == reference at step 0
    assert [r["step"] for r in m] == [1, 2, 3] and all("implicit_acc" in r for r in m)
    policy, ref = loaded[0], loaded[1]
    base = real_load(sdxl_dir)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), base.state_dict().values()))  # untouched
    assert any(not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), base.state_dict().values()))
    for t, ctx, pooled, tids in calls:  # winner i and loser i: same t, same (possibly dropped) prompt
        B = len(t) // 2
        assert torch.equal(t[:B], t[B:]) and torch.equal(ctx[:B], ctx[B:]) and torch.equal(pooled[:B], pooled[B:])
        assert tids.shape == (2 * B, 6) and (tids[:, 4:] == 32).all()
    out = real_load(os.path.join(tmp_path, "unet"))
    assert all(torch.equal(a, b) for a, b in zip(out.state_dict().values(), policy.state_dict().values()))
    from diffusers import UNet2DConditionModel
    hf = UNet2DConditionModel.from_pretrained(os.path.join(tmp_path, "unet"))
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in out.parameters())
    assert os.path.isfile(os.path.join(tmp_path, "unet.safetensors"))
    # a fresh run into a folder holding a checkpoint is refused; the checkpoint stays
    before = os.path.getmtime(os.path.join(tmp_path, "checkpoint.pt"))
    with pytest.raises(SystemExit):
        run(tmp_path, sdxl_dir, jsonl)
    assert os.path.getmtime(os.path.join(tmp_path, "checkpoint.pt")) == before


def test_parquet_sdxl_rpo_and_sd15_sft(tmp_path, sdxl_dir, sd15_dir):
    pq = write_parquet(tmp_path / "a.parquet")
    m = run(tmp_path / "rpo", sdxl_dir, pq, "--loss", "rpo", "--dreamlike_only", "--random_crop")
    assert abs(m[0]["loss"] - math.log(2)) < 1e-6 and math.isfinite(m[-1]["loss"])
    m = run(tmp_path / "sft", sd15_dir, pq, "--loss", "sft", "--optimizer", "adamw")
    assert len(m) == 2 and m[0]["implicit_acc"] is None and m[0]["loss"] > 0
    assert os.path.isfile(tmp_path / "sft" / "unet" / "config.json")


def test_resume_is_bit_exact(tmp_path, sdxl_dir, jsonl, capsys):
    full = run(tmp_path / "full", sdxl_dir, jsonl, "--ckpt_every", "2", steps=4)
    run(tmp_path / "cut", sdxl_dir, jsonl, "--ckpt_every", "2", steps=2)
    resumed = run(tmp_path / "cut", sdxl_dir, jsonl, "--ckpt_every", "2", "--resume", steps=4)
    keys = ("step", "loss", "implicit_acc", "model_mse", "ref_mse", "grad_norm")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]
    # resuming with a flag that changes the run is refused with one line, and the checkpoint stays
    ck = tmp_path / "cut" / "checkpoint.pt"
    before = ck.stat().st_mtime
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "cut", sdxl_dir, jsonl, "--ckpt_every", "2", "--resume", "--beta", "100", steps=6)
    assert e.value.code == 1 and ck.stat().st_mtime == before
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --resume with flags that change the run: --beta 5000.0 -> 100.0; use a new --out_dir"]


@pytest.mark.parametrize("loss", ["dpo", "rpo"])  # rpo: the all-gathered 2x2 matrix and its gradient scaling
def test_two_rank_ddp_matches_one_rank(tmp_path, sdxl_dir, jsonl, loss):
    common = ["--model", sdxl_dir, "--data", jsonl, "--resolution", "32", "--grad_accum", "2", "--max_steps", "3",
              "--log_every", "1", "--lr", "1e-4", "--warmup", "0", "--device", "cpu", "--beta", "100", "--loss", loss]
    # beta 100, not 5000: eq. 14 multiplies fp32 rounding of the MSEs (batch 2 vs 1 convs round differently) by beta/2
    one = run(tmp_path / "one", sdxl_dir, jsonl, "--device", "cpu", "--beta", "100", "--loss", loss, steps=3)  # 1 x 2
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "dpo.py"), *common, "--batch_size", "1", "--out_dir", str(tmp_path / "two")],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    for a, b in zip(one, two):
        for k in ("loss", "model_mse", "ref_mse", "implicit_acc"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"]  # the all-reduced gradient itself
    assert len(two) == 3


# ----------------------------------------------------------------------------------------------------
# Bad input and failures: one clear line, non-zero exit, good data never overwritten


def test_corrupt_images_are_skipped_and_counted(tmp_path, sdxl_dir, jsonl):
    src = os.path.dirname(jsonl)
    lines = open(jsonl).read().splitlines()
    data = tmp_path / "d"
    (data / "img").mkdir(parents=True)
    for f in os.listdir(os.path.join(src, "img")):
        (data / "img" / f).write_bytes(open(os.path.join(src, "img", f), "rb").read())
    (data / "img" / "2_0.png").write_bytes(b"not a png")
    (data / "img" / "5_1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (data / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    m = run(tmp_path / "ok", sdxl_dir, str(data / "pairs.jsonl"), "--max_bad_frac", "0.5", steps=4)
    assert m[-1]["bad_pairs"] >= 2 and all(math.isfinite(r["loss"]) for r in m)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "stop", sdxl_dir, str(data / "pairs.jsonl"), steps=4)
    assert e.value.code == 1


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, sdxl_dir, jsonl, monkeypatch, capsys):
    real, n = dpo.dpo_loss, [0]

    def poisoned(*a):
        n[0] += 1
        loss, stats = real(*a)
        return (loss * float("nan") if n[0] > 4 else loss), stats  # steps 1-2 fine (2 micro-steps each), then NaN
    monkeypatch.setattr(dpo, "dpo_loss", poisoned)  # what pair_loss calls on CPU
    with pytest.raises(SystemExit) as e:
        run(tmp_path, sdxl_dir, jsonl, "--ckpt_every", "1", steps=4)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss is nan at step 3" in err[0] and "step 2" in err[0]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("flags, msg", [(["--loss", "foo"], "--loss"), (["--dtype", "fp8"], "--dtype"),
                                        (["--batch_size", "0"], "--batch_size"), (["--beta", "nan"], "--beta"),
                                        (["--data", "d.jsonl", "--split", "test"], "a JSONL file: drop --split")])
def test_bad_flags_in_process(capsys, flags, msg):
    with pytest.raises(SystemExit) as e:
        dpo.main(["--model", "m", "--data", "d", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and msg in err[0]


def test_bad_input_errors(tmp_path, sdxl_dir, capsys):
    cases = [(write_parquet(tmp_path / "bad.parquet", drop=("label_0",)), sdxl_dir, "missing columns label_0"),
             (str(tmp_path / "nope.parquet"), sdxl_dir, "no data at"),
             (str(tmp_path / "nope.jsonl"), sdxl_dir, "not found"),
             (write_parquet(tmp_path / "good.parquet"), str(tmp_path), "neither a diffusers model folder")]
    for data, model, msg in cases:
        with pytest.raises(SystemExit) as e:
            dpo.main(["--model", model, "--data", data, "--out_dir", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(err) == 1 and err[0].startswith("error:") and msg in err[0], err


def test_cli_errors_subprocess(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "dpo.py"), "--model", "m", "--beta", "-1"],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: --beta has an invalid value: -1.0"
    argv = [sys.executable, os.path.join(ROOT, "dpo.py"), "--model", str(tmp_path / "none"), "--data", "x.jsonl"]
    r = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == "error: data file not found: x.jsonl"  # before loading models


def test_parse_args_defaults_and_given():
    a = dpo.parse_args(["--model", "m", "--beta", "2000"])
    assert a.given == ["beta", "model"] and a.loss == "dpo" and a.prompt_dropout is None and a.resolution is None
    r = dpo.resolve(a, families.SDXL, world=8)
    got = (r.resolution, r.warmup, r.optimizer, r.gradient_checkpointing, r.grad_accum, r.prompt_dropout)
    assert got == (1024, 200, "adafactor", True, 256, 0.2)
    assert r.lr == pytest.approx(1e-8 * 2048)
    r = dpo.resolve(dpo.parse_args(["--grad_accum", "4", "--batch_size", "2"]), families.SD15, world=1)
    assert (r.resolution, r.warmup, r.optimizer, r.lr) == (512, 500, "adamw", pytest.approx(8e-8))
    # by run kind (dpo.LR): offline LoRA, and the flow families and online runs drop no prompts
    r = dpo.resolve(dpo.parse_args(["--lora", "8"]), families.SDXL, world=1)
    assert (r.lr, r.warmup, r.prompt_dropout) == (1e-5, 200, 0.2)
    r = dpo.resolve(dpo.parse_args([]), families.FLUX, world=1)
    assert r.prompt_dropout == 0.0 and r.lr == pytest.approx(1e-8 * 2048)


@pytest.mark.parametrize("pred_type", ["epsilon", "v_prediction"])
def test_pair_loss_targets_by_hand(pred_type):
    """eps target, or v = sqrt(a) eps - sqrt(1-a) x_0 for v-prediction models; SFT = MSE on the winners (only they
    reach it: dpo.micro_batch)."""
    g = torch.Generator().manual_seed(4)
    z, eps, t = torch.randn(4, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    abar = diffusion.alphas_cumprod(families.SD_SCHEDULE)
    policy, ref = (lambda x, t, *c: 0.5 * x), (lambda x, t, *c: 0.4 * x + 0.1)
    loss, _ = dpo.pair_loss(policy, ref, inputs(z, eps, t), dpo.objective("dpo", 100.0), pred_type, abar)
    a = abar.double()[torch.cat([t, t])].view(-1, 1, 1, 1)
    e2, zd = torch.cat([eps, eps]).double(), z.double()
    x = a.sqrt() * zd + (1 - a).sqrt() * e2
    target = e2 if pred_type == "epsilon" else a.sqrt() * e2 - (1 - a).sqrt() * zd
    m, r = ((0.5 * x - target) ** 2).mean((1, 2, 3)), ((0.4 * x + 0.1 - target) ** 2).mean((1, 2, 3))
    inner = -0.5 * 100.0 * ((m[:2] - m[2:]) - (r[:2] - r[2:]))
    assert abs(loss.item() - torch.nn.functional.softplus(-inner).mean().item()) < 1e-5
    loss, _ = dpo.pair_loss(policy, None, inputs(z[:2], eps, t), dpo.objective("sft", 100.0), pred_type, abar)
    assert abs(loss.item() - m[:2].mean().item()) < 1e-5


def test_bf16_reference_equals_policy_at_step0(tmp_path, sdxl_dir, jsonl):
    """The GPU precision setup (bf16 autocast, fp32 master policy, bf16 reference) gives exactly log 2 at step 0:
    the reference keeps its norms in fp32, as autocast does for the policy."""
    m = run(tmp_path, sdxl_dir, jsonl, "--dtype", "bf16", steps=1)
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-7) and m[0]["model_mse"] == m[0]["ref_mse"]


def test_default_resolution_is_the_models_own(tmp_path, sdxl_dir, jsonl, capsys):
    """No --resolution: the UNet's sample_size x the VAE's downsampling (the tiny SDXL: 16 x 2 = 32 px)."""
    dpo.main(["--model", sdxl_dir, "--data", jsonl, "--out_dir", str(tmp_path / "run"), "--batch_size", "2",
              "--grad_accum", "1", "--max_steps", "1", "--log_every", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "pairs, 32px" in out
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["args"]["resolution"] == 32
    import vae as vaelib
    folder = tiny.make_sdxl(str(tmp_path / "f8"), vae_channels=(8, 8, 16, 16))
    assert vaelib.downsample(folder) == 8 and vaelib.downsample(sdxl_dir) == 2
