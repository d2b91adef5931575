"""The embedded default: a small U-Net on scikit-learn's handwritten digits (no download, CPU).

    python -m ddpm_jax.main --config=configs/digits.py --workdir=workdirs/digits

What it should reproduce: on 2 CPU cores, 3,000 steps of batch 64 in about ten minutes
(about 7 steps/s; each 64-image grid of 1,000 ancestral steps takes about 45 s). The loss
(L_simple) falls from about 1.0 to about 0.45 by step 100 and about 0.08 by step 2,000.
Grids of EMA samples land in workdirs/digits/samples/step_0001500.png and step_0003000.png:
recognisable 8x8 digits 0-9 on a black background (upscaled 8x with nearest neighbours).
Data: the 1,500 'train' images of sklearn.datasets.load_digits (8x8, 17 grey levels) at
their native size; no flips (digits are not mirror-symmetric). Diffusion as in the paper
(linear betas 1e-4..0.02, T = 1000, eps / fixedlarge / mse).

Variant 'tiny' (`--config=configs/digits.py:tiny`, or `--config=ddpm_jax:digits:tiny`): the same data shrunk to
a few seconds of CPU compute, the one small config of the tests, the multi-host test worker and smoke runs:
a 1-level U-Net (ch 32, one res block), T = 20, batch 8, 2 steps of lr 1e-4, the official EMA rule (decay 0.75),
no sample grids before step 1000. Override further keys as usual (`--config.training.batch_size=16`).
"""
from ddpm_jax.config_files import load_sibling_config


def get_config(variant: str = ''):
    """variant: '' (the run above) or 'tiny' (see the module docstring)."""
    if variant not in ('', 'tiny'):
        raise ValueError(f'configs/digits.py:{variant}: unknown variant; use configs/digits.py or '
                         'configs/digits.py:tiny')
    config = load_sibling_config(__file__, 'default.py')
    config.data.name = 'digits'
    config.data.tfds_name = ''
    config.data.image_size = 8
    config.data.channels = 1
    config.data.random_flip = False       # digits are not mirror-symmetric

    config.model.ch = 64
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.model.dropout = 0.0

    config.optim.lr = 1e-3
    config.optim.warmup_steps = 200
    config.optim.ema_decay = 0.999
    config.optim.ema_warmup = True        # short run: without it the EMA still holds 22% of the init at step 1,500

    config.training.batch_size = 64
    config.training.num_train_steps = 3000
    config.training.checkpoint_every_steps = 1000
    config.training.keep_every = 0
    config.training.sample_every_steps = 1500
    config.training.eval_every_steps = 500

    # --mode=watch beside the run: every checkpoint (1000, 2000, 3000), the NLL bound over the first 64 test
    # images, FID of 1,000 DDIM-100 samples (a proxy) when the Inception weights are installed.
    config.watch.num_samples = 1000
    config.watch.nll_images = 64
    config.watch.loss_batches = 2         # the whole 297-image test split (eval.batch_size 256)
    config.watch.poll_seconds = 10.0
    if variant == 'tiny':
        _shrink_to_tiny(config)
    return config


def _shrink_to_tiny(config):
    """The 'tiny' variant, in place."""
    config.model.ch = 32
    config.model.ch_mult = (1,)
    config.diffusion.num_diffusion_timesteps = 20
    # A small lr keeps the tests' 1e-6 comparisons meaningful: Adam divides by |grad| + eps, so the float32
    # rounding of a near-zero gradient element moves its update by a fraction of lr.
    config.optim.lr = 1e-4
    config.optim.warmup_steps = 2
    config.optim.ema_decay = 0.75
    config.optim.ema_warmup = False     # the official EMA rule
    config.training.batch_size = 8
    config.training.num_train_steps = 2
    config.training.log_every_steps = 1
    config.training.sample_every_steps = 1000
    config.training.num_grid_samples = 0
