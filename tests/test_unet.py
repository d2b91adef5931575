"""Tests of ddpm_jax.models.unet against the official models/unet.py and nn.py (paper App. B).

The reference is an independent float64 numpy forward pass of the official network written here from
the official models/unet.py and nn.py (TF 'SAME' padding rule, index-based nearest upsampling, two-pass
GroupNorm), run on random non-zero weights: the official init makes conv2/proj_out/conv_out ~0 and would hide errors.
"""
import functools
import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from ddpm_jax.models import UNet, create_model, get_timestep_embedding, unet

TINY = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,))   # 8x8 input
CIFAR10 = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,))
UPSAMPLE = ('subpixel', 'repeat')
LSUN = dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,))


def abstract_init(model, size, channels=3):
    """Params as ShapeDtypeStructs, without materialising them."""
    x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t, train=False), x, t)['params']


@functools.partial(jax.jit, static_argnames=('model', 'train'))
def run(model, params, x, t, train=False, rngs=None):
    """model.apply, jit-compiled (one compilation per model is faster than eager dispatch on CPU)."""
    return model.apply({'params': params}, x, t, train=train, rngs=rngs)


def random_params(model, size, seed, dtype=np.float64):
    """Random non-zero weights for every parameter, scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    shapes = abstract_init(model, size)

    def draw(path, leaf):
        name = path[-1].key
        if name == 'kernel':
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0.0, 1.0 / math.sqrt(fan_in), leaf.shape).astype(dtype)
        if name == 'scale':   # GroupNorm gamma, perturbed away from 1
            return (1.0 + 0.3 * rng.normal(size=leaf.shape)).astype(dtype)
        return (0.3 * rng.normal(size=leaf.shape)).astype(dtype)   # dense/conv bias and GroupNorm beta
    return jax.tree_util.tree_map_with_path(draw, shapes)


# ------------------------------------------------------------------------------------------------
# float64 numpy reference (official models/unet.py and nn.py)


def np_swish(x):
    return x / (1.0 + np.exp(-x))


def np_group_norm(x, p, groups=32, eps=1e-6):
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * p['scale'] + p['bias']


def np_conv(x, p, stride=1):
    """TF conv2d with padding 'SAME': total pad max((out-1)*stride + k - in, 0), the smaller half before."""
    kernel = p['kernel']
    k = kernel.shape[0]
    size = x.shape[1]
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    before = total // 2
    xp = np.pad(x, ((0, 0), (before, total - before), (before, total - before), (0, 0)))
    y = np.zeros(x.shape[:1] + (out, out, kernel.shape[-1]))
    for di in range(k):
        for dj in range(k):
            patch = xp[:, di:di + stride * out:stride, dj:dj + stride * out:stride, :]
            y += np.einsum('bhwc,co->bhwo', patch, kernel[di, dj])
    return y + p['bias']


def np_dense(x, p):
    return x @ p['kernel'] + p['bias']


def np_temb(t, dim):
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / (half - 1))
    angles = t.astype(np.float64)[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    return np.pad(emb, ((0, 0), (0, dim % 2)))


def np_resblock(x, temb, p, out_ch):
    h = np_conv(np_swish(np_group_norm(x, p['norm1'])), p['conv1'])
    h = h + np_dense(np_swish(temb), p['temb_proj'])[:, None, None, :]
    h = np_conv(np_swish(np_group_norm(h, p['norm2'])), p['conv2'])
    if x.shape[-1] != out_ch:
        x = np_dense(x, p['nin_shortcut'])
    return x + h


def np_attn(x, p):
    b, hh, ww, c = x.shape
    h = np_group_norm(x, p['norm'])
    q, k, v = (np_dense(h, p[n]) for n in ('q', 'k', 'v'))
    w = np.einsum('bhwc,bHWc->bhwHW', q, k) * c ** -0.5
    w = w.reshape(b, hh, ww, hh * ww)
    w = np.exp(w - w.max(axis=-1, keepdims=True))
    w = (w / w.sum(axis=-1, keepdims=True)).reshape(b, hh, ww, hh, ww)
    h = np.einsum('bhwHW,bHWc->bhwc', w, v)
    return x + np_dense(h, p['proj_out'])


def np_upsample_nearest(x):
    size = x.shape[1]
    idx = np.arange(2 * size) // 2
    return x[:, idx][:, :, idx]


def np_unet(p, x, t, *, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions):
    temb = np_temb(t, ch)
    temb = np_dense(np_swish(np_dense(temb, p['temb']['dense0'])), p['temb']['dense1'])
    hs = [np_conv(x, p['conv_in'])]
    for i, mult in enumerate(ch_mult):
        level = p[f'down_{i}']
        for j in range(num_res_blocks):
            h = np_resblock(hs[-1], temb, level[f'block_{j}'], ch * mult)
            if h.shape[1] in attn_resolutions:
                h = np_attn(h, level[f'attn_{j}'])
            hs.append(h)
        if i != len(ch_mult) - 1:
            hs.append(np_conv(hs[-1], level['downsample']['conv'], stride=2))
    h = hs[-1]
    h = np_resblock(h, temb, p['mid']['block_1'], h.shape[-1])
    h = np_attn(h, p['mid']['attn_1'])
    h = np_resblock(h, temb, p['mid']['block_2'], h.shape[-1])
    for i in reversed(range(len(ch_mult))):
        level = p[f'up_{i}']
        for j in range(num_res_blocks + 1):
            h = np_resblock(np.concatenate([h, hs.pop()], axis=-1), temb, level[f'block_{j}'], ch * ch_mult[i])
            if h.shape[1] in attn_resolutions:
                h = np_attn(h, level[f'attn_{j}'])
        if i != 0:
            h = np_conv(np_upsample_nearest(h), level['upsample']['conv'])
    assert not hs
    return np_conv(np_swish(np_group_norm(h, p['norm_out'])), p['conv_out'])


@pytest.fixture(scope='module')
def tiny_case():
    """Random float64 weights, inputs and the numpy reference output of the TINY model on 8x8 inputs."""
    params = random_params(UNet(**TINY), 8, seed=0)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1.0, 1.0, (2, 8, 8, 3))
    t = np.array([3, 987], np.int32)
    reference = np_unet(jax.tree.map(np.asarray, params), x, t, **TINY)
    return params, x, t, reference


# ------------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize('kwargs, size, expected, tensors', [
    (dict(CIFAR10, out_ch=3), 32, 35_746_307, 328),
    (dict(CIFAR10, out_ch=6), 32, 35_749_766, 328),
    (dict(LSUN, out_ch=3), 256, 113_673_219, 450),
    (dict(LSUN, out_ch=3, ch=192), 256, 255_677_955, 450),
])
def test_parameter_counts_match_official(kwargs, size, expected, tensors):
    leaves = jax.tree.leaves(abstract_init(UNet(**kwargs), size))
    assert sum(int(np.prod(leaf.shape)) for leaf in leaves) == expected
    assert len(leaves) == tensors
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)


def test_cifar10_param_tree_uses_official_scopes():
    params = abstract_init(UNet(**CIFAR10, out_ch=3), 32)
    assert sorted(params) == sorted(['temb', 'conv_in', 'mid', 'norm_out', 'conv_out']
                                    + [f'down_{i}' for i in range(4)] + [f'up_{i}' for i in range(4)])
    assert params['down_1']['attn_1']['proj_out']['kernel'].shape == (256, 256)
    assert params['down_1']['block_0']['nin_shortcut']['kernel'].shape == (128, 256)
    assert params['up_1']['block_2']['conv1']['kernel'].shape == (3, 3, 384, 256)
    assert params['up_3']['upsample']['conv']['kernel'].shape == (3, 3, 256, 256)
    assert 'downsample' not in params['down_3'] and 'upsample' not in params['up_0']
    assert 'attn_0' not in params['down_0'] and 'attn_2' in params['up_1']


def test_output_shape_and_dtype_32x32():
    model = UNet(**dict(CIFAR10, ch=32, out_ch=6))     # the CIFAR-10 topology at a quarter of the width
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), random_params(model, 32, seed=2))
    x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    out = run(model, params, x, jnp.array([0, 999], jnp.int32))
    assert out.shape == (2, 32, 32, 6) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize('kwargs, size', [(dict(CIFAR10, out_ch=3), 32), (dict(LSUN, out_ch=6), 256)])
def test_output_shape_full_size(kwargs, size):
    model = UNet(**kwargs, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    out = jax.eval_shape(lambda x, t: model.init_with_output(jax.random.key(0), x, t, train=False)[0], x, t)
    assert out.shape == (2, size, size, kwargs['out_ch']) and out.dtype == jnp.float32


# fast_variance (E[x^2] - E[x]^2) is the same variance as the reference's two-pass E[(x - E[x])^2]; it differs
# only by rounding, amplified by (mean^2 + var) / var within a group (a few units here), so the same tolerances hold.
# The default upsample='subpixel' sums the same products as the reference's index-based repeat + 3x3 conv in
# another order; upsample='repeat' is the reference's own order.
SWITCHES_SAME_ARITHMETIC = [{}, dict(fast_variance=True), dict(upsample='repeat')]


@pytest.mark.parametrize('switches', SWITCHES_SAME_ARITHMETIC + [dict(conv3x3='winograd')])
def test_forward_matches_numpy_reference_float64(tiny_case, switches):
    params, x, t, reference = tiny_case
    with jax.enable_x64(True):
        model = UNet(**TINY, **switches, dtype=jnp.float64, param_dtype=jnp.float64)
        out = run(model, params, jnp.asarray(x), jnp.asarray(t))
        assert out.dtype == jnp.float64
        out = np.asarray(out)
    assert out.shape == reference.shape == (2, 8, 8, 3)
    assert np.abs(reference).max() > 0.5     # a non-trivial output
    # Measured: 2e-15 relative; only the summation order differs.
    np.testing.assert_allclose(out, reference, rtol=0, atol=1e-12 * np.abs(reference).max())


@pytest.mark.parametrize('switches', SWITCHES_SAME_ARITHMETIC)
def test_forward_matches_numpy_reference_float32(tiny_case, switches):
    params, x, t, reference = tiny_case
    params32 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    out = run(UNet(**TINY, **switches), params32, jnp.asarray(x, jnp.float32), jnp.asarray(t))
    assert out.shape == (2, 8, 8, 3) and out.dtype == jnp.float32
    # float32 epsilon 1.2e-7 accumulated over ~30 layers (and sin(987) in float32, as the official code
    # does); measured 1.1e-6 relative to the largest output.
    np.testing.assert_allclose(np.asarray(out), reference, rtol=0, atol=1e-5 * np.abs(reference).max())


def test_winograd_convolutions_float32(tiny_case):
    # conv3x3='winograd' computes the residual blocks' 3x3 convolutions (here 8x8 and 4x4, all divisible by 4) by
    # Winograd F(4x4, 3x3); the float64 test above shows it is the same function. In float32 its transforms
    # multiply each convolution's rounding error by a few (ddpm_jax/models/winograd.py): measured 1.6e-6 of the
    # largest output against the float64 reference (1.1e-6 with XLA's convolutions).
    params, x, t, reference = tiny_case
    params32 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    model = UNet(**TINY, conv3x3='winograd')
    x, t = jnp.asarray(x, jnp.float32), jnp.asarray(t)
    np.testing.assert_allclose(np.asarray(run(model, params32, x, t)), reference, rtol=0,
                               atol=1e-5 * np.abs(reference).max())
    # Winograd replaced exactly the residual blocks' convolutions: 2 per block (TINY: 4 down, 2 middle and 6 up
    # blocks), leaving conv_in, conv_out, the downsampling conv and the four 2x2 convs of the subpixel upsampling.
    def conv_count(conv3x3):
        jaxpr = jax.make_jaxpr(lambda p: UNet(**TINY, conv3x3=conv3x3).apply({'params': p}, x, t, train=False))
        return str(jaxpr(params32)).count('conv_general_dilated[')
    assert conv_count('xla') - conv_count('winograd') == 2 * (2 * 2 + 2 + 3 * 2) == 24


def test_winograd_gradients_float64_equal_xla_with_dropout():
    # The parameter gradient of the training loss through Winograd's own VJP (inside nn.Conv, with dropout) against
    # XLA's convolutions, in float64 where both are exact to rounding: measured 1.5e-15 of the largest gradient apart
    # (in float32, two levels: 2.3e-6).
    kwargs = dict(ch=32, out_ch=3, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.1)  # one level
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(0).uniform(-1.0, 1.0, (2, 8, 8, 3)))
        t = jnp.asarray([3, 500])
        params = random_params(UNet(**kwargs), 8, seed=2)

        def grads(model):
            def loss(p):
                out = model.apply({'params': p}, x, t, train=True, rngs={'dropout': jax.random.key(3)})
                return jnp.mean(out ** 2)
            return jax.jit(jax.grad(loss))(params)
        want = grads(UNet(**kwargs, conv3x3='xla', dtype=jnp.float64, param_dtype=jnp.float64))
        got = grads(UNet(**kwargs, conv3x3='winograd', dtype=jnp.float64, param_dtype=jnp.float64))
    scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(want))
    assert scale > 1e-3
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-12 * scale)


def test_bfloat16_compute_close_to_float32(tiny_case):
    params, x, t, _ = tiny_case
    params32 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    x, t = jnp.asarray(x, jnp.float32), jnp.asarray(t)
    out32 = run(UNet(**TINY), params32, x, t)
    out16 = run(UNet(**TINY, dtype=jnp.bfloat16), params32, x, t)
    assert out16.dtype == jnp.float32
    # bfloat16 keeps 8 significant bits (relative rounding 2**-9 = 0.2%) on every conv/dense input and
    # output; over ~30 layers with float32 GroupNorm/softmax this gives about 1% relative error (measured 1.0%).
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert rel < 0.03, rel


def test_official_initialisation():
    model = UNet(**dict(TINY, num_res_blocks=1))
    # jit and the 'rbg' key only make init compile faster on CPU (10 s -> 4.5 s); the initialisers are the model's.
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32), train=False))
    params = init(jax.random.key(0, impl='rbg'))['params']
    flat = {'/'.join(k.key for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(params)}
    for name, value in flat.items():
        if name.endswith('norm1/scale') or name.endswith('norm2/scale') or name.endswith('norm/scale') \
                or name == 'norm_out/scale':
            np.testing.assert_array_equal(value, 1.0)
        elif name.endswith('bias'):
            np.testing.assert_array_equal(value, 0.0)
        else:
            assert name.endswith('kernel'), name
            receptive = int(np.prod(value.shape[:-2]))
            fan_avg = receptive * (value.shape[-2] + value.shape[-1]) / 2
            zero_init = name.endswith(('conv2/kernel', 'proj_out/kernel')) or name == 'conv_out/kernel'
            limit = math.sqrt(3 * (1e-10 if zero_init else 1.0) / fan_avg)
            assert np.abs(value).max() <= limit, name
            assert np.abs(value).max() > 0.9 * limit, name       # uniform on [-limit, limit]
    assert 'up_0/block_1/conv2/kernel' in flat and 'up_1/attn_1/proj_out/kernel' in flat


def test_timestep_embedding_matches_official_formula():
    t = np.array([0, 1, 17, 999])
    for dim in (8, 9, 128):
        out = np.asarray(get_timestep_embedding(jnp.asarray(t), dim))
        np.testing.assert_allclose(out, np_temb(t, dim), rtol=0, atol=2e-4)   # float32 sin of angles <= 999
    assert np.asarray(get_timestep_embedding(jnp.asarray(t), 9))[:, -1].tolist() == [0.0] * 4


def test_dropout_only_in_training(tiny_case):
    params, x, t, reference = tiny_case
    params32 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    x = jnp.asarray(x, jnp.float32)
    model = UNet(**dict(TINY, dropout=0.5))
    apply = lambda train, key: run(model, params32, x, jnp.asarray(t), train=train, rngs={'dropout': key})
    eval_out = apply(False, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(eval_out), reference, rtol=0, atol=1e-5 * np.abs(reference).max())
    train_a, train_b = apply(True, jax.random.key(0)), apply(True, jax.random.key(1))
    np.testing.assert_array_equal(train_a, apply(True, jax.random.key(0)))
    assert not np.allclose(train_a, eval_out) and not np.allclose(train_a, train_b)


def _config(**model_overrides) -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model.update(model_overrides)
    return config


def test_create_model_from_config():
    model = create_model(_config())
    assert (model.ch, model.out_ch, tuple(model.ch_mult), model.num_res_blocks, tuple(model.attn_resolutions),
            model.dropout, model.dtype) == (128, 3, (1, 2, 2, 2), 2, (16,), 0.1, jnp.float32)
    config = _config(dtype='bfloat16')
    config.diffusion.model_var_type = 'learned_range'
    model = create_model(config)
    assert model.out_ch == 6 and model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32
    with pytest.raises(ValueError, match="float16.*allowed"):
        create_model(_config(dtype='float16'))


def test_rejects_bad_input_shapes():
    model = UNet(**TINY)
    with pytest.raises(ValueError, match='divisible'):
        model.init(jax.random.key(0), jnp.zeros((1, 7, 7, 3)), jnp.zeros((1,), jnp.int32), train=False)
    with pytest.raises(ValueError, match='t must have shape'):
        model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)), jnp.zeros((1,), jnp.int32), train=False)


# ------------------------------------------------------------------------------------------------
# speed switches: config.model.attention, remat, fast_variance and upsample


def test_speed_switches_keep_parameter_tree():
    reference = abstract_init(UNet(**TINY), 8)
    for switches in (dict(attention='dot_product'), dict(remat=True), dict(fast_variance=True),
                     dict(upsample='repeat'), dict(conv3x3='winograd')):
        params = abstract_init(UNet(**TINY, **switches), 8)
        assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(reference), switches
        assert jax.tree.map(lambda p: p.shape, params) == jax.tree.map(lambda p: p.shape, reference), switches


def test_dot_product_attention_matches_einsum(tiny_case):
    params, x, t, reference = tiny_case
    params32 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    x, t = jnp.asarray(x, jnp.float32), jnp.asarray(t)
    einsum32 = run(UNet(**TINY), params32, x, t)
    dot32 = run(UNet(**TINY, attention='dot_product'), params32, x, t)
    assert dot32.dtype == jnp.float32
    # The same function in float32, rounded differently ('einsum' divides by the softmax's row sums after the
    # second matmul): measured 8e-7 of the largest output apart; each within 1.1e-6 of the float64 reference.
    np.testing.assert_allclose(np.asarray(dot32), np.asarray(einsum32), rtol=0,
                               atol=5e-6 * float(jnp.abs(einsum32).max()))
    for out32 in (dot32, einsum32):
        np.testing.assert_allclose(np.asarray(out32), reference, rtol=0, atol=1e-5 * np.abs(reference).max())
    einsum16 = run(UNet(**TINY, dtype=jnp.bfloat16), params32, x, t)
    dot16 = run(UNet(**TINY, dtype=jnp.bfloat16, attention='dot_product'), params32, x, t)
    # bfloat16 compute: both are as far from the float64 reference as bfloat16 rounding makes them (relative L2
    # error measured 1.01% for 'einsum', 1.02% for 'dot_product', as in test_bfloat16_compute_close_to_float32).
    for out16 in (dot16, einsum16):
        rel = float(np.linalg.norm(np.asarray(out16, np.float64) - reference) / np.linalg.norm(reference))
        assert rel < 0.02, rel


def test_attention_switch_rejects_bad_values():
    x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="'flash'.*allowed.*einsum.*dot_product.*cudnn"):
        UNet(**TINY, attention='flash').init(jax.random.key(0), x, t, train=False)
    with pytest.raises(ValueError, match="'flash'.*allowed"):
        create_model(_config(attention='flash'))
    # cuDNN fused attention takes only 16-bit inputs: float32 compute is refused before reaching cuDNN.
    with pytest.raises(ValueError, match='cudnn.*bfloat16'):
        jax.eval_shape(lambda: UNet(**TINY, attention='cudnn').init(jax.random.key(0), x, t, train=False))


@pytest.mark.slow
def test_remat_keeps_loss_and_gradients():
    # One level with attention at 8x8 (down, mid and up attention blocks) keeps the two compilations short;
    # dropout on: remat must replay the same masks in the recomputation.
    model_kwargs = dict(ch=32, out_ch=3, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), dropout=0.3)
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), random_params(UNet(**model_kwargs), 8, seed=4))
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.uniform(-1.0, 1.0, (2, 8, 8, 3)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    t = jnp.array([3, 987], jnp.int32)

    def loss_and_grads(model):
        def loss(p):
            out = model.apply({'params': p}, x, t, train=True, rngs={'dropout': jax.random.key(6)})
            return jnp.mean((out - target) ** 2)
        return jax.jit(jax.value_and_grad(loss))(params)

    loss, grads = loss_and_grads(UNet(**model_kwargs))
    loss_remat, grads_remat = loss_and_grads(UNet(**model_kwargs, remat=True))
    # float32: the forward pass is the same computation (loss measured bitwise equal); the backward pass
    # recomputes the block activations in differently fused code: measured 1.1e-7 of the largest gradient
    # entry. (bfloat16 is not compared exactly: XLA may keep excess precision across fused bf16 casts, and
    # remat moves fusion boundaries; the loss then moves by ~3e-4 relative, a bfloat16 rounding effect.)
    np.testing.assert_allclose(float(loss_remat), float(loss), rtol=1e-6)
    assert jax.tree_util.tree_structure(grads_remat) == jax.tree_util.tree_structure(grads)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
    assert scale > 0.01
    for g, g_remat in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
        np.testing.assert_allclose(np.asarray(g_remat), np.asarray(g), rtol=0, atol=1e-6 * scale)


def test_create_model_reads_speed_switches():
    model = create_model(_config())
    assert (model.attention, model.remat) == ('einsum', False)
    model = create_model(_config(attention='dot_product', remat=True))
    assert (model.attention, model.remat, model.fast_variance) == ('dot_product', True, False)
    assert create_model(_config(fast_variance=True)).fast_variance
    assert (create_model(_config()).upsample, create_model(_config(upsample='repeat')).upsample) == \
        ('subpixel', 'repeat')
    with pytest.raises(ValueError, match=r"config\.model\.upsample='nearest'; allowed"):
        create_model(_config(upsample='nearest'))
    assert (create_model(_config()).conv3x3, create_model(_config(conv3x3='xla')).conv3x3) == ('auto', 'xla')
    with pytest.raises(ValueError, match=r"config\.model\.conv3x3='fft'; allowed"):
        create_model(_config(conv3x3='fft'))


@pytest.mark.parametrize('height, width', [(4, 4), (3, 5)])
def test_subpixel_upsample_conv_matches_repeat_then_conv_float64(height, width):
    # Reference: the official order written in numpy, index-based nearest x2 then a zero-padded 3x3 conv, with
    # random (non-symmetric) taps, so a tap folded into the wrong phase or a swapped pad would show.
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, height, width, 3))
    kernel = rng.normal(size=(3, 3, 3, 5))
    up = x[:, np.arange(2 * height) // 2][:, :, np.arange(2 * width) // 2]
    padded = np.pad(up, ((0, 0), (1, 1), (1, 1), (0, 0)))
    reference = sum(np.einsum('bhwc,cd->bhwd', padded[:, i:i + 2 * height, j:j + 2 * width], kernel[i, j])
                    for i in range(3) for j in range(3))
    with jax.enable_x64(True):
        out = np.asarray(unet._upsample_conv_subpixel(jnp.asarray(x), jnp.asarray(kernel), jnp.float64))
    assert out.shape == (2, 2 * height, 2 * width, 5)
    # float64, at most 9 products summed in another order: measured ~1e-15 of the largest output.
    np.testing.assert_allclose(out, reference, rtol=0, atol=1e-13 * np.abs(reference).max())


@pytest.mark.slow
def test_subpixel_upsample_keeps_init_and_gradients():
    # Same parameters from the same key (names, shapes and init order as nn.Conv), and in float64 the same loss
    # and gradients as the official order up to summation order, dropout on.
    kwargs = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.3)
    x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
    init = [jax.jit(functools.partial(UNet(**kwargs, upsample=impl).init, train=False))(jax.random.key(3), x, t)
            for impl in UPSAMPLE]   # jit: one compile, not one per operation
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), *init)
    rng = np.random.default_rng(12)
    with jax.enable_x64(True):
        params = random_params(UNet(**kwargs), 8, seed=13)
        x = jnp.asarray(rng.uniform(-1.0, 1.0, (2, 8, 8, 3)))
        target = jnp.asarray(rng.normal(size=(2, 8, 8, 3)))
        t = jnp.array([3, 987], jnp.int32)

        def loss_and_grads(impl):
            model = UNet(**kwargs, upsample=impl, dtype=jnp.float64, param_dtype=jnp.float64)

            def loss(p):
                out = model.apply({'params': p}, x, t, train=True, rngs={'dropout': jax.random.key(6)})
                return jnp.mean((out - target) ** 2)
            return jax.jit(jax.value_and_grad(loss))(params)
        (loss_sub, grads_sub), (loss_rep, grads_rep) = [loss_and_grads(impl) for impl in UPSAMPLE]
    np.testing.assert_allclose(float(loss_sub), float(loss_rep), rtol=1e-13)
    scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(grads_rep))   # numpy: float64 kept
    assert scale > 0.01 and float(np.abs(np.asarray(grads_rep['up_1']['upsample']['conv']['kernel'])).max()) > 1e-3
    for g_sub, g_rep in zip(jax.tree.leaves(grads_sub), jax.tree.leaves(grads_rep)):
        np.testing.assert_allclose(np.asarray(g_sub), np.asarray(g_rep), rtol=0, atol=1e-12 * scale)


def _matmul_operand_types(stablehlo_text: str, op: str) -> list:
    """[(lhs element type, rhs element type, result element type)] of every `stablehlo.<op>` in the text."""
    types = []
    for line in stablehlo_text.splitlines():
        if f'stablehlo.{op}' not in line:
            continue
        signature = line.rsplit(' : (', 1)[1]          # "tensor<..xbf16>, tensor<..xbf16>) -> tensor<..xbf16>"
        element_types = [shape.rsplit('x', 1)[-1] for shape in
                         re.findall(r'tensor<([^>]*)>', signature)]
        types.append(tuple(element_types))
    return types


def test_bfloat16_model_asks_for_bfloat16_convolutions_and_matmuls():
    # What the mixed-precision option promises the accelerator: every convolution and matmul of the forward
    # AND backward pass takes bfloat16 operands (float32 parameters are cast before use, and their gradients
    # come out of bfloat16 convolutions); only the attention logits accumulate into float32. Checked on the
    # lowered StableHLO, i.e. what XLA is asked to compute on any backend (XLA:CPU may upcast internally).
    # attention='dot_product' (jax's XLA path) does not keep this: its logits gradient is float32 times
    # upcast q / k.
    model = UNet(**TINY, dtype=jnp.bfloat16, attention='einsum')
    params = abstract_init(model, 8)
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)

    def loss(p, x, t):
        out = model.apply({'params': p}, x, t, train=False)
        return jnp.mean(jnp.square(out.astype(jnp.float32) - x))

    text = jax.jit(jax.value_and_grad(loss)).lower(params, x, t).as_text()
    convolutions = _matmul_operand_types(text, 'convolution')
    # Forward convolutions: conv_in, 2 per ResnetBlock (4 down, 2 mid, 6 up: 24), downsample, conv_out and the
    # upsample's four 2x2 phase convolutions (upsample='subpixel') = 31 (the nin shortcuts are dense layers).
    # Backward: a filter gradient for each of the 31 and an input gradient for all but conv_in (its input x is
    # not differentiated): 31 + 31 + 30 = 92.
    assert len(convolutions) == 92, len(convolutions)
    assert set(convolutions) == {('bf16', 'bf16', 'bf16')}, sorted(set(convolutions))
    dots = _matmul_operand_types(text, 'dot_general')
    assert dots, 'no dot_general: the dense layers and attention matmuls are missing'
    assert {(lhs, rhs) for lhs, rhs, _ in dots} == {('bf16', 'bf16')}, sorted(set(dots))
    # bfloat16 results everywhere except the attention logits (and their gradient), which are float32.
    assert {result for _, _, result in dots} <= {'bf16', 'f32'}
    assert any(result == 'bf16' for _, _, result in dots)


def assert_vjp_float64(fn, args: tuple, cotangent: np.ndarray, want_out: np.ndarray, want_grads: tuple) -> None:
    """fn's output and its vjp of `cotangent`, all computed in float64, equal numpy's to 1e-13 (relative)."""
    with jax.enable_x64(True):
        out, vjp = jax.vjp(fn, *[jnp.asarray(a) for a in args])
        grads = vjp(jnp.asarray(cotangent))
        assert {a.dtype for a in (out, *grads)} == {jnp.dtype(jnp.float64)}
        for got, want in zip((out, *grads), (want_out, *want_grads), strict=True):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-13)


def test_attention_logits_gradient_is_plain_autodiff_in_float64():
    # The custom VJP of the logits only rounds the cotangent to the compute dtype; in float64 (no rounding)
    # it must equal the gradient of the plain einsum, written here in numpy: d<G, q k^T>/dq = G k, /dk = G^T q.
    rng = np.random.default_rng(11)
    q, k, g = rng.normal(size=(2, 5, 3)), rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 5, 4))
    assert_vjp_float64(unet._attention_logits, (q, k), g, np.einsum('bqc,bkc->bqk', q, k),
                       (np.einsum('bqk,bkc->bqc', g, k), np.einsum('bqk,bqc->bkc', g, q)))
    # bfloat16 inputs: float32 logits, bfloat16 gradients (the cotangent rounded to bfloat16 first).
    q16, k16 = jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16)
    logits16, vjp16 = jax.vjp(unet._attention_logits, q16, k16)
    dq16, dk16 = vjp16(jnp.asarray(g, jnp.float32))
    assert logits16.dtype == jnp.float32 and dq16.dtype == dk16.dtype == jnp.bfloat16
    g_rounded = np.asarray(jnp.asarray(g, jnp.bfloat16), np.float64)
    reference = np.einsum('bqk,bkc->bqc', g_rounded, np.asarray(k16, np.float64))
    # bfloat16 output rounding: 2**-8 relative to each entry (the products are exact in float32 accumulation).
    np.testing.assert_allclose(np.asarray(dq16, np.float64), reference, rtol=2 ** -8, atol=1e-6)


def test_dense_matmul_gradient_is_plain_autodiff_in_float64():
    # The dense layers' matmul has its gradient written out (the kernel's as one [N, C_in]^T [N, C_out] matmul);
    # it must be the plain gradient, here in numpy: y = x W, dL/dx = G W^T, dL/dW = sum over positions x^T G.
    rng = np.random.default_rng(12)
    x, kernel, g = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(5, 6)), rng.normal(size=(2, 3, 4, 6))
    assert_vjp_float64(unet._dense_matmul, (x, kernel), g, np.einsum('bhwc,cd->bhwd', x, kernel),
                       (np.einsum('bhwd,cd->bhwc', g, kernel), np.einsum('bhwc,bhwd->cd', x, g)))
    with jax.enable_x64(True):
        # The same through flax's Dense on a [B, C] input (the timestep embedding's layers).
        dense = unet._dense(6, 'd', dtype=jnp.float64, param_dtype=jnp.float64)
        params = {'kernel': jnp.asarray(kernel), 'bias': jnp.zeros(6)}
        dkernel2 = jax.grad(lambda p: jnp.sum(dense.apply({'params': p}, jnp.asarray(x[0, 0])) * g[0, 0]))(params)
        np.testing.assert_allclose(np.asarray(dkernel2['kernel']), x[0, 0].T @ g[0, 0], rtol=1e-13)
    # bfloat16 compute: bfloat16 results and gradients, as autodiff's.
    y16, vjp16 = jax.vjp(unet._dense_matmul, jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16 and {a.dtype for a in vjp16(y16)} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ValueError, match='only x'):
        unet._dense_dot_general(jnp.ones((2, 5)), jnp.ones((5, 6)), (((1,), (0,)), ((), ())),
                                precision=jax.lax.Precision.HIGHEST)


def test_model_settings_name_a_missing_or_mistyped_key():
    config = _config()
    del config.model['remat']
    with pytest.raises(ValueError, match=r'config\.model\.remat is missing'):
        create_model(config)
    with pytest.raises(ValueError, match=r"config\.model\.ch='128' must be of type int"):
        unet.ModelSettings.from_config(dict(_config().model.to_dict(), ch='128'))
