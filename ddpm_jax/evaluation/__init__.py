"""Evaluators, one module per family of modes (in the spirit of big_vision's evaluators/):

* common: the loaded model and its sharded model_fn, the output folder and its settings guard, file writers;
* sample: 'sample'; nll: 'eval', 'rate_distortion'; figures: 'progressive', 'shared_xt', 'interpolate';
  fid: 'fid'; watch: 'watch'.

Each module's MODES maps its mode names to `run(config, workdir)` functions. MODES below names the module of
every mode as a string, so that the command line lists the modes without importing JAX code; `get` imports the
module on first use.
"""
import importlib
from typing import Callable

MODES = {
    'sample': 'ddpm_jax.evaluation.sample',
    'eval': 'ddpm_jax.evaluation.nll',
    'rate_distortion': 'ddpm_jax.evaluation.nll',
    'progressive': 'ddpm_jax.evaluation.figures',
    'shared_xt': 'ddpm_jax.evaluation.figures',
    'interpolate': 'ddpm_jax.evaluation.figures',
    'fid': 'ddpm_jax.evaluation.fid',
    'watch': 'ddpm_jax.evaluation.watch',
}


def get(mode: str) -> Callable:
    """The `run(config, workdir)` function of evaluation mode `mode` (KeyError for a name not in MODES)."""
    return importlib.import_module(MODES[mode]).MODES[mode]
