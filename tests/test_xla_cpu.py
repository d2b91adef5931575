"""ddpm_jax.xla_cpu: unrolled threefry gives the same random bits; convolutions run outside YNNPACK, correct."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry_2x32

import ddpm_jax  # noqa: F401  (importing the package registers the unrolled lowering)
from ddpm_jax import xla_cpu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments'))
import profile_step  # noqa: E402  pylint: disable=wrong-import-position
import subprocess_helpers  # noqa: E402  pylint: disable=wrong-import-position
import test_unet  # noqa: E402  pylint: disable=wrong-import-position


def np_threefry2x32(key: tuple, counter: tuple) -> tuple:
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011, Random123), in numpy uint32 arithmetic."""
    rotations = [13, 15, 26, 6, 17, 29, 16, 24]
    k = [np.uint32(key[0]), np.uint32(key[1])]
    k.append(k[0] ^ k[1] ^ np.uint32(0x1BD11BDA))
    x = [np.uint32(counter[0]) + k[0], np.uint32(counter[1]) + k[1]]
    for block in range(5):
        for r in range(4):
            rot = rotations[4 * (block % 2) + r]
            x[0] = x[0] + x[1]
            x[1] = (x[1] << np.uint32(rot)) | (x[1] >> np.uint32(32 - rot))
            x[1] = x[1] ^ x[0]
        x[0] = x[0] + k[(block + 1) % 3]
        x[1] = x[1] + k[(block + 2) % 3] + np.uint32(block + 1)
    return int(x[0]), int(x[1])


def test_unrolled_threefry_matches_the_random123_answers_and_has_no_loop():
    assert xla_cpu.unroll_threefry()   # jax >= 0.10 has the rule; registering again is harmless
    key = jnp.array([0x13198A2E, 0x03707344], jnp.uint32)
    counters = jnp.array([[0x243F6A88, 0, 1, 0xFFFFFFFF], [0x85A308D3, 0, 2, 0xFFFFFFFF]], jnp.uint32)
    lowered = jax.jit(threefry_2x32).lower(key, counters)
    assert 'while' not in lowered.as_text()
    out = np.asarray(lowered.compile()(key, counters))
    with np.errstate(over='ignore'):
        expected = [np_threefry2x32((0x13198A2E, 0x03707344), tuple(int(c) for c in counters[:, i])) for i in range(4)]
    assert [tuple(int(v) for v in out[:, i]) for i in range(4)] == expected
    # The published known answer of Random123's kat_vectors for this key and counter.
    assert expected[0] == (0xC4923A9C, 0x483DF7A0)


_ROLLED_DRAWS = """
import json, jax, jax.numpy as jnp, numpy as np
import ddpm_jax  # with DDPM_JAX_THREEFRY=rolled it leaves JAX's rolled CPU lowering in place
key = jax.random.key(7)
bits = jax.random.bits(key, (3, 5, 7))
mask = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.9, (4, 6, 6, 8))
normal = jax.random.normal(jax.random.split(key)[1], (257,))
text = jax.jit(lambda k: jax.random.bits(k, (3, 5, 7))).lower(key).as_text()
print(json.dumps({'bits': np.asarray(bits).tolist(), 'mask': np.asarray(mask).tolist(),
                  'normal': np.asarray(normal).tolist(), 'rolled': 'while' in text}))
"""


def test_draws_equal_those_of_the_rolled_lowering():
    # The reference: a fresh interpreter with JAX's rolled CPU lowering (kept by the environment switch).
    env = dict(os.environ, **{xla_cpu.ENV_VAR: 'rolled'})
    result = subprocess_helpers.run([sys.executable, '-c', _ROLLED_DRAWS], env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    rolled = json.loads(result.stdout.strip().splitlines()[-1])
    assert rolled['rolled'], 'the reference process should use the rolled lowering'
    key = jax.random.key(7)
    np.testing.assert_array_equal(np.asarray(jax.random.bits(key, (3, 5, 7))), np.array(rolled['bits'], np.uint32))
    np.testing.assert_array_equal(np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 1), 0.9, (4, 6, 6, 8))),
                                  np.array(rolled['mask']))
    np.testing.assert_array_equal(np.asarray(jax.random.normal(jax.random.split(key)[1], (257,)), np.float64),
                                  np.array(rolled['normal'], np.float64))


def _contains(module, instruction, opcode: str) -> bool:
    """Whether `instruction` is an `opcode` instruction or a fusion with one in its body (profile_step's parser)."""
    return any(fused.opcode == opcode for fused in module.fused(instruction))


def matmuls_fed_by_transposes(hlo_text: str) -> int:
    """How many matmuls (dot instructions, or fusions whose body has a dot) of an optimized HLO module's text take
    an operand that a transpose instruction, or a fusion whose body has one, has just produced."""
    module = profile_step.parse_hlo(hlo_text)
    transposing = {name for name, ins in module.instructions.items() if _contains(module, ins, 'transpose')}
    return sum(any(operand in transposing for operand in ins.operands)
               for ins in module.instructions.values() if _contains(module, ins, 'dot'))


def convolutions_by_runtime(hlo_text: str) -> dict:
    """Counts the convolutions of an optimized HLO module's text: {'ynnpack': inside YNNPACK fusions, 'xla': others}."""
    module = profile_step.parse_hlo(hlo_text)
    convolutions = {name for name, ins in module.instructions.items() if ins.opcode == 'convolution'}
    in_ynnpack = {fused.name for ins in module.instructions.values()
                  if ins.opcode == 'fusion' and ins.fusion_kind == 'kCustom' and ins.name.startswith('ynn_fusion')
                  for fused in module.fused(ins) if fused.opcode == 'convolution'}
    return {'ynnpack': len(in_ynnpack), 'xla': len(convolutions - in_ynnpack)}


def test_compiler_options_per_platform_and_switch(monkeypatch):
    monkeypatch.delenv(xla_cpu.CONVOLUTIONS_ENV_VAR, raising=False)
    assert xla_cpu.compiler_options('cpu') == xla_cpu.CPU_COMPILER_OPTIONS   # jaxlib 0.10 takes them
    assert xla_cpu.compiler_options('gpu') == {} and xla_cpu.compiler_options('tpu') == {}
    monkeypatch.setenv(xla_cpu.CONVOLUTIONS_ENV_VAR, 'ynnpack')
    assert xla_cpu.compiler_options('cpu') == {}
    monkeypatch.setenv(xla_cpu.CONVOLUTIONS_ENV_VAR, 'oneDNN')
    with pytest.raises(ValueError, match='eigen .* or ynnpack'):
        xla_cpu.compiler_options('cpu')


def test_convolutions_run_outside_ynnpack_and_equal_a_float64_reference():
    """The forward convolution and both gradients of xla_cpu.jit's program against numpy float64 (independent
    sums over the nine taps); the program's convolutions are XLA's own, none inside a YNNPACK fusion."""
    rng = np.random.default_rng(0)
    x, kernel = rng.standard_normal((2, 8, 8, 16)), rng.standard_normal((3, 3, 16, 24)) / 12
    cotangent = rng.standard_normal((2, 8, 8, 24))
    x, kernel, cotangent = (a.astype(np.float32).astype(np.float64) for a in (x, kernel, cotangent))  # exact inputs

    def loss(x, kernel, cotangent):
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        return jnp.sum(y * cotangent), y

    fn = xla_cpu.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    args = [jnp.asarray(a, jnp.float32) for a in (x, kernel, cotangent)]
    counts = convolutions_by_runtime(fn.lower(*args).compile().as_text())
    assert counts['ynnpack'] == 0 and counts['xla'] >= 3, counts   # forward, input and filter gradient
    (_, y), (dx, dkernel) = fn(*args)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dkernel_ref = np.stack([np.stack([np.einsum('bhwc,bhwo->co', xp[:, i:i + 8, j:j + 8], cotangent)
                                      for j in range(3)]) for i in range(3)])
    dxp = np.zeros_like(xp)
    for i in range(3):
        for j in range(3):
            dxp[:, i:i + 8, j:j + 8] += cotangent @ kernel[i, j].T
    # float32 sums of 144 (forward), 216 (input gradient) and 128 (filter gradient) products; measured 3.4e-7 to
    # 5.5e-7 of the largest value (~5-9 float32 ulp of it), bounded at twice that
    y_ref = test_unet.np_conv(x, {'kernel': kernel, 'bias': 0.0})   # TF 'SAME' padding: 1 on each side for 3x3
    for got, want in ((y, y_ref), (dx, dxp[:, 1:-1, 1:-1]), (dkernel, dkernel_ref)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6 * np.abs(want).max())
