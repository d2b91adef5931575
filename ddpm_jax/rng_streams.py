"""The one table of random streams: each id is folded into the seed's key, so that every use draws independent
noise and a run is a function of config.seed only.

Two families, kept apart because their numbers fix the outputs of existing runs:

* TRAIN_*: folded into `jax.random.key(seed)` by training (parameter init, per-example noise and t, dropout, the
  sample grids written while training).
* EVAL_*: folded into `jax.random.PRNGKey(seed)` by the evaluation modes (sample mode's batches, the NLL
  bound's noise, the paper's figures, the fixed test loss of training and the watch).

The families overlap in numbers (TRAIN_EXAMPLE and EVAL_SAMPLE are both 1), but never share a use: a training
grid and a sample-mode batch are different draws by design. `jax.random.key` and `PRNGKey` fold to the same
bits, so the ids alone tell the streams apart within a family.
"""
import jax

TRAIN_INIT, TRAIN_EXAMPLE, TRAIN_DROPOUT, TRAIN_GRID_SAMPLE = 0, 1, 2, 3
EVAL_SAMPLE, EVAL_NLL, EVAL_EXPERIMENT, EVAL_TEST_LOSS = 1, 2, 3, 4


def eval_key(seed: int, stream: int) -> jax.Array:
    """`fold_in(PRNGKey(seed), stream)` for an EVAL_* stream (a raw uint32[2] key, as the evaluation modes have
    always drawn from)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), stream)
