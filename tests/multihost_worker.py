"""Helper for the training tests: runs `train.train` in a fresh process with N CPU devices.

    python tests/multihost_worker.py --num_devices=4 --workdir=W --out=params.npz [--overrides=JSON]
        [--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=I]

Writes the final params and EMA params (process 0) to --out as npz ('params/<path>', 'ema/<path>').
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
    """configs/digits.py shrunk for tests: a 1-level U-Net (ch 32), 8x8 digits, T = 20, batch 8, 2 steps.

    overrides: dotted config keys ('training.num_train_steps') -> values.
    """
    config = config_files.load_config_file(os.path.join(REPO_ROOT, 'configs', 'digits.py'))
    config.model.ch = 32
    config.model.ch_mult = (1,)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.model.dropout = 0.0
    config.diffusion.num_diffusion_timesteps = 20
    # A small lr keeps the 1e-6 comparisons meaningful: Adam divides by |grad| + eps, so the float32
    # rounding of a near-zero gradient element moves its update by a fraction of lr.
    config.optim.lr = 1e-4
    config.optim.warmup_steps = 2
    config.optim.ema_decay = 0.75
    config.training.batch_size = 8
    config.training.num_train_steps = 2
    config.training.log_every_steps = 1
    config.training.checkpoint_every_steps = 1000
    config.training.sample_every_steps = 1000
    config.training.num_grid_samples = 0
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split('.')
        for parent in parents:
            node = node[parent]
        node[leaf] = tuple(value) if isinstance(value, list) else value
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--num_devices', type=int, required=True)
    parser.add_argument('--workdir', required=True)
    parser.add_argument('--out', required=True)
    parser.add_argument('--overrides', default='{}')
    parser.add_argument('--coordinator_address')
    parser.add_argument('--num_processes', type=int)
    parser.add_argument('--process_id', type=int)
    args = parser.parse_args()

    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_num_cpu_devices', args.num_devices)
    from ddpm_jax import parallel, train  # pylint: disable=g-import-not-at-top
    if args.coordinator_address:
        parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    state = train.train(tiny_config(**json.loads(args.overrides)), args.workdir)
    host = parallel.to_host({'params': state.params, 'ema': state.ema_params})
    if jax.process_index() == 0:
        np.savez(args.out, **flat_params(host['params'], 'params'), **flat_params(host['ema'], 'ema'),
                 device_count=jax.device_count(), process_count=jax.process_count())


if __name__ == '__main__':
    main()
