"""Samplers of score_sde: Predictor-Corrector (PC) samplers of the reverse SDE and the
probability-flow ODE sampler (jitted adaptive Dormand-Prince instead of scipy's solve_ivp).

Factories return pure, traceable samplers; `get_sampling_fn` wraps them in `jax.jit` over the
model parameters. `shape` is the full batch shape (B, ...). The batch may be sharded by the caller
(jit with shardings): every step is batched, and the Langevin step size uses batch-global means
(the `pmean` of score_sde), so results do not depend on the device layout.

A sampler's `score` argument is a plain `score_fn(x, t) -> score` (analytic scores, toy code) or a
tuple `(model, params, states)` turned into a score function by `models.utils.get_score_fn`.
"""
import abc

import jax
import jax.numpy as jnp

import sde_lib
from divergence import batch_mul

_PREDICTORS = {}
_CORRECTORS = {}
SAMPLER_NAMES = ('pc', 'ode')


def _register(registry, kind):
  def decorator(cls=None, *, name=None):
    def _reg(cls):
      local_name = cls.__name__ if name is None else name
      if local_name in registry:
        raise ValueError(f'Already registered {kind} with name: {local_name}')
      registry[local_name] = cls
      return cls
    return _reg if cls is None else _reg(cls)
  return decorator


register_predictor = _register(_PREDICTORS, 'predictor')
register_corrector = _register(_CORRECTORS, 'corrector')


def get_predictor(name):
  """The predictor class registered as `name` (case-insensitive)."""
  key = str(name).lower()
  if key not in _PREDICTORS:
    raise ValueError(f"Unknown predictor '{name}': set config.sampling.predictor to one of "
                     f"{', '.join(sorted(_PREDICTORS))}.")
  return _PREDICTORS[key]


def get_corrector(name):
  """The corrector class registered as `name` (case-insensitive)."""
  key = str(name).lower()
  if key not in _CORRECTORS:
    raise ValueError(f"Unknown corrector '{name}': set config.sampling.corrector to one of "
                     f"{', '.join(sorted(_CORRECTORS))}.")
  return _CORRECTORS[key]


def _as_score_fn(sde, score, continuous):
  """score_fn(x, t) from a callable or from (model, params, states)."""
  if callable(score):
    return score
  if isinstance(score, (tuple, list)) and len(score) == 3:
    from models import utils as mutils
    model, params, states = score
    return mutils.get_score_fn(sde, model, params, states, train=False, continuous=continuous)
  raise ValueError('A sampler needs score_fn(x, t) or a (model, params, states) tuple, got '
                   f'{type(score).__name__}.')


def _discrete_alpha(sde, t):
  """alpha_i = 1 - beta_i of the DDPM chain at time t (VP and sub-VP), used by the correctors.

  score_sde read `sde.alphas`, which its sub-VP SDE lacks; both share beta(t), so the same
  discretisation beta_i = beta(i / (N - 1)) / N serves sub-VP too.
  """
  timestep = (t * (sde.N - 1) / sde.T).astype(jnp.int32)
  beta = (sde.beta_0 + timestep / (sde.N - 1) * (sde.beta_1 - sde.beta_0)) / sde.N
  return 1. - beta


class Predictor(abc.ABC):
  """One step of a numerical solver of the reverse SDE (or probability-flow ODE)."""

  def __init__(self, sde, score_fn, probability_flow=False):
    super().__init__()
    self.sde = sde
    self.rsde = sde.reverse(score_fn, probability_flow)
    self.score_fn = score_fn

  @abc.abstractmethod
  def update_fn(self, rng, x, t):
    """Returns (x, x_mean): the next state and the same without the added noise."""


class Corrector(abc.ABC):
  """MCMC steps towards the marginal p_t at a fixed time t."""

  def __init__(self, sde, score_fn, snr, n_steps):
    super().__init__()
    self.sde = sde
    self.score_fn = score_fn
    self.snr = snr
    self.n_steps = n_steps

  @abc.abstractmethod
  def update_fn(self, rng, x, t):
    """Returns (x, x_mean): the corrected state and the same without the last noise."""


@register_predictor(name='euler_maruyama')
class EulerMaruyamaPredictor(Predictor):
  """Euler-Maruyama step of the reverse SDE with dt = -1/N."""

  def update_fn(self, rng, x, t):
    dt = -1. / self.rsde.N
    z = jax.random.normal(rng, x.shape, x.dtype)
    drift, diffusion = self.rsde.sde(x, t)
    x_mean = x + drift * dt
    return x_mean + batch_mul(diffusion, jnp.sqrt(-dt) * z), x_mean


@register_predictor(name='reverse_diffusion')
class ReverseDiffusionPredictor(Predictor):
  """The reverse of the forward discretisation (DDPM for VP, SMLD for VE)."""

  def update_fn(self, rng, x, t):
    f, G = self.rsde.discretize(x, t)
    z = jax.random.normal(rng, x.shape, x.dtype)
    x_mean = x - f
    return x_mean + batch_mul(G, z), x_mean


@register_predictor(name='ancestral_sampling')
class AncestralSamplingPredictor(Predictor):
  """Ancestral sampling of the DDPM (VP) or SMLD (VE) Markov chain."""

  def __init__(self, sde, score_fn, probability_flow=False):
    super().__init__(sde, score_fn, probability_flow)
    if not isinstance(sde, (sde_lib.VPSDE, sde_lib.VESDE)):
      raise ValueError(f'The ancestral_sampling predictor supports VPSDE and VESDE, not '
                       f'{sde.__class__.__name__}: use reverse_diffusion or euler_maruyama.')
    if probability_flow:
      raise ValueError('The ancestral_sampling predictor has no probability-flow variant: set '
                       'config.sampling.probability_flow = False or use reverse_diffusion.')

  def vesde_update_fn(self, rng, x, t):
    sde = self.sde
    timestep = (t * (sde.N - 1) / sde.T).astype(jnp.int32)
    sigma = sde.discrete_sigmas[timestep]
    adjacent_sigma = jnp.where(timestep == 0, 0., sde.discrete_sigmas[jnp.maximum(timestep - 1, 0)])
    score = self.score_fn(x, t)
    x_mean = x + batch_mul(score, sigma ** 2 - adjacent_sigma ** 2)
    std = jnp.sqrt((adjacent_sigma ** 2 * (sigma ** 2 - adjacent_sigma ** 2)) / (sigma ** 2))
    noise = jax.random.normal(rng, x.shape, x.dtype)
    return x_mean + batch_mul(std, noise), x_mean

  def vpsde_update_fn(self, rng, x, t):
    sde = self.sde
    timestep = (t * (sde.N - 1) / sde.T).astype(jnp.int32)
    beta = sde.discrete_betas[timestep]
    score = self.score_fn(x, t)
    x_mean = batch_mul(x + batch_mul(beta, score), 1. / jnp.sqrt(1. - beta))
    noise = jax.random.normal(rng, x.shape, x.dtype)
    return x_mean + batch_mul(jnp.sqrt(beta), noise), x_mean

  def update_fn(self, rng, x, t):
    if isinstance(self.sde, sde_lib.VESDE):
      return self.vesde_update_fn(rng, x, t)
    return self.vpsde_update_fn(rng, x, t)


@register_predictor(name='none')
class NonePredictor(Predictor):
  """No predictor (corrector-only sampler)."""

  def __init__(self, sde, score_fn, probability_flow=False):
    pass

  def update_fn(self, rng, x, t):
    return x, x


@register_corrector(name='langevin')
class LangevinCorrector(Corrector):
  """Langevin MCMC whose step size keeps ||step * score|| / ||noise|| at the target snr."""

  def __init__(self, sde, score_fn, snr, n_steps):
    super().__init__(sde, score_fn, snr, n_steps)
    if not isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE, sde_lib.VESDE)):
      raise ValueError(f'The {type(self).__name__} supports VPSDE, subVPSDE and VESDE, not '
                       f'{sde.__class__.__name__}.')

  def _alpha(self, t):
    if isinstance(self.sde, (sde_lib.VPSDE, sde_lib.subVPSDE)):
      return _discrete_alpha(self.sde, t)
    return jnp.ones_like(t)

  def _step_size(self, grad, noise, t, alpha):
    # Means over the whole batch (score_sde: per device, then pmean over devices).
    grad_norm = jnp.mean(jnp.linalg.norm(grad.reshape((grad.shape[0], -1)), axis=-1))
    noise_norm = jnp.mean(jnp.linalg.norm(noise.reshape((noise.shape[0], -1)), axis=-1))
    return (self.snr * noise_norm / grad_norm) ** 2 * 2 * alpha

  def update_fn(self, rng, x, t):
    alpha = self._alpha(t)

    def loop_body(_, val):
      rng, x, _ = val
      grad = self.score_fn(x, t)
      rng, step_rng = jax.random.split(rng)
      noise = jax.random.normal(step_rng, x.shape, x.dtype)
      step_size = self._step_size(grad, noise, t, alpha)
      x_mean = x + batch_mul(step_size, grad)
      return rng, x_mean + batch_mul(jnp.sqrt(step_size * 2), noise), x_mean

    _, x, x_mean = jax.lax.fori_loop(0, self.n_steps, loop_body, (rng, x, x))
    return x, x_mean


@register_corrector(name='ald')
class AnnealedLangevinDynamics(LangevinCorrector):
  """Annealed Langevin dynamics of NCSN/NCSNv2: step size (snr * sigma_t)^2 * 2 * alpha."""

  def _step_size(self, grad, noise, t, alpha):
    std = self.sde.marginal_prob(jnp.zeros_like(grad), t)[1]
    return (self.snr * std) ** 2 * 2 * alpha


@register_corrector(name='none')
class NoneCorrector(Corrector):
  """No corrector (predictor-only sampler)."""

  def __init__(self, sde, score_fn, snr, n_steps):
    pass

  def update_fn(self, rng, x, t):
    return x, x


def _resolve(cls_or_name, getter, none_cls):
  if cls_or_name is None:
    return none_cls
  if isinstance(cls_or_name, str):
    return getter(cls_or_name)
  return cls_or_name


def get_pc_sampler(sde, shape, predictor, corrector, inverse_scaler, snr, n_steps=1,
                   probability_flow=False, continuous=False, denoise=True, eps=1e-3):
  """A Predictor-Corrector sampler over N = sde.N times from T down to eps.

  Args:
    predictor, corrector: a registered name, a Predictor/Corrector subclass, or None (none).
    snr, n_steps: corrector signal-to-noise ratio and steps per time.
    probability_flow: predict with the probability-flow ODE instead of the reverse SDE.
    continuous: how a (model, params, states) score is labelled (see models.utils.get_score_fn).
    denoise: return the last noise-free mean (one denoising step), as score_sde.

  Returns:
    pc_sampler(rng, score) -> (samples, nfe), pure and traceable; nfe counts the score
    evaluations actually made: N * ([predictor != none] + n_steps * [corrector != none]).
  """
  predictor_cls = _resolve(predictor, get_predictor, NonePredictor)
  corrector_cls = _resolve(corrector, get_corrector, NoneCorrector)
  # Construct once now so that unsupported combinations fail at build time, not under jit.
  predictor_cls(sde, None, probability_flow)
  corrector_cls(sde, None, snr, n_steps)
  nfe = sde.N * (int(predictor_cls is not NonePredictor)
                 + n_steps * int(corrector_cls is not NoneCorrector))

  def pc_sampler(rng, score):
    score_fn = _as_score_fn(sde, score, continuous)
    predictor_obj = predictor_cls(sde, score_fn, probability_flow)
    corrector_obj = corrector_cls(sde, score_fn, snr, n_steps)
    rng, step_rng = jax.random.split(rng)
    x = sde.prior_sampling(step_rng, shape)
    timesteps = jnp.linspace(sde.T, eps, sde.N)

    def loop_body(i, val):
      rng, x, _ = val
      vec_t = jnp.ones(shape[0], x.dtype) * timesteps[i]
      rng, c_rng, p_rng = jax.random.split(rng, 3)
      x, x_mean = corrector_obj.update_fn(c_rng, x, vec_t)
      x, x_mean = predictor_obj.update_fn(p_rng, x, vec_t)
      return rng, x, x_mean

    _, x, x_mean = jax.lax.fori_loop(0, sde.N, loop_body, (rng, x, x))
    # Denoising is one predictor step without its noise: keep x_mean of the last step.
    return inverse_scaler(x_mean if denoise else x), nfe

  return pc_sampler


def get_ode_sampler(sde, shape, inverse_scaler, denoise=False, rtol=1e-5, atol=1e-5,
                    method='RK45', eps=1e-3, continuous=True):
  """Probability-flow ODE sampler: integrate from T down to eps with the jitted adaptive
  Dormand-Prince solver of ode_solver.py (score_sde used scipy's RK45 on the host).

  Returns:
    ode_sampler(rng, score, z=None) -> (samples, nfe): from the latent z, else a prior sample.
    nfe counts the ODE's score evaluations plus one for the denoising step.
  """
  _check_ode_method(method)

  def ode_sampler(rng, score, z=None):
    score_fn = _as_score_fn(sde, score, continuous)
    rng, step_rng = jax.random.split(rng)
    x = sde.prior_sampling(step_rng, shape) if z is None else z
    x, nfe = _solve_probability_flow(sde, score_fn, x, sde.T, eps, rtol, atol)
    if denoise:  # one reverse-diffusion step without its noise, as score_sde
      vec_eps = jnp.ones(x.shape[0], x.dtype) * eps
      _, x = ReverseDiffusionPredictor(sde, score_fn, False).update_fn(rng, x, vec_eps)
      nfe = nfe + 1
    return inverse_scaler(x), nfe

  return ode_sampler


def get_ode_encoder(sde, shape, rtol=1e-5, atol=1e-5, method='RK45', eps=1e-3,
                    continuous=True):
  """The inverse of the ODE sampler (without denoising): data x (model space, `shape`) at eps
  -> latent z at T by the forward probability-flow ODE. Returns encoder(x, score) -> (z, nfe)."""
  _check_ode_method(method)

  def ode_encoder(x, score):
    if x.shape != tuple(shape):
      raise ValueError(f'The ODE encoder was built for shape {tuple(shape)}, got {x.shape}.')
    return _solve_probability_flow(sde, _as_score_fn(sde, score, continuous), x, eps, sde.T,
                                   rtol, atol)

  return ode_encoder


def _check_ode_method(method):
  if str(method).upper() not in ('RK45', 'DOPRI5'):
    raise ValueError(f"Unknown ODE method '{method}': the jitted solver is Dormand-Prince, use "
                     "'RK45'.")


def _solve_probability_flow(sde, score_fn, x, t0, t1, rtol, atol):
  """x(t1) of the probability-flow ODE from x(t0), and the number of drift evaluations."""
  import ode_solver
  rsde = sde.reverse(score_fn, probability_flow=True)

  def drift_fn(t, x):
    return rsde.sde(x, jnp.ones(x.shape[0], x.dtype) * t)[0]

  return ode_solver.solve(drift_fn, x, t0, t1, rtol=rtol, atol=atol)


def get_sampler(config, sde, shape, inverse_scaler, eps):
  """The sampler that config.sampling selects: sampler(rng, score) -> (samples, nfe), pure and
  traceable; `score` is score_fn(x, t) or (model, params, states)."""
  s = config.sampling
  method = str(s.method).lower()
  if method == 'ode':
    # score_sde always labelled the ODE's model as continuous (smooth in t; fine for VP/sub-VP
    # discrete models); a discrete VE model needs its integer labels.
    continuous = config.training.continuous or not isinstance(sde, sde_lib.VESDE)
    return get_ode_sampler(sde, shape, inverse_scaler, denoise=s.noise_removal, rtol=s.rtol,
                           atol=s.atol, eps=eps, continuous=continuous)
  if method == 'pc':
    return get_pc_sampler(sde, shape, get_predictor(s.predictor), get_corrector(s.corrector),
                          inverse_scaler, s.snr, n_steps=s.n_steps_each,
                          probability_flow=s.probability_flow,
                          continuous=config.training.continuous, denoise=s.noise_removal,
                          eps=eps)
  raise ValueError(f"Unknown sampler '{s.method}': set config.sampling.method to one of "
                   f"{', '.join(SAMPLER_NAMES)}.")


def get_score_sampling_fn(config, sde, shape, inverse_scaler, eps):
  """Like get_sampling_fn for a plain score_fn(x, t) (analytic scores, toy code):
  jitted sampling_fn(rng, score_fn) -> (samples, nfe), compiled once per score_fn."""
  return jax.jit(get_sampler(config, sde, shape, inverse_scaler, eps), static_argnums=1)


def get_sampling_fn(config, sde, model, shape, inverse_scaler, eps):
  """score_sde's factory: jitted sampling_fn(rng, params, model_state) -> (samples, nfe).

  `shape` is the batch shape (B, ...); pass sharded params / rng to the jitted function (or
  re-jit `get_sampler` with shardings) to split the batch over devices.
  """
  sampler = get_sampler(config, sde, shape, inverse_scaler, eps)

  def sampling_fn(rng, params, model_state):
    return sampler(rng, (model, params, model_state))

  return jax.jit(sampling_fn)
