"""Beta schedules against independent float64 re-derivations (element by element, Python floats)."""
import math

import numpy as np
import pytest

from ddpm_jax import schedules

NAMES = ('linear', 'quad', 'warmup10', 'warmup50', 'const', 'jsd', 'cosine')


def reference_betas(name, beta_start, beta_end, num_steps):
    """Each beta from its closed form, one Python float at a time."""
    def ramp(i, n, lo, hi):  # i-th of n evenly spaced points from lo to hi
        return lo if n == 1 else lo + (hi - lo) * i / (n - 1)

    betas = []
    for i in range(num_steps):
        if name == 'linear':
            beta = ramp(i, num_steps, beta_start, beta_end)
        elif name == 'quad':
            beta = ramp(i, num_steps, math.sqrt(beta_start), math.sqrt(beta_end)) ** 2
        elif name in ('warmup10', 'warmup50'):
            warm = int(num_steps * (0.1 if name == 'warmup10' else 0.5))
            beta = ramp(i, warm, beta_start, beta_end) if i < warm else beta_end
        elif name == 'const':
            beta = beta_end
        elif name == 'jsd':
            beta = 1.0 / (num_steps - i)
        else:
            def alpha_bar(step):
                return math.cos((step / num_steps + 0.008) / 1.008 * math.pi / 2) ** 2
            beta = min(1.0 - alpha_bar(i + 1) / alpha_bar(i), 0.999)
        betas.append(beta)
    return np.array(betas, dtype=np.float64)


@pytest.mark.parametrize('num_steps', [1000, 7])
@pytest.mark.parametrize('name', NAMES)
def test_schedule_matches_reference(name, num_steps):
    betas = schedules.get_beta_schedule(name, beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=num_steps)
    assert betas.dtype == np.float64 and betas.shape == (num_steps,)
    np.testing.assert_allclose(betas, reference_betas(name, 1e-4, 0.02, num_steps), rtol=1e-12, atol=0)
    assert (betas > 0).all() and (betas <= 1).all()


def test_official_endpoints():
    linear = schedules.get_beta_schedule('linear', beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=1000)
    assert linear[0] == 1e-4 and linear[-1] == 0.02
    jsd = schedules.get_beta_schedule('jsd', beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=10)
    assert jsd[0] == 0.1 and jsd[-1] == 1.0
    warm = schedules.get_beta_schedule('warmup10', beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=100)
    assert warm[0] == 1e-4 and warm[9] == 0.02 and (warm[10:] == 0.02).all()


def test_cosine_follows_alpha_bar_and_is_capped():
    num_steps = 1000
    betas = schedules.get_beta_schedule('cosine', beta_start=0.0, beta_end=0.0, num_diffusion_timesteps=num_steps)
    assert betas.max() == 0.999  # the last step would be beta = 1 without the cap
    steps = np.arange(num_steps + 1) / num_steps
    alpha_bar = np.cos((steps + 0.008) / 1.008 * np.pi / 2) ** 2
    uncapped = slice(0, num_steps - 1)
    # prod(1 - beta) telescopes to alpha_bar(t) / alpha_bar(0) wherever no beta was capped.
    np.testing.assert_allclose(np.cumprod(1 - betas)[uncapped], (alpha_bar[1:] / alpha_bar[0])[uncapped],
                               rtol=1e-10)


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match='unknown beta schedule .*sigmoid.*linear, quad, warmup10, warmup50, '
                                         'const, jsd, cosine'):
        schedules.get_beta_schedule('sigmoid', beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=10)


@pytest.mark.parametrize('num_steps', [0, -3, 2.5])
def test_bad_num_steps(num_steps):
    with pytest.raises(ValueError, match='num_diffusion_timesteps'):
        schedules.get_beta_schedule('linear', beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=num_steps)
