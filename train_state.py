"""The training state: one flax.struct dataclass of plain pytrees (orbax-checkpointable)."""
from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes.

  step: int32 scalar, the number of steps taken (0 before the first one).
  params / params_ema: the score model's parameters and their exponential moving average.
  opt_state: the optax state of `optim.get_optimizer(config)` (its own update count drives the
    learning-rate schedule).
  model_state: the model's non-parameter collections (a dict, empty for our models).
  rng: a raw uint32 PRNG key (not a typed key, so that checkpoints hold plain arrays).
  nonfinite_count: int32 scalar, how many steps had a non-finite loss or gradient.
  """
  step: Any
  params: Any
  opt_state: Any
  model_state: Any
  params_ema: Any
  rng: Any
  nonfinite_count: Any


def _raw_key(rng):
  """A raw uint32 key from either a raw key or a typed `jax.random.key`."""
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  return jnp.asarray(rng, jnp.uint32)


def create_train_state(rng, config, model, params, model_state, tx):
  """A fresh TrainState at step 0: opt_state = tx.init(params), params_ema = params.

  `config` and `model` are accepted for the score_sde call shape and not stored (a flax module is
  not a pytree leaf); `tx` is the optax transformation of `optim.get_optimizer(config)`.
  """
  del config, model
  params_ema = jax.tree_util.tree_map(jnp.array, params)  # a copy, not an alias
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    model_state=model_state if model_state is not None else {},
    params_ema=params_ema,
    rng=_raw_key(rng),
    nonfinite_count=jnp.zeros((), jnp.int32),
  )
