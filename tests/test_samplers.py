"""Tests of ddpm_jax.samplers against float64 numpy re-derivations and the ancestral loop."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default as default_config
from ddpm_jax import diffusion, samplers

T = 20
SHAPE = (3, 4, 4, 2)


def _betas():
    return np.linspace(1e-3, 0.2, T)  # a short schedule whose alpha_bar still ends near 0 (about 0.1)


def _diffusion(var_type='fixedlarge', betas=None):
    return diffusion.make_diffusion(_betas() if betas is None else betas, model_mean_type='eps',
                                    model_var_type=var_type, loss_type='mse')


def _toy_eps_model(x, t):
    """A smooth stand-in for the network, depending on x and on the (original) timestep."""
    return 0.7 * jnp.tanh(x) * (t.astype(x.dtype)[:, None, None, None] + 1.0) / T


def _numpy_alpha_bar(betas):
    out, running = [], 1.0
    for beta in betas:
        running *= 1.0 - beta
        out.append(running)
    return np.array(out)


def test_respaced_timesteps_ends_and_order():
    for num_steps in (1, 2, 5, 7, T):
        steps = samplers.respaced_timesteps(T, num_steps)
        assert len(steps) == num_steps and steps[-1] == T - 1
        assert num_steps == 1 or steps[0] == 0
        assert np.all(np.diff(steps) > 0)
    np.testing.assert_array_equal(samplers.respaced_timesteps(T, 0), np.arange(T))
    with pytest.raises(ValueError, match='num_steps'):
        samplers.respaced_timesteps(T, T + 1)


def test_respaced_betas_match_numpy():
    betas = _betas()
    steps = np.array([0, 3, 4, 11, 19])
    alpha_bar = _numpy_alpha_bar(betas)
    expected, previous = [], 1.0
    for s in steps:  # the kept steps' alpha_bar must be reproduced: 1 - beta'_k = abar[s_k] / abar[s_{k-1}]
        expected.append(1.0 - alpha_bar[s] / previous)
        previous = alpha_bar[s]
    got = samplers.respaced_betas(betas, steps)
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=0)
    np.testing.assert_allclose(_numpy_alpha_bar(got), alpha_bar[steps], rtol=1e-13)
    with pytest.raises(ValueError, match='strictly increasing'):
        samplers.respaced_betas(betas, [3, 3, 5])


def test_respace_returns_diffusion_and_map():
    d, timestep_map = samplers.respace(_betas(), 5, model_mean_type='eps', model_var_type='fixedsmall')
    assert d.num_timesteps == 5 and d.model_var_type == 'fixedsmall'
    np.testing.assert_array_equal(np.asarray(timestep_map), samplers.respaced_timesteps(T, 5))
    np.testing.assert_allclose(np.asarray(d.alphas_cumprod),
                               _numpy_alpha_bar(_betas())[samplers.respaced_timesteps(T, 5)], rtol=1e-6)


@pytest.mark.parametrize('eta', [0.0, 0.5, 1.0])
@pytest.mark.parametrize('clip', [True, False])
def test_ddim_step_matches_numpy(eta, clip):
    rng = np.random.default_rng(0)
    x_t, eps, noise = (rng.normal(size=SHAPE) for _ in range(3))
    t = np.array([0, 7, 19])
    alpha_bar = _numpy_alpha_bar(_betas())
    alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
    expected = np.empty(SHAPE)
    for i, ti in enumerate(t):
        ab, ab_prev = alpha_bar[ti], alpha_bar_prev[ti]
        x0 = np.sqrt(1.0 / ab) * x_t[i] - np.sqrt(1.0 / ab - 1.0) * eps[i]
        if clip:
            x0 = np.clip(x0, -1.0, 1.0)
        eps_hat = (x_t[i] - np.sqrt(ab) * x0) / np.sqrt(1.0 - ab)
        sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        expected[i] = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev - sigma ** 2) * eps_hat + (ti > 0) * sigma * noise[i]
    with jax.enable_x64(True):
        got, _ = samplers.ddim_step(_diffusion(), jnp.asarray(eps), jnp.asarray(x_t), jnp.asarray(t),
                                    jnp.asarray(noise), eta=eta, clip_denoised=clip)
        got = np.asarray(got)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_respacing_to_all_steps_reproduces_p_sample_loop():
    rng = jax.random.PRNGKey(3)
    d_full = _diffusion()
    d_resp, timestep_map = samplers.respace(_betas(), 0, model_mean_type='eps', model_var_type='fixedlarge')
    want = diffusion.p_sample_loop(d_full, _toy_eps_model, SHAPE, rng)
    got = samplers.ancestral_sample_loop(d_resp, _toy_eps_model, SHAPE, rng, timestep_map=timestep_map)
    # Recomputed betas differ from the originals by float64 rounding only, invisible after the float32 cast
    # up to an ulp or so; the result agrees to float32 rounding.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-6)


def test_ddim_eta1_all_steps_equals_ancestral_fixedsmall():
    # Same noise draws (same rng scheme), same posterior mean and variance: equal up to rounding.
    with jax.enable_x64(True):
        rng = jax.random.PRNGKey(5)
        d = _diffusion('fixedsmall')
        want = diffusion.p_sample_loop(d, _toy_eps_model, SHAPE, rng)
        got = samplers.ddim_sample_loop(d, _toy_eps_model, SHAPE, rng, eta=1.0)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-10)


@pytest.mark.parametrize('num_steps', [T, 6, 2])
def test_ddim_eta0_with_exact_noise_model_recovers_data(num_steps):
    with jax.enable_x64(True):
        x_data = jnp.asarray(np.random.default_rng(1).uniform(-0.9, 0.9, size=SHAPE))
        alpha_bar = jnp.asarray(_numpy_alpha_bar(_betas()))

        def exact_eps(x, t):  # the noise that x holds relative to x_data at original timestep t
            ab = alpha_bar[t][:, None, None, None]
            return (x - jnp.sqrt(ab) * x_data) / jnp.sqrt(1.0 - ab)

        d, timestep_map = samplers.respace(_betas(), num_steps, model_mean_type='eps', model_var_type='fixedlarge')
        got = samplers.ddim_sample_loop(d, exact_eps, SHAPE, jax.random.PRNGKey(0), timestep_map=timestep_map,
                                        eta=0.0)
        np.testing.assert_allclose(np.asarray(got), np.asarray(x_data), rtol=0, atol=1e-12)


def test_ddim_eta0_is_deterministic_in_x_T_only():
    d = _diffusion()
    a = samplers.ddim_sample_loop(d, _toy_eps_model, SHAPE, jax.random.PRNGKey(0), eta=0.0)
    b = samplers.ddim_sample_loop(d, _toy_eps_model, SHAPE, jax.random.PRNGKey(0), eta=0.0)
    c = samplers.ddim_sample_loop(d, _toy_eps_model, SHAPE, jax.random.PRNGKey(1), eta=0.0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    with pytest.raises(ValueError, match='eta'):
        samplers.ddim_sample_loop(d, _toy_eps_model, SHAPE, jax.random.PRNGKey(0), eta=-1.0)


@pytest.mark.parametrize('sampler', ['ancestral', 'ddim'])
def test_sampler_compiles_once_with_one_model_trace(sampler):
    d, timestep_map = samplers.respace(_betas(), 5, model_mean_type='eps', model_var_type='fixedlarge')
    traces = []

    def model_fn(scale, x, t):
        traces.append(1)
        return scale * _toy_eps_model(x, t)

    loop = samplers.ancestral_sample_loop if sampler == 'ancestral' else samplers.ddim_sample_loop

    @jax.jit
    def run(scale, rng):
        return loop(d, lambda x, t: model_fn(scale, x, t), SHAPE, rng, timestep_map=timestep_map)

    outs = [run(jnp.float32(s), jax.random.PRNGKey(s)) for s in (1, 2, 3)]
    assert len(traces) == 1  # the model is traced once for all 5 steps (one lax loop), and no retrace
    assert run._cache_size() == 1
    assert all(np.isfinite(np.asarray(o)).all() for o in outs)


def test_p_sample_range_composes_to_p_sample_loop():
    rng = jax.random.PRNGKey(9)
    d = _diffusion()
    want = diffusion.p_sample_loop(d, _toy_eps_model, SHAPE, rng)
    x_big_t = jax.random.normal(jax.random.fold_in(rng, T), SHAPE)
    full = diffusion.p_sample_range(d, _toy_eps_model, x_big_t, rng, t_start=T - 1, t_stop=0)
    middle = diffusion.p_sample_range(d, _toy_eps_model, x_big_t, rng, t_start=T - 1, t_stop=8)
    split = diffusion.p_sample_range(d, _toy_eps_model, middle, rng, t_start=7, t_stop=0)
    np.testing.assert_array_equal(np.asarray(full), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(split), np.asarray(want))
    empty = diffusion.p_sample_range(d, _toy_eps_model, x_big_t, rng, t_start=T - 1, t_stop=T)
    np.testing.assert_array_equal(np.asarray(empty), np.asarray(x_big_t))


def _sampling(**values):
    """config.sampling of the defaults with `values` set."""
    sampling = default_config.get_config().sampling
    sampling.update(values)
    return sampling


def _config(sampler, num_steps, eta=0.0):
    config = ml_collections.ConfigDict()
    config.diffusion = dict(beta_schedule='linear', beta_start=1e-3, beta_end=0.2, num_diffusion_timesteps=T,
                            model_mean_type='eps', model_var_type='fixedlarge', loss_type='mse', hybrid_lambda=1e-3)
    config.sampling = _sampling(sampler=sampler, num_steps=num_steps, ddim_eta=eta, clip_denoised=True)
    return config


def test_make_sampler_dispatch():
    rng = jax.random.PRNGKey(2)
    full = samplers.make_sampler(_config('ancestral', 0))(_toy_eps_model, SHAPE, rng)
    np.testing.assert_array_equal(np.asarray(full),
                                  np.asarray(diffusion.p_sample_loop(_diffusion(), _toy_eps_model, SHAPE, rng)))
    d, timestep_map = samplers.respace(_betas(), 4, model_mean_type='eps', model_var_type='fixedlarge')
    ddim = samplers.make_sampler(_config('ddim', 4, 0.3))(_toy_eps_model, SHAPE, rng)
    np.testing.assert_array_equal(np.asarray(ddim), np.asarray(samplers.ddim_sample_loop(
        d, _toy_eps_model, SHAPE, rng, timestep_map=timestep_map, eta=0.3)))
    with pytest.raises(ValueError, match='sampler'):
        samplers.make_sampler(_config('euler', 0))


# --------------------------------------------------------------------------- exact models on Gaussian data
# Data x0 ~ N(M, S^2) (one pixel). The Bayes-optimal predictors at original timestep t, written here from
# q(x_t | x0) = N(sqrt(abar_t) x0, 1 - abar_t) alone (float64 numpy tables):
#   E[x0 | x_t] = M + sqrt(abar) S^2 / (abar S^2 + 1 - abar) (x_t - sqrt(abar) M)
#   E[eps | x_t] = (x_t - sqrt(abar) E[x0 | x_t]) / sqrt(1 - abar)
#   E[x_{t-1} | x_t] = c1 E[x0 | x_t] + c2 x_t, c1 = beta sqrt(abar_prev) / (1 - abar),
#                                          c2 = (1 - abar_prev) sqrt(1 - beta) / (1 - abar)
GAUSS_M, GAUSS_S, GAUSS_T, GAUSS_N = 0.3, 0.5, 1000, 8192


def _gaussian_config(mean_type, var_type, sampler, num_steps, eta=0.0, schedule='linear', num_timesteps=GAUSS_T):
    config = ml_collections.ConfigDict()
    config.diffusion = dict(beta_schedule=schedule, beta_start=1e-4, beta_end=0.02,
                            num_diffusion_timesteps=num_timesteps, model_mean_type=mean_type,
                            model_var_type=var_type, loss_type='mse', hybrid_lambda=1e-3)
    config.sampling = _sampling(sampler=sampler, num_steps=num_steps, ddim_eta=eta, clip_denoised=False)
    return config


def _exact_gaussian_model(mean_type, betas):
    betas = np.asarray(betas, np.float64)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    gain = np.sqrt(abar) * GAUSS_S ** 2 / (abar * GAUSS_S ** 2 + 1.0 - abar)
    with np.errstate(divide='ignore', invalid='ignore'):
        eps_scale = 1.0 / np.sqrt(1.0 - abar)
    c1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    c2 = (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)
    tables = {k: jnp.asarray(v, jnp.float32) for k, v in
              dict(sqrt_abar=np.sqrt(abar), gain=gain, eps_scale=eps_scale, c1=c1, c2=c2).items()}

    def model_fn(x, t):
        g = {k: v[t].reshape(-1, 1, 1, 1) for k, v in tables.items()}
        x0 = GAUSS_M + g['gain'] * (x - g['sqrt_abar'] * GAUSS_M)
        if mean_type == 'xstart':
            return x0
        if mean_type == 'eps':
            return (x - g['sqrt_abar'] * x0) * g['eps_scale']
        return g['c1'] * x0 + g['c2'] * x
    return model_fn


GAUSSIAN_SAMPLERS = [('ancestral', 0, 0.0, 'fixedlarge'), ('ancestral', 0, 0.0, 'fixedsmall'),
                     ('ancestral', 50, 0.0, 'fixedlarge'), ('ancestral', 50, 0.0, 'fixedsmall'),
                     ('ddim', 0, 0.0, 'fixedlarge'), ('ddim', 50, 0.0, 'fixedlarge'),
                     ('ddim', 50, 1.0, 'fixedlarge'), ('ddim', 10, 0.0, 'fixedsmall')]


def _gaussian_chain_moments(betas, sampler, num_steps, eta, var_type):
    """Mean and std of the sampler's output under the exact model, by propagating the moments of the linear
    Gaussian recursion x_{k-1} = a_k x_k + b_k + sigma_k z over the kept steps (float64 numpy)."""
    abar_full = np.cumprod(1.0 - np.asarray(betas, np.float64))
    kept = np.arange(len(betas)) if num_steps in (0, len(betas)) else np.round(
        np.linspace(0, len(betas) - 1, num_steps)).astype(int)
    abar = abar_full[kept]
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    mean, var = 0.0, 1.0
    for k in range(len(kept) - 1, -1, -1):
        gain = np.sqrt(abar[k]) * GAUSS_S ** 2 / (abar[k] * GAUSS_S ** 2 + 1.0 - abar[k])
        g, h = gain, GAUSS_M * (1.0 - gain * np.sqrt(abar[k]))          # E[x0 | x] = g x + h
        if sampler == 'ancestral':
            beta = 1.0 - abar[k] / abar_prev[k]
            c1 = beta * np.sqrt(abar_prev[k]) / (1.0 - abar[k])
            c2 = (1.0 - abar_prev[k]) * np.sqrt(1.0 - beta) / (1.0 - abar[k])
            a, b = c1 * g + c2, c1 * h
            sigma2 = beta if var_type == 'fixedlarge' else beta * (1.0 - abar_prev[k]) / (1.0 - abar[k])
        else:
            sigma2 = eta ** 2 * (1.0 - abar_prev[k]) / (1.0 - abar[k]) * (1.0 - abar[k] / abar_prev[k])
            d = np.sqrt(1.0 - abar_prev[k] - sigma2) / np.sqrt(1.0 - abar[k])
            a = np.sqrt(abar_prev[k]) * g + d * (1.0 - np.sqrt(abar[k]) * g)
            b = np.sqrt(abar_prev[k]) * h - d * np.sqrt(abar[k]) * h
        mean, var = a * mean + b, a * a * var + (sigma2 if k > 0 else 0.0)
    return mean, np.sqrt(var)


@pytest.mark.parametrize('mean_type', ['eps', 'xstart', 'xprev'])
@pytest.mark.parametrize('sampler,num_steps,eta,var_type', GAUSSIAN_SAMPLERS)
def test_exact_gaussian_model_samples_the_data(mean_type, sampler, num_steps, eta, var_type):
    config = _gaussian_config(mean_type, var_type, sampler, num_steps, eta)
    betas = np.linspace(1e-4, 0.02, GAUSS_T)
    sample_fn = jax.jit(lambda rng: samplers.make_sampler(config)(
        _exact_gaussian_model(mean_type, betas), (GAUSS_N, 1, 1, 1), rng))
    x = np.asarray(sample_fn(jax.random.PRNGKey(0)), np.float64).ravel()
    want_mean, want_std = _gaussian_chain_moments(betas, sampler, num_steps, eta, var_type)
    if sampler == 'ancestral' and num_steps == 0:  # the paper's sampler is within 1% of the data's moments;
        # fewer steps have their own discretisation bias (e.g. std +6% for respaced fixedlarge, +28% for DDIM-10)
        assert abs(want_mean - GAUSS_M) < 0.01 * GAUSS_S and abs(want_std - GAUSS_S) < 0.01 * GAUSS_S
    # The samples have the chain's moments within 4 standard errors (S / sqrt(N) and S / sqrt(2 N)); before
    # xprev_as_xstart, an 'xprev' model gave std 2.6 (ancestral-50) and 9.5 (DDIM-50) here.
    assert abs(x.mean() - want_mean) < 4 * want_std / np.sqrt(GAUSS_N), (x.mean(), want_mean)
    assert abs(x.std() - want_std) < 4 * want_std / np.sqrt(2 * GAUSS_N), (x.std(), want_std)


def test_refusals_name_the_reason_and_the_fix():
    jsd = samplers.schedules.get_beta_schedule('jsd', beta_start=0.0, beta_end=0.0, num_diffusion_timesteps=10)
    for sampler, num_steps in (('ancestral', 0), ('ancestral', 5), ('ddim', 0), ('ddim', 5), ('nll', 0)):
        with pytest.raises(ValueError, match="alpha_bar = 0.*model_mean_type='xstart' or 'xprev'"):
            samplers.check_supported('eps', 'fixedlarge', sampler, num_steps, jsd)
    with pytest.raises(ValueError, match="learned.*num_steps=0"):
        samplers.check_supported('eps', 'learned', 'ancestral', 5, _betas())
    with pytest.raises(ValueError, match='alpha_bar = 0'):
        samplers.make_sampler(_gaussian_config('eps', 'fixedlarge', 'ddim', 5, schedule='jsd', num_timesteps=10))
    # Everything else is exact (tested above) and passes.
    for mean_type in ('eps', 'xstart', 'xprev'):
        for var_type in ('fixedsmall', 'fixedlarge', 'learned_range'):
            for sampler, num_steps in (('ancestral', 0), ('ancestral', 5), ('ddim', 0), ('ddim', 5)):
                assert samplers.check_supported(mean_type, var_type, sampler, num_steps, _betas()) is None
    for sampler, num_steps in (('ancestral', 0), ('ddim', 0), ('ddim', 5)):
        assert samplers.check_supported('eps', 'learned', sampler, num_steps, _betas()) is None
    for mean_type in ('xstart', 'xprev'):
        assert samplers.check_supported(mean_type, 'fixedlarge', 'ancestral', 5, jsd) is None


@pytest.mark.parametrize('mean_type', ['xstart', 'xprev'])
@pytest.mark.parametrize('sampler,num_steps', [('ancestral', 0), ('ancestral', 4), ('ddim', 4)])
def test_jsd_schedule_samples_finite_for_x0_and_xprev_models(mean_type, sampler, num_steps):
    betas = samplers.schedules.get_beta_schedule('jsd', beta_start=0.0, beta_end=0.0, num_diffusion_timesteps=10)
    config = _gaussian_config(mean_type, 'fixedlarge', sampler, num_steps, schedule='jsd', num_timesteps=10)
    x = samplers.make_sampler(config)(_exact_gaussian_model(mean_type, betas), (64, 1, 1, 1), jax.random.PRNGKey(0))
    assert np.isfinite(np.asarray(x)).all()


def test_sampler_settings_name_a_missing_or_mistyped_key():
    config = _config('ddim', 4, 0.3)
    assert samplers.SamplerSettings.from_config(config.sampling).ddim_eta == 0.3
    del config.sampling['snr']
    with pytest.raises(ValueError, match=r'config\.sampling\.snr is missing'):
        samplers.make_sampler(config)
    with pytest.raises(ValueError, match=r'config\.sampling\.clip_denoised=1 must be of type bool'):
        samplers.SamplerSettings.from_config(dict(_sampling().to_dict(), clip_denoised=1))
