"""LSUN Cat 256x256 (Ho et al. 2020; official run_lsun.py).

Run (after preparing TFDS lsun/cat as array_record, see README):
    python -m ddpm_jax.main --mode=train --config=configs/lsun_cat256.py --workdir=workdirs/lsun_cat256 \
        --data_dir=~/tensorflow_datasets

Should reproduce FID 19.75 (Table 3; 50k EMA samples against the training set) after 1.8M steps
(the released checkpoint is at step 1,761,000). Model and optimiser as configs/celebahq256.py
(113,673,219 parameters, batch 64, lr 2e-5, eps / fixedsmall / mse, no dropout). No random flips,
following the official script's command line for cat (--randflip 0); note that the paper's text
says flips were used for every dataset except LSUN Bedroom. LSUN cat has only a train split.
Data: TFDS lsun is the 2015 LSUN lmdb release (JPEGs of varying size), read here with a
center crop and a Lanczos resize to 256x256; the paper trained on the StyleGAN tfrecords made from
LSUN (cat-r08), so FIDs on this data may differ somewhat. To train on other prepared images
(e.g. exported StyleGAN data) set --config.data.name=folder --data_dir=<root with train/**.png>.
"""
from ddpm_jax.config_files import load_sibling_config


def get_config():
    config = load_sibling_config(__file__, 'celebahq256.py')
    data = config.data
    data.name = 'lsun/cat'
    data.tfds_name = 'lsun/cat'
    data.random_flip = False
    config.training.num_train_steps = 1_800_000
    return config
