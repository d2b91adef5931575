"""ddpm_jax: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020) in JAX/Flax.

The public API: the pure diffusion core (`schedules`, `diffusion`, `likelihood`) and the U-Net.
Training, evaluation, data and checkpoints live in their modules (`ddpm_jax.train`, `ddpm_jax.evaluation`,
`ddpm_jax.data`, `ddpm_jax.checkpoint`) and are driven by `python -m ddpm_jax.main`. Importing this
package needs neither TensorFlow nor PyTorch.
"""
from ddpm_jax import diffusion, likelihood, schedules
from ddpm_jax.diffusion import (GaussianDiffusion, diffusion_from_config, make_diffusion, p_mean_variance,
                                p_sample, p_sample_loop, p_sample_loop_progressive, predict_xstart_from_eps,
                                predict_xstart_from_xprev, q_mean_variance, q_posterior_mean_variance, q_sample,
                                training_losses)
from ddpm_jax.likelihood import (approx_standard_normal_cdf, calc_bpd_loop, discretized_gaussian_log_likelihood,
                                 normal_kl, prior_bpd, vb_terms_bpd)
from ddpm_jax.models.unet import UNet, create_model
from ddpm_jax.schedules import get_beta_schedule

__version__ = '0.1.0'
