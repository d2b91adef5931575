"""Host memory on CPU-only runs: keep the memory XLA frees mapped, so that the next step does not fault it in again.

Every execution of a compiled XLA:CPU program allocates its temporary buffers and frees them at the end (the
CIFAR-10 train step: ~0.6 GiB at batch 8, ~2.7 GiB at batch 32). glibc's malloc serves blocks that large with
mmap and unmaps them on free, so each step maps that memory afresh: 160,000 (batch 8) to 700,000 (batch 32) page
faults per step, each page zeroed by the kernel. `keep_freed_memory()` sets glibc's malloc (mallopt) to take every
block from one heap and never return freed memory to the system: after the first step, no page faults, and the
train step is ~3% (batch 8) to ~8% (batch 32) faster (experiments/PERF_NOTES.md, lever C15).

The price: the process keeps its peak heap for its lifetime (what a training process needs anyway), and with one
arena XLA's multi-threaded compiler contends for the heap: compiling is ~17% slower (digits train step 9.8 s
instead of 8.3 s) and a warm start ~1-2 s longer. That pays off over a training run, so `ddpm_jax.main` applies it
for --mode=train only. It is applied only where JAX can use nothing but the CPU (no GPU or TPU plugin installed,
or JAX_PLATFORMS=cpu), only with glibc, and `DDPM_JAX_MALLOC=default` in the environment leaves malloc as it is.
"""
import ctypes
import importlib.util
import os
import sys

ENV_VAR = 'DDPM_JAX_MALLOC'
# glibc's mallopt parameters (malloc.h) and the values set: one arena (the main heap, no per-thread mmap'd heaps),
# no mmap'd blocks, never trim (-1 is SIZE_MAX as glibc reads it), 1 GiB of headroom per heap extension.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 1 << 30))
_ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin', 'jax_rocm7_plugin', 'libtpu')


def cpu_only(environ=os.environ) -> bool:
    """Whether JAX can use only the CPU: JAX_PLATFORMS=cpu, or no GPU/TPU plugin installed (no backend started)."""
    if environ.get('JAX_PLATFORMS', '').strip().lower() == 'cpu':
        return True
    return not any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def keep_freed_memory(environ=os.environ) -> bool:
    """Applies `SETTINGS` with glibc's mallopt when the run is CPU-only; returns whether they were applied.

    Call it before JAX starts its CPU backend (its worker threads then share the one heap), e.g. first thing in a
    command line. Nothing happens on other C libraries or systems, with accelerators, or with DDPM_JAX_MALLOC=default.
    """
    if environ.get(ENV_VAR, '') == 'default' or not sys.platform.startswith('linux') or not cpu_only(environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
