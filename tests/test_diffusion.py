"""diffusion.py against diffusers: the schedulers step by step on a deterministic stand-in model (Euler and DDIM,
every timestep spacing, epsilon and v-prediction, SDEdit's add_noise at a later start)."""
import pytest
import torch

import diffusion
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
    cfg = dict(diffusion.SD_SCHEDULE, **CFG, timestep_spacing=spacing, prediction_type=pred)
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
    ours = diffusion.DDIM(dict(diffusion.SD_SCHEDULE, **CFG, **kw), steps)
    assert ours.init_sigma == ref.init_noise_sigma == 1.0
    run_chain(ours, ref, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    i = steps // 2
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(ours.add_noise(x0, noise, i), ref.add_noise(x0, noise, ref.timesteps[i:i + 1]))
