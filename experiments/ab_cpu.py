"""Interleaved A/B runs of bench_train.py / bench_sample.py under different XLA_FLAGS or config switches.

    python experiments/ab_cpu.py --rounds=5 \
        --variant='base=' \
        --variant='onednn=XLA_FLAGS=--xla_cpu_use_onednn=true' \
        --variant='fast_variance=--set model.fast_variance=True' \
        -- experiments/bench_train.py --config=configs/cifar10.py --dtypes=float32 --batch_sizes=8 --steps=10

Every variant is one fresh process of the benchmark command after `--` (XLA flags only take effect at process
start), with its words added: `NAME=ENV=VALUE` words set environment variables (XLA_FLAGS is appended to any
already set), the other words are appended to the command. Each round runs every variant once, in a rotated
order, so that load changes hit all alike. Reported per variant: the median over rounds of the benchmark's
`step_ms_median` (min-max) and, per round, the ratio to the first variant's step time (< 1: faster).
"""
import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_variant(text: str) -> tuple[str, dict, list]:
    """'name=WORDS' -> (name, env {VAR: value}, extra command words)."""
    name, sep, words = text.partition('=')
    if not sep or not name:
        raise SystemExit(f'--variant {text!r}: expected NAME=WORDS, e.g. base= or fv=--set model.fast_variance=True')
    env, extra = {}, []
    for word in shlex.split(words):
        key, eq, value = word.partition('=')
        if eq and key.isupper() and not key.startswith('-'):
            env[key] = value
        else:
            extra.append(word)
    return name, env, extra


def run_once(command: list, env_extra: dict, timeout_s: float) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get('PYTHONPATH', '')]))
    for key, value in env_extra.items():
        env[key] = (env.get(key, '') + ' ' + value).strip() if key == 'XLA_FLAGS' else value
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'result.json')
        process = subprocess.run([sys.executable, *command, f'--out={out}'], cwd=REPO_ROOT, env=env,
                                 capture_output=True, text=True, timeout=timeout_s, check=False)
        if process.returncode != 0:
            return dict(error=process.stderr.strip().splitlines()[-1] if process.stderr.strip() else 'failed')
        with open(out) as result:
            rows = [r for r in json.load(result)['rows'] if r.get('status') == 'ok']
    if not rows:
        return dict(error='no ok row')
    return dict(step_ms=rows[0]['step_ms_median'], compile_s=rows[0].get('compile_s'), loss=rows[0].get('last_loss'))


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if '--' not in argv:
        raise SystemExit('give the benchmark command after --, e.g. -- experiments/bench_train.py --smoke')
    split = argv.index('--')
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--variant', action='append', required=True, help='NAME=WORDS; the first is the baseline')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--timeout_s', type=float, default=1200.0)
    parser.add_argument('--out', default=None)
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    variants = [parse_variant(v) for v in args.variant]
    runs = []
    for round_index in range(args.rounds):
        shift = round_index % len(variants)
        for name, env, extra in variants[shift:] + variants[:shift]:
            run = dict(run_once(command + extra, env, args.timeout_s), variant=name, round=round_index)
            runs.append(run)
            print(json.dumps(run), flush=True)
    base = variants[0][0]
    rows = []
    for name, env, extra in variants:
        mine = {r['round']: r['step_ms'] for r in runs if r['variant'] == name and 'step_ms' in r}
        base_times = {r['round']: r['step_ms'] for r in runs if r['variant'] == base and 'step_ms' in r}
        if not mine:
            rows.append(dict(variant=name, env=env, extra=extra, error=[r.get('error') for r in runs
                                                                         if r['variant'] == name][:1]))
            continue
        ratios = [mine[r] / base_times[r] for r in mine if r in base_times]
        values = list(mine.values())
        rows.append(dict(variant=name, env=env, extra=extra, rounds=len(values), step_ms=dict(
            median=statistics.median(values), min=min(values), max=max(values)),
            ratio=dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios)) if ratios else None))
    lines = ['| variant | rounds | ms / step median (min-max) | / baseline per round median (min-max) |',
             '| --- | --- | --- | --- |']
    for row in rows:
        if 'error' in row:
            lines.append(f"| {row['variant']} | 0 | failed: {row['error']} | |")
            continue
        ms, ratio = row['step_ms'], row['ratio']
        ratio_cell = f"{ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})" if ratio else '–'
        lines.append(f"| {row['variant']} | {row['rounds']} | {ms['median']:.1f} ({ms['min']:.1f}-{ms['max']:.1f}) | "
                     f"{ratio_cell} |")
    print('\n'.join(lines))
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                  load_average=os.getloadavg(), command=command, runs=runs, rows=rows)
    if args.out:
        with open(args.out, 'w') as out:
            json.dump(result, out, indent=1)
    return result


if __name__ == '__main__':
    main()
