"""Tests of the CPU benchmark scripts' own logic (experiments/bench_cpu_vs_torch.py, bench_startup.py, ab_cpu.py,
ab_in_process.py).

torch and diffusers are optional extras of the benchmark: nothing here imports them. What is checked: the
diffusion tables the PyTorch side computes with equal ddpm_jax's (so both sides do the same sampling and
training arithmetic), and the summaries (medians, ranges, per-round ratios) on hand-made runs.
"""
import json
import os
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, 'experiments'))
import ab_cpu  # pylint: disable=wrong-import-position
import ab_in_process  # pylint: disable=wrong-import-position
import bench_cpu_vs_torch  # pylint: disable=wrong-import-position
import bench_startup  # pylint: disable=wrong-import-position

from ddpm_jax import config_files, diffusion  # pylint: disable=wrong-import-position


def test_torch_side_tables_equal_ddpm_jax():
    config = config_files.load_config_file(os.path.join(REPO_ROOT, 'configs', 'cifar10.py'))
    d = diffusion.diffusion_from_config(config)
    tables = bench_cpu_vs_torch.diffusion_tables(config)
    ours = dict(sqrt_ac=d.sqrt_alphas_cumprod, sqrt_1m_ac=d.sqrt_one_minus_alphas_cumprod,
                sqrt_recip_ac=d.sqrt_recip_alphas_cumprod, sqrt_recipm1_ac=d.sqrt_recipm1_alphas_cumprod,
                coef1=d.posterior_mean_coef1, coef2=d.posterior_mean_coef2, log_variance=d.fixedlarge_log_variance)
    assert sorted(ours) == sorted(tables)
    for name, value in ours.items():
        value = np.asarray(value)
        # ddpm_jax keeps float64 tables cast to the default float dtype: equal up to that rounding.
        np.testing.assert_allclose(tables[name], value, rtol=np.finfo(value.dtype).eps, atol=0, err_msg=name)
    assert tables['sqrt_ac'].shape == (1000,)


def test_check_inputs_are_fixed_and_in_range():
    a, b = bench_cpu_vs_torch.check_inputs(), bench_cpu_vs_torch.check_inputs()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert a['x_start'].shape == (2, 32, 32, 3) and a['x_start'].min() >= -1 and a['x_start'].max() <= 1
    assert list(a['t']) == list(bench_cpu_vs_torch.CHECK_T)


def test_diffusers_config_is_the_official_cifar10_network():
    from ddpm_jax import convert
    from ddpm_jax.models import unet
    config = config_files.load_config_file(os.path.join(REPO_ROOT, 'configs', 'cifar10.py'))
    convert.check_diffusers_config(dict(bench_cpu_vs_torch.DIFFUSERS_CIFAR10,
                                        block_out_channels=list(bench_cpu_vs_torch.DIFFUSERS_CIFAR10[
                                            'block_out_channels'])), unet.create_model(config))
    assert bench_cpu_vs_torch.DIFFUSERS_CIFAR10['dropout'] == config.model.dropout


def test_startup_summary_medians_and_per_round_ratio():
    runs = []
    for round_index, (cold, warm) in enumerate([(100.0, 10.0), (80.0, 12.0), (120.0, 6.0)]):
        for kind, total in (('cold', cold), ('warm', warm)):
            runs.append(dict(case='digits', kind=kind, round=round_index, imports=1.0, state=total / 2,
                             first_step=total))
    runs.append(dict(case='digits', kind='off', round=0, error='timed out'))
    rows = bench_startup.summarize(runs, ['digits'], ['cold', 'warm', 'off'])
    assert [(r['kind'], r['rounds']) for r in rows] == [('cold', 3), ('warm', 3)]
    cold, warm = rows
    assert cold['first_step'] == dict(median=100.0, min=80.0, max=120.0)
    assert warm['first_step'] == dict(median=10.0, min=6.0, max=12.0)
    assert warm['warm_over_cold'] == pytest.approx(dict(median=0.1, min=0.05, max=0.15))
    assert 'warm_over_cold' not in cold
    assert '| digits | warm | 3 |' in bench_startup.format_table(rows)


def test_ab_variant_parsing():
    assert ab_cpu.parse_variant('base=') == ('base', {}, [])
    name, env, extra = ab_cpu.parse_variant("x=XLA_FLAGS='--a=1 --b=2' --set model.fast_variance=True")
    assert (name, env, extra) == ('x', {'XLA_FLAGS': '--a=1 --b=2'}, ['--set', 'model.fast_variance=True'])
    with pytest.raises(SystemExit, match='NAME=WORDS'):
        ab_cpu.parse_variant('no_equals_sign')


def test_in_process_ab_parses_compile_options_and_config_overrides():
    assert ab_in_process.parse_variant('base=') == ('base', {}, [])
    name, options, overrides = ab_in_process.parse_variant(
        'x=xla_cpu_prefer_vector_width=512,xla_cpu_enable_fast_math=False model.fast_variance=True')
    assert (name, overrides) == ('x', ['model.fast_variance=True'])
    assert options == {'xla_cpu_prefer_vector_width': '512', 'xla_cpu_enable_fast_math': False}
    for bad in ('no_equals_sign', '=x', 'x=model.fast_variance'):
        with pytest.raises(ValueError, match='--variant'):
            ab_in_process.parse_variant(bad)


def test_in_process_ab_smoke_run(tmp_path, monkeypatch):
    # Two variants of the tiny config, here in the test process (the malloc setting that the script applies for
    # training is left out). The second variant is the same program, so its compile is a cache hit; what is
    # checked is the interleaving and the report: every round times both, ratios to the first, the table.
    monkeypatch.setattr(ab_in_process.host_memory, 'keep_freed_memory', lambda: None)
    out = tmp_path / 'ab.json'
    result = ab_in_process.main(['--smoke', '--rounds=3', '--variant=base=', '--variant=same=', f'--out={out}'])
    with open(out) as f:
        assert json.load(f)['rows'] == json.loads(json.dumps(result['rows']))
    rows = {row['variant']: row for row in result['rows']}
    assert list(rows) == ['base', 'same'] and result['smoke'] and result['rounds'] == 3
    assert rows['same']['first_loss'] == rows['base']['first_loss']
    assert rows['same']['compile_options'] == {} and rows['same']['overrides'] == []
    for row in rows.values():
        assert len(row['step_ms']) == 3 and all(t > 0 for t in row['step_ms'])
        assert row['step_ms_min'] <= row['step_ms_median'] <= row['step_ms_max']
    assert rows['base']['ratio_to_first'] == [1.0, 1.0, 1.0]
    assert rows['same']['ratio_to_first'] == pytest.approx([a / b for a, b in zip(rows['same']['step_ms'],
                                                                                 rows['base']['step_ms'])])
