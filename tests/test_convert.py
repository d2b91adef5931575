"""Tests of ddpm_jax.convert: official TF names and diffusers UNet2DModel names -> Flax params.

The expected names and shapes are derived here from the official models/unet.py and the diffusers
layout, independently of the converter; the synthetic checkpoints hold random values so that any mix-up of
tensors shows.
"""
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from ddpm_jax import convert
from ddpm_jax.models import UNet, create_model

ARCH = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))   # 8x8 inputs, attention at 4x4
SIZE, IN_CH, OUT_CH = 8, 3, 3
MODEL = UNet(**ARCH, out_ch=OUT_CH)


def official_shapes(ch, ch_mult, num_res_blocks, attn_resolutions, size, in_ch, out_ch):
    """{official TF variable name: shape} of the official models/unet.py `model`."""
    shapes = {}

    def conv(scope, cin, cout, k=3):
        shapes[f'{scope}/W'], shapes[f'{scope}/b'] = (k, k, cin, cout), (cout,)

    def dense(scope, cin, cout):
        shapes[f'{scope}/W'], shapes[f'{scope}/b'] = (cin, cout), (cout,)

    def norm(scope, c):
        shapes[f'{scope}/gamma'], shapes[f'{scope}/beta'] = (c,), (c,)

    def resblock(scope, cin, cout):
        norm(f'{scope}/norm1', cin)
        conv(f'{scope}/conv1', cin, cout)
        dense(f'{scope}/temb_proj', 4 * ch, cout)
        norm(f'{scope}/norm2', cout)
        conv(f'{scope}/conv2', cout, cout)
        if cin != cout:
            dense(f'{scope}/nin_shortcut', cin, cout)

    def attn(scope, c):
        norm(f'{scope}/norm', c)
        for part in ('q', 'k', 'v', 'proj_out'):
            dense(f'{scope}/{part}', c, c)

    dense('model/temb/dense0', ch, 4 * ch)
    dense('model/temb/dense1', 4 * ch, 4 * ch)
    conv('model/conv_in', in_ch, ch)
    skip_channels, c = [ch], ch
    for i, mult in enumerate(ch_mult):
        for j in range(num_res_blocks):
            resblock(f'model/down_{i}/block_{j}', c, ch * mult)
            c = ch * mult
            if size >> i in attn_resolutions:
                attn(f'model/down_{i}/attn_{j}', c)
            skip_channels.append(c)
        if i != len(ch_mult) - 1:
            conv(f'model/down_{i}/downsample/conv', c, c)
            skip_channels.append(c)
    resblock('model/mid/block_1', c, c)
    attn('model/mid/attn_1', c)
    resblock('model/mid/block_2', c, c)
    for i in reversed(range(len(ch_mult))):
        for j in range(num_res_blocks + 1):
            resblock(f'model/up_{i}/block_{j}', c + skip_channels.pop(), ch * ch_mult[i])
            c = ch * ch_mult[i]
            if size >> i in attn_resolutions:
                attn(f'model/up_{i}/attn_{j}', c)
        if i != 0:
            conv(f'model/up_{i}/upsample/conv', c, c)
    norm('model/norm_out', c)
    conv('model/conv_out', c, out_ch)
    return shapes


def random_official(seed=0):
    rng = np.random.default_rng(seed)
    shapes = official_shapes(**ARCH, size=SIZE, in_ch=IN_CH, out_ch=OUT_CH)
    return {name: rng.normal(0, 0.2, shape).astype(np.float32) for name, shape in shapes.items()}


def official_to_diffusers(variables, num_levels, new_attention_names=False):
    """Official TF variables -> a diffusers UNet2DModel state dict (torch layouts), from the diffusers layout."""
    attn_names = (dict(norm='group_norm', q='to_q', k='to_k', v='to_v', proj_out='to_out.0') if new_attention_names
                  else dict(norm='group_norm', q='query', k='key', v='value', proj_out='proj_attn'))
    resnet_names = dict(norm1='norm1', conv1='conv1', temb_proj='time_emb_proj', norm2='norm2', conv2='conv2',
                        nin_shortcut='conv_shortcut')
    state = {}
    for name, value in variables.items():
        parts = name.split('/')[1:]
        scope, leaf = parts[:-1], parts[-1]
        if scope[0] == 'temb':
            key = f'time_embedding.linear_{int(scope[1][-1]) + 1}'
        elif scope[0] in ('conv_in', 'conv_out'):
            key = scope[0]
        elif scope[0] == 'norm_out':
            key = 'conv_norm_out'
        else:
            level, sub, layer = scope[0], scope[1], scope[2]
            if level == 'mid':
                prefix = 'mid_block'
                block = 'resnets.0' if sub == 'block_1' else 'resnets.1' if sub == 'block_2' else 'attentions.0'
            else:
                direction, index = level.split('_')
                index = int(index) if direction == 'down' else num_levels - 1 - int(index)
                prefix = f'{direction}_blocks.{index}'
                kind, j = sub.split('_') if '_' in sub else (sub, '0')
                block = {'block': f'resnets.{j}', 'attn': f'attentions.{j}', 'downsample': 'downsamplers.0',
                         'upsample': 'upsamplers.0'}[kind]
            layer = attn_names[layer] if 'attentions' in block else resnet_names.get(layer, layer)
            key = f'{prefix}.{block}.{layer}'
        key += '.weight' if leaf in ('W', 'gamma') else '.bias'
        if leaf == 'W' and value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)               # HWIO -> OIHW
        elif leaf == 'W' and 'conv_shortcut' in key:
            value = value.T[:, :, None, None]                 # nin [in, out] -> 1x1 conv [out, in, 1, 1]
        elif leaf == 'W':
            value = value.T                                   # dense [in, out] -> linear [out, in]
        state[key] = np.ascontiguousarray(value)
    return state


def flat(params):
    """{'down_0/block_0/conv1/kernel': leaf} of a params pytree (arrays or ShapeDtypeStructs)."""
    return {'/'.join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(params)}


def tiny_config():
    config = default.get_config()
    config.data.image_size, config.data.channels = SIZE, IN_CH
    config.model.update(ch=ARCH['ch'], ch_mult=ARCH['ch_mult'], num_res_blocks=ARCH['num_res_blocks'],
                        attn_resolutions=ARCH['attn_resolutions'], dropout=0.0)
    config.diffusion.model_var_type = 'fixedlarge'
    return config


# ------------------------------------------------------------------------------------------------
# official TF names


def test_official_round_trip_is_exact():
    variables = random_official()
    params = convert.official_tf_to_flax(variables, MODEL, image_size=SIZE)
    expected = flat(convert.abstract_params(MODEL, image_size=SIZE, channels=IN_CH))
    got = flat(params)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
    assert all(v.dtype == np.float32 for v in got.values())
    np.testing.assert_array_equal(got['down_1/attn_0/q/kernel'], variables['model/down_1/attn_0/q/W'])
    np.testing.assert_array_equal(got['mid/block_2/norm1/scale'], variables['model/mid/block_2/norm1/gamma'])
    np.testing.assert_array_equal(got['up_0/block_0/nin_shortcut/bias'], variables['model/up_0/block_0/nin_shortcut/b'])
    back = convert.flax_to_official_tf(params)
    assert sorted(back) == sorted(variables)
    for name, value in variables.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_official_prefers_ema_and_ignores_optimizer_slots():
    raw, shadow = random_official(1), random_official(2)
    checkpoint = dict(raw, global_step=np.int64(790000), beta1_power=np.float32(0.9))
    for name in raw:
        checkpoint[name + '/ExponentialMovingAverage'] = shadow[name]
        checkpoint[name + '/Adam'] = checkpoint[name + '/Adam_1'] = np.zeros_like(raw[name])
    got = convert.flax_to_official_tf(convert.official_tf_to_flax(checkpoint, MODEL, image_size=SIZE))
    for name in raw:
        np.testing.assert_array_equal(got[name], shadow[name], err_msg=name)
    got = convert.flax_to_official_tf(convert.official_tf_to_flax(checkpoint, MODEL, image_size=SIZE, use_ema=False))
    np.testing.assert_array_equal(got['model/conv_in/W'], raw['model/conv_in/W'])
    del checkpoint['model/conv_out/b/ExponentialMovingAverage']
    with pytest.raises(ValueError, match=re.escape('model/conv_out/b')):
        convert.official_tf_to_flax(checkpoint, MODEL, image_size=SIZE)


@pytest.mark.parametrize('damage, named', [
    ('missing', 'model/up_1/attn_1/proj_out/W'),
    ('extra', 'model/down_0/attn_0/q/W'),          # no attention at 8x8 in this model
    ('shape', 'model/down_1/block_0/nin_shortcut/W'),
])
def test_official_rejects_mismatch_naming_the_variable(damage, named):
    variables = random_official()
    if damage == 'missing':
        del variables[named]
    elif damage == 'extra':
        variables[named] = np.zeros((32, 32), np.float32)
    else:
        variables[named] = variables[named].T
    with pytest.raises(ValueError, match=re.escape(named)) as error:
        convert.official_tf_to_flax(variables, MODEL, image_size=SIZE)
    assert {'missing': 'missing 1', 'extra': 'left over', 'shape': 'mis-shaped 1'}[damage] in str(error.value)


def test_official_names_depend_on_image_size():
    """At 16x16 the attention of this model sits on level 2 of 2, which does not exist: attn_0 of down_1 is extra."""
    with pytest.raises(ValueError, match=re.escape('model/down_1/attn_0/q/W')):
        convert.official_tf_to_flax(random_official(), MODEL, image_size=16)


# ------------------------------------------------------------------------------------------------
# diffusers UNet2DModel names


@pytest.mark.parametrize('new_attention_names', [False, True])
def test_diffusers_maps_to_the_same_params_as_official(new_attention_names):
    variables = random_official(3)
    state = official_to_diffusers(variables, len(ARCH['ch_mult']), new_attention_names)
    assert 'down_blocks.0.downsamplers.0.conv.weight' in state and 'up_blocks.0.upsamplers.0.conv.weight' in state
    from_diffusers = flat(convert.diffusers_to_flax(state, MODEL, image_size=SIZE))
    from_official = flat(convert.official_tf_to_flax(variables, MODEL, image_size=SIZE))
    assert sorted(from_diffusers) == sorted(from_official)
    for name, value in from_official.items():
        np.testing.assert_array_equal(from_diffusers[name], value, err_msg=name)


def test_diffusers_forward_pass_equals_official():
    variables = random_official(4)
    state = official_to_diffusers(variables, len(ARCH['ch_mult']))
    x = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (2, SIZE, SIZE, IN_CH)), jnp.float32)
    t = jnp.array([5, 900], jnp.int32)
    apply = jax.jit(lambda p: MODEL.apply({'params': p}, x, t, train=False))
    out_official = apply(convert.official_tf_to_flax(variables, MODEL, image_size=SIZE))
    out_diffusers = apply(convert.diffusers_to_flax(state, MODEL, image_size=SIZE))
    assert float(jnp.abs(out_official).max()) > 0.1
    np.testing.assert_array_equal(out_diffusers, out_official)


@pytest.mark.parametrize('damage, key, named', [
    ('missing', 'mid_block.attentions.0.query.weight', 'model/mid/attn_1/q/W'),
    ('extra', 'down_blocks.0.resnets.0.conv3.weight', 'down_blocks.0.resnets.0.conv3.weight'),
    ('shape', 'up_blocks.1.resnets.1.conv_shortcut.weight', 'up_blocks.1.resnets.1.conv_shortcut.weight'),
])
def test_diffusers_rejects_mismatch_naming_the_tensor(damage, key, named):
    state = official_to_diffusers(random_official(), len(ARCH['ch_mult']))
    if damage == 'missing':
        del state[key]
    elif damage == 'extra':
        state[key] = np.zeros((32, 32, 3, 3), np.float32)
    else:
        state[key] = state[key][:-1]
    with pytest.raises(ValueError, match=re.escape(named)):
        convert.diffusers_to_flax(state, MODEL, image_size=SIZE)


def test_diffusers_config_check():
    # The UNet2DModel config of google/ddpm-cifar10-32 (huggingface.co), less its bookkeeping keys.
    google_cifar10 = {
        'act_fn': 'silu', 'attention_head_dim': None, 'block_out_channels': [128, 256, 256, 256],
        'center_input_sample': False, 'down_block_types': ['DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D',
                                                           'DownBlock2D'],
        'downsample_padding': 0, 'flip_sin_to_cos': False, 'freq_shift': 1, 'in_channels': 3, 'layers_per_block': 2,
        'mid_block_scale_factor': 1, 'norm_eps': 1e-06, 'norm_num_groups': 32, 'out_channels': 3,
        'resnet_time_scale_shift': 'default', 'sample_size': 32, 'time_embedding_type': 'positional',
        'up_block_types': ['UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'],
    }
    cifar10 = create_model(default.get_config())
    convert.check_diffusers_config(google_cifar10, cifar10)
    for key, value in [('flip_sin_to_cos', True), ('freq_shift', 0), ('downsample_padding', 1),
                       ('block_out_channels', [128, 256, 256, 512])]:
        with pytest.raises(ValueError, match=re.escape(f'{key}={value!r}')):
            convert.check_diffusers_config(dict(google_cifar10, **{key: value}), cifar10)


# ------------------------------------------------------------------------------------------------
# readers and CLI


def test_tf_reader_names_the_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, 'tensorflow', None)     # as if TensorFlow were not installed
    with pytest.raises(ImportError, match='pip install tensorflow-cpu'):
        convert.read_tf_checkpoint('/nonexistent/model.ckpt-790000')


@pytest.mark.slow
def test_cli_converts_safetensors_into_a_restorable_checkpoint(tmp_path):
    safetensors_numpy = pytest.importorskip('safetensors.numpy')
    from ddpm_jax.checkpoint import restore_ema_params
    variables = random_official(6)
    source = tmp_path / 'ddpm-tiny'
    source.mkdir()
    safetensors_numpy.save_file(official_to_diffusers(variables, len(ARCH['ch_mult'])),
                                str(source / 'diffusion_pytorch_model.safetensors'))
    (source / 'config.json').write_text('{"flip_sin_to_cos": false, "freq_shift": 1, "layers_per_block": 1}')
    config_file = tmp_path / 'tiny_config.py'
    config_file.write_text(
        'import importlib.util\n'
        f'spec = importlib.util.spec_from_file_location("tiny_config_source", {os.path.abspath(__file__)!r})\n'
        'module = importlib.util.module_from_spec(spec)\n'
        'spec.loader.exec_module(module)\n'
        'get_config = module.tiny_config\n')
    workdir = tmp_path / 'workdir'
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo_root, os.environ.get('PYTHONPATH', '')]),
               JAX_PLATFORMS='cpu')
    import subprocess_helpers  # here: the config file above imports this module without tests/ on sys.path
    result = subprocess_helpers.run([sys.executable, '-m', 'ddpm_jax.convert', f'--source={source}',
                                     f'--config={config_file}', f'--workdir={workdir}'], cwd=repo_root, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'orbax' not in result.stderr and 'wrote' in result.stderr  # quiet like main: no orbax INFO lines
    params, step = restore_ema_params(str(workdir), tiny_config())
    assert step == 0
    got = convert.flax_to_official_tf(jax.tree.map(np.asarray, params))
    assert sorted(got) == sorted(variables)
    for name, value in variables.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
