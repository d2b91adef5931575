"""Helper for the training tests: runs `train.train` in a fresh process with N CPU devices.

    python tests/multihost_worker.py --num_devices=4 --workdir=W --out=params.npz [--overrides=JSON]
        [--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=I]
        [--ready_file=PATH --ready_step=K --step_delay=SECONDS] [--steps_file=PATH]

Writes the final params and EMA params (process 0) to --out as npz ('params/<path>', 'ema/<path>').
Preemption tests: with --ready_file, each process creates PATH.<process index> when it draws the batch
of step --ready_step (it is then training, with JAX's SIGTERM preemption notifier installed) and draws
every later batch --step_delay seconds late, so that few steps pass while a preemption notice propagates;
with --steps_file, each process writes JSON {"start_step", "final_step"} (where its run started, e.g. a
restored checkpoint's step, and ended) to PATH.<process index>.
`tiny_config` is also imported by the test modules.
"""
import argparse
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from ddpm_jax import config_files  # pylint: disable=wrong-import-position


def tiny_config(**overrides):
    """configs/digits.py:tiny (a 1-level U-Net (ch 32), 8x8 digits, T = 20, batch 8, 2 steps) with `overrides`
    (dotted config keys such as 'training.num_train_steps' -> values) applied by ml_collections."""
    config = config_files.load_config_file(os.path.join(REPO_ROOT, 'configs', 'digits.py:tiny'))
    config.update_from_flattened_dict(overrides)
    return config


def flat_params(tree, prefix):
    """{'prefix/a/b': np.ndarray} of a nested dict of arrays."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f'{prefix}/{key}'))
        else:
            flat[f'{prefix}/{key}'] = np.asarray(value)
    return flat


def watch_batches(ready_path=None, ready_step=0, step_delay=0.0):
    """Wraps data.train_batches; returns a dict that receives 'start_step' when training starts.

    With `ready_path`: creates that file when the batch of `ready_step` is drawn, then sleeps
    `step_delay` seconds before each later batch.
    """
    import time  # pylint: disable=g-import-not-at-top
    from ddpm_jax import data  # pylint: disable=g-import-not-at-top
    real_batches = data.train_batches
    seen = {}

    def batches(config, *, start_step=0, **kwargs):
        seen['start_step'] = start_step
        for step, batch in enumerate(real_batches(config, start_step=start_step, **kwargs), start=start_step):
            if ready_path and step == ready_step:
                with open(ready_path, 'w') as f:
                    f.write(str(step))
            if ready_path and step > ready_step:
                time.sleep(step_delay)
            yield batch

    data.train_batches = batches
    return seen


_CACHE_WRITE_PARAMETERS = ['cache_key', 'compile_time_secs', 'module_name', 'backend', 'executable', 'host_callbacks']


def let_this_process_write_the_compilation_cache():
    """Speeds up the tests' multi-process jobs; changes nothing they compute.

    JAX writes persistent-cache entries from process 0 only, and on CPU the other processes' cache keys differ
    from process 0's (their compile options and device topology are hashed), so without this every process but
    0 compiles the initialiser and the step again in every job (~9 s of CPU per job here). This replaces JAX's
    private writer (jax._src.compiler._cache_write) by one that also writes from this process, with JAX's own
    rules otherwise (no entry for programs with host callbacks or below the minimum compile time). When a JAX
    version has no such function, or one with other parameters, nothing is changed.
    """
    import inspect  # pylint: disable=g-import-not-at-top
    from jax._src import compilation_cache, compiler  # pylint: disable=g-import-not-at-top
    from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top
    original = getattr(compiler, '_cache_write', None)
    min_compile_time = getattr(jax_config, 'persistent_cache_min_compile_time_secs', None)
    if (original is None or min_compile_time is None or not hasattr(compilation_cache, 'put_executable_and_time')
            or list(inspect.signature(original).parameters) != _CACHE_WRITE_PARAMETERS):
        return

    def cache_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
        if host_callbacks or compile_time_secs < min_compile_time.value:
            return
        compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend,
                                                  int(compile_time_secs))

    compiler._cache_write = cache_write  # pylint: disable=protected-access


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--num_devices', type=int, required=True)
    parser.add_argument('--workdir', required=True)
    parser.add_argument('--out', required=True)
    parser.add_argument('--overrides', default='{}')
    parser.add_argument('--coordinator_address')
    parser.add_argument('--num_processes', type=int)
    parser.add_argument('--process_id', type=int)
    parser.add_argument('--ready_file')
    parser.add_argument('--ready_step', type=int, default=0)
    parser.add_argument('--step_delay', type=float, default=0.0)
    parser.add_argument('--steps_file')
    args = parser.parse_args()

    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_num_cpu_devices', args.num_devices)
    from ddpm_jax import parallel, train  # pylint: disable=g-import-not-at-top
    if args.coordinator_address:
        parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        if args.process_id != 0:
            let_this_process_write_the_compilation_cache()
    seen = watch_batches(args.ready_file and f'{args.ready_file}.{jax.process_index()}', args.ready_step,
                         args.step_delay)
    state = train.train(tiny_config(**json.loads(args.overrides)), args.workdir)
    if args.steps_file:
        with open(f'{args.steps_file}.{jax.process_index()}', 'w') as f:
            json.dump({'start_step': seen['start_step'], 'final_step': int(parallel.to_host(state.step))}, f)
    host = parallel.to_host({'params': state.params, 'ema': state.ema_params})
    if jax.process_index() == 0:
        np.savez(args.out, **flat_params(host['params'], 'params'), **flat_params(host['ema'], 'ema'),
                 device_count=jax.device_count(), process_count=jax.process_count())


if __name__ == '__main__':
    main()
