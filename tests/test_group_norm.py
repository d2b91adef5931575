"""Tests of ddpm_jax.models.group_norm against float64 numpy references written here.

Forward: the official `normalize` (diffusion_tf/nn.py, tf.contrib.layers.group_norm): statistics over
(H, W, the group's channels) per example, two-pass variance, eps 1e-6. Gradient: the closed form of the
GroupNorm vector-Jacobian product derived in numpy below (checked itself against central finite differences),
never the code under test or JAX's autodiff.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models.group_norm import GroupNorm, group_norm

EPS = 1e-6


def np_group_norm(x, scale, bias, groups, eps=EPS):
    """Official normalize in float64: x [B, H, W, C] -> [B, H, W, C]."""
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias


def np_group_norm_vjp(x, scale, out_grad, groups, eps=EPS):
    """(dL/dx, dL/dscale, dL/dbias) for L with dL/dy = out_grad, from y = xhat * scale + bias, xhat = (x - m) / s,
    m and s^2 the group's mean and variance over its n values: dxhat = g * scale,
    dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / s (means over the group)."""
    b, h, w, c = x.shape
    k = c // groups
    xg = x.reshape(b, h, w, groups, k)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    std = np.sqrt(((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True) + eps)
    xhat = (xg - mean) / std
    g = out_grad.reshape(b, h, w, groups, k)
    dxhat = g * scale.reshape(groups, k)
    dx = (dxhat - dxhat.mean(axis=(1, 2, 4), keepdims=True)
          - xhat * (dxhat * xhat).mean(axis=(1, 2, 4), keepdims=True)) / std
    return (dx.reshape(x.shape), (g * xhat).sum(axis=(0, 1, 2)).reshape(c), g.sum(axis=(0, 1, 2)).reshape(c))


def random_case(shape, seed, offset=0.5):
    """x with per-channel offsets (so the group means matter), scale around 1, bias, a cotangent."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = rng.normal(size=shape) * rng.uniform(0.5, 2.0, size=c) + offset * rng.normal(size=c)
    return x, 1.0 + 0.3 * rng.normal(size=c), 0.3 * rng.normal(size=c), rng.normal(size=shape)


SHAPES = [((2, 4, 4, 64), 32), ((3, 5, 3, 96), 32), ((1, 2, 6, 8), 4), ((2, 8, 8, 32), 1)]


def test_numpy_vjp_reference_matches_finite_differences():
    # The reference gradient is a hand derivation; check it on a tiny case by central differences of the
    # numpy forward along random directions (float64, step 1e-5: truncation ~1e-10, rounding ~1e-11).
    x, scale, bias, g = random_case((2, 3, 2, 6), seed=0)
    dx, dscale, dbias = np_group_norm_vjp(x, scale, g, groups=3)
    rng = np.random.default_rng(1)
    for _ in range(3):
        vx, vs, vb = rng.normal(size=x.shape), rng.normal(size=scale.shape), rng.normal(size=bias.shape)
        step = 1e-5

        def loss(sign):
            return np.sum(g * np_group_norm(x + sign * step * vx, scale + sign * step * vs,
                                            bias + sign * step * vb, groups=3))
        numeric = (loss(1) - loss(-1)) / (2 * step)
        analytic = np.sum(dx * vx) + np.sum(dscale * vs) + np.sum(dbias * vb)
        assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(analytic))


@pytest.mark.parametrize('shape,groups', SHAPES)
@pytest.mark.parametrize('fast_variance', [False, True])
def test_forward_and_gradients_match_numpy_float64(shape, groups, fast_variance):
    x, scale, bias, g = random_case(shape, seed=sum(shape))
    reference = np_group_norm(x, scale, bias, groups)
    ref_dx, ref_dscale, ref_dbias = np_group_norm_vjp(x, scale, g, groups)
    with jax.enable_x64(True):
        def f(x, scale, bias):
            return group_norm(x, scale, bias, groups, EPS, fast_variance)
        out, vjp = jax.vjp(jax.jit(f), jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
        dx, dscale, dbias = vjp(jnp.asarray(g))
        assert out.dtype == dx.dtype == dscale.dtype == dbias.dtype == jnp.float64
        out, dx, dscale, dbias = map(np.asarray, (out, dx, dscale, dbias))
    # Only the order of the sums differs from the reference (two-pass: measured ~1e-15 relative). fast_variance
    # computes E[x^2] - E[x]^2, which loses ~(mean^2 / var) * 1e-16 relative to the two-pass form: still < 1e-13.
    tol = 1e-13
    np.testing.assert_allclose(out, reference, rtol=0, atol=tol * np.abs(reference).max())
    np.testing.assert_allclose(dx, ref_dx, rtol=0, atol=tol * np.abs(ref_dx).max())
    np.testing.assert_allclose(dscale, ref_dscale, rtol=0, atol=tol * np.abs(ref_dscale).max())
    np.testing.assert_allclose(dbias, ref_dbias, rtol=0, atol=tol * np.abs(ref_dbias).max())


def test_float32_close_to_float64_reference():
    x, scale, bias, g = random_case((4, 8, 8, 128), seed=3, offset=3.0)
    reference = np_group_norm(x, scale, bias, 32)
    ref_dx, ref_dscale, ref_dbias = np_group_norm_vjp(x, scale, g, 32)
    args = [jnp.asarray(a, jnp.float32) for a in (x, scale, bias)]
    out, vjp = jax.vjp(jax.jit(lambda *a: group_norm(*a)), *args)
    grads = vjp(jnp.asarray(g, jnp.float32))
    # float32 rounding (eps 6e-8) over sums of 256 values per group, with |mean| up to ~3 std: measured
    # 1e-6 (output) and 2e-6 (gradients, the scale gradient sums 256 products per example over 4 examples).
    for got, want in zip((out, *grads), (reference, ref_dx, ref_dscale, ref_dbias)):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_module_has_flax_groupnorm_params_and_output():
    # Same parameter names, shapes, dtypes and init as flax.linen.GroupNorm (checkpoints and the converters
    # depend on it), and the same output as flax's GroupNorm to float32 rounding.
    x = jnp.asarray(random_case((2, 4, 4, 64), seed=4)[0], jnp.float32)
    ours = GroupNorm(num_groups=32, epsilon=EPS)
    theirs = nn.GroupNorm(num_groups=32, epsilon=EPS)
    params = ours.init(jax.random.key(0), x)
    their_params = theirs.init(jax.random.key(0), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(lambda a: (a.shape, a.dtype),
                                                                           their_params)
    for ours_leaf, theirs_leaf in zip(jax.tree.leaves(params), jax.tree.leaves(their_params)):
        np.testing.assert_array_equal(ours_leaf, theirs_leaf)
    params = jax.tree.map(lambda a: a + 0.1 * jnp.arange(a.size, dtype=a.dtype).reshape(a.shape) / a.size, params)
    out = ours.apply(params, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(theirs.apply(params, x)), rtol=0, atol=1e-5)


def test_parameter_gradients_keep_their_dtype():
    # float32 params on float64 activations (the U-Net under enable_x64 with float64 compute and float32
    # params): the gradients come back as float32, as for any cast.
    with jax.enable_x64(True):
        x = jnp.asarray(random_case((1, 2, 2, 4), seed=5)[0])
        scale, bias = jnp.ones(4, jnp.float32), jnp.zeros(4, jnp.float32)
        grads = jax.grad(lambda x, s, b: jnp.sum(group_norm(x, s, b, 2) ** 3), argnums=(0, 1, 2))(x, scale, bias)
        assert [g.dtype for g in grads] == [jnp.float64, jnp.float32, jnp.float32]


@pytest.mark.parametrize('shape', [(2, 4, 4, 48), (2, 4, 64)])
def test_rejects_shapes_it_cannot_normalise(shape):
    with pytest.raises(ValueError, match=r'\[B, H, W, C\] with C divisible by 32'):
        GroupNorm().init(jax.random.key(0), jnp.zeros(shape))
