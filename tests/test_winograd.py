"""Tests of ddpm_jax.models.winograd (Winograd F(4x4, 3x3)) against a direct float64 numpy convolution.

The reference is the definition of the official 3x3 'SAME' stride-1 conv2d (nn.py, a cross-correlation with one
zero row/column of padding on each side) written as nine shifted products in numpy, and its two gradients
derived by hand from that sum.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models import winograd


def np_conv3x3(x, kernel):
    """y[n, i, j, o] = sum_{a, b, c} x_pad[n, i + a, j + b, c] kernel[a, b, c, o] (float64)."""
    _, height, width, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(np.einsum('nhwc,co->nhwo', padded[:, a:a + height, b:b + width], kernel[a, b])
               for a in range(3) for b in range(3))


def np_conv3x3_grads(x, kernel, out_grad):
    """(dL/dx, dL/dkernel) of L = sum(out_grad * np_conv3x3(x, kernel)), from the sum above:
    x_pad[n, i + a, j + b, c] meets out_grad[n, i, j, o] with weight kernel[a, b, c, o]."""
    _, height, width, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    padded_grad = np.zeros_like(padded)
    kernel_grad = np.zeros_like(kernel)
    for a in range(3):
        for b in range(3):
            padded_grad[:, a:a + height, b:b + width] += np.einsum('nhwo,co->nhwc', out_grad, kernel[a, b])
            kernel_grad[a, b] = np.einsum('nhwc,nhwo->co', padded[:, a:a + height, b:b + width], out_grad)
    return padded_grad[:, 1:-1, 1:-1], kernel_grad


def _case(shape, out_channels, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    kernel = rng.standard_normal((3, 3, shape[-1], out_channels)) / np.sqrt(9 * shape[-1])
    out_grad = rng.standard_normal(shape[:-1] + (out_channels,))
    return x, kernel, out_grad


def _forward_and_grads(x, kernel, out_grad, gradients='winograd'):
    out, vjp = jax.vjp(lambda a, b: winograd.conv3x3(a, b, gradients), jnp.asarray(x), jnp.asarray(kernel))
    return (out,) + vjp(jnp.asarray(out_grad))


def test_transforms_compute_the_correlation_exactly():
    # A^T ((G k) * (B^T d)) = [sum_j k[j] d[i + j]]_i for all d, k, i.e. the bilinear form's coefficients
    # sum_p A^T[i, p] G[p, j] B^T[p, l] are 1 where l = i + j and 0 elsewhere; the entries are small dyadic
    # and 1/3, 1/15 fractions, so float64 reproduces the integers to a few ulps.
    coefficients = np.einsum('ip,pj,pl->ijl', winograd.OUTPUT_TRANSFORM, winograd.KERNEL_TRANSFORM,
                             winograd.INPUT_TRANSFORM)
    wanted = np.zeros((4, 3, 6))
    for i in range(4):
        for j in range(3):
            wanted[i, j, i + j] = 1
    np.testing.assert_allclose(coefficients, wanted, rtol=0, atol=1e-14)


@pytest.mark.parametrize('shape, out_channels, gradients', [
    ((2, 8, 12, 5), 7, 'winograd'), ((1, 4, 4, 3), 2, 'winograd'), ((3, 16, 8, 4), 6, 'winograd'),
    ((2, 8, 12, 5), 7, 'xla')])
def test_forward_and_gradients_match_numpy_float64(shape, out_channels, gradients):
    x, kernel, out_grad = _case(shape, out_channels, seed=sum(shape))
    with jax.enable_x64(True):
        out, x_grad, kernel_grad = [np.asarray(a) for a in jax.jit(_forward_and_grads, static_argnums=3)(
            x, kernel, out_grad, gradients)]
    assert out.dtype == np.float64
    want_x_grad, want_kernel_grad = np_conv3x3_grads(x, kernel, out_grad)
    # Measured <= 2.4e-15 of the largest value: the transforms' coefficients (up to 8) cost a few ulps.
    for got, want in ((out, np_conv3x3(x, kernel)), (x_grad, want_x_grad), (kernel_grad, want_kernel_grad)):
        assert np.abs(want).max() > 0.5
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-13 * np.abs(want).max())


def test_float32_error_is_a_few_times_the_direct_convolutions():
    # 128 input channels of unit-variance data (a U-Net layer's width): the transforms multiply float32 rounding
    # by their coefficients' size. Measured against the float64 reference, as a fraction of the largest value:
    # Winograd 2.7e-6 (output), 2.0e-6 (input gradient), 2.0e-6 (kernel gradient); XLA's convolution 5-8e-7.
    x, kernel, out_grad = _case((4, 8, 8, 128), 64, seed=3)
    got = [np.asarray(a) for a in jax.jit(_forward_and_grads)(
        x.astype(np.float32), kernel.astype(np.float32), out_grad.astype(np.float32))]
    wanted = (np_conv3x3(x, kernel),) + np_conv3x3_grads(x, kernel, out_grad)
    for g, w in zip(got, wanted):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * np.abs(w).max())
    # float32 operands stay float32 when float64 is enabled (the transforms' constants are weakly typed).
    with jax.enable_x64(True):
        assert all(a.dtype == jnp.float32 for a in jax.jit(_forward_and_grads)(
            x.astype(np.float32), kernel.astype(np.float32), out_grad.astype(np.float32)))


def test_rejects_shapes_it_cannot_tile_and_unknown_gradients():
    with pytest.raises(ValueError, match='H and W divisible by 4'):
        winograd.conv3x3(jnp.zeros((1, 6, 8, 2)), jnp.zeros((3, 3, 2, 2)))
    with pytest.raises(ValueError, match=r'\[3, 3, 2, C_out\] kernel'):
        winograd.conv3x3(jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 3, 4, 2)))
    with pytest.raises(ValueError, match="gradients='eigen'; allowed"):
        winograd.conv3x3(jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 3, 2, 2)), 'eigen')


def test_plan_picks_winograd_where_it_is_faster_on_cpu():
    big = ((32, 16, 16, 256), (3, 3, 256, 256))      # 512 tiles x 256 x 256 = 2**25 multiply-adds per matmul
    medium = ((8, 16, 16, 256), (3, 3, 256, 256))    # 128 tiles: 2**23
    small = ((8, 8, 8, 256), (3, 3, 256, 256))       # 32 tiles: 2**21
    assert winograd.plan('auto', *big, jnp.float32, 'cpu') == 'winograd'
    assert winograd.plan('auto', *medium, jnp.float32, 'cpu') == 'xla'         # Winograd forward, XLA gradients
    assert winograd.plan('auto', *small, jnp.float32, 'cpu') is None
    assert winograd.plan('auto', *big, jnp.float64, 'cpu') == 'winograd'
    for args in ((*big, jnp.float32, 'gpu'), (*big, jnp.bfloat16, 'cpu')):
        assert winograd.plan('auto', *args) is None, args
    assert winograd.plan('xla', *big, jnp.float32, 'cpu') is None
    assert winograd.plan('winograd', *small, jnp.float32, 'gpu') == 'winograd'
    assert winograd.plan('winograd', *small, jnp.float64, 'cpu') == 'winograd'
    assert winograd.plan('winograd', *small, jnp.bfloat16, 'cpu') is None
    assert winograd.plan('winograd', (8, 6, 16, 256), (3, 3, 256, 256), jnp.float32, 'cpu') is None
    assert winograd.plan('winograd', (8, 16, 16, 256), (1, 1, 256, 256), jnp.float32, 'cpu') is None
