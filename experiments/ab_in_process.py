"""Interleaved A/B of the real train step in one process: XLA compile options and config switches.

    python experiments/ab_in_process.py --config=configs/cifar10.py --batch_size=8 --rounds=8 \
        --variant='base=' \
        --variant='memsched=xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED' \
        --variant='fv=model.fast_variance=True'
    python experiments/ab_in_process.py --smoke --rounds=2 --variant=base= --variant=fv=model.fast_variance=True

Each variant is the real `train.make_train_step`, built from the config with the variant's `section.key=value`
overrides and compiled with its `xla_*=value` words as XLA compile options (`Lowered.compile(compiler_options)`,
the same options XLA_FLAGS sets, but per program). All variants live in this one process and start from the same
initial state; each round runs one step of every variant, alternating the order. Against ab_cpu.py (one fresh
process per variant and round) this removes the process-to-process spread (memory placement, the machine's
load when each process ran), which on a shared 2-core machine was +-5-10% for identical programs.
Reported per variant: median step time over rounds (min-max), the per-round ratio to the first variant
(< 1: faster), compile time, and the first step's loss and gradient norm (same numerics: equal).
"""
import argparse
import datetime
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO_ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)

import bench_train  # noqa: E402  pylint: disable=wrong-import-position
import jax  # noqa: E402  pylint: disable=wrong-import-position

from ddpm_jax import host_memory, parallel, train  # noqa: E402  pylint: disable=wrong-import-position


def parse_variant(text: str) -> tuple[str, dict, list]:
    """'name=WORDS' (comma- or space-separated words) -> (name, {xla option: value}, ['section.key=value', ...]).

    Words whose key starts with 'xla_' are compile options ('true'/'false' become booleans); the others are
    config overrides for bench_train.load_config."""
    name, sep, words = text.partition('=')
    if not sep or not name:
        raise ValueError(f'--variant {text!r}: expected NAME=WORDS, e.g. base= or '
                         'vw=xla_cpu_prefer_vector_width=512 or fv=model.fast_variance=True')
    options, overrides = {}, []
    for word in words.replace(',', ' ').split():
        key, eq, value = word.partition('=')
        if not eq or not key:
            raise ValueError(f'--variant {name}: {word!r} must look like xla_option=value or section.key=value')
        if key.startswith('xla_'):
            options[key] = {'true': True, 'false': False}.get(value.lower(), value)
        else:
            overrides.append(word)
    return name, options, overrides


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='configs/cifar10.py')
    parser.add_argument('--batch_size', type=int, default=8)
    parser.add_argument('--rounds', type=int, default=6)
    parser.add_argument('--variant', action='append', required=True, metavar='NAME=WORDS')
    parser.add_argument('--smoke', action='store_true', help='tiny config (as the benchmarks\' smoke mode)')
    parser.add_argument('--out', default='', help='JSON result path')
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.batch_size < 1:
        raise ValueError(f'--rounds and --batch_size must be >= 1, got {args.rounds} and {args.batch_size}')
    variants = [parse_variant(text) for text in args.variant]
    if len({name for name, _, _ in variants}) != len(variants):
        raise ValueError(f'--variant names must differ: {[name for name, _, _ in variants]}')
    if jax.default_backend() == 'cpu':
        host_memory.keep_freed_memory()   # as `ddpm_jax.main --mode=train` runs on CPU-only machines

    smoke = bench_train.smoke_override_words() if args.smoke else []
    mesh = parallel.make_mesh()
    parallel.check_global_batch(args.batch_size, mesh)
    runs = []
    for name, options, overrides in variants:
        config, _ = bench_train.load_config(args.config, smoke + [f'training.batch_size={args.batch_size}',
                                                                  'training.steps_per_dispatch=1'] + overrides)
        state = train.create_train_state(config, mesh)
        batches = parallel.shard_batch(bench_train.synthetic_batches(config, 1, args.batch_size), mesh, batch_axis=1)
        start = time.perf_counter()
        step = train.make_train_step(config, mesh).lower(state, batches).compile(options or None)
        compile_s = time.perf_counter() - start
        state, metrics = step(state, batches)
        metrics = parallel.to_host(metrics)
        runs.append(dict(name=name, options=options, overrides=overrides, step=step, state=state, batches=batches,
                         compile_s=compile_s, first_loss=float(metrics['loss'][0]),
                         first_grad_norm=float(metrics['grad_norm'][0]), times=[]))
        print(f'{name}: compiled in {compile_s:.1f} s; first step loss {runs[-1]["first_loss"]:.7f}, grad norm '
              f'{runs[-1]["first_grad_norm"]:.6f}', flush=True)
    for round_index in range(args.rounds):
        for run in (runs if round_index % 2 == 0 else runs[::-1]):
            start = time.perf_counter()
            run['state'], metrics = run['step'](run['state'], run['batches'])
            jax.block_until_ready((run['state'], metrics))
            run['times'].append(1e3 * (time.perf_counter() - start))
        print(f'round {round_index + 1}/{args.rounds} done', flush=True)

    base = runs[0]['times']
    rows = [dict(variant=run['name'], compile_options=run['options'], overrides=run['overrides'],
                 step_ms_median=statistics.median(run['times']), step_ms_min=min(run['times']),
                 step_ms_max=max(run['times']), step_ms=run['times'],
                 ratio_to_first=[t / b for t, b in zip(run['times'], base)], compile_s=run['compile_s'],
                 first_loss=run['first_loss'], first_grad_norm=run['first_grad_norm']) for run in runs]
    lines = [f'train step, {args.config}{" (smoke)" if args.smoke else ""}, batch {args.batch_size}, '
             f'{args.rounds} rounds, {jax.devices()[0].platform} x{mesh.size}', '',
             f'| variant | ms / step, median (min-max) | / {runs[0]["name"]} per round | compile s | first loss |',
             '| --- | --- | --- | --- | --- |']
    for row in rows:
        ratios = ' '.join(f'{r:.3f}' for r in row['ratio_to_first'])
        lines.append(f'| {row["variant"]} | {row["step_ms_median"]:.0f} ({row["step_ms_min"]:.0f}-'
                     f'{row["step_ms_max"]:.0f}) | {ratios} | {row["compile_s"]:.1f} | {row["first_loss"]:.7f} |')
    print('\n'.join(lines))
    result = dict(benchmark='ab_in_process', date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  device=bench_train.device_info(), config=args.config, smoke=args.smoke,
                  batch_size=args.batch_size, rounds=args.rounds, rows=rows)
    if args.out:
        bench_train.write_json(args.out, result)
    return result


if __name__ == '__main__':
    main()
