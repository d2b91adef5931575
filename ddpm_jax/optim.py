"""How training updates the params: the learning-rate warmup, Adam with gradient clipping, the EMA decay.

Official diffusion_tf/utils.py and run_*.py: Adam (beta1, beta2, eps) with lr * min(step / warmup, 1), gradient
clipping by global norm, and an exponential moving average of the params used for evaluation.
"""
import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(optim: ml_collections.ConfigDict) -> optax.Schedule:
    """lr * min(step / warmup_steps, 1) (official: the first step has lr 0); constant lr when warmup is 0."""
    lr, warmup = float(optim.lr), int(optim.warmup_steps)
    if warmup <= 0:
        return lambda step: jnp.full((), lr, jnp.float32)
    return lambda step: lr * jnp.minimum(jnp.asarray(step, jnp.float32) / warmup, 1.0)


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping (skipped when grad_clip is 0), then Adam with the warmup schedule.

    The official code (diffusion_tf/utils.py, clip_by_global_norm inside a CrossShardOptimizer) clips each TPU
    replica's gradient before averaging; here the averaged global-batch gradient is clipped, the natural
    data-parallel equivalent.
    """
    adam = optax.adam(learning_rate_schedule(optim), b1=optim.beta1, b2=optim.beta2, eps=optim.eps)
    if optim.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adam)
    return adam


def ema_decay_at(step: jax.Array, ema_decay: float, warmup: bool) -> jax.Array:
    """The EMA decay of the update after `step` steps (int scalar): float32 scalar.

    Official (diffusion_tf/tpu_utils/tpu_utils.py, ExponentialMovingAverage): 0 at the first step (the shadow
    becomes the params), then ema_decay.
    warmup=True: 0 at the first step, then min(ema_decay, (1 + step) / (10 + step)) (the warm-up of TF's
    ExponentialMovingAverage with num_updates), so that after n steps the initialisation's weight is ~0 instead of
    ema_decay^n (0.999^1500 = 22% for the digits default).
    """
    decay = jnp.asarray(ema_decay, jnp.float32)
    if warmup:
        step_f = jnp.asarray(step, jnp.float32)
        decay = jnp.minimum(decay, (1.0 + step_f) / (10.0 + step_f))
    return jnp.where(step == 0, 0.0, decay).astype(jnp.float32)
