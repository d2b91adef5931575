"""Tests of ddpm_jax.parallel: mesh, batch sharding, replication, per-device and per-example keys."""
import json
import os
import sys
import textwrap

import jax
import numpy as np
import pytest
import subprocess_helpers

from ddpm_jax import parallel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_and_shardings_on_one_device():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ('data',) and mesh.devices.size == jax.device_count()
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    batch = np.arange(2 * 3, dtype=np.float32).reshape(2, 3)
    sharded = parallel.shard_batch(batch, mesh)
    np.testing.assert_array_equal(parallel.to_host(sharded), batch)
    replicated = parallel.replicate({'w': batch}, mesh)
    assert replicated['w'].sharding.is_fully_replicated
    np.testing.assert_array_equal(parallel.to_host(replicated)['w'], batch)
    assert parallel.check_global_batch(8, mesh) == 8


@pytest.mark.parametrize('batch', [0, -4])
def test_check_global_batch_rejects_non_positive(batch):
    with pytest.raises(ValueError, match=f'batch size {batch} must be a positive multiple of the device count 1'):
        parallel.check_global_batch(batch, parallel.make_mesh())


def test_initialize_distributed_needs_all_three_flags():
    with pytest.raises(ValueError, match='needs all of coordinator_address, num_processes and process_id'):
        parallel.initialize_distributed('127.0.0.1:1234', num_processes=2)


_FOUR_DEVICE_SCRIPT = textwrap.dedent('''
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from ddpm_jax import parallel
    out = {}
    mesh = parallel.make_mesh()
    out['devices'] = mesh.devices.size
    batch = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)
    sharded = parallel.shard_batch(batch, mesh)
    out['shards'] = [np.asarray(s.data).tolist() for s in sorted(sharded.addressable_shards, key=lambda s: s.device.id)]
    stacked = parallel.shard_batch(np.stack([batch, -batch]), mesh, batch_axis=1)
    out['stacked_shard_shape'] = list(stacked.addressable_shards[0].data.shape)
    try:
        parallel.check_global_batch(6, mesh)
    except ValueError as e:
        out['batch_error'] = str(e)

    stream = jax.random.key(7)
    def keys_on(m):
        f = lambda: jax.random.key_data(parallel.example_keys(stream, jnp.int32(3), 8 // m.devices.size))
        return np.asarray(jax.jit(jax.shard_map(f, mesh=m, in_specs=(), out_specs=P('data')))())
    out['keys_equal'] = bool(np.array_equal(keys_on(mesh), keys_on(parallel.make_mesh(jax.devices()[:1]))))
    dev = jax.jit(jax.shard_map(lambda: jax.random.key_data(parallel.device_key(stream, jnp.int32(3)))[None],
                                mesh=mesh, in_specs=(), out_specs=P('data')))()
    expected = np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.fold_in(stream, 3), d)))
                         for d in range(4)])
    out['device_keys_ok'] = bool(np.array_equal(np.asarray(dev), expected))

    # Explicit pmean of per-device gradients of a replicated weight equals the global-batch mean gradient.
    w = parallel.replicate(np.ones(2, np.float32), mesh)
    def grad_mean(w, x):
        g = jax.grad(lambda w: jnp.mean(jnp.sum(w * x ** 2, axis=1)))(parallel.to_varying(w))
        return jax.lax.pmean(g, 'data')
    g = jax.jit(jax.shard_map(grad_mean, mesh=mesh, in_specs=(P(), P('data')), out_specs=P()))(w, sharded)
    out['grad'] = np.asarray(g).tolist()
    print(json.dumps(out))
''')


def test_four_devices():
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
               PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get('PYTHONPATH', '')]))
    result = subprocess_helpers.run([sys.executable, '-c', _FOUR_DEVICE_SCRIPT], env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out['devices'] == 4
    batch = np.arange(16, dtype=np.float64).reshape(8, 2)
    assert out['shards'] == [batch[2 * d:2 * d + 2].tolist() for d in range(4)]  # contiguous slices
    assert out['stacked_shard_shape'] == [2, 2, 2]
    assert 'batch size 6 must be a positive multiple of the device count 4' in out['batch_error']
    assert out['keys_equal'] and out['device_keys_ok']
    np.testing.assert_allclose(out['grad'], (batch ** 2).mean(axis=0), rtol=1e-7)  # float32 sums of 8 terms
