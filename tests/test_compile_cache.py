"""Tests of ddpm_jax.compile_cache: directory resolution, reuse across processes, concurrent writers, the switch."""
import json
import os
import subprocess
import sys

import pytest

from ddpm_jax import compile_cache

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh process: enable the cache for argv[1] ('' = off), run one train step of a tiny U-Net, print the
# cache hits and misses JAX recorded and the step's loss and gradient norm (exact decimal strings).
_CHILD = r'''
import json, sys
import jax
from jax import monitoring
from ddpm_jax import compile_cache, data, parallel, train
sys.path.insert(0, 'tests')
import multihost_worker
counts = {'hits': 0, 'misses': 0}
def listen(event, **kwargs):
    if event == '/jax/compilation_cache/cache_hits':
        counts['hits'] += 1
    if event == '/jax/compilation_cache/cache_misses':
        counts['misses'] += 1
monitoring.register_event_listener(listen)
path = compile_cache.enable(sys.argv[1])
config = multihost_worker.tiny_config()
mesh = parallel.make_mesh()
state = train.create_train_state(config, mesh)
batch = parallel.shard_batch(next(data.train_batches(config))[None], mesh, batch_axis=1)
state, metrics = train.make_train_step(config, mesh)(state, batch)
print(json.dumps(dict(counts, path=path, loss=repr(float(metrics['loss'][0])),
                      grad_norm=repr(float(metrics['grad_norm'][0])))))
'''


def _child_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_')}
    env.update(PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get('PYTHONPATH', '')]), **extra)
    env.pop('XLA_FLAGS', None)
    return env


def _start(configured, **env):
    return subprocess.Popen([sys.executable, '-c', _CHILD, configured], cwd=REPO_ROOT, env=_child_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process):
    try:
        out, err = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def test_resolve_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv('HOME', str(tmp_path))
    assert compile_cache.resolve_dir('') is None
    assert compile_cache.resolve_dir('~/c') == str(tmp_path / 'c')
    assert compile_cache.resolve_dir(compile_cache.DEFAULT_DIR) == str(tmp_path / '.cache/ddpm_jax/jax_cache')
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / 'env'))
    assert compile_cache.resolve_dir('~/c') == str(tmp_path / 'env')   # the environment wins ...
    assert compile_cache.resolve_dir('') is None                       # ... but '' still turns the cache off


def test_threshold_is_zero_unless_the_jax_variable_sets_one(monkeypatch):
    import jax
    shared = os.environ[compile_cache.ENV_VAR]   # the suite's cache (conftest.py); the environment keeps it
    try:
        for value, want in (('', 0.0), ('2.5', 2.5), (' 0 ', 0.0)):
            monkeypatch.setenv(compile_cache.MIN_COMPILE_TIME_ENV_VAR, value)
            assert compile_cache.enable('~/elsewhere') == shared
            assert jax.config.jax_persistent_cache_min_compile_time_secs == want
        monkeypatch.delenv(compile_cache.MIN_COMPILE_TIME_ENV_VAR)
        compile_cache.enable('~/elsewhere')
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        monkeypatch.setenv(compile_cache.MIN_COMPILE_TIME_ENV_VAR, 'one second')
        with pytest.raises(ValueError, match=r"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='one second' is not a "):
            compile_cache.enable('~/elsewhere')
    finally:
        monkeypatch.undo()           # the suite's threshold back, then the cache as conftest.py set it up
        compile_cache.enable(shared)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == float(
        os.environ[compile_cache.MIN_COMPILE_TIME_ENV_VAR])


@pytest.mark.slow
def test_second_process_loads_everything_and_computes_the_same(tmp_path):
    """Two concurrent cold processes share an empty cache (the second finds it through the environment variable,
    which overrides the default directory); then a third compiles nothing; all three compute the same loss and
    gradient norm."""
    cache = str(tmp_path / 'cache')
    first, second = [_finish(p) for p in [_start(cache),
                                          _start(compile_cache.DEFAULT_DIR, **{compile_cache.ENV_VAR: cache})]]
    for cold in (first, second):
        assert cold['path'] == cache and cold['misses'] >= 2, cold  # at least the initialiser and the step
    entries = [name for name in os.listdir(cache) if name.endswith('-cache')]
    assert len(entries) >= 2
    before = sorted(os.listdir(cache))
    warm = _finish(_start(cache))
    assert warm['misses'] == 0 and warm['hits'] >= 2, warm
    assert sorted(os.listdir(cache)) == before   # nothing rewritten
    for run in (second, warm):
        assert (run['loss'], run['grad_norm']) == (first['loss'], first['grad_norm'])


def test_empty_directory_turns_the_cache_off(tmp_path):
    """compile_cache.enable('') returns None and JAX then neither reads nor writes the cache (no cache request is
    recorded for a fresh compilation); enabling it again restores it. In this process, with the suite's cache."""
    import jax
    import jax.numpy as jnp
    from jax import monitoring
    shared = os.environ[compile_cache.ENV_VAR]
    events = []

    def listen(event, **kwargs):
        if event.startswith('/jax/compilation_cache/'):
            events.append(event)

    def compile_fresh(seed):   # a function JAX has not seen: its compilation asks the cache, when one is on
        return jax.jit(lambda x: jnp.sin(x) * seed).lower(jnp.ones(3)).compile()

    monitoring.register_event_listener(listen)
    try:
        compile_cache.enable(shared)
        compile_fresh(1.0)
        assert '/jax/compilation_cache/compile_requests_use_cache' in events   # the check can see a request
        events.clear()
        assert compile_cache.enable('') is None
        compile_fresh(2.0)
        assert '/jax/compilation_cache/compile_requests_use_cache' not in events, events
        assert not any(event.endswith(('cache_hits', 'cache_misses')) for event in events), events
        assert os.environ[compile_cache.ENV_VAR] == shared    # '' wins over the environment without changing it
    finally:
        monitoring.unregister_event_listener(listen)
        compile_cache.enable(shared)
    assert jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir == shared


def test_unusable_directory_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    (tmp_path / 'file').write_text('')
    with pytest.raises(OSError, match="cannot create the compilation cache directory .*compile_cache_dir=''"):
        compile_cache.enable(str(tmp_path / 'file' / 'cache'))


def test_missing_filelock_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(compile_cache.importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(ImportError, match="pip install filelock.*compile_cache_dir=''"):
        compile_cache.enable(str(tmp_path / 'c'))


def test_initialiser_compiles_no_forward_pass_and_matches_flax_init():
    """The step-0 state's params equal Flax's own `model.init` bit for bit (so checkpoints and converted weights
    keep their meaning), and its compiled function holds no convolution or matmul: jit drops the forward pass
    that `init` traces, only the random initialisers are compiled."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ddpm_jax import parallel, train
    from ddpm_jax.models import unet
    sys.path.insert(0, os.path.join(REPO_ROOT, 'tests'))
    import multihost_worker  # pylint: disable=g-import-not-at-top
    config = multihost_worker.tiny_config(**{'model.attn_resolutions': (8,)})
    mesh = parallel.make_mesh()
    state = train.create_train_state(config, mesh)
    key = jax.random.fold_in(jax.random.key(config.seed), 0)  # the init stream (train.py)
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    reference = jax.jit(lambda k: unet.create_model(config).init({'params': k}, x, t, train=False))(key)['params']
    flat_state = jax.tree_util.tree_leaves_with_path(parallel.to_host(state.params))
    flat_reference = jax.tree_util.tree_leaves_with_path(reference)
    assert [p for p, _ in flat_state] == [p for p, _ in flat_reference]
    for (path, got), (_, want) in zip(flat_state, flat_reference):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))
    hlo = train.make_init_fn(config, mesh).lower().as_text()
    assert 'stablehlo.convolution' not in hlo and 'stablehlo.dot_general' not in hlo
    assert 'threefry' in hlo or 'stablehlo.shift_right_logical' in hlo  # the random bits are there
