"""Loading config files (configs/*.py) by path, the way `--config=<file>` does.

The experiment files of configs/ are also installed with the package (as ddpm_jax/configs/), so that after a
plain `pip install` they are named `--config=ddpm_jax:cifar10` (`resolve_config_path`); main.py and convert.py
rewrite that form into the installed file's path before the flags are parsed. A variant after a second colon
travels with it (`ddpm_jax:digits:tiny` -> `<path>/digits.py:tiny`): as with ml_collections' config_flags, the text
after the file's ':' is passed to `get_config(variant)`.

Config files are plain Python files with a `get_config()` returning an `ml_collections.ConfigDict`;
they are not a package, so one config builds on another by loading it by path:

    from ddpm_jax.config_files import load_sibling_config
    def get_config():
        config = load_sibling_config(__file__, 'default.py')
        ...
"""
import importlib.util
import os
import typing
from typing import Sequence

import ml_collections

PACKAGED_PREFIX = 'ddpm_jax:'


def packaged_configs_dir() -> str:
    """The folder of the experiment configs: ddpm_jax/configs of an installed package, or configs/ beside the
    package in a source checkout."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(package_dir, 'configs'), os.path.join(os.path.dirname(package_dir), 'configs')):
        if os.path.isfile(os.path.join(candidate, 'default.py')):
            return candidate
    raise FileNotFoundError(f'no configs folder (with default.py) in {package_dir} or beside it; reinstall ddpm_jax')


def resolve_config_path(value: str) -> str:
    """'ddpm_jax:NAME[:VARIANT]' (NAME or NAME.py of the packaged configs, e.g. 'ddpm_jax:cifar10') -> that file's
    path (with ':VARIANT' kept); anything else is returned unchanged (a path, as `--config` takes)."""
    if not value.startswith(PACKAGED_PREFIX):
        return value
    name, colon, variant = value[len(PACKAGED_PREFIX):].partition(':')
    folder = packaged_configs_dir()
    path = os.path.join(folder, name if name.endswith('.py') else name + '.py')
    if not os.path.isfile(path):
        available = sorted(f'{PACKAGED_PREFIX}{f[:-3]}' for f in os.listdir(folder) if f.endswith('.py')
                           and not f.startswith('_'))
        raise FileNotFoundError(f'--config={value}: no such packaged config; available: {", ".join(available)}')
    return path + colon + variant


def resolve_config_argv(argv: Sequence[str]) -> list:
    """argv with every `--config=ddpm_jax:NAME` (or `--config ddpm_jax:NAME`) replaced by the file's path."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith('--config=') and arg[len('--config='):].startswith(PACKAGED_PREFIX):
            out[i] = '--config=' + resolve_config_path(arg[len('--config='):])
        elif i > 0 and out[i - 1] == '--config' and arg.startswith(PACKAGED_PREFIX):
            out[i] = resolve_config_path(arg)
    return out


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path` (a fresh ConfigDict on every call); 'FILE.py:VARIANT' calls
    `get_config('VARIANT')`, as `--config=FILE.py:VARIANT` does (e.g. 'configs/digits.py:tiny')."""
    path, colon, variant = path.rpartition(':') if '.py:' in path else (path, '', '')
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f'config file {path} does not exist')
    module_name = 'ddpm_jax_config_' + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant) if colon else module.get_config()


def load_sibling_config(this_file: str, file_name: str) -> ml_collections.ConfigDict:
    """`get_config()` of the config file `file_name` in the same folder as `this_file`."""
    return load_config_file(os.path.join(os.path.dirname(os.path.abspath(this_file)), file_name))



# The Python types a config value may have for each annotated field type (an int is a valid float).
_ACCEPTED_TYPES = {str: (str,), int: (int,), float: (int, float), bool: (bool,), tuple: (tuple, list)}


def typed_section(cls, section, name: str):
    """An instance of the dataclass `cls` from the keys of one config section, each checked for its type.

    Args:
      cls: a dataclass whose fields are annotated str, int, float, bool or tuple; one key is read per field.
      section: the config section (an ml_collections.ConfigDict, or a dict).
      name: the section's name in messages, e.g. 'diffusion'.

    Returns:
      cls(**values) with ints widened to float for float fields and lists turned into tuples.

    Raises:
      ValueError: a key is missing or has the wrong type; the message names config.<name>.<key>.
    """
    values = {}
    for field_name, field_type in typing.get_type_hints(cls).items():
        key = f'config.{name}.{field_name}'
        if field_name not in section:
            raise ValueError(f'{key} is missing; every key of configs/default.py must be set')
        value = section[field_name]
        accepted = _ACCEPTED_TYPES[field_type]
        if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
            raise ValueError(f'{key}={value!r} must be of type {field_type.__name__}')
        values[field_name] = field_type(value)
    return cls(**values)
