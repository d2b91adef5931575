"""GroupNorm over NHWC activations with per-channel partial sums and a hand-written gradient.

The official `normalize` (diffusion_tf/nn.py) is tf.contrib.layers.group_norm: 32 groups of C/32 channels,
statistics over (H, W, channels of the group) per example, two-pass variance, eps 1e-6, then a per-channel
scale and bias. This computes the same function; only the order of the sums differs:

* statistics: first over (H, W) per channel ([B, C], a reduction over the outer dims of NHWC, which XLA:CPU
  runs at the speed of a copy), then over each group's C/32 channels ([B, G], tiny). A direct reduction over
  (H, W, channels of the group) of the [B, H, W, G, C/G] view, as flax.linen.GroupNorm writes it, is ~5x slower
  on XLA:CPU (a strided reduction with a minor dimension of 4-16).
* gradient (custom_vjp): two [B, C] sums over (H, W) and one elementwise pass, instead of what autodiff
  derives from the reshaped statistics.

With xhat = (x - mean) / sqrt(var + eps) and g = dL/dy for y = xhat * scale + bias, per example and group of
n = H * W * C/G values (sums over the group's values):
  dL/dscale_c = sum_{b,h,w} g * xhat,   dL/dbias_c = sum_{b,h,w} g,
  dL/dx = (g * scale - mean_group(g * scale) - xhat * mean_group(g * scale * xhat)) / sqrt(var + eps).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _per_channel_to_group_mean(per_channel: jax.Array, num_groups: int) -> jax.Array:
    """[B, C] -> the mean over each group's C/G channels, repeated to [B, C]."""
    batch, channels = per_channel.shape
    size = channels // num_groups
    return jnp.repeat(jnp.mean(per_channel.reshape(batch, num_groups, size), axis=-1), size, axis=1)


def _bhwc(per_example_channel: jax.Array) -> jax.Array:
    """[B, C] -> [B, 1, 1, C] (broadcasts over H, W)."""
    return per_example_channel[:, None, None, :]


def group_statistics(x: jax.Array, num_groups: int, epsilon: float, fast_variance: bool) -> tuple:
    """x: [B, H, W, C] -> (mean, 1 / sqrt(var + eps)), each [B, C] (its group's value for every channel).

    Two-pass variance E[(x - E[x])^2] as the official code (the second sum needs the mean first), or with
    `fast_variance` max(E[x^2] - E[x]^2, 0), whose two sums do not wait for each other.
    """
    pixels = x.shape[1] * x.shape[2]
    mean = _per_channel_to_group_mean(jnp.sum(x, axis=(1, 2)) / pixels, num_groups)
    if fast_variance:
        mean_of_squares = _per_channel_to_group_mean(jnp.sum(x * x, axis=(1, 2)) / pixels, num_groups)
        variance = jnp.maximum(mean_of_squares - mean * mean, 0.0)
    else:
        centred = x - _bhwc(mean)
        variance = _per_channel_to_group_mean(jnp.sum(centred * centred, axis=(1, 2)) / pixels, num_groups)
    return mean, jax.lax.rsqrt(variance + epsilon)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int = 32, epsilon: float = 1e-6,
               fast_variance: bool = False) -> jax.Array:
    """GroupNorm of x: [B, H, W, C] (C divisible by num_groups) with scale, bias: [C] -> [B, H, W, C].

    Computed in x's dtype (scale and bias are cast to it; their gradients come back in their own dtypes).
    """
    return _group_norm(x, scale.astype(x.dtype), bias.astype(x.dtype), num_groups, float(epsilon),
                       bool(fast_variance))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm(x, scale, bias, num_groups, epsilon, fast_variance):
    return _group_norm_fwd(x, scale, bias, num_groups, epsilon, fast_variance)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon, fast_variance):
    mean, inv_std = group_statistics(x, num_groups, epsilon, fast_variance)
    y = (x - _bhwc(mean)) * _bhwc(inv_std * scale) + bias
    return y, (x, scale, mean, inv_std)


def _group_norm_bwd(num_groups, epsilon, fast_variance, residuals, y_grad):
    del epsilon, fast_variance  # the gradient of either variance form is the same function of x
    x, scale, mean, inv_std = residuals
    pixels = x.shape[1] * x.shape[2]
    centred = x - _bhwc(mean)
    grad_sum = jnp.sum(y_grad, axis=(1, 2))                        # [B, C]: sum of g
    grad_centred_sum = jnp.sum(y_grad * centred, axis=(1, 2))      # [B, C]: sum of g * (x - mean)
    bias_grad = jnp.sum(grad_sum, axis=0)
    scale_grad = jnp.sum(grad_centred_sum * inv_std, axis=0)
    # mean over the group of dL/dxhat = g * scale, and of dL/dxhat * xhat, as [B, C]
    mean_xhat_grad = _per_channel_to_group_mean(grad_sum * scale, num_groups) / pixels
    mean_xhat_grad_xhat = _per_channel_to_group_mean(grad_centred_sum * scale * inv_std, num_groups) / pixels
    x_grad = (y_grad * _bhwc(inv_std * scale) - _bhwc(inv_std * mean_xhat_grad)
              - centred * _bhwc(inv_std * inv_std * mean_xhat_grad_xhat))
    return x_grad, scale_grad, bias_grad


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
    """`group_norm` with learned scale (init 1) and bias (init 0), params named as flax.linen.GroupNorm's.

    x: [B, H, W, C] -> [B, H, W, C] in `dtype` (x is cast to it; the params are kept in `param_dtype`).
    """
    num_groups: int = 32
    epsilon: float = 1e-6
    fast_variance: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if x.ndim != 4 or channels % self.num_groups:
            raise ValueError(f'GroupNorm needs [B, H, W, C] with C divisible by {self.num_groups} groups; '
                             f'got shape {x.shape}')
        scale = self.param('scale', nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param('bias', nn.initializers.zeros, (channels,), self.param_dtype)
        return group_norm(x.astype(self.dtype), scale, bias, self.num_groups, self.epsilon, self.fast_variance)
