"""Samplers beyond the paper's ancestral loop: timestep respacing and DDIM (and, from `score`, the
predictor-corrector, annealed Langevin and probability-flow ODE samplers, selected by `make_sampler`).

Both plug into the signature of `diffusion.p_sample_loop`:

    sample(d, model_fn, shape, rng, *, clip_denoised=True, ...) -> x_0 [B, H, W, C]

where `d` is a (possibly respaced) `GaussianDiffusion` and `model_fn(x [B,H,W,C], t [B] int32)` is the
network called with the ORIGINAL timestep indices (the respaced loops map their step index k to
`timestep_map[k]` before calling it).

* Timestep respacing (Nichol & Dhariwal 2021, "Improved DDPM"): keep a subsequence s_0 < ... < s_{S-1}
  of {0..T-1} and rebuild a diffusion whose alphas_cumprod are those of the kept steps:
  beta'_k = 1 - abar[s_k] / abar[s_{k-1}] (abar[s_{-1}] := 1). The ancestral sampler of that diffusion
  runs in S steps.
* DDIM (Song, Meng, Ermon 2021) over the same subsequence:
  x_{k-1} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
  sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev).
  eta = 0 is deterministic; eta = 1 has the posterior variance beta~ and the posterior mean, i.e. it is
  the ancestral sampler with fixedsmall variance.

* `model_mean_type='xprev'` outside the full-T ancestral loop: the network predicts the posterior mean of
  x_{s-1} on the FULL schedule at its own timestep s, not the mean of the next kept step. `xprev_as_xstart`
  recovers x0 from it with the full schedule's coefficients (official diffusion_utils_2.py
  `_predict_xstart_from_xprev`) and the respaced / DDIM step is then taken from that x0, exactly as for an
  'xstart' model.
* Schedules whose last alpha-bar is 0 (`jsd`, whose last beta is 1): x_T then carries no information about
  x0, so an 'eps' model cannot give x0 at the last step (its coefficients are infinite) and sampling and the
  bound would be NaN. `check_supported` refuses that pair; 'xstart' and 'xprev' models stay finite and exact.
  `check_supported` also refuses the respaced ancestral sampler for `model_var_type='learned'` (the network's
  log-variance is that of its one-step spacing).

Every loop is one `lax.fori_loop`: jit the caller once and it compiles once per shape.
Randomness follows `diffusion.p_sample_loop`: for a diffusion of S steps, x_T comes from
`fold_in(rng, S)` and the noise of step k from `fold_in(rng, k)`, so DDIM with eta = 1 over all steps
of a fixedsmall diffusion draws the same noise as the ancestral loop.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import config_files, diffusion as diffusion_lib, schedules, score
from ddpm_jax.diffusion import ModelFn

SAMPLERS = ('ancestral', 'ddim', 'pc', 'langevin', 'ode')


def respaced_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """Evenly spaced subsequence of {0..T-1} with both ends kept.

    Returns int64 [num_steps], strictly increasing, first 0 and last T-1 (so sampling starts from
    pure noise at the last step, and the decoder step t=0 is kept). num_steps = 0 or T: all steps.
    """
    if num_steps == 0:
        num_steps = num_timesteps
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f'num_steps={num_steps} must be in [1, T={num_timesteps}] (0 means all T steps)')
    if num_steps == 1:
        return np.array([num_timesteps - 1])
    steps = np.round(np.linspace(0.0, num_timesteps - 1, num_steps)).astype(np.int64)
    if len(np.unique(steps)) != num_steps:  # cannot happen for num_steps <= T, kept as a guard
        raise ValueError(f'num_steps={num_steps} gives repeated timesteps for T={num_timesteps}')
    return steps


def respaced_betas(betas: np.ndarray, timesteps: Sequence[int]) -> np.ndarray:
    """beta'_k = 1 - abar[s_k] / abar[s_{k-1}], abar[s_{-1}] = 1.  betas: float64 [T]; returns float64 [S]."""
    betas = np.asarray(betas, dtype=np.float64)
    timesteps = np.asarray(timesteps)
    if timesteps.ndim != 1 or np.any(np.diff(timesteps) <= 0) or timesteps[0] < 0 or timesteps[-1] >= len(betas):
        raise ValueError(f'timesteps must be strictly increasing in [0, {len(betas) - 1}], got {timesteps}')
    alphas_cumprod = np.cumprod(1.0 - betas)[timesteps]
    previous = np.concatenate([[1.0], alphas_cumprod[:-1]])
    return 1.0 - alphas_cumprod / previous


def respace(betas: np.ndarray, num_steps: int, *, model_mean_type: str, model_var_type: str,
            loss_type: str = 'mse', hybrid_lambda: float = 0.001):
    """A diffusion over `num_steps` of the T steps of `betas` (float64 [T]).

    Returns (respaced GaussianDiffusion with S = num_steps steps, timestep_map int32 [S] of the original
    timestep of each respaced step). Note: a model with model_var_type='learned' predicts a log-variance
    for the original one-step spacing; respacing is exact only for fixed variances and learned_range.
    """
    timesteps = respaced_timesteps(len(betas), num_steps)
    d = diffusion_lib.make_diffusion(respaced_betas(betas, timesteps), model_mean_type=model_mean_type,
                                     model_var_type=model_var_type, loss_type=loss_type,
                                     hybrid_lambda=hybrid_lambda)
    return d, jnp.asarray(timesteps, dtype=jnp.int32)


def check_supported(model_mean_type: str, model_var_type: str, sampler: str, num_steps: int, betas) -> None:
    """Raises ValueError (with the reason and the fix) for a (model, sampler, schedule) choice that would not
    sample correctly; returns None for every exact one.

    model_mean_type, model_var_type: config.diffusion's; sampler: one of SAMPLERS (or any other name, which
    only the schedule check applies to); num_steps: sampler steps (0 = all T); betas: float [T] of the schedule.
    Refused: an 'eps' model on a schedule whose last alpha-bar is 0 (jsd), for sampling and the NLL bound
    (x0 = (x_T - sqrt(1 - abar) eps) / sqrt(abar) is 0/0 there), and the respaced ancestral sampler with
    model_var_type 'learned'.
    """
    betas = np.asarray(betas, np.float64)
    num_timesteps = len(betas)
    if model_mean_type == 'eps' and np.cumprod(1.0 - betas)[-1] <= 0.0:
        raise ValueError(
            'the beta schedule ends with alpha_bar = 0 (e.g. jsd, whose last beta is 1): there x_T is pure noise, '
            "so an 'eps' model cannot predict x0 at the last step and sampling and the NLL would be NaN; use "
            "model_mean_type='xstart' or 'xprev' with this schedule, or a schedule with beta < 1 (linear, cosine)")
    respaced = 0 < num_steps < num_timesteps
    if sampler == 'ancestral' and respaced and model_var_type == 'learned':
        raise ValueError(
            f"model_var_type='learned' predicts the log-variance of one step of the T={num_timesteps} schedule, "
            f'not of a respaced step (num_steps={num_steps}); sample with all steps (num_steps=0), with '
            "sampler='ddim' (which does not use the variance), or train a 'learned_range' model")


def xprev_as_xstart(d_full, model_fn: ModelFn) -> ModelFn:
    """An 'xprev' model turned into an 'xstart' one: x0 = (xprev - coef2_t x_t) / coef1_t on the full schedule.

    d_full: the T-step diffusion the model was trained on; model_fn(x, t) is called with ORIGINAL timesteps
    and returns the xprev prediction [B,H,W,C] (plus C variance channels for learned variances, kept as they
    are). Returns model_fn with the same signature whose mean channels are the x0 prediction (unclipped).
    """
    def xstart_fn(x, t):
        output = model_fn(x, t)
        channels = x.shape[-1]
        xstart = diffusion_lib.predict_xstart_from_xprev(d_full, x, t, output[..., :channels])
        return jnp.concatenate([xstart, output[..., channels:]], axis=-1)
    return xstart_fn


def _mapped_model_fn(model_fn: ModelFn, timestep_map: jax.Array | None) -> ModelFn:
    if timestep_map is None:
        return model_fn
    return lambda x, t: model_fn(x, timestep_map[t])


def ancestral_sample_loop(d, model_fn: ModelFn, shape, rng, *, timestep_map=None, clip_denoised=True):
    """The paper's ancestral sampler on a (respaced) diffusion: `diffusion.p_sample_loop` with the
    model called at the original timesteps.  Returns x_0 [B, H, W, C]."""
    return diffusion_lib.p_sample_loop(d, _mapped_model_fn(model_fn, timestep_map), tuple(shape), rng,
                                       clip_denoised=clip_denoised)


def ddim_step(d, model_output, x_t, t, noise, *, eta, clip_denoised=True):
    """One DDIM update from step t of `d` to step t-1 (to x_0 at t=0).

    model_output: [B,H,W,C] (or 2C for learned variances), x_t, noise: [B,H,W,C], t: [B] int (index of d).
    Returns (x_{t-1} [B,H,W,C], pred_xstart [B,H,W,C]).
    """
    out = diffusion_lib.p_mean_variance(d, model_output, x_t, t, clip_denoised=clip_denoised)
    pred_xstart = out['pred_xstart']
    abar = diffusion_lib.extract(d.alphas_cumprod, t, x_t.shape)
    abar_prev = diffusion_lib.extract(d.alphas_cumprod_prev, t, x_t.shape)
    # eps consistent with the (clipped) x0 prediction, as in the DDIM paper's implementation.
    eps = (x_t - jnp.sqrt(abar) * pred_xstart) / jnp.sqrt(1.0 - abar)
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
    mean = jnp.sqrt(abar_prev) * pred_xstart + jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma ** 2, 0.0)) * eps
    nonzero = (t != 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return mean + nonzero * sigma * noise, pred_xstart


def ddim_sample_loop(d, model_fn: ModelFn, shape, rng, *, timestep_map=None, eta=0.0, clip_denoised=True):
    """DDIM sampling over all steps of `d` (respaced or not), one lax loop.  Returns x_0 [B, H, W, C].

    x_T ~ N(0, I) from `fold_in(rng, S)` (S = d.num_timesteps); the noise of step k from `fold_in(rng, k)`.
    """
    if eta < 0:
        raise ValueError(f'ddim eta={eta} must be >= 0 (0: deterministic DDIM, 1: ancestral-like)')
    shape = tuple(shape)
    dtype = d.alphas_cumprod.dtype
    model_fn = _mapped_model_fn(model_fn, timestep_map)
    num_steps = d.num_timesteps

    def body(i, x):
        k = num_steps - 1 - i
        t = jnp.full((shape[0],), k, dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(rng, k), shape, dtype) if eta > 0 else jnp.zeros(shape, dtype)
        x, _ = ddim_step(d, model_fn(x, t), x, t, noise, eta=eta, clip_denoised=clip_denoised)
        return x

    x_init = jax.random.normal(jax.random.fold_in(rng, num_steps), shape, dtype)
    return jax.lax.fori_loop(0, num_steps, body, x_init)


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """The sampler keys of config.sampling as typed values; build it once with `from_config`.

    sampler: one of SAMPLERS; num_steps: 0 = all T steps (fewer respaces the timesteps; Heun steps for 'ode');
    ddim_eta: DDIM's eta; snr, n_corrector_steps: the Langevin steps of 'pc' and 'langevin'; ode_solver
    ('adaptive' or 'heun'), ode_rtol, ode_atol: the probability-flow ODE's solver.
    """
    sampler: str
    num_steps: int
    clip_denoised: bool
    ddim_eta: float
    snr: float
    n_corrector_steps: int
    ode_solver: str
    ode_rtol: float
    ode_atol: float

    @classmethod
    def from_config(cls, sampling_config) -> SamplerSettings:
        """Reads config.sampling; ValueError naming config.sampling.<key> when a key is missing or mistyped."""
        return config_files.typed_section(cls, sampling_config, 'sampling')


def make_sampler(config, *, return_nfe=False):
    """`build_sampler` of config.diffusion and config.sampling (the boundary adapter)."""
    return build_sampler(diffusion_lib.DiffusionSettings.from_config(config.diffusion),
                         SamplerSettings.from_config(config.sampling), return_nfe=return_nfe)


def build_sampler(dcfg: diffusion_lib.DiffusionSettings, sampling: SamplerSettings, *, return_nfe=False):
    """The sampler that `sampling` selects for the diffusion `dcfg`, as `sample_fn(model_fn, shape, rng) -> x_0
    [B,H,W,C]` (with return_nfe: `-> (x_0, NFE int32 scalar)`, the number of network evaluations).

    sampling.sampler: 'ancestral' (the paper's; with num_steps > 0 and < T it runs on respaced timesteps),
    'ddim' (eta = sampling.ddim_eta), 'pc' (ancestral predictor + n_corrector_steps Langevin steps at target
    snr, `score.pc_sample_loop`), 'langevin' (annealed Langevin, n_corrector_steps per level,
    `score.annealed_langevin_sample_loop`) or 'ode' (the probability-flow ODE, `score.ode_sample`, ode_solver
    'adaptive' with ode_rtol / ode_atol or 'heun' with num_steps steps); num_steps: 0 = all T steps. Refuses
    what `check_supported` refuses; an 'xprev' model runs as an 'xstart' one through `xprev_as_xstart` except
    on the paper's full-T ancestral loop and the ODE (whose score converts xprev directly). The returned
    function is traceable (jit its caller).
    """
    if sampling.sampler not in SAMPLERS:
        raise ValueError(f'config.sampling.sampler={sampling.sampler!r}; allowed: {SAMPLERS}')
    betas = schedules.betas_from_config(dcfg)
    num_steps = sampling.num_steps or dcfg.num_diffusion_timesteps
    check_supported(dcfg.model_mean_type, dcfg.model_var_type, sampling.sampler, num_steps, betas)
    clip = sampling.clip_denoised
    d_full = diffusion_lib.diffusion_from_settings(dcfg)

    def with_nfe(sample_fn, nfe):
        if not return_nfe:
            return sample_fn
        return lambda model_fn, shape, rng: (sample_fn(model_fn, shape, rng), jnp.asarray(nfe, jnp.int32))

    if sampling.sampler == 'ode':
        kwargs = {'solver': sampling.ode_solver, 'rtol': sampling.ode_rtol, 'atol': sampling.ode_atol,
                  'num_steps': num_steps, 'clip_denoised': clip}
        if return_nfe:
            return lambda model_fn, shape, rng: score.ode_sample(d_full, model_fn, shape, rng, **kwargs)
        return lambda model_fn, shape, rng: score.ode_sample(d_full, model_fn, shape, rng, **kwargs)[0]
    if sampling.sampler == 'ancestral' and num_steps == dcfg.num_diffusion_timesteps:
        return with_nfe(lambda model_fn, shape, rng: diffusion_lib.p_sample_loop(
            d_full, model_fn, tuple(shape), rng, clip_denoised=clip), num_steps)
    # An xprev output is the mean of the next step of the full schedule, not of a respaced one: such models
    # run as xstart models (x0 recovered on the full schedule) everywhere below.
    mean_type = 'xstart' if dcfg.model_mean_type == 'xprev' else dcfg.model_mean_type
    wrap = (lambda model_fn: xprev_as_xstart(d_full, model_fn)) if dcfg.model_mean_type == 'xprev' else (
        lambda model_fn: model_fn)
    d, timestep_map = respace(betas, num_steps, model_mean_type=mean_type,
                              model_var_type=dcfg.model_var_type, loss_type=dcfg.loss_type,
                              hybrid_lambda=dcfg.hybrid_lambda)
    if sampling.sampler == 'ancestral':
        return with_nfe(lambda model_fn, shape, rng: ancestral_sample_loop(
            d, wrap(model_fn), shape, rng, timestep_map=timestep_map, clip_denoised=clip), num_steps)
    if sampling.sampler in ('pc', 'langevin'):
        d_score = diffusion_lib.make_diffusion(betas, model_mean_type=mean_type, model_var_type=dcfg.model_var_type,
                                               loss_type=dcfg.loss_type, hybrid_lambda=dcfg.hybrid_lambda)
        snr, n_corrector = sampling.snr, sampling.n_corrector_steps
        if sampling.sampler == 'pc':
            return with_nfe(lambda model_fn, shape, rng: score.pc_sample_loop(
                d_score, d, wrap(model_fn), shape, rng, timestep_map=timestep_map, snr=snr,
                n_corrector_steps=n_corrector, clip_denoised=clip), num_steps * (1 + n_corrector))
        return with_nfe(lambda model_fn, shape, rng: score.annealed_langevin_sample_loop(
            d_score, d, wrap(model_fn), shape, rng, timestep_map=timestep_map, snr=snr, n_steps=n_corrector,
            clip_denoised=clip), num_steps * n_corrector + 1)
    return with_nfe(lambda model_fn, shape, rng: ddim_sample_loop(
        d, wrap(model_fn), shape, rng, timestep_map=timestep_map, eta=sampling.ddim_eta, clip_denoised=clip),
        num_steps)


def sampler_timesteps(config) -> np.ndarray:
    """The original timesteps (int64, ascending) at which the sampler config.sampling selects calls the model."""
    dcfg = config.diffusion
    return respaced_timesteps(dcfg.num_diffusion_timesteps, config.sampling.num_steps or dcfg.num_diffusion_timesteps)


def shared_xt_samples(d, model_fn: ModelFn, shape, rng, t: int, num_shared: int, *, clip_denoised=True):
    """Paper Fig. 7: one ancestral chain from x_T down to x_t (code t), then `num_shared` independent
    continuations to x_0, i.e. samples of p(x_0 | x_t).

    shape: [H, W, C]. Returns (x_t [1,H,W,C], samples [num_shared,H,W,C]). Noise: x_T from fold_in(rng, 0),
    the shared chain from fold_in(rng, 1), the continuations from fold_in(rng, 2)."""
    num_timesteps = d.num_timesteps
    x_big_t = jax.random.normal(jax.random.fold_in(rng, 0), (1,) + tuple(shape))
    x_t = diffusion_lib.p_sample_range(d, model_fn, x_big_t, jax.random.fold_in(rng, 1),
                                       t_start=num_timesteps - 1, t_stop=t + 1, clip_denoised=clip_denoised)
    branches = jnp.broadcast_to(x_t, (num_shared,) + tuple(shape))
    samples = diffusion_lib.p_sample_range(d, model_fn, branches, jax.random.fold_in(rng, 2), t_start=t, t_stop=0,
                                           clip_denoised=clip_denoised)
    return x_t, samples


def interpolate_images(d, model_fn: ModelFn, x_a, x_b, t, lambdas, rng, *, clip_denoised=True):
    """Paper Fig. 8 (Sec. 4.3, interpolation): x_a, x_b: [1,H,W,C] in [-1,1]; encode both to code timestep t with
    the SAME noise eps = normal(fold_in(rng, 0)), mix (1 - lam) x_t + lam x'_t for lam in lambdas [L], decode each
    mix with the reverse process from t with reverse noise fold_in(rng, 1) shared by all lam.
    Returns (mixed x_t [L,H,W,C], decoded x_0 [L,H,W,C])."""
    eps = jax.random.normal(jax.random.fold_in(rng, 0), x_a.shape, x_a.dtype)
    t_vec = jnp.full((1,), t, jnp.int32)
    x_t_a = diffusion_lib.q_sample(d, x_a, t_vec, eps)
    x_t_b = diffusion_lib.q_sample(d, x_b, t_vec, eps)
    lam = jnp.asarray(lambdas, x_a.dtype).reshape(-1, 1, 1, 1)
    mixed = (1.0 - lam) * x_t_a + lam * x_t_b
    decoded = diffusion_lib.p_sample_range(d, model_fn, mixed, jax.random.fold_in(rng, 1), t_start=t, t_stop=0,
                                           clip_denoised=clip_denoised, share_noise_across_batch=True)
    return mixed, decoded
