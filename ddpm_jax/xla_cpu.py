"""XLA:CPU choices that make compiled code faster without changing a single result.

`unroll_threefry()`: JAX lowers its threefry2x32 random-bit generator (behind every `jax.random` draw: dropout
masks, the noise of q_sample and of each sampling step, the initialiser) differently per platform. On GPU and
TPU the 20 rounds are written out; on CPU they are a `while` loop of 5 iterations. XLA:CPU copies the loop's
carried arrays (two uint32 arrays the size of the draw) in every iteration and cannot fuse the rounds with
the code around them, so on CPU each dropout mask of the CIFAR-10 train step costs several passes over memory.
The unrolled form is the same function of the same key and counters (bit-identical draws;
tests/test_xla_cpu.py checks the bits), which XLA fuses into one loop over the elements.

The rule itself is private to JAX (`jax._src.random.threefry2x32`); where a JAX version lacks it, nothing is
changed and the rolled lowering stays (slower, same numbers). `DDPM_JAX_THREEFRY=rolled` in the environment keeps
JAX's rolled CPU lowering (to compare the two, or should a very large program compile too slowly unrolled).
"""
import os

from absl import logging
from jax.extend import random as jex_random
from jax.interpreters import mlir

try:  # private: the unrolled rule JAX registers for GPU and TPU
    from jax._src.random.threefry2x32 import _threefry2x32_lowering_rule as _UNROLLED_THREEFRY_RULE
except ImportError:
    _UNROLLED_THREEFRY_RULE = None

ENV_VAR = 'DDPM_JAX_THREEFRY'


def unroll_threefry() -> bool:
    """Registers JAX's unrolled threefry2x32 lowering (its GPU/TPU default) for the CPU platform (again: no change).

    Returns True when the unrolled lowering is in place, False when this JAX version does not offer it or
    $DDPM_JAX_THREEFRY is 'rolled'.
    Affects functions lowered afterwards (a persistent-cache entry of the rolled form is simply not hit: the
    lowered module, hence the key, differs).
    """
    if os.environ.get(ENV_VAR, 'unrolled') == 'rolled':
        return False
    if _UNROLLED_THREEFRY_RULE is None:
        logging.info('This JAX has no unrolled threefry2x32 lowering to register; keeping the rolled CPU one')
        return False
    mlir.register_lowering(jex_random.threefry2x32_p, _UNROLLED_THREEFRY_RULE, platform='cpu')
    return True
