"""Tests of the CPU benchmark scripts' own logic (experiments/bench_cpu_vs_torch.py, bench_startup.py, ab_cpu.py,
ab_in_process.py, bench_conv_cpu.py).

torch and diffusers are optional extras of the benchmark: nothing here imports them. What is checked: the
diffusion tables the PyTorch side computes with equal ddpm_jax's (so both sides do the same sampling and
training arithmetic), and the summaries (medians, ranges, per-round ratios) on hand-made runs.
"""
import json
import os
import sys

import jax
import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, 'experiments'))
import ab_cpu  # pylint: disable=wrong-import-position
import ab_in_process  # pylint: disable=wrong-import-position
import bench_conv_cpu  # pylint: disable=wrong-import-position
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


def smoke_config(overrides: list):
    """The benchmarks' tiny config (bench_train.SMOKE_OVERRIDES) with further `key=value` overrides."""
    bench_train = bench_conv_cpu.bench_train
    return bench_train.load_config(os.path.join(REPO_ROOT, 'configs', 'cifar10.py'),
                                   bench_train.smoke_override_words() + overrides)[0]


def test_conv_layers_are_every_convolution_of_the_network():
    # The tiny config with two levels (ch 32, ch_mult (1, 2), one res block, 8x8 images), derived from the
    # official architecture (diffusion_tf/models/unet.py): conv_in; level 0: a block 32 -> 32 (two convs) and
    # the stride-2 downsample with TF 'SAME' padding (0 before, 1 after); level 1: a block 32 -> 64; the middle:
    # two blocks 64 -> 64; up level 1: blocks on concat(64, 64) and concat(64, 32 from the downsample), then the
    # subpixel upsample (four 2x2 convs on the 4x4 input, one per output phase); up level 0: blocks on
    # concat(64, 32) and concat(32, 32); conv_out.
    config = smoke_config(['model.ch_mult=(1, 2)'])
    same = ((1, 1), (1, 1))
    expected = {
        ((2, 8, 8, 3), (3, 3, 3, 32), (1, 1), same): 1,
        ((2, 8, 8, 32), (3, 3, 32, 32), (1, 1), same): 4,       # level 0 down block, up level 0's two conv2
        ((2, 8, 8, 32), (3, 3, 32, 32), (2, 2), ((0, 1), (0, 1))): 1,
        ((2, 4, 4, 32), (3, 3, 32, 64), (1, 1), same): 1,
        ((2, 4, 4, 64), (3, 3, 64, 64), (1, 1), same): 7,       # level 1 conv2, middle 4, up level 1's two conv2
        ((2, 4, 4, 128), (3, 3, 128, 64), (1, 1), same): 1,
        ((2, 4, 4, 96), (3, 3, 96, 64), (1, 1), same): 1,
        **{((2, 4, 4, 64), (2, 2, 64, 64), (1, 1), (rows, cols)): 1
           for rows in ((1, 0), (0, 1)) for cols in ((1, 0), (0, 1))},
        ((2, 8, 8, 96), (3, 3, 96, 32), (1, 1), same): 1,
        ((2, 8, 8, 64), (3, 3, 64, 32), (1, 1), same): 1,
        ((2, 8, 8, 32), (3, 3, 32, 3), (1, 1), same): 1,
    }
    layers = bench_conv_cpu.conv_layers(config, 2)
    found = {(tuple(layer['input']), tuple(layer['kernel']), tuple(layer['strides']),
              tuple(tuple(p) for p in layer['padding'])): layer['count'] for layer in layers}
    assert found == expected and len(layers) == len(expected)
    # At batch 2 model.conv3x3='auto' keeps XLA's convolution everywhere (winograd.MIN_MATMUL_SIZE); with
    # 'winograd' the residual blocks' convolutions (3x3, stride 1, padded by 1, 8x8 and 4x4) are Winograd's, and
    # conv_in (3 input channels), conv_out (3 outputs), the downsampling and the 2x2 upsampling stay XLA's.
    assert {layer['algorithm'] for layer in layers} == {'xla'}
    winograd_layers = bench_conv_cpu.conv_layers(smoke_config(['model.ch_mult=(1, 2)', 'model.conv3x3=winograd']), 2)
    assert [{k: v for k, v in layer.items() if k != 'algorithm'} for layer in winograd_layers] == \
        [{k: v for k, v in layer.items() if k != 'algorithm'} for layer in layers]
    block_shapes = {((2, 8, 8, 32), (3, 3, 32, 32)), ((2, 4, 4, 32), (3, 3, 32, 64)), ((2, 4, 4, 64), (3, 3, 64, 64)),
                    ((2, 4, 4, 128), (3, 3, 128, 64)), ((2, 4, 4, 96), (3, 3, 96, 64)),
                    ((2, 8, 8, 96), (3, 3, 96, 32)), ((2, 8, 8, 64), (3, 3, 64, 32))}
    assert [layer['algorithm'] for layer in winograd_layers] == [
        'winograd' if (tuple(layer['input']), tuple(layer['kernel'])) in block_shapes and layer['strides'] == [1, 1]
        else 'xla' for layer in winograd_layers]
    assert [layer['algorithm'] for layer in winograd_layers].count('winograd') == len(block_shapes)
    # With remat every block's convolutions sit inside a nested jaxpr (nn.remat's checkpoint): found all the same.
    assert bench_conv_cpu.conv_layers(smoke_config(['model.ch_mult=(1, 2)', 'model.remat=True']), 2) == layers
    layer = layers[1]   # [2, 8, 8, 32], 3x3 32 -> 32: 2 * B * H * W * 9 * C_in * C_out per convolution, times 3
    assert bench_conv_cpu.gflop(layer) == 3 * 2 * 2 * 8 * 8 * 9 * 32 * 32 / 1e9
    assert bench_conv_cpu.gflop(layers[2]) == 3 * 2 * 2 * 4 * 4 * 9 * 32 * 32 / 1e9   # stride 2: 4x4 outputs


def test_conv_bench_smoke_run_times_every_shape_and_sums_the_step(tmp_path, monkeypatch, capsys):
    # PyTorch made unavailable: the run goes on with the JAX implementations and says so.
    monkeypatch.setattr(bench_conv_cpu, 'import_torch', lambda threads: None)
    out = tmp_path / 'conv.json'
    result = bench_conv_cpu.main(['--smoke', '--batch_sizes=2', '--rounds=2', '--impls=ddpm_jax,xla_default,torch',
                                  f'--out={out}'])
    assert 'PyTorch is not installed' in capsys.readouterr().out
    with open(out) as f:
        assert json.load(f)['batches'] == json.loads(json.dumps(result['batches']))
    assert result['impls'] == ['ddpm_jax', 'xla_default'] and result['torch_version'] is None
    assert result['rounds'] == 2 and result['calls'] == 2
    (batch,) = result['batches']
    rows = batch['rows']
    assert [row['count'] for row in rows] == [1, 8, 2, 1]   # conv_in, 32 -> 32, concat(32, 32) -> 32, conv_out
    for row in rows:
        assert row['disagreement']['ddpm_jax'] == 0.0 and row['disagreement']['xla_default'] < 1e-5
        for impl in result['impls']:
            assert len(row['ms'][impl]) == 2 * 2 and all(t > 0 for t in row['ms'][impl])   # rounds x calls
            assert row['ms_median'][impl] == pytest.approx(float(np.median(row['ms'][impl])))
    summary = batch['summary']
    for impl in result['impls']:
        total = sum(row['count'] * row['ms_median'][impl] for row in rows)
        assert summary['ms'][impl] == pytest.approx(total)
        assert summary['gflop_s'][impl] == pytest.approx(summary['gflop'] / (total / 1e3))
    assert summary['gflop'] == pytest.approx(sum(row['count'] * row['gflop'] for row in rows))


def test_conv_bench_times_winograd_where_the_package_uses_it(monkeypatch):
    # With model.conv3x3=winograd, ddpm_jax runs winograd.conv3x3 for the residual blocks' convolutions and
    # 'eigen' XLA's convolution: the two agree to float32 rounding (Winograd's transforms add ~1e-6 here).
    monkeypatch.setattr(bench_conv_cpu, 'import_torch', lambda threads: None)
    result = bench_conv_cpu.main(['--smoke', '--batch_sizes=2', '--rounds=1', '--calls=1', '--impls=ddpm_jax,eigen',
                                  '--set=model.conv3x3=winograd'])
    rows = result['batches'][0]['rows']
    assert [row['algorithm'] for row in rows] == ['xla', 'winograd', 'winograd', 'xla']
    for row in rows:
        error = row['disagreement']['eigen']
        assert (error == 0.0) if row['algorithm'] == 'xla' else (0.0 < error < 1e-5), row


def test_conv_bench_stops_when_an_implementation_computes_another_function(monkeypatch):
    # The agreement check must fail when a side differs: here xla_default's kernel gradient doubled.
    layer = dict(input=[2, 4, 4, 8], kernel=[3, 3, 8, 8], strides=[1, 1], padding=[[1, 1], [1, 1]], count=1)
    program = bench_conv_cpu.jax_program

    def wrong(layer, impl):
        if impl == 'ddpm_jax':
            return program(layer, impl)
        return jax.jit(lambda *operands: (lambda y, dx, dkernel: (y, dx, 2 * dkernel))(
            *program(layer, impl)(*operands)))
    monkeypatch.setattr(bench_conv_cpu, 'jax_program', wrong)
    with pytest.raises(RuntimeError, match='xla_default and ddpm_jax disagree'):
        bench_conv_cpu.bench_layer(layer, ['ddpm_jax', 'xla_default'], None, rounds=1, seed=0)

