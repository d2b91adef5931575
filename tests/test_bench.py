"""Tests of the benchmark scripts (experiments/bench_train.py, bench_sample.py): smoke runs, the settings
column, max-batch search, and the train step's donation switch that bench_train.py --no_donate uses.

The smoke runs go in subprocesses (the scripts are programs; both start at once, the test machine has 2 cores)
and check the JSON they write, the table they print and that their timings are positive; the train run has a
--set override and --no_donate, the sample run an XLA_FLAGS environment, so each row's settings cell is
checked end to end. The max-batch search is checked in-process against a fake setting runner that runs out of
memory above a known batch.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO_ROOT, 'experiments')
sys.path.insert(0, EXPERIMENTS)
import bench_train  # pylint: disable=wrong-import-position
import multihost_worker  # pylint: disable=wrong-import-position
import subprocess_helpers  # pylint: disable=wrong-import-position
import test_xla_cpu  # pylint: disable=wrong-import-position

from ddpm_jax import parallel, train  # pylint: disable=wrong-import-position

TABLE_HEADER = '| bench | config | dtype | batch |'
TABLE_HEADER_END = '| status | settings |'
# A real XLA flag that changes nothing in a one-device CPU process.
HARMLESS_XLA_FLAGS = '--xla_force_host_platform_device_count=1'
TRAIN_SETTINGS = 'model.attention=dot_product, no donation'
SAMPLE_SETTINGS = f'XLA_FLAGS={HARMLESS_XLA_FLAGS}'


@pytest.fixture(scope='module')
def smoke_runs(tmp_path_factory):
    """Runs both scripts in --smoke mode concurrently; returns {name: (completed process, parsed JSON)}.
    Its tests share one pytest-xdist worker (xdist_group 'bench_smoke'), so the runs happen once."""
    out_dir = tmp_path_factory.mktemp('bench')
    env = {key: value for key, value in os.environ.items() if key != 'XLA_FLAGS'}
    env.update(JAX_PLATFORMS='cpu', PYTHONPATH=REPO_ROOT)
    envs = {'train': env, 'sample': dict(env, XLA_FLAGS=HARMLESS_XLA_FLAGS)}
    commands = {
        'train': [sys.executable, os.path.join(EXPERIMENTS, 'bench_train.py'), '--smoke',
                  '--batch_sizes=4,8', '--find_max_batch', '--max_batch_cap=8',
                  '--set', 'model.attention=dot_product', '--no_donate', f'--out={out_dir / "train.json"}'],
        'sample': [sys.executable, os.path.join(EXPERIMENTS, 'bench_sample.py'), '--smoke',
                   f'--out={out_dir / "sample.json"}'],
    }
    processes = {}
    try:
        for name, command in commands.items():
            processes[name] = subprocess_helpers.start(command, cwd=REPO_ROOT, env=envs[name], stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT, text=True)
        runs = {}
        for name, process in processes.items():
            output, _ = subprocess_helpers.communicate(process, what=f'the {name} smoke run')
            assert process.returncode == 0, f'{name} smoke run failed:\n{output[-4000:]}'
            with open(out_dir / f'{name}.json') as f:
                runs[name] = (output, json.load(f))
        return runs
    finally:  # the other run too, when one fails
        subprocess_helpers.kill_groups(list(processes.values()))


@pytest.mark.slow
@pytest.mark.xdist_group('bench_smoke')
def test_train_smoke_writes_rows_with_positive_throughput(smoke_runs):
    output, result = smoke_runs['train']
    assert TABLE_HEADER in output and 'cifar10_smoke' in output
    assert result['benchmark'] == 'train' and result['smoke']
    # The settings: only what --set gave (not --smoke's overrides) and the donation switch, as the last column.
    assert result['set_overrides'] == ['model.attention=dot_product'] and result['xla_flags'] == ''
    assert result['donate_state'] is False and result['settings'] == TRAIN_SETTINGS
    table_lines = [line for line in output.splitlines() if line.startswith('| train |')]
    assert len(table_lines) == 2 and all(line.endswith(f'| ok | {TRAIN_SETTINGS} |') for line in table_lines)
    assert TABLE_HEADER_END in output
    assert result['device']['jax_version'] and result['device']['device_kind']
    rows = result['rows']
    assert [(r['dtype'], r['batch_size'], r['steps_per_dispatch']) for r in rows] == [('float32', 4, 1),
                                                                                      ('float32', 8, 1)]
    for row in rows:
        assert row['status'] == 'ok', row
        assert row['compile_s'] > 0 and row['step_ms_median'] > 0
        assert row['throughput'] > 0 and row['throughput_pipelined'] > 0
        # img/s is the batch over the median step time (the two are reported separately).
        assert row['throughput'] == pytest.approx(row['batch_size'] / (row['step_ms_median'] / 1e3), rel=1e-9)
        assert row['timed_steps'] >= 4
        assert row['num_params'] > 0 and row['image_size'] == 8
        assert row['settings'] == TRAIN_SETTINGS and row['donate_state'] is False
    search = result['max_batch']
    # The grid's batch 8 already reaches the cap: no probe (the search itself is tested with a fake runner below).
    assert search['largest_fit'] == 8 and search['resolved'] and search['probes'] == []


@pytest.mark.slow
@pytest.mark.xdist_group('bench_smoke')
def test_sample_smoke_counts_one_network_evaluation_per_step(smoke_runs):
    output, result = smoke_runs['sample']
    assert TABLE_HEADER in output and 'img-steps/s' in output
    (row,) = result['rows']
    assert row['status'] == 'ok' and row['num_steps'] == 5 and row['batch_size'] == 8
    assert result['set_overrides'] == [] and result['xla_flags'] == HARMLESS_XLA_FLAGS
    assert row['settings'] == SAMPLE_SETTINGS and output.count(f'| ok | {SAMPLE_SETTINGS} |') == 1
    assert row['compile_s'] > 0 and row['throughput'] > 0
    assert row['throughput'] == pytest.approx(8 * 5 / row['call_s_median'], rel=1e-9)
    assert row['step_ms_median'] == pytest.approx(1e3 * row['call_s_median'] / 5, rel=1e-9)


@pytest.mark.slow
@pytest.mark.xdist_group('bench_smoke')
def test_summarize_prints_one_table_with_the_settings_of_every_row(smoke_runs, tmp_path, capsys):
    paths = []
    for name, (_, result) in smoke_runs.items():
        if name == 'train':  # one max-batch probe row, as a GPU run writes
            result = dict(result, max_batch=dict(result['max_batch'], probes=[dict(result['rows'][0], batch_size=16)]))
        path = tmp_path / f'{name}.json'
        path.write_text(json.dumps(result))
        paths.append(str(path))
    # A file written before the settings field: its settings come from its top level (XLA_FLAGS here; the
    # parsed overrides it keeps are --smoke's own, which the label leaves out).
    _, sample = smoke_runs['sample']
    old = {key: value for key, value in sample.items() if key not in ('settings', 'set_overrides', 'xla_flags')}
    old['rows'] = [{key: value for key, value in row.items() if key != 'settings'} for row in sample['rows']]
    (tmp_path / 'old.json').write_text(json.dumps(old))
    bench_train.main(['--summarize', *paths, str(tmp_path / 'old.json'), str(tmp_path / 'absent.json')])
    printed = capsys.readouterr().out
    assert printed.count(TABLE_HEADER) == 1 and printed.count(TABLE_HEADER_END) == 1
    assert printed.count('| train |') == 2 and printed.count('| sample |') == 2
    assert printed.count('| max_batch | cifar10_smoke | float32 | 16 |') == 1 and '(missing: ' in printed
    assert printed.count(f'| {TRAIN_SETTINGS} |') == 3 and printed.count(f'| {SAMPLE_SETTINGS} |') == 2


def test_settings_label_names_every_switch():
    assert bench_train.settings_label({}) == 'default'
    assert bench_train.settings_label(bench_train.parse_overrides(
        ["model.attention='cudnn'", 'model.remat=True', 'model.ch_mult=(1, 2)'])) == (
            'model.attention=cudnn, model.remat=True, model.ch_mult=(1,2)')
    assert bench_train.settings_label({}, xla_flags=' --xla_gpu_enable_command_buffer= ', feed='device',
                                      donate_state=False) == (
        'XLA_FLAGS=--xla_gpu_enable_command_buffer=, feed=device, no donation')
    row = dict(bench='train', config='c', dtype='bfloat16', batch_size=8, steps_per_dispatch=1,
               settings='XLA_FLAGS=--a|b')
    no_settings = {key: value for key, value in row.items() if key != 'settings'}
    lines = bench_train.format_table([row, no_settings]).splitlines()
    # A '|' inside a cell is escaped so the Markdown table keeps its columns; a row without the field shows '–'.
    assert lines[2].endswith('| ok | XLA_FLAGS=--a\\|b |') and lines[3].endswith('| ok | – |')


def _fake_runner(limit, calls):
    def run_setting(base_config, config_name, dtype, batch_size, steps_per_dispatch, **kwargs):
        calls.append(batch_size)
        status = 'ok' if batch_size <= limit else 'oom'
        return dict(bench='train', config=config_name, dtype=dtype, batch_size=batch_size,
                    steps_per_dispatch=steps_per_dispatch, status=status)
    return run_setting


@pytest.mark.parametrize('limit', [8, 100, 203, 1000])
def test_max_batch_search_doubles_then_bisects_to_the_limit(monkeypatch, limit):
    calls = []
    monkeypatch.setattr(bench_train, 'run_setting', _fake_runner(limit, calls))
    monkeypatch.setattr(bench_train, 'memory_stats', lambda: None)  # no estimate: pure doubling from 8
    grid = [dict(dtype='bfloat16', batch_size=8, steps_per_dispatch=1, status='ok')]
    search = bench_train.find_max_batch(None, 'x', 'bfloat16', grid, resolution=8, start=8, cap=4096,
                                        budget_s=1e9, steps=1, feed='device')
    expected = (limit // 8) * 8
    assert search['largest_fit'] == expected and search['resolved']
    assert search['smallest_failure'] - expected <= 8
    doublings = [16 * 2 ** i for i in range(9) if 16 * 2 ** i <= 2 * expected]
    assert calls[:len(doublings)] == doublings
    assert all(b % 8 == 0 for b in calls) and len(calls) <= 2 * 9  # log2(4096 / 8) doublings + bisections


def test_max_batch_search_starts_from_the_memory_estimate(monkeypatch):
    """With bytes_limit known, the first probe is 0.95 * limit / (XLA bytes per image of the grid row)."""
    calls = []
    monkeypatch.setattr(bench_train, 'run_setting', _fake_runner(300, calls))
    monkeypatch.setattr(bench_train, 'memory_stats', lambda: {'bytes_limit': 1000 * 2 ** 20})
    grid = [dict(dtype='bfloat16', batch_size=64, steps_per_dispatch=1, status='ok', xla_bytes=256 * 2 ** 20)]
    search = bench_train.find_max_batch(None, 'x', 'bfloat16', grid, resolution=8, start=8, cap=4096,
                                        budget_s=1e9, steps=1, feed='device')
    assert calls[0] == 232  # floor(0.95 * 1000 / 4 / 8) * 8 = 232
    assert search['estimate_from_xla'] == 232 and search['largest_fit'] == 296 and search['resolved']
    assert calls == [232, 256, 304, 280, 288, 296]  # increments 24, 48 (232 // 8 rounded to 8, doubled), bisection


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match='allowed'):
        bench_train.main(['--smoke', '--dtypes=float16'])
    with pytest.raises(ValueError, match='key.sub=value'):
        bench_train.load_config('configs/cifar10.py', ['model.ch'])
    with pytest.raises(FileNotFoundError, match='configs/cifar10.py'):
        bench_train.load_config('configs/absent.py', [])


@pytest.mark.slow
def test_train_step_donates_the_state_unless_told_not_to():
    """donate_state=True deletes the input state's buffers, False keeps them; the new states are bitwise equal; on
    CPU the step's convolutions are XLA's own and its matmuls take no transposed copies. (The tests' tiny config:
    its donating step is the default one, which other tests compile too.)"""
    config = multihost_worker.tiny_config()
    mesh = parallel.make_mesh()
    batches = parallel.shard_batch(bench_train.synthetic_batches(config, 1, config.training.batch_size), mesh,
                                   batch_axis=1)
    results = {}
    for donate_state in (False, True):
        state = train.create_train_state(config, mesh)
        new_state, metrics = train.make_train_step(config, mesh, donate_state=donate_state)(state, batches)
        deleted = [leaf.is_deleted() for leaf in jax.tree.leaves(state)]
        assert all(deleted) if donate_state else not any(deleted), (donate_state, deleted)
        results[donate_state] = jax.tree.map(np.asarray, (new_state, metrics))
    kept, donated = (jax.tree.leaves(results[flag]) for flag in (False, True))
    assert len(kept) == len(donated) > 4
    for a, b in zip(kept, donated):  # bitwise: the same compiled arithmetic, only buffer aliasing differs
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    assert results[True][0].step == 1 and np.all(np.isfinite(results[True][1]['loss']))
    # The same program (a persistent-cache hit here) runs its convolutions in XLA, not YNNPACK (xla_cpu.jit).
    abstract = train.create_train_state(config, mesh, abstract=True)
    compiled = train.make_train_step(config, mesh).lower(abstract, batches).compile()
    counts = test_xla_cpu.convolutions_by_runtime(compiled.as_text())
    assert counts['ynnpack'] == 0 and counts['xla'] > 10, counts
    # ... and no matmul waits for a transposed copy of its operand (autodiff's own dense gradient has 6 here).
    assert test_xla_cpu.matmuls_fed_by_transposes(compiled.as_text()) == 0
