"""Training losses of a `diffusion.GaussianDiffusion`, selected by its loss_type.

mse is the paper's L_simple (Sec. 3.4, Eq. 14; official diffusion_utils_2.py `training_losses`, loss_type
'mse'); kl is the bound term L_t (Eq. 5; official loss_type 'kl'); hybrid is Improved DDPM's L_simple +
lambda L_vlb (Nichol & Dhariwal 2021, Sec. 3.1), not in the official code.
"""
import jax
import jax.numpy as jnp

from ddpm_jax import diffusion, likelihood


def training_losses(d, model_output, x_start, x_t, t, noise):
    """Per-example training loss of the model's output at x_t = q_sample(x_start, t, noise).

    loss_type
      mse:    meanflat((target - mean output)^2), target = noise (eps), x_start (xstart) or the posterior
              mean (xprev). For eps this is L_simple.
      kl:     the bound term L_t in bits/dim (`likelihood.vb_terms_bpd`, clip_denoised=False).
      hybrid: mse + hybrid_lambda * T * L_t, with L_t evaluated on the mean output under stop_gradient so
              that it trains only the variance. T * L_t is the one-sample estimate of the full bound
              L_vlb = sum_t L_t under uniform t, so hybrid_lambda = 0.001 is Improved DDPM's lambda.

    Args: d: GaussianDiffusion; model_output [B, H, W, C or 2C]; x_start, x_t, noise [B, H, W, C]; t [B] int.
    Returns: loss [B] (float32; float64 when the tables are float64).
    """
    diffusion.check_same_shape('x_start', x_start, 'x_t', x_t)
    diffusion.check_same_shape('x_start', x_start, 'noise', noise)
    mean_output, var_output = diffusion.split_model_output(d, model_output, x_t)
    if d.loss_type == 'kl':
        return likelihood.vb_terms_bpd(d, model_output, x_start, x_t, t, clip_denoised=False)[0]
    if d.model_mean_type == 'eps':
        target = noise
    elif d.model_mean_type == 'xstart':
        target = x_start
    else:
        target, _, _ = diffusion.q_posterior_mean_variance(d, x_start, x_t, t)
    loss = diffusion.meanflat(jnp.square(target - mean_output))
    if d.loss_type == 'hybrid':
        frozen_output = jnp.concatenate([jax.lax.stop_gradient(mean_output), var_output], axis=-1)
        bound_term = likelihood.vb_terms_bpd(d, frozen_output, x_start, x_t, t, clip_denoised=False)[0]
        loss = loss + d.hybrid_lambda * d.num_timesteps * bound_term
    return loss
