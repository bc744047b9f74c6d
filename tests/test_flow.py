"""Flow-matching preference optimization (SD3 / FLUX): every objective on velocity errors against its formula written
out by hand in fp64 (value and gradient), tiny end-to-end runs (log 2 at step 0 in fp32 and bf16, shared sigma and
noise, transformer/ loadable by diffusers, resume, 2 ranks = 1 rank, FSDP = one process, LoRA loadable by diffusers'
pipelines, cache = no cache), the samplers against diffusers' StableDiffusion3Pipeline and FluxPipeline from the
same initial latents, and bad input."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import diffusion
import dpo
import families
import flux
import lora
import mmdit
import sample
import tiny
from tiny import cli_error, run, spy_on

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------
# The loss on velocities, by hand


class Affine(torch.nn.Module):
    """A denoiser whose prediction w * x + 1e-3 * t depends on the timestep input (sigma * 1000) and one weight."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(float(w)))

    def forward(self, x, t, *cond):
        return self.w * x + 1e-3 * t.view(-1, 1, 1, 1)


def by_hand(loss, w, z, eps, sigma, beta, emb, tau=0.5, T=1000):
    """The objective in fp64 from its paper's formula, on velocity MSEs: x = (1 - s) x0 + s eps, v = eps - x0."""
    B = eps.shape[0]
    e2, s = torch.cat([eps, eps]).double(), torch.cat([sigma, sigma]).double().view(-1, 1, 1, 1)
    x0 = z.double()
    x = (1 - s) * x0 + s * e2
    v = e2 - x0
    m = ((w * x + 1e-3 * s * 1000 - v) ** 2).mean((1, 2, 3))  # (2B,) the policy's velocity errors
    r = ((0.45 * x + 1e-3 * s * 1000 - v) ** 2).mean((1, 2, 3))  # the reference's (w = 0.45)
    zl = -0.5 * beta * ((m[:B] - m[B:]) - (r[:B] - r[B:]))  # eq. 14's argument
    if loss == "dpo":
        return F.softplus(-zl).mean()
    if loss == "ipo":
        return ((zl / beta - 1 / (2 * beta)) ** 2).mean()
    if loss == "hinge":
        return torch.clamp(1 - zl, min=0).mean()
    if loss == "sft":
        return m[:B].mean()
    if loss == "mapo":
        score = 0.5 * m / (torch.exp(0.5 * m) - 1)
        return m[:B].mean() - beta * F.logsigmoid(T * (score[:B] - score[B:])).mean()
    if loss == "kto":
        reward = r - m
        ref_point = reward.detach().mean().clamp(min=0)
        sign = torch.cat([torch.ones(B), -torch.ones(B)]).double()
        return (1 - torch.sigmoid(sign * beta * (reward - ref_point))).mean()
    if loss == "rpo":  # winner i against loser j, weighted by the CLIP similarities
        c, xw, xl = (F.normalize(emb[:, k].double(), dim=-1) for k in range(3))
        weights = torch.softmax(-(1 - 0.5 * (c @ c.T + xw @ xl.T)) / tau, dim=1)
        zij = -0.5 * beta * ((m[:B, None] - m[None, B:]) - (r[:B, None] - r[None, B:]))
        return -F.logsigmoid(weights * zij).mean()
    raise KeyError(loss)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge", "sft", "mapo", "kto", "rpo"])
def test_every_objective_on_flow_velocities_equals_its_formula_by_hand(loss):
    g = torch.Generator().manual_seed(1)
    B = 3
    z, eps = torch.randn(2 * B, 16, 4, 4, generator=g), torch.randn(B, 16, 4, 4, generator=g)
    sigma, emb = torch.rand(B, generator=g), torch.randn(B, 3, 8, generator=g)
    beta = {"mapo": 0.1, "kto": 2.0}.get(loss, 3.0)
    policy, ref = Affine(0.5), Affine(0.45).requires_grad_(False)
    k = 1 if loss == "sft" else 2  # SFT: the winners alone reach pair_loss (dpo.micro_batch)
    cond = (torch.zeros(k * B, 2, 8), torch.zeros(k * B, 8))
    inputs = dict(z=z[:k * B], eps=eps, t=sigma, T=1000, cond=cond, rpo_emb=emb)
    value, _ = dpo.pair_loss(policy, None if loss in dpo.REFERENCE_FREE else ref, inputs, dpo.objective(loss, beta),
                             "flow")
    value.backward()
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    want = by_hand(loss, w, z, eps, sigma, beta, emb)
    want.backward()
    assert value.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    assert policy.w.grad.item() == pytest.approx(w.grad.item(), rel=1e-4, abs=1e-7)


def test_flow_sigmas_are_drawn_per_pair_from_the_schedule():
    """One sigma per pair, keyed by (seed, position); logit-normal u through SD3's shift 3 puts the mass high."""
    cfg = diffusion.scheduler_config("nowhere", families.SD3)
    pos = torch.arange(4000)
    t, eps, _, _ = dpo.draw(pos, 0, (1, 1, 1), 1000, 0.0, flow=("logit_normal", cfg))
    again, _, _, _ = dpo.draw(pos[[7, 3]], 0, (1, 1, 1), 1000, 0.0, flow=("logit_normal", cfg))
    assert torch.equal(again, t[[7, 3]]) and t.shape == (4000,)
    assert 0 < t.min() and t.max() <= 1 and 0.6 < t.median() < 0.9  # shift 3: sigmoid(0) = 0.5 -> 0.75
    u = diffusion.density("logit_normal", 4000, torch.Generator().manual_seed(0))
    assert 0.45 < u.median() < 0.55


# ----------------------------------------------------------------------------------------------------
# Tiny end-to-end runs


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_run_starts_at_log2_and_leaves_a_transformer_diffusers_loads(tmp_path, sd3_dir, flux_dir, jsonl,
                                                                          monkeypatch, family):
    folder, module = {"sd3": (sd3_dir, mmdit), "flux": (flux_dir, flux)}[family]
    loaded, calls = spy_on(monkeypatch, module)
    m = run(tmp_path, folder, jsonl)
    assert abs(m[0]["loss"] - math.log(2)) < 1e-6 and math.isfinite(m[-1]["loss"]) and len(m) == 2
    policy, ref = loaded[0], loaded[1]
    base = families.load(folder)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), base.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), base.state_dict().values()))
    for t, cond in calls:  # winner i and loser i: the same sigma (given as sigma * 1000) and prompt
        B = len(t) // 2
        assert torch.equal(t[:B], t[B:]) and 0 < t.min() and t.max() <= 1000
        assert torch.equal(cond[0][:B], cond[0][B:]) and torch.equal(cond[1][:B], cond[1][B:])
        if family == "flux":
            assert (cond[2] == flux.GUIDANCE).all()  # FLUX-dev's guidance input
        else:
            assert len(cond) == 2
    out = os.path.join(tmp_path, "transformer")
    assert not os.path.exists(os.path.join(tmp_path, "unet"))
    ours = families.load(out)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), policy.state_dict().values()))
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    hf = (SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel).from_pretrained(out)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([300.0, 800.0])
    ctx, pooled = torch.randn(2, 5, tiny.T5_WIDTH, generator=g), torch.randn(2, hf.config.pooled_projection_dim)
    with torch.no_grad():
        if family == "sd3":
            want = hf(x, ctx, pooled, t).sample
            got = ours(x, t, ctx, pooled)
        else:
            ids = flux.position_ids(0, 4, 4, "cpu").float()  # (16, 3) the image's; the text's are zeros
            want = hf(flux.pack(x), ctx, pooled, t / 1000, ids, torch.zeros(5, 3), torch.full((2,), 3.5)).sample
            want = flux.unpack(want, 8, 8)
            got = ours(x, t, ctx, pooled, torch.full((2,), 3.5))
    assert (got - want).abs().max() < 1e-4


def test_flow_resume_is_bit_exact(tmp_path, flux_dir, jsonl):
    full = run(tmp_path / "full", flux_dir, jsonl, "--ckpt_every", "2", steps=4)
    run(tmp_path / "cut", flux_dir, jsonl, "--ckpt_every", "2", steps=2)
    resumed = run(tmp_path / "cut", flux_dir, jsonl, "--ckpt_every", "2", "--resume", steps=4)
    keys = ("step", "loss", "implicit_acc", "model_mse", "ref_mse", "grad_norm")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]


def test_flow_cache_equals_no_cache(tmp_path, sd3_dir, jsonl):
    """Without flips: the cache freezes one flip per item keyed by its index, a plain run draws one per position."""
    plain = run(tmp_path / "plain", sd3_dir, jsonl, "--no_flip", steps=2)
    cached = run(tmp_path / "cached", sd3_dir, jsonl, "--cache", "--no_flip", steps=2)
    for a, b in zip(plain, cached):
        for k in ("loss", "model_mse", "ref_mse", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-8), k


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_lora_loads_in_diffusers_and_equals_the_merged_transformer(tmp_path, sd3_dir, flux_dir, jsonl, family):
    folder = {"sd3": sd3_dir, "flux": flux_dir}[family]
    run(tmp_path, folder, jsonl, "--lora", "4", "--lr", "1e-2")
    f = tmp_path / "lora" / lora.FILE
    from safetensors.torch import load_file
    keys = list(load_file(str(f)))
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any(".ff.net.2." in k for k in keys) and any(".attn.add_q_proj." in k for k in keys)
    from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline
    pipe = (StableDiffusion3Pipeline if family == "sd3" else FluxPipeline).from_pretrained(folder)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    merged = (SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel).from_pretrained(
        str(tmp_path / "transformer"))
    base = (SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel).from_pretrained(
        folder, subfolder="transformer")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([500.0])
    ctx, pooled = torch.randn(1, 5, tiny.T5_WIDTH, generator=g), torch.randn(1, merged.config.pooled_projection_dim)

    def out(m):
        with torch.no_grad():
            if family == "sd3":
                return m(x, ctx, pooled, t).sample
            ids = flux.position_ids(0, 4, 4, "cpu").float()
            return m(flux.pack(x), ctx, pooled, t / 1000, ids, torch.zeros(5, 3), torch.full((1,), 3.5)).sample
    lora_out, merged_out, base_out = out(pipe.transformer), out(merged), out(base)
    assert (lora_out - merged_out).abs().max() < 1e-4
    assert (merged_out - base_out).abs().max() > 1e-3  # the adapters changed something


# ----------------------------------------------------------------------------------------------------
# Sampling: the diffusers pipelines step for step


@pytest.mark.parametrize("steps,guidance,size", [(4, 7.0, (32, 32)), (3, 1.0, (32, 48)), (6, 3.0, (48, 32))])
def test_sd3_sampler_equals_diffusers(sd3_dir, steps, guidance, size):
    from diffusers import StableDiffusion3Pipeline
    ref = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    ref.set_progress_bar_config(disable=True)
    ours = sample.load(sd3_dir)
    ours.progress = False
    h, w = size
    latents = torch.randn(2, 16, h // 2, w // 2, generator=torch.Generator().manual_seed(steps))
    prompts = ["a red circle", "a photo of a cat"]
    want = ref(prompts, num_inference_steps=steps, guidance_scale=guidance, height=h, width=w, latents=latents,
               output_type="pt").images
    got = ours(prompts, steps=steps, guidance=guidance, height=h, width=w, latents=latents)
    assert got.shape == want.shape == (2, 3, h, w)
    assert (got - want).abs().max() < 2e-3


@pytest.mark.parametrize("schnell,steps,guidance,size", [(False, 4, 3.5, (32, 32)), (False, 3, 5.0, (32, 48)),
                                                         (True, 2, 0.0, (48, 32))])
def test_flux_sampler_equals_diffusers(tmp_path, flux_dir, schnell, steps, guidance, size):
    from diffusers import FluxPipeline
    folder = tiny.make_flux(str(tmp_path / "schnell"), guidance=False) if schnell else flux_dir
    ref = FluxPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ours = sample.load(folder)
    ours.progress = False
    h, w = size
    latents = torch.randn(1, 16, h // 2, w // 2, generator=torch.Generator().manual_seed(steps))
    want = ref("a red circle", num_inference_steps=steps, guidance_scale=guidance, height=h, width=w,
               latents=flux.pack(latents), output_type="pt", max_sequence_length=256 if schnell else 512).images
    got = ours("a red circle", steps=steps, guidance=guidance, height=h, width=w, latents=latents)
    assert got.shape == want.shape == (1, 3, h, w)
    assert (got - want).abs().max() < 2e-3


def test_flow_sdedit_and_cli(tmp_path, sd3_dir):
    """SDEdit on a flow model: the image noised to sigma at the start step on the straight path, then denoised."""
    import numpy as np
    from PIL import Image
    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(img)
    sample.main(["--model", sd3_dir, "--prompt", "a cat", "--init_image", str(img), "--strength", "0.5",
                 "--steps", "4", "--out", str(tmp_path / "out")])
    assert os.path.isfile(tmp_path / "out" / "0000_seed0.png")
    pipe = sample.load(sd3_dir)
    pipe.progress = False
    near = pipe("a cat", steps=4, init_image=str(img), strength=0.25)
    far = pipe("a cat", steps=4, init_image=str(img), strength=1.0)
    x = torch.from_numpy(np.array(Image.open(img))).permute(2, 0, 1).float()[None] / 255
    assert (near - x).abs().mean() < (far - x).abs().mean()


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, nothing overwritten


def test_flow_bad_flags(tmp_path, sd3_dir, flux_dir, jsonl, capsys):
    base = ["--data", jsonl, "--out_dir", str(tmp_path / "x"), "--resolution", "32", "--max_steps", "1"]
    err = cli_error(dpo.main, ["--model", sd3_dir, *base, "--time_ids", "official"], capsys)
    assert "--time_ids is SDXL's size conditioning; SD3 has none" in err
    err = cli_error(dpo.main, ["--model", sd3_dir, *base, "--guidance", "3.5"], capsys)
    assert "--guidance" in err and "FLUX-dev" in err
    err = cli_error(dpo.main, ["--model", flux_dir, *base, "--save_single"], capsys)
    assert "--save_single" in err
    assert not os.path.exists(tmp_path / "x" / "checkpoint.pt")


def test_sample_refuses_a_lora_of_another_family(tmp_path, sd3_dir, capsys):
    lora.save({"unet.down_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 8),
               "unet.down_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 2)}, str(tmp_path / "sdxl_lora"))
    err = cli_error(sample.main, ["--model", sd3_dir, "--lora", str(tmp_path / "sdxl_lora"), "--prompt", "a",
                                  "--out", str(tmp_path / "out")], capsys)
    assert "a LoRA of a UNet (SD1.5 / SDXL)" in err and "transformer (SD3 / FLUX / Qwen-Image / Z-Image)" in err
    assert not os.path.exists(tmp_path / "out" / "0000_seed0.png")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_implicit_accuracy_draws_sigma_and_ties_against_itself(tmp_path, sd3_dir, flux_dir, jsonl, family):
    """evaluate.py --eval_pairs on a flow model: the model against itself ties every pair (0.5); a changed
    transformer gives nonzero margins, the same for the same seed."""
    import data
    import evaluate
    folder = {"sd3": sd3_dir, "flux": flux_dir}[family]
    pipe = sample.load(folder)
    pipe.progress = False
    pairs = data.read_pairs(jsonl)
    ref = families.load(folder)
    acc, diffs = evaluate.implicit_accuracy(pipe, ref, pairs, k=2, size=32)
    assert acc == 0.5 and all(d == 0 for d in diffs)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    acc, diffs = evaluate.implicit_accuracy(pipe, ref, pairs, k=2, size=32)
    again = evaluate.implicit_accuracy(pipe, ref, pairs, k=2, size=32)[1]
    assert all(d != 0 for d in diffs) and diffs == again and 0 <= acc <= 1


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_bf16_reference_equals_policy_at_step0(tmp_path, sd3_dir, flux_dir, jsonl, family):
    """bf16 autocast, an fp32 master policy, a bf16 reference with fp32 norm scales and position table: log 2."""
    m = run(tmp_path, {"sd3": sd3_dir, "flux": flux_dir}[family], jsonl, "--dtype", "bf16", steps=1)
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-7) and m[0]["model_mse"] == m[0]["ref_mse"]


def test_flow_two_ranks_match_one_rank(tmp_path, flux_dir, jsonl):
    """2 ranks x 1 pair = 1 rank x 2 pairs: the sigma and eps of a pair follow its position, not its rank."""
    import json
    import subprocess
    import sys
    one = run(tmp_path / "one", flux_dir, jsonl, "--device", "cpu", steps=2)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(tiny.ROOT, "dpo.py"), "--model", flux_dir, "--data", jsonl, "--resolution", "32",
                        "--grad_accum", "2", "--max_steps", "2", "--log_every", "1", "--lr", "1e-4", "--warmup", "0",
                        "--device", "cpu", "--batch_size", "1", "--out_dir", str(tmp_path / "two")],
                       env=tiny.ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert len(two) == 2
    for a, b in zip(one, two):
        for k in ("loss", "model_mse", "ref_mse", "implicit_acc"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"]


def test_flow_fsdp_matches_one_process(tmp_path, flux_dir, jsonl):
    """FSDP2 over FLUX's double and single blocks (full and LoRA) = one process; the gathered transformer and the
    LoRA file are what one process writes."""
    import json
    import subprocess
    import sys
    one = run(tmp_path / "one", flux_dir, jsonl, "--device", "cpu", steps=2)
    one_lora = run(tmp_path / "one_lora", flux_dir, jsonl, "--device", "cpu", "--lora", "4", steps=2)
    common = ["--model", flux_dir, "--data", jsonl, "--resolution", "32", "--grad_accum", "2", "--max_steps", "2",
              "--log_every", "1", "--lr", "1e-4", "--warmup", "0", "--batch_size", "1", "--device", "cpu", "--fsdp"]
    runs = [["--out_dir", tmp_path / "fsdp"], ["--out_dir", tmp_path / "fsdp_lora", "--lora", "4"]]
    argv = [str(a) for flags_ in runs for a in ["::", *flags_]]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(tiny.ROOT, "tests", "ddp_runs.py"), *common, *argv],
                       env=tiny.ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for ref, name in ((one, "fsdp"), (one_lora, "fsdp_lora")):
        got = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        assert len(got) == 2
        for a, b in zip(ref, got):
            for k in ("loss", "model_mse", "ref_mse", "implicit_acc"):
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (name, k, a, b)
    base = families.load(flux_dir).state_dict()
    a, b = families.load(str(tmp_path / "fsdp")).state_dict(), families.load(str(tmp_path / "one")).state_dict()
    da = torch.cat([(a[k] - base[k]).flatten() for k in base])
    db = torch.cat([(b[k] - base[k]).flatten() for k in base])
    assert db.norm() > 0 and (da - db).norm() < 1e-3 * db.norm()
    adapters = [sorted(lora.read(str(tmp_path / n), "transformer.")) for n in ("fsdp_lora", "one_lora")]
    assert adapters[0] == adapters[1] and adapters[0]
