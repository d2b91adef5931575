"""CelebA-HQ 256x256 (Ho et al. 2020; official run_celebahq.py).

Run (after preparing TFDS celeb_a_hq/256 as array_record, see README):
    python -m ddpm_jax.main --mode=train --config=configs/celebahq256.py --workdir=workdirs/celebahq256 \
        --data_dir=~/tensorflow_datasets

Should reproduce the paper's CelebA-HQ samples (Fig. 1, 7 and the interpolations) after 0.5M steps;
the paper reports no FID for CelebA-HQ. U-Net with 113,673,219 parameters (ch_mult (1,1,2,2,4,4));
paper speed on TPU v3-8: 2.2 steps/s at batch 64. Diffusion: eps prediction with the posterior
variance beta-tilde (the official v1 GaussianDiffusion, here 'fixedsmall'), lr 2e-5, no dropout.
The TFDS dataset has only a train split (30k images), so evaluation also reads 'train'.
This file is also the base of the LSUN configs, which differ only in data, flips and length.
"""
from ddpm_jax.config_files import load_sibling_config


def get_config():
    config = load_sibling_config(__file__, 'default.py')

    data = config.data
    data.name = 'celeb_a_hq'
    data.tfds_name = 'celeb_a_hq/256'
    data.eval_split = 'train'            # CelebA-HQ has one split
    data.image_size = 256

    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.dropout = 0.0
    config.diffusion.model_var_type = 'fixedsmall'
    config.optim.lr = 2e-5
    config.training.batch_size = 64
    config.training.num_train_steps = 500_000
    return config
