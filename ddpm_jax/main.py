"""Command line: `python -m ddpm_jax.main --config=configs/digits.py --workdir=workdirs/digits [--mode=train]`.

Config values can be overridden, e.g. `--config.training.batch_size=64`. On several hosts, pass
--coordinator_address/--num_processes/--process_id, or --distributed to read the cluster
environment (TPU pods, SLURM, ...); every host runs the same command.

Errors caused by the input or the environment (ddpm_jax.errors.UserError) print one line and exit 1; the
traceback goes to workdir/errors.log (and to the console with --verbose). Ctrl-C exits 130.
"""
import datetime
import os
import sys
import traceback
from typing import Callable, Dict

from absl import app
from absl import flags
from ml_collections import config_flags

from ddpm_jax.errors import UserError
from ddpm_jax import evaluation
from ddpm_jax import host_memory
from ddpm_jax import progress

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard logs and samples.')
_MODE = flags.DEFINE_string('mode', 'train', 'What to run; one of the keys of MODES.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Overrides config.data.data_dir (TFDS data_dir or image root).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for multi-host runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process in a multi-host run.')
_RESTART = flags.DEFINE_bool('restart_from_scratch', False,
                              'Train from step 0 in a workdir whose checkpoints are all unreadable or quarantined '
                              '(refused without it). Has no effect while a readable checkpoint exists.')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'Print the traceback of errors caused by the input or environment.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False,
                                 'Initialise jax.distributed from the cluster environment (TPU pod, SLURM, ...).')


def _train(config, workdir: str) -> None:
    from ddpm_jax import train  # pylint: disable=g-import-not-at-top
    train.train(config, workdir, restart_from_scratch=_RESTART.value)


def _evaluation_mode(name: str) -> Callable:
    def run(config, workdir: str):
        return evaluation.get(name)(config, workdir)
    return run


# mode name -> function(config, workdir); the evaluation modes from the registry, imported when run.
MODES: Dict[str, Callable] = {'train': _train, **{name: _evaluation_mode(name) for name in evaluation.MODES}}


def _ignore_event_loop_noise(default_hook: Callable) -> Callable:
    """An unraisable-exception hook that drops "Event loop is closed" (tensorstore callbacks left over from a
    failed checkpoint read or write, collected after asyncio closed their loop: noise that buries the cause)."""
    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == 'Event loop is closed':
            return
        default_hook(unraisable)
    return hook


def _report_user_error(error: BaseException, workdir: str) -> None:
    """Prints `error` as one line on stderr; the traceback goes to workdir/errors.log and, with --verbose, first
    to stderr."""
    where = ''
    if workdir and os.path.isdir(workdir):
        path = os.path.join(workdir, 'errors.log')
        try:
            with open(path, 'a', encoding='utf-8') as log:
                log.write(f'--- {datetime.datetime.now().isoformat(timespec="seconds")}\n'
                          + ''.join(traceback.format_exception(error)))
            where = f'; traceback in {path}'
        except OSError:
            pass
    if _VERBOSE.value:
        traceback.print_exception(error, file=sys.stderr)
    elif not where:
        where = '; rerun with --verbose for the traceback'
    message = ' '.join(str(error).split()) or type(error).__name__
    print(f'Error: {message}{where}', file=sys.stderr, flush=True)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if _MODE.value not in MODES:
        raise app.UsageError(f'--mode={_MODE.value!r}; allowed: {sorted(MODES)}')
    if _MODE.value == 'train':   # CPU-only runs: no page faults for XLA's per-step temporaries (host_memory)
        host_memory.keep_freed_memory()
    progress.quiet_libraries()
    sys.unraisablehook = _ignore_event_loop_noise(sys.unraisablehook)
    if _COORDINATOR.value is not None or _NUM_PROCESSES.value is not None or _PROCESS_ID.value is not None \
            or _DISTRIBUTED.value:
        from ddpm_jax import parallel  # pylint: disable=g-import-not-at-top
        parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config = _CONFIG.value
    from ddpm_jax import compile_cache  # pylint: disable=g-import-not-at-top
    compile_cache.enable(config.compile_cache_dir)
    if _DATA_DIR.value is not None:
        config.data.data_dir = _DATA_DIR.value
    from ddpm_jax import validation  # pylint: disable=g-import-not-at-top
    try:
        validation.validate_config(config, _MODE.value)  # before anything is created on disk
        MODES[_MODE.value](config, _WORKDIR.value)
    except UserError as error:
        _report_user_error(error, _WORKDIR.value)
        sys.exit(1)
    except KeyboardInterrupt as error:
        print(f'Interrupted: {error or "Ctrl-C"}.', file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == '__main__':
    flags.mark_flags_as_required(['config', 'workdir'])
    import sys  # pylint: disable=g-import-not-at-top
    from ddpm_jax import config_files  # pylint: disable=g-import-not-at-top
    app.run(main, argv=config_files.resolve_config_argv(sys.argv))  # --config=ddpm_jax:cifar10
