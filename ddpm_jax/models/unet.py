"""The U-Net of DDPM (Ho et al. 2020), exact to the official `diffusion_tf/models/unet.py`.

Paper App. B describes the architecture; official models/unet.py and nn.py define it. The Flax module
tree mirrors the official TF variable scopes, so `model/down_1/attn_0/q/W` is
`params['down_1']['attn_0']['q']['kernel']` (`W`/`b` -> `kernel`/`bias`, GroupNorm `gamma`/`beta` ->
`scale`/`bias`); see ddpm_jax/convert.py.

Precision: parameters are stored in `param_dtype` (float32). Convolutions, dense layers and the
attention matmuls run in the compute `dtype` (float32 or bfloat16). GroupNorm statistics, the
attention softmax, the timestep embedding and the output are computed in at least float32
(`promote_types(dtype, float32)`, so float64 under `jax.enable_x64` with `dtype=float64`).

Speed switches (they change neither the parameters nor, beyond rounding, the outputs):
* `attention`: how AttnBlock computes softmax(q k^T / sqrt(C)) v; see `ATTENTION_IMPLS`.
* `remat`: rematerialise every ResnetBlock and AttnBlock (`nn.remat`): their activations are recomputed in
  the backward pass instead of being stored, trading about one more forward pass for activation memory.
* `fast_variance`: GroupNorm variance as E[x^2] - E[x]^2 (both sums computed independently) instead of the
  official two-pass E[(x - E[x])^2] (a second sum over the activation once the mean is known).
  Both in float32; they differ by float32 rounding unless |mean| >> std within a group.
* `upsample`: how `Upsample` computes the official nearest-neighbour x2 followed by a 3x3 conv; see
  `UPSAMPLE_IMPLS`. 'subpixel' (default) does the same sums on the low-resolution input with 16 instead of
  36 multiply-adds per output pixel and channel pair; it differs from 'repeat' by float rounding only.
* `conv3x3`: how the residual blocks' 3x3 convolutions are computed, XLA's convolution or Winograd F(4x4, 3x3)
  (ddpm_jax/models/winograd.py, 4x fewer multiply-adds, float32 error ~1e-5 of the largest output instead of
  ~1e-6); see `CONV3X3_IMPLS`. The default 'auto' uses Winograd only on CPU, where it is faster.
"""
import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax import config_files, diffusion
from ddpm_jax.models import winograd
from ddpm_jax.models.group_norm import GroupNorm

Dtype = Any

# Official init: variance_scaling(scale, 'fan_avg', 'uniform'); scale 0 means 1e-10 (nn.py:10-11).
_DEFAULT_INIT = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')
_ZERO_INIT = nn.initializers.variance_scaling(1e-10, 'fan_avg', 'uniform')

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# AttnBlock implementations:
#   'einsum': two einsums with float32 (>= float32) logits and softmax, probabilities cast to `dtype` for the
#       second matmul; in the backward pass all four matmuls take `dtype` operands (`_attention_logits`).
#   'dot_product': `jax.nn.dot_product_attention` with implementation=None, which in jax 0.10/0.11 is its XLA
#       path on every backend: logits in promote_types(dtype, float32), softmax always in float32 (so float32
#       rather than float64 under enable_x64), probabilities cast to `dtype`; for bfloat16 the logits matmul
#       uses the BF16_BF16_F32 dot algorithm. Same arithmetic as 'einsum' up to rounding in the forward pass;
#       in the backward pass two of its matmuls run in float32 (float32 cotangent times upcast q or k).
#   'cudnn': `jax.nn.dot_product_attention(implementation='cudnn')`, cuDNN's fused (flash) attention: GPU
#       only, bfloat16 compute only (cuDNN takes bf16/fp16 q, k, v; head dim C <= 256 on Hopper, <= 128
#       before); the softmax is accumulated in float32 inside the kernel and never written to memory.
ATTENTION_IMPLS = ('einsum', 'dot_product', 'cudnn')

# Upsample implementations (with resamp_with_conv; without a conv both just repeat pixels):
#   'repeat': the official order (models/unet.py `upsample`): repeat each pixel 2x2, then the 3x3 conv at 2H x 2W.
#   'subpixel': output pixel (2i + a, 2j + b) of that conv sees only input rows i - 1 + a .. i + a and columns
#       j - 1 + b .. j + b, so each of the four phases (a, b) is a 2x2 conv of the H x W input whose taps are sums
#       of the 3x3 taps (`_subpixel_kernels`); the four results are interleaved. Same function of the same
#       parameters; 4 * 4 = 16 instead of 4 * 9 = 36 multiply-adds per low-resolution pixel (2.25x fewer).
UPSAMPLE_IMPLS = ('subpixel', 'repeat')

# How the residual blocks' 3x3 convolutions (conv1, conv2) are computed:
#   'xla': jax.lax.conv_general_dilated (XLA's convolution; on CPU Eigen's, see ddpm_jax/xla_cpu.py).
#   'winograd': Winograd F(4x4, 3x3) (ddpm_jax/models/winograd.py) wherever H and W are multiples of 4 and the
#       compute dtype is float32 or float64: 4x fewer multiply-adds, float32 error ~1e-5 of the largest output
#       instead of ~1e-6.
#   'auto': on CPU Winograd for the layers where it is faster there, with its own gradients or XLA's
#       (`winograd.plan`), 'xla' elsewhere and on GPU/TPU (whose convolution libraries choose their own algorithms).
CONV3X3_IMPLS = ('auto', 'xla', 'winograd')


@jax.custom_vjp
def _attention_logits(q: jax.Array, k: jax.Array) -> jax.Array:
    """q: [B, Q, C], k: [B, K, C] (compute dtype) -> q k^T: [B, Q, K] in promote_types(dtype, float32).

    The gradient is the plain one, except that the incoming float32 cotangent is rounded to the compute
    dtype first, so with bfloat16 compute the two backward matmuls take bfloat16 operands like every other
    matmul of the backward pass (plain autodiff would upcast q and k and run both in float32).
    """
    return jnp.einsum('bqc,bkc->bqk', q, k, preferred_element_type=_float_dtype(q.dtype))


def _attention_logits_fwd(q, k):
    return _attention_logits(q, k), (q, k)


def _attention_logits_bwd(residuals, logits_grad):
    q, k = residuals
    logits_grad = logits_grad.astype(q.dtype)
    return jnp.einsum('bqk,bkc->bqc', logits_grad, k), jnp.einsum('bqk,bqc->bkc', logits_grad, q)


_attention_logits.defvjp(_attention_logits_fwd, _attention_logits_bwd)


def _check_attention(attention: str) -> None:
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f'attention={attention!r}; allowed: {ATTENTION_IMPLS}')


def _float_dtype(dtype: Dtype) -> Dtype:
    """The dtype of normalisation statistics and softmax: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int, dtype: Dtype = jnp.float32) -> jax.Array:
    """Official sinusoidal embedding (nn.py:90-109) of raw integer timesteps.

    timesteps: [B] int (not rescaled). Returns [B, embedding_dim]: sin of all frequencies, then cos,
    frequencies exp(-log(10000) * k / (half - 1)) for k = 0..half-1; zero-padded when embedding_dim is odd.
    """
    if timesteps.ndim != 1:
        raise ValueError(f'timesteps must have shape [B], got {timesteps.shape}')
    half = embedding_dim // 2
    if half < 2:
        raise ValueError(f'embedding_dim must be at least 4, got {embedding_dim}')
    freqs = jnp.exp(jnp.arange(half, dtype=dtype) * (-math.log(10000) / (half - 1)))
    angles = timesteps.astype(dtype)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _group_norm(name: str, *, dtype: Dtype, param_dtype: Dtype, fast_variance: bool = False) -> GroupNorm:
    """The official `normalize`: GroupNorm, 32 groups, eps 1e-6, in >= float32; two-pass variance (as TF)
    unless `fast_variance` (one pass, E[x^2] - E[x]^2). ddpm_jax/models/group_norm.py says how it is summed.

    Apply it to x: [B, H, W, C] already cast to `promote_types(dtype, float32)`; see `_normalize`.
    """
    return GroupNorm(num_groups=32, epsilon=1e-6, fast_variance=fast_variance, dtype=_float_dtype(dtype),
                     param_dtype=param_dtype, name=name)


def _normalize(norm: GroupNorm, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> GroupNorm(x) in >= float32 (statistics never in bfloat16)."""
    return norm(x.astype(norm.dtype))


def _conv(features: int, name: str, *, dtype: Dtype, param_dtype: Dtype, kernel_size: int = 3,
          strides: int = 1, padding: Any = 'SAME', zero_init: bool = False, conv3x3: str = 'xla') -> nn.Conv:
    """The official `conv2d`: kernel [kh, kw, in, out], bias, official init. `conv3x3` (one of `CONV3X3_IMPLS`)
    picks how a 3x3 stride-1 'SAME' convolution is computed; other convolutions are always XLA's."""
    return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides), padding=padding,
                   dtype=dtype, param_dtype=param_dtype, kernel_init=_ZERO_INIT if zero_init else _DEFAULT_INIT,
                   bias_init=nn.initializers.zeros, conv_general_dilated=_ConvGeneralDilated(conv3x3), name=name)


@dataclasses.dataclass(frozen=True)
class _ConvGeneralDilated:
    """`jax.lax.conv_general_dilated` for nn.Conv, sending the 3x3 stride-1 'SAME' convolutions that
    `winograd.plan(algorithm, ...)` selects to `winograd.conv3x3` (same function up to rounding)."""
    algorithm: str

    def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, precision=None):
        nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
        plain = (tuple(window_strides) == (1, 1) and feature_group_count == 1
                 and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
                 and (padding == 'SAME' or [tuple(p) for p in padding] == [(1, 1), (1, 1)])
                 and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc)
        gradients = plain and winograd.plan(self.algorithm, lhs.shape, rhs.shape, lhs.dtype, jax.default_backend())
        if gradients:
            return winograd.conv3x3(lhs, rhs, gradients)
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                            feature_group_count=feature_group_count, precision=precision)


@jax.custom_vjp
def _dense_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x: [..., C_in], kernel: [C_in, C_out] -> x @ kernel: [..., C_out] (dtype of x and kernel).

    The gradient is autodiff's, written out so that the kernel's is one matmul over all leading positions
    of x and of the output gradient as they lie in memory ([N, C_in]^T [N, C_out], N = prod(x.shape[:-1])).
    From autodiff's own form of it (a matmul followed by a transpose), XLA:CPU materialises the output
    gradient transposed to [C_out, N] first, fused with whatever produces it (e.g. the GroupNorm backward and
    the slice of a concatenation), which costs more than the matmul itself.
    """
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_matmul_fwd(x, kernel):
    return _dense_matmul(x, kernel), (x, kernel)


def _dense_matmul_bwd(residuals, y_grad):
    x, kernel = residuals
    x_grad = jax.lax.dot_general(y_grad, kernel, (((y_grad.ndim - 1,), (1,)), ((), ())))
    kernel_grad = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), y_grad.reshape(-1, y_grad.shape[-1]),
                                      (((0,), (0,)), ((), ())))
    return x_grad, kernel_grad


_dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


def _dense_dot_general(x: jax.Array, kernel: jax.Array, dimension_numbers: Any, precision: Any = None,
                       **kwargs: Any) -> jax.Array:
    """The `dot_general` that flax.linen.Dense calls: `_dense_matmul` for its one contraction."""
    if dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())) or precision is not None or kwargs:
        raise ValueError(f'_dense_dot_general computes only x[..., C] @ kernel[C, D] at default precision, got '
                         f'dimension_numbers={dimension_numbers}, precision={precision}, {kwargs}')
    return _dense_matmul(x, kernel)


def _dense(features: int, name: str, *, dtype: Dtype, param_dtype: Dtype, zero_init: bool = False) -> nn.Dense:
    """The official `dense` / `nin` (per-pixel dense): kernel [in, out], bias, official init."""
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=_ZERO_INIT if zero_init else _DEFAULT_INIT,
                    bias_init=nn.initializers.zeros, dot_general=_dense_dot_general, name=name)


class ResnetBlock(nn.Module):
    """Official `resnet_block` (unet.py:37-63); submodules norm1, conv1, temb_proj, norm2, conv2, nin_shortcut.

    x: [B, H, W, C_in], temb: [B, 4ch] -> [B, H, W, out_ch] in `dtype`. `train` (dropout on) is positional so
    that `nn.remat` can treat it as a static argument.
    """
    out_ch: int
    dropout: float
    fast_variance: bool = False
    conv3x3: str = 'auto'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm_kw = dict(fast_variance=self.fast_variance, **kw)
        h = nn.swish(_normalize(_group_norm('norm1', **norm_kw), x)).astype(self.dtype)
        h = _conv(self.out_ch, 'conv1', conv3x3=self.conv3x3, **kw)(h)
        h = h + _dense(self.out_ch, 'temb_proj', **kw)(nn.swish(temb))[:, None, None, :]
        h = nn.swish(_normalize(_group_norm('norm2', **norm_kw), h)).astype(self.dtype)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(self.out_ch, 'conv2', zero_init=True, conv3x3=self.conv3x3, **kw)(h)
        if x.shape[-1] != self.out_ch:
            x = _dense(self.out_ch, 'nin_shortcut', **kw)(x)
        return x.astype(self.dtype) + h


class AttnBlock(nn.Module):
    """Official `attn_block` (unet.py:66-84): single-head self-attention over all H*W positions.

    Submodules norm, q, k, v, proj_out. x: [B, H, W, C] -> [B, H, W, C] in `dtype`; softmax in >= float32
    (float32 for 'dot_product' / 'cudnn'). `attention` picks the implementation (`ATTENTION_IMPLS`).
    """
    attention: str = 'einsum'
    fast_variance: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check_attention(self.attention)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, height, width, channels = x.shape
        h = _normalize(_group_norm('norm', fast_variance=self.fast_variance, **kw), x).astype(self.dtype)
        q = _dense(channels, 'q', **kw)(h).reshape(batch, height * width, channels)
        k = _dense(channels, 'k', **kw)(h).reshape(batch, height * width, channels)
        v = _dense(channels, 'v', **kw)(h).reshape(batch, height * width, channels)
        scale = channels ** -0.5
        if self.attention == 'einsum':
            # softmax(logits) v with the softmax's division moved after the product: the [B, HW, C] result is
            # divided by the row sums instead of the [B, HW, HW] weights. The same function up to float32
            # rounding, one pass over the weights fewer (XLA:CPU's sampling step ~2% faster). The row maximum
            # only guards exp against overflow; like jax.nn.softmax, its gradient is not taken.
            logits = _attention_logits(q, k) * scale
            unnormalized = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
            h = jnp.einsum('bqk,bkc->bqc', unnormalized.astype(self.dtype), v)   # compute dtype, as every matmul
            h = (h.astype(unnormalized.dtype) / jnp.sum(unnormalized, axis=-1, keepdims=True)).astype(self.dtype)
        else:
            if self.attention == 'cudnn' and jnp.dtype(self.dtype) not in (jnp.bfloat16, jnp.float16):
                raise ValueError(f"attention='cudnn' needs bfloat16 (or float16) compute, got dtype={self.dtype}; "
                                 "use attention='dot_product' or 'einsum' for float32")
            implementation = 'cudnn' if self.attention == 'cudnn' else None
            # One head: [B, HW, C] -> [B, HW, 1, C] (the BTNH layout of dot_product_attention).
            h = jax.nn.dot_product_attention(q[:, :, None, :], k[:, :, None, :], v[:, :, None, :], scale=scale,
                                             implementation=implementation)[:, :, 0, :]
        h = h.reshape(batch, height, width, channels)
        h = _dense(channels, 'proj_out', zero_init=True, **kw)(h)
        return x.astype(self.dtype) + h


def _block_switches(level: nn.Module) -> tuple:
    """The ResnetBlock fields after out_ch that a level passes on: (dropout, fast_variance, conv3x3)."""
    return level.dropout, level.fast_variance, level.conv3x3


def _block_classes(remat: bool) -> tuple[type[ResnetBlock], type[AttnBlock]]:
    """(ResnetBlock, AttnBlock), wrapped in `nn.remat` when remat is set (`train`, argument 3, static)."""
    if remat:
        return nn.remat(ResnetBlock, static_argnums=(3,)), nn.remat(AttnBlock)
    return ResnetBlock, AttnBlock


class Downsample(nn.Module):
    """Official `downsample`: 3x3 stride-2 conv `conv` with TF 'SAME' padding (0 before, 1 after), or 2x2 avg-pool.

    x: [B, H, W, C] (H, W even) -> [B, H/2, W/2, C].
    """
    with_conv: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.with_conv:
            return _conv(x.shape[-1], 'conv', strides=2, padding=((0, 1), (0, 1)),
                         dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


def _subpixel_kernels(kernel: jax.Array) -> list[list[jax.Array]]:
    """The 3x3 kernel [3, 3, C_in, C_out] of a conv applied after nearest x2 upsampling, as four 2x2 kernels on
    the low-resolution input: result[a][b] is [2, 2, C_in, C_out] for output row phase a, column phase b.

    Along one axis, output 2i + a reads upsampled rows 2i + a - 1 .. 2i + a + 1, i.e. input rows
    (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1: taps (w0, w1 + w2) at rows (i - 1, i), or
    (w0 + w1, w2) at rows (i, i + 1).
    """
    def fold(w, axis, phase):
        taps = [jnp.take(w, 0, axis) + jnp.take(w, 1, axis), jnp.take(w, 2, axis)] if phase else \
            [jnp.take(w, 0, axis), jnp.take(w, 1, axis) + jnp.take(w, 2, axis)]
        return jnp.stack(taps, axis)
    return [[fold(fold(kernel, 0, a), 1, b) for b in (0, 1)] for a in (0, 1)]


def _upsample_conv_subpixel(x: jax.Array, kernel: jax.Array, dtype: Dtype) -> jax.Array:
    """conv3x3_same(repeat_2x2(x), kernel) in `dtype` without forming the 2H x 2W input.

    x: [B, H, W, C_in], kernel: [3, 3, C_in, C_out] (the taps are summed in its own dtype, then cast to
    `dtype`) -> [B, 2H, 2W, C_out]. Phase 0 of an axis needs the row above (pad 1 before), phase 1 the row
    below (pad 1 after).
    """
    batch, height, width, _ = x.shape
    pads = ((1, 0), (0, 1))
    kernels = _subpixel_kernels(kernel)
    x = x.astype(dtype)
    phases = [[jax.lax.conv_general_dilated(x, kernels[a][b].astype(dtype), (1, 1), (pads[a], pads[b]),
                                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
               for b in (0, 1)] for a in (0, 1)]
    # [B, H, 2 (a), W, 2 (b), C_out] -> [B, 2H, 2W, C_out]: row 2i + a, column 2j + b.
    out = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)
    return out.reshape(batch, 2 * height, 2 * width, kernel.shape[-1])


class _UpsampleConv(nn.Module):
    """The 3x3 conv of `Upsample` computed by `_upsample_conv_subpixel`: the parameters of `_conv` (kernel
    [3, 3, C, features], bias [features], same init and names), applied to the low-resolution x:
    [B, H, W, C] -> [B, 2H, 2W, features] in `dtype`."""
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param('kernel', _DEFAULT_INIT, (3, 3, x.shape[-1], self.features), self.param_dtype)
        bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
        return _upsample_conv_subpixel(x, kernel, self.dtype) + bias.astype(self.dtype)


class Upsample(nn.Module):
    """Official `upsample`: nearest-neighbour x2 (pixel repetition), then a 3x3 conv `conv` if with_conv.

    x: [B, H, W, C] -> [B, 2H, 2W, C]. `impl` (one of `UPSAMPLE_IMPLS`) picks how the conv is computed.
    """
    with_conv: bool
    impl: str = 'subpixel'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.impl not in UPSAMPLE_IMPLS:
            raise ValueError(f'upsample={self.impl!r}; allowed: {UPSAMPLE_IMPLS}')
        if self.with_conv and self.impl == 'subpixel':
            return _UpsampleConv(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype, name='conv')(x)
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if self.with_conv:
            x = _conv(x.shape[-1], 'conv', dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return x


class TimestepEmbed(nn.Module):
    """Official temb: sinusoidal(t, ch) -> dense0 (4ch) -> swish -> dense1 (4ch). t: [B] int -> [B, 4ch]."""
    ch: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = get_timestep_embedding(t, self.ch, _float_dtype(self.dtype))
        emb = nn.swish(_dense(4 * self.ch, 'dense0', **kw)(emb))
        return _dense(4 * self.ch, 'dense1', **kw)(emb)


class DownLevel(nn.Module):
    """One encoder level `down_{i}`: block_j (+ attn_j) for j < num_res_blocks, then `downsample` if requested.

    Returns the list of outputs pushed onto the skip stack: each block's (or attention's) output and,
    if present, the downsampled tensor.
    """
    out_ch: int
    num_res_blocks: int
    use_attn: bool
    add_downsample: bool
    resamp_with_conv: bool
    dropout: float
    attention: str = 'einsum'
    remat: bool = False
    fast_variance: bool = False
    conv3x3: str = 'auto'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, temb: jax.Array, *, train: bool) -> list[jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet_block, attn_block = _block_classes(self.remat)
        outputs = []
        for j in range(self.num_res_blocks):
            h = resnet_block(self.out_ch, *_block_switches(self), **kw, name=f'block_{j}')(h, temb, train)
            if self.use_attn:
                h = attn_block(self.attention, self.fast_variance, **kw, name=f'attn_{j}')(h)
            outputs.append(h)
        if self.add_downsample:
            outputs.append(Downsample(self.resamp_with_conv, **kw, name='downsample')(h))
        return outputs


class MidLevel(nn.Module):
    """The middle `mid`: block_1, attn_1 (always present), block_2; channels unchanged."""
    dropout: float
    attention: str = 'einsum'
    remat: bool = False
    fast_variance: bool = False
    conv3x3: str = 'auto'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, temb: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet_block, attn_block = _block_classes(self.remat)
        channels = h.shape[-1]
        h = resnet_block(channels, *_block_switches(self), **kw, name='block_1')(h, temb, train)
        h = attn_block(self.attention, self.fast_variance, **kw, name='attn_1')(h)
        return resnet_block(channels, *_block_switches(self), **kw, name='block_2')(h, temb, train)


class UpLevel(nn.Module):
    """One decoder level `up_{i}`: block_j(concat[h, skip]) (+ attn_j) for j <= num_res_blocks, then `upsample`.

    skips: the num_res_blocks + 1 skip tensors in the order they are consumed (most recent first).
    """
    out_ch: int
    num_res_blocks: int
    use_attn: bool
    add_upsample: bool
    resamp_with_conv: bool
    dropout: float
    attention: str = 'einsum'
    remat: bool = False
    fast_variance: bool = False
    conv3x3: str = 'auto'
    upsample: str = 'subpixel'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, skips: Sequence[jax.Array], temb: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet_block, attn_block = _block_classes(self.remat)
        for j, skip in enumerate(skips):
            h = jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)
            h = resnet_block(self.out_ch, *_block_switches(self), **kw, name=f'block_{j}')(h, temb, train)
            if self.use_attn:
                h = attn_block(self.attention, self.fast_variance, **kw, name=f'attn_{j}')(h)
        if self.add_upsample:
            h = Upsample(self.resamp_with_conv, self.upsample, **kw, name='upsample')(h)
        return h


class UNet(nn.Module):
    """The DDPM U-Net (official models/unet.py `model`, paper App. B).

    Called as `model.apply({'params': p}, x, t, train=bool, rngs={'dropout': key})` with
    x: [B, H, W, C] float in [-1, 1] (H = W, divisible by 2**(len(ch_mult) - 1)), t: [B] int in {0..T-1};
    returns [B, H, W, out_ch] in `promote_types(dtype, float32)` (float32 for float32/bfloat16 compute).
    Dropout (rate `dropout`, inside resblocks only) is active when train=True and uses the 'dropout' rng.
    `attention` (one of `ATTENTION_IMPLS`), `remat`, `fast_variance`, `upsample` (one of `UPSAMPLE_IMPLS`) and
    `conv3x3` (one of `CONV3X3_IMPLS`) are speed switches; see the module docstring.
    """
    ch: int
    out_ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    dropout: float = 0.0
    resamp_with_conv: bool = True
    attention: str = 'einsum'
    remat: bool = False
    fast_variance: bool = False
    conv3x3: str = 'auto'
    upsample: str = 'subpixel'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, *, train: bool) -> jax.Array:
        batch, height, width, _ = x.shape
        num_levels = len(self.ch_mult)
        if height != width or height % 2 ** (num_levels - 1):
            raise ValueError(f'x must be square with a side divisible by 2**(len(ch_mult) - 1) = '
                             f'{2 ** (num_levels - 1)}, got shape {x.shape}')
        if t.shape != (batch,):
            raise ValueError(f't must have shape [B] = ({batch},), got {t.shape}')
        _check_attention(self.attention)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        switches = dict(attention=self.attention, remat=self.remat, fast_variance=self.fast_variance,
                        conv3x3=self.conv3x3)
        common = dict(num_res_blocks=self.num_res_blocks, resamp_with_conv=self.resamp_with_conv,
                      dropout=self.dropout, **switches, **kw)

        temb = TimestepEmbed(self.ch, **kw, name='temb')(t)
        hs = [_conv(self.ch, 'conv_in', **kw)(x.astype(self.dtype))]
        for i, mult in enumerate(self.ch_mult):
            resolution = height // 2 ** i
            hs += DownLevel(self.ch * mult, use_attn=resolution in self.attn_resolutions,
                            add_downsample=i != num_levels - 1, **common, name=f'down_{i}')(hs[-1], temb, train=train)

        h = MidLevel(self.dropout, **switches, **kw, name='mid')(hs[-1], temb, train=train)

        for i in reversed(range(num_levels)):
            resolution = height // 2 ** i
            skips = [hs.pop() for _ in range(self.num_res_blocks + 1)]
            h = UpLevel(self.ch * self.ch_mult[i], use_attn=resolution in self.attn_resolutions, add_upsample=i != 0,
                        upsample=self.upsample, **common, name=f'up_{i}')(h, skips, temb, train=train)
        assert not hs, 'every skip connection must be consumed'

        h = nn.swish(_normalize(_group_norm('norm_out', fast_variance=self.fast_variance, **kw), h)
                     ).astype(self.dtype)
        h = _conv(self.out_ch, 'conv_out', zero_init=True, **kw)(h)
        return h.astype(_float_dtype(self.dtype))


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """config.model as typed values (one field per key); build it once with `from_config`.

    dtype: the compute dtype, a key of `COMPUTE_DTYPES`; attention: one of `ATTENTION_IMPLS`.
    """
    ch: int
    ch_mult: tuple
    num_res_blocks: int
    attn_resolutions: tuple
    dropout: float
    resamp_with_conv: bool
    dtype: str
    attention: str
    remat: bool
    fast_variance: bool
    upsample: str
    conv3x3: str

    @classmethod
    def from_config(cls, model_config) -> 'ModelSettings':
        """Reads config.model; ValueError naming config.model.<key> when a key is missing, mistyped or not
        one of the allowed values."""
        settings = config_files.typed_section(cls, model_config, 'model')
        if settings.dtype not in COMPUTE_DTYPES:
            raise ValueError(f'config.model.dtype={settings.dtype!r}; allowed: {sorted(COMPUTE_DTYPES)}')
        if settings.attention not in ATTENTION_IMPLS:
            raise ValueError(f'config.model.attention={settings.attention!r}; allowed: {ATTENTION_IMPLS}')
        if settings.upsample not in UPSAMPLE_IMPLS:
            raise ValueError(f'config.model.upsample={settings.upsample!r}; allowed: {UPSAMPLE_IMPLS}')
        if settings.conv3x3 not in CONV3X3_IMPLS:
            raise ValueError(f'config.model.conv3x3={settings.conv3x3!r}; allowed: {CONV3X3_IMPLS}')
        return settings


def unet_from_settings(settings: ModelSettings, *, channels: int, learned_variance: bool) -> UNet:
    """The UNet of `settings` for images of `channels` channels; out_ch = channels, doubled when the model also
    outputs a learned variance (paper Sec. 3.2 fixes the variance; Improved DDPM learns it)."""
    return UNet(ch=settings.ch, out_ch=channels * (2 if learned_variance else 1), ch_mult=settings.ch_mult,
                num_res_blocks=settings.num_res_blocks, attn_resolutions=settings.attn_resolutions,
                dropout=settings.dropout, resamp_with_conv=settings.resamp_with_conv, attention=settings.attention,
                remat=settings.remat, fast_variance=settings.fast_variance, upsample=settings.upsample,
                conv3x3=settings.conv3x3,
                dtype=COMPUTE_DTYPES[settings.dtype])


def create_model(config) -> UNet:
    """The UNet of config.model for config.data.channels and config.diffusion.model_var_type (the boundary
    adapter of `unet_from_settings`)."""
    return unet_from_settings(ModelSettings.from_config(config.model), channels=config.data.channels,
                              learned_variance=config.diffusion.model_var_type in diffusion.LEARNED_VAR_TYPES)
