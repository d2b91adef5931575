"""Tests of experiments/profile_step.py: the HLO-text parser, the classifier and the event aggregation on a
hand-written GPU-style module and trace (cuDNN / cuBLAS custom calls, a command buffer, derived and overhead
lines, a CUDA-graph span), and smoke runs of the script on the CPU for train and sample.

The smoke runs go in one subprocess (the script is a program; JAX_PLATFORMS=cpu) and check the JSON it writes
and the table it prints: the categories add up to the kernel time, convolutions and (train) the optimizer
have time, and every event is counted once in a category or reported as skipped / container.
"""
import json
import os
import sys
from types import SimpleNamespace

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO_ROOT, 'experiments')
sys.path.insert(0, EXPERIMENTS)
import profile_step as ps  # pylint: disable=wrong-import-position
import subprocess_helpers  # pylint: disable=wrong-import-position

# A GPU-style optimized module: a command buffer (called computation) holding a GroupNorm+swish fusion and a
# cuDNN backward-filter convolution; a forward convolution and a cuBLAS gemm in the entry; an attention
# softmax fusion; an Adam fusion known by its optax stack frame; a transpose-only fusion.
GPU_HLO = '''HloModule jit_device_steps, is_scheduled=true, entry_computation_layout={()->f32[]}

FileNames
1 "/venv/lib/python3.11/site-packages/optax/_src/transform.py"
2 "/repo/ddpm_jax/models/unet.py"

FunctionNames
1 "scale_by_adam.<locals>.update_fn"
2 "ResnetBlock.__call__"

FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=149 end_line=149 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=1}

%fused_norm (param_0: f32[128,32,32,128]) -> bf16[128,32,32,128] {
  %param_0 = f32[128,32,32,128]{3,2,1,0} parameter(0)
  %logistic.1 = f32[128,32,32,128]{3,2,1,0} logistic(%param_0), metadata={op_name="jit(device_steps)/jvp(UNet)/down_0/block_0/jit(silu)/logistic" stack_frame_id=2}
  ROOT %convert.1 = bf16[128,32,32,128]{3,2,1,0} convert(%logistic.1), metadata={op_name="jit(device_steps)/jvp(UNet)/down_0/block_0/convert_element_type"}
}

%fused_adam (param_0.1: f32[3,3,128,128], param_1.1: f32[3,3,128,128]) -> f32[3,3,128,128] {
  %param_0.1 = f32[3,3,128,128]{3,2,1,0} parameter(0)
  %param_1.1 = f32[3,3,128,128]{3,2,1,0} parameter(1)
  ROOT %multiply.1 = f32[3,3,128,128]{3,2,1,0} multiply(%param_0.1, %param_1.1), metadata={op_name="jit(device_steps)/mul" stack_frame_id=1}
}

%fused_softmax (param_0.3: f32[128,256,256]) -> f32[128,256,256] {
  %param_0.3 = f32[128,256,256]{2,1,0} parameter(0)
  ROOT %exponential.1 = f32[128,256,256]{2,1,0} exponential(%param_0.3), metadata={op_name="jit(device_steps)/jvp(UNet)/mid/attn_1/exp"}
}

%fused_transpose (param_0.2: bf16[128,32,32,128]) -> bf16[128,128,32,32] {
  %param_0.2 = bf16[128,32,32,128]{3,2,1,0} parameter(0)
  ROOT %transpose.1 = bf16[128,128,32,32]{3,2,1,0} transpose(%param_0.2), dimensions={0,3,1,2}
}

%command_buffer (p0: f32[128,32,32,128], p1: bf16[128,32,32,128]) -> (f32[3,3,128,128], u8[0]) {
  %p0 = f32[128,32,32,128]{3,2,1,0} parameter(0)
  %p1 = bf16[128,32,32,128]{3,2,1,0} parameter(1)
  %loop_convert_fusion.3 = bf16[128,32,32,128]{3,2,1,0} fusion(%p0), kind=kLoop, calls=%fused_norm, metadata={op_name="jit(device_steps)/jvp(UNet)/down_0/block_0/convert_element_type"}
  ROOT %cudnn-conv-bw-filter.2 = (f32[3,3,128,128]{3,2,1,0}, u8[0]{0}) custom-call(bf16[128,32,32,128]{3,2,1,0} %loop_convert_fusion.3, bf16[128,32,32,128]{3,2,1,0} %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(device_steps)/transpose(jvp(UNet))/down_0/block_0/conv1/conv_general_dilated"}, backend_config={"cudnn_conv_backend_config":{"activation_mode":"kNone"}}
}

ENTRY %main.9 (x: f32[128,32,32,128], w: bf16[3,3,128,128], a: bf16[128,512], b: bf16[512,256], g: f32[3,3,128,128], dy: bf16[128,32,32,128], s: f32[128,256,256]) -> f32[] {
  %x = f32[128,32,32,128]{3,2,1,0} parameter(0)
  %w = bf16[3,3,128,128]{3,2,1,0} parameter(1)
  %a = bf16[128,512]{1,0} parameter(2)
  %b = bf16[512,256]{1,0} parameter(3)
  %g = f32[3,3,128,128]{3,2,1,0} parameter(4)
  %dy = bf16[128,32,32,128]{3,2,1,0} parameter(5)
  %s = f32[128,256,256]{2,1,0} parameter(6)
  %call.1 = (f32[3,3,128,128]{3,2,1,0}, u8[0]{0}) call(%x, %dy), to_apply=%command_buffer
  %cudnn-conv.1 = (bf16[128,32,32,128]{3,2,1,0}, u8[0]{0}) custom-call(bf16[128,32,32,128]{3,2,1,0} %dy, bf16[3,3,128,128]{3,2,1,0} %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(device_steps)/jvp(UNet)/down_0/block_0/conv1/conv_general_dilated"}
  %cublas-gemm.1 = (bf16[128,256]{1,0}, s8[4194304]{0}) custom-call(bf16[128,512]{1,0} %a, bf16[512,256]{1,0} %b), custom_call_target="__cublas$gemm", metadata={op_name="jit(device_steps)/jvp(UNet)/temb/dense1/dot_general"}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %input_exp_fusion.2 = f32[128,256,256]{2,1,0} fusion(%s), kind=kInput, calls=%fused_softmax
  %loop_multiply_fusion.4 = f32[3,3,128,128]{3,2,1,0} fusion(%g, %g), kind=kLoop, calls=%fused_adam, metadata={op_name="jit(device_steps)/mul" stack_frame_id=1}
  %transpose_fusion.5 = bf16[128,128,32,32]{3,2,1,0} fusion(%dy), kind=kLoop, calls=%fused_transpose
  ROOT %constant.1 = f32[] constant(0)
}
'''

CONV_MACS = 128 * 32 * 32 * 128 * 9 * 128  # one 3x3 conv, 128 -> 128 channels, batch 128 at 32x32


def _event(name, start, duration, **stats):
    return SimpleNamespace(name=name, start_ns=start, duration_ns=duration, stats=list(stats.items()))


def _line(name, events):
    return SimpleNamespace(name=name, events=events)


def _fake_gpu_profile():
    """Two steps on one GPU: per step a forward conv, a gemm, the softmax, the Adam fusion, the transpose,
    and a command buffer (CUDA graph) whose kernels carry the graph's 'call.1' as their hlo_op: the
    norm fusion (found by kernel name) and a cuDNN wgrad kernel (found by its name pattern), enclosed by a
    graph span; plus an event of another module, a kernel without stats (known by its exact name), a memcpy
    without hlo_op on a second stream (overlapping a kernel), and lines that must not be summed."""
    ours = dict(hlo_module='jit_device_steps')
    stream, copies, xla_ops = [], [], []
    for step in range(2):
        t = step * 1000.0
        stream += [
            _event('sm90_xmma_fprop_implicit_gemm_bf16', t + 0, 100, hlo_op='cudnn-conv.1', **ours),
            _event('nvjet_tst_128x256', t + 100, 40, hlo_op='cublas-gemm.1', **ours),
            _event('input_exp_fusion_2', t + 140, 30, hlo_op='input_exp_fusion.2', **ours),
            _event('loop_multiply_fusion_4', t + 170, 20, hlo_op='loop_multiply_fusion.4', **ours),
            _event('transpose_fusion_5', t + 190, 10, hlo_op='transpose_fusion.5', **ours),
            _event('CudaGraphExec', t + 200, 300, cuda_graph_exec_id=7),  # span around the graph's kernels
            _event('loop_convert_fusion_3', t + 210, 50, hlo_op='call.1', **ours),
            _event('sm90_xmma_wgrad_implicit_gemm_bf16', t + 260, 200, hlo_op='call.1', **ours),
            _event('loop_add_fusion', t + 600, 5, hlo_op='add.9', hlo_module='jit_other'),
            _event('transpose_fusion_5', t + 605, 5),  # no annotation: attributed by its exact kernel name
        ]
        copies.append(_event('MemcpyH2D', t + 450, 15))  # overlaps the wgrad kernel by 10 ns
        xla_ops += [_event('cudnn-conv.1', t + 0, 100), _event('cublas-gemm.1', t + 100, 40)]
    device = SimpleNamespace(name='/device:GPU:0', lines=[
        _line('Stream #13(Kernel)', stream), _line('Stream #14(MemcpyH2D)', copies), _line('XLA Ops', xla_ops), _line('XLA Modules', []),
        _line('CUPTI overhead', [_event('overhead', 0, 999)])])
    host = SimpleNamespace(name='/host:CPU', lines=[_line('python', [_event('step', 0, 2000, hlo_op='x')])])
    return SimpleNamespace(planes=[host, device])


@pytest.fixture(scope='module')
def gpu_module():
    return ps.parse_hlo(GPU_HLO)


def test_parser_reads_opcodes_targets_fusions_and_frames(gpu_module):
    module = gpu_module
    assert module.name == 'jit_device_steps'
    conv = module.instructions['cudnn-conv-bw-filter.2']
    assert conv.opcode == 'custom-call' and conv.custom_call_target == '__cudnn$convBackwardFilter'
    assert conv.operands == ('loop_convert_fusion.3', 'p1') and conv.computation == 'command_buffer'
    assert conv.op_name.endswith('conv1/conv_general_dilated')
    fusion = module.instructions['loop_convert_fusion.3']
    assert fusion.opcode == 'fusion' and fusion.fusion_kind == 'kLoop' and fusion.called == ('fused_norm',)
    assert module.instructions['call.1'].called == ('command_buffer',)
    assert [i.name for i in module.fused(fusion)] == ['param_0', 'logistic.1', 'convert.1']
    assert module.instructions['logistic.1'].frame == ps.Frame('/repo/ddpm_jax/models/unet.py',
                                                               'ResnetBlock.__call__', 149)
    assert module.instructions['multiply.1'].frame.function == 'scale_by_adam.<locals>.update_fn'
    assert module.instructions['constant.1'].opcode == 'constant'


def test_classifier_on_gpu_style_instructions(gpu_module):
    module = gpu_module
    expected = {
        'cudnn-conv.1': ps.CONV_FORWARD, 'cudnn-conv-bw-filter.2': ps.CONV_BACKWARD_FILTER,
        'cublas-gemm.1': ps.GEMM, 'input_exp_fusion.2': ps.ATTENTION, 'loop_multiply_fusion.4': ps.OPTIMIZER,
        'loop_convert_fusion.3': ps.NORM_ACTIVATION, 'transpose_fusion.5': ps.DATA_MOVEMENT,
    }
    assert {name: ps.classify(module, module.instructions[name]) for name in expected} == expected
    # FLOPs from the shapes: each cuDNN convolution costs the forward convolution's 2 * multiply-adds.
    assert ps.instruction_flops(module, module.instructions['cudnn-conv.1']) == 2 * CONV_MACS
    assert ps.instruction_flops(module, module.instructions['cudnn-conv-bw-filter.2']) == 2 * CONV_MACS
    assert ps.instruction_flops(module, module.instructions['cublas-gemm.1']) == 2 * 128 * 256 * 512
    assert ps.instruction_flops(module, module.instructions['input_exp_fusion.2']) == 0


def test_plain_convolutions_get_their_direction_from_window_and_op_name():
    text = '''HloModule m

ENTRY %main (x: f32[8,8,8,32], w: f32[3,3,32,64], g: f32[8,8,8,64]) -> f32[3,3,32,64] {
  %x = f32[8,8,8,32]{3,2,1,0} parameter(0)
  %w = f32[3,3,32,64]{3,2,1,0} parameter(1)
  %g = f32[8,8,8,64]{3,2,1,0} parameter(2)
  %fwd = f32[8,8,8,64]{3,2,1,0} convolution(%x, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(f)/jvp(UNet)/conv1/conv_general_dilated"}
  %data = f32[8,8,8,32]{3,2,1,0} convolution(%g, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01oi->b01f, metadata={op_name="jit(f)/transpose(jvp(UNet))/conv1/conv_general_dilated"}
  ROOT %filter = f32[32,3,3,64]{3,2,1,0} convolution(%x, %g), window={size=8x8 pad=1_1x1_1}, dim_labels=f01b_i01o->b01f
}
'''
    module = ps.parse_hlo(text)
    kinds = {name: ps.classify(module, module.instructions[name]) for name in ('fwd', 'data', 'filter')}
    assert kinds == {'fwd': ps.CONV_FORWARD, 'data': ps.CONV_BACKWARD_DATA, 'filter': ps.CONV_BACKWARD_FILTER}
    assert ps.instruction_flops(module, module.instructions['fwd']) == 2 * 8 * 8 * 8 * 64 * 9 * 32


def test_aggregation_of_a_fake_gpu_trace(gpu_module):
    events, report = ps.collect_events(_fake_gpu_profile(), gpu_module)
    assert report['source'] == 'device planes' and report['devices'] == 1
    # Only the stream line is summed; the graph span encloses kernels, so it is a container.
    assert report['containers'] == {'CudaGraphExec': 2}
    assert report['skipped'] == {'line not summed (XLA Ops)': 4, 'line not summed (CUPTI overhead)': 1}
    assert len(events) == 2 * 10
    summary = ps.summarize_events(events, report, gpu_module, steps=2)
    # ns per step (ms -> ns conversions round in the last bit)
    by_category = {c['category']: round(c['ms_per_step'] * 1e6, 9) for c in summary['categories']}
    assert by_category == {
        ps.CONV_FORWARD: 100, ps.GEMM: 40, ps.ATTENTION: 30, ps.OPTIMIZER: 20, ps.DATA_MOVEMENT: 15,
        ps.NORM_ACTIVATION: 50, ps.CONV_BACKWARD_FILTER: 200, ps.OTHER_MODULE + 'jit_other': 5,
        ps.UNATTRIBUTED + 'MemcpyH2D': 15}
    assert summary['kernel_ms_per_step'] * 1e6 == pytest.approx(475, rel=1e-12)
    assert sum(c['percent'] for c in summary['categories']) == pytest.approx(100, rel=1e-12)
    # Union of the intervals: [0, 200), [210, 465) (the memcpy ends 5 ns after the wgrad kernel), [600, 610).
    assert summary['busy_ms_per_step'] * 1e6 == pytest.approx(465, rel=1e-12)
    assert summary['events']['by_attribution'] == {'hlo_op': 10, 'kernel name': 4, 'kernel name pattern': 2,
                                                    'other module': 2, 'unattributed': 2}
    conv = next(c for c in summary['categories'] if c['category'] == ps.CONV_FORWARD)
    assert conv['gflop_per_step'] == pytest.approx(2 * CONV_MACS / 1e9, rel=1e-12)
    assert conv['tflop_s'] == pytest.approx(2 * CONV_MACS / 100e-9 / 1e12, rel=1e-12)
    top = summary['top_ops'][0]
    assert top['category'] == ps.CONV_BACKWARD_FILTER and top['instruction'].startswith('[sm90_xmma_wgrad')


def test_cpu_host_plane_counts_hlo_events_and_skips_containers(gpu_module):
    """Without device planes the /host:CPU events with an hlo_op count; a while/call thunk does not."""
    ours = dict(hlo_module='jit_device_steps')
    profile = SimpleNamespace(planes=[SimpleNamespace(name='/host:CPU', lines=[
        _line('python', [_event('PjitFunction(step)', 0, 1000)]),
        _line('tf_XLAEigen/1', [_event('ThunkExecutor::Execute', 0, 900), _event('call.1', 10, 300, hlo_op='call.1',
                                                                                  **ours),
                                _event('loop_convert_fusion.3', 20, 100, hlo_op='loop_convert_fusion.3', **ours)]),
        _line('tf_XLAEigen/2', [_event('cudnn-conv.1', 50, 200, hlo_op='cudnn-conv.1', **ours)])])])
    events, report = ps.collect_events(profile, gpu_module)
    assert [e.hlo_op for e in events] == ['loop_convert_fusion.3', 'cudnn-conv.1']
    assert report['containers'] == {'call.1': 1}
    assert report['skipped'] == {'host runtime event without hlo_op': 2}
    summary = ps.summarize_events(events, report, gpu_module, steps=1)
    assert summary['kernel_ms_per_step'] * 1e6 == pytest.approx(300, rel=1e-12)
    assert summary['busy_ms_per_step'] * 1e6 == pytest.approx(230, rel=1e-12)  # [20, 250)


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match='--what'):
        ps.main(['--smoke', '--what=eval'])
    with pytest.raises(ValueError, match='--steps'):
        ps.main(['--smoke', '--steps=0'])
    with pytest.raises(ValueError, match='not an HLO module'):
        ps.parse_hlo('ENTRY %main () -> f32[] {\n}')


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp('profile')
    env = {key: value for key, value in os.environ.items() if key != 'XLA_FLAGS'}
    env.update(JAX_PLATFORMS='cpu', PYTHONPATH=REPO_ROOT)
    out = out_dir / 'profile.json'
    process = subprocess_helpers.run([sys.executable, os.path.join(EXPERIMENTS, 'profile_step.py'), '--smoke',
                                      '--steps=2', f'--out={out}'], cwd=REPO_ROOT, env=env)
    assert process.returncode == 0, f'profile smoke run failed:\n{process.stdout[-3000:]}\n{process.stderr[-3000:]}'
    with open(out) as f:
        return process.stdout, json.load(f), out_dir


@pytest.mark.slow
def test_smoke_profiles_add_up_and_attribute_every_event(smoke_run):
    output, result, out_dir = smoke_run
    assert result['benchmark'] == 'profile' and result['smoke'] and result['device']['platform'] == 'cpu'
    assert [p['what'] for p in result['profiles']] == ['train', 'sample']
    assert result['trace_dir'] == str(out_dir / 'profile_traces')
    for profile in result['profiles']:
        assert os.path.exists(profile['trace_path']) and profile['trace_path'].startswith(result['trace_dir'])
        assert profile['source'] == 'host plane' and profile['batch_size'] == 8 and profile['steps'] == 2
        categories = {c['category']: c for c in profile['categories']}
        total = sum(c['ms_per_step'] for c in profile['categories'])
        assert total == pytest.approx(profile['kernel_ms_per_step'], rel=1e-9)
        assert sum(c['percent'] for c in profile['categories']) == pytest.approx(100, rel=1e-9)
        assert categories[ps.CONV_FORWARD]['ms_per_step'] > 0 and categories[ps.CONV_FORWARD]['gflop_per_step'] > 0
        assert set(categories) <= set(ps.CATEGORIES)  # the CPU trace is fully attributed by hlo_op
        assert profile['events']['by_attribution'] == {'hlo_op': profile['events']['counted']}
        assert 0 < profile['busy_ms_per_step'] <= profile['kernel_ms_per_step'] * (1 + 1e-9)
        shares = sum(c['wall_share_ms_per_step'] for c in profile['categories'])
        assert shares == pytest.approx(profile['busy_ms_per_step'], rel=1e-9)
        assert profile['wall_ms_per_step'] > 0 and profile['busy_fraction'] > 0
        assert profile['xla_gflop_per_step'] > 0 and len(profile['top_ops']) == 15
        assert f"## {profile['what']}: batch 8, 2 profiled steps" in output
    train, sample = result['profiles']
    train_categories = {c['category']: c for c in train['categories']}
    assert train['module'] == 'jit_device_steps' and sample['module'] == 'jit_sample_batch'
    assert train_categories[ps.OPTIMIZER]['ms_per_step'] > 0
    assert train_categories[ps.CONV_BACKWARD_DATA]['ms_per_step'] > 0
    assert train_categories[ps.CONV_BACKWARD_FILTER]['ms_per_step'] > 0
    assert ps.OPTIMIZER not in {c['category'] for c in sample['categories']}
    # The sampler's fori_loop thunk encloses its body's events: it is reported, not summed.
    assert any(name.startswith('while') for name in sample['events']['containers'])
    assert '| category | ms / train step | wall share, ms | % of kernel time |' in output
    assert '**total kernel time**' in output


def test_wall_shares_split_overlapping_time_evenly():
    # Three events on one device: a [0, 100), b [50, 150), c [120, 130), and a zero-length d at 60.
    # [0, 50): a alone; [50, 100): a and b; [100, 120): b; [120, 130): b and c; [130, 150): b.
    def event(name, start, duration):
        return ps.Event('/host:CPU', 'tf_XLAEigen/1', name, float(start), float(duration), name, 'm')
    events = [event('a', 0, 100), event('b', 50, 100), event('c', 120, 10), event('d', 60, 0)]
    assert ps.wall_shares_ns(events) == [50 + 25, 25 + 20 + 5 + 20, 5, 0]
    assert sum(ps.wall_shares_ns(events)) == ps._union_ns(events) == 150


def test_summary_reports_wall_shares_per_device(gpu_module):
    # The fake GPU trace: only the memcpy on the second stream overlaps a kernel (the wgrad kernel, by 10 ns),
    # so the categories' wall shares equal their durations except those two, which split the 10 ns.
    events, report = ps.collect_events(_fake_gpu_profile(), gpu_module)
    summary = ps.summarize_events(events, report, gpu_module, steps=2)
    shares = {c['category']: round(c['wall_share_ms_per_step'] * 1e6, 9) for c in summary['categories']}
    assert shares[ps.CONV_BACKWARD_FILTER] == 195 and shares[ps.UNATTRIBUTED + 'MemcpyH2D'] == 10
    assert shares[ps.CONV_FORWARD] == 100 and shares[ps.NORM_ACTIVATION] == 50
    assert sum(shares.values()) == pytest.approx(summary['busy_ms_per_step'] * 1e6, rel=1e-12)
    assert summary['top_ops'][0]['wall_share_ms_per_step'] * 1e6 == pytest.approx(195, rel=1e-12)
