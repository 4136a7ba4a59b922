"""Model registry, initialisation, and the wrappers that turn a network into a score function.

API of score_sde / score_flow `models/utils.py`:
  register_model(cls=None, *, name=None), get_model(name), init_model(rng, config),
  get_model_fn(model, params, states, train=False), get_score_fn(sde, model, params, states, ...).
"""

import jax
import jax.numpy as jnp
import numpy as np

import sde_lib
from divergence import batch_mul

_MODELS = {}


def register_model(cls=None, *, name=None):
  """Class decorator registering a model under `name` (default: the class name)."""

  def _register(cls):
    local_name = cls.__name__ if name is None else name
    if local_name in _MODELS:
      raise ValueError(f'Already registered model with name: {local_name}')
    _MODELS[local_name] = cls
    return cls

  return _register if cls is None else _register(cls)


def get_model(name):
  """The registered model class called `name`."""
  if name not in _MODELS:
    raise ValueError(f"Unknown model '{name}': set --config.model.name to one of "
                     f"{', '.join(sorted(_MODELS))}.")
  return _MODELS[name]


def get_sigmas(config):
  """The SMLD noise levels, largest first: geometric from sigma_max to sigma_min (num_scales)."""
  return jnp.exp(jnp.linspace(jnp.log(config.model.sigma_max), jnp.log(config.model.sigma_min),
                              config.model.num_scales))


def get_ddpm_params(config):
  """Betas and alphas of the discrete DDPM chain (1000 steps, beta_k = beta/num_scales)."""
  num_diffusion_timesteps = 1000
  beta_start = config.model.beta_min / config.model.num_scales
  beta_end = config.model.beta_max / config.model.num_scales
  betas = np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)
  alphas = 1. - betas
  alphas_cumprod = np.cumprod(alphas, axis=0)
  return {
    'betas': betas,
    'alphas': alphas,
    'alphas_cumprod': alphas_cumprod,
    'sqrt_alphas_cumprod': np.sqrt(alphas_cumprod),
    'sqrt_1m_alphas_cumprod': np.sqrt(1. - alphas_cumprod),
    'beta_min': beta_start * (num_diffusion_timesteps - 1),
    'beta_max': beta_end * (num_diffusion_timesteps - 1),
    'num_diffusion_timesteps': num_diffusion_timesteps,
  }


def get_data_shape(config):
  """Shape of one example: config.data.shape if set; else (image_size, image_size,
  num_channels) for images; else (dim,) for flat data (image_size 0 or absent)."""
  data = config.data
  if data.get('shape', None):
    return tuple(int(s) for s in data.shape)
  if data.get('image_size', 0):
    return (int(data.image_size), int(data.image_size), int(data.num_channels))
  if data.get('dim', 0):
    return (int(data.dim),)
  raise ValueError('Cannot infer the data shape: set config.data.image_size (images) or '
                   'config.data.dim (flat data).')


def _init_key(rng):
  """An 'rbg' key derived deterministically from `rng`, for initialisation only.

  The initialisers draw the same distributions; the stream differs from threefry's. Compiling a
  network's initialisation with threefry keys (partitionable, the current default) takes tens of
  seconds on CPU; with rbg keys it is a few seconds.
  """
  return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl='rbg')


def init_model(rng, config, data=None, label=None, batch_size=1):
  """Initialise the model named by config.model.name.

  Returns (model, init_model_state, initial_params): the flax module, its non-parameter
  collections (a dict, empty for our models) and the parameters. The example input is `data`, or
  zeros of shape (batch_size, *get_data_shape(config)) (parameters do not depend on the batch).
  """
  model = get_model(config.model.name)(config=config)
  if data is None:
    data = jnp.zeros((batch_size, *get_data_shape(config)), jnp.float32)
  if label is None:
    if config.training.get('continuous', True):
      label = jnp.ones(data.shape[:1], jnp.float32)
    else:
      label = jnp.zeros(data.shape[:1], jnp.int32)
  params_rng, dropout_rng = jax.random.split(_init_key(rng))
  init_fn = jax.jit(lambda rngs, x, y: model.init(rngs, x, y, train=False))
  variables = dict(init_fn({'params': params_rng, 'dropout': dropout_rng}, data, label))
  initial_params = variables.pop('params', {})
  return model, variables, initial_params


def get_model_fn(model, params, states, train=False):
  """model_fn(x, labels, rng=None): the network output; with train=True, (output, new_states)
  with dropout driven by `rng`."""

  def model_fn(x, labels, rng=None):
    variables = {'params': params, **states}
    if not train:
      return model.apply(variables, x, labels, train=False, mutable=False)
    rngs = {} if rng is None else {'dropout': rng}
    return model.apply(variables, x, labels, train=True, mutable=list(states.keys()), rngs=rngs)

  return model_fn


def get_score_fn(sde, model, params, states, train=False, continuous=False, return_state=False):
  """score_fn(x, t, rng=None) -> score (and new states when return_state; train=True needs it).

  Conventions of score_sde:
  - VP (continuous) and sub-VP: labels = 999 t, score = -output / std(t).
  - VP (discrete): labels = t (N - 1), score = -output / sqrt(1 - alphas_cumprod[labels]).
  - VE (continuous): labels = std(t); the network (scale_by_sigma) returns the score itself.
  - VE (discrete): labels = round((T - t)(N - 1)), an index into sigmas largest-first.
  - linear VE (continuous only): labels = 999 t, score = -output / std(t).
  For a model with a `derivatives` method (the toy MLP's Taylor pass) and no state, score_fn also
  carries derivatives(x, t, order, rng=None) -> (score, J, grad_x tr J or None) wrt x, under the
  same labels and output scale.
  """
  model_fn = get_model_fn(model, params, states, train=train)

  def _finish(score, state):
    return (score, state) if return_state else score

  def _apply(x, labels, rng):
    out = model_fn(x, labels, rng)
    return out if train else (out, states)

  if isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE)):
    def labels_and_scale(x, t):
      if continuous or isinstance(sde, sde_lib.subVPSDE):
        return t * 999, -1. / sde.marginal_prob(jnp.zeros_like(x), t)[1]
      labels = t * (sde.N - 1)
      return labels, -1. / sde.sqrt_1m_alphas_cumprod[labels.astype(jnp.int32)]

  elif isinstance(sde, sde_lib.VESDE):
    def labels_and_scale(x, t):
      if getattr(sde, 'linear', False):
        if not continuous:
          raise ValueError('The linear VE SDE has no discrete model: set '
                           'config.training.continuous = True.')
        return t * 999, -1. / sde.marginal_prob(jnp.zeros_like(x), t)[1]
      if continuous:
        return sde.marginal_prob(jnp.zeros_like(x), t)[1], None
      return jnp.round((sde.T - t) * (sde.N - 1)).astype(jnp.int32), None

  else:
    raise ValueError(f'SDE class {sde.__class__.__name__} is not supported: use VPSDE, subVPSDE '
                     'or VESDE from sde_lib.')

  def score_fn(x, t, rng=None):
    labels, scale = labels_and_scale(x, t)
    output, state = _apply(x, labels, rng)
    return _finish(output if scale is None else batch_mul(output, scale), state)

  if hasattr(model, 'derivatives') and not states:
    def derivatives(x, t, order, rng=None):
      """(score, J, grad_x tr J or None) wrt x by the model's own pass (no dropout to drive)."""
      del rng
      labels, scale = labels_and_scale(x, t)
      out = model.apply({'params': params}, x, labels, order, method='derivatives')
      return out if scale is None else tuple(None if o is None else batch_mul(o, scale)
                                             for o in out)
    score_fn.derivatives = derivatives

  return score_fn


def to_flattened_numpy(x):
  """Flatten a JAX array to a float64 numpy vector (for scipy solvers)."""
  return np.asarray(x.reshape((-1,)), dtype=np.float64)


def from_flattened_numpy(x, shape):
  """A float32 JAX array of `shape` from a flat numpy vector."""
  return jnp.asarray(x, dtype=jnp.float32).reshape(shape)
