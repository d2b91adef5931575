"""Released DDPM weights -> ddpm_jax Flax params, and a CLI that writes them as a ddpm_jax checkpoint.

Two sources are supported:

* The official TensorFlow checkpoints (github.com/hojonathanho/diffusion, `diffusion_models_release/`):
  variables `model/temb/dense0/W`, `model/down_1/attn_0/q/b`, `model/mid/block_1/norm1/gamma`, ...
  The Flax module tree of `ddpm_jax.models.UNet` mirrors these scopes, so the mapping is by name:
  `W` -> `kernel`, `b` -> `bias`, GroupNorm `gamma` -> `scale`, `beta` -> `bias`, with identical
  layouts (conv [kh, kw, in, out]; dense and nin [in, out]). The EMA shadow
  `<name>/ExponentialMovingAverage` is used when the checkpoint has one (these are the weights the
  paper samples from); optimiser slots (`<name>/Adam`, `<name>/Adam_1`) and variables outside `model/`
  (global_step, ...) are ignored.
* The diffusers `UNet2DModel` state dict of the same network (e.g. google/ddpm-cifar10-32), whose
  config has flip_sin_to_cos=False, freq_shift=1 (the official sin-then-cos embedding with
  denominator half-1), downsample_padding=0 (diffusers then pads (0, 1) on H and W before its
  stride-2 conv: the official TF 'SAME' padding), norm_eps=1e-6, 32 groups and single-head
  attention. Torch layouts are transposed: conv OIHW -> HWIO, linear [out, in] -> [in, out].

CLI:
    python -m ddpm_jax.convert --source=PATH --config=configs/cifar10.py --workdir=DIR
where PATH is an official TF checkpoint prefix (e.g. .../diffusion_cifar10_model/model.ckpt-790000;
needs `pip install tensorflow-cpu`), or a diffusers model directory or weights file
(`.safetensors` needs `pip install safetensors`, `.bin` needs torch).
"""
import json
import os
import re
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import traverse_util
from ml_collections import config_flags

from ddpm_jax import checkpoint, config_files, progress
from ddpm_jax.models.unet import UNet, create_model

EMA_SUFFIX = '/ExponentialMovingAverage'
_OPTIMIZER_SLOT_SUFFIXES = ('/Adam', '/Adam_1')
_TF_TO_FLAX_LEAF = {'W': 'kernel', 'b': 'bias', 'gamma': 'scale', 'beta': 'bias'}
_DIFFUSERS_WEIGHT_FILES = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')

# diffusers config values that must hold for its UNet2DModel to compute the official network.
_DIFFUSERS_REQUIRED_CONFIG = {
    'flip_sin_to_cos': False, 'freq_shift': 1, 'downsample_padding': 0, 'norm_eps': 1e-6,
    'norm_num_groups': 32, 'act_fn': 'silu', 'attention_head_dim': None, 'time_embedding_type': 'positional',
    'resnet_time_scale_shift': 'default', 'center_input_sample': False, 'mid_block_scale_factor': 1,
}


# ---------------------------------------------------------------------------------------------------
# Official TF names <-> Flax params


def abstract_params(model: UNet, *, image_size: int, channels: int) -> dict:
    """The params pytree of `model` for [B, image_size, image_size, channels] inputs, as ShapeDtypeStructs.

    The image size matters: it decides at which levels attention blocks exist.
    """
    def init():
        x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
        return model.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32), train=False)['params']
    return jax.eval_shape(init)


def _official_to_flax_path(name: str) -> tuple | None:
    """'model/down_0/block_0/norm1/gamma' -> ('down_0', 'block_0', 'norm1', 'scale'); None if not a model weight."""
    parts = name.split('/')
    if len(parts) < 3 or parts[0] != 'model' or parts[-1] not in _TF_TO_FLAX_LEAF:
        return None
    return tuple(parts[1:-1]) + (_TF_TO_FLAX_LEAF[parts[-1]],)


def select_model_variables(variables: Mapping[str, Any], *, use_ema: bool = True) -> dict[str, Any]:
    """The `model/...` weights of a TF checkpoint, named without suffix: EMA shadows if present and use_ema.

    Optimiser slots and variables outside `model/` are dropped. If the checkpoint holds any EMA shadow and
    use_ema is set, every model weight must have one (else ValueError naming the weights without).
    """
    raw, ema = {}, {}
    for name, value in variables.items():
        name = name.removesuffix(':0')
        if not name.startswith('model/') or name.endswith(_OPTIMIZER_SLOT_SUFFIXES):
            continue
        if name.endswith(EMA_SUFFIX):
            ema[name.removesuffix(EMA_SUFFIX)] = value
        else:
            raw[name] = value
    if not (use_ema and ema):
        return raw
    without_shadow = sorted(set(raw) - set(ema))
    if without_shadow:
        raise ValueError(f'the checkpoint has EMA shadows but not for {len(without_shadow)} variables: '
                         f'{without_shadow[:10]}; convert with use_ema=False (--nouse_ema) to take the raw weights')
    return ema


def official_tf_to_flax(variables: Mapping[str, Any], model: UNet, *, image_size: int, channels: int = 3,
                        use_ema: bool = True, source_names: Mapping[str, str] | None = None) -> dict:
    """Official TF variables {name: array} -> the Flax params of `model` (numpy, model.param_dtype).

    variables: a TF checkpoint's variables, e.g. {'model/conv_in/W': [3, 3, 3, 128], ...}; EMA shadows are
      preferred (see `select_model_variables`). image_size and channels give the input shape the model is
      built for (attention placement depends on the resolution). source_names optionally maps an official
      name to the name it had in the source, for error messages (used by `diffusers_to_flax`).
    Raises ValueError naming every missing, left-over or mis-shaped variable.
    """
    source_names = source_names or {}
    named = select_model_variables(variables, use_ema=use_ema)
    expected = traverse_util.flatten_dict(abstract_params(model, image_size=image_size, channels=channels))
    flat, unknown = {}, []
    for name, value in named.items():
        path = _official_to_flax_path(name)
        if path is None or path not in expected:
            unknown.append(source_names.get(name, name))
        else:
            flat[path] = (name, value)
    missing = sorted(_flax_path_to_official(path, expected) for path in expected if path not in flat)
    mis_shaped = sorted(f'{source_names.get(name, name)}: {tuple(np.shape(value))}, expected {expected[path].shape}'
                        for path, (name, value) in flat.items() if tuple(np.shape(value)) != expected[path].shape)
    problems = []
    if missing:
        problems.append(f'missing {len(missing)} (official names): {missing}')
    if unknown:
        problems.append(f'left over (not in the model) {len(unknown)}: {sorted(unknown)}')
    if mis_shaped:
        problems.append(f'mis-shaped {len(mis_shaped)}: {mis_shaped}')
    if problems:
        raise ValueError(f'checkpoint does not match UNet(ch={model.ch}, ch_mult={tuple(model.ch_mult)}, '
                         f'num_res_blocks={model.num_res_blocks}, attn_resolutions={tuple(model.attn_resolutions)}, '
                         f'out_ch={model.out_ch}) at {image_size}x{image_size}x{channels}; ' + '; '.join(problems))
    params = {path: np.asarray(value, dtype=model.param_dtype) for path, (_, value) in flat.items()}
    return traverse_util.unflatten_dict(params)


def _flax_path_to_official(path: tuple, flat_params: Mapping[tuple, Any]) -> str:
    """('mid', 'attn_1', 'norm', 'bias') -> 'model/mid/attn_1/norm/beta' (a GroupNorm has a 'scale' sibling)."""
    *scope, leaf = path
    is_norm = tuple(scope) + ('scale',) in flat_params
    tf_leaf = {'kernel': 'W', 'scale': 'gamma', 'bias': 'beta' if is_norm else 'b'}[leaf]
    return '/'.join(['model', *scope, tf_leaf])


def flax_to_official_tf(params: Mapping) -> dict[str, np.ndarray]:
    """Flax params of a UNet -> {official TF variable name: numpy array}; the inverse of `official_tf_to_flax`."""
    flat = traverse_util.flatten_dict(params)
    return {_flax_path_to_official(path, flat): np.asarray(value) for path, value in flat.items()}


# ---------------------------------------------------------------------------------------------------
# diffusers UNet2DModel names -> official names

_DIFFUSERS_RESNET_PART = {'norm1': 'norm1', 'conv1': 'conv1', 'time_emb_proj': 'temb_proj', 'norm2': 'norm2',
                          'conv2': 'conv2', 'conv_shortcut': 'nin_shortcut'}
# Old diffusers attention names (query/key/value/proj_attn, as stored for google/ddpm-cifar10-32) and new ones.
_DIFFUSERS_ATTN_PART = {'group_norm': 'norm', 'query': 'q', 'key': 'k', 'value': 'v', 'proj_attn': 'proj_out',
                        'to_q': 'q', 'to_k': 'k', 'to_v': 'v', 'to_out.0': 'proj_out'}
_DIFFUSERS_RESAMPLE_CONV = ('conv', 'op', 'Conv2d_0')   # names the resampler conv had across diffusers versions
_NORM_PARTS = ('norm1', 'norm2', 'norm', 'norm_out')


def _diffusers_scope_to_official(scope: str, num_levels: int) -> str | None:
    """'up_blocks.0.resnets.2.conv1' -> 'up_{L-1}/block_2/conv1' (up_blocks run from the lowest resolution)."""
    fixed = {'time_embedding.linear_1': 'temb/dense0', 'time_embedding.linear_2': 'temb/dense1',
             'conv_in': 'conv_in', 'conv_norm_out': 'norm_out', 'conv_out': 'conv_out'}
    if scope in fixed:
        return fixed[scope]
    resnet_parts = '|'.join(map(re.escape, _DIFFUSERS_RESNET_PART))
    attn_parts = '|'.join(map(re.escape, _DIFFUSERS_ATTN_PART))
    resample_convs = '|'.join(_DIFFUSERS_RESAMPLE_CONV)
    if m := re.fullmatch(rf'mid_block\.resnets\.([01])\.({resnet_parts})', scope):
        return f'mid/block_{int(m[1]) + 1}/{_DIFFUSERS_RESNET_PART[m[2]]}'
    if m := re.fullmatch(rf'mid_block\.attentions\.0\.({attn_parts})', scope):
        return f'mid/attn_1/{_DIFFUSERS_ATTN_PART[m[1]]}'
    m = re.fullmatch(r'(down|up)_blocks\.(\d+)\.(.+)', scope)
    if m is None or int(m[2]) >= num_levels:
        return None
    direction, rest = m[1], m[3]
    level = int(m[2]) if direction == 'down' else num_levels - 1 - int(m[2])
    if m := re.fullmatch(rf'resnets\.(\d+)\.({resnet_parts})', rest):
        return f'{direction}_{level}/block_{m[1]}/{_DIFFUSERS_RESNET_PART[m[2]]}'
    if m := re.fullmatch(rf'attentions\.(\d+)\.({attn_parts})', rest):
        return f'{direction}_{level}/attn_{m[1]}/{_DIFFUSERS_ATTN_PART[m[2]]}'
    resampler = 'downsamplers' if direction == 'down' else 'upsamplers'
    if re.fullmatch(rf'{resampler}\.0\.({resample_convs})', rest):
        return f'{direction}_{level}/{direction}sample/conv'
    return None


def _torch_to_tf_layout(array: np.ndarray, official_name: str) -> np.ndarray:
    """Torch layouts -> TF: conv OIHW -> HWIO; linear [out, in] (or 1x1 conv [out, in, 1, 1]) -> [in, out]."""
    if not official_name.endswith('/W'):
        return array
    if re.search(r'(conv_in|conv_out|conv1|conv2|sample/conv)/W$', official_name):
        if array.ndim != 4:
            raise ValueError(f'{official_name}: a conv weight must be 4-D [out, in, kh, kw], got {array.shape}')
        return np.transpose(array, (2, 3, 1, 0))
    if array.ndim == 4 and array.shape[2:] == (1, 1):
        array = array[:, :, 0, 0]
    if array.ndim != 2:
        raise ValueError(f'{official_name}: a linear weight must be 2-D [out, in], got {array.shape}')
    return array.T


def diffusers_to_official(state_dict: Mapping[str, Any], num_levels: int) -> tuple[dict, dict]:
    """diffusers UNet2DModel state dict -> ({official TF name: array in TF layout}, {official name: diffusers name}).

    Raises ValueError naming every key that is not a weight of the DDPM UNet2DModel, and every pair of keys
    that alias one weight with different values.
    """
    official, source_names, unknown, conflicting = {}, {}, [], []
    for key, value in state_dict.items():
        scope, _, leaf = key.rpartition('.')
        name = _diffusers_scope_to_official(scope, num_levels)
        if name is None or leaf not in ('weight', 'bias'):
            unknown.append(key)
            continue
        is_norm = name.rsplit('/', 1)[-1] in _NORM_PARTS
        name = 'model/' + name + '/' + {('weight', True): 'gamma', ('bias', True): 'beta', ('weight', False): 'W',
                       ('bias', False): 'b'}[leaf, is_norm]
        array = _torch_to_tf_layout(np.asarray(value), name)
        if name in official:
            if not np.array_equal(official[name], array):
                conflicting.append(f'{source_names[name]} != {key}')
            continue
        official[name], source_names[name] = array, key
    if unknown or conflicting:
        raise ValueError(f'not a DDPM UNet2DModel state dict with {num_levels} levels: '
                         f'unknown keys {sorted(unknown)}, conflicting aliases {conflicting}')
    return official, source_names


def check_diffusers_config(diffusers_config: Mapping[str, Any], model: UNet) -> None:
    """Raise ValueError if a diffusers UNet2DModel config.json describes a network other than `model`."""
    expected = dict(_DIFFUSERS_REQUIRED_CONFIG, layers_per_block=model.num_res_blocks,
                    block_out_channels=[model.ch * m for m in model.ch_mult], out_channels=model.out_ch)
    wrong = {key: (diffusers_config[key], value) for key, value in expected.items()
             if key in diffusers_config and diffusers_config[key] != value}
    if wrong:
        raise ValueError('the diffusers config differs from the official DDPM network / the given config: ' +
                         ', '.join(f'{k}={got!r} (need {want!r})' for k, (got, want) in sorted(wrong.items())))


def diffusers_to_flax(state_dict: Mapping[str, Any], model: UNet, *, image_size: int, channels: int = 3) -> dict:
    """diffusers UNet2DModel state dict {name: array} (torch layouts) -> the Flax params of `model`.

    Names: time_embedding.linear_{1,2}, conv_in, down_blocks.{i}.resnets.{j}.{norm1,conv1,time_emb_proj,norm2,
    conv2,conv_shortcut}, down_blocks.{i}.attentions.{j}.{group_norm,query|to_q,key|to_k,value|to_v,
    proj_attn|to_out.0}, down_blocks.{i}.downsamplers.0.conv, mid_block.{resnets.{0,1},attentions.0},
    up_blocks.{i} (i = 0 is the lowest resolution, official up_{L-1}) with upsamplers.0.conv, conv_norm_out,
    conv_out; each .weight/.bias. Raises ValueError naming missing, unknown or mis-shaped tensors.
    """
    official, source_names = diffusers_to_official(state_dict, len(model.ch_mult))
    return official_tf_to_flax(official, model, image_size=image_size, channels=channels, use_ema=False,
                               source_names=source_names)


# ---------------------------------------------------------------------------------------------------
# Readers and CLI


def read_tf_checkpoint(prefix: str) -> tuple[dict[str, np.ndarray], int]:
    """(model variables {name: array} incl. EMA shadows, global_step or 0) of a TF checkpoint prefix."""
    try:
        import tensorflow as tf
    except ImportError as error:
        raise ImportError('reading an official TF checkpoint needs TensorFlow: pip install tensorflow-cpu') from error
    if not tf.io.gfile.exists(prefix + '.index'):
        raise FileNotFoundError(f'no TF checkpoint at prefix {prefix!r} (expected {prefix}.index); pass the prefix, '
                                f'e.g. diffusion_models_release/diffusion_cifar10_model/model.ckpt-790000')
    reader = tf.train.load_checkpoint(prefix)
    names = reader.get_variable_to_shape_map()
    variables = {name: reader.get_tensor(name) for name in names
                 if name.startswith('model/') and not name.endswith(_OPTIMIZER_SLOT_SUFFIXES)}
    step = int(reader.get_tensor('global_step')) if 'global_step' in names else 0
    return variables, step


def read_diffusers_weights(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """(state dict {name: numpy array}, config.json dict or {}) of a diffusers model directory or weights file.

    A directory may hold the weights directly or in a `unet/` subfolder (a pipeline).
    """
    if os.path.isdir(path):
        candidates = [os.path.join(d, f) for d in (path, os.path.join(path, 'unet')) for f in _DIFFUSERS_WEIGHT_FILES]
        found = [c for c in candidates if os.path.exists(c)]
        if not found:
            raise FileNotFoundError(f'no diffusers weights in {path!r}; looked for {candidates}')
        path = found[0]
    config_path = os.path.join(os.path.dirname(path), 'config.json')
    diffusers_config = {}
    if os.path.exists(config_path):
        with open(config_path) as config_file:
            diffusers_config = json.load(config_file)
    if path.endswith('.safetensors'):
        try:
            from safetensors.numpy import load_file
        except ImportError as error:
            raise ImportError('reading .safetensors needs the safetensors package: pip install safetensors') from error
        return dict(load_file(path)), diffusers_config
    if path.endswith('.bin'):
        try:
            import torch
        except ImportError as error:
            raise ImportError('reading a .bin state dict needs PyTorch: pip install torch (or use the '
                              '.safetensors file with pip install safetensors)') from error
        state = torch.load(path, map_location='cpu', weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}, diffusers_config
    raise ValueError(f'--source={path!r} is neither a TF checkpoint prefix (with a .index file), a directory, '
                     f'a .safetensors nor a .bin file')


def convert(source: str, config, *, use_ema: bool = True) -> tuple[dict, int]:
    """(Flax params, step) for the model of `config` from an official TF checkpoint prefix or diffusers weights."""
    model = create_model(config)
    shape = dict(image_size=config.data.image_size, channels=config.data.channels)
    if os.path.exists(source + '.index'):
        variables, step = read_tf_checkpoint(source)
        return official_tf_to_flax(variables, model, use_ema=use_ema, **shape), step
    state_dict, diffusers_config = read_diffusers_weights(source)
    check_diffusers_config(diffusers_config, model)
    return diffusers_to_flax(state_dict, model, **shape), 0


def main(argv):
    if len(argv) > 1:
        raise ValueError(f'unexpected arguments {argv[1:]}')
    progress.quiet_libraries()
    FLAGS = flags.FLAGS
    params, step = convert(FLAGS.source, FLAGS.config, use_ema=FLAGS.use_ema)
    step = step if FLAGS.step < 0 else FLAGS.step
    checkpoint.save_params_only(FLAGS.workdir, params, FLAGS.config, step)
    count = sum(np.size(leaf) for leaf in jax.tree.leaves(params))
    logging.info('wrote %d parameters from %s to %s (step %d)', count, FLAGS.source, FLAGS.workdir, step)


if __name__ == '__main__':
    flags.DEFINE_string('source', None, 'official TF checkpoint prefix, or diffusers model dir / .safetensors / .bin')
    config_flags.DEFINE_config_file('config', None, 'experiment config file, e.g. configs/cifar10.py')
    flags.DEFINE_string('workdir', None, 'directory to write the checkpoint to')
    flags.DEFINE_bool('use_ema', True, 'take the EMA shadow weights of a TF checkpoint when present')
    flags.DEFINE_integer('step', -1, 'step to record; -1: the checkpoint global_step (TF) or 0 (diffusers)')
    flags.mark_flags_as_required(['source', 'config', 'workdir'])
    app.run(main, argv=config_files.resolve_config_argv(sys.argv))  # --config=ddpm_jax:cifar10
