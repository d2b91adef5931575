"""Device mesh, shardings, multi-host setup and per-device randomness.

Every device of every host forms one 1-D mesh with the axis `data`. Training and sampling
functions are written for one device and compiled with `jax.jit(jax.shard_map(...))` over that
mesh: the state is replicated (`P()`), batches are split along their leading axis (`P('data')`),
and cross-device reductions are explicit `lax.pmean` / `lax.psum` over `DATA_AXIS`.
The same code runs on one CPU, N fake CPU devices, several GPUs and a TPU pod.
"""
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
    """Joins this process to a multi-host job; call before any other JAX call.

    With `coordinator_address` ('host:port'), `num_processes` and `process_id` given, the job is
    set up from them (any cluster, or several processes on one machine). With none given,
    `jax.distributed.initialize()` reads the cluster environment (Cloud TPU pods, SLURM,
    Open MPI, Kubernetes/JobSet); a single machine outside such a cluster needs no call at all.
    """
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError(
            'initialize_distributed needs all of coordinator_address, num_processes and process_id, or none '
            f'(got coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, '
            f'process_id={process_id!r}).')
    if all(given):
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()
    logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(devices: Optional[list] = None) -> Mesh:
    """A 1-D mesh named `data` over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of arrays held whole on every device (the train state)."""
    return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of arrays split along their leading axis over the `data` axis (batches)."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_global_batch(global_batch: int, mesh: Mesh) -> int:
    """Returns the per-device batch; ValueError when `global_batch` does not split evenly."""
    num_devices = mesh.devices.size
    if global_batch <= 0 or global_batch % num_devices:
        raise ValueError(
            f'batch size {global_batch} must be a positive multiple of the device count {num_devices} '
            f'({jax.process_count()} process(es) x {jax.local_device_count()} local devices); '
            f'set --config.training.batch_size to a multiple of {num_devices}.')
    return global_batch // num_devices


def shard_batch(local_batch: np.ndarray, mesh: Mesh, *, batch_axis: int = 0) -> jax.Array:
    """Assembles the global batch from each host's slice.

    Args:
      local_batch: this process's contiguous slice of the global batch, e.g. [B / process_count, H, W, C]
        (or [K, B / process_count, H, W, C] with `batch_axis=1` for K stacked steps).
      mesh: the `data` mesh.
      batch_axis: the axis that is split over devices.
    Returns:
      A global jax.Array of the global shape, split over `data` along `batch_axis`.
    """
    spec = P(*([None] * batch_axis + [DATA_AXIS]))
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Puts a pytree of host values (identical on every process) whole on every device of the mesh."""
    sharding = replicated_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
    """Fetches a pytree of global arrays (sharded or replicated, any number of processes) as numpy."""
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(fetch, tree)


def to_varying(tree: Any) -> Any:
    """Marks replicated values as per-device inside shard_map (so their gradients stay per device).

    Without it, the gradient of a replicated input is summed over `data` implicitly; with it, the
    per-device gradient is returned and the reduction is the explicit `lax.pmean` of the step.
    """
    if hasattr(jax.lax, 'pcast'):
        return jax.tree.map(lambda x: jax.lax.pcast(x, DATA_AXIS, to='varying'), tree)
    return jax.tree.map(lambda x: jax.lax.pvary(x, DATA_AXIS), tree)  # jax < 0.10


def device_key(stream_key: jax.Array, step: jax.Array) -> jax.Array:
    """Per-device key `fold_in(fold_in(stream_key, step), device)`; call inside shard_map over `data`."""
    return jax.random.fold_in(jax.random.fold_in(stream_key, step), jax.lax.axis_index(DATA_AXIS))


def example_keys(stream_key: jax.Array, step: jax.Array, local_batch: int) -> jax.Array:
    """Keys `fold_in(fold_in(stream_key, step), global_example_index)`: [local_batch] per device.

    Call inside shard_map over `data`. The draws for example i of the global batch do not depend on
    how many devices share the batch, so a step gives the same result on 1 or N devices.
    """
    step_key = jax.random.fold_in(stream_key, step)
    first = jax.lax.axis_index(DATA_AXIS) * local_batch
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(first + jnp.arange(local_batch))
