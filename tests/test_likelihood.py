"""ddpm_jax.likelihood (and the kl / hybrid training losses) against independent references.

The decoder reference evaluates the official tanh-CDF bin masses with 50-digit `decimal` arithmetic, so it
measures both the official float32 formula (off by up to ~11 nats in the tails) and ours.
"""
import math
from decimal import Decimal, localcontext

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from test_diffusion import (
    MEAN_TYPES,
    SHAPE,
    VAR_TYPES,
    assert_f32,
    assert_x64,
    col,
    documented_noise,
    linear_betas,
    make,
    random_inputs,
    ref_p_mean_variance,
    ref_posterior_mean,
    reference_tables,
)

from ddpm_jax import diffusion, likelihood, losses

LOG_MIN_MASS = math.log(1e-12)
PI_50 = Decimal('3.14159265358979323846264338327950288419716939937510')
UINT8_GRID = np.arange(256) * 2 / 255 - 1


# ----------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------

def ref_normal_kl(mean1, logvar1, mean2, logvar2):
    var1, var2 = np.exp(logvar1), np.exp(logvar2)
    return 0.5 * (logvar2 - logvar1) + (var1 + (mean1 - mean2) ** 2) / (2 * var2) - 0.5


def _decimal_cdf(u):
    """0.5 (1 + tanh(z)) = 1 / (1 + exp(-2z)), z = sqrt(2/pi)(u + 0.044715 u^3), in 50-digit decimal."""
    z = (2 / PI_50).sqrt() * (u + Decimal('0.044715') * u ** 3)
    if abs(z) > 10_000:  # beyond e^-20000: exactly 0 or 1 at 50 digits, and exp would overflow
        return Decimal(1) if z > 0 else Decimal(0)
    return 1 / (1 + (-2 * z).exp())


def ref_decoder_log_probs(x, means, log_scales):
    """Official discretized Gaussian log-likelihood (tanh CDF, edge bins to +-inf, 1e-12 floor), exactly."""
    x, means, log_scales = np.broadcast_arrays(x, means, log_scales)
    out = np.empty(x.shape)
    with localcontext() as ctx:
        ctx.prec = 50
        for i in np.ndindex(x.shape):
            xi = float(x[i])
            inv_stdv = (-Decimal(float(log_scales[i]))).exp()
            centered = Decimal(xi) - Decimal(float(means[i]))
            upper = Decimal(1) if xi > 0.999 else _decimal_cdf(inv_stdv * (centered + Decimal(1) / 255))
            lower = Decimal(0) if xi < -0.999 else _decimal_cdf(inv_stdv * (centered - Decimal(1) / 255))
            mass = upper - lower
            out[i] = max(float(mass.ln()), LOG_MIN_MASS) if mass > 0 else LOG_MIN_MASS
    return out


def official_float32_log_probs(x, means, log_scales):
    """The official float32 formula (diffusion_tf/utils.py), op for op."""
    x, means, log_scales = (jnp.asarray(a, jnp.float32) for a in (x, means, log_scales))

    def cdf(u):
        return 0.5 * (1.0 + jnp.tanh(np.float32(math.sqrt(2 / math.pi)) * (u + 0.044715 * u ** 3)))

    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = cdf(inv_stdv * (centered + 1 / 255.))
    cdf_min = cdf(inv_stdv * (centered - 1 / 255.))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return np.asarray(jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta)))


def ref_vb_terms_bpd(tb, mean_type, var_type, model_output, x_start, x_t, t, clip):
    true_mean = ref_posterior_mean(tb, x_start, x_t, t)
    true_log_var = col(tb['posterior_log_variance_clipped'], t)
    out = ref_p_mean_variance(tb, mean_type, var_type, model_output, x_t, t, clip)
    kl = ref_normal_kl(true_mean, true_log_var, out['mean'], out['log_variance']).mean(axis=(1, 2, 3)) / math.log(2)
    decoder = np.zeros(len(t))
    for row in np.flatnonzero(t == 0):
        decoder[row] = -ref_decoder_log_probs(x_start[row], out['mean'][row],
                                              0.5 * out['log_variance'][row]).mean() / math.log(2)
    return np.where(t == 0, decoder, kl), out['pred_xstart']


def grid_inputs(num_steps, var_type, seed):
    """random_inputs with x_start on the uint8 grid and the t=0 row's mean output near x_start, so the
    decoder sees realistic bins rather than only floored ones."""
    inp = random_inputs(num_steps, var_type, seed=seed)
    rng = np.random.default_rng(seed + 100)
    inp['x_start'] = rng.integers(0, 256, SHAPE) / 127.5 - 1
    inp['model_output'][0, ..., :SHAPE[-1]] = inp['x_start'][0] + 0.004 * rng.standard_normal(SHAPE[1:])
    return inp


# ----------------------------------------------------------------------------------------------------
# normal_kl and the CDF
# ----------------------------------------------------------------------------------------------------

def test_normal_kl_matches_reference_and_is_nonnegative():
    rng = np.random.default_rng(0)
    mean1, mean2 = rng.normal(size=(2, 1000))
    logvar1, logvar2 = rng.uniform(-10, 3, size=(2, 1000))
    want = ref_normal_kl(mean1, logvar1, mean2, logvar2)
    with jax.enable_x64(True):
        got = likelihood.normal_kl(*(jnp.asarray(a) for a in (mean1, logvar1, mean2, logvar2)))
        assert_x64(got, want)
        assert (np.asarray(got) >= 0).all()
        same = likelihood.normal_kl(jnp.asarray(mean1), jnp.asarray(logvar1), jnp.asarray(mean1), jnp.asarray(logvar1))
        assert (np.asarray(same) == 0).all()
    got = likelihood.normal_kl(*(jnp.asarray(a, jnp.float32) for a in (mean1, logvar1, mean2, logvar2)))
    # float32: exp(logvar1 - logvar2) reaches e^13, so the error scale is that term, not the (small) result.
    assert_f32(got, want, scale=np.exp(logvar1 - logvar2).max())
    assert (np.asarray(got) >= 0).all()
    same = likelihood.normal_kl(*(jnp.asarray(a, jnp.float32) for a in (mean1, logvar1, mean1, logvar1)))
    assert (np.asarray(same) == 0).all()
    # broadcasting against scalars, as in prior_bpd
    np.testing.assert_allclose(likelihood.normal_kl(jnp.asarray(mean1, jnp.float32), jnp.asarray(logvar1, jnp.float32),
                                                    0.0, 0.0), ref_normal_kl(mean1, logvar1, 0.0, 0.0), rtol=1e-5)


def test_approx_standard_normal_cdf():
    u = np.linspace(-6, 6, 2001)
    want = 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
    with jax.enable_x64(True):
        assert_x64(likelihood.approx_standard_normal_cdf(jnp.asarray(u)), want)
    np.testing.assert_allclose(likelihood.approx_standard_normal_cdf(jnp.asarray(u, jnp.float32)), want,
                               rtol=0, atol=2e-7)
    # The tanh form is an approximation of the true normal CDF (max error ~1.8e-4), kept for exactness.
    assert np.abs(want - scipy.stats.norm.cdf(u)).max() < 2e-4


# ----------------------------------------------------------------------------------------------------
# the decoder
# ----------------------------------------------------------------------------------------------------

# (mean, std): centred, tails, far outside [-1, 1]; std from the t=0 decoder (~0.0074) up to 2.
DECODER_CASES = [(0.0, 0.0074), (-0.5, 0.02), (0.9, 0.01), (0.0, 0.3), (0.5, math.exp(-2.0)), (-0.97, 0.05),
                 (0.999, 0.001), (1.3, 0.2), (-3.0, 0.5), (3.0, 2.0), (0.2, 0.004)]


def decoder_inputs(dtype):
    x = np.tile(UINT8_GRID, (len(DECODER_CASES), 1)).astype(dtype)
    means = np.array([[m] for m, _ in DECODER_CASES], dtype) * np.ones_like(x)
    log_scales = np.array([[math.log(s)] for _, s in DECODER_CASES], dtype) * np.ones_like(x)
    return x, means, log_scales


def test_decoder_float64_matches_exact_reference():
    x, means, log_scales = decoder_inputs(np.float64)
    want = ref_decoder_log_probs(x, means, log_scales)
    with jax.enable_x64(True):
        got = likelihood.discretized_gaussian_log_likelihood(jnp.asarray(x), means=jnp.asarray(means),
                                                             log_scales=jnp.asarray(log_scales))
        assert_x64(got, want)


def test_decoder_float32_fixes_the_official_tail_cancellation():
    x, means, log_scales = decoder_inputs(np.float32)
    want = ref_decoder_log_probs(x, means, log_scales)  # exact for these float32 inputs
    got = np.asarray(likelihood.discretized_gaussian_log_likelihood(
        jnp.asarray(x), means=jnp.asarray(means), log_scales=jnp.asarray(log_scales)))
    official = official_float32_log_probs(x, means, log_scales)
    ours_error, official_error = np.abs(got - want), np.abs(official - want)
    # Left: float32 rounding of the bin edges u = (x - mean +- 1/255) / std, each to ~6e-8 |u|, relative
    # to the bin width 2/255/std: up to ~6e-5 nats for std = 2 (the official formula has the same).
    assert ours_error.max() < 1e-4, ours_error.max()
    assert ours_error[want < math.log(1e-6)].max() < 5e-5
    # The official formula resolves masses only to ~6e-8: up to log(6e-8 / 1e-12) = 11 nats off.
    assert official_error.max() > 10, official_error.max()
    # Where the official float32 arithmetic is accurate (bin mass >= 1e-2, error <= 6e-8 / 1e-2) both agree.
    accurate = want > math.log(1e-2)
    assert accurate.sum() > 100
    np.testing.assert_allclose(got[accurate], official[accurate], rtol=0, atol=1e-5)
    np.testing.assert_allclose(official[accurate], want[accurate], rtol=0, atol=1e-5)


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_decoder_bin_masses_sum_to_one(dtype):
    means = np.array([-3.0, -1.2, -1.0, -0.6, 0.0, 0.4, 0.999, 1.0, 1.3, 3.0])
    stds = np.array([1e-3, 0.0074, 0.05, 0.5, 2.0])
    mean_grid, std_grid = (a.ravel() for a in np.meshgrid(means, stds))
    x = np.tile(UINT8_GRID, (len(mean_grid), 1)).astype(dtype)
    with jax.enable_x64(dtype == np.float64):
        log_probs = likelihood.discretized_gaussian_log_likelihood(
            jnp.asarray(x), means=jnp.asarray(mean_grid[:, None] * np.ones_like(x)),
            log_scales=jnp.asarray(np.log(std_grid)[:, None] * np.ones_like(x)))
        total = np.asarray(jnp.sum(jnp.exp(log_probs), axis=1), np.float64)
    # 256 masses, each within float32 rounding (~6e-8 of the CDF values); floored bins add up to 2.6e-10.
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=5e-6 if dtype == np.float32 else 3e-10)


def test_decoder_gradients_are_finite():
    x = jnp.asarray(np.tile(UINT8_GRID, (4, 1)), jnp.float32)
    means = jnp.asarray([[-5.0], [0.0], [0.3], [5.0]]) * jnp.ones_like(x)
    log_scales = jnp.asarray([[-60.0], [-5.0], [0.0], [60.0]]) * jnp.ones_like(x)  # std from e^-60 to e^60

    def total(means, log_scales):
        return jnp.sum(likelihood.discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales))

    value, grads = jax.value_and_grad(total, argnums=(0, 1))(means, log_scales)
    assert np.isfinite(value) and all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_decoder_shape_mismatch():
    with pytest.raises(ValueError, match=r'\(2, 3\) and \(2, 4\)'):
        likelihood.discretized_gaussian_log_likelihood(jnp.zeros((2, 3)), means=jnp.zeros((2, 4)), log_scales=0.0)
    with pytest.raises(ValueError, match=r'log_scales must broadcast to the shape of x \(2, 3\), got \(3, 3\)'):
        likelihood.discretized_gaussian_log_likelihood(jnp.zeros((2, 3)), means=jnp.zeros((2, 3)),
                                                       log_scales=jnp.zeros((3, 3)))


# ----------------------------------------------------------------------------------------------------
# bound terms, prior, losses
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('clip', [True, False])
@pytest.mark.parametrize('var_type', VAR_TYPES)
@pytest.mark.parametrize('mean_type', MEAN_TYPES)
@pytest.mark.parametrize('num_steps', [1000, 8])
def test_vb_terms_bpd(num_steps, mean_type, var_type, clip):
    betas = linear_betas(num_steps)
    tb = reference_tables(betas)
    inp = grid_inputs(num_steps, var_type, seed=11)
    want, want_pred = ref_vb_terms_bpd(tb, mean_type, var_type, inp['model_output'], inp['x_start'], inp['x_t'],
                                       inp['t'], clip)

    def compute(cast):
        return likelihood.vb_terms_bpd(make(betas, mean_type, var_type), cast(inp['model_output']),
                                       cast(inp['x_start']), cast(inp['x_t']), jnp.asarray(inp['t']),
                                       clip_denoised=clip)

    with jax.enable_x64(True):
        got, pred = compute(lambda a: jnp.asarray(a, jnp.float64))
        assert got.shape == (4,)
        assert_x64(got, want)
        assert_x64(pred, want_pred)
    got, pred = compute(lambda a: jnp.asarray(a, jnp.float32))
    # float32: KL terms divide squared mean differences by variances down to ~1e-4 (and up to 160x amplified
    # unclipped predictions): relative 1e-5 of the term.
    np.testing.assert_allclose(got, want, rtol=2e-5 if clip else 1e-4, atol=1e-6)


@pytest.mark.parametrize('var_type', VAR_TYPES)
@pytest.mark.parametrize('mean_type', MEAN_TYPES)
def test_kl_training_loss_is_the_unclipped_bound_term(mean_type, var_type):
    num_steps = 1000
    betas = linear_betas(num_steps)
    tb = reference_tables(betas)
    inp = grid_inputs(num_steps, var_type, seed=12)
    want, _ = ref_vb_terms_bpd(tb, mean_type, var_type, inp['model_output'], inp['x_start'], inp['x_t'], inp['t'],
                               clip=False)
    with jax.enable_x64(True):
        d = make(betas, mean_type, var_type, 'kl')
        got = losses.training_losses(d, *(jnp.asarray(inp[k]) for k in ('model_output', 'x_start', 'x_t', 't',
                                                                               'noise')))
        assert_x64(got, want)


@pytest.mark.parametrize('var_type', ['learned', 'learned_range'])
@pytest.mark.parametrize('mean_type', MEAN_TYPES)
@pytest.mark.parametrize('num_steps', [1000, 8])
def test_hybrid_loss_value_and_gradients(num_steps, mean_type, var_type):
    betas = linear_betas(num_steps)
    tb = reference_tables(betas)
    inp = grid_inputs(num_steps, var_type, seed=13)
    t = inp['t']
    channels = SHAPE[-1]
    target = dict(eps=inp['noise'], xstart=inp['x_start'],
                  xprev=ref_posterior_mean(tb, inp['x_start'], inp['x_t'], t))[mean_type]
    mse = ((target - inp['model_output'][..., :channels]) ** 2).mean(axis=(1, 2, 3))
    vb, _ = ref_vb_terms_bpd(tb, mean_type, var_type, inp['model_output'], inp['x_start'], inp['x_t'], t, clip=False)
    with jax.enable_x64(True):
        hybrid = make(betas, mean_type, var_type, 'hybrid')
        kl = make(betas, mean_type, var_type, 'kl')
        args = [jnp.asarray(inp[k]) for k in ('x_start', 'x_t', 't', 'noise')]
        assert_x64(losses.training_losses(hybrid, jnp.asarray(inp['model_output']), *args),
                   mse + 0.001 * num_steps * vb)

        def total(d, out):
            return jnp.sum(losses.training_losses(d, out, *args))

        grad_hybrid = np.asarray(jax.grad(total, argnums=1)(hybrid, jnp.asarray(inp['model_output'])))
        grad_kl = np.asarray(jax.grad(total, argnums=1)(kl, jnp.asarray(inp['model_output'])))
    # The mean channels see only the mse; the bound term reaches only the variance channels.
    want_mean_grad = -2 * (target - inp['model_output'][..., :channels]) / np.prod(SHAPE[1:])
    np.testing.assert_allclose(grad_hybrid[..., :channels], want_mean_grad, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(grad_hybrid[..., channels:], 0.001 * num_steps * grad_kl[..., channels:],
                               rtol=1e-10, atol=1e-15)
    assert np.abs(grad_kl[..., channels:]).max() > 0


@pytest.mark.parametrize('num_steps', [1000, 8])
def test_prior_bpd(num_steps):
    betas = linear_betas(num_steps)
    tb = reference_tables(betas)
    x_start = np.random.default_rng(3).uniform(-1, 1, SHAPE)
    alpha_bar = tb['alphas_cumprod'][-1]
    want = ref_normal_kl(np.sqrt(alpha_bar) * x_start, np.log(1 - alpha_bar), 0.0, 0.0).mean(axis=(1, 2, 3))
    want = want / math.log(2)
    with jax.enable_x64(True):
        assert_x64(likelihood.prior_bpd(make(betas), jnp.asarray(x_start)), want)
    got = likelihood.prior_bpd(make(betas), jnp.asarray(x_start, jnp.float32))
    # float32: -1 + exp(log(1 - alpha_bar)) cancels to the order of 1 ulp of 1 (6e-8 nats).
    np.testing.assert_allclose(got, want, rtol=1e-2 if num_steps == 1000 else 1e-5, atol=1e-7)
    if num_steps == 1000:
        assert ((5e-6 < want) & (want < 3e-5)).all()  # "about 1e-5 bits/dim" (paper Sec. 3.3)


def toy_model(var_type):
    def model_fn(x, t):
        mean_out = 0.7 * x + 0.01 * t.astype(x.dtype)[:, None, None, None]
        return jnp.concatenate([mean_out, jnp.tanh(x)], axis=-1) if var_type == 'learned_range' else mean_out
    return model_fn


def toy_model_np(var_type, x, t):
    mean_out = 0.7 * x + 0.01 * t[:, None, None, None]
    return np.concatenate([mean_out, np.tanh(x)], axis=-1) if var_type == 'learned_range' else mean_out


def ref_bpd_loop(tb, mean_type, var_type, x_start, rng, dtype, clip):
    num_steps = len(tb['betas'])
    batch = x_start.shape[0]
    terms, mse = np.zeros((batch, num_steps)), np.zeros((batch, num_steps))
    for step in range(num_steps):
        t = np.full(batch, step)
        noise = documented_noise(rng, step, x_start.shape, dtype)
        x_t = col(np.sqrt(tb['alphas_cumprod']), t) * x_start + col(np.sqrt(1 - tb['alphas_cumprod']), t) * noise
        terms[:, step], pred = ref_vb_terms_bpd(tb, mean_type, var_type, toy_model_np(var_type, x_t, t), x_start, x_t,
                                                t, clip)
        mse[:, step] = ((pred - x_start) ** 2).mean(axis=(1, 2, 3))
    alpha_bar = tb['alphas_cumprod'][-1]
    prior = ref_normal_kl(np.sqrt(alpha_bar) * x_start, np.log(1 - alpha_bar), 0.0, 0.0).mean(axis=(1, 2, 3))
    prior = prior / math.log(2)
    return dict(total_bpd=terms.sum(axis=1) + prior, terms_bpd=terms, prior_bpd=prior, mse=mse)


@pytest.mark.parametrize('mean_type,var_type,clip', [('eps', 'fixedlarge', True), ('xstart', 'learned_range', False)])
def test_calc_bpd_loop_matches_reference(mean_type, var_type, clip):
    num_steps = 6
    betas = linear_betas(num_steps)
    tb = reference_tables(betas)
    x_start = np.random.default_rng(4).integers(0, 256, (2, 4, 4, 3)) / 127.5 - 1
    rng = jax.random.key(9, impl='rbg')  # any key works; rbg only compiles faster than threefry on CPU
    model_fn = toy_model(var_type)
    with jax.enable_x64(True):
        want = ref_bpd_loop(tb, mean_type, var_type, x_start, rng, jnp.float64, clip)
        got = likelihood.calc_bpd_loop(make(betas, mean_type, var_type), model_fn, jnp.asarray(x_start), rng,
                                       clip_denoised=clip)
        assert got['terms_bpd'].shape == got['mse'].shape == (2, num_steps)
        for name in want:
            assert_x64(got[name], want[name])
    want = ref_bpd_loop(tb, mean_type, var_type, x_start, rng, jnp.float32, clip)
    got = likelihood.calc_bpd_loop(make(betas, mean_type, var_type), model_fn, jnp.asarray(x_start, jnp.float32), rng,
                                   clip_denoised=clip)
    for name in want:  # float32 bound terms: see test_vb_terms_bpd
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_calc_bpd_loop_traces_model_once():
    calls = []

    def model_fn(x, t):
        calls.append(1)
        return 0.5 * x

    d = make(linear_betas(8))
    likelihood.calc_bpd_loop(d, model_fn, jnp.zeros((2, 4, 4, 3)), jax.random.key(0, impl='rbg'))
    assert len(calls) == 1


@pytest.mark.parametrize('mean_type', ['xstart', 'xprev'])
def test_jsd_schedule_bound_is_finite_for_x0_and_xprev_models(mean_type):
    # jsd ends with beta = 1 (alpha_bar = 0): an 'eps' model is refused there (samplers.check_supported);
    # 'xstart' and 'xprev' models give a finite bound.
    from ddpm_jax import schedules
    betas = schedules.get_beta_schedule('jsd', beta_start=0.0, beta_end=0.0, num_diffusion_timesteps=10)
    d = diffusion.make_diffusion(betas, model_mean_type=mean_type, model_var_type='fixedlarge', loss_type='mse')
    x_start = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, SHAPE), jnp.float32)
    out = likelihood.calc_bpd_loop(d, lambda x, t: 0.5 * jnp.tanh(x), x_start, jax.random.PRNGKey(0))
    assert all(np.isfinite(np.asarray(v)).all() for v in out.values())
