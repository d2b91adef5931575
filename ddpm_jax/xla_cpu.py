"""XLA:CPU choices that make compiled code faster: the same random bits, the same convolutions up to float32 rounding.

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

`jit(fun, ...)`: `jax.jit` with `compiler_options()`, used for every ddpm_jax program that runs the U-Net or
Inception. XLA:CPU (jaxlib 0.10) hands convolutions, matmuls and reductions to the YNNPACK library by default;
its convolutions, the filter gradients above all, are slower on the U-Net's shapes than XLA's own Eigen
convolutions (up to a third more time per convolution at batch 8-32, the most for filter gradients at 32x32
pixels and batch 32).
On CPU the compile option `xla_cpu_experimental_ynn_fusion_type` is therefore set to YNNPACK's default list less
its convolutions (matmuls and reductions stay with YNNPACK, whose reductions are much faster than XLA's loops).
The results differ from the default's only by float32 summation order. Where a jaxlib does not know the option
or its values, nothing is set (checked once per process by compiling a tiny convolution with it).
`DDPM_JAX_CPU_CONVOLUTIONS=ynnpack` in the environment keeps XLA's default, to compare the two.
"""
import functools
import os

import jax
from absl import logging
from jax.extend import random as jex_random
from jax.interpreters import mlir

try:  # private: the unrolled rule JAX registers for GPU and TPU
    from jax._src.random.threefry2x32 import _threefry2x32_lowering_rule as _UNROLLED_THREEFRY_RULE
except ImportError:
    _UNROLLED_THREEFRY_RULE = None

ENV_VAR = 'DDPM_JAX_THREEFRY'
CONVOLUTIONS_ENV_VAR = 'DDPM_JAX_CPU_CONVOLUTIONS'
# XLA:CPU's default YNNPACK fusion types (jaxlib 0.10.2) less LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
CPU_COMPILER_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}


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


@functools.cache
def _cpu_options_accepted() -> bool:
    """Whether this jaxlib's CPU compiler takes CPU_COMPILER_OPTIONS (compiles a tiny convolution once)."""
    def conv(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    try:
        jax.jit(conv, compiler_options=CPU_COMPILER_OPTIONS).lower(
            jax.ShapeDtypeStruct((1, 4, 4, 2), 'float32'), jax.ShapeDtypeStruct((3, 3, 2, 2), 'float32')).compile()
    except jax.errors.JaxRuntimeError as error:  # how XLA refuses an unknown option or value
        logging.warning('Keeping XLA:CPU\'s default convolutions: this jaxlib refuses %s (%s)', CPU_COMPILER_OPTIONS,
                        str(error).splitlines()[0])
        return False
    return True


def compiler_options(platform: str | None = None) -> dict:
    """The XLA compile options ddpm_jax's programs use on `platform` (default: JAX's default backend).

    CPU: CPU_COMPILER_OPTIONS (convolutions by XLA's Eigen runtime, not YNNPACK; see the module docstring), unless
    $DDPM_JAX_CPU_CONVOLUTIONS is 'ynnpack' or this jaxlib refuses them. Other platforms: none ({}).
    Raises ValueError for a $DDPM_JAX_CPU_CONVOLUTIONS other than 'eigen' or 'ynnpack'.
    """
    choice = os.environ.get(CONVOLUTIONS_ENV_VAR, 'eigen')
    if choice not in ('eigen', 'ynnpack'):
        raise ValueError(f'${CONVOLUTIONS_ENV_VAR}={choice!r}: use eigen (the default) or ynnpack (XLA:CPU\'s own '
                         'default), or unset it.')
    platform = platform or jax.default_backend()
    if platform != 'cpu' or choice == 'ynnpack':
        return {}
    return dict(CPU_COMPILER_OPTIONS) if _cpu_options_accepted() else {}


def jit(fun=None, *, platform: str | None = None, **jit_kwargs):
    """`jax.jit(fun, **jit_kwargs)` compiled with `compiler_options(platform)`; usable as `@jit` or `@jit(...)`."""
    if fun is None:
        return functools.partial(jit, platform=platform, **jit_kwargs)
    return jax.jit(fun, compiler_options=compiler_options(platform) or None, **jit_kwargs)
