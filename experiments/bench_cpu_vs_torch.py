"""ddpm_jax against the same network in PyTorch (diffusers' UNet2DModel), side by side on the CPU.

    pip install -e '.[bench]'         # torch==2.13.0 (CPU) and diffusers; never needed by the package or tests
    python experiments/bench_cpu_vs_torch.py --threads=2 --out=cpu_vs_torch.json
    python experiments/bench_cpu_vs_torch.py --train_batches=2 --sample_batches=2 --rounds=2 --steps=1   # smoke

The network: UNet2DModel with the DDPM CIFAR-10 configuration (that of google/ddpm-cifar10-32, dropout 0.1):
35,746,307 parameters, initialised by torch with --seed; ddpm_jax reads the same weights through its diffusers
converter (`ddpm_jax.convert.diffusers_to_flax`, config checked by `check_diffusers_config`). Before timing, both
compute, with dropout off, the network output and the eps-MSE loss and gradient norm on one fixed batch; the
table's header shows how far they agree.

The work, identical on both sides (float32):
  * train step: t ~ U{0..T-1}, noise ~ N(0, I), x_t = q_sample(x_0, t, noise), eps-MSE loss, backward, clip
    at global norm 1.0, Adam (lr 2e-4 with the 5000-step warmup, betas 0.9/0.999, eps 1e-8), EMA 0.9999 of the
    params. ddpm_jax: the real `train.make_train_step` (state donated); torch: the same in eager mode with
    `torch.optim.Adam(foreach=True)`, `clip_grad_norm_` and `torch._foreach_lerp_` for the EMA.
  * sampling step: one ancestral step of the paper (network, clipped x_0 prediction, posterior mean,
    fixedlarge variance, fresh noise) at t = 500. ddpm_jax: `diffusion.p_sample` on the network output in one
    jit; torch: the same formulas under `torch.inference_mode()`.
Each step is timed on the wall clock until its result is on the host (synced).

Each implementation runs in its own worker process (its own peak memory, its own start-up); the parent sends
them work round by round, alternating which goes first; in a round each does --steps steps of every setting
after the untimed warm-up of setup. Reported per setting: the median step time over rounds (min-max of the
per-round medians), and the per-round ratio torch time / ddpm_jax time (> 1: ddpm_jax is faster). Also the
time from spawning each worker to its first train step done (imports, weights, compilation) and each
worker's peak resident memory. --threads limits both to that many cores (CPU affinity, inherited by the
workers, and torch.set_num_threads); 0 keeps the machine's.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# diffusers' UNet2DModel config of the DDPM CIFAR-10 network (google/ddpm-cifar10-32's config.json).
DIFFUSERS_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type='positional',
    freq_shift=1, flip_sin_to_cos=False, down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D',
                                                           'DownBlock2D'),
    up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'), block_out_channels=(128, 256, 256, 256),
    layers_per_block=2, mid_block_scale_factor=1, downsample_padding=0, act_fn='silu', attention_head_dim=None,
    norm_num_groups=32, norm_eps=1e-6, resnet_time_scale_shift='default', dropout=0.1)
CIFAR10_PARAMS = 35_746_307
SAMPLE_T = 500
CHECK_T = (10, 500)


# --------------------------------------------------------------------------------------------- the workers

def synthetic_images(batch: int, seed: int) -> np.ndarray:
    """[B, 32, 32, 3] float32 in [-1, 1] from random uint8, as the data pipeline maps images."""
    return np.random.default_rng(seed).integers(0, 256, (batch, 32, 32, 3)).astype(np.float32) / 127.5 - 1.0


def check_inputs() -> dict:
    """The fixed batch of the agreement check (NHWC): x_start, noise, t."""
    rng = np.random.default_rng(1234)
    x_start = synthetic_images(len(CHECK_T), 1234)
    return dict(x_start=x_start, noise=rng.standard_normal(x_start.shape).astype(np.float32),
                t=np.asarray(CHECK_T, np.int32))


def diffusion_tables(config) -> dict:
    """float64 numpy tables of the paper's schedule (official diffusion_utils_2.py), for the torch side."""
    from ddpm_jax import schedules  # pylint: disable=g-import-not-at-top
    d = config.diffusion
    betas = schedules.get_beta_schedule(d.beta_schedule, beta_start=d.beta_start, beta_end=d.beta_end,
                                        num_diffusion_timesteps=d.num_diffusion_timesteps)
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # fixedlarge: log(beta_t), with posterior_variance[1] at t = 0 (official quirk).
    log_variance = np.log(np.append(posterior_variance[1], betas[1:]))
    return dict(sqrt_ac=np.sqrt(alphas_cumprod), sqrt_1m_ac=np.sqrt(1.0 - alphas_cumprod),
                sqrt_recip_ac=np.sqrt(1.0 / alphas_cumprod), sqrt_recipm1_ac=np.sqrt(1.0 / alphas_cumprod - 1.0),
                coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
                coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
                log_variance=log_variance)


class TorchWorker:
    """The diffusers network in eager PyTorch; writes the initial weights for the JAX worker."""

    def __init__(self, args: dict):
        import torch  # pylint: disable=g-import-not-at-top
        from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top

        from ddpm_jax import config_files  # pylint: disable=g-import-not-at-top
        self.torch = torch
        if args['threads']:
            torch.set_num_threads(args['threads'])
        torch.manual_seed(args['seed'])
        self.config = config_files.load_config_file(os.path.join(REPO_ROOT, 'configs', 'cifar10.py'))
        self.model = UNet2DModel(**DIFFUSERS_CIFAR10)
        state = {k: v.detach().numpy() for k, v in self.model.state_dict().items()}
        np.savez(args['weights'], **state)
        with open(args['weights'] + '.json', 'w') as out:
            json.dump(dict(self.model.config), out, default=list)
        self.params = [p for p in self.model.parameters()]
        self.ema = [p.detach().clone() for p in self.params]
        optim = self.config.optim
        self.optimizer = torch.optim.Adam(self.params, lr=0.0, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                                          foreach=True)
        self.tables = {k: torch.from_numpy(v.astype(np.float32)) for k, v in diffusion_tables(self.config).items()}
        self.generator = torch.Generator().manual_seed(args['seed'])
        self.step_count = 0

    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def _gather(self, name, t):
        return self.tables[name][t].view(-1, 1, 1, 1)

    def check(self, inputs: dict) -> dict:
        torch = self.torch
        self.model.eval()
        x_start = torch.from_numpy(inputs['x_start']).permute(0, 3, 1, 2)
        noise = torch.from_numpy(inputs['noise']).permute(0, 3, 1, 2)
        t = torch.from_numpy(inputs['t']).long()
        x_t = self._gather('sqrt_ac', t) * x_start + self._gather('sqrt_1m_ac', t) * noise
        output = self.model(x_t, t).sample
        loss = torch.mean((output - noise) ** 2)
        grads = torch.autograd.grad(loss, self.params)
        grad_norm = torch.sqrt(sum(torch.sum(g.double() ** 2) for g in grads))
        self.model.train()
        return dict(output=output.permute(0, 2, 3, 1).detach().numpy(), loss=float(loss.detach()),
                    grad_norm=float(grad_norm))

    def train_step(self, images: np.ndarray) -> float:
        torch = self.torch
        optim = self.config.optim
        x_start = torch.from_numpy(images).permute(0, 3, 1, 2)
        t = torch.randint(0, len(self.tables['sqrt_ac']), (x_start.shape[0],), generator=self.generator)
        noise = torch.randn(x_start.shape, generator=self.generator)
        x_t = self._gather('sqrt_ac', t) * x_start + self._gather('sqrt_1m_ac', t) * noise
        loss = torch.mean((self.model(x_t, t).sample - noise) ** 2)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, optim.grad_clip, foreach=True)
        for group in self.optimizer.param_groups:
            group['lr'] = optim.lr * min(self.step_count / optim.warmup_steps, 1.0)
        self.optimizer.step()
        decay = 0.0 if self.step_count == 0 else optim.ema_decay
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - decay)  # pylint: disable=protected-access
        self.step_count += 1
        return float(loss.detach())

    def sample_step(self, x: np.ndarray) -> float:
        torch = self.torch
        with torch.inference_mode():
            x_t = torch.from_numpy(x).permute(0, 3, 1, 2)
            t = torch.full((x_t.shape[0],), SAMPLE_T, dtype=torch.long)
            eps = self.model(x_t, t).sample
            x_start = (self._gather('sqrt_recip_ac', t) * x_t - self._gather('sqrt_recipm1_ac', t) * eps).clamp(-1, 1)
            mean = self._gather('coef1', t) * x_start + self._gather('coef2', t) * x_t
            noise = torch.randn(x_t.shape, generator=self.generator)
            out = mean + torch.exp(0.5 * self._gather('log_variance', t)) * noise
            return float(out[0, 0, 0, 0])


class JaxWorker:
    """ddpm_jax's real train step and p_sample on the weights the torch worker wrote."""

    def __init__(self, args: dict):
        import jax  # pylint: disable=g-import-not-at-top
        import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

        from ddpm_jax import (  # pylint: disable=g-import-not-at-top
            compile_cache,
            config_files,
            convert,
            optim,
            parallel,
            train,  # pylint: disable=g-import-not-at-top
            xla_cpu,
        )
        from ddpm_jax import diffusion as diffusion_lib  # pylint: disable=g-import-not-at-top
        from ddpm_jax import losses  # pylint: disable=g-import-not-at-top
        from ddpm_jax.models import unet  # pylint: disable=g-import-not-at-top
        self.jax, self.parallel, self.train = jax, parallel, train
        compile_cache.enable(args['compile_cache_dir'])
        self.config = config_files.load_config_file(os.path.join(REPO_ROOT, 'configs', 'cifar10.py'))
        self.config.update_from_flattened_dict(args['set'])
        self.model = unet.create_model(self.config)
        with np.load(args['weights']) as weights:
            state_dict = dict(weights)
        with open(args['weights'] + '.json') as source:
            convert.check_diffusers_config(json.load(source), self.model)
        params = convert.diffusers_to_flax(state_dict, self.model, image_size=32, channels=3)
        self.mesh = parallel.make_mesh()
        replicated = parallel.replicated_sharding(self.mesh)
        template = train.create_train_state(self.config, self.mesh, abstract=True)
        params = jax.device_put(jax.tree.map(jnp.asarray, params), replicated)
        optimizer = optim.make_optimizer(self.config.optim)
        self.state = template.replace(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                                      ema_params=jax.tree.map(jnp.copy, params),
                                      opt_state=jax.jit(optimizer.init, out_shardings=replicated)(params))
        self.diffusion = diffusion_lib.diffusion_from_config(self.config)
        self.train_steps = {}
        model, diffusion = self.model, self.diffusion

        def sample_step(params, x, key):
            t = jnp.full((x.shape[0],), SAMPLE_T, jnp.int32)
            output = model.apply({'params': params}, x, t, train=False)
            return diffusion_lib.p_sample(diffusion, output, x, t, jax.random.normal(key, x.shape, x.dtype))

        def loss_and_grad_norm(params, x_start, noise, t):
            def loss_fn(p):
                x_t = diffusion_lib.q_sample(diffusion, x_start, t, noise)
                output = model.apply({'params': p}, x_t, t, train=False)
                return jnp.mean(losses.training_losses(diffusion, output, x_start, x_t, t, noise)), output
            (loss, output), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            return output, loss, jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in jax.tree.leaves(grads)))

        self.sample_fn = xla_cpu.jit(sample_step)   # as the package's samplers: its XLA:CPU compile options
        self.check_fn = xla_cpu.jit(loss_and_grad_norm)
        self.key = jax.random.key(args['seed'])
        self.sample_calls = 0

    def num_params(self) -> int:
        return sum(int(np.size(x)) for x in self.jax.tree.leaves(self.state.params))

    def check(self, inputs: dict) -> dict:
        output, loss, grad_norm = self.check_fn(self.state.params, inputs['x_start'], inputs['noise'], inputs['t'])
        return dict(output=np.asarray(output), loss=float(loss), grad_norm=float(grad_norm))

    def train_step(self, images: np.ndarray) -> float:
        batch = images.shape[0]
        if batch not in self.train_steps:
            self.train_steps[batch] = self.train.make_train_step(self.config, self.mesh)
        self.state, metrics = self.train_steps[batch](self.state, self.parallel.shard_batch(images[None], self.mesh,
                                                                                            batch_axis=1))
        return float(np.asarray(metrics['loss'])[0])

    def sample_step(self, x: np.ndarray) -> float:
        self.sample_calls += 1
        out = self.sample_fn(self.state.ema_params, x, self.jax.random.fold_in(self.key, self.sample_calls))
        return float(np.asarray(out[0, 0, 0, 0]))


def worker_main(kind: str, spawned_at: float) -> None:
    """Reads one JSON command per line on stdin, answers one JSON line on stdout."""
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
    worker = None
    from ddpm_jax import host_memory  # pylint: disable=g-import-not-at-top
    host_memory.keep_freed_memory()   # both workers: ddpm_jax.main does it, and torch's large blocks fault alike

    def reply(message: dict) -> None:
        out.write(json.dumps(message) + '\n')
        out.flush()

    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command['cmd'] == 'setup':
                worker = (TorchWorker if kind == 'torch' else JaxWorker)(command['args'])
                # On the initial weights, before any train step: even the warm-up's tiny learning rates move every
                # weight by ~lr through Adam, differently on each side. Its time is not start-up: subtracted below.
                check_began = time.time()
                check = worker.check(check_inputs())
                check_s = time.time() - check_began
                first = {}
                for work, batches in (('train', command['train_batches']), ('sample', command['sample_batches'])):
                    for batch in batches:  # warm-up (compilation on the JAX side), untimed
                        run_work(worker, work, batch, 1)
                        first.setdefault(work, time.time() - spawned_at - check_s)
                check_path = command['args']['weights'] + f'.{kind}_check.npy'
                np.save(check_path, check['output'])
                reply(dict(ok=True, params=worker.num_params(), loss=check['loss'], grad_norm=check['grad_norm'],
                           check_output=check_path, first_train_step_s=first.get('train'),
                           setup_done_s=time.time() - spawned_at, rss_mib=peak_rss_mib()))
            elif command['cmd'] == 'run':
                times = run_work(worker, command['work'], command['batch'], command['steps'])
                reply(dict(ok=True, times=times))
            elif command['cmd'] == 'finish':
                reply(dict(ok=True, peak_rss_mib=peak_rss_mib()))
                return
        except Exception as error:  # pylint: disable=broad-except
            reply(dict(ok=False, error=f'{type(error).__name__}: {error}'))
            return


def run_work(worker, work: str, batch: int, steps: int) -> list[float]:
    """Wall seconds of `steps` synced train or sampling steps at `batch`."""
    images = synthetic_images(batch, seed=batch)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        (worker.train_step if work == 'train' else worker.sample_step)(images)
        times.append(time.perf_counter() - started)
    return times


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# --------------------------------------------------------------------------------------------- the parent

class Worker:
    def __init__(self, kind: str, env: dict):
        self.kind = kind
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--worker', kind,
                                         repr(time.time())], cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def ask(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + '\n')
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f'the {self.kind} worker exited (see its stderr above)')
        answer = json.loads(line)
        if not answer.get('ok'):
            raise RuntimeError(f'{self.kind} worker: {answer.get("error")}')
        return answer

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def spread(values: list[float]) -> dict:
    return dict(median=statistics.median(values), min=min(values), max=max(values))


def format_report(result: dict) -> str:
    check = result['check']
    lines = [f"ddpm_jax vs PyTorch (diffusers UNet2DModel), CIFAR-10 U-Net ({result['params']['jax']:,} params), "
             f"float32, {result['threads'] or os.cpu_count()} threads, {result['rounds']} rounds x {result['steps']} "
             f"steps, {result['date']}",
             f"agreement (dropout off): output max |diff| {check['output_max_abs_diff']:.2e} "
             f"(max |output| {check['output_max_abs']:.2f}); loss {check['loss']['jax']:.7f} vs "
             f"{check['loss']['torch']:.7f}; grad norm {check['grad_norm']['jax']:.6f} vs "
             f"{check['grad_norm']['torch']:.6f}",
             '',
             '| work | batch | ddpm_jax ms / step | PyTorch ms / step | PyTorch time / ddpm_jax time per round |',
             '| --- | --- | --- | --- | --- |']
    for row in result['rows']:
        def cell(stat, scale=1000.0, digits=0):
            return f"{stat['median'] * scale:.{digits}f} ({stat['min'] * scale:.{digits}f}-{stat['max'] * scale:.{digits}f})"
        lines.append(f"| {row['work']} | {row['batch']} | {cell(row['jax'])} | {cell(row['torch'])} | "
                     f"{cell(row['ratio'], 1.0, 2)} |")
    first, peak = result['first_train_step_s'], result['peak_rss_mib']
    lines += ['', '| | ddpm_jax | PyTorch |', '| --- | --- | --- |',
              f"| spawn to first train step done, s | {first['jax']:.1f} | {first['torch']:.1f} |",
              f"| peak resident memory, MiB | {peak['jax']:.0f} | {peak['torch']:.0f} |"]
    return '\n'.join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--train_batches', default='8,32', help='comma list of train-step batch sizes')
    parser.add_argument('--sample_batches', default='8,32', help='comma list of sampling-step batch sizes')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--steps', type=int, default=3, help='timed steps per setting and round')
    parser.add_argument('--threads', type=int, default=2, help='cores for each implementation; 0 = all')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--set', action='append', default=[], metavar='model.KEY=VALUE',
                        help='ddpm_jax config override (speed switches), e.g. --set model.fast_variance=True')
    parser.add_argument('--compile_cache_dir', default='',
                        help="ddpm_jax's compilation cache ('' = off: the start-up column is a cold start)")
    parser.add_argument('--out', default=None, help='JSON result path')
    args = parser.parse_args(argv)
    train_batches = [int(b) for b in args.train_batches.split(',') if b]
    sample_batches = [int(b) for b in args.sample_batches.split(',') if b]
    overrides = {}
    for item in args.set:
        key, _, text = item.partition('=')
        if key.count('.') != 1 or not text:
            raise SystemExit(f'--set {item!r}: expected section.key=value, e.g. model.fast_variance=True')
        overrides[key] = json.loads(text.lower()) if text.lower() in ('true', 'false') else text
    if args.threads:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:args.threads]))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get('PYTHONPATH', '')]))
    env.pop('JAX_COMPILATION_CACHE_DIR', None)
    workdir = tempfile.mkdtemp(prefix='bench_cpu_vs_torch_')
    worker_args = dict(threads=args.threads, seed=args.seed, weights=os.path.join(workdir, 'weights.npz'),
                       compile_cache_dir=args.compile_cache_dir, set=overrides)
    workers = {}
    try:
        setup = {}
        for kind in ('torch', 'jax'):  # torch first: it writes the weights
            workers[kind] = Worker(kind, env)
            setup[kind] = workers[kind].ask(cmd='setup', args=worker_args, train_batches=train_batches,
                                            sample_batches=sample_batches)
            print(f'{kind}: set up ({setup[kind]["params"]:,} params, first train step after '
                  f'{setup[kind]["first_train_step_s"]:.1f} s)', flush=True)
        outputs = {kind: np.load(setup[kind]['check_output']) for kind in workers}
        check = dict(output_max_abs_diff=float(np.max(np.abs(outputs['jax'] - outputs['torch']))),
                     output_max_abs=float(np.max(np.abs(outputs['torch']))),
                     loss={k: setup[k]['loss'] for k in workers}, grad_norm={k: setup[k]['grad_norm'] for k in workers})
        settings = [('train', b) for b in train_batches] + [('sample', b) for b in sample_batches]
        per_round = {setting: {'jax': [], 'torch': []} for setting in settings}
        for round_index in range(args.rounds):
            order = ('jax', 'torch') if round_index % 2 == 0 else ('torch', 'jax')
            for work, batch in settings:
                for kind in order:
                    times = workers[kind].ask(cmd='run', work=work, batch=batch, steps=args.steps)['times']
                    per_round[work, batch][kind].append(statistics.median(times))
            print(f'round {round_index + 1}/{args.rounds} done', flush=True)
        peak = {kind: workers[kind].ask(cmd='finish')['peak_rss_mib'] for kind in workers}
    finally:
        for worker in workers.values():
            worker.close()
    rows = []
    for (work, batch), times in per_round.items():
        ratios = [t / j for j, t in zip(times['jax'], times['torch'])]
        rows.append(dict(work=work, batch=batch, jax=spread(times['jax']), torch=spread(times['torch']),
                         ratio=spread(ratios), per_round=times))
    import diffusers  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                  machine=dict(cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                               load_average=os.getloadavg()),
                  versions=dict(jax=jax.__version__, torch=torch.__version__, diffusers=diffusers.__version__),
                  threads=args.threads, rounds=args.rounds, steps=args.steps, set=overrides,
                  xla_flags=os.environ.get('XLA_FLAGS', ''), params={k: setup[k]['params'] for k in setup},
                  check=check, rows=rows, first_train_step_s={k: setup[k]['first_train_step_s'] for k in setup},
                  peak_rss_mib=peak)
    print(format_report(result))
    if args.out:
        with open(args.out, 'w') as out:
            json.dump(result, out, indent=1)
    return result


if __name__ == '__main__':
    if len(sys.argv) == 4 and sys.argv[1] == '--worker':
        worker_main(sys.argv[2], float(sys.argv[3]))
    else:
        main()
