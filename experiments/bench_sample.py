"""Sampling throughput (image-steps per second) of the real sampler, `ddpm_jax.samplers.make_sampler`.

    python experiments/bench_sample.py --config=configs/cifar10.py --dtypes=float32,bfloat16 \
        --batch_size=1024 --num_steps=20 --repeats=5 --out=sample.json
    python experiments/bench_sample.py --smoke --out=/tmp/smoke.json      # seconds on a CPU

What is timed: one call of `sample_mode.make_sample_batch_fn(config, common.model_apply_fn(config), mesh,
quantize=False)`, the jitted batch sampler of --mode=sample (without its final uint8 rounding, so that the
float x_0 can be checked for non-finite values): `samplers.make_sampler(config)` with config.sampling.sampler
= 'ancestral' and config.sampling.num_steps = k, the U-Net applied with EMA-shaped float32 params and its
input batch constrained to the mesh's data sharding. With 0 < k < T the sampler is the paper's
ancestral loop on k respaced timesteps (`samplers.ancestral_sample_loop` -> `diffusion.p_sample_loop` on
a k-step diffusion): a `lax.fori_loop` of exactly k bodies, each one network evaluation at batch B plus
the p_sample update and its noise draw; k = T runs `diffusion.p_sample_loop` itself. The network, the
shapes and the per-step work are those of full 1000-step sampling, so k steps of B images stand for
B * k image-steps of the real run, without spending minutes per timed call; the compiled loop does not
depend on k (fori_loop), so the compile time is that of the full sampler. The only per-call work that
is not a step (the x_T draw) is one noise draw, under 1/k of a step.

Each setting: params from `models.params.init_params` (random, float32 as the EMA params), compile (lower +
compile, reported apart; XLA's cost analysis counts the loop body once, so its FLOPs / B are those of one
step per image, 11.67 GFLOP for the CIFAR-10 U-Net), one untimed call, then --repeats timed calls (wall clock up to
`block_until_ready`); ms / step = median call time / k, throughput = B * k / median call time.
The table and JSON rows share bench_train.py's schema (`bench_train.py --summarize` prints both), the
`settings` column included (the --set overrides as given and XLA_FLAGS; `bench_train.settings_label`).
"""
import argparse
import datetime
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # pylint: disable=wrong-import-position  (config loading, device info, table)

import jax  # pylint: disable=wrong-import-position,g-bad-import-order
import numpy as np  # pylint: disable=wrong-import-position,g-bad-import-order

from ddpm_jax import parallel  # pylint: disable=wrong-import-position
from ddpm_jax.models import params as params_lib  # pylint: disable=wrong-import-position
from ddpm_jax.models import unet  # pylint: disable=wrong-import-position
from ddpm_jax.evaluation import common  # pylint: disable=wrong-import-position
from ddpm_jax.evaluation import sample as sample_mode  # pylint: disable=wrong-import-position


def sampler_config(base_config, dtype: str, batch_size: int, num_steps: int):
    """A copy of base_config for the paper's ancestral sampler over num_steps respaced steps at batch_size."""
    config = base_config.copy_and_resolve_references()
    config.model.dtype = dtype
    config.sampling.sampler = 'ancestral'
    config.sampling.num_steps = num_steps
    config.sampling.batch_size = batch_size
    num_timesteps = config.diffusion.num_diffusion_timesteps
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f'--num_steps={num_steps} must be in [1, T={num_timesteps}]')
    return config


def run_setting(base_config, config_name: str, dtype: str, batch_size: int, num_steps: int, repeats: int, *,
                settings: str = 'default') -> dict:
    """Benchmarks one setting; returns its row (status 'oom' when it does not fit; `settings` stored as given)."""
    row = dict(bench='sample', config=config_name, image_size=int(base_config.data.image_size), dtype=dtype,
               batch_size=batch_size, num_steps=num_steps, unit='img-steps/s', settings=settings, status='ok')
    config = sampler_config(base_config, dtype, batch_size, num_steps)
    if config_name == 'cifar10' and batch_size == 1024:
        row['target'] = bench_train.SAMPLE_TARGET_IMG_STEPS_S
    mesh = parallel.make_mesh()
    parallel.check_global_batch(batch_size, mesh)
    params = compiled = None
    try:
        model, shape = unet.create_model(config), params_lib.image_shape(config.data)
        init = jax.jit(lambda rng: params_lib.init_params(model, shape, rng),
                       out_shardings=parallel.replicated_sharding(mesh))
        params = jax.block_until_ready(init(jax.random.key(config.seed)))
        row['num_params'] = bench_train.num_params(params)
        rng = jax.random.key(config.seed + 1)
        start = time.perf_counter()
        sample_batch = sample_mode.make_sample_batch_fn(config, common.model_apply_fn(config), mesh, quantize=False)
        compiled = sample_batch.lower(params, rng).compile()
        row['compile_s'] = time.perf_counter() - start
        row['xla_bytes'] = bench_train.compiled_bytes(compiled)
        flops = bench_train.compiled_flops(compiled)  # the fori_loop body (one step) counts once
        row['gflop_per_img'] = None if flops is None else flops / batch_size / 1e9
        samples = jax.block_until_ready(compiled(params, rng))
        call_times = []
        for i in range(repeats):
            start = time.perf_counter()
            samples = jax.block_until_ready(compiled(params, jax.random.fold_in(rng, i)))
            call_times.append(time.perf_counter() - start)
        median = statistics.median(call_times)
        row['timed_steps'] = repeats * num_steps
        row['call_s_median'] = median
        row['call_s_min'] = min(call_times)
        row['step_ms_median'] = 1e3 * median / num_steps
        row['throughput'] = batch_size * num_steps / median
        if row['gflop_per_img']:
            row['tflop_s'] = row['gflop_per_img'] * row['throughput'] / 1e3
        host = np.asarray(parallel.to_host(samples))
        if not np.all(np.isfinite(host)):
            row['status'] = 'nonfinite samples'
        row['peak_bytes'] = bench_train.peak_bytes()
    except Exception as error:  # pylint: disable=broad-except
        if not bench_train.is_out_of_memory(error):
            raise
        row['status'] = 'oom'
        row['error'] = str(error).splitlines()[0][:300]
    finally:
        del params, compiled
        gc.collect()
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='configs/cifar10.py')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='config override, e.g. --set sampling.clip_denoised=False (repeatable)')
    parser.add_argument('--dtypes', default=None, help='comma list of float32,bfloat16 (default: the config)')
    parser.add_argument('--batch_size', type=int, default=None, help='global batch (default 1024; smoke 8)')
    parser.add_argument('--num_steps', type=int, default=None,
                        help='reverse steps (network evaluations) per timed call (default 20; smoke 5)')
    parser.add_argument('--repeats', type=int, default=None, help='timed calls per setting (default 5; smoke 2)')
    parser.add_argument('--out', default=None, help='JSON result path')
    parser.add_argument('--smoke', action='store_true', help='tiny config, a few steps: seconds on a CPU')
    args = parser.parse_args(argv)

    overrides = list(args.set)
    if args.smoke:
        overrides = bench_train.smoke_override_words() + overrides
    config, parsed = bench_train.load_config(args.config, overrides)
    config_name = os.path.splitext(os.path.basename(args.config))[0] + ('_smoke' if args.smoke else '')
    dtypes = bench_train.parse_list(args.dtypes or config.model.dtype, str, 'dtypes', bench_train.DTYPES)
    batch_size = args.batch_size or (8 if args.smoke else 1024)
    num_steps = args.num_steps or (5 if args.smoke else 20)
    repeats = args.repeats or (2 if args.smoke else 5)
    if repeats < 1:
        raise ValueError(f'--repeats={repeats} must be positive')

    xla_flags = os.environ.get('XLA_FLAGS', '')
    settings = bench_train.settings_label(bench_train.parse_overrides(args.set), xla_flags=xla_flags)
    result = dict(benchmark='sample', date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                  device=bench_train.device_info(), config=args.config, overrides=parsed,
                  set_overrides=list(args.set), xla_flags=xla_flags, settings=settings, smoke=args.smoke,
                  sampler='ancestral (samplers.make_sampler, respaced to num_steps)', rows=[])
    for dtype in dtypes:
        row = run_setting(config, config_name, dtype, batch_size, num_steps, repeats, settings=settings)
        result['rows'].append(row)
        print(f"{dtype} batch {batch_size} x {num_steps} steps: {row['status']} "
              f"{bench_train.fmt_number(row.get('throughput'))} img-steps/s, "
              f"compile {bench_train.fmt_number(row.get('compile_s'), 1)} s", flush=True)
        if args.out:
            bench_train.write_json(args.out, result)
    if args.out:
        bench_train.write_json(args.out, result)
    bench_train.print_report(result)
    return result


if __name__ == '__main__':
    main()
