"""ddpm_jax.host_memory: after keep_freed_memory(), a freed large block is reused without page faults."""
import json
import os
import sys

import pytest

from ddpm_jax import host_memory

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import subprocess_helpers  # noqa: E402  pylint: disable=wrong-import-position

# Allocates, touches and frees a 64 MiB block twice (ctypes malloc, as XLA:CPU's temporaries); reports the minor
# page faults of the second round. glibc maps a block that large with mmap and unmaps it on free, so the second
# round faults in all 16,384 pages again, unless keep_freed_memory() made malloc keep it in the heap.
_FAULTS = """
import ctypes, json, resource, sys
from ddpm_jax import host_memory
applied = host_memory.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def touch(size):
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
touch(64 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch(64 << 20)
print(json.dumps({'applied': applied, 'faults': resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(**env) -> dict:
    result = subprocess_helpers.run([sys.executable, '-c', _FAULTS], env=dict(os.environ, JAX_PLATFORMS='cpu', **env))
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='mallopt tuning is glibc (Linux) only')
def test_freed_block_is_reused_without_page_faults():
    kept = _faults()
    default = _faults(**{host_memory.ENV_VAR: 'default'})
    assert kept['applied'] and not default['applied']
    assert default['faults'] >= 16384 * 0.9, default   # every 4 KiB page of the block mapped again
    assert kept['faults'] < 100, kept                   # reused from the heap


def test_applies_only_where_jax_can_use_nothing_but_the_cpu():
    assert host_memory.cpu_only({'JAX_PLATFORMS': 'cpu'})
    assert not host_memory.keep_freed_memory({host_memory.ENV_VAR: 'default', 'JAX_PLATFORMS': 'cpu'})
