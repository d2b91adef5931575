"""Gaussian diffusion (DDPM): forward process, posterior, reverse step and the ancestral sampler.

Pure functions over a `GaussianDiffusion` pytree of coefficient tables (paper Sec. 2-3; the training losses
are in `losses`, the bound in `likelihood`). Semantics follow the official `GaussianDiffusion2`
(diffusion_tf/diffusion_utils_2.py), quirks included:

* the tables are computed in float64 numpy and converted once to the default float dtype (float32,
  or float64 under `jax.enable_x64(True)`), like the official float32 cast at use;
* `fixedlarge` uses log(posterior_variance[1]) as the log-variance at t=0 (its `variance` still holds
  betas[0]);
* `p_sample` adds no noise at t=0, so a sample ends on the decoder mean;
* predicted x0 is clipped to [-1, 1] in sampling and in the bound evaluation (`clip_denoised=True`), but
  not in the `kl` and `hybrid` training losses.

Additions beyond the official code: the `learned_range` variance and the `hybrid` loss of Improved DDPM
(Nichol & Dhariwal 2021).

Timesteps are the code's t in {0..T-1} (paper t = code t + 1); images are [B, H, W, C] in [-1, 1].
Per-step functions take the model's output array; loops take `model_fn(x [B,H,W,C], t [B] int32) -> output`.

Randomness in the loops: x_T is drawn with `jax.random.fold_in(rng, T)` and the noise added at step t
with `jax.random.fold_in(rng, t)`, so every draw is a function of (rng, t) only.
"""
import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import config_files, schedules

MODEL_MEAN_TYPES = ('eps', 'xstart', 'xprev')
MODEL_VAR_TYPES = ('fixedsmall', 'fixedlarge', 'learned', 'learned_range')
LOSS_TYPES = ('mse', 'kl', 'hybrid')
LEARNED_VAR_TYPES = ('learned', 'learned_range')

Array = Any
ModelFn = Callable[[Array, Array], Array]


@flax.struct.dataclass
class GaussianDiffusion:
    """Coefficient tables [T] (jnp, default float dtype) and the static choice of parameterisation.

    Valid as a jit argument: the tables are pytree leaves, the remaining fields are static.
    Build it with `make_diffusion` or `diffusion_from_config`.
    """
    betas: Array
    log_betas: Array
    alphas_cumprod: Array
    alphas_cumprod_prev: Array
    sqrt_alphas_cumprod: Array
    sqrt_one_minus_alphas_cumprod: Array
    log_one_minus_alphas_cumprod: Array
    sqrt_recip_alphas_cumprod: Array
    sqrt_recipm1_alphas_cumprod: Array
    posterior_variance: Array
    posterior_log_variance_clipped: Array    # index 0 holds index 1's value (posterior_variance[0] = 0)
    posterior_mean_coef1: Array
    posterior_mean_coef2: Array
    recip_posterior_mean_coef1: Array        # 1 / coef1, for predict_xstart_from_xprev
    posterior_mean_coef2_over_coef1: Array   # coef2 / coef1, for predict_xstart_from_xprev
    fixedlarge_log_variance: Array           # log(append(posterior_variance[1], betas[1:]))
    model_mean_type: str = flax.struct.field(pytree_node=False, default='eps')
    model_var_type: str = flax.struct.field(pytree_node=False, default='fixedlarge')
    loss_type: str = flax.struct.field(pytree_node=False, default='mse')
    num_timesteps: int = flax.struct.field(pytree_node=False, default=1000)
    hybrid_lambda: float = flax.struct.field(pytree_node=False, default=0.001)


def check_choice(kind, value, allowed):
    """ValueError listing the allowed values unless value is one of them."""
    if value not in allowed:
        raise ValueError(f'unknown {kind} {value!r}; allowed: {", ".join(allowed)}')


def make_diffusion(betas, *, model_mean_type, model_var_type, loss_type, hybrid_lambda=0.001):
    """Builds the coefficient tables from the betas.

    Args:
      betas: float [T], 0 < beta <= 1 (as from `schedules.get_beta_schedule`).
      model_mean_type: what the model predicts: 'eps' (the noise), 'xstart' (x_0) or 'xprev' (the
        posterior mean of x_{t-1}).
      model_var_type: 'fixedsmall' (beta-tilde_t), 'fixedlarge' (beta_t), 'learned' (the model outputs
        the log-variance in extra channels) or 'learned_range' (the model outputs v in [-1, 1] in extra
        channels; log-variance = frac * log(beta_t) + (1 - frac) * log(beta-tilde_t clipped),
        frac = (v + 1) / 2, Improved DDPM).
      loss_type: 'mse' (official, L_simple for eps), 'kl' (the bound term in bits/dim) or 'hybrid'
        (mse + hybrid_lambda * T * bound term with the mean frozen; Improved DDPM).
      hybrid_lambda: weight of the bound estimate in the 'hybrid' loss.

    Returns:
      GaussianDiffusion with tables in the default float dtype.

    Raises:
      ValueError: unknown names, betas outside (0, 1] or not 1-D, a learned variance with the 'mse' loss
        (nothing would train the variance channels), or 'hybrid' with a fixed variance (the bound term
        would train nothing).
    """
    check_choice('model_mean_type', model_mean_type, MODEL_MEAN_TYPES)
    check_choice('model_var_type', model_var_type, MODEL_VAR_TYPES)
    check_choice('loss_type', loss_type, LOSS_TYPES)
    if loss_type == 'mse' and model_var_type in LEARNED_VAR_TYPES:
        raise ValueError(
            f"loss_type='mse' cannot train model_var_type={model_var_type!r}: the mse loss only sees the mean "
            "output, so the variance channels would get no gradient; use loss_type='hybrid' or 'kl'")
    if loss_type == 'hybrid' and model_var_type not in LEARNED_VAR_TYPES:
        raise ValueError(
            f"loss_type='hybrid' needs a learned variance (model_var_type in {LEARNED_VAR_TYPES}), got "
            f"{model_var_type!r}: its bound term trains only the variance; use loss_type='mse'")
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 2:
        raise ValueError(f'betas must have shape [T] with T >= 2, got shape {betas.shape}')
    if not ((betas > 0).all() and (betas <= 1).all()):
        raise ValueError(f'betas must lie in (0, 1], got min {betas.min()} and max {betas.max()}')

    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)
    # A final beta of 1 (the jsd schedule) makes alpha_bar[T-1] = 0: x_T then carries no information
    # about x_0, and the x0-from-x_t coefficients at t = T-1 are infinite, exactly as in the official code.
    with np.errstate(divide='ignore'):
        tables = dict(
            betas=betas,
            log_betas=np.log(betas),
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            posterior_mean_coef1=coef1,
            posterior_mean_coef2=coef2,
            recip_posterior_mean_coef1=1.0 / coef1,
            posterior_mean_coef2_over_coef1=coef2 / coef1,
            fixedlarge_log_variance=np.log(np.append(posterior_variance[1], betas[1:])),
        )
    float_dtype = jnp.result_type(float)
    return GaussianDiffusion(
        **{name: jnp.asarray(table, dtype=float_dtype) for name, table in tables.items()},
        model_mean_type=model_mean_type, model_var_type=model_var_type, loss_type=loss_type,
        num_timesteps=int(betas.shape[0]), hybrid_lambda=float(hybrid_lambda))


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
    """config.diffusion as typed values (one field per key); build it once with `from_config`."""
    beta_schedule: str
    beta_start: float
    beta_end: float
    num_diffusion_timesteps: int
    model_mean_type: str
    model_var_type: str
    loss_type: str
    hybrid_lambda: float

    @classmethod
    def from_config(cls, diffusion_config) -> 'DiffusionSettings':
        """Reads config.diffusion; ValueError naming config.diffusion.<key> when a key is missing or mistyped."""
        return config_files.typed_section(cls, diffusion_config, 'diffusion')


def diffusion_from_settings(settings: DiffusionSettings) -> GaussianDiffusion:
    """`make_diffusion` of the schedule and parameterisation that `settings` names."""
    return make_diffusion(schedules.betas_from_config(settings), model_mean_type=settings.model_mean_type,
                          model_var_type=settings.model_var_type, loss_type=settings.loss_type,
                          hybrid_lambda=settings.hybrid_lambda)


def diffusion_from_config(config) -> GaussianDiffusion:
    """The diffusion of config.diffusion (the boundary adapter of `diffusion_from_settings`)."""
    return diffusion_from_settings(DiffusionSettings.from_config(config.diffusion))


def check_same_shape(name_a, a, name_b, b):
    """ValueError naming both arrays unless a and b have the same shape."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f'{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}')


def extract(table, t, x_shape):
    """table[t] reshaped to [B, 1, ..., 1] so that it broadcasts against x of shape x_shape = [B, ...]."""
    t = jnp.asarray(t)
    if t.ndim != 1 or len(x_shape) < 1 or t.shape[0] != x_shape[0]:
        raise ValueError(f't must have shape [B] matching x of shape [B, ...], got t shape {tuple(t.shape)} and '
                         f'x shape {tuple(x_shape)}')
    return table[t].reshape((t.shape[0],) + (1,) * (len(x_shape) - 1))


def meanflat(x):
    """Mean over all axes but the first: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def q_mean_variance(d, x_start, t):
    """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).

    Args: x_start [B, H, W, C]; t [B] int.
    Returns: (mean [B, H, W, C], variance [B, 1, 1, 1], log_variance [B, 1, 1, 1]).
    """
    mean = extract(d.sqrt_alphas_cumprod, t, x_start.shape) * x_start
    variance = extract(1.0 - d.alphas_cumprod, t, x_start.shape)
    log_variance = extract(d.log_one_minus_alphas_cumprod, t, x_start.shape)
    return mean, variance, log_variance


def q_sample(d, x_start, t, noise):
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise (paper Eq. 4).

    Args: x_start, noise [B, H, W, C]; t [B] int. Returns: x_t [B, H, W, C].
    """
    check_same_shape('x_start', x_start, 'noise', noise)
    return (extract(d.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract(d.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)


def q_posterior_mean_variance(d, x_start, x_t, t):
    """q(x_{t-1} | x_t, x_0) (paper Eqs. 6-7).

    Args: x_start, x_t [B, H, W, C]; t [B] int.
    Returns: (mean [B, H, W, C], variance [B, 1, 1, 1], log_variance_clipped [B, 1, 1, 1]); at t=0 the
      variance is 0 and the clipped log-variance is log(posterior_variance[1]).
    """
    check_same_shape('x_start', x_start, 'x_t', x_t)
    mean = (extract(d.posterior_mean_coef1, t, x_t.shape) * x_start
            + extract(d.posterior_mean_coef2, t, x_t.shape) * x_t)
    variance = extract(d.posterior_variance, t, x_t.shape)
    log_variance_clipped = extract(d.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance_clipped


def predict_xstart_from_eps(d, x_t, t, eps):
    """x_0 = sqrt(1/alpha_bar_t) x_t - sqrt(1/alpha_bar_t - 1) eps (inverts q_sample).

    Args: x_t, eps [B, H, W, C]; t [B] int. Returns: x_0 [B, H, W, C].
    """
    check_same_shape('x_t', x_t, 'eps', eps)
    return (extract(d.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract(d.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)


def predict_xstart_from_xprev(d, x_t, t, xprev):
    """x_0 = (1/coef1_t) x_{t-1} - (coef2_t/coef1_t) x_t (inverts the posterior mean).

    Args: x_t, xprev [B, H, W, C]; t [B] int. Returns: x_0 [B, H, W, C].
    """
    check_same_shape('x_t', x_t, 'xprev', xprev)
    return (extract(d.recip_posterior_mean_coef1, t, x_t.shape) * xprev
            - extract(d.posterior_mean_coef2_over_coef1, t, x_t.shape) * x_t)


def split_model_output(d, model_output, x_t):
    """(mean part [B, H, W, C], variance part [B, H, W, C] or None) of the model output."""
    expected_channels = 2 * x_t.shape[-1] if d.model_var_type in LEARNED_VAR_TYPES else x_t.shape[-1]
    expected_shape = tuple(x_t.shape[:-1]) + (expected_channels,)
    if tuple(model_output.shape) != expected_shape:
        raise ValueError(f'model_output must have shape {expected_shape} for x_t of shape {tuple(x_t.shape)} and '
                         f'model_var_type={d.model_var_type!r}, got {tuple(model_output.shape)}')
    if d.model_var_type in LEARNED_VAR_TYPES:
        return jnp.split(model_output, 2, axis=-1)
    return model_output, None


def p_mean_variance(d, model_output, x_t, t, *, clip_denoised):
    """The reverse-process Gaussian p(x_{t-1} | x_t) given the model's output.

    Args:
      model_output: [B, H, W, C], or [B, H, W, 2C] for learned variances (mean part first).
      x_t: [B, H, W, C]; t: [B] int.
      clip_denoised: clip the predicted x_0 to [-1, 1] (for 'xprev' the mean itself stays unclipped).

    Returns:
      dict(mean, variance, log_variance, pred_xstart), each [B, H, W, C]. For 'fixedlarge' at t=0,
      log_variance is log(posterior_variance[1]) while variance is betas[0] (official quirk; only the
      log-variance is used downstream).
    """
    mean_output, var_output = split_model_output(d, model_output, x_t)
    shape = x_t.shape
    if d.model_var_type == 'learned':
        log_variance = var_output
    elif d.model_var_type == 'learned_range':
        frac = (var_output + 1.0) / 2.0
        log_variance = (frac * extract(d.log_betas, t, shape)
                        + (1.0 - frac) * extract(d.posterior_log_variance_clipped, t, shape))
    elif d.model_var_type == 'fixedsmall':
        log_variance = jnp.broadcast_to(extract(d.posterior_log_variance_clipped, t, shape), shape)
    else:
        log_variance = jnp.broadcast_to(extract(d.fixedlarge_log_variance, t, shape), shape)
    if d.model_var_type == 'fixedsmall':
        variance = jnp.broadcast_to(extract(d.posterior_variance, t, shape), shape)
    elif d.model_var_type == 'fixedlarge':
        variance = jnp.broadcast_to(extract(d.betas, t, shape), shape)
    else:
        variance = jnp.exp(log_variance)

    def maybe_clip(x):
        return jnp.clip(x, -1.0, 1.0) if clip_denoised else x

    if d.model_mean_type == 'xprev':
        pred_xstart = maybe_clip(predict_xstart_from_xprev(d, x_t, t, mean_output))
        mean = mean_output
    else:
        if d.model_mean_type == 'xstart':
            pred_xstart = maybe_clip(mean_output)
        else:
            pred_xstart = maybe_clip(predict_xstart_from_eps(d, x_t, t, mean_output))
        mean, _, _ = q_posterior_mean_variance(d, pred_xstart, x_t, t)
    return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)


def _p_sample_with_pred_xstart(d, model_output, x_t, t, noise, clip_denoised):
    check_same_shape('x_t', x_t, 'noise', noise)
    out = p_mean_variance(d, model_output, x_t, t, clip_denoised=clip_denoised)
    nonzero_mask = (jnp.asarray(t) != 0).reshape((x_t.shape[0],) + (1,) * (x_t.ndim - 1))
    sample = out['mean'] + nonzero_mask * jnp.exp(0.5 * out['log_variance']) * noise
    return sample, out['pred_xstart']


def p_sample(d, model_output, x_t, t, noise, *, clip_denoised=True):
    """One ancestral step: x_{t-1} = mean + [t != 0] * exp(log_variance / 2) * noise (no noise at t=0).

    Args: model_output [B, H, W, C or 2C]; x_t, noise [B, H, W, C]; t [B] int.
    Returns: x_{t-1} [B, H, W, C].
    """
    return _p_sample_with_pred_xstart(d, model_output, x_t, t, noise, clip_denoised)[0]


def check_sample_shape(shape):
    """The sample shape [B, ...] as a tuple of ints; ValueError when it has fewer than two axes."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f'shape must be [B, ...] (e.g. [B, H, W, C]), got {shape}')
    return shape


def _ancestral_steps(d, model_fn: ModelFn, x, rng, *, t_start, t_stop, clip_denoised, share_noise_across_batch,
                     record=None, record_init=None):
    """The one ancestral loop: p_sample at t = t_start, ..., t_stop as one lax.fori_loop.

    The noise of step t is normal(fold_in(rng, t)) of shape x.shape (or [1, H, W, C] broadcast over the
    batch with share_noise_across_batch). `record(state, t, pred_xstart) -> state` folds each step's
    predicted x_0 into a state that starts at record_init. Returns (x_{t_stop - 1}, state).
    """
    shape = x.shape
    noise_shape = (1,) + shape[1:] if share_noise_across_batch else shape
    num_steps = t_start - t_stop + 1
    num_steps = max(num_steps, 0) if isinstance(num_steps, int) else jnp.maximum(num_steps, 0)

    def body(i, carry):
        x, state = carry
        t_scalar = t_start - i
        t = jnp.full((shape[0],), t_scalar, dtype=jnp.int32)
        noise = jnp.broadcast_to(jax.random.normal(jax.random.fold_in(rng, t_scalar), noise_shape, x.dtype), shape)
        x_prev, pred_xstart = _p_sample_with_pred_xstart(d, model_fn(x, t), x, t, noise, clip_denoised)
        if record is not None:
            state = record(state, t_scalar, pred_xstart)
        return x_prev.astype(x.dtype), state

    return jax.lax.fori_loop(0, num_steps, body, (x, record_init))


def p_sample_range(d, model_fn: ModelFn, x, rng, *, t_start, t_stop=0, clip_denoised=True,
                   share_noise_across_batch=False):
    """Ancestral steps t = t_start, t_start-1, ..., t_stop of `d` starting from x = x_{t_start}.

    Args:
      model_fn: (x [B, H, W, C], t [B] int32) -> model output; traced once.
      x: [B, H, W, C], the sample at code timestep t_start.
      rng: a PRNG key; the noise of step t is normal(fold_in(rng, t)).
      t_start, t_stop: ints, may be traced (one compilation for every t); t_start < t_stop runs no step.
      share_noise_across_batch: draw each step's noise once for [1, H, W, C] and broadcast it (so that every
        image of the batch sees the same reverse noise, as the paper's interpolations, Sec. 4.3 and App. D).

    Returns:
      x_{t_stop - 1} [B, H, W, C] in x's dtype (x_0, the noise-free decoder mean, when t_stop = 0).
    """
    return _ancestral_steps(d, model_fn, x, rng, t_start=t_start, t_stop=t_stop, clip_denoised=clip_denoised,
                            share_noise_across_batch=share_noise_across_batch)[0]


def _initial_noise(d, shape, rng):
    """x_T ~ N(0, I) [B, H, W, C] in the tables' float dtype, drawn from fold_in(rng, T)."""
    return jax.random.normal(jax.random.fold_in(rng, d.num_timesteps), check_sample_shape(shape), d.betas.dtype)


def p_sample_loop(d, model_fn: ModelFn, shape, rng, *, clip_denoised=True):
    """Algorithm 2 (paper Sec. 3.2): x_T ~ N(0, I), then p_sample for t = T-1 .. 0, as one lax.fori_loop.

    Args:
      model_fn: (x [B, H, W, C], t [B] int32) -> model output; traced once.
      shape: [B, H, W, C] of the samples.
      rng: a PRNG key. x_T uses fold_in(rng, T); the noise of step t uses fold_in(rng, t).
      clip_denoised: clip predicted x_0 to [-1, 1] (official default True).

    Returns:
      x_0 [B, H, W, C] in the tables' float dtype (the noise-free decoder mean at the last step).

    Called eagerly, the loop is traced and compiled on every call; wrap the caller in jax.jit (with the
    GaussianDiffusion and the params as arguments) to compile once.
    """
    return p_sample_range(d, model_fn, _initial_noise(d, shape, rng), rng, t_start=d.num_timesteps - 1,
                          clip_denoised=clip_denoised)


def p_sample_loop_progressive(d, model_fn: ModelFn, shape, rng, *, freq=50, clip_denoised=True):
    """`p_sample_loop` that also records the predicted x_0 every `freq` steps (official
    diffusion_utils_2.py `p_sample_loop_progressive`, paper Fig. 6).

    Same draws as `p_sample_loop` for the same rng, so x_0 is identical.

    Returns:
      (x_0 [B, H, W, C], pred_xstart [B, T // freq, H, W, C]) where slot n holds the prediction made at
      t = n * freq (official include_xstartpred_freq semantics).
    """
    if int(freq) != freq or freq < 1:
        raise ValueError(f'freq must be a positive int, got {freq!r}')
    freq = int(freq)
    x_init = _initial_noise(d, shape, rng)
    num_slots = d.num_timesteps // freq

    def record(preds, t, pred_xstart):
        # Out-of-range slots (t not a multiple of freq, or past the last slot) are dropped.
        slot = jnp.where(t % freq == 0, t // freq, num_slots)
        return preds.at[:, slot].set(pred_xstart.astype(preds.dtype), mode='drop')

    preds_init = jnp.zeros((x_init.shape[0], num_slots) + x_init.shape[1:], dtype=x_init.dtype)
    return _ancestral_steps(d, model_fn, x_init, rng, t_start=d.num_timesteps - 1, t_stop=0,
                            clip_denoised=clip_denoised, share_noise_across_batch=False,
                            record=record, record_init=preds_init)
