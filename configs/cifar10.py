"""CIFAR-10 32x32, the paper's L_simple run (Ho et al. 2020, Table 1; official run_cifar.py defaults).

Run (after preparing the data, see README):
    python -m ddpm_jax.main --mode=train --config=configs/cifar10.py --workdir=workdirs/cifar10 \
        --data_dir=~/tensorflow_datasets

Should reproduce, from the EMA params after 800k steps (paper: TPU v3-8, 21 steps/s, 10.6 h):
IS 9.46 +- 0.11 and FID 3.17 against the training set (5.24 against the test set) on 50k samples;
NLL <= 3.75 bits/dim on the test set (3.72 train), rate 1.78 + distortion 1.97 bits/dim.
The U-Net has 35,746,307 parameters. Data: TFDS cifar10 train (50k images); the paper used
version 3.0.0, TFDS now ships 3.0.2 (same images).
"""
from ddpm_jax.config_files import load_sibling_config


def get_config():
    config = load_sibling_config(__file__, 'default.py')

    data = config.data
    data.name = 'cifar10'
    data.tfds_name = 'cifar10'
    data.train_split = 'train'
    data.eval_split = 'test'
    data.image_size = 32
    data.channels = 3
    data.random_flip = True

    model = config.model
    model.ch = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1

    diffusion = config.diffusion
    diffusion.beta_schedule = 'linear'
    diffusion.beta_start = 1e-4
    diffusion.beta_end = 0.02
    diffusion.num_diffusion_timesteps = 1000
    diffusion.model_mean_type = 'eps'
    diffusion.model_var_type = 'fixedlarge'
    diffusion.loss_type = 'mse'

    optim = config.optim
    optim.lr = 2e-4
    optim.warmup_steps = 5000
    optim.grad_clip = 1.0
    optim.ema_decay = 0.9999
    optim.ema_warmup = False        # official: no warm-up

    config.training.batch_size = 128
    config.training.num_train_steps = 800_000
    return config
