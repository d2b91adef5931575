"""The score view measured on a trained checkpoint: samplers with their NFE, and the bound vs the ODE bits/dim.

    python -m ddpm_jax.main --config=configs/digits.py --workdir=workdirs/digits          # train first
    python experiments/score_view_digits.py --workdir=workdirs/digits --out=experiments/results/score_view_digits

Runs, through the `sample` and `eval` modes (so every result also lands, resumable, in the workdir's tagged
folders): ancestral over all T steps, respaced ancestral over 100, DDIM (eta 0) over 100, pc (ancestral
predictor + 1 Langevin corrector step, snr 0.16, all T steps), ode (probability-flow ODE, Dopri5 at
sampling.ode_rtol / ode_atol, 1e-5 by default); then the test-split bits/dim of the variational bound and of the ODE (Hutchinson,
1 Rademacher probe, one dequantisation per image). Writes <out>.json, <out>.md (the table) and <out>.png
(the first 64 samples of each sampler side by side). --set key=value overrides the config (repeatable), e.g.
`--set diffusion.num_diffusion_timesteps=20 --set model.ch=32` for a quick run of a small checkpoint.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm_jax import config_files, image_grid  # pylint: disable=wrong-import-position
from ddpm_jax.evaluation import nll as nll_mode  # pylint: disable=wrong-import-position
from ddpm_jax.evaluation import sample as sample_mode  # pylint: disable=wrong-import-position
from experiments import bench_train  # pylint: disable=wrong-import-position  (--set parsing)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def samplers_to_run(few_steps):
    """(label, config.sampling overrides); num_steps 0 = all T."""
    return [
        ('ancestral T', dict(sampler='ancestral', num_steps=0)),
        (f'ancestral {few_steps}', dict(sampler='ancestral', num_steps=few_steps)),
        (f'DDIM {few_steps}', dict(sampler='ddim', num_steps=few_steps, ddim_eta=0.0)),
        ('pc T', dict(sampler='pc', num_steps=0, snr=0.16, n_corrector_steps=1)),
        ('ode', dict(sampler='ode', num_steps=0, ode_solver='adaptive')),
    ]


def _config(args):
    config = config_files.load_config_file(os.path.join(REPO_ROOT, args.config))
    config.update_from_flattened_dict(bench_train.parse_overrides(args.set))
    config.sampling.num_samples = args.num_samples
    config.sampling.batch_size = args.batch_size
    config.eval.batch_size = args.batch_size
    config.eval.num_images = args.num_images
    return config


def side_by_side(grids, labels, path, scale=4):
    """Saves uint8 grids [H_i, W_i, C] next to each other, each under its label."""
    pictures = [np.repeat(np.repeat(g, scale, 0), scale, 1) for g in grids]
    height = max(p.shape[0] for p in pictures) + 16
    width = sum(p.shape[1] for p in pictures) + 8 * (len(pictures) + 1)
    canvas = Image.new('L' if pictures[0].shape[-1] == 1 else 'RGB', (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    left = 8
    for picture, label in zip(pictures, labels):
        image = Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture)
        canvas.paste(image, (left, 16))
        draw.text((left, 2), label, fill=0)
        left += picture.shape[1] + 8
    canvas.save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--workdir', required=True)
    parser.add_argument('--config', default='configs/digits.py')
    parser.add_argument('--out', default='experiments/results/score_view_digits')
    parser.add_argument('--num_samples', type=int, default=256)
    parser.add_argument('--num_images', type=int, default=0, help='test images for the NLLs (0 = all)')
    parser.add_argument('--batch_size', type=int, default=256)
    parser.add_argument('--few_steps', type=int, default=100, help='steps of the respaced ancestral and DDIM runs')
    parser.add_argument('--set', action='append', default=[])
    args = parser.parse_args()
    base = _config(args)
    rows, grids = [], []
    for label, overrides in samplers_to_run(args.few_steps):
        config = base.copy_and_resolve_references()
        config.sampling.update(overrides)
        start = time.perf_counter()
        result = sample_mode.run(config, args.workdir)
        seconds = time.perf_counter() - start
        samples = np.load(result['path'])['samples']
        grids.append(image_grid.make_grid(samples[:64], num_columns=8))
        rows.append(dict(sampler=label, tag=sample_mode.sampler_tag(config), nfe=result.get('nfe_mean'),
                         seconds=round(seconds, 1), num_samples=int(samples.shape[0]), step=result['step']))
        print(rows[-1], flush=True)
    nll = {}
    for likelihood in ('bound', 'ode'):
        config = base.copy_and_resolve_references()
        config.eval.likelihood = likelihood
        summary = nll_mode.run(config, args.workdir)
        nll[likelihood] = {k: summary[k] for k in ('nll_bpd', 'nll_bpd_stderr', 'num_images')}
        nll[likelihood]['nfe_mean'] = summary.get('nfe_mean', base.diffusion.num_diffusion_timesteps)
        print(likelihood, nll[likelihood], flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + '.json', 'w') as f:
        json.dump(dict(workdir=args.workdir, config=args.config, overrides=args.set, samplers=rows, nll=nll), f,
                  indent=2)
    lines = ['| sampler | tag | NFE | seconds (samples) |', '| --- | --- | --- | --- |']
    lines += [f"| {r['sampler']} | `{r['tag']}` | {r['nfe']:.0f} | {r['seconds']} ({r['num_samples']}) |" for r in rows]
    lines += ['', '| test bits/dim | value | NFE per batch | images |', '| --- | --- | --- | --- |']
    lines += [f"| {k} | {v['nll_bpd']:.4f} ± {v['nll_bpd_stderr']:.4f} | {v['nfe_mean']:.0f} | {v['num_images']} |"
              for k, v in nll.items()]
    with open(args.out + '.md', 'w') as f:
        f.write('\n'.join(lines) + '\n')
    side_by_side(grids, [r['sampler'] for r in rows], args.out + '.png')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
