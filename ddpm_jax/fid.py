"""FID and Inception Score: feature statistics, the Frechet distance, the IS, cached reference stats.

Everything here is float64 numpy on the host except the Inception forward pass, `make_inception_fn`.
Protocol (paper Sec. 4; official tpu_utils.py `EvalWorker`; TTUR's fid.py): features are the FID
Inception-v3's 2048-d pool3 outputs of images in [-1, 1] resized to 299x299; statistics are the mean and the
sample covariance (divisor n - 1);
FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2).
"""

import json
import logging
import os
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import xla_cpu

Stats = Tuple[np.ndarray, np.ndarray, int]


class FeatureStatistics:
    """Streaming mean and covariance of feature vectors, accumulated in float64.

    Batches are merged with Chan et al.'s pairwise update (count, mean, centred sum of outer
    products), which avoids the cancellation of sum(x x^T) - n mu mu^T.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self._mean = np.zeros(dim, np.float64)
        self._centered_sum = np.zeros((dim, dim), np.float64)

    def update(self, features: np.ndarray) -> None:
        """Adds features [b, dim] (any float dtype)."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f'features must have shape [batch, {self.dim}], got {features.shape}.')
        batch = features.shape[0]
        if batch == 0:
            return
        batch_mean = features.mean(axis=0)
        centered = features - batch_mean
        batch_centered_sum = centered.T @ centered
        total = self.count + batch
        delta = batch_mean - self._mean
        self._centered_sum += batch_centered_sum + np.outer(delta, delta) * (self.count * batch / total)
        self._mean += delta * (batch / total)
        self.count = total

    def mean(self) -> np.ndarray:
        """[dim] float64."""
        if self.count == 0:
            raise ValueError('No features were added.')
        return self._mean.copy()

    def covariance(self) -> np.ndarray:
        """[dim, dim] float64 sample covariance (divisor count - 1)."""
        if self.count < 2:
            raise ValueError(f'The sample covariance needs at least 2 feature vectors, got {self.count}.')
        return self._centered_sum / (self.count - 1)

    def result(self) -> Stats:
        """(mean [dim], covariance [dim, dim], count)."""
        return self.mean(), self.covariance(), self.count


def feature_statistics(features: np.ndarray) -> Stats:
    """(mean, sample covariance, n) of features [n, dim] in float64."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f'features must have shape [n, dim], got {features.shape}.')
    stats = FeatureStatistics(features.shape[1])
    stats.update(features)
    return stats.result()


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix; negative eigenvalues -> 0."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    The trace term tr((S1 S2)^1/2) is computed as the sum of the square roots of the eigenvalues of
    the symmetric PSD matrix S1^1/2 S2 S1^1/2 (which has the same eigenvalues as S1 S2), with tiny
    negative eigenvalues from rounding clamped to 0. This is finite and accurate for singular or
    nearly singular covariances (fewer samples than dimensions), where scipy.linalg.sqrtm of the
    non-symmetric S1 S2 can return complex values or lose accuracy.

    Args:
      mu1, mu2: [d] means. sigma1, sigma2: [d, d] covariances.
    Returns:
      The distance (a Python float, >= 0 up to rounding).
    """
    return frechet_distance_from(mu1, sigma1)(mu2, sigma2)


def frechet_distance_from(mu1: np.ndarray, sigma1: np.ndarray) -> Callable[[np.ndarray, np.ndarray], float]:
    """`frechet_distance(mu1, sigma1, mu2, sigma2)` as a function of (mu2, sigma2), with S1^1/2 computed once:
    the distances of one sample set to several references (the train and the test split) share it."""
    mu1, sigma1 = np.asarray(mu1, np.float64), np.asarray(sigma1, np.float64)
    dim = mu1.shape[0] if mu1.ndim == 1 else -1
    _check_gaussian(mu1, sigma1, dim, '1')
    sqrt_sigma1 = _psd_sqrt(sigma1)

    def distance_to(mu2: np.ndarray, sigma2: np.ndarray) -> float:
        mu2, sigma2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
        _check_gaussian(mu2, sigma2, dim, '2')
        product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
        eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
        trace_sqrt = np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)))
        diff = mu1 - mu2
        return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)

    return distance_to


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, dim: int, index: str) -> None:
    """mu [dim] and sigma [dim, dim], finite; else a ValueError naming mu<index> / sigma<index>."""
    if dim < 0 or mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(f'Expected means [d] and covariances [d, d] of one d; got mu{index} {mu.shape}, '
                         f'sigma{index} {sigma.shape}' + (f' (d = {dim} from mu1).' if dim >= 0 else '.'))
    for name, value in ((f'mu{index}', mu), (f'sigma{index}', sigma)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f'{name} has non-finite entries.')


def fid_from_stats(stats1: Stats, stats2: Stats) -> float:
    """`frechet_distance` of two (mean, covariance, count) tuples."""
    return frechet_distance(stats1[0], stats1[1], stats2[0], stats2[1])


def inception_score(logits: np.ndarray, splits: int = 10) -> Tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) over `splits` consecutive chunks, as in OpenAI's code.

    Args:
      logits: [n, classes] Inception logits (softmax is applied here, in float64).
      splits: number of chunks; chunk i is rows [i * n // splits, (i + 1) * n // splits).
    Returns:
      (mean, standard deviation) of the per-chunk scores. With splits=1 the std is 0.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f'logits must have shape [n, classes], got {logits.shape}.')
    if not 1 <= splits <= logits.shape[0]:
        raise ValueError(f'splits must be in [1, n={logits.shape[0]}], got {splits}.')
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))
    n = logits.shape[0]
    scores = []
    for i in range(splits):
        part = log_probs[i * n // splits:(i + 1) * n // splits]
        probs = np.exp(part)
        log_marginal = np.log(np.mean(probs, axis=0))
        kl = np.sum(probs * (part - log_marginal), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def make_inception_fn(model: Any, params: Any, *, batch_size: Optional[int] = None,
                      mesh: Optional[jax.sharding.Mesh] = None) -> Callable[[np.ndarray], Dict[str, np.ndarray]]:
    """A host function on a jitted forward pass: images -> dict(pool=[b, 2048] float64 (, logits=[b, classes])).

    Images are [b, H, W, C] with C in {1, 3}: floats in [-1, 1], or uint8 in [0, 255] (mapped to
    x / 127.5 - 1 in float32). One channel is repeated to three. Both happen on the device, and the
    model resizes to 299x299.

    Args:
      model, params: e.g. `inception.load_inception(path)`.
      batch_size: the images of a call go through the network in chunks of exactly this many rows (the
        last chunk zero-padded, its padding rows dropped from the output), so that one compilation serves
        every call; None: one chunk of the call's own size.
      mesh: a 1-D mesh with the axis `data` (e.g. `parallel.make_mesh(jax.local_devices())`): params are
        replicated on it and every chunk is split over its devices (batch_size must then be a multiple of
        its size). Its devices must belong to this process. None: the default device.
    """
    sharding = None
    if mesh is not None:
        num_devices = mesh.devices.size
        if batch_size is None or batch_size <= 0 or batch_size % num_devices:
            raise ValueError(f'batch_size={batch_size} must be a positive multiple of the mesh size {num_devices}.')
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))
        params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    elif batch_size is not None and batch_size <= 0:
        raise ValueError(f'batch_size={batch_size} must be positive.')

    @xla_cpu.jit
    def forward(params, images):
        x = images.astype(jnp.float32)
        if images.dtype == jnp.uint8:
            x = x / 127.5 - 1.0
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        return model.apply({'params': params}, x)

    def inception_fn(images: np.ndarray) -> Dict[str, np.ndarray]:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f'images must have shape [b, H, W, 1 or 3], got {images.shape}.')
        if images.shape[0] == 0:
            raise ValueError('images is empty: give at least one image.')
        if images.dtype != np.uint8:
            images = images.astype(np.float32)
        chunk = batch_size or images.shape[0]
        pending = []  # every chunk is dispatched before the first result is fetched
        for start in range(0, images.shape[0], chunk):
            rows = images[start:start + chunk]
            real = rows.shape[0]
            if real < chunk:
                rows = np.concatenate([rows, np.zeros((chunk - real,) + rows.shape[1:], rows.dtype)])
            pending.append((forward(params, jax.device_put(rows, sharding)), real))
        outputs = [{key: np.asarray(value, np.float64)[:real] for key, value in out.items()}
                   for out, real in pending]
        return {key: np.concatenate([out[key] for out in outputs]) for key in outputs[0]}

    return inception_fn


BatchSource = Union[Iterable[Any], Callable[[], Iterable[Any]]]


def _images_of(batch: Any) -> np.ndarray:
    """A batch is images [b, H, W, C], or (images, mask [b] bool) as from data.eval_batches."""
    if isinstance(batch, (tuple, list)):
        images, mask = batch
        return np.asarray(images)[np.asarray(mask, bool)]
    return np.asarray(batch)


def compute_statistics(batches: BatchSource, inception_fn: Callable[[np.ndarray], Dict[str, np.ndarray]],
                       *, max_images: Optional[int] = None) -> Stats:
    """Pool-feature statistics of image batches.

    Args:
      batches: an iterable (or a function returning one) of images [b, H, W, C], or of
        (images, mask) pairs whose padding rows (mask False) are dropped.
      inception_fn: e.g. `make_inception_fn(model, params)`.
      max_images: stop after this many images (the rest of the last batch is dropped); None: all.
    Returns:
      (mean [2048], covariance [2048, 2048], number of images), float64.
    """
    if callable(batches):
        batches = batches()
    stats = None
    count = 0
    for batch in batches:
        images = _images_of(batch)
        if max_images is not None:
            images = images[:max_images - count]
        if images.shape[0]:
            features = inception_fn(images)['pool']
            if stats is None:
                stats = FeatureStatistics(features.shape[1])
            stats.update(features)
            count = stats.count
        if max_images is not None and count >= max_images:
            break
    if stats is None:
        raise ValueError('No images to compute statistics from: the batches were empty.')
    return stats.result()


def save_statistics(path: str, stats: Stats, key: str = '') -> None:
    """Writes (mean, covariance, count) and a cache key to `path` (.npz), atomically."""
    mu, sigma, count = stats
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = f'{path}.tmp.{os.getpid()}.npz'
    np.savez(temporary, mu=mu, sigma=sigma, count=np.int64(count), key=np.str_(key))
    os.replace(temporary, path)


def load_statistics(path: str) -> Tuple[Stats, str]:
    """((mean, covariance, count), key) from a file written by `save_statistics`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'FID statistics file {path} does not exist.')
    with np.load(path) as data:
        missing = {'mu', 'sigma', 'count', 'key'} - set(data.files)
        if missing:
            raise ValueError(f'{path} is not a FID statistics file: it lacks {sorted(missing)}.')
        return (data['mu'], data['sigma'], int(data['count'])), str(data['key'])


def cached_reference_statistics(cache_path: str, batches: BatchSource,
                                inception_fn: Callable[[np.ndarray], Dict[str, np.ndarray]], *,
                                key: Union[str, Dict[str, Any]] = '', max_images: Optional[int] = None,
                                write_cache: bool = True) -> Stats:
    """Reference statistics of a dataset split, computed once and cached in `cache_path` (.npz).

    Args:
      cache_path: the .npz cache file.
      batches: as in `compute_statistics`; pass a function returning the iterator to avoid building
        it when the cache is valid.
      inception_fn: e.g. `make_inception_fn(model, params)`.
      key: what the statistics depend on (dataset, split, image size, weights, max_images...), a string
        or a JSON-serialisable dict. A cache written with another key is recomputed and overwritten.
      max_images: as in `compute_statistics`.
      write_cache: False computes without writing the cache (e.g. on all processes but one).
    Returns:
      (mean [2048], covariance [2048, 2048], number of images), float64.
    """
    key_string = key if isinstance(key, str) else json.dumps(key, sort_keys=True)
    if os.path.isfile(cache_path):
        stats, cached_key = load_statistics(cache_path)
        if cached_key == key_string:
            return stats
        logging.info('FID statistics cache %s has key %r, not %r: recomputing.', cache_path, cached_key,
                     key_string)
    stats = compute_statistics(batches, inception_fn, max_images=max_images)
    if write_cache:
        save_statistics(cache_path, stats, key_string)
    return stats
