"""Start-up to the first train step done, with JAX's persistent compilation cache cold and warm.

    python experiments/bench_startup.py --rounds=3 --out=startup.json        # digits default + CIFAR-10 batch 8
    python experiments/bench_startup.py --cases=digits --rounds=1             # seconds to a minute

Each measurement is a fresh Python process (`--child`) that does what `train.train` does before its first step:
import ddpm_jax, build the mesh, the step-0 state (`train.create_train_state`; a fresh workdir has no checkpoint,
so `train.train` builds no abstract state for a restore), the compiled step (`train.make_train_step`), and one
step on a synthetic batch up to `block_until_ready`. The wall time runs from just before the process is spawned to that point (so the
interpreter start and the imports count), with the phases reported apart.

Per round and case: `cold` uses a new, empty cache directory, `warm` the directory the cold run just filled
(what a resume, an evaluation mode or a rerun of the same command finds), `off` no cache
(compile_cache_dir=''); the kinds run interleaved, round by round, so that machine load hits all alike.
The table gives the median over rounds with the min-max range, and warm/cold per round.
"""
import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# case name -> (config file, overrides). digits: the embedded default as the README runs it.
CASES = {
    'digits': ('configs/digits.py', {}),
    'cifar10_b8': ('configs/cifar10.py', {'training.batch_size': 8}),
}
KINDS = ('cold', 'warm', 'off')


def child(config_path: str, overrides: dict, cache_dir: str, spawned_at: float) -> dict:
    """Runs in the fresh process: phases from `spawned_at` (the parent's clock before spawning) to the first step."""
    marks = {'interpreter': time.time() - spawned_at}
    from ddpm_jax import host_memory  # pylint: disable=g-import-not-at-top
    host_memory.keep_freed_memory()   # as ddpm_jax.main does
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    from ddpm_jax import compile_cache, config_files, parallel, train  # pylint: disable=g-import-not-at-top
    from experiments import bench_train  # pylint: disable=g-import-not-at-top
    marks['imports'] = time.time() - spawned_at
    config = config_files.load_config_file(os.path.join(REPO_ROOT, config_path))
    config.update_from_flattened_dict(overrides)
    compile_cache.enable(cache_dir)
    mesh = parallel.make_mesh()
    state = jax.block_until_ready(train.create_train_state(config, mesh))
    marks['state'] = time.time() - spawned_at
    step = train.make_train_step(config, mesh)
    batch = bench_train.synthetic_batches(config, 1, config.training.batch_size)
    state, metrics = step(state, parallel.shard_batch(batch, mesh, batch_axis=1))
    loss = float(np.asarray(jax.block_until_ready(metrics)['loss'])[0])
    marks['first_step'] = time.time() - spawned_at
    return dict(marks, loss=loss)


def measure(case: str, kind: str, cache_dir: str, timeout_s: float) -> dict:
    """Spawns one child; returns its phases (seconds since the spawn) or {'error': ...}."""
    config_path, overrides = CASES[case]
    env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
    env['PYTHONPATH'] = os.pathsep.join([REPO_ROOT, env.get('PYTHONPATH', '')])
    command = [sys.executable, os.path.abspath(__file__), '--child', json.dumps([config_path, overrides,
                                                                                 cache_dir if kind != 'off' else ''])]
    spawned_at = time.time()
    process = subprocess.Popen(command + [repr(spawned_at)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return dict(case=case, kind=kind, error=f'timed out after {timeout_s} s')
    if process.returncode != 0:
        return dict(case=case, kind=kind, error=err.strip().splitlines()[-1] if err.strip() else 'failed')
    return dict(json.loads(out.strip().splitlines()[-1]), case=case, kind=kind)


def summarize(runs: list[dict], cases: list[str], kinds: list[str]) -> list[dict]:
    """Per (case, kind): median and range of each phase over the rounds; warm/cold per round."""
    rows = []
    for case in cases:
        for kind in kinds:
            good = [r for r in runs if r['case'] == case and r['kind'] == kind and 'error' not in r]
            if not good:
                continue
            row = dict(case=case, kind=kind, rounds=len(good))
            for phase in ('imports', 'state', 'first_step'):
                values = [r[phase] for r in good]
                row[phase] = dict(median=statistics.median(values), min=min(values), max=max(values))
            rows.append(row)
        by_round = {}
        for r in runs:
            if r['case'] == case and 'error' not in r:
                by_round.setdefault(r['round'], {})[r['kind']] = r['first_step']
        ratios = [k['warm'] / k['cold'] for k in by_round.values() if 'warm' in k and 'cold' in k]
        for row in rows:
            if row['case'] == case and row['kind'] == 'warm' and ratios:
                row['warm_over_cold'] = dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios))
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(stat):
        return f"{stat['median']:.1f} ({stat['min']:.1f}-{stat['max']:.1f})"
    lines = ['| case | cache | rounds | imports done s | step-0 state ready s | first step done s | warm / cold (first step) |',
             '| --- | --- | --- | --- | --- | --- | --- |']
    for row in rows:
        ratio = row.get('warm_over_cold')
        ratio_cell = f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})" if ratio else '–'
        lines.append(f"| {row['case']} | {row['kind']} | {row['rounds']} | {cell(row['imports'])} | "
                     f"{cell(row['state'])} | {cell(row['first_step'])} | {ratio_cell} |")
    return '\n'.join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cases', default=','.join(CASES), help=f'comma list of {list(CASES)}')
    parser.add_argument('--kinds', default=','.join(KINDS), help=f'comma list of {list(KINDS)}')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--timeout_s', type=float, default=900.0, help='per child process')
    parser.add_argument('--out', default=None, help='JSON result path')
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(',') if c]
    kinds = [k for k in args.kinds.split(',') if k]
    for name, allowed in ((cases, CASES), (kinds, KINDS)):
        unknown = [n for n in name if n not in allowed]
        if unknown:
            raise SystemExit(f'unknown {unknown}; allowed: {list(allowed)}')
    if 'warm' in kinds and 'cold' not in kinds:
        raise SystemExit('--kinds: warm needs cold (the warm run reuses the cache the cold run filled)')
    runs = []
    for round_index in range(args.rounds):
        for case in cases:
            cache_dir = tempfile.mkdtemp(prefix='ddpm_jax_startup_cache_')
            try:
                for kind in kinds:
                    run = measure(case, kind, cache_dir, args.timeout_s)
                    run['round'] = round_index
                    runs.append(run)
                    print(json.dumps(run), flush=True)
            finally:
                shutil.rmtree(cache_dir, ignore_errors=True)
    import jax  # pylint: disable=g-import-not-at-top
    rows = summarize(runs, cases, kinds)
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                  jax_version=jax.__version__, cpu_count=os.cpu_count(), load_average=os.getloadavg(),
                  xla_flags=os.environ.get('XLA_FLAGS', ''), cases={c: CASES[c] for c in cases}, runs=runs,
                  rows=rows)
    print(format_table(rows))
    if args.out:
        with open(args.out, 'w') as out:
            json.dump(result, out, indent=1)
    return result


if __name__ == '__main__':
    if len(sys.argv) == 4 and sys.argv[1] == '--child':
        config_path_, overrides_, cache_dir_ = json.loads(sys.argv[2])
        print(json.dumps(child(config_path_, overrides_, cache_dir_, float(sys.argv[3]))))
    else:
        main()
