"""JAX's persistent compilation cache, switched on once per process before anything compiles.

A resumed run, every evaluation mode and a rerun of the same command then load the compiled train
step, sampler and initialiser from disk instead of compiling them again (minutes on a CPU for the
CIFAR-10 U-Net). `enable(config.compile_cache_dir)` is called by `ddpm_jax.main` and the experiments.

Safety, as implemented by JAX (jax/_src/cache_key.py, jax/_src/lru_cache.py):
* the cache key hashes the compiled module, the jaxlib version, the backend and its version, XLA_FLAGS and
  the compile options, so one directory serves several jax versions, devices and flag sets side by side;
* with a size limit set (here `MAX_BYTES`), every read and write holds a file lock (the `filelock`
  package), so concurrent processes never see a half-written entry; the least recently used entries are
  evicted past the limit. A failed read or write is a warning, and the function is compiled as usual.
"""
import importlib.util
import os
from typing import Optional

import jax
from jax.experimental.compilation_cache import compilation_cache

DEFAULT_DIR = '~/.cache/ddpm_jax/jax_cache'
# Set by the test suite (tests/conftest.py) or a user to send every process, also subprocesses, to one cache.
ENV_VAR = 'JAX_COMPILATION_CACHE_DIR'
# JAX's own variable for the compile-time threshold; kept when set (the test suite sets it, see enable()).
MIN_COMPILE_TIME_ENV_VAR = 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'
MAX_BYTES = 8 * 1024 ** 3


def resolve_dir(configured: str) -> Optional[str]:
    """The cache directory for config.compile_cache_dir `configured`, or None when disabled.

    '' disables the cache. Otherwise $JAX_COMPILATION_CACHE_DIR wins when set and non-empty, else `configured`
    with ~ and $VARS expanded.
    """
    if not configured:
        return None
    path = os.environ.get(ENV_VAR) or configured
    return os.path.abspath(os.path.expandvars(os.path.expanduser(path)))


def enable(configured: str = DEFAULT_DIR) -> Optional[str]:
    """Points JAX's persistent compilation cache at `resolve_dir(configured)` (or turns it off); returns the path.

    Caches every compiled function whatever its compile time or size (JAX's defaults skip compiles under
    1 s, most of the small ones on a CPU, which a warm start would then compile again), unless
    $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS sets another threshold: the test suite keeps JAX's 1 s, since
    writing thousands of tiny entries costs it more than compiling them again. Best called before the first
    compilation of the process; a later call reopens JAX's cache with the new settings.
    """
    min_compile_time = os.environ.get(MIN_COMPILE_TIME_ENV_VAR, '').strip()
    try:
        min_compile_time_s = float(min_compile_time) if min_compile_time else 0.0
    except ValueError:
        raise ValueError(f'${MIN_COMPILE_TIME_ENV_VAR}={min_compile_time!r} is not a number of seconds; unset it '
                         'to cache every compile') from None
    path = resolve_dir(configured)
    compilation_cache.reset_cache()
    if path is None:
        jax.config.update('jax_enable_compilation_cache', False)
        return None
    if importlib.util.find_spec('filelock') is None:
        raise ImportError("the compilation cache needs the filelock package (pip install filelock); or turn the cache "
                          "off with --config.compile_cache_dir=''")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise OSError(f'cannot create the compilation cache directory {path!r} ({error.strerror}); choose another '
                      "with --config.compile_cache_dir=DIR or turn the cache off with --config.compile_cache_dir=''"
                      ) from error
    jax.config.update('jax_enable_compilation_cache', True)
    jax.config.update('jax_compilation_cache_dir', path)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', min_compile_time_s)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)  # -1: no size threshold, no override
    jax.config.update('jax_compilation_cache_max_size', MAX_BYTES)      # also turns on the file lock
    return path
