"""Session-wide test setup: one persistent JAX compilation cache for the whole run and its subprocesses.

The cache lives in pytest's cache directory (`.pytest_cache/d/jax_cache`), so a rerun of the suite loads the
compiled functions of the previous run; $JAX_COMPILATION_CACHE_DIR, when set, is used instead. Subprocesses
(the CLI, multi-host workers) inherit the directory and the thresholds through JAX's environment variables, and
so do pytest-xdist workers (`-n 2`): the controller runs pytest_configure before it starts them, so every worker
finds the variable set and all share one cache (JAX writes each entry atomically, under a file lock).
"""
import os
import tempfile

from ddpm_jax import compile_cache


def pytest_configure(config):
    path = os.environ.get(compile_cache.ENV_VAR)
    if not path:
        cache = getattr(config, 'cache', None)  # None with -p no:cacheprovider
        path = str(cache.mkdir('jax_cache')) if cache is not None else tempfile.mkdtemp(prefix='jax_cache_')
    os.environ.update({compile_cache.ENV_VAR: path,
                       # JAX's default threshold: the suite's thousands of tiny compiles (eager operations,
                       # small jits) cost more to write than to compile again; the subprocesses reuse the rest.
                       compile_cache.MIN_COMPILE_TIME_ENV_VAR: '1',
                       'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1',
                       'JAX_COMPILATION_CACHE_MAX_SIZE': str(compile_cache.MAX_BYTES)})
    compile_cache.enable(path)


def pytest_collection_modifyitems(session, config, items):
    """Modules holding end-to-end (`slow`) tests run first, each module's tests still together and in order.

    pytest-xdist hands tests to its workers in this order, so the run ends on short unit tests instead of one
    worker finishing a long CLI test while the other waits (the tail was ~30 s with the alphabetical order).
    """
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker('slow')}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)   # stable: original order otherwise
