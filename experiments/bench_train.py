"""Training throughput of the real train step (`ddpm_jax.train.make_train_step`) on synthetic data.

    python experiments/bench_train.py --config=configs/cifar10.py --dtypes=float32,bfloat16 \
        --batch_sizes=128 --steps_per_dispatch=1,10 --steps=50 --out=train.json
    python experiments/bench_train.py --config=configs/celebahq256.py --dtypes=bfloat16 \
        --batch_sizes=64 --find_max_batch --max_batch_budget_s=150 --out=train256.json
    python experiments/bench_train.py --smoke --out=/tmp/smoke.json      # seconds on a CPU
    python experiments/bench_train.py --config=configs/cifar10.py --dtypes=bfloat16 --batch_sizes=128 \
        --no_donate --out=train_no_donate.json          # PERF_NOTES lever 4: the state not donated

For each setting of the grid dtypes x batch_sizes x steps_per_dispatch (K):
  * the state comes from `train.create_train_state` and the step from `train.make_train_step`, the
    function `train.train` runs (K optimizer steps per dispatch through its lax.scan, state donated;
    --no_donate: `make_train_step(..., donate_state=False)`, the input state kept alive);
  * the data are random uint8 images of the config's size mapped to [-1, 1] as `data.train_batches`
    does, stacked [K, B, H, W, C] and split over the mesh with `parallel.shard_batch`; with
    --feed=host (default, as the train loop) the host batch is transferred on every dispatch, with
    --feed=device it is transferred once;
  * compile time (lower + compile of the step, ahead of time) is reported apart; then 2 untimed
    dispatches; then the synced phase: each dispatch timed on the wall clock up to
    `jax.block_until_ready` of the new state and metrics: step time = median dispatch time / K over
    ceil(steps / K) dispatches; then the pipelined phase: `pipelined_steps` steps dispatched back to
    back, metrics kept on the device as the train loop does, one sync at the end;
  * achieved TFLOP/s = XLA's cost-analysis FLOPs of one step per image x img/s (for the CIFAR-10 U-Net
    one forward pass is 11.67 GFLOP per image, a train step about three times that);
  * peak device memory: `device.memory_stats()['peak_bytes_in_use']` (the process-wide peak so far,
    'n/a' where the backend has no stats) and XLA's own estimate for the compiled step
    (arguments + outputs - aliased + temporaries).

--find_max_batch (after the grid, first dtype, K = 1): the largest global batch that trains. The first
probe is extrapolated from the grid's compiled memory estimate and the device's bytes_limit (where the
backend reports them); then the batch grows by a doubling increment until a probe runs out of memory,
then bisects down to --max_batch_resolution, while the next probe is expected to end within
--max_batch_budget_s seconds of the process start (each probe compiles).

--summarize A.json B.json ... prints one table of the rows of earlier runs (train and sample).

Every row (grid, max-batch probe, and bench_sample.py's rows) carries `settings`, the table's last column:
what the row measured beyond its config file, dtype, batch and K: the --set overrides as given (without
--smoke's own), XLA_FLAGS when set, 'feed=device', 'no donation'; 'default' when none (`settings_label`).
The JSON's top level also keeps the raw --set list (`set_overrides`) and `xla_flags`.
"""
import argparse
import ast
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from ddpm_jax import compile_cache, config_files, host_memory, parallel  # pylint: disable=wrong-import-position
from ddpm_jax import train  # pylint: disable=wrong-import-position

DTYPES = ('float32', 'bfloat16')
GIB = 1024 ** 3
# Issue 6 targets on one H100, CIFAR-10 U-Net (35,746,307 params).
TRAIN_TARGET_IMG_S = 6000.0     # at global batch 128
SAMPLE_TARGET_IMG_STEPS_S = 50000.0  # at batch 1024, one network evaluation per step
CIFAR10_PARAMS = 35_746_307

SMOKE_OVERRIDES = {
    'data.image_size': 8, 'model.ch': 32, 'model.ch_mult': (1,), 'model.num_res_blocks': 1,
    'model.attn_resolutions': (8,), 'diffusion.num_diffusion_timesteps': 10, 'optim.warmup_steps': 2,
}


# ------------------------------------------------------------------------------------------- shared helpers

def smoke_override_words() -> list[str]:
    """SMOKE_OVERRIDES as `load_config` override words: ['data.image_size=8', ...]."""
    return [f'{key}={value!r}' for key, value in SMOKE_OVERRIDES.items()]


def load_config(path: str, overrides: list[str]):
    """config from the file's get_config() with `key.sub=value` overrides (values parsed as Python literals,
    anything else kept as a string). Returns (config, {key: value}).

    Also points JAX's persistent compilation cache at config.compile_cache_dir (as `ddpm_jax.main` does;
    `--set compile_cache_dir=` turns it off): with the cache warm, "compile s" is the time to load the program."""
    path = os.path.join(REPO_ROOT, path) if not os.path.isabs(path) and not os.path.exists(path) else path
    if not os.path.exists(path):
        raise FileNotFoundError(f'config file {path!r} not found; pass e.g. --config=configs/cifar10.py')
    config = config_files.load_config_file(path)
    parsed = parse_overrides(overrides)
    try:
        config.update_from_flattened_dict(parsed)   # ml_collections sets the dotted keys (lists become tuples)
    except KeyError as error:
        raise ValueError(f'--set: {error.args[0]} Top-level keys: {list(config)}') from None
    compile_cache.enable(config.get('compile_cache_dir', ''))
    return config, parsed


def parse_overrides(overrides: list[str]) -> dict:
    """`key.sub=value` strings -> {key: value}: values parsed as Python literals, anything else kept as a string
    (so `--set model.attention=cudnn` and `--set "model.attention='cudnn'"` are the same); ml_collections'
    ConfigDict.update_from_flattened_dict then applies them (`load_config`)."""
    parsed = {}
    for item in overrides:
        if '=' not in item:
            raise ValueError(f'--set {item!r} must look like key.sub=value, e.g. --set model.dropout=0.0')
        key, text = item.split('=', 1)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        parsed[key] = value
    return parsed


def settings_label(overrides: dict, *, xla_flags: str = '', feed: str = 'host', donate_state: bool = True) -> str:
    """The `settings` cell of a row: what it measured beyond config file, dtype, batch and K.

    overrides: {key: value} of --set (strings shown unquoted), then `XLA_FLAGS=...` when set, `feed=device`
    when not the default host feed, `no donation` when the state was not donated; 'default' when none.
    E.g. 'model.attention=cudnn, XLA_FLAGS=--xla_gpu_enable_command_buffer=, no donation'.
    """
    parts = [f'{key}={value if isinstance(value, str) else repr(value).replace(" ", "")}'
             for key, value in overrides.items()]
    if xla_flags.strip():
        parts.append(f'XLA_FLAGS={xla_flags.strip()}')
    if feed != 'host':
        parts.append(f'feed={feed}')
    if not donate_state:
        parts.append('no donation')
    return ', '.join(parts) or 'default'


def parse_list(text: str, kind: Callable, name: str, allowed: Optional[tuple] = None) -> list:
    values = [kind(item) for item in text.split(',') if item.strip()]
    if not values:
        raise ValueError(f'--{name} is empty; give a comma-separated list')
    if allowed is not None:
        for value in values:
            if value not in allowed:
                raise ValueError(f'--{name}: {value!r} not allowed; allowed: {allowed}')
    return values


def device_info() -> dict:
    device = jax.devices()[0]
    return dict(platform=device.platform, device_kind=device.device_kind, device_count=jax.device_count(),
                process_count=jax.process_count(), jax_version=jax.__version__,
                jaxlib_version=_jaxlib_version(),
                xla_flags=os.environ.get('XLA_FLAGS', ''),
                compile_cache_dir=jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache
                else '',
                mem_fraction=os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', ''))


def _jaxlib_version() -> str:
    import jaxlib  # pylint: disable=g-import-not-at-top
    return jaxlib.__version__


def memory_stats() -> Optional[dict]:
    """The first local device's allocator stats, or None where the backend keeps none (CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    return stats or None


def peak_bytes() -> Optional[int]:
    stats = memory_stats()
    return None if stats is None else stats.get('peak_bytes_in_use')


def compiled_bytes(compiled) -> Optional[int]:
    """XLA's memory estimate of a compiled executable: arguments + outputs - aliased + temporaries."""
    try:
        analysis = compiled.memory_analysis()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if analysis is None:
        return None
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
               + analysis.temp_size_in_bytes)


def compiled_flops(compiled) -> Optional[float]:
    """FLOPs of a compiled executable by XLA's cost analysis (a loop body counts once), or None."""
    try:
        analysis = compiled.cost_analysis()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get('flops')
    return float(flops) if flops and flops > 0 else None


def is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower()


def num_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def write_json(path: str, result: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(path + '.tmp', path)


def fmt_gib(value) -> str:
    return 'n/a' if value is None else f'{value / GIB:.2f}'


def fmt_number(value, digits=0) -> str:
    return '-' if value is None else f'{value:,.{digits}f}'


def format_table(rows: list[dict]) -> str:
    """One Markdown table of train and sample rows (the schema written by both scripts)."""
    header = ['bench', 'config', 'dtype', 'batch', 'K / steps', 'compile s', 'ms / step', 'throughput',
              'pipelined', 'unit', 'target', 'TFLOP/s', 'peak GiB', 'XLA est GiB', 'status', 'settings']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for row in rows:
        per = row.get('steps_per_dispatch', row.get('num_steps'))
        cells = [row['bench'], row['config'], row['dtype'], str(row['batch_size']), str(per),
                 fmt_number(row.get('compile_s'), 1), fmt_number(row.get('step_ms_median'), 2),
                 fmt_number(row.get('throughput')), fmt_number(row.get('throughput_pipelined')), row.get('unit', ''),
                 fmt_number(row.get('target')), fmt_number(row.get('tflop_s'), 1),
                 fmt_gib(row.get('peak_bytes')), fmt_gib(row.get('xla_bytes')), row.get('status', 'ok'),
                 row.get('settings', '–').replace('|', '\\|')]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def print_report(result: dict) -> None:
    info = result['device']
    print(f"# {result['benchmark']} benchmark: {info['device_kind']} x{info['device_count']} "
          f"({info['platform']}), jax {info['jax_version']}, {result['date']}")
    print(format_table(result['rows']))
    if result.get('max_batch'):
        search = result['max_batch']
        print(f"max batch ({search['dtype']}, K=1): largest that trained {search['largest_fit']}, "
              f"smallest that failed {search['smallest_failure']}, resolved: {search['resolved']} "
              f"(probes: {[(p['batch_size'], p['status']) for p in search['probes']]})")
    sys.stdout.flush()


def summarize(paths: list[str]) -> None:
    """Prints one table of the rows of several result files (train and sample); rows of files written before
    the `settings` field get it from the file's top level (overrides, XLA_FLAGS, feed; donation was always on)."""
    rows, devices = [], set()
    for path in paths:
        if not os.path.exists(path):
            print(f'(missing: {path})')
            continue
        with open(path) as f:
            result = json.load(f)
        if 'rows' not in result:   # e.g. a profile_step.py result: printed by its own --summarize
            print(f'(no benchmark rows: {path})')
            continue
        devices.add(f"{result['device']['device_kind']} x{result['device']['device_count']}, "
                    f"jax {result['device']['jax_version']}")
        settings = result.get('settings') or _settings_of_old_result(result)
        rows.extend(dict(row, settings=row.get('settings', settings)) for row in result['rows'])
        if result.get('max_batch'):
            search = result['max_batch']
            rows.extend(dict(probe, bench='max_batch', settings=probe.get('settings', settings))
                        for probe in search['probes'])
    print('# devices: ' + '; '.join(sorted(devices)))
    print(format_table(rows))


def _settings_of_old_result(result: dict) -> str:
    """settings_label of a result file without the field: its parsed overrides less --smoke's own."""
    smoke = json.loads(json.dumps(SMOKE_OVERRIDES)) if result.get('smoke') else {}
    missing = object()
    overrides = {key: value for key, value in result.get('overrides', {}).items()
                 if smoke.get(key, missing) != value}
    return settings_label(overrides, xla_flags=result.get('device', {}).get('xla_flags', ''),
                          feed=result.get('feed', 'host'))


# ------------------------------------------------------------------------------------------- the benchmark

def synthetic_batches(config, steps_per_dispatch: int, batch_size: int, seed: int = 0) -> np.ndarray:
    """Random uint8 images mapped to [-1, 1] as data.train_batches does: float32 [K, B, H, W, C]."""
    size, channels = config.data.image_size, config.data.channels
    images = np.random.default_rng(seed).integers(0, 256, (steps_per_dispatch, batch_size, size, size, channels),
                                                  dtype=np.uint8)
    return images.astype(np.float32) / 127.5 - 1.0


def setting_config(base_config, dtype: str, batch_size: int, steps_per_dispatch: int):
    config = base_config.copy_and_resolve_references()
    config.model.dtype = dtype
    config.training.batch_size = batch_size
    config.training.steps_per_dispatch = steps_per_dispatch
    return config


def run_setting(base_config, config_name: str, dtype: str, batch_size: int, steps_per_dispatch: int, *,
                steps: int, pipelined_steps: int, feed: str, donate_state: bool = True,
                settings: str = 'default') -> dict:
    """Benchmarks one setting; returns its row (status 'oom' when it does not fit). `settings`: the row's
    settings_label (what the caller changed: overrides, XLA_FLAGS, feed, donation), stored as given."""
    row = dict(bench='train', config=config_name, image_size=int(base_config.data.image_size), dtype=dtype,
               batch_size=batch_size, steps_per_dispatch=steps_per_dispatch, unit='img/s', feed=feed,
               donate_state=donate_state, settings=settings, status='ok')
    began = time.perf_counter()
    config = setting_config(base_config, dtype, batch_size, steps_per_dispatch)
    if config_name == 'cifar10' and batch_size == 128:
        row['target'] = TRAIN_TARGET_IMG_S
    mesh = parallel.make_mesh()
    parallel.check_global_batch(batch_size, mesh)
    state = compiled = None
    try:
        start = time.perf_counter()
        state = jax.block_until_ready(train.create_train_state(config, mesh))
        row['init_s'] = time.perf_counter() - start
        row['num_params'] = num_params(state.params)
        host_batches = synthetic_batches(config, steps_per_dispatch, batch_size)
        device_batches = parallel.shard_batch(host_batches, mesh, batch_axis=1)
        batches = (lambda: parallel.shard_batch(host_batches, mesh, batch_axis=1)) if feed == 'host' else (
            lambda: device_batches)

        start = time.perf_counter()
        compiled = train.make_train_step(config, mesh, donate_state=donate_state).lower(
            state, device_batches).compile()
        row['compile_s'] = time.perf_counter() - start
        row['xla_bytes'] = compiled_bytes(compiled)
        flops = compiled_flops(compiled)  # one optimizer step: the scan body of K > 1 counts once
        row['gflop_per_img'] = None if flops is None else flops / batch_size / 1e9

        for _ in range(2):
            state, metrics = compiled(state, batches())
        jax.block_until_ready((state, metrics))

        dispatch_times = []
        for _ in range(max(1, math.ceil(steps / steps_per_dispatch))):
            start = time.perf_counter()
            state, metrics = compiled(state, batches())
            jax.block_until_ready((state, metrics))
            dispatch_times.append(time.perf_counter() - start)
        step_times = np.asarray(dispatch_times) / steps_per_dispatch
        row['timed_steps'] = len(dispatch_times) * steps_per_dispatch
        row['step_ms_median'] = 1e3 * float(statistics.median(step_times))
        row['step_ms_min'] = 1e3 * float(step_times.min())
        row['step_ms_max'] = 1e3 * float(step_times.max())
        row['throughput'] = batch_size / (row['step_ms_median'] / 1e3)
        if row['gflop_per_img']:
            row['tflop_s'] = row['gflop_per_img'] * row['throughput'] / 1e3

        if pipelined_steps > 0:
            num_dispatches = max(1, math.ceil(pipelined_steps / steps_per_dispatch))
            pending = []
            start = time.perf_counter()
            for _ in range(num_dispatches):
                state, metrics = compiled(state, batches())
                pending.append(metrics)
            jax.block_until_ready((state, pending))
            elapsed = time.perf_counter() - start
            row['throughput_pipelined'] = num_dispatches * steps_per_dispatch * batch_size / elapsed
            metrics = pending[-1]
        loss = np.asarray(parallel.to_host(metrics)['loss'])
        row['last_loss'] = float(loss[-1])
        if not np.all(np.isfinite(loss)):
            row['status'] = 'nonfinite loss'
        row['peak_bytes'] = peak_bytes()
    except Exception as error:  # pylint: disable=broad-except
        if not is_out_of_memory(error):
            raise
        row['status'] = 'oom'
        row['error'] = str(error).splitlines()[0][:300]
    finally:
        del state, compiled
        gc.collect()
    row['wall_s'] = time.perf_counter() - began
    return row


def _round_down(value: float, resolution: int) -> int:
    return int(value // resolution) * resolution


def find_max_batch(base_config, config_name: str, dtype: str, grid_rows: list[dict], *, resolution: int,
                   start: int, cap: int, budget_s: float, steps: int, feed: str, began: Optional[float] = None,
                   on_probe: Optional[Callable[[dict], None]] = None, donate_state: bool = True,
                   settings: str = 'default') -> dict:
    """Largest global batch (a multiple of `resolution`) whose train step runs; see the module docstring.

    A probe starts only while time.perf_counter() - began (default: now) plus the wall time of the last
    setting run (grid row or probe) stays within budget_s. Returns dict(largest_fit, smallest_failure,
    resolved, probes [rows], ...); `on_probe(partial result)` is called after every probe (the script saves
    its JSON there, so a run stopped by a time limit keeps them). donate_state, settings: as run_setting's.
    """
    began = time.perf_counter() if began is None else began
    fitted = [r for r in grid_rows if r['dtype'] == dtype and r['steps_per_dispatch'] == 1 and r['status'] == 'ok']
    largest_fit = max((r['batch_size'] for r in fitted), default=None)
    smallest_failure = min((r['batch_size'] for r in grid_rows if r['dtype'] == dtype and r['status'] == 'oom'),
                           default=None)
    probe, estimate = None, None
    increment = None  # None: double the batch while it fits; else grow by this, doubled after each fit
    stats = memory_stats()
    if largest_fit is not None and stats and stats.get('bytes_limit'):
        reference = max(fitted, key=lambda r: r['batch_size'])
        if reference.get('xla_bytes'):
            # Temporaries grow with the batch and arguments (the state) do not: charging all of the reference's
            # bytes per image makes the estimate an underestimate, so the first probe is likely to fit.
            per_image = reference['xla_bytes'] / reference['batch_size']
            estimate = _round_down(0.95 * stats['bytes_limit'] / per_image, resolution)
            if estimate > largest_fit:
                probe = min(estimate, cap)
                increment = max(resolution, _round_down(probe // 8, resolution))
    if probe is None:
        probe = start if largest_fit is None else (min(2 * largest_fit, cap) if largest_fit < cap else None)
    probes = []

    def summary() -> dict:
        resolved = largest_fit is not None and (largest_fit >= cap or (
            smallest_failure is not None and smallest_failure - largest_fit <= resolution))
        return dict(dtype=dtype, largest_fit=largest_fit, smallest_failure=smallest_failure, resolved=bool(resolved),
                    resolution=resolution, cap=cap, estimate_from_xla=estimate,
                    seconds=time.perf_counter() - began, probes=probes)

    expected_s = max((r.get('wall_s', 0.0) for r in grid_rows if r['dtype'] == dtype), default=0.0)
    while probe is not None and time.perf_counter() - began + expected_s < budget_s:
        row = run_setting(base_config, config_name, dtype, probe, 1, steps=steps, pipelined_steps=0, feed=feed,
                          donate_state=donate_state, settings=settings)
        probes.append(row)
        expected_s = row.get('wall_s', 0.0)
        print(f'max batch probe {probe}: {row["status"]} {fmt_number(row.get("throughput"))} img/s', flush=True)
        if row['status'] == 'ok':
            largest_fit = probe
        else:
            smallest_failure = probe
        if on_probe is not None:
            on_probe(summary())
        if smallest_failure is None:
            if largest_fit >= cap:
                break
            step = increment if increment is not None else largest_fit
            probe = min(largest_fit + step, cap)
            if increment is not None:
                increment *= 2
        else:
            low = largest_fit or 0
            if smallest_failure - low <= resolution:
                break
            probe = max(resolution, _round_down((low + smallest_failure) / 2, resolution))
            if probe <= low or probe >= smallest_failure:
                break
    return summary()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='configs/cifar10.py')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='config override, e.g. --set model.dropout=0.0 (repeatable)')
    parser.add_argument('--dtypes', default=None, help='comma list of float32,bfloat16 (default: the config)')
    parser.add_argument('--batch_sizes', default=None, help='comma list of global batches (default: the config)')
    parser.add_argument('--steps_per_dispatch', default='1', help='comma list of K (train steps per dispatch)')
    parser.add_argument('--steps', type=int, default=50, help='timed optimizer steps per setting (synced phase)')
    parser.add_argument('--pipelined_steps', type=int, default=None,
                        help='optimizer steps of the unsynced phase (default: --steps; 0 skips it)')
    parser.add_argument('--feed', default='host', choices=('host', 'device'))
    parser.add_argument('--no_donate', action='store_true',
                        help='do not donate the train state to the step (make_train_step(donate_state=False))')
    parser.add_argument('--out', default=None, help='JSON result path')
    parser.add_argument('--find_max_batch', action='store_true')
    parser.add_argument('--max_batch_resolution', type=int, default=8)
    parser.add_argument('--max_batch_start', type=int, default=8, help='first probe when the grid gives no hint')
    parser.add_argument('--max_batch_cap', type=int, default=4096)
    parser.add_argument('--max_batch_budget_s', type=float, default=300.0,
                        help='seconds from the start of this process after which no new probe starts (a probe '
                             'starts only if the last setting\'s wall time still fits)')
    parser.add_argument('--max_batch_steps', type=int, default=3, help='timed steps of each probe')
    parser.add_argument('--smoke', action='store_true', help='tiny config, a few steps: seconds on a CPU')
    parser.add_argument('--summarize', nargs='+', default=None, metavar='JSON',
                        help='print one table of earlier result files and exit')
    args = parser.parse_args(argv)
    began = time.perf_counter()
    if args.summarize:
        summarize(args.summarize)
        return {}
    host_memory.keep_freed_memory()   # as `ddpm_jax.main --mode=train` does (CPU-only runs)

    overrides = list(args.set)
    if args.smoke:
        overrides = smoke_override_words() + overrides
    config, parsed = load_config(args.config, overrides)
    config_name = os.path.splitext(os.path.basename(args.config))[0] + ('_smoke' if args.smoke else '')
    dtypes = parse_list(args.dtypes or config.model.dtype, str, 'dtypes', DTYPES)
    batch_sizes = parse_list(args.batch_sizes or str(8 if args.smoke else config.training.batch_size), int,
                             'batch_sizes')
    spds = parse_list(args.steps_per_dispatch, int, 'steps_per_dispatch')
    steps = 4 if args.smoke and args.steps == 50 else args.steps
    pipelined = steps if args.pipelined_steps is None else args.pipelined_steps
    for name, values in (('batch_sizes', batch_sizes), ('steps_per_dispatch', spds)):
        if min(values) < 1:
            raise ValueError(f'--{name}={values} must be positive')

    donate_state = not args.no_donate
    xla_flags = os.environ.get('XLA_FLAGS', '')
    settings = settings_label(parse_overrides(args.set), xla_flags=xla_flags, feed=args.feed,
                              donate_state=donate_state)
    result = dict(benchmark='train', date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                  device=device_info(), config=args.config, overrides=parsed, set_overrides=list(args.set),
                  xla_flags=xla_flags, settings=settings, smoke=args.smoke, feed=args.feed, donate_state=donate_state,
                  steps=steps, pipelined_steps=pipelined, rows=[])
    for dtype in dtypes:
        for batch_size in batch_sizes:
            for spd in spds:
                row = run_setting(config, config_name, dtype, batch_size, spd, steps=steps, pipelined_steps=pipelined,
                                  feed=args.feed, donate_state=donate_state, settings=settings)
                result['rows'].append(row)
                print(f"{dtype} batch {batch_size} K={spd}: {row['status']} "
                      f"{fmt_number(row.get('throughput'))} img/s, compile {fmt_number(row.get('compile_s'), 1)} s",
                      flush=True)
                if args.out:
                    write_json(args.out, result)
    if args.find_max_batch:

        def save_partial(search: dict) -> None:
            result['max_batch'] = search
            if args.out:
                write_json(args.out, result)

        result['max_batch'] = find_max_batch(
            config, config_name, dtypes[0], result['rows'], resolution=args.max_batch_resolution,
            start=args.max_batch_start, cap=args.max_batch_cap, budget_s=args.max_batch_budget_s,
            steps=args.max_batch_steps, feed=args.feed, began=began, on_probe=save_partial, donate_state=donate_state,
            settings=settings)
    if args.out:
        write_json(args.out, result)
    print_report(result)
    return result


if __name__ == '__main__':
    main()
