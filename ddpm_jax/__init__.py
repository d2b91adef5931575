"""ddpm_jax: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020) in JAX/Flax.

The public API: the pure diffusion core (`schedules`, `diffusion`, `likelihood`, `losses`) and the U-Net.
Training, evaluation, data and checkpoints live in their modules (`ddpm_jax.train`, `ddpm_jax.evaluation`,
`ddpm_jax.data`, `ddpm_jax.checkpoint`) and are driven by `python -m ddpm_jax.main`. Importing this
package needs neither TensorFlow nor PyTorch. It lowers `jax.random`'s threefry unrolled on CPU, as JAX does on
GPU and TPU (`xla_cpu.unroll_threefry`: the same random bits, produced faster), for the whole process.
"""
from ddpm_jax import diffusion, likelihood, losses, schedules, xla_cpu
from ddpm_jax.diffusion import (
    DiffusionSettings,
    GaussianDiffusion,
    diffusion_from_config,
    diffusion_from_settings,
    make_diffusion,
    p_mean_variance,
    p_sample,
    p_sample_loop,
    p_sample_loop_progressive,
    p_sample_range,
    predict_xstart_from_eps,
    predict_xstart_from_xprev,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
)
from ddpm_jax.likelihood import (
    approx_standard_normal_cdf,
    calc_bpd_loop,
    discretized_gaussian_log_likelihood,
    normal_kl,
    prior_bpd,
    vb_terms_bpd,
)
from ddpm_jax.losses import training_losses
from ddpm_jax.models.unet import UNet, create_model
from ddpm_jax.schedules import betas_from_config, get_beta_schedule

xla_cpu.unroll_threefry()

__all__ = [
    'DiffusionSettings', 'GaussianDiffusion', 'UNet', 'approx_standard_normal_cdf', 'betas_from_config',
    'calc_bpd_loop', 'create_model', 'diffusion', 'diffusion_from_config', 'diffusion_from_settings',
    'discretized_gaussian_log_likelihood', 'get_beta_schedule', 'likelihood', 'losses', 'make_diffusion', 'normal_kl',
    'p_mean_variance', 'p_sample', 'p_sample_loop', 'p_sample_loop_progressive', 'p_sample_range',
    'predict_xstart_from_eps', 'predict_xstart_from_xprev', 'prior_bpd', 'q_mean_variance',
    'q_posterior_mean_variance', 'q_sample', 'schedules', 'training_losses', 'vb_terms_bpd',
]
__version__ = '0.1.0'
