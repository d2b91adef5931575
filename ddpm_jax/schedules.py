"""Beta schedules of the forward diffusion process, as float64 numpy arrays.

Official semantics (diffusion_tf/diffusion_utils_2.py, `get_beta_schedule`) for `linear`, `quad`,
`warmup10`, `warmup50`, `const` and `jsd`, plus `cosine` from Nichol & Dhariwal 2021 (Improved DDPM).
Index i of the returned array is the code timestep t = i (the paper's t = i + 1).
"""
import math

import numpy as np

BETA_SCHEDULES = ('linear', 'quad', 'warmup10', 'warmup50', 'const', 'jsd', 'cosine')

# Improved DDPM: the offset s keeps beta_1 from being vanishingly small; betas are capped at 0.999
# so that the last steps near alpha_bar = 0 do not become singular.
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999


def _warmup_betas(beta_start, beta_end, num_diffusion_timesteps, warmup_frac):
    """All `beta_end`, except a linear ramp from `beta_start` over the first int(T * warmup_frac) steps."""
    betas = beta_end * np.ones(num_diffusion_timesteps, dtype=np.float64)
    warmup_time = int(num_diffusion_timesteps * warmup_frac)
    betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
    return betas


def _cosine_betas(num_diffusion_timesteps):
    """beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), 0.999), alpha_bar(u) = cos((u+s)/(1+s) * pi/2)^2."""
    steps = np.arange(num_diffusion_timesteps + 1, dtype=np.float64) / num_diffusion_timesteps
    alpha_bar = np.cos((steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
    return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], COSINE_MAX_BETA)


def get_beta_schedule(name, *, beta_start, beta_end, num_diffusion_timesteps):
    """The betas of a named schedule, float64 [T] with T = num_diffusion_timesteps.

    Args:
      name: one of BETA_SCHEDULES.
        linear:   linspace(beta_start, beta_end, T).
        quad:     linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2.
        warmup10 / warmup50: beta_end everywhere except a linear ramp from beta_start over the first
                  10% / 50% of the steps.
        const:    beta_end everywhere.
        jsd:      1/T, 1/(T-1), ..., 1 (beta_start and beta_end are ignored).
        cosine:   Nichol & Dhariwal 2021 with s = 0.008, betas capped at 0.999 (beta_start and beta_end
                  are ignored).
      beta_start, beta_end: floats (see above).
      num_diffusion_timesteps: T, a positive int.

    Returns:
      np.ndarray float64 [T].

    Raises:
      ValueError: an unknown name (the message lists the allowed ones) or T < 1.
    """
    if name not in BETA_SCHEDULES:
        raise ValueError(f'unknown beta schedule {name!r}; allowed: {", ".join(BETA_SCHEDULES)}')
    if int(num_diffusion_timesteps) != num_diffusion_timesteps or num_diffusion_timesteps < 1:
        raise ValueError(f'num_diffusion_timesteps must be a positive int, got {num_diffusion_timesteps!r}')
    num_diffusion_timesteps = int(num_diffusion_timesteps)
    if name == 'quad':
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_diffusion_timesteps, dtype=np.float64) ** 2
    elif name == 'linear':
        betas = np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)
    elif name == 'warmup10':
        betas = _warmup_betas(beta_start, beta_end, num_diffusion_timesteps, 0.1)
    elif name == 'warmup50':
        betas = _warmup_betas(beta_start, beta_end, num_diffusion_timesteps, 0.5)
    elif name == 'const':
        betas = beta_end * np.ones(num_diffusion_timesteps, dtype=np.float64)
    elif name == 'jsd':
        betas = 1.0 / np.linspace(num_diffusion_timesteps, 1, num_diffusion_timesteps, dtype=np.float64)
    else:
        betas = _cosine_betas(num_diffusion_timesteps)
    assert betas.shape == (num_diffusion_timesteps,)
    return betas


def betas_from_config(diffusion_config):
    """`get_beta_schedule` of config.diffusion (or any object with its beta_schedule, beta_start, beta_end and
    num_diffusion_timesteps attributes, e.g. `diffusion.DiffusionSettings`): float64 [T]."""
    return get_beta_schedule(diffusion_config.beta_schedule, beta_start=diffusion_config.beta_start,
                             beta_end=diffusion_config.beta_end,
                             num_diffusion_timesteps=diffusion_config.num_diffusion_timesteps)
