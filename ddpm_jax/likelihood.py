"""The variational bound in bits/dim: Gaussian KL, the discretized Gaussian decoder, L_t, L_T, and the
full bound over all timesteps (paper Eqs. 5 and 13; official diffusion_utils_2.py `_vb_terms_bpd`, `_prior_bpd`,
`calc_bpd_loop`, and diffusion_utils.py / utils.py for `normal_kl` and the discretized decoder).

The decoder keeps the official tanh approximation of the normal CDF and the official 1e-12 floor on bin
masses, but computes the bin masses without the official float32 cancellation (see
`discretized_gaussian_log_likelihood`).
"""
import math

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion

# Official floor on a bin mass: per-dimension log-likelihoods are never below log(1e-12) = -27.63 nats.
MIN_BIN_MASS = 1e-12
# |standardized bin edge| beyond which the tanh-CDF tail is far below MIN_BIN_MASS (about exp(-7e10)):
# clamping there changes no floored result and keeps u^3 and its gradient finite.
_MAX_ABS_EDGE = 1e4


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (broadcasting inputs).

    The official 0.5 (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2)),
    rearranged with d = logvar1 - logvar2 as 0.5 (expm1(d) - d + ...): the same value, but exactly 0 for
    identical Gaussians and never negative in floating point (rounded expm1(d) >= d).
    """
    log_ratio = logvar1 - logvar2
    return 0.5 * (jnp.expm1(log_ratio) - log_ratio + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _tanh_cdf_argument(x):
    """z(x) = sqrt(2/pi) (x + 0.044715 x^3), so that the official CDF is 0.5 (1 + tanh(z)) = sigmoid(2z)."""
    return math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)


def approx_standard_normal_cdf(x):
    """The official tanh approximation of the standard normal CDF: 0.5 (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))."""
    return 0.5 * (1.0 + jnp.tanh(_tanh_cdf_argument(x)))


def _approx_cdf_tail_exact(x):
    """approx_standard_normal_cdf(x) computed as sigmoid(2 z(x)) (the same function, since
    0.5 (1 + tanh z) = sigmoid(2z)): exact to rounding in the lower tail, where 1 + tanh(z) cancels."""
    return jax.nn.sigmoid(2.0 * _tanh_cdf_argument(x))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """log P(x) under a Gaussian discretized to the 256 bins of uint8 data rescaled to [-1, 1] (paper Eq. 13).

    The bin of x is [x - 1/255, x + 1/255]; the edge bins (x < -0.999 and x > 0.999) extend to -inf and
    +inf. The CDF is the official tanh approximation F(u) = 0.5 (1 + tanh z(u)), and bin masses are
    floored at 1e-12 as in the official code (each dimension is capped at -log(1e-12) = 27.6 nats, with
    zero gradient there).

    Deviation from the official float32 arithmetic (same value in exact arithmetic): the official code
    forms F(hi) - F(lo) and 1 - F(lo) from two float32 numbers near 1, and 1 + tanh(z) near 0, which
    resolves bin masses only to about 6e-8 and is off by up to 11 nats for bins in either Gaussian tail.
    Here F(u) = sigmoid(2 z(u)), exact to rounding for u <= 0, and every tail mass is formed from
    lower-tail values only: a bin above the mean uses F(hi) - F(lo) = F(-lo) - F(-hi) (z is odd) and the
    top bin uses 1 - F(lo) = F(-lo). Bins at or below the mean keep the official difference F(hi) - F(lo).
    Where the official float32 result is accurate the two agree to float32 rounding.

    Args:
      x: [B, H, W, C] data in [-1, 1] on the uint8 grid.
      means: [B, H, W, C]; log_scales: broadcastable to x (log standard deviations).

    Returns:
      log-likelihoods [B, H, W, C] in nats.
    """
    if tuple(x.shape) != tuple(means.shape):
        raise ValueError(f'x and means must have the same shape, got {tuple(x.shape)} and {tuple(means.shape)}')
    try:
        broadcast_shape = jnp.broadcast_shapes(jnp.shape(log_scales), x.shape)
    except ValueError:
        broadcast_shape = None
    if broadcast_shape != tuple(x.shape):
        raise ValueError(f'log_scales must broadcast to the shape of x {tuple(x.shape)}, got '
                         f'{tuple(jnp.shape(log_scales))}')
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    lo = jnp.clip(inv_stdv * (centered - 1.0 / 255.0), -_MAX_ABS_EDGE, _MAX_ABS_EDGE)
    hi = jnp.clip(inv_stdv * (centered + 1.0 / 255.0), -_MAX_ABS_EDGE, _MAX_ABS_EDGE)
    bin_mass = jnp.where(lo > 0,
                         _approx_cdf_tail_exact(-lo) - _approx_cdf_tail_exact(-hi),
                         _approx_cdf_tail_exact(hi) - _approx_cdf_tail_exact(lo))
    cdf_plus = _approx_cdf_tail_exact(hi)                # lowest bin: F(hi)
    one_minus_cdf_min = _approx_cdf_tail_exact(-lo)      # highest bin: 1 - F(lo) = F(-lo)
    mass = jnp.where(x < -0.999, cdf_plus, jnp.where(x > 0.999, one_minus_cdf_min, bin_mass))
    return jnp.log(jnp.maximum(mass, MIN_BIN_MASS))


def vb_terms_bpd(d, model_output, x_start, x_t, t, *, clip_denoised):
    """The bound term L_t in bits/dim: the decoder NLL at t=0, else KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)).

    Args:
      d: GaussianDiffusion.
      model_output: [B, H, W, C or 2C]; x_start, x_t: [B, H, W, C]; t: [B] int.
      clip_denoised: clip predicted x_0 (True for evaluation, False in the `kl` training loss).

    Returns:
      (bpd [B], pred_xstart [B, H, W, C]).
    """
    true_mean, _, true_log_variance = diffusion.q_posterior_mean_variance(d, x_start, x_t, t)
    out = diffusion.p_mean_variance(d, model_output, x_t, t, clip_denoised=clip_denoised)
    kl = diffusion.meanflat(normal_kl(true_mean, true_log_variance, out['mean'], out['log_variance'])) / math.log(2.0)
    decoder_nll = -diffusion.meanflat(discretized_gaussian_log_likelihood(
        x_start, means=out['mean'], log_scales=0.5 * out['log_variance'])) / math.log(2.0)
    return jnp.where(jnp.asarray(t) == 0, decoder_nll, kl), out['pred_xstart']


def prior_bpd(d, x_start):
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim.

    Args: x_start [B, H, W, C]. Returns: [B].
    """
    t = jnp.full((x_start.shape[0],), d.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = diffusion.q_mean_variance(d, x_start, t)
    return diffusion.meanflat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)


def calc_bpd_loop(d, model_fn: diffusion.ModelFn, x_start, rng, *, clip_denoised=True):
    """The full bound per image, one lax.scan over t = T-1 .. 0 with one fresh x_t per timestep.

    Args:
      d: GaussianDiffusion.
      model_fn: (x [B, H, W, C], t [B] int32) -> model output; traced once.
      x_start: [B, H, W, C] data in [-1, 1].
      rng: a PRNG key; the noise of x_t at step t uses jax.random.fold_in(rng, t).
      clip_denoised: clip predicted x_0 (official evaluation default True).

    Returns:
      dict(total_bpd [B] = sum_t terms_bpd + prior_bpd, terms_bpd [B, T], prior_bpd [B],
           mse [B, T] = meanflat((pred_xstart - x_start)^2) per timestep).
    """
    batch = x_start.shape[0]

    def step(_, t):
        t_batch = jnp.full((batch,), t, dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(rng, t), x_start.shape, dtype=x_start.dtype)
        x_t = diffusion.q_sample(d, x_start, t_batch, noise)
        term, pred_xstart = vb_terms_bpd(d, model_fn(x_t, t_batch), x_start, x_t, t_batch,
                                         clip_denoised=clip_denoised)
        return None, (term, diffusion.meanflat(jnp.square(pred_xstart - x_start)))

    _, (terms, mses) = jax.lax.scan(step, None, jnp.arange(d.num_timesteps - 1, -1, -1, dtype=jnp.int32))
    terms_bpd = jnp.flip(terms, axis=0).T
    mse = jnp.flip(mses, axis=0).T
    prior = prior_bpd(d, x_start)
    return dict(total_bpd=jnp.sum(terms_bpd, axis=1) + prior, terms_bpd=terms_bpd, prior_bpd=prior, mse=mse)
