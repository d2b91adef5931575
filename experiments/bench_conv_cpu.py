"""The U-Net's convolutions one by one: ddpm_jax's XLA:CPU programs against PyTorch's on the same cores.

    python experiments/bench_conv_cpu.py --config=configs/cifar10.py --batch_sizes=8,32 --threads=2 --out=conv.json
    python experiments/bench_conv_cpu.py --smoke            # seconds; PyTorch only when installed

Which convolutions: every `conv_general_dilated` of the model's training forward pass with model.conv3x3='xla',
found by tracing the U-Net (`jax.make_jaxpr`, abstract parameters), grouped by input shape, kernel shape, strides and padding, with how often
each occurs. The CIFAR-10 network has 61 convolutions in 28 such groups (each of its three subpixel
upsamplings is four 2x2 convolutions with different paddings).

What is timed per shape, as the train step needs it: the forward convolution and both gradients (input and
kernel) for a random cotangent, in one program:
  * ddpm_jax: what the train step compiles for that shape under the config's model.conv3x3 (`algorithm` in the
    table): Winograd F(4x4, 3x3) (`ddpm_jax.models.winograd.conv3x3`) with its own gradients ('winograd') or
    XLA's ('winograd+xla_grads') where `winograd.plan` picks it, else XLA's convolution ('xla'); all through
    `ddpm_jax.xla_cpu.jit` (on CPU, XLA's Eigen convolutions);
  * eigen: XLA's convolution through `ddpm_jax.xla_cpu.jit` for every shape (ddpm_jax with model.conv3x3='xla'),
    when asked for with --impls;
  * xla_default: plain `jax.jit` (XLA:CPU's default, YNNPACK's convolutions), when asked for with --impls;
  * torch: `torch.nn.functional.conv2d` and `backward()` (NCHW, the same function: asymmetric padding through
    `F.pad`), with `torch.set_num_threads(--threads)`; skipped with a note when PyTorch is not installed.
The first layer's input gradient is not needed by a train step; it is timed with the others (that layer is
under 0.5% of the total).
Before timing, each shape's three results are compared with ddpm_jax's (largest difference / largest value; an
error above 1e-4 means the two computed different functions and stops the run). Rounds interleave the
implementations (order reversed every other round). Each implementation's turn starts with an untimed call, then
--calls timed ones back to back, as the convolutions of a train step follow other work of the same runtime: after
each call PyTorch's OpenMP threads spin for a few ms, and in this one process that slowed the JAX call right
after it (a 10 ms convolution by up to 60%); the untimed call absorbs it (and JAX's own threads' wake-up) on
either side. Per shape the median over all timed calls, GFLOP/s (3 convolutions' worth of multiply-adds), and
`total`: the sum of count x median, the convolutions' share of one train step.

Only the kernels are compared: the networks around them (GroupNorm, attention, the optimiser) are
bench_cpu_vs_torch.py's. Threads: JAX's CPU client uses every core it sees; run on a machine (or under
`taskset`) with as many cores as --threads for an even comparison.
"""
import argparse
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # pylint: disable=wrong-import-position  (config loading, device info, JSON)

import jax  # pylint: disable=wrong-import-position,g-bad-import-order
import numpy as np  # pylint: disable=wrong-import-position,g-bad-import-order

from ddpm_jax import xla_cpu  # pylint: disable=wrong-import-position
from ddpm_jax.models import params as params_lib  # pylint: disable=wrong-import-position
from ddpm_jax.models import unet  # pylint: disable=wrong-import-position
from ddpm_jax.models import winograd  # pylint: disable=wrong-import-position

IMPLS = ('ddpm_jax', 'eigen', 'xla_default', 'torch')
MAX_DISAGREEMENT = 1e-4   # float32 sums in another order: 1e-6 - 1e-5 of the largest value seen (CIFAR-10, batch 32)


def _sub_jaxprs(value):
    """The jaxprs held by one equation parameter (a jaxpr, a closed jaxpr, or a tuple / list of them)."""
    if hasattr(value, 'eqns'):
        yield value
    elif hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def _convolutions_in(jaxpr) -> list[tuple]:
    """[(input shape, kernel shape, strides, padding), ...] of every conv_general_dilated in jaxpr, nested
    jaxprs (jit, custom_vjp, remat, loops) included, each occurrence once."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'conv_general_dilated':
            p = eqn.params
            lhs_spec, rhs_spec, out_spec = p['dimension_numbers']
            if (p['feature_group_count'] != 1 or p['batch_group_count'] != 1 or set(p['lhs_dilation']) != {1}
                    or set(p['rhs_dilation']) != {1} or (lhs_spec, rhs_spec, out_spec) != ((0, 3, 1, 2),
                                                                                            (3, 2, 0, 1),
                                                                                            (0, 3, 1, 2))):
                raise ValueError(f'only NHWC/HWIO convolutions without dilation or groups are benchmarked; got '
                                 f'{p["dimension_numbers"]}, groups {p["feature_group_count"]}')
            found.append((tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape),
                          tuple(p['window_strides']), tuple(tuple(pad) for pad in p['padding'])))
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                found.extend(_convolutions_in(sub))
    return found


def conv_layers(config, batch_size: int) -> list[dict]:
    """The convolutions of `unet.create_model(config)`'s training forward pass at batch_size, grouped:
    [{'input': [B, H, W, C_in], 'kernel': [kh, kw, C_in, C_out], 'strides', 'padding', 'count', 'algorithm'}], in
    order of first occurrence. Traced with model.conv3x3='xla', so that every convolution shows. 'algorithm': for
    the groups that the config's own model.conv3x3 computes as winograd.conv3x3 on this platform (they vanish from
    its trace) 'winograd' or 'winograd+xla_grads' (`winograd.plan`'s choice of gradients), else 'xla'."""
    xla_config = config.copy_and_resolve_references()
    xla_config.model.conv3x3 = 'xla'
    counts = _convolution_counts(xla_config, batch_size)
    remaining = _convolution_counts(config, batch_size)
    return [dict(input=list(k[0]), kernel=list(k[1]), strides=list(k[2]), padding=[list(p) for p in k[3]],
                 count=n, algorithm=_algorithm(config, k) if remaining.get(k) != n else 'xla')
            for k, n in counts.items()]


def _algorithm(config, key: tuple) -> str:
    """'winograd' or 'winograd+xla_grads': how winograd.conv3x3 computes the convolution `key`'s gradients."""
    gradients = winograd.plan(config.model.conv3x3, key[0], key[1], np.float32, jax.default_backend())
    return 'winograd' if gradients == 'winograd' else 'winograd+xla_grads'


def _convolution_counts(config, batch_size: int) -> dict:
    """{(input shape, kernel shape, strides, padding): how often} over the traced training forward pass."""
    model, shape = unet.create_model(config), params_lib.image_shape(config.data)
    params = params_lib.abstract_params(model, shape)
    x = jax.ShapeDtypeStruct((batch_size, *shape), np.float32)
    t = jax.ShapeDtypeStruct((batch_size,), np.int32)

    def forward(p, x, t):
        return model.apply({'params': p}, x, t, train=True, rngs={'dropout': jax.random.key(0)})
    counts = {}
    for key in _convolutions_in(jax.make_jaxpr(forward)(params, x, t).jaxpr):
        counts[key] = counts.get(key, 0) + 1
    return counts


def gflop(layer: dict) -> float:
    """Multiply-adds x 2 of the forward convolution and its two gradients (each as many as the forward)."""
    batch, _, _, _ = layer['input']
    kh, kw, c_in, c_out = layer['kernel']
    out_h, out_w = _output_size(layer)
    return 3 * 2 * batch * out_h * out_w * kh * kw * c_in * c_out / 1e9


def _output_size(layer: dict) -> tuple[int, int]:
    _, height, width, _ = layer['input']
    kh, kw, _, _ = layer['kernel']
    (pt, pb), (pl, pr) = layer['padding']
    sh, sw = layer['strides']
    return (height + pt + pb - kh) // sh + 1, (width + pl + pr - kw) // sw + 1


def random_operands(layer: dict, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 input [B, H, W, C_in], kernel [kh, kw, C_in, C_out] (fan-in scaled) and output cotangent."""
    rng = np.random.default_rng(seed)
    kh, kw, c_in, c_out = layer['kernel']
    x = rng.standard_normal(layer['input'], dtype=np.float32)
    kernel = (rng.standard_normal(layer['kernel'], dtype=np.float32) / np.sqrt(kh * kw * c_in)).astype(np.float32)
    cotangent = rng.standard_normal((layer['input'][0], *_output_size(layer), c_out), dtype=np.float32)
    return x, kernel, cotangent


def jax_program(layer: dict, impl: str):
    """(x, kernel, cotangent) -> (y, dx, dkernel), all NHWC / HWIO, compiled as `impl` compiles it."""
    strides, padding = tuple(layer['strides']), tuple(tuple(p) for p in layer['padding'])
    algorithm = layer.get('algorithm', 'xla') if impl == 'ddpm_jax' else 'xla'

    def conv(x, kernel):
        if algorithm != 'xla':
            return winograd.conv3x3(x, kernel, 'winograd' if algorithm == 'winograd' else 'xla')
        return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    def forward_and_gradients(x, kernel, cotangent):
        y, vjp = jax.vjp(conv, x, kernel)
        return (y, *vjp(cotangent))
    return (jax.jit if impl == 'xla_default' else xla_cpu.jit)(forward_and_gradients)


class TorchConv:
    """The same convolution in PyTorch: forward and backward of conv2d on NCHW copies of the operands."""

    def __init__(self, torch, layer: dict, x: np.ndarray, kernel: np.ndarray, cotangent: np.ndarray):
        self.torch, self.layer = torch, layer
        self.x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
        self.kernel = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous().requires_grad_(True)
        self.cotangent = torch.from_numpy(cotangent).permute(0, 3, 1, 2).contiguous()

    def __call__(self) -> tuple:
        functional = self.torch.nn.functional
        (pt, pb), (pl, pr) = self.layer['padding']
        self.x.grad = self.kernel.grad = None
        if pt == pb and pl == pr:
            y = functional.conv2d(self.x, self.kernel, stride=tuple(self.layer['strides']), padding=(pt, pl))
        else:
            y = functional.conv2d(functional.pad(self.x, (pl, pr, pt, pb)), self.kernel,
                                  stride=tuple(self.layer['strides']))
        y.backward(self.cotangent)
        return y, self.x.grad, self.kernel.grad

    def as_nhwc(self, results: tuple) -> list[np.ndarray]:
        y, dx, dkernel = (r.detach().numpy() for r in results)
        return [y.transpose(0, 2, 3, 1), dx.transpose(0, 2, 3, 1), dkernel.transpose(2, 3, 1, 0)]


def disagreement(results: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Largest |difference| / largest |reference value| over y, dx and dkernel (each scaled by its own)."""
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))) /
                     max(float(np.max(np.abs(b))), 1e-30)) for a, b in zip(results, reference))


def bench_layer(layer: dict, impls: list[str], torch, rounds: int, seed: int, calls: int = 2) -> dict:
    """Times one shape: per implementation the times (ms) of `calls` timed calls per round, each turn after one
    untimed call; checks agreement first."""
    x, kernel, cotangent = random_operands(layer, seed)
    runners, reference = {}, None
    for impl in impls:
        if impl == 'torch':
            torch_conv = TorchConv(torch, layer, x, kernel, cotangent)
            runners[impl] = torch_conv
            results = torch_conv.as_nhwc(torch_conv())
        else:
            operands = [jax.device_put(a) for a in (x, kernel, cotangent)]
            program = jax_program(layer, impl).lower(*operands).compile()
            runners[impl] = (lambda program=program, operands=operands:
                             jax.block_until_ready(program(*operands)))
            results = [np.asarray(r) for r in runners[impl]()]
        if reference is None:
            reference, errors = results, {impl: 0.0}
        else:
            errors[impl] = disagreement(results, reference)
            if errors[impl] > MAX_DISAGREEMENT:
                raise RuntimeError(f'{impl} and {impls[0]} disagree on the convolution {layer}: largest difference '
                                   f'{errors[impl]:.2e} of the largest value (> {MAX_DISAGREEMENT:g})')
    times = {impl: [] for impl in impls}
    for round_index in range(rounds):
        for impl in (impls if round_index % 2 == 0 else impls[::-1]):
            runners[impl]()
            for _ in range(calls):
                start = time.perf_counter()
                runners[impl]()
                times[impl].append(1e3 * (time.perf_counter() - start))
    return dict(layer, gflop=gflop(layer), disagreement=errors, ms=times,
                ms_median={impl: statistics.median(t) for impl, t in times.items()})


def summarize(rows: list[dict], impls: list[str]) -> dict:
    """Per implementation: sum over shapes of count x median ms (one train step's convolutions), GFLOP/s."""
    total_gflop = sum(row['count'] * row['gflop'] for row in rows)
    totals = {impl: sum(row['count'] * row['ms_median'][impl] for row in rows) for impl in impls}
    return dict(gflop=total_gflop, ms=totals, gflop_s={impl: total_gflop / (ms / 1e3) for impl, ms in totals.items()})


def _padding_text(padding: list) -> str:
    """((1, 1), (1, 1)) -> '1'; otherwise 'top-bottom, left-right' as e.g. '0-1, 0-1'."""
    (pt, pb), (pl, pr) = padding
    return str(pt) if pt == pb == pl == pr else f'{pt}-{pb}, {pl}-{pr}'


def format_table(batch_size: int, rows: list[dict], summary: dict, impls: list[str]) -> str:
    first = impls[0]
    head = ' | '.join(f'{impl} ms' for impl in impls)
    ratios = ' | '.join(f'{impl} / {first}' for impl in impls[1:])
    lines = [f'batch {batch_size}: forward + input and kernel gradients, median ms over the timed calls', '',
             f'| input [B, H, W, C] | kernel | stride, padding | count | algorithm | {head} | {ratios} | '
             f'{first} GFLOP/s |',
             '| --- | --- | --- | --- | --- |' + ' --- |' * (2 * len(impls))]
    for row in rows:
        ms = row['ms_median']
        cells = ' | '.join(f'{ms[impl]:.1f}' for impl in impls)
        ratio_cells = ' | '.join(f'{ms[impl] / ms[first]:.2f}' for impl in impls[1:])
        lines.append(f'| {row["input"]} | {row["kernel"][0]}x{row["kernel"][1]}, {row["kernel"][2]} -> '
                     f'{row["kernel"][3]} | {row["strides"][0]}, {_padding_text(row["padding"])} | {row["count"]} | '
                     f'{row["algorithm"]} | {cells} | '
                     f'{ratio_cells} | '
                     f'{row["gflop"] / (ms[first] / 1e3):.0f} |')
    cells = ' | '.join(f'{summary["ms"][impl]:.0f}' for impl in impls)
    ratio_cells = ' | '.join(f'{summary["ms"][impl] / summary["ms"][first]:.2f}' for impl in impls[1:])
    lines.append(f'| total (count x median) | | | {sum(r["count"] for r in rows)} | | {cells} | {ratio_cells} | '
                 f'{summary["gflop_s"][first]:.0f} |')
    return '\n'.join(lines)


def import_torch(threads: int):
    """torch with `threads` threads, or None when it is not installed."""
    try:
        import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
        return None
    if threads:
        torch.set_num_threads(threads)
    return torch


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='configs/cifar10.py')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='config override')
    parser.add_argument('--batch_sizes', default=None, help='comma list (default 8,32; smoke 2)')
    parser.add_argument('--impls', default='ddpm_jax,torch', help=f'comma list of {",".join(IMPLS)}; the first is '
                        'the reference of the ratios and the agreement check')
    parser.add_argument('--rounds', type=int, default=None, help='rounds per shape (default 5; smoke 2)')
    parser.add_argument('--calls', type=int, default=2, help='timed calls per implementation and round')
    parser.add_argument('--threads', type=int, default=2, help="PyTorch's intra-op threads (0: its default)")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default=None, help='JSON result path')
    parser.add_argument('--smoke', action='store_true', help='the tiny config: seconds on a CPU')
    args = parser.parse_args(argv)
    impls = [impl for impl in args.impls.split(',') if impl]
    if not impls or any(impl not in IMPLS for impl in impls) or len(set(impls)) != len(impls):
        raise ValueError(f'--impls={args.impls!r}: a comma list of distinct names from {IMPLS}')
    if impls[0] == 'torch':
        raise ValueError('--impls: put a JAX implementation first (the reference of the ratios)')
    batch_sizes = bench_train.parse_list(args.batch_sizes or ('2' if args.smoke else '8,32'), int, 'batch_sizes')
    rounds = args.rounds or (2 if args.smoke else 5)
    if rounds < 1 or args.calls < 1 or min(batch_sizes) < 1:
        raise ValueError(f'--rounds, --calls and --batch_sizes must be >= 1, got {rounds}, {args.calls} and '
                         f'{batch_sizes}')
    torch = import_torch(args.threads) if 'torch' in impls else None
    if 'torch' in impls and torch is None:
        print('PyTorch is not installed: timing the JAX implementations only (pip install torch for the '
              'comparison)', flush=True)
        impls.remove('torch')
    overrides = (bench_train.smoke_override_words() if args.smoke else []) + args.set
    config, parsed = bench_train.load_config(args.config, overrides)
    result = dict(benchmark='bench_conv_cpu', date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  device=bench_train.device_info(), config=args.config, smoke=args.smoke, overrides=parsed,
                  impls=impls, rounds=rounds, calls=args.calls, threads=args.threads,
                  torch_version=None if torch is None else torch.__version__, batches=[])
    for batch_size in batch_sizes:
        rows = []
        for index, layer in enumerate(conv_layers(config, batch_size)):
            rows.append(bench_layer(layer, impls, torch, rounds, args.seed + index, args.calls))
            print(f'batch {batch_size}: {layer["input"]} {layer["kernel"]} x{layer["count"]}: '
                  + ', '.join(f'{impl} {rows[-1]["ms_median"][impl]:.1f} ms' for impl in impls), flush=True)
        summary = summarize(rows, impls)
        result['batches'].append(dict(batch_size=batch_size, rows=rows, summary=summary))
        print('\n' + format_table(batch_size, rows, summary, impls) + '\n', flush=True)
    if args.out:
        bench_train.write_json(args.out, result)
    return result


if __name__ == '__main__':
    main()
