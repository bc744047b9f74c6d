"""The online-RL building blocks against their authors' code, transcribed below as the oracles (flow_grpo's
sde_step_with_logprob, DDPO's ddim_step_with_logprob, flow_grpo's PerPromptStatTracker and GRPO loss, DiffusionNFT's
loss), on the same tensors in fp64: values and gradients."""
import math

import numpy as np
import pytest
import torch

import diffusion
import objectives

torch.set_default_dtype(torch.float32)


# ----------------------------------------------------------------------------------------------------
# The oracles: the authors' lines, with their names (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py,
# ddpo_pytorch/diffusers_patch/ddim_with_logprob.py, flow_grpo/stat_tracking.py, scripts/train_sd3.py,
# DiffusionNFT's scripts/train_nft_sd3.py); only the scheduler object is replaced by its tensors.


def flow_grpo_sde_step(sigmas, step_index, model_output, sample, noise_level, prev_sample=None, variance_noise=None):
    sigma = sigmas[step_index].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_prev = sigmas[[s + 1 for s in step_index]].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_max = sigmas[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    prev_sample_mean = sample * (1 + std_dev_t ** 2 / (2 * sigma) * dt) + model_output * (
        1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
    if prev_sample is None:
        prev_sample = prev_sample_mean + std_dev_t * torch.sqrt(-1 * dt) * variance_noise
    log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
                - torch.log(std_dev_t * torch.sqrt(-1 * dt)) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


def ddpo_ddim_step(alphas_cumprod, final_alpha_cumprod, gap, timestep, model_output, sample, eta, prev_sample):
    prev_timestep = timestep - gap
    prev_timestep = torch.clamp(prev_timestep, 0, len(alphas_cumprod) - 1)
    alpha_prod_t = alphas_cumprod.gather(0, timestep).view(-1, 1, 1, 1)
    alpha_prod_t_prev = torch.where(prev_timestep >= 0, alphas_cumprod.gather(0, prev_timestep),
                                    final_alpha_cumprod).view(-1, 1, 1, 1)
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
    pred_epsilon = model_output
    variance = ((1 - alpha_prod_t_prev) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** 0.5
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5 * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction
    log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * (std_dev_t ** 2)) - torch.log(std_dev_t)
                - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim))), prev_sample_mean


def flow_grpo_advantages(prompts, rewards):
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    advantages = np.empty_like(rewards) * 0.0
    for prompt in np.unique(prompts):
        prompt_rewards = rewards[prompts == prompt]
        mean = np.mean(prompt_rewards, axis=0, keepdims=True)
        std = np.std(prompt_rewards, axis=0, keepdims=True) + 1e-4
        advantages[prompts == prompt] = (prompt_rewards - mean) / std
    return advantages


def flow_grpo_loss(log_prob, old_log_probs, advantages, adv_clip_max, clip_range, beta, prev_sample_mean,
                   prev_sample_mean_ref, std_dev_t):
    advantages = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_probs)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
    kl_loss = ((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t ** 2)
    return policy_loss + beta * torch.mean(kl_loss)


def nft_loss_oracle(forward_prediction, old_prediction, ref_forward_prediction, xt, x0, t, advantages, beta,
                    adv_clip_max, kl_beta):
    t_expanded = t.view(-1, *([1] * (len(x0.shape) - 1)))
    advantages_clip = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    normalized_advantages_clip = (advantages_clip / adv_clip_max) / 2.0 + 0.5
    r = torch.clamp(normalized_advantages_clip, 0, 1)
    positive_prediction = beta * forward_prediction + (1 - beta) * old_prediction.detach()
    implicit_negative_prediction = (1.0 + beta) * old_prediction.detach() - beta * forward_prediction
    x0_prediction = xt - t_expanded * positive_prediction
    with torch.no_grad():
        weight_factor = torch.abs(x0_prediction.double() - x0.double()).mean(
            dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=0.00001)
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    negative_x0_prediction = xt - t_expanded * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = torch.abs(negative_x0_prediction.double() - x0.double()).mean(
            dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=0.00001)
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    policy_loss = (ori_policy_loss * adv_clip_max).mean()
    kl_div_loss = ((forward_prediction - ref_forward_prediction) ** 2).mean(dim=tuple(range(1, x0.ndim)))
    return policy_loss + kl_beta * torch.mean(kl_div_loss)


# ----------------------------------------------------------------------------------------------------
# The tests


def _flow_sigmas(steps=10):
    """SD3.5's sampling schedule (shift 3) at `steps` steps, fp64, 0 last."""
    cfg = dict(diffusion.FLOW_SCHEDULE, shift=3.0)
    return diffusion.FlowEuler(cfg, steps).sigmas.double()


@pytest.mark.parametrize("i", [0, 1, 5, 9])
def test_sde_step_is_flow_grpos(i):
    """The next sample, mean, std and log-probability, drawn and given, sigma = 1 (step 0) included."""
    g = torch.Generator().manual_seed(i)
    sigmas = _flow_sigmas()
    assert sigmas[0] == 1 and sigmas[-1] == 0
    v, x = (torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    prev, lp, mean, std = diffusion.sde_step(v, x, sigmas, i, 0.7, generator=torch.Generator().manual_seed(99))
    ref = flow_grpo_sde_step(sigmas, [i] * 3, v, x, 0.7, variance_noise=z)
    for a, b in zip((prev, lp, mean), ref[:3]):
        assert a.dtype == torch.float64 and (a - b).abs().max() < 1e-10
    assert (std - ref[3]).abs().max() < 1e-10 and torch.isfinite(lp).all()
    given = prev + 0.01 * torch.randn(prev.shape, generator=g, dtype=torch.float64)  # another step's sample
    lp2 = diffusion.sde_step(v, x, sigmas, i, 0.7, prev=given)[1]
    assert (lp2 - flow_grpo_sde_step(sigmas, [i] * 3, v, x, 0.7, prev_sample=given)[1]).abs().max() < 1e-10
    assert (diffusion.sde_step(v, x, sigmas, i, 0.7, prev=mean)[1] > lp).all()  # the mean: the likeliest


def test_sde_steps_keep_the_marginals_of_the_ode():
    """The SDE's point: with the exact velocity of a Gaussian data distribution, its samples have the marginals the
    flow ODE has (std sqrt((1 - sigma)^2 s0^2 + sigma^2)), so the K samples of a group differ but are not worse."""
    s0, n, sigmas = 0.5, 20000, _flow_sigmas(100)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    for i in range(len(sigmas) - 1):
        s = sigmas[i]
        var = (1 - s) ** 2 * s0 ** 2 + s ** 2  # x_sigma = (1 - sigma) x0 + sigma eps, x0 ~ N(0, s0^2)
        v = x * ((s - (1 - s) * s0 ** 2) / var)  # E[eps - x0 | x_sigma]
        x = diffusion.sde_step(v, x, sigmas, i, 0.7, generator=g)[0]
    assert abs(x.std().item() - s0) < 0.01  # (the ODE at 100 Euler steps: 0.491; sampling error about 0.003)


def test_ddim_step_log_prob_is_ddpos():
    cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False,
               prediction_type="epsilon")
    sched = diffusion.DDIM(cfg, 20)
    g = torch.Generator().manual_seed(0)
    ac = sched.ac.double()
    for i in (0, 7, 19):
        out, x = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
        prev, lp, mean, std = diffusion.ddim_step(sched, out, i, x, eta=1.0, generator=g)
        t = torch.full((2,), int(sched.timesteps[i]), dtype=torch.long)
        want, want_mean = ddpo_ddim_step(ac, sched.final.double(), sched.gap, t, out, x, 1.0, prev)
        assert (lp - want).abs().max() < 1e-10 and (mean - want_mean).abs().max() < 1e-10
        assert torch.equal(diffusion.ddim_step(sched, out, i, x, eta=0.0 + 1.0, prev=prev)[1], lp)


def test_group_advantages_are_flow_grpos_tracker():
    g = torch.Generator().manual_seed(0)
    prompts = [p for p in range(6) for _ in range(4)]
    rewards = torch.randn(24, generator=g, dtype=torch.float64)
    rewards[8:12] = 0.3  # a group whose samples tie: advantage 0, no signal
    adv = objectives.group_advantages(rewards, torch.tensor(prompts))
    want = flow_grpo_advantages([str(p) for p in prompts], rewards.numpy())
    assert np.abs(adv.numpy() - want).max() < 1e-12 and (adv[8:12] == 0).all()


def test_grpo_loss_and_gradient_are_flow_grpos():
    g = torch.Generator().manual_seed(1)
    B = 6
    old = torch.randn(B, generator=g, dtype=torch.float64)
    lp = (old + 3e-4 * torch.randn(B, generator=g, dtype=torch.float64)).requires_grad_()  # some ratios clip
    adv = 3 * torch.randn(B, generator=g, dtype=torch.float64)  # some beyond the clip
    mean = torch.randn(B, 4, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ref_mean = mean.detach() + 0.1 * torch.randn(B, 4, 8, 8, generator=g, dtype=torch.float64)
    std = torch.tensor(0.4, dtype=torch.float64)
    ours, stats = objectives.grpo_loss(lp, old, adv, 1e-4, 5.0, 0.04, mean, ref_mean, std)
    want = flow_grpo_loss(lp, old, adv, 5.0, 1e-4, 0.04, mean, ref_mean, std)
    assert abs(ours.item() - want.item()) < 1e-12
    ga = torch.autograd.grad(ours, (lp, mean))
    gb = torch.autograd.grad(want, (lp, mean))
    for a, b in zip(ga, gb):
        assert (a - b).abs().max() < 1e-12
    assert 0 < stats["clip_frac"] < 1 and stats["approx_kl"] > 0 and stats["kl"] > 0


def test_nft_loss_and_gradient_are_diffusionnfts():
    g = torch.Generator().manual_seed(2)
    B, shape = 5, (5, 4, 8, 8)
    x0, eps = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.rand(B, generator=g, dtype=torch.float64)
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v = (eps - x0 + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
    v_old = v.detach() + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)
    v_ref = v.detach() + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    adv = 4 * torch.randn(B, generator=g, dtype=torch.float64)
    for beta, kl_beta in ((1.0, 1e-4), (0.1, 0.0)):
        ours, stats = objectives.nft_loss(v, v_old, v_ref, xt, x0, t, adv, beta, 5.0, kl_beta)
        want = nft_loss_oracle(v, v_old, v_ref, xt, x0, t, adv, beta, 5.0, kl_beta)
        assert abs(ours.item() - want.item()) < 1e-10 * abs(want.item())
        (ga,), (gb,) = torch.autograd.grad(ours, v), torch.autograd.grad(want, v)
        assert (ga - gb).abs().max() < 1e-12
    assert stats["old_deviation"] > 0


# ----------------------------------------------------------------------------------------------------
# Training: GRPO and NFT in dpo.py's loop, online DPO's defaults


def run(out, model, prompts, *extra, steps=2):
    """dpo.main on a tiny model, online, the area reward; returns metrics.jsonl's records."""
    import json
    import os
    import dpo
    from test_online import flags
    dpo.main(flags(out, model, prompts, *extra, steps=steps))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    from test_online import PROMPTS
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


LOSS_KEYS = ("step", "loss", "grad_norm", "reward_mean", "reward_std", "zero_std_groups")


@pytest.mark.parametrize("loss,family,extra", [
    ("grpo", "flux", ("--sample_steps", "3")),
    ("grpo", "sdxl", ("--sample_steps", "3", "--lora", "2")),  # DDPO's: DDIM with eta 1
    ("nft", "flux", ("--sample_steps", "3", "--lora", "2")),
    ("grpo", "qwen_image", ("--sample_steps", "3", "--lora", "2")),  # true CFG with its renorm needs a negative:
    ("nft", "z_image", ("--sample_steps", "3")),  # none here; Z-Image's CFG (cond + g (cond - uncond)) on
])
def test_rl_losses_train_and_resume_exactly(loss, family, extra, tmp_path, prompts, request, one_thread):
    """A run logs its reward and the loss's own numbers, moves the weights, and a run resumed from its checkpoint
    (samples, advantages, NFT's old policy) logs and leaves what the uncut run does."""
    import families
    model = request.getfixturevalue(f"{family}_dir")
    common = ("--loss", loss, "--samples_per_prompt", "3", "--batch_size", "2", "--ckpt_every", "1", *extra)
    full = run(tmp_path / "full", model, prompts, *common, steps=3)
    assert [m["step"] for m in full] == [1, 2, 3]
    own = ("clip_frac", "approx_kl", "kl") if loss == "grpo" else ("old_deviation", "kl")
    assert all(m[k] is not None and math.isfinite(m[k]) for m in full for k in own + LOSS_KEYS), full[0]
    assert max(m["grad_norm"] for m in full) > 0  # (a group whose K rewards tie gives no gradient)
    if loss == "nft":
        assert full[0]["old_deviation"] == 0 and full[1]["old_deviation"] > 0  # step 1: the old policy is the policy
    run(tmp_path / "cut", model, prompts, *common, steps=2)
    cut = run(tmp_path / "cut", model, prompts, *common, "--resume", steps=3)
    assert [[m[k] for k in LOSS_KEYS + own] for m in cut] == [[m[k] for k in LOSS_KEYS + own] for m in full]
    sub = "lora" if "--lora" in extra else families.of(model).subfolder
    import safetensors.torch
    name = "pytorch_lora_weights.safetensors" if sub == "lora" else "diffusion_pytorch_model.safetensors"
    a, b = (safetensors.torch.load_file(str(tmp_path / r / sub / name)) for r in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra,message", [
    (["--loss", "grpo", None], "--loss grpo trains on the policy's own samples: add --online"),
    (["--loss", "grpo", "--sampler", "ode"], "--loss grpo needs the step probabilities of a stochastic sampler"),
    (["--noise_level", "0.5"], "--noise_level sets the stochastic sampler's noise: add --sampler sde"),
    (["--loss", "grpo", "--sde_window", "30"], "--sde_window 30 must be at most --sample_steps 2"),
    (["--clip_range", "0.1"], "--clip_range is a flag of --loss grpo / nft"),
    (["--loss", "nft", "--train_steps", "1.5"], "--train_steps is a share of the steps in (0, 1], got 1.5"),
    (["--loss", "nft"], "--loss nft (DiffusionNFT) trains a flow model's velocity; SDXL is a UNet"),
])
def test_bad_rl_input_is_one_line(extra, message, tmp_path, sdxl_dir, prompts, capsys):
    import tiny
    import dpo
    from test_online import flags
    argv = flags(tmp_path / "out", sdxl_dir, prompts, "--sample_steps", "2") + [e for e in extra if e is not None]
    if None in extra:
        argv.remove("--online")
    err = tiny.cli_error(dpo.main, argv, capsys)
    assert message in err, err


def test_online_lora_defaults_move_the_adapters(tmp_path, sdxl_dir, prompts, one_thread):
    """No --lr: an online LoRA run takes flow_grpo's 3e-4 with no warmup and no prompt dropout, so its adapters move
    (the offline full rule, 1e-8 x pairs per step, moved them 1e-8)."""
    import json
    import os
    import dpo
    from test_online import flags
    argv = [a for a in flags(tmp_path, sdxl_dir, prompts, "--lora", "4", steps=3)]
    for flag in ("--lr", "--warmup"):
        i = argv.index(flag)
        del argv[i:i + 2]
    dpo.main(argv)
    m = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert [r["lr"] for r in m] == [3e-4] * 3
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["args"]["prompt_dropout"] == 0.0 and ck["args"]["warmup"] == 0
    b = [v for k, v in ck["policy"].items() if "lora_B" in k]
    assert max(float(t.abs().max()) for t in b) > 1e-4  # B starts at 0


def test_ref_update_with_lora_and_ema(tmp_path, sdxl_dir, prompts, one_thread):
    """--ref_update with --lora: the reference takes the adapters of each refresh (it was refused); --ema keeps an
    average that resumes exactly and is saved in out_dir/ema/, which evaluate.py takes for the run folder."""
    import os
    import sample
    common = ("--lora", "2", "--ref_update", "1", "--ema", "0.5", "--ckpt_every", "1")
    full = run(tmp_path / "full", sdxl_dir, prompts, *common, steps=3)
    assert full[0]["ref_mse"] == full[0]["model_mse"] and full[1]["ref_mse"] != full[0]["ref_mse"]
    run(tmp_path / "cut", sdxl_dir, prompts, *common, steps=2)
    cut = run(tmp_path / "cut", sdxl_dir, prompts, *common, "--resume", steps=3)
    assert [m["loss"] for m in cut] == [m["loss"] for m in full]
    import safetensors.torch
    f = "pytorch_lora_weights.safetensors"
    last, avg = (safetensors.torch.load_file(str(tmp_path / "full" / d / f)) for d in ("lora", "ema/lora"))
    again = safetensors.torch.load_file(str(tmp_path / "cut" / "ema" / "lora" / f))
    assert all(torch.equal(avg[k], again[k]) for k in avg) and not all(torch.equal(avg[k], last[k]) for k in avg)
    assert sample.run_weights(str(tmp_path / "full")) == os.path.join(str(tmp_path / "full"), "ema")


def test_ties_are_trained_by_neither_path_and_sample_from_ref(tmp_path, sdxl_dir, prompts, monkeypatch, one_thread):
    """A group whose K images all score alike is written with label 0.5 (the offline reader drops it) and trains
    nothing online either; --sample_from ref samples the frozen reference, whatever the policy learns."""
    import json
    import toy
    monkeypatch.setattr(toy, "area", lambda images, prompts: torch.full((len(images),), 0.5))
    m = run(tmp_path / "ties", sdxl_dir, prompts, steps=1)
    assert m[0]["grad_norm"] == 0
    assert {json.loads(line)["label_0"] for line in open(tmp_path / "ties" / "pairs.jsonl")} == {0.5}
    monkeypatch.undo()
    rows = []
    for lr in ("1e-3", "1e-6"):
        run(tmp_path / lr, sdxl_dir, prompts, "--sample_from", "ref", "--lr", lr, steps=2)
        rows.append([(r["score_0"], r["score_1"]) for r in map(json.loads, open(tmp_path / lr / "pairs.jsonl"))])
    assert rows[0] == rows[1]


def test_two_ranks_match_one_rank_and_fsdp_matches_ddp(tmp_path, flux_dir, prompts):
    """GRPO with 2 prompts per step: 1 rank x 2 and 2 ranks x 1 (DDP, then FSDP2 over FLUX's blocks, in one torchrun:
    tests/ddp_runs.py) sample the same groups and train the same steps; NFT's old policy too under DDP."""
    import json
    import os
    import subprocess
    import sys
    import dpo
    from test_online import ENV, flags
    from tiny import ROOT
    keys = ("loss", "reward_mean", "reward_std", "clip_frac", "kl")
    for loss, modes in (("grpo", ("ddp", "fsdp")), ("nft", ("ddp",))):
        common = flags(tmp_path / "x", flux_dir, prompts, "--loss", loss, "--samples_per_prompt", "3",
                       "--sample_steps", "3", steps=2)
        dpo.main(common[:common.index("--out_dir")] + ["--out_dir", str(tmp_path / f"{loss}_one")] +
                 common[common.index("--out_dir") + 2:])
        common[common.index("--batch_size") + 1] = "1"
        i = common.index("--out_dir")
        del common[i:i + 2]
        argv = [a for m in modes for a in ("::", "--out_dir", str(tmp_path / f"{loss}_{m}"),
                                           *(["--fsdp"] if m == "fsdp" else []))]
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            os.path.join(ROOT, "tests", "ddp_runs.py"), *common, *argv], env=ENV, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        one = [json.loads(line) for line in open(tmp_path / f"{loss}_one" / "metrics.jsonl")]
        for m in modes:
            two = [json.loads(line) for line in open(tmp_path / f"{loss}_{m}" / "metrics.jsonl")]
            assert len(one) == len(two) == 2
            for a, b in zip(one, two):
                for k in keys:
                    if a.get(k) is not None:
                        assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), (loss, m, k, a, b)
                assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * max(1e-6, a["grad_norm"]), (loss, m, a, b)
