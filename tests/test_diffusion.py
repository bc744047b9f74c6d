"""diffusion.py against diffusers: the schedulers step by step on a deterministic stand-in model (Euler and DDIM,
every timestep spacing, epsilon and v-prediction, SDEdit's add_noise at a later start)."""
import pytest
import torch

import diffusion
import families
import tiny


CFG = tiny.SD_SCHEDULER


def fake_model(x, t):
    """A deterministic stand-in for a UNet, so scheduler chains can be compared without one."""
    return 0.7 * torch.tanh(x) + 0.1 * torch.cos(x * float(t) / 100)


def run_chain(ours, ref, x):
    """The same toy model through our scheduler and diffusers', step by step."""
    y = x.clone()
    for i, t in enumerate(ref.timesteps):
        assert float(ours.timesteps[i]) == float(t)
        x = ref.step(fake_model(ref.scale_model_input(x, t), t), t, x).prev_sample
        y = ours.step(fake_model(ours.scale_input(y, i), ours.timesteps[i]), i, y)
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5 * x.abs().max().item())
    return x


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 4, 30])
def test_euler_matches_diffusers(spacing, pred, steps):
    from diffusers import EulerDiscreteScheduler
    cfg = dict(families.SD_SCHEDULE, **CFG, timestep_spacing=spacing, prediction_type=pred)
    ref = EulerDiscreteScheduler(**CFG, timestep_spacing=spacing, prediction_type=pred)
    ref.set_timesteps(steps)
    ours = diffusion.Euler(cfg, steps)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=1e-6, atol=0)
    assert abs(float(ours.init_sigma) - float(ref.init_noise_sigma)) <= 1e-6 * float(ref.init_noise_sigma)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * float(ref.init_noise_sigma)
    run_chain(ours, ref, x)
    # add_noise at a later start (SDEdit): the scheduler's sigma at that step
    i = steps // 2
    ref = EulerDiscreteScheduler(**CFG, timestep_spacing=spacing, prediction_type=pred)  # fresh: no step index yet
    ref.set_timesteps(steps)
    ref.set_begin_index(i)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(ours.add_noise(x0, noise, i), ref.add_noise(x0, noise, ref.timesteps[i:i + 1]))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("pred,alpha_one,clip", [("epsilon", False, False), ("v_prediction", False, False),
                                                 ("epsilon", True, True)])
@pytest.mark.parametrize("steps", [1, 4, 30])
def test_ddim_matches_diffusers(spacing, pred, alpha_one, clip, steps):
    from diffusers import DDIMScheduler
    kw = dict(timestep_spacing=spacing, prediction_type=pred, set_alpha_to_one=alpha_one, clip_sample=clip)
    ref = DDIMScheduler(**CFG, **kw)
    ref.set_timesteps(steps)
    ours = diffusion.DDIM(dict(families.SD_SCHEDULE, **CFG, **kw), steps)
    assert ours.init_sigma == ref.init_noise_sigma == 1.0
    run_chain(ours, ref, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    i = steps // 2
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(ours.add_noise(x0, noise, i), ref.add_noise(x0, noise, ref.timesteps[i:i + 1]))


# ----------------------------------------------------------------------------------------------------
# Rectified flow: against diffusers' FlowMatchEulerDiscreteScheduler, training_utils and the FLUX pipeline


@pytest.mark.parametrize("cfg,steps,tokens", [(dict(shift=3.0), 28, None), (dict(shift=1.0), 4, None),
                                              (dict(shift=3.0, use_dynamic_shifting=True), 28, 4096),
                                              (dict(shift=3.0, use_dynamic_shifting=True), 50, 1024)])
def test_flow_euler_is_diffusers(cfg, steps, tokens):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    cfg = dict(diffusion.FLOW_SCHEDULE, **cfg)
    ref = FlowMatchEulerDiscreteScheduler(**cfg)
    mu = None
    if tokens is not None:
        mu = diffusion.flux_mu(tokens, cfg)
        assert mu == pytest.approx(calculate_shift(tokens, 256, 4096, 0.5, 1.15), abs=1e-12)
    ref.set_timesteps(steps, mu=mu)
    ours = diffusion.FlowEuler(cfg, steps, mu=mu)
    assert torch.equal(ours.sigmas, ref.sigmas) and torch.equal(ours.timesteps, ref.timesteps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 4, generator=g)
    y = x.clone()
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(2, 16, 4, 4, generator=g)
        x = ref.step(v, t, x).prev_sample
        y = ours.step(v, i, y)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["logit_normal", "mode", "uniform"])
def test_training_sigmas_are_the_scripts(kind):
    """u as compute_density_for_timestep_sampling draws it; sigma as train_dreambooth_sd3.py / _flux.py take it."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling
    u = diffusion.density(kind, 4096, torch.Generator().manual_seed(3))
    want = compute_density_for_timestep_sampling(kind, 4096, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                                 generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(u, want)
    assert 0 < u.min() and u.max() < 1 and u.std() > 0.1
    for cfg in (dict(shift=3.0), dict(shift=3.0, use_dynamic_shifting=True)):  # SD3's; FLUX's (no static shift)
        cfg = dict(diffusion.FLOW_SCHEDULE, **cfg)
        sched = FlowMatchEulerDiscreteScheduler(**cfg)
        idx = (u * cfg["num_train_timesteps"]).long()
        torch.testing.assert_close(diffusion.training_sigmas(u, cfg), sched.sigmas[idx], rtol=0, atol=1e-7)


def test_flow_forward_process_and_target():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    sigma = torch.tensor([0.0, 0.25, 1.0])
    x = diffusion.flow_forward(x0, eps, sigma)
    assert torch.equal(x[0], x0[0]) and torch.equal(x[2], eps[2])
    torch.testing.assert_close(x[1], 0.75 * x0[1] + 0.25 * eps[1])
    # one exact Euler step along the target velocity goes from x_sigma to x_0 (the path is straight)
    torch.testing.assert_close(x - sigma.view(-1, 1, 1, 1) * diffusion.flow_target(x0, eps), x0)
    with pytest.raises(ValueError, match="needs mu"):
        diffusion.FlowEuler(dict(diffusion.FLOW_SCHEDULE, use_dynamic_shifting=True), 4)
