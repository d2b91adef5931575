"""ddpm_jax.diffusion against independent float64 numpy re-derivations (paper Sec. 2-3;
official diffusion_utils_2.py).

Every check runs twice: with float64 tables under `jax.enable_x64(True)` at ~1e-10 relative, and with the
default float32 tables at float32 tolerances. Batches always contain t=0 and t=T-1.
The kl/hybrid training losses are checked in test_likelihood.py, beside the bound's reference.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as default_config
from ddpm_jax import diffusion, losses, schedules

MEAN_TYPES = ('eps', 'xstart', 'xprev')
VAR_TYPES = ('fixedsmall', 'fixedlarge', 'learned', 'learned_range')
SCHEDULES = ('linear', 'quad', 'warmup10', 'warmup50', 'const', 'jsd', 'cosine')
SHAPE = (4, 4, 4, 3)
X64_RTOL = 1e-10


# ----------------------------------------------------------------------------------------------------
# float64 numpy reference
# ----------------------------------------------------------------------------------------------------

def linear_betas(num_steps):
    return np.linspace(1e-4, 0.02, num_steps) if num_steps == 1000 else np.linspace(0.05, 0.4, num_steps)


def reference_tables(betas):
    """The official buffers, written out step by step in float64."""
    num_steps = len(betas)
    alpha_bar = np.empty(num_steps)
    running = 1.0
    for i, beta in enumerate(betas):
        running *= 1.0 - beta
        alpha_bar[i] = running
    alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
    with np.errstate(divide='ignore'):
        post_var = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
        coef1 = betas * np.sqrt(alpha_bar_prev) / (1 - alpha_bar)
        coef2 = (1 - alpha_bar_prev) * np.sqrt(1 - betas) / (1 - alpha_bar)
        post_log_var = np.log(np.where(np.arange(num_steps) == 0, post_var[1], post_var))
        return dict(
            betas=betas, log_betas=np.log(betas), alphas_cumprod=alpha_bar, alphas_cumprod_prev=alpha_bar_prev,
            sqrt_alphas_cumprod=np.sqrt(alpha_bar), sqrt_one_minus_alphas_cumprod=np.sqrt(1 - alpha_bar),
            log_one_minus_alphas_cumprod=np.log(1 - alpha_bar),
            sqrt_recip_alphas_cumprod=1 / np.sqrt(alpha_bar),
            sqrt_recipm1_alphas_cumprod=np.sqrt((1 - alpha_bar) / alpha_bar),
            posterior_variance=post_var, posterior_log_variance_clipped=post_log_var,
            posterior_mean_coef1=coef1, posterior_mean_coef2=coef2,
            recip_posterior_mean_coef1=1 / coef1, posterior_mean_coef2_over_coef1=coef2 / coef1,
            fixedlarge_log_variance=np.log(np.where(np.arange(num_steps) == 0, post_var[1], betas)))


def col(table, t):
    return table[t][:, None, None, None]


def ref_predict_xstart_from_eps(tb, x_t, t, eps):
    with np.errstate(divide='ignore', invalid='ignore'):  # jsd: alpha_bar[T-1] = 0
        return (x_t - col(np.sqrt(1 - tb['alphas_cumprod']), t) * eps) / col(np.sqrt(tb['alphas_cumprod']), t)


def ref_posterior_mean(tb, x_start, x_t, t):
    return col(tb['posterior_mean_coef1'], t) * x_start + col(tb['posterior_mean_coef2'], t) * x_t


def ref_predict_xstart_from_xprev(tb, x_t, t, xprev):
    return (xprev - col(tb['posterior_mean_coef2'], t) * x_t) / col(tb['posterior_mean_coef1'], t)


def ref_p_mean_variance(tb, mean_type, var_type, model_output, x_t, t, clip):
    channels = x_t.shape[-1]
    mean_out, var_out = model_output[..., :channels], model_output[..., channels:]
    ones = np.ones_like(x_t)
    if var_type == 'fixedsmall':
        variance = col(tb['posterior_variance'], t) * ones
        log_variance = np.log(col(np.where(t == 0, tb['posterior_variance'][1], tb['posterior_variance'][t]),
                                  np.arange(len(t)))) * ones
    elif var_type == 'fixedlarge':
        variance = col(tb['betas'], t) * ones
        log_variance = np.log(col(np.where(t == 0, tb['posterior_variance'][1], tb['betas'][t]),
                                  np.arange(len(t)))) * ones
    elif var_type == 'learned':
        log_variance, variance = var_out, np.exp(var_out)
    else:
        low = np.log(col(np.where(t == 0, tb['posterior_variance'][1], tb['posterior_variance'][t]),
                         np.arange(len(t))))
        high = np.log(col(tb['betas'], t))
        weight = (var_out + 1) / 2
        log_variance = weight * high + (1 - weight) * low
        variance = np.exp(log_variance)
    clip_fn = (lambda a: np.clip(a, -1, 1)) if clip else (lambda a: a)
    if mean_type == 'xprev':
        pred_xstart = clip_fn(ref_predict_xstart_from_xprev(tb, x_t, t, mean_out))
        mean = mean_out
    else:
        pred_xstart = clip_fn(mean_out if mean_type == 'xstart' else ref_predict_xstart_from_eps(tb, x_t, t, mean_out))
        mean = ref_posterior_mean(tb, pred_xstart, x_t, t)
    return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------

def make(betas, mean_type='eps', var_type='fixedlarge', loss_type=None):
    if loss_type is None:
        loss_type = 'hybrid' if var_type in ('learned', 'learned_range') else 'mse'
    return diffusion.make_diffusion(betas, model_mean_type=mean_type, model_var_type=var_type, loss_type=loss_type)


def batch_t(num_steps, rng):
    """[0, T-1, two random steps]."""
    return np.array([0, num_steps - 1, *rng.integers(0, num_steps, size=2)], dtype=np.int32)


def random_inputs(num_steps, var_type, seed=0):
    rng = np.random.default_rng(seed)
    x_start = rng.uniform(-1, 1, SHAPE)
    noise = rng.standard_normal(SHAPE)
    x_t = rng.standard_normal(SHAPE)
    mean_out = 1.5 * rng.standard_normal(SHAPE)  # reaches outside [-1, 1], so clipping matters
    if var_type == 'learned':
        model_output = np.concatenate([mean_out, rng.uniform(-9, -2, SHAPE)], axis=-1)
    elif var_type == 'learned_range':
        model_output = np.concatenate([mean_out, rng.uniform(-1, 1, SHAPE)], axis=-1)
    else:
        model_output = mean_out
    return dict(x_start=x_start, noise=noise, x_t=x_t, model_output=model_output, t=batch_t(num_steps, rng))


def assert_x64(got, want):
    got = np.asarray(got)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=X64_RTOL, atol=1e-13)


def assert_f32(got, want, scale=1.0):
    """float32 result against float64: a few ulps of the largest magnitude (`scale`) entering the sum."""
    got = np.asarray(got)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=4e-6, atol=4e-6 * scale)


# ----------------------------------------------------------------------------------------------------
# tables and pytree
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('num_steps', [1000, 8])
@pytest.mark.parametrize('schedule', SCHEDULES)
def test_tables_match_reference(schedule, num_steps):
    betas = schedules.get_beta_schedule(schedule, beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=num_steps)
    want = reference_tables(betas)
    with jax.enable_x64(True):
        d64 = make(betas)
    d32 = make(betas)
    for name, table in want.items():
        got64, got32 = np.asarray(getattr(d64, name)), np.asarray(getattr(d32, name))
        assert got64.dtype == np.float64 and got32.dtype == np.float32, name
        np.testing.assert_allclose(got64, table, rtol=X64_RTOL, atol=0, err_msg=name)
        # float32 tables are the float64 values rounded once (the official cast at use).
        np.testing.assert_array_equal(got32, table.astype(np.float32), err_msg=name)


def test_official_quirks_in_tables():
    betas = linear_betas(1000)
    with jax.enable_x64(True):
        d = make(betas)
        assert float(d.posterior_variance[0]) == 0.0
        assert float(d.posterior_log_variance_clipped[0]) == pytest.approx(math.log(float(d.posterior_variance[1])))
        assert float(d.fixedlarge_log_variance[0]) == pytest.approx(-9.8167, abs=1e-4)  # log(posterior_variance[1])
        assert float(d.posterior_mean_coef1[0]) == pytest.approx(1.0, abs=1e-12)
        assert float(d.posterior_mean_coef2[0]) == 0.0


def test_diffusion_is_a_jittable_pytree():
    d = make(linear_betas(8), 'xprev', 'learned_range', 'hybrid')
    leaves, treedef = jax.tree_util.tree_flatten(d)
    assert len(leaves) == 16 and all(isinstance(leaf, jax.Array) for leaf in leaves)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (rebuilt.model_mean_type, rebuilt.model_var_type, rebuilt.loss_type, rebuilt.num_timesteps) == (
        'xprev', 'learned_range', 'hybrid', 8)
    traces = []

    @jax.jit
    def forward(d, x, t, noise):
        traces.append(d.model_var_type)  # static fields are plain Python values inside jit
        return diffusion.q_sample(d, x, t, noise)

    x = jnp.ones(SHAPE)
    t = jnp.array([0, 7, 3, 3])
    forward(d, x, t, x)
    forward(jax.tree.map(lambda a: a * 1.0, d), x, t, x)
    assert traces == ['learned_range']


def test_diffusion_from_config():
    config = default_config.get_config()
    d = diffusion.diffusion_from_config(config)
    assert (d.model_mean_type, d.model_var_type, d.loss_type, d.num_timesteps, d.hybrid_lambda) == (
        'eps', 'fixedlarge', 'mse', 1000, 0.001)
    np.testing.assert_allclose(np.asarray(d.betas), np.linspace(1e-4, 0.02, 1000).astype(np.float32))
    config.diffusion.beta_schedule = 'cosine'
    config.diffusion.num_diffusion_timesteps = 50
    config.diffusion.model_var_type = 'learned_range'
    config.diffusion.loss_type = 'hybrid'
    d = diffusion.diffusion_from_config(config)
    assert d.num_timesteps == 50 and d.model_var_type == 'learned_range' and d.loss_type == 'hybrid'


# ----------------------------------------------------------------------------------------------------
# forward process and posterior
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('num_steps', [1000, 8])
def test_forward_and_posterior(num_steps):
    betas = linear_betas(num_steps)
    tb = reference_tables(betas)
    inp = random_inputs(num_steps, 'fixedlarge')
    x0, x_t, noise, t = inp['x_start'], inp['x_t'], inp['noise'], inp['t']
    sa, s1a = col(np.sqrt(tb['alphas_cumprod']), t), col(np.sqrt(1 - tb['alphas_cumprod']), t)
    want = dict(
        q_mean=sa * x0, q_var=col(1 - tb['alphas_cumprod'], t), q_log_var=col(np.log(1 - tb['alphas_cumprod']), t),
        q_sample=sa * x0 + s1a * noise,
        post_mean=ref_posterior_mean(tb, x0, x_t, t), post_var=col(tb['posterior_variance'], t),
        post_log_var=col(tb['posterior_log_variance_clipped'], t),
        from_eps=ref_predict_xstart_from_eps(tb, x_t, t, noise),
        from_xprev=ref_predict_xstart_from_xprev(tb, x_t, t, noise))
    # float32 error scale: the largest coefficient times |input| (sqrt(1/alpha_bar) ~ 160 at T=1000).
    scales = dict(from_eps=col(1 / np.sqrt(tb['alphas_cumprod']), t).max() * 4,
                  from_xprev=col(1 / tb['posterior_mean_coef1'], t).max() * 4)

    def compute(d, cast):
        t_j = jnp.asarray(t)
        x0_j, x_t_j, noise_j = cast(x0), cast(x_t), cast(noise)
        q_mean, q_var, q_log_var = diffusion.q_mean_variance(d, x0_j, t_j)
        post_mean, post_var, post_log_var = diffusion.q_posterior_mean_variance(d, x0_j, x_t_j, t_j)
        return dict(q_mean=q_mean, q_var=q_var, q_log_var=q_log_var,
                    q_sample=diffusion.q_sample(d, x0_j, t_j, noise_j),
                    post_mean=post_mean, post_var=post_var, post_log_var=post_log_var,
                    from_eps=diffusion.predict_xstart_from_eps(d, x_t_j, t_j, noise_j),
                    from_xprev=diffusion.predict_xstart_from_xprev(d, x_t_j, t_j, noise_j))

    with jax.enable_x64(True):
        got = compute(make(betas), lambda a: jnp.asarray(a, jnp.float64))
        for name in want:
            assert got[name].shape == want[name].shape, name
            assert_x64(got[name], want[name])
    got = compute(make(betas), lambda a: jnp.asarray(a, jnp.float32))
    for name in want:
        assert_f32(got[name], want[name], scale=scales.get(name, 1.0))


@pytest.mark.parametrize('num_steps', [1000, 8])
def test_predict_xstart_from_eps_inverts_q_sample(num_steps):
    inp = random_inputs(num_steps, 'fixedlarge', seed=1)
    t = jnp.asarray(inp['t'])
    with jax.enable_x64(True):
        d = make(linear_betas(num_steps))
        x_t = diffusion.q_sample(d, jnp.asarray(inp['x_start']), t, jnp.asarray(inp['noise']))
        np.testing.assert_allclose(diffusion.predict_xstart_from_eps(d, x_t, t, jnp.asarray(inp['noise'])),
                                   inp['x_start'], rtol=0, atol=1e-12)
    d = make(linear_betas(num_steps))
    x0, noise = jnp.asarray(inp['x_start'], jnp.float32), jnp.asarray(inp['noise'], jnp.float32)
    x_t = diffusion.q_sample(d, x0, t, noise)
    # float32: x_t is rounded once, then multiplied by sqrt(1/alpha_bar) <= 160: ~160 * 6e-8 * |x_t|.
    np.testing.assert_allclose(diffusion.predict_xstart_from_eps(d, x_t, t, noise), x0, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# reverse process
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('clip', [True, False])
@pytest.mark.parametrize('var_type', VAR_TYPES)
@pytest.mark.parametrize('mean_type', MEAN_TYPES)
@pytest.mark.parametrize('num_steps', [1000, 8])
def test_p_mean_variance_and_p_sample(num_steps, mean_type, var_type, clip):
    betas = linear_betas(num_steps)
    tb = reference_tables(betas)
    inp = random_inputs(num_steps, var_type, seed=2)
    t = inp['t']
    want = ref_p_mean_variance(tb, mean_type, var_type, inp['model_output'], inp['x_t'], t, clip)
    want_sample = want['mean'] + (t != 0)[:, None, None, None] * np.exp(0.5 * want['log_variance']) * inp['noise']
    assert (want_sample[0] == want['mean'][0]).all()  # no noise at t=0
    # float32 scale: unclipped predictions are amplified by up to sqrt(1/alpha_bar) or 1/coef1.
    scale = 1.0 if clip else np.abs(want['pred_xstart']).max() + 160

    def compute(d, cast):
        args = (cast(inp['model_output']), cast(inp['x_t']), jnp.asarray(t))
        out = diffusion.p_mean_variance(d, *args, clip_denoised=clip)
        sample = diffusion.p_sample(d, *args, cast(inp['noise']), clip_denoised=clip)
        return out, sample

    with jax.enable_x64(True):
        out, sample = compute(make(betas, mean_type, var_type), lambda a: jnp.asarray(a, jnp.float64))
        for name in want:
            assert out[name].shape == SHAPE, name
            assert_x64(out[name], want[name])
        assert_x64(sample, want_sample)
    out, sample = compute(make(betas, mean_type, var_type), lambda a: jnp.asarray(a, jnp.float32))
    for name in want:
        assert_f32(out[name], want[name], scale=scale)
    assert_f32(sample, want_sample, scale=scale)


@pytest.mark.parametrize('schedule', SCHEDULES)
def test_p_mean_variance_every_schedule(schedule):
    betas = schedules.get_beta_schedule(schedule, beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=1000)
    tb = reference_tables(betas)
    inp = random_inputs(1000, 'learned_range', seed=3)
    inp['x_t'][1] += 0.5  # x_t - eps != 0 in every pixel of the t=T-1 row
    want = ref_p_mean_variance(tb, 'eps', 'learned_range', inp['model_output'], inp['x_t'], inp['t'], True)
    with jax.enable_x64(True):
        out = diffusion.p_mean_variance(make(betas, 'eps', 'learned_range'), jnp.asarray(inp['model_output']),
                                        jnp.asarray(inp['x_t']), jnp.asarray(inp['t']), clip_denoised=True)
        for name in want:
            got = np.asarray(out[name])
            if schedule == 'jsd' and name in ('mean', 'pred_xstart'):
                # alpha_bar[T-1] = 0: x0 from x_t at t=T-1 is inf * x_t - inf * eps, not finite, as in the
                # official code (x_T carries no information about x0); compare the other rows.
                assert not np.isfinite(got[1]).all()
                got, want[name] = np.delete(got, 1, axis=0), np.delete(want[name], 1, axis=0)
            assert_x64(got, want[name])


# ----------------------------------------------------------------------------------------------------
# sampling loops
# ----------------------------------------------------------------------------------------------------

def toy_model_jnp(var_type):
    def model_fn(x, t):
        mean_out = 0.7 * x + 0.01 * t.astype(x.dtype)[:, None, None, None]
        if var_type == 'learned_range':
            return jnp.concatenate([mean_out, jnp.tanh(x)], axis=-1)
        return mean_out
    return model_fn


def toy_model_np(var_type, x, t):
    mean_out = 0.7 * x + 0.01 * t[:, None, None, None]
    return np.concatenate([mean_out, np.tanh(x)], axis=-1) if var_type == 'learned_range' else mean_out


def documented_noise(rng, step, shape, dtype):
    """The loops' documented draws: x_T from fold_in(rng, T), the noise of step t from fold_in(rng, t)."""
    return np.asarray(jax.random.normal(jax.random.fold_in(rng, step), shape, dtype), np.float64)


def ref_sample_loop(tb, mean_type, var_type, shape, rng, dtype, clip, freq):
    num_steps = len(tb['betas'])
    x = documented_noise(rng, num_steps, shape, dtype)
    preds = np.zeros((shape[0], num_steps // freq) + shape[1:])
    for step in reversed(range(num_steps)):
        t = np.full(shape[0], step)
        out = ref_p_mean_variance(tb, mean_type, var_type, toy_model_np(var_type, x, t), x, t, clip)
        noise = documented_noise(rng, step, shape, dtype)
        x = out['mean'] + (step != 0) * np.exp(0.5 * out['log_variance']) * noise
        if step % freq == 0 and step // freq < preds.shape[1]:
            preds[:, step // freq] = out['pred_xstart']
    return x, preds


@pytest.mark.parametrize('mean_type,var_type,clip', [('eps', 'fixedlarge', True), ('eps', 'fixedsmall', False),
                                                     ('xstart', 'learned_range', True),
                                                     ('xprev', 'fixedlarge', False)])
def test_sample_loops_match_reference(mean_type, var_type, clip):
    num_steps, freq, shape = 10, 3, (2, 4, 4, 3)  # T not a multiple of freq: slots t=0,3,6; t=9 is dropped
    betas = linear_betas(num_steps)
    tb = reference_tables(betas)
    rng = jax.random.key(7, impl='rbg')  # any key works; rbg only compiles faster than threefry on CPU
    model_fn = toy_model_jnp(var_type)
    with jax.enable_x64(True):
        want_x, want_preds = ref_sample_loop(tb, mean_type, var_type, shape, rng, jnp.float64, clip, freq)
        d = make(betas, mean_type, var_type)
        x, preds = diffusion.p_sample_loop_progressive(d, model_fn, shape, rng, freq=freq, clip_denoised=clip)
        assert preds.shape == (2, 3, 4, 4, 3)
        assert_x64(x, want_x)
        assert_x64(preds, want_preds)
        if mean_type == 'eps' and clip:
            np.testing.assert_array_equal(diffusion.p_sample_loop(d, model_fn, shape, rng), x)
    want_x, want_preds = ref_sample_loop(tb, mean_type, var_type, shape, rng, jnp.float32, clip, freq)
    x, preds = diffusion.p_sample_loop_progressive(make(betas, mean_type, var_type), model_fn, shape, rng,
                                                   freq=freq, clip_denoised=clip)
    # float32 through 10 steps of a toy model with gain 0.7 / 1/coef1: a few 1e-6 (looser without clipping).
    tol = 2e-5 if clip else 2e-4
    np.testing.assert_allclose(x, want_x, rtol=tol, atol=tol)
    np.testing.assert_allclose(preds, want_preds, rtol=tol, atol=tol)


def test_loops_trace_model_once():
    d = make(linear_betas(8))
    calls = []

    def model_fn(x, t):
        calls.append(1)  # runs once per trace, never per step
        return 0.5 * x

    diffusion.p_sample_loop(d, model_fn, (2, 4, 4, 3), jax.random.key(0, impl="rbg"))
    assert len(calls) == 1
    diffusion.p_sample_loop_progressive(d, model_fn, (2, 4, 4, 3), jax.random.key(0, impl="rbg"), freq=2)
    assert len(calls) == 2
    jax.jit(lambda d, key: diffusion.p_sample_loop(d, model_fn, (2, 4, 4, 3), key))(d, jax.random.key(1, impl="rbg"))
    assert len(calls) == 3


def test_p_sample_loop_recovers_a_data_point_from_exact_noise():
    """eps-prediction with the exact noise predicts x0 at every step; the last step (no noise) returns it."""
    num_steps = 1000
    d = make(np.linspace(1e-4, 0.02, num_steps))
    x0 = jnp.asarray(np.random.default_rng(5).integers(0, 256, (1, 4, 4, 3)) / 127.5 - 1, jnp.float32)
    sqrt_ab = jnp.asarray(np.sqrt(reference_tables(np.linspace(1e-4, 0.02, num_steps))['alphas_cumprod']),
                          jnp.float32)

    def exact_eps(x, t):
        a = sqrt_ab[t][:, None, None, None]
        return (x - a * x0) / jnp.sqrt(1 - a * a)

    for clip in (True, False):
        sample = diffusion.p_sample_loop(d, exact_eps, x0.shape, jax.random.key(3), clip_denoised=clip)
        # float32: the exact-eps round trip x_t -> eps -> x0 loses a few ulps per step near t=0.
        np.testing.assert_allclose(sample, x0, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# mse training loss (kl and hybrid: test_likelihood.py)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('mean_type', MEAN_TYPES)
@pytest.mark.parametrize('num_steps', [1000, 8])
def test_mse_training_loss(num_steps, mean_type):
    betas = linear_betas(num_steps)
    tb = reference_tables(betas)
    inp = random_inputs(num_steps, 'fixedsmall', seed=4)
    t = inp['t']
    x_t = col(np.sqrt(tb['alphas_cumprod']), t) * inp['x_start'] + col(np.sqrt(1 - tb['alphas_cumprod']), t) * inp[
        'noise']
    target = dict(eps=inp['noise'], xstart=inp['x_start'],
                  xprev=ref_posterior_mean(tb, inp['x_start'], x_t, t))[mean_type]
    want = ((target - inp['model_output']) ** 2).mean(axis=(1, 2, 3))

    def compute(d, cast):
        return losses.training_losses(d, cast(inp['model_output']), cast(inp['x_start']), cast(x_t),
                                         jnp.asarray(t), cast(inp['noise']))

    with jax.enable_x64(True):
        assert_x64(compute(make(betas, mean_type, 'fixedsmall'), lambda a: jnp.asarray(a, jnp.float64)), want)
    got = compute(make(betas, mean_type, 'fixedsmall'), lambda a: jnp.asarray(a, jnp.float32))
    assert got.shape == (4,)
    assert_f32(got, want, scale=want.max())


# ----------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs,match', [
    (dict(model_mean_type='noise'), "model_mean_type 'noise'; allowed: eps, xstart, xprev"),
    (dict(model_var_type='big'), "model_var_type 'big'; allowed: fixedsmall, fixedlarge, learned, learned_range"),
    (dict(loss_type='l1'), "loss_type 'l1'; allowed: mse, kl, hybrid"),
    (dict(model_var_type='learned', loss_type='mse'), 'no gradient'),
    (dict(model_var_type='learned_range', loss_type='mse'), 'no gradient'),
    (dict(loss_type='hybrid'), 'needs a learned variance'),
])
def test_bad_names_and_combinations(kwargs, match):
    args = dict(model_mean_type='eps', model_var_type='fixedlarge', loss_type='mse')
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        diffusion.make_diffusion(linear_betas(8), **args)


@pytest.mark.parametrize('betas', [np.array([0.1, 0.0, 0.2]), np.array([0.1, 1.5]), np.ones((2, 2)) * 0.1])
def test_bad_betas(betas):
    with pytest.raises(ValueError, match='betas'):
        make(betas)


def test_shape_mismatches_show_both_shapes():
    d = make(linear_betas(8))
    x = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match=r'\(2, 4, 4, 3\) and \(2, 4, 4, 1\)'):
        diffusion.q_sample(d, x, jnp.array([0, 1]), jnp.zeros((2, 4, 4, 1)))
    with pytest.raises(ValueError, match=r't shape \(3,\) and x shape \(2, 4, 4, 3\)'):
        diffusion.q_mean_variance(d, x, jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r'model_output must have shape \(2, 4, 4, 3\).*got \(2, 4, 4, 6\)'):
        diffusion.p_mean_variance(d, jnp.zeros((2, 4, 4, 6)), x, jnp.array([0, 1]), clip_denoised=True)
    learned = make(linear_betas(8), var_type='learned')
    with pytest.raises(ValueError, match=r'model_output must have shape \(2, 4, 4, 6\).*got \(2, 4, 4, 3\)'):
        diffusion.p_sample(learned, x, x, jnp.array([0, 1]), x)
    with pytest.raises(ValueError, match='freq'):
        diffusion.p_sample_loop_progressive(d, lambda x, t: x, x.shape, jax.random.key(0), freq=0)


def test_diffusion_settings_name_a_missing_or_mistyped_key():
    config = default_config.get_config()
    settings = diffusion.DiffusionSettings.from_config(config.diffusion)
    assert (settings.beta_schedule, settings.num_diffusion_timesteps, settings.hybrid_lambda) == ('linear', 1000, 0.001)
    del config.diffusion['hybrid_lambda']
    with pytest.raises(ValueError, match=r'config\.diffusion\.hybrid_lambda is missing'):
        diffusion.diffusion_from_config(config)
    # A ConfigDict refuses a value of another type; a plain dict section (or a new key) does not.
    section = default_config.get_config().diffusion.to_dict()
    with pytest.raises(ValueError, match=r'config\.diffusion\.num_diffusion_timesteps=True must be of type int'):
        diffusion.DiffusionSettings.from_config(dict(section, num_diffusion_timesteps=True))
    with pytest.raises(ValueError, match=r"config\.diffusion\.beta_end='0.02' must be of type float"):
        diffusion.DiffusionSettings.from_config(dict(section, beta_end='0.02'))
    assert diffusion.DiffusionSettings.from_config(dict(section, beta_end=1)).beta_end == 1.0
