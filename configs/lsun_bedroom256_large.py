"""LSUN Bedroom 256x256, the large model (Ho et al. 2020, Table 3 "large").

Run (after preparing TFDS lsun/bedroom as array_record, see README):
    python -m ddpm_jax.main --mode=train --config=configs/lsun_bedroom256_large.py \
        --workdir=workdirs/lsun_bedroom256_large --data_dir=~/tensorflow_datasets

Should reproduce FID 4.90 (Table 3) after 1.15M steps. The paper only says the large model has
about 256M parameters "by increasing filter count"; ch=192 gives 255,677,955 with the same
ch_mult, which is the inference made here (the official repo has no config for it). Everything
else as configs/lsun_bedroom256.py (no random flips).
"""
from ddpm_jax.config_files import load_sibling_config


def get_config():
    config = load_sibling_config(__file__, 'lsun_bedroom256.py')
    config.model.ch = 192
    config.training.num_train_steps = 1_150_000
    return config
