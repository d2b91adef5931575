"""Command line: `python -m ddpm_jax.main --config=configs/digits.py --workdir=workdirs/digits [--mode=train]`.

Config values can be overridden, e.g. `--config.training.batch_size=64`. On several hosts, pass
--coordinator_address/--num_processes/--process_id, or --distributed to read the cluster
environment (TPU pods, SLURM, ...); every host runs the same command.
"""
import logging as python_logging
from typing import Callable, Dict

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard logs and samples.')
_MODE = flags.DEFINE_string('mode', 'train', 'What to run; one of the keys of MODES.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Overrides config.data.data_dir (TFDS data_dir or image root).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for multi-host runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process in a multi-host run.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False,
                                 'Initialise jax.distributed from the cluster environment (TPU pod, SLURM, ...).')


def _train(config, workdir: str) -> None:
    from ddpm_jax import train  # pylint: disable=g-import-not-at-top
    train.train(config, workdir)


def _evaluation_mode(name: str) -> Callable:
    def run(config, workdir: str):
        from ddpm_jax import evaluate  # pylint: disable=g-import-not-at-top
        return evaluate.MODES[name](config, workdir)
    return run


# mode name -> function(config, workdir).
MODES: Dict[str, Callable] = {
    'train': _train,
    **{name: _evaluation_mode(name)
       for name in ('sample', 'eval', 'fid', 'rate_distortion', 'progressive', 'shared_xt', 'interpolate')},
}


class _QuietLibraries(python_logging.Filter):
    """Keeps orbax's per-save INFO chatter out of the console (warnings and errors still show)."""

    def filter(self, record: python_logging.LogRecord) -> bool:
        return record.levelno >= python_logging.WARNING or '/orbax/' not in record.pathname


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if _MODE.value not in MODES:
        raise app.UsageError(f'--mode={_MODE.value!r}; allowed: {sorted(MODES)}')
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if _COORDINATOR.value is not None or _NUM_PROCESSES.value is not None or _PROCESS_ID.value is not None \
            or _DISTRIBUTED.value:
        from ddpm_jax import parallel  # pylint: disable=g-import-not-at-top
        parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config = _CONFIG.value
    from ddpm_jax import compile_cache  # pylint: disable=g-import-not-at-top
    compile_cache.enable(config.get('compile_cache_dir', compile_cache.DEFAULT_DIR))
    if _DATA_DIR.value is not None:
        config.data.data_dir = _DATA_DIR.value
    MODES[_MODE.value](config, _WORKDIR.value)


if __name__ == '__main__':
    flags.mark_flags_as_required(['config', 'workdir'])
    app.run(main)
