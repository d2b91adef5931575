"""Tests of ddpm_jax.score in a Gaussian world solved in closed form, and of its CLI paths.

The world: data x_0 ~ N(M, S^2) independently per dimension. Then x_t ~ N(sqrt(abar_t) M, v_t) with
v_t = abar_t S^2 + 1 - abar_t, the score is -(x_t - sqrt(abar_t) M) / v_t, E[x_0 | x_t] =
M + sqrt(abar_t) S^2 (x_t - sqrt(abar_t) M) / v_t, and the optimal eps / xstart / xprev predictions follow.
They are written here in float64 numpy/jnp from these formulas only, at float labels too (log abar linear
between the integer labels, the continuous-time convention of the probability-flow ODE).
"""
import functools
import glob
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import multihost_worker
import numpy as np
import pytest

from ddpm_jax import checkpoint, diffusion, samplers, score
from ddpm_jax.evaluation import nll as nll_mode, sample as sample_mode

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

M, S = 0.1, 0.3
T = 1000
BETAS = np.linspace(1e-4, 0.02, T)   # the paper's schedule
IMAGE = (4, 4, 1)
D = 16    # dimensions of IMAGE
# The samplers' tests use 16x16 images: the Langevin step size 2 alpha snr^2 ||z||^2 / ||s||^2 is set per
# example, and its fluctuation with x inflates the variance by O(1/D) beyond the large-D value.
SAMPLER_IMAGE, NUM_SAMPLES = (16, 16, 1), 500


def _log_abar_nodes(betas):
    """log abar at the labels -1, 0, ..., T-1 (float64 numpy)."""
    return np.concatenate([[0.0], np.cumsum(np.log(1.0 - betas))])


def _world(label, betas=BETAS):
    """(abar, v) at float labels [B] (numpy or jnp), as [B, 1, 1, 1]."""
    log_abar = jnp.interp(label, np.arange(-1, len(betas)), _log_abar_nodes(betas))[:, None, None, None]
    abar = jnp.exp(log_abar)
    return abar, abar * S ** 2 + 1.0 - abar, log_abar


BETA_VALUES = -T * np.log1p(-BETAS)            # beta(t) at the midpoints (i + 0.5) / T, linear in between
BETA_MIDS = (np.arange(T) + 0.5) / T


def log_abar_continuous(t, xp=jnp):
    """-int_0^t beta(s) ds for the piecewise-linear beta(t): whole trapezoids up to the last midpoint, plus the
    trapezoid from there to t (exact: beta is linear there); constant beta before the first midpoint."""
    areas = np.concatenate([[BETA_VALUES[0] * BETA_MIDS[0]], (BETA_VALUES[:-1] + BETA_VALUES[1:]) / (2 * T)])
    values, mids, cumulative = xp.asarray(BETA_VALUES), xp.asarray(BETA_MIDS), xp.asarray(np.cumsum(areas))
    k = xp.clip(xp.searchsorted(BETA_MIDS, t, side='right') - 1, 0, T - 1)
    partial = 0.5 * (values[k] + xp.interp(t, mids, values)) * (t - mids[k])
    return -xp.where(t < mids[0], values[0] * t, cumulative[k] + partial)


def _world_continuous(label):
    """_world at the continuous time t = (label + 1) / T of a float label."""
    log_abar = log_abar_continuous((label + 1.0) / T)[:, None, None, None]
    abar = jnp.exp(log_abar)
    return abar, abar * S ** 2 + 1.0 - abar, log_abar


def true_score(x, label, continuous=False):
    abar, v, _ = (_world_continuous if continuous else _world)(label)
    return -(x - jnp.sqrt(abar) * M) / v


def optimal_model(mean_type, betas=BETAS, continuous=False):
    """model_fn(x, t) of the optimal predictor of `mean_type` at int or float labels t: at the discrete tables'
    abar, or (continuous) at the abar(t) of the probability-flow ODE's continuous time."""
    world = _world_continuous if continuous else functools.partial(_world, betas=betas)

    def model_fn(x, t):
        label = t.astype(jnp.float64)
        abar, v, log_abar = world(label)
        one_minus_abar = -jnp.expm1(log_abar)
        x0 = M + jnp.sqrt(abar) * S ** 2 * (x - jnp.sqrt(abar) * M) / v
        if mean_type == 'eps':
            return jnp.sqrt(one_minus_abar) * (x - jnp.sqrt(abar) * M) / v
        if mean_type == 'xstart':
            return x0
        abar_prev, _, log_abar_prev = world(label - 1.0)
        beta = -jnp.expm1(log_abar - log_abar_prev)
        # E[x_{t-1} | x_t] = E[ E[x_{t-1} | x_t, x_0] | x_t ]: the posterior mean (paper Eq. 7) at E[x_0 | x_t]
        return (beta * jnp.sqrt(abar_prev) * x0 + (1.0 - abar_prev) * jnp.sqrt(1.0 - beta) * x) / one_minus_abar
    return model_fn


def _diffusion(mean_type='eps', betas=BETAS, var_type='fixedlarge'):
    return diffusion.make_diffusion(betas, model_mean_type=mean_type, model_var_type=var_type, loss_type='mse')


def _moments_check(samples, mean, var, *, var_bias, label):
    """Sample mean / variance vs (mean, var): |error| <= 4 standard errors (+ var_bias * var for the variance;
    no sampler here biases the mean: each is equivariant under reflection about M)."""
    x = np.asarray(samples, np.float64).ravel()
    n = x.size
    got_mean, got_var = x.mean(), x.var(ddof=1)
    se_mean, se_var = math.sqrt(var / n), var * math.sqrt(2.0 / (n - 1))
    print(f'{label}: mean {got_mean:.5f} (want {mean:.5f} +- {se_mean:.1e}), var {got_var:.5f} '
          f'(want {var:.5f} +- {se_var:.1e})')
    assert abs(got_mean - mean) <= 4 * se_mean, label
    assert abs(got_var - var) <= 4 * se_var + var_bias * var, label


def _assert_score_close(got, want, x, label, mean_type, continuous=False):
    if mean_type == 'eps' or (mean_type == 'xstart' and not continuous):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        return
    # Conditioning, not method error (xprev; and xstart with abar(t) computed by two formulas): the score divides
    # x - sqrt(abar) x_0 by 1 - abar; for xprev, x_0 = (xprev - coef2 x) / coef1 too,
    # with 1 - abar_t = 1e-4 at t = 0, so a rounding of ~1e-16 |x| in the xprev output (its two float64
    # derivations, here and from the tables, differ by 4e-13 at t = 0) grows by up to 1 / (1 - abar_t) and
    # by 1 / coef1_t; measured: at most 1.1e-13 (|x| + |score|) / (1 - abar_t).
    one_minus_abar = 1.0 - (_world_continuous if continuous else _world)(label)[0]
    assert np.all(np.abs(got - want) <= 1e-12 * (np.abs(x) + np.abs(want)) / one_minus_abar)


@pytest.mark.parametrize('mean_type', ['eps', 'xstart', 'xprev'])
def test_score_conversions_equal_the_analytic_score(mean_type):
    with jax.enable_x64(True):
        d = _diffusion(mean_type)
        key = jax.random.key(0)
        x = jax.random.normal(key, (6,) + IMAGE, jnp.float64) * 1.3
        t = jnp.array([0, 1, 2, 500, 998, 999], jnp.int32)
        model_fn = optimal_model(mean_type)
        want = true_score(x, t.astype(jnp.float64))
        got = score.score_from_model_output(d, model_fn(x, t), x, t)
        _assert_score_close(got, want, x, t.astype(jnp.float64), mean_type)
        np.testing.assert_allclose(score.score_fn(model_fn, d)(x, t), got, rtol=1e-15, atol=0)
        np.testing.assert_allclose(score.model_output_from_score(d, want, x, t), model_fn(x, t), rtol=1e-11,
                                   atol=1e-12)
        # The ODE's score at float labels (continuous time t = (label + 1) / T), fractional labels included.
        model_fn = optimal_model(mean_type, continuous=True)
        for label in (0.0, 0.25, 17.5, 998.75, 999.0):
            labels = jnp.full((6,), label)
            got = score.continuous_score(d, model_fn, x, (label + 1.0) / T)
            _assert_score_close(got, true_score(x, labels, True), x, labels, mean_type, True)


def test_continuous_time_tables():
    with jax.enable_x64(True):
        d = _diffusion()
        times = np.array([0.0, 1e-5, 0.3 / T, 0.5 / T, 1.0 / T, 0.01, 0.5, 0.9995, 1.0])
        got = np.array([score.log_alphas_cumprod_at_time(d, t) for t in times])
        np.testing.assert_allclose(got, np.asarray(log_abar_continuous(jnp.asarray(times))), rtol=1e-12, atol=1e-16)
        # d log abar / dt = -beta(t) (central differences; beta is linear between midpoints)
        for t in (0.2 / T, 0.3, 0.77, 0.9999):
            h = 1e-7
            slope = (score.log_alphas_cumprod_at_time(d, t + h) - score.log_alphas_cumprod_at_time(d, t - h)) / (2 * h)
            np.testing.assert_allclose(slope, -score.beta_continuous(d, t), rtol=1e-7)
        np.testing.assert_allclose([score.beta_continuous(d, (i + 0.5) / T) for i in (0, 7, 999)],
                                   -T * np.log1p(-BETAS[[0, 7, 999]]), rtol=1e-13)
        # At the nodes t_i = (i + 1) / T, abar(t) is the discrete abar_i up to the schedule's curvature.
        nodes = np.array([0, 1, 10, 500, 999])
        got = np.array([score.log_alphas_cumprod_at_time(d, (i + 1.0) / T) for i in nodes])
        np.testing.assert_allclose(got, np.log(np.cumprod(1.0 - BETAS))[nodes], atol=5e-6, rtol=0)
        np.testing.assert_allclose(score.continuous_label(d, 0.5), 499.0)
        assert float(score.continuous_label(d, 1e-5)) == 0.0


def _ancestral_moments(betas):
    """Exact mean / variance of the ancestral sampler's output (eps model optimal, fixedlarge, no clipping):
    each step is affine in x_t plus independent noise, so the moments propagate exactly from N(0, 1)."""
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    mu, var = 0.0, 1.0
    for t in range(len(betas) - 1, -1, -1):
        v = abar[t] * S ** 2 + 1.0 - abar[t]
        gain = math.sqrt(abar[t]) * S ** 2 / v                       # E[x_0 | x] = M + gain (x - sqrt(abar) M)
        coef1 = betas[t] * math.sqrt(abar_prev[t]) / (1.0 - abar[t])
        coef2 = (1.0 - abar_prev[t]) * math.sqrt(1.0 - betas[t]) / (1.0 - abar[t])
        a = coef1 * gain + coef2
        b = coef1 * (M - gain * math.sqrt(abar[t]) * M)
        noise_var = 0.0 if t == 0 else betas[t]                      # fixedlarge: beta_t, no noise at t = 0
        mu, var = a * mu + b, a * a * var + noise_var
    return mu, var


def _sample(sampler, mean_type='eps', continuous=False, **overrides):
    config = ml_collections.ConfigDict(dict(
        diffusion=dict(beta_schedule='linear', beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=T,
                       model_mean_type=mean_type, model_var_type='fixedlarge', loss_type='mse', hybrid_lambda=0.001),
        sampling=dict(sampler=sampler, num_steps=0, ddim_eta=0.0, clip_denoised=False, snr=0.16,
                      n_corrector_steps=1, ode_solver='adaptive', ode_rtol=1e-6, ode_atol=1e-6)))
    config.sampling.update(overrides)
    fn = samplers.make_sampler(config, return_nfe=True)
    model_fn = optimal_model(mean_type, continuous=continuous)
    return jax.jit(lambda rng: fn(model_fn, (NUM_SAMPLES,) + SAMPLER_IMAGE, rng))(jax.random.key(1))


def test_ancestral_sampler_matches_the_exactly_propagated_moments_and_the_data():
    with jax.enable_x64(True):
        x, nfe = _sample('ancestral')
    mu, var = _ancestral_moments(BETAS)
    # Discretisation bias of the sampler itself (exact moments): fixedlarge adds beta_t, more than the true
    # reverse variance, so var ends above S^2. Stated and bounded here, then the samples must match it.
    print(f'ancestral exact output: mean {mu:.6f} var {var:.6f} (data {M} {S ** 2})')
    assert abs(mu - M) < 1e-3 and abs(var / S ** 2 - 1.0) < 0.05
    _moments_check(x, mu, var, var_bias=0.0, label='ancestral')
    assert int(nfe) == T


@pytest.mark.parametrize('sampler,n_corrector', [('pc', 1), ('langevin', 2)])
def test_langevin_samplers_match_the_data(sampler, n_corrector):
    with jax.enable_x64(True):
        x, nfe = _sample(sampler, n_corrector_steps=n_corrector)
    # Allowed variance bias 8%: Langevin with the snr step e = 2 alpha snr^2 ||z||^2 / ||s||^2 ~ 2 snr^2 v has the
    # stationary variance v / (1 - snr^2) for large D (+2.6% at snr 0.16), the ancestral predictor adds +0.6%
    # (its exact moments, above) and the per-example step size ~1% more at D = 256 (measured: +4.4% for pc,
    # +4.9% for langevin; +9% at D = 64, +29% at D = 16).
    _moments_check(x, M, S ** 2, var_bias=0.08, label=sampler)
    assert int(nfe) == (T * (1 + n_corrector) if sampler == 'pc' else T * n_corrector + 1)


def _ode_affine_map(t_start, t_end, substeps=8):
    """(A, B) such that the probability-flow ODE of the Gaussian world maps x(t_start) to A x + B at t_end.

    Per dimension, dx/dt = c(t) x + e(t) with c = -beta(t)/2 (1 - 1/v), e = -beta(t)/2 sqrt(abar) M / v, (abar, v)
    at tau = max(t, 1/T). Classical RK4 for (A, B) on a grid holding every kink (the midpoints where beta(t)
    bends, and 1/T), `substeps` steps per interval.
    """
    lo, hi = sorted((t_start, t_end))
    nodes = np.unique(np.concatenate([[lo, hi, 1.0 / T], BETA_MIDS]))
    nodes = nodes[(nodes >= lo) & (nodes <= hi)]

    def deriv(t, y):
        tau = max(t, 1.0 / T)
        abar = math.exp(float(log_abar_continuous(np.float64(tau), xp=np)))
        v = abar * S ** 2 + 1.0 - abar
        beta = float(np.interp(t, BETA_MIDS, BETA_VALUES))
        c, e = -0.5 * beta * (1.0 - 1.0 / v), -0.5 * beta * math.sqrt(abar) * M / v
        return np.array([c * y[0], c * y[1] + e])

    y = np.array([1.0, 0.0])
    segments = list(zip(nodes[:-1], nodes[1:]))
    if t_end < t_start:
        segments = [(b, a) for a, b in segments[::-1]]
    for a, b in segments:
        h = (b - a) / substeps
        for k in range(substeps):
            t = a + k * h
            k1 = deriv(t, y)
            k2 = deriv(t + h / 2, y + h / 2 * k1)
            k3 = deriv(t + h / 2, y + h / 2 * k2)
            k4 = deriv(t + h, y + h * k3)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y[0], y[1]


def _denoise_map():
    """The last, noise-free step at t = 0 (discrete tables) with the continuous-world model at label 0, whose
    eps is that of abar(1/T): x_0 = (x - sqrt(1 - abar_0) eps) / sqrt(abar_0) = a x + b."""
    abar0 = 1.0 - BETAS[0]
    abar_c = math.exp(float(log_abar_continuous(np.float64(1.0 / T), xp=np)))
    v_c = abar_c * S ** 2 + 1.0 - abar_c
    eps_gain = math.sqrt(1.0 - abar_c) / v_c                   # eps = eps_gain (x - sqrt(abar_c) M)
    a = (1.0 - math.sqrt(1.0 - abar0) * eps_gain) / math.sqrt(abar0)
    return a, math.sqrt(1.0 - abar0) * eps_gain * math.sqrt(abar_c) * M / math.sqrt(abar0)


def test_ode_sampler_is_the_exact_flow_and_matches_the_data():
    a_flow, b_flow = _ode_affine_map(1.0, 1.0 / T)
    a_last, b_last = _denoise_map()
    a, b = a_last * a_flow, a_last * b_flow + b_last
    # Bias of the exact flow itself: the ODE maps N(0, 1) to N(b, a^2). The prior N(0, 1) misses the true
    # marginal's mean sqrt(abar_{T-1}) M = 6.3e-4 at t = 1, which arrives scaled by ~S (b - M = -1.9e-4);
    # the variance is off by -0.1% (prior variance and the label-0 score below t_0 = 1/T).
    print(f'ODE exact output: mean {b:.6f} var {a * a:.6f} (data {M} {S ** 2})')
    assert abs(b - M) < 3e-4 and abs(a * a / S ** 2 - 1.0) < 2e-3
    with jax.enable_x64(True):
        rng = jax.random.key(1)
        x, nfe = _sample('ode', continuous=True, ode_rtol=1e-8, ode_atol=1e-8)
        x1 = np.asarray(jax.random.normal(rng, (NUM_SAMPLES,) + SAMPLER_IMAGE, jnp.float64))
    # Solver error at rtol = atol = 1e-8 over ~1 unit of time: well below 1e-6.
    print('ODE sampler vs the exact flow: max error', np.max(np.abs(np.asarray(x) - (a * x1 + b))))
    np.testing.assert_allclose(x, a * x1 + b, atol=1e-6, rtol=0)
    _moments_check(x, b, S ** 2, var_bias=2e-3, label='ode')
    print('ODE NFE (adaptive, rtol=atol=1e-8):', int(nfe))
    assert 8 < int(nfe) < 2000 and (int(nfe) - 2) % score.DOPRI5_EVALS_PER_STEP == 0


def test_ode_heun_converges_at_second_order_with_the_stated_nfe():
    a_flow, b_flow = _ode_affine_map(1.0, 1.0 / T)
    a_last, b_last = _denoise_map()
    errors = []
    with jax.enable_x64(True):
        d = _diffusion()
        rng = jax.random.key(2)
        x1 = jax.random.normal(rng, (4,) + IMAGE, jnp.float64)
        want = a_last * (a_flow * x1 + b_flow) + b_last
        for num_steps in (40, 80):
            model_fn = optimal_model('eps', continuous=True)
            x, nfe = jax.jit(lambda r, n=num_steps, f=model_fn: score.ode_sample(
                d, f, (4,) + IMAGE, r, solver='heun', num_steps=n, clip_denoised=False))(rng)
            assert int(nfe) == 2 * num_steps + 1
            errors.append(float(np.max(np.abs(x - want))))
    print('Heun errors at 40, 80 steps:', errors)
    # Second order: halving the step divides the error by ~4 (beta(t) jumps at every node add O(h / T) terms).
    assert all(3.0 < e1 / e2 < 5.0 for e1, e2 in zip(errors, errors[1:]))


@pytest.mark.slow
def test_ode_log_likelihood_equals_the_gaussian_log_density():
    a_flow, b_flow = _ode_affine_map(score.LIKELIHOOD_EPS, 1.0)
    with jax.enable_x64(True):
        d = _diffusion()
        x = M + S * jax.random.normal(jax.random.key(3), (8,) + IMAGE, jnp.float64)

        def loglik(divergence, x=x, num_probes=1):
            model_fn = optimal_model('eps', continuous=True)
            fn = jax.jit(lambda x, r: score.ode_log_likelihood(d, model_fn, x, r, divergence=divergence,
                                                               num_probes=num_probes, rtol=1e-8, atol=1e-8))
            return fn(x, jax.random.key(4))

        exact = loglik('exact')
    x = np.asarray(x, np.float64).reshape(8, -1)
    z = a_flow * x + b_flow
    # The model's density under the exact flow: N(0, I) at t = 1 pulled back through x -> a x + b.
    want = -0.5 * np.sum(z ** 2, axis=1) - 0.5 * D * math.log(2 * math.pi) + D * math.log(a_flow)
    data_logpdf = np.sum(-0.5 * ((x - M) / S) ** 2 - math.log(S) - 0.5 * math.log(2 * math.pi), axis=1)
    print('ODE logp', np.asarray(exact['logp'])[:3], 'flow', want[:3], 'data', data_logpdf[:3],
          'NFE', int(exact['nfe']))
    # Solver tolerance 1e-8 over 16 dims and ~1 unit of time: 1e-5 nats is ample.
    np.testing.assert_allclose(exact['logp'], want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(exact['z'].reshape(8, -1), z, atol=1e-6, rtol=0)
    # The flow's own bias against the data density (see the sampler test): a few 1e-3 nats per dimension.
    np.testing.assert_allclose(exact['logp'], data_logpdf, atol=0.05 * D / 16, rtol=0)
    assert int(exact['nfe']) % D == 0
    with jax.enable_x64(True):
        # The Jacobian here is c(t) I: a Rademacher probe v gives v^T c I v = c D, exactly the divergence.
        rademacher = loglik('hutchinson_rademacher')
        np.testing.assert_allclose(rademacher['logp'], exact['logp'], atol=1e-7, rtol=0)
        # Gaussian probes: unbiased, within the standard error over many images.
        x_many = M + S * jax.random.normal(jax.random.key(5), (256,) + IMAGE, jnp.float64)
        diff = np.asarray(loglik('hutchinson_gaussian', x=x_many)['logp'] - loglik('exact', x=x_many)['logp'])
    stderr = diff.std(ddof=1) / math.sqrt(diff.size)
    print(f'Gaussian Hutchinson - exact: {diff.mean():.4f} +- {stderr:.4f} nats')
    assert diff.std() > 0.01 and abs(diff.mean()) < 4 * stderr


def test_ddpm_reverse_mean_is_a_langevin_step_up_to_beta_squared():
    """Paper Sec. 3.2: with eps = -sqrt(1 - abar) s, the reverse mean (x + beta s) / sqrt(1 - beta) equals the
    Langevin step x + beta s plus the VP drift beta x / 2 (the reverse-SDE Euler step, Song et al. 2021 Eq. 47)
    up to O(beta^2); without the drift the difference is first order."""
    abar = 0.5
    betas_t = [0.02 / 2 ** k for k in range(5)]
    drift_errors, plain_errors = [], []
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(6), (2,) + IMAGE, jnp.float64)  # float64 arithmetic inside
        s = -(x - math.sqrt(abar) * M) / (abar * S ** 2 + 1.0 - abar)
        for beta in betas_t:
            d = _diffusion(betas=np.array([1.0 - abar / (1.0 - beta), beta]))   # abar_1 = abar, beta_1 = beta
            t = jnp.ones((2,), jnp.int32)
            mean = diffusion.p_mean_variance(d, -math.sqrt(1.0 - abar) * s, x, t, clip_denoised=False)['mean']
            drift_errors.append(float(jnp.max(jnp.abs(mean - (x + beta * s + 0.5 * beta * x)))))
            plain_errors.append(float(jnp.max(jnp.abs(mean - (x + beta * s)))))
    drift_ratios = [a / b for a, b in zip(drift_errors, drift_errors[1:])]
    plain_ratios = [a / b for a, b in zip(plain_errors, plain_errors[1:])]
    print('with drift', drift_errors, drift_ratios, '\nplain', plain_errors, plain_ratios)
    assert all(3.9 < r < 4.1 for r in drift_ratios)      # second order
    assert all(1.9 < r < 2.1 for r in plain_ratios)      # first order
    assert drift_errors[0] < 1e-3


# ----------------------------------------------------------------------------------------------- CLI paths

def _tiny_digits_config():
    """configs/digits.py:tiny (a 1-level U-Net (ch 32), T = 20): the config of the CLI runs below."""
    return multihost_worker.tiny_config(**{'sampling.num_samples': 4, 'sampling.batch_size': 4})


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """(config, workdir with a params-only checkpoint of random params at step 3)."""
    from test_evaluate import _random_params
    config = _tiny_digits_config()
    workdir = str(tmp_path_factory.mktemp('score_cli'))
    checkpoint.save_params_only(workdir, _random_params(config), config, 3)
    return config, workdir


@pytest.mark.parametrize('sampler,num_steps,want_nfe', [('pc', 10, 10 * 2), ('langevin', 0, 20 + 1), ('ode', 0, None)])
def test_sample_mode_runs_the_score_samplers_with_tagged_folders_and_nfe(tiny_run, sampler, num_steps, want_nfe):
    config, workdir = tiny_run
    config = config.copy_and_resolve_references()
    config.sampling.sampler, config.sampling.num_steps = sampler, num_steps   # pc on 10 respaced steps of T = 20
    config.sampling.ode_rtol, config.sampling.ode_atol = 1e-3, 1e-3
    result = sample_mode.run(config, workdir)
    out_dir = os.path.dirname(result['path'])
    want_tag = {'pc': 'pc10_snr0.16_corr1', 'langevin': 'langevin20_snr0.16_corr1',
                'ode': 'ode_adaptive_rtol0.001_atol0.001'}[sampler]
    assert result['complete'] and os.path.basename(out_dir) == f'samples_step3_{want_tag}_fixedlarge_ema_seed0'
    samples = np.load(result['path'])['samples']
    assert samples.shape == (4, 8, 8, 1) and samples.dtype == np.uint8 and samples.std() > 0
    with open(os.path.join(out_dir, 'metadata.json')) as f:
        metadata = json.load(f)
    with open(os.path.join(out_dir, 'settings.json')) as f:
        assert json.load(f)['snr'] == 0.16
    if want_nfe is None:   # adaptive: 1 + 6 per attempted step, plus the last (t = 0) network call
        assert (metadata['nfe_per_batch'][0] - 2) % score.DOPRI5_EVALS_PER_STEP == 0
    else:
        assert metadata['nfe_per_batch'] == [want_nfe]
    # Other Langevin / ODE settings go to another folder.
    config.sampling.snr, config.sampling.ode_rtol = 0.2, 1e-4
    assert sample_mode.samples_dir(config, workdir, 3) != out_dir


@pytest.mark.slow
def test_cli_eval_ode_likelihood_end_to_end_and_resume(tiny_run):
    _, workdir = tiny_run
    flags = ['--mode=eval', '--config.eval.likelihood=ode', '--config.eval.num_images=6', '--config.eval.batch_size=4',
             '--config.sampling.ode_rtol=1e-3', '--config.sampling.ode_atol=1e-3']
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
               PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get('PYTHONPATH', '')]))
    command = [sys.executable, '-m', 'ddpm_jax.main', '--config=configs/digits.py:tiny', f'--workdir={workdir}',
               *flags]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    [out_dir] = glob.glob(os.path.join(
        workdir, 'nll_ode_test_step3_hutchinson_rademacher1_adaptive_rtol0.001_atol0.001_fixedlarge_ema_seed0'))
    with open(os.path.join(out_dir, 'nll_ode.json')) as f:
        summary = json.load(f)
    assert summary['num_images'] == 6 and summary['likelihood'] == 'ode'
    assert np.isfinite(summary['nll_bpd']) and summary['nll_bpd'] > 0 and summary['nll_bpd_stderr'] > 0
    assert summary['nfe_mean'] > 0 and sorted(os.listdir(out_dir))[:2] == ['batch_00000.npz', 'batch_00001.npz']
    assert 'ODE NLL test' in result.stderr
    # Rerun: every batch is there, nothing is recomputed, the same summary.
    again = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-4000:]
    with open(os.path.join(out_dir, 'nll_ode.json')) as f:
        assert json.load(f) == summary


def test_pc_without_corrector_is_the_ancestral_sampler_and_bad_settings_are_named():
    d = _diffusion()
    model_fn = lambda x, t: 0.3 * jnp.tanh(x) * (1.0 + t.astype(x.dtype)[:, None, None, None] / T)
    rng = jax.random.key(7)
    pc = score.pc_sample_loop(d, d, model_fn, (3,) + IMAGE, rng, n_corrector_steps=0)
    ancestral = diffusion.p_sample_loop(d, model_fn, (3,) + IMAGE, rng)
    np.testing.assert_array_equal(pc, ancestral)
    with pytest.raises(ValueError, match='snr=0.0 must be > 0'):
        score.pc_sample_loop(d, d, model_fn, (3,) + IMAGE, rng, snr=0.0)
    with pytest.raises(ValueError, match="unknown divergence 'trace'"):
        score.ode_log_likelihood(d, model_fn, jnp.zeros((1,) + IMAGE), rng, divergence='trace')
    with pytest.raises(ValueError, match="unknown ode_solver 'rk4'"):
        score.ode_sample(d, model_fn, (1,) + IMAGE, rng, solver='rk4')


def test_eval_names_a_bad_likelihood_setting(tiny_run):
    config, workdir = tiny_run
    config = config.copy_and_resolve_references()
    config.eval.likelihood = 'elbo'
    with pytest.raises(ValueError, match="config.eval.likelihood='elbo'; allowed: 'bound'"):
        nll_mode.run(config, workdir)
