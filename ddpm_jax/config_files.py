"""Loading config files (configs/*.py) by path, the way `--config=<file>` does.

Config files are plain Python files with a `get_config()` returning an `ml_collections.ConfigDict`;
they are not a package, so one config builds on another by loading it by path:

    from ddpm_jax.config_files import load_sibling_config
    def get_config():
        config = load_sibling_config(__file__, 'default.py')
        ...
"""
import importlib.util
import os

import ml_collections


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path` (a fresh ConfigDict on every call)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f'config file {path} does not exist')
    module_name = 'ddpm_jax_config_' + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def load_sibling_config(this_file: str, file_name: str) -> ml_collections.ConfigDict:
    """`get_config()` of the config file `file_name` in the same folder as `this_file`."""
    return load_config_file(os.path.join(os.path.dirname(os.path.abspath(this_file)), file_name))
