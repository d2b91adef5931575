"""The score view of DDPM: scores from every mean type, Langevin and predictor-corrector samplers, and the
probability-flow ODE with its likelihood.

Pure functions over a `diffusion.GaussianDiffusion` (same table conventions: code timesteps t in {0..T-1},
images [B, H, W, C], loops take `model_fn(x, t)`).

* Score (paper Sec. 3.2, "eps-prediction resembles denoising score matching"): q(x_t | x_0) =
  N(sqrt(abar_t) x_0, (1 - abar_t) I), so grad log q(x_t) = -E[eps | x_t] / sqrt(1 - abar_t) =
  -(x_t - sqrt(abar_t) E[x_0 | x_t]) / (1 - abar_t). An 'eps' output gives the score as
  -eps / sqrt(1 - abar_t), an 'xstart' output through the second form, an 'xprev' output through the x_0
  it implies (the inverse of the posterior mean, paper Eq. 7).
* Langevin corrector (Song et al. 2021, "Score-based generative modeling through SDEs", Algorithm 5):
  x <- x + e * s(x) + sqrt(2 e) z with e = 2 alpha_t (snr ||z|| / ||s||)^2, alpha_t = 1 - beta_t. The norms
  are per example (the paper's algorithm; score_sde's `LangevinCorrector` averages them over the batch), so
  a sample does not depend on the rest of its batch.
* Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) over the DDPM's own noise levels: the same
  Langevin steps at t = T-1, ..., 0 (or the respaced levels), starting from N(0, I). The step is
  proportional to the level's variance as in Algorithm 1 (||z||^2 / ||s||^2 ~ 1 - abar_t for noisy levels),
  its constant set by `snr`.
* Predictor-corrector ('pc', Song et al. 2021, Algorithm 2): at each (respaced) step the corrector, then the
  paper's ancestral step as predictor. With n_corrector_steps = 0 it is the ancestral sampler, draw for draw.
* Probability-flow ODE (Song et al. 2021, Eq. 13 and App. B/D) of the variance-preserving SDE whose
  discretisation is this DDPM: dx/dt = -1/2 beta(t) [x + score(x, t)], t in [0, 1]. Code timestep i sits at
  t_i = (i + 1) / T, i.e. the network label is l(t) = t T - 1, a float between the integers (score_sde
  calls DDPM networks at the float label t (N - 1)). beta(t) is continuous: the piecewise-linear
  interpolation of -T log(1 - beta_i) (= T beta_i to first order, the limit of score_sde App. B) placed at
  the interval midpoints (i + 0.5) / T, and abar(t) = exp(-int_0^t beta), so that abar(t_i) equals the
  discrete abar_i up to the curvature of the schedule (2.5e-6 in log abar for the linear one). The score at t
  is the model's at l(t) converted with abar(t); below t_0 = 1/T the score of t_0 (label 0) is used. A
  continuous drift keeps adaptive solvers from fighting jumps at every node.
  Sampling integrates from t = 1 to t_0 = 1/T (score_sde's 1e-3 for T = 1000) from x(1) ~ N(0, I), then
  takes the noise-free t=0 step of the ancestral sampler (the x_0 prediction, clipped if asked), as
  score_sde's `denoise=True`. Likelihoods integrate from LIKELIHOOD_EPS = 1e-5 (score_sde) to 1.
* ODE likelihood (instantaneous change of variables, Chen et al. 2018; Song et al. 2021 App. D.2):
  log p_0(x(eps)) = log N(x(1); 0, I) + int_eps^1 div f(x(t), t) dt, the divergence exact (D VJPs) or by
  Hutchinson's estimator E[v^T (df/dx) v] with Rademacher or Gaussian v, fixed along the solve, averaged
  over num_probes probes. Bits/dim of 8-bit data follow score_sde (run_lib.py, likelihood.py): uniform
  dequantisation x = 2 (k + u) / 256 - 1 with k the pixel value and u ~ U[0, 1), then
  bpd = -log p(x) / (D ln 2) + 7, the 7 = 8 + log2(1/2) being the log-Jacobian of [0, 256) -> [-1, 1].

NFE (network evaluations): the adaptive solver is diffrax's Dopri5 (Dormand-Prince 5(4), 7 stages with
first-same-as-last): 1 + 6 per attempted step; Heun: 2 per step. In the likelihood each vector-field call
counts one network evaluation per Hutchinson probe (a vector-Jacobian product each) or D for the exact
divergence.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion

Array = Any
ScoreFn = Callable[[Array, Array], Array]

LIKELIHOOD_EPS = 1e-5          # score_sde's likelihood integration start
ODE_SOLVERS = ('adaptive', 'heun')
DIVERGENCES = ('hutchinson_rademacher', 'hutchinson_gaussian', 'exact')
DOPRI5_EVALS_PER_STEP = 6      # 7 stages, first same as last


def _per_example(values, x_shape):
    """values [B] -> [B, 1, ..., 1] for broadcasting against x of shape x_shape."""
    return jnp.reshape(values, (x_shape[0],) + (1,) * (len(x_shape) - 1))


# ----------------------------------------------------------------------------------------------- score

def _xstart_from_mean_output(d, mean_output, x_t, t):
    if d.model_mean_type == 'eps':
        return diffusion.predict_xstart_from_eps(d, x_t, t, mean_output)
    if d.model_mean_type == 'xprev':
        return diffusion.predict_xstart_from_xprev(d, x_t, t, mean_output)
    return mean_output


def score_from_model_output(d, model_output, x_t, t):
    """grad_x log q(x_t) implied by the model's output (paper Sec. 3.2).

    Args: model_output [B, H, W, C] (or [B, H, W, 2C] for learned variances; only the mean part is used);
      x_t [B, H, W, C]; t [B] int, code timesteps of d.
    Returns: score [B, H, W, C]; 'eps': -eps / sqrt(1 - abar_t), otherwise -(x_t - sqrt(abar_t) x0_hat) /
      (1 - abar_t) with x0_hat the output ('xstart') or the x_0 that the posterior mean output implies.
    """
    mean_output, _ = diffusion.split_model_output(d, model_output, x_t)
    ext = lambda table: diffusion.extract(table, t, x_t.shape)
    if d.model_mean_type == 'eps':
        return -mean_output / ext(d.sqrt_one_minus_alphas_cumprod)
    xstart = _xstart_from_mean_output(d, mean_output, x_t, t)
    return -(x_t - ext(d.sqrt_alphas_cumprod) * xstart) / ext(1.0 - d.alphas_cumprod)


def model_output_from_score(d, score, x_t, t):
    """The inverse of `score_from_model_output`: the mean output of d.model_mean_type for a score.

    Args: score, x_t [B, H, W, C]; t [B] int. Returns [B, H, W, C]: eps = -sqrt(1 - abar_t) score;
      x_0 = (x_t + (1 - abar_t) score) / sqrt(abar_t); xprev = coef1_t x_0 + coef2_t x_t (paper Eq. 7).
    """
    ext = lambda table: diffusion.extract(table, t, x_t.shape)
    if d.model_mean_type == 'eps':
        return -ext(d.sqrt_one_minus_alphas_cumprod) * score
    xstart = (x_t + ext(1.0 - d.alphas_cumprod) * score) * ext(d.sqrt_recip_alphas_cumprod)
    if d.model_mean_type == 'xstart':
        return xstart
    return ext(d.posterior_mean_coef1) * xstart + ext(d.posterior_mean_coef2) * x_t


def score_fn(model_fn, d) -> ScoreFn:
    """(x [B, H, W, C], t [B] int) -> score [B, H, W, C] of the model `model_fn` (called at t) under d."""
    return lambda x, t: score_from_model_output(d, model_fn(x, t), x, t)


# ----------------------------------------------------------------------------------------------- Langevin

def langevin_step(score, x, noise, *, snr, alpha):
    """One Langevin step of Algorithm 5 (Song et al. 2021) with the step size set per example.

    Args: score, x, noise [B, H, W, C]; snr: target signal-to-noise ratio; alpha: [B] or scalar (1 - beta_t).
    Returns: (x + e s + sqrt(2 e) z [B, H, W, C], e [B]) with e = 2 alpha (snr ||z|| / ||s||)^2.
    """
    axes = tuple(range(1, x.ndim))
    noise_norm = jnp.sqrt(jnp.sum(jnp.square(noise), axis=axes))
    score_norm = jnp.sqrt(jnp.sum(jnp.square(score), axis=axes))
    step = 2.0 * alpha * jnp.square(snr * noise_norm / score_norm)
    step_b = _per_example(step, x.shape)
    return x + step_b * score + jnp.sqrt(2.0 * step_b) * noise, step


def langevin_corrector(d, score_at, x, t, rng, *, snr, n_steps):
    """n_steps Langevin steps at code timestep t of d (Algorithm 5). score_at(x, t [B]) -> score.

    x: [B, H, W, C]; t: int scalar (traced ok); the noise of step j is normal(fold_in(rng, j)).
    Returns x after the steps [B, H, W, C].
    """
    t_batch = jnp.full((x.shape[0],), t, dtype=jnp.int32)
    alpha = 1.0 - d.betas[t]

    def body(j, x):
        noise = jax.random.normal(jax.random.fold_in(rng, j), x.shape, x.dtype)
        return langevin_step(score_at(x, t_batch), x, noise, snr=snr, alpha=alpha)[0].astype(x.dtype)

    return jax.lax.fori_loop(0, n_steps, body, x)


def _check_langevin(snr, n_steps):
    if not snr > 0:
        raise ValueError(f'snr={snr} must be > 0 (Song et al. 2021 use 0.16 for CIFAR-10)')
    if int(n_steps) != n_steps or n_steps < 0:
        raise ValueError(f'the number of Langevin steps must be an int >= 0, got {n_steps!r}')


def _levels(d_full, d, timestep_map):
    """(original timestep of each step of d [S] int32, number of steps S)."""
    if timestep_map is None:
        return jnp.arange(d.num_timesteps, dtype=jnp.int32), d.num_timesteps
    if d_full.num_timesteps < d.num_timesteps:
        raise ValueError('d_full must be the original diffusion that d was respaced from')
    return jnp.asarray(timestep_map, jnp.int32), d.num_timesteps


def pc_sample_loop(d_full, d, model_fn, shape, rng, *, timestep_map=None, snr=0.16, n_corrector_steps=1,
                   clip_denoised=True):
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 2) with the ancestral predictor.

    d_full: the original diffusion (the score is taken there, at the original timesteps, so every mean type
    converts exactly); d: the diffusion whose steps are run (d_full, or respaced with `timestep_map` [S]
    mapping its steps to original timesteps). At step k = S-1..0: n_corrector_steps Langevin steps at level
    k, then the ancestral step of d with noise normal(fold_in(rng, k)); x_T from fold_in(rng, S), as
    `diffusion.p_sample_loop` (so n_corrector_steps = 0 reproduces it). Corrector noise: fold_in of
    fold_in(fold_in(rng, S + 1), k) by the corrector step.
    Returns x_0 [B, H, W, C]; NFE = S (1 + n_corrector_steps).
    """
    _check_langevin(snr, n_corrector_steps)
    shape = diffusion.check_sample_shape(shape)
    levels, num_steps = _levels(d_full, d, timestep_map)
    dtype = d.betas.dtype
    score_at = score_fn(model_fn, d_full)
    corrector_rng = jax.random.fold_in(rng, num_steps + 1)

    def body(i, x):
        k = num_steps - 1 - i
        t_orig = levels[k]
        x = langevin_corrector(d_full, score_at, x, t_orig, jax.random.fold_in(corrector_rng, k), snr=snr,
                               n_steps=n_corrector_steps)
        noise = jax.random.normal(jax.random.fold_in(rng, k), shape, dtype)
        k_batch = jnp.full((shape[0],), k, dtype=jnp.int32)
        output = model_fn(x, jnp.full((shape[0],), t_orig, dtype=jnp.int32))
        return diffusion.p_sample(d, output, x, k_batch, noise, clip_denoised=clip_denoised).astype(dtype)

    x_init = jax.random.normal(jax.random.fold_in(rng, num_steps), shape, dtype)
    return jax.lax.fori_loop(0, num_steps, body, x_init)


def annealed_langevin_sample_loop(d_full, d, model_fn, shape, rng, *, timestep_map=None, snr=0.16,
                                  n_steps=1, clip_denoised=True):
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) over the noise levels of d.

    From x ~ N(0, I) (fold_in(rng, S)), n_steps Langevin steps (`langevin_corrector`, noise from
    fold_in(rng, k)) at each level k = S-1..0 (original timestep timestep_map[k]), then the noise-free
    t=0 step of the ancestral sampler of d_full (the x_0 prediction, clipped if clip_denoised).
    Returns x_0 [B, H, W, C]; NFE = S n_steps + 1.
    """
    _check_langevin(snr, n_steps)
    if n_steps < 1:
        raise ValueError('annealed Langevin needs n_steps >= 1 per noise level')
    shape = diffusion.check_sample_shape(shape)
    levels, num_steps = _levels(d_full, d, timestep_map)
    dtype = d.betas.dtype
    score_at = score_fn(model_fn, d_full)

    def body(i, x):
        k = num_steps - 1 - i
        return langevin_corrector(d_full, score_at, x, levels[k], jax.random.fold_in(rng, k), snr=snr,
                                  n_steps=n_steps)

    x = jax.lax.fori_loop(0, num_steps, body, jax.random.normal(jax.random.fold_in(rng, num_steps), shape, dtype))
    zero = jnp.zeros((shape[0],), jnp.int32)
    return diffusion.p_mean_variance(d_full, model_fn(x, zero), x, zero, clip_denoised=clip_denoised)['mean']


# ----------------------------------------------------------------------------------------------- ODE

def _beta_midpoints(d):
    """(midpoint times (i + 0.5) / T [T], values -T log(1 - beta_i) [T]) of the continuous beta(t)."""
    num = d.num_timesteps
    return (jnp.arange(num, dtype=d.betas.dtype) + 0.5) / num, -num * jnp.log1p(-d.betas)


def beta_continuous(d, t):
    """beta(t): the piecewise-linear interpolation of -T log(1 - beta_i) placed at t = (i + 0.5) / T, constant
    beyond the first and last midpoints (t scalar in [0, 1])."""
    mids, values = _beta_midpoints(d)
    return jnp.interp(t, mids, values)


def log_alphas_cumprod_at_time(d, t):
    """log abar(t) = -int_0^t beta(s) ds, exact for the piecewise-linear beta (t scalar in [0, 1])."""
    num = d.num_timesteps
    mids, values = _beta_midpoints(d)
    integral_at_mids = values[0] * mids[0] + jnp.concatenate(
        [jnp.zeros((1,), values.dtype), jnp.cumsum(0.5 * (values[:-1] + values[1:]) / num)])
    t = jnp.asarray(t, values.dtype)
    k = jnp.clip(jnp.floor(t * num - 0.5), 0, num - 1).astype(jnp.int32)   # last midpoint at or before t
    slope = jnp.where(k < num - 1, (values[jnp.minimum(k + 1, num - 1)] - values[k]) * num, 0.0)
    dt = t - mids[k]
    inside = integral_at_mids[k] + values[k] * dt + 0.5 * slope * dt ** 2
    return -jnp.where(t < mids[0], values[0] * t, inside)


def continuous_label(d, t):
    """Network label l(t) = t T - 1 clipped to [0, T-1] (float, same dtype as d's tables); t: scalar in [0, 1]."""
    return jnp.clip(jnp.asarray(t, d.betas.dtype) * d.num_timesteps - 1.0, 0.0, d.num_timesteps - 1.0)


def continuous_score(d, model_fn, x, t):
    """The score at continuous time t (scalar): the model at the float label l(tau) = tau T - 1, converted
    with abar(tau), tau = max(t, 1/T) (the score of label 0 below t_0 = 1/T). x: [B, H, W, C].
    Returns [B, H, W, C]. model_fn must accept float labels (the U-Net does)."""
    tau = jnp.maximum(jnp.asarray(t, d.betas.dtype), 1.0 / d.num_timesteps)
    log_abar = log_alphas_cumprod_at_time(d, tau)
    abar = jnp.exp(log_abar)
    one_minus_abar = -jnp.expm1(log_abar)
    mean_output, _ = diffusion.split_model_output(
        d, model_fn(x, jnp.full((x.shape[0],), continuous_label(d, tau), d.betas.dtype)), x)
    if d.model_mean_type == 'eps':
        return -mean_output / jnp.sqrt(one_minus_abar)
    if d.model_mean_type == 'xstart':
        xstart = mean_output
    else:  # posterior mean coefficients between tau - 1/T and tau (paper Eq. 7)
        log_abar_prev = log_alphas_cumprod_at_time(d, tau - 1.0 / d.num_timesteps)
        abar_prev = jnp.exp(log_abar_prev)
        beta = -jnp.expm1(log_abar - log_abar_prev)
        coef1 = beta * jnp.sqrt(abar_prev) / one_minus_abar
        coef2 = (1.0 - abar_prev) * jnp.sqrt(1.0 - beta) / one_minus_abar
        xstart = (mean_output - coef2 * x) / coef1
    return -(x - jnp.sqrt(abar) * xstart) / one_minus_abar


def ode_drift(d, model_fn, x, t):
    """Probability-flow drift -1/2 beta(t) [x + score(x, t)] (Song et al. 2021, Eq. 13, VP SDE)."""
    return -0.5 * beta_continuous(d, t) * (x + continuous_score(d, model_fn, x, t))


def _solve(vector_field, y0, t0, t1, *, solver, rtol, atol, num_steps, max_steps=100_000):
    """diffrax solve of dy/dt = vector_field(t, y) from t0 to t1. Returns (y(t1), vector-field calls)."""
    import diffrax  # here, not at the top: importing it takes ~0.4 s that training and sampling never need
    diffusion.check_choice('ode_solver', solver, ODE_SOLVERS)
    term = diffrax.ODETerm(lambda t, y, args: vector_field(t, y))
    if solver == 'adaptive':
        sol = diffrax.diffeqsolve(term, diffrax.Dopri5(), t0, t1, None, y0,
                                  stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
                                  max_steps=max_steps)
        nfe = 1 + DOPRI5_EVALS_PER_STEP * sol.stats['num_steps']
    else:
        if int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f'the Heun solver needs num_steps >= 1, got {num_steps!r}')
        sol = diffrax.diffeqsolve(term, diffrax.Heun(), t0, t1, (t1 - t0) / num_steps, y0,
                                  stepsize_controller=diffrax.ConstantStepSize(), max_steps=int(num_steps))
        nfe = 2 * sol.stats['num_steps']
    return jax.tree.map(lambda leaf: leaf[-1], sol.ys), jnp.asarray(nfe, jnp.int32)


def ode_sample(d, model_fn, shape, rng, *, solver='adaptive', rtol=1e-5, atol=1e-5, num_steps=100,
               clip_denoised=True):
    """Samples by the probability-flow ODE from t = 1 (x ~ N(0, I) from rng) to t_0 = 1/T, then the
    noise-free t=0 ancestral step.

    d: the full (not respaced) diffusion; shape: [B, H, W, C]; solver 'adaptive' (Dopri5, rtol/atol) or
    'heun' (num_steps equal steps in t). Returns (x_0 [B, H, W, C], NFE int32 scalar, including the last
    step's network call).
    """
    shape = diffusion.check_sample_shape(shape)
    x1 = jax.random.normal(rng, shape, d.betas.dtype)
    x, nfe = _solve(lambda t, x: ode_drift(d, model_fn, x, t), x1, 1.0, 1.0 / d.num_timesteps, solver=solver,
                    rtol=rtol, atol=atol, num_steps=num_steps)
    zero = jnp.zeros((shape[0],), jnp.int32)
    x0 = diffusion.p_mean_variance(d, model_fn(x, zero), x, zero, clip_denoised=clip_denoised)['mean']
    return x0, nfe + 1


def _divergence_fn(drift, divergence, probes):
    """(x, t) -> (drift [B, ...], divergence estimate [B]) of drift(x, t) w.r.t. x, per example.

    Vector-Jacobian products (reverse mode: the U-Net's attention has a custom VJP, so forward mode is not
    available): v^T (df/dx) v per probe. probes: [P, B, ...] Hutchinson probes; for 'exact' the D basis vectors
    (the same one for every example: the examples do not interact) give the trace. One vmap over the vectors."""
    def fn(x, t):
        value, vjp_fn = jax.vjp(lambda y: drift(y, t), x)
        if divergence == 'exact':
            dims = math.prod(x.shape[1:])
            vectors = jnp.broadcast_to(jnp.eye(dims, dtype=x.dtype).reshape((dims, 1) + x.shape[1:]),
                                       (dims,) + x.shape)
        else:
            vectors = probes
        products = jnp.sum(vectors * jax.vmap(lambda v: vjp_fn(v)[0])(vectors), axis=tuple(range(2, vectors.ndim)))
        return value, (jnp.sum(products, axis=0) if divergence == 'exact' else jnp.mean(products, axis=0))

    return fn


def hutchinson_probes(rng, shape, divergence, num_probes, dtype):
    """[num_probes, *shape] Rademacher (+-1) or standard normal probes."""
    if divergence == 'hutchinson_rademacher':
        return jax.random.rademacher(rng, (num_probes,) + tuple(shape), dtype=dtype)
    return jax.random.normal(rng, (num_probes,) + tuple(shape), dtype)


def ode_log_likelihood(d, model_fn, x, rng, *, divergence='hutchinson_rademacher', num_probes=1,
                       solver='adaptive', rtol=1e-5, atol=1e-5, num_steps=100, eps=LIKELIHOOD_EPS):
    """log p(x) in nats under the probability-flow ODE (instantaneous change of variables).

    x: [B, H, W, C] (continuous, model range); rng: the Hutchinson probes (fixed along the solve).
    Integrates [x, 0] from t = eps to 1 with d(logp)/dt = div f; log p(x) = log N(x(1); 0, I) + delta.
    Returns dict(logp [B], prior_logp [B], delta_logp [B], z [B, H, W, C] = x(1), nfe int32: network
    evaluations, a vector-Jacobian product counted as one, i.e. vector-field calls times (D or num_probes)).
    """
    diffusion.check_choice('divergence', divergence, DIVERGENCES)
    if divergence != 'exact' and (int(num_probes) != num_probes or num_probes < 1):
        raise ValueError(f'num_probes={num_probes!r} must be an int >= 1')
    dims = math.prod(x.shape[1:])
    probes = hutchinson_probes(rng, x.shape, divergence, int(num_probes), x.dtype)
    div_fn = _divergence_fn(lambda y, t: ode_drift(d, model_fn, y, t), divergence, probes)

    y0 = (x, jnp.zeros((x.shape[0],), x.dtype))
    (z, delta), calls = _solve(lambda t, state: div_fn(state[0], t), y0, eps, 1.0, solver=solver, rtol=rtol, atol=atol,
                               num_steps=num_steps)
    prior = -0.5 * jnp.sum(jnp.square(z), axis=tuple(range(1, z.ndim))) - 0.5 * dims * math.log(2 * math.pi)
    per_call = dims if divergence == 'exact' else int(num_probes)
    return {'logp': prior + delta, 'prior_logp': prior, 'delta_logp': delta, 'z': z, 'nfe': calls * per_call}


def dequantize(x, u):
    """Uniform dequantisation (score_sde run_lib.py): x in the model range [-1, 1] of 8-bit data
    (x = k / 127.5 - 1), u ~ U[0, 1) of the same shape -> 2 (k + u) / 256 - 1 in [-1, 1)."""
    pixels = jnp.round((x + 1.0) * 127.5)
    return 2.0 * (pixels + u) / 256.0 - 1.0


def bits_per_dim(logp, dims):
    """Bits/dim of the dequantised 8-bit data from log p (nats) of x = 2 (k + u) / 256 - 1 in [-1, 1):
    -log p / (D ln 2) + 7, the 7 = log2(256 / 2) being the log-Jacobian of u-space [0, 256) -> [-1, 1)."""
    return -logp / (dims * math.log(2.0)) + math.log2(128.0)
