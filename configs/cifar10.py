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
    # configs/default.py holds exactly this run's values (official run_cifar.py: data, U-Net, linear betas,
    # eps / fixedlarge / mse, Adam 2e-4 with 5000 warm-up steps, clip 1, EMA 0.9999 without warm-up,
    # batch 128, 800k steps), so nothing differs.
    return load_sibling_config(__file__, 'default.py')
