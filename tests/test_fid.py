"""Tests of ddpm_jax.fid: streaming statistics, the Frechet distance, the Inception Score, stats caching.

References are float64 numpy/scipy re-derivations written here. For the nearly singular case the
reference trace term uses the low-rank identity: with S1 = A^T A and S2 = B^T B (A [n1, d], B [n2, d]
the centred features / sqrt(n - 1)), the nonzero eigenvalues of S1 S2 are the squared singular values
of A B^T, so tr((S1 S2)^1/2) is the nuclear norm of A B^T, computed without any matrix square root.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import subprocess_helpers
from flax import linen as nn

from ddpm_jax import fid


def _features(rng, n, dim, scale=1.0, offset=0.0):
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return offset + scale * rng.normal(size=(n, dim)) @ mixing


def test_streaming_statistics_match_numpy():
    rng = np.random.default_rng(0)
    features = _features(rng, 257, 16, offset=1e3)  # A large mean: cancellation-prone for sum(x x^T).
    stats = fid.FeatureStatistics(16)
    for start, stop in [(0, 1), (1, 64), (64, 64), (64, 200), (200, 257)]:
        stats.update(features[start:stop])
    mu, sigma, count = stats.result()
    assert count == 257
    np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-14)
    want = np.cov(features, rowvar=False, ddof=1)
    np.testing.assert_allclose(sigma, want, rtol=0, atol=1e-11 * np.abs(want).max())
    with pytest.raises(ValueError, match=r'\[batch, 16\]'):
        stats.update(np.zeros((3, 15)))
    with pytest.raises(ValueError, match='at least 2'):
        fid.feature_statistics(np.zeros((1, 4)))


def _reference_fid_sqrtm(mu1, sigma1, mu2, sigma2):
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real)


def reference_fid_low_rank(x1, x2):
    """Frechet distance of the Gaussians fitted to features x1 [n1, d] and x2 [n2, d], float64, by the low-rank
    identity of the module docstring (also test_evaluate's reference for fid mode)."""
    a = (x1 - x1.mean(axis=0)) / np.sqrt(len(x1) - 1)
    b = (x2 - x2.mean(axis=0)) / np.sqrt(len(x2) - 1)
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    diff = x1.mean(axis=0) - x2.mean(axis=0)
    return float(diff @ diff + np.sum(a * a) + np.sum(b * b) - 2 * trace_sqrt)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    x1, x2 = _features(rng, 400, 32), _features(rng, 300, 32, scale=1.3, offset=0.2)
    mu1, sigma1, _ = fid.feature_statistics(x1)
    mu2, sigma2, _ = fid.feature_statistics(x2)
    got = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    want = _reference_fid_sqrtm(mu1, np.cov(x1, rowvar=False), mu2, np.cov(x2, rowvar=False))
    assert got == pytest.approx(want, rel=1e-10)
    assert got == pytest.approx(reference_fid_low_rank(x1, x2), rel=1e-10)


def test_frechet_distance_nearly_singular_covariances():
    # 40 and 50 samples in 128 dimensions: both covariances have rank < 128 (eigenvalues ~1e-16).
    rng = np.random.default_rng(2)
    x1, x2 = _features(rng, 40, 128), _features(rng, 50, 128, offset=0.05)
    mu1, sigma1, _ = fid.feature_statistics(x1)
    mu2, sigma2, _ = fid.feature_statistics(x2)
    got = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    want = reference_fid_low_rank(x1, x2)
    assert np.isfinite(got)
    # Rounding-level eigenvalues (~1e-16 |S|) of the rank-deficient S1 enter through their square
    # roots (~1e-8 |S|^1/2); measured relative error 2e-8, the same as scipy's sqrtm here.
    assert got == pytest.approx(want, rel=1e-7)


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(3)
    features = np.abs(_features(rng, 300, 512))  # n < d: a singular covariance, as in small FID runs.
    mu, sigma, _ = fid.feature_statistics(features)
    value = fid.frechet_distance(mu, sigma, mu, sigma)
    assert abs(value) < 1e-6 * np.trace(sigma)


def test_distances_from_one_set_to_several_equal_the_single_distances():
    rng = np.random.default_rng(4)
    x1, x2, x3 = _features(rng, 60, 24), _features(rng, 50, 24, scale=0.7), _features(rng, 40, 24, offset=0.3)
    (mu1, sigma1, _), (mu2, sigma2, _), (mu3, sigma3, _) = (fid.feature_statistics(x) for x in (x1, x2, x3))
    distance_to = fid.frechet_distance_from(mu1, sigma1)
    for x, mu, sigma in ((x2, mu2, sigma2), (x3, mu3, sigma3)):
        assert distance_to(mu, sigma) == pytest.approx(reference_fid_low_rank(x1, x) if len(x) < 24 else
                                                      _reference_fid_sqrtm(mu1, sigma1, mu, sigma), rel=1e-10)
        assert distance_to(mu, sigma) == fid.frechet_distance(mu1, sigma1, mu, sigma)
    with pytest.raises(ValueError, match='sigma2'):
        distance_to(mu2, sigma2[:5, :5])


def test_frechet_distance_rejects_bad_inputs():
    with pytest.raises(ValueError, match='sigma2'):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match='sigma1'):
        fid.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match='non-finite'):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.array([0.0, np.nan]), np.eye(2))


def _reference_inception_score(logits, splits):
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    scores = []
    n = len(probs)
    for i in range(splits):
        part = probs[(i * n // splits):((i + 1) * n // splits), :]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return np.mean(scores), np.std(scores)


@pytest.mark.parametrize('n,splits', [(1000, 10), (997, 10), (50, 1)])
def test_inception_score_matches_reference(n, splits):
    logits = 3.0 * np.random.default_rng(4).normal(size=(n, 1008))
    mean, std = fid.inception_score(logits, splits=splits)
    want_mean, want_std = _reference_inception_score(logits, splits)
    assert mean == pytest.approx(want_mean, rel=1e-12)
    assert std == pytest.approx(want_std, rel=1e-9, abs=1e-12)


def test_inception_score_of_confident_uniform_predictions_is_the_class_count():
    # Each sample certain of one class, classes equally frequent in every split: IS = number of classes.
    logits = 200.0 * np.eye(20)[np.tile(np.arange(20), 10)]
    mean, std = fid.inception_score(logits, splits=10)
    assert mean == pytest.approx(20.0, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match='splits'):
        fid.inception_score(logits, splits=201)


def _fake_inception_fn(calls):
    """Features = per-channel means and mean squares of the images (6-d), counting the images seen."""
    def inception_fn(images):
        calls.append(len(images))
        images = np.asarray(images, np.float64)
        return {'pool': np.concatenate([images.mean(axis=(1, 2)), (images ** 2).mean(axis=(1, 2))], axis=1)}
    return inception_fn


def test_cached_reference_statistics(tmp_path):
    rng = np.random.default_rng(5)
    images = rng.uniform(-1, 1, size=(10, 4, 4, 3)).astype(np.float32)
    padded = np.concatenate([images, np.zeros((2, 4, 4, 3), np.float32)])
    batches = lambda: iter([(padded[:4], np.ones(4, bool)), (padded[4:8], np.ones(4, bool)),
                            (padded[8:], np.array([True, True, False, False]))])
    calls = []
    path = str(tmp_path / 'stats' / 'cifar10_train.npz')
    key = {'dataset': 'cifar10', 'split': 'train'}
    mu, sigma, count = fid.cached_reference_statistics(path, batches, _fake_inception_fn(calls), key=key)
    features = _fake_inception_fn([])(images)['pool']
    assert count == 10 and calls == [4, 4, 2]
    np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-12, atol=1e-15)
    # Second call: read from the cache; the batch function is never called.
    cached = fid.cached_reference_statistics(path, lambda: pytest.fail('recomputed'), _fake_inception_fn(calls),
                                             key=key)
    assert calls == [4, 4, 2] and cached[2] == 10
    np.testing.assert_array_equal(cached[1], sigma)
    assert fid.load_statistics(path)[1] == json.dumps(key, sort_keys=True)
    # Another key recomputes; max_images truncates inside a batch.
    _, _, count = fid.cached_reference_statistics(path, batches, _fake_inception_fn(calls),
                                                  key='first 6', max_images=6)
    assert count == 6 and calls[3:] == [4, 2]
    assert fid.load_statistics(path)[0][2] == 6


def test_make_inception_fn_converts_uint8_and_grayscale():
    class MeanPool(nn.Module):
        @nn.compact
        def __call__(self, x):
            return {'pool': jnp.mean(x, axis=(1, 2))}

    inception_fn = fid.make_inception_fn(MeanPool(), {})
    gray = np.array([0, 255, 51], np.uint8).reshape(3, 1, 1, 1)
    got = inception_fn(gray)['pool']
    assert got.dtype == np.float64 and got.shape == (3, 3)
    np.testing.assert_allclose(got, np.repeat(gray.reshape(3, 1) / 127.5 - 1.0, 3, axis=1), atol=1e-6)
    with pytest.raises(ValueError, match='1 or 3'):
        inception_fn(np.zeros((1, 4, 4, 2), np.float32))


class _MeanAndMax(nn.Module):
    """A stand-in network: per-channel means and maxima (6-d 'pool') of the 3-channel input."""

    @nn.compact
    def __call__(self, x):
        return {'pool': jnp.concatenate([jnp.mean(x, axis=(1, 2)), jnp.max(x, axis=(1, 2))], axis=-1)}


def test_make_inception_fn_chunks_pad_and_drop_the_padding():
    images = np.random.default_rng(6).integers(0, 256, size=(10, 5, 5, 3), dtype=np.uint8)
    as_float = images.astype(np.float64) / 127.5 - 1.0
    want = np.concatenate([as_float.mean(axis=(1, 2)), as_float.max(axis=(1, 2))], axis=1)
    for batch_size in (None, 4, 10, 16):   # one chunk, 4 + 4 + 2 (padded), exact, one padded chunk
        got = fid.make_inception_fn(_MeanAndMax(), {}, batch_size=batch_size)(images)['pool']
        assert got.shape == (10, 6)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)   # float32 x / 127.5 - 1
    with pytest.raises(ValueError, match='batch_size=0'):
        fid.make_inception_fn(_MeanAndMax(), {}, batch_size=0)
    with pytest.raises(ValueError, match='empty'):
        fid.make_inception_fn(_MeanAndMax(), {})(np.zeros((0, 5, 5, 3), np.float32))


_TWO_DEVICE_SCRIPT = '''
import sys
import numpy as np
import jax
assert jax.device_count() == 2, jax.devices()
sys.path.insert(0, sys.argv[1])
from test_fid import _MeanAndMax
from ddpm_jax import fid, parallel
mesh = parallel.make_mesh(jax.local_devices())
images = np.random.default_rng(7).uniform(-1, 1, size=(7, 4, 4, 1)).astype(np.float32)
got = fid.make_inception_fn(_MeanAndMax(), {}, batch_size=4, mesh=mesh)(images)['pool']
x = np.repeat(images.astype(np.float64), 3, axis=-1)
np.testing.assert_allclose(got, np.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=1), atol=1e-6)
try:
    fid.make_inception_fn(_MeanAndMax(), {}, batch_size=3, mesh=mesh)
    raise AssertionError('an odd batch on 2 devices was accepted')
except ValueError as error:
    assert 'multiple of the mesh size 2' in str(error), error
print('ok')
'''


def test_make_inception_fn_splits_chunks_over_a_two_device_mesh():
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu',
               PYTHONPATH=os.pathsep.join([root, os.environ.get('PYTHONPATH', '')]))
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess_helpers.run([sys.executable, '-c', _TWO_DEVICE_SCRIPT, tests_dir],
                                  env=env, cwd=root)
    assert proc.returncode == 0 and proc.stdout.strip().endswith('ok'), proc.stderr[-3000:]
