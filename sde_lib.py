"""Forward SDEs (VP, sub-VP, VE), their reverse SDE / probability-flow ODE, and the
likelihood-weighting importance distribution of score_flow. Shape-agnostic: x is (B, ...)."""
import abc

import jax
import jax.numpy as jnp
import numpy as np

from divergence import batch_mul


class SDE(abc.ABC):
  """dx = f(x, t) dt + g(t) dw on t in [0, T], for a mini-batch of inputs."""

  def __init__(self, N):
    super().__init__()
    self.N = N  # number of discretisation steps (samplers, discrete models)

  @property
  @abc.abstractmethod
  def T(self):
    """End time of the SDE."""

  @abc.abstractmethod
  def sde(self, x, t):
    """Returns (drift f(x, t), diffusion g(t))."""

  @abc.abstractmethod
  def marginal_prob(self, x, t):
    """Mean and std of the Gaussian perturbation kernel p_0t(x(t) | x(0) = x)."""

  @abc.abstractmethod
  def prior_std(self):
    """Standard deviation of the isotropic Gaussian prior p_T."""

  def prior_sampling(self, rng, shape):
    return jax.random.normal(rng, shape) * self.prior_std()

  def prior_logp(self, z):
    """Log-density of the prior at z, one value per example."""
    dim = np.prod(z.shape[1:])
    var = self.prior_std() ** 2
    sq = jnp.sum(jnp.square(z).reshape((z.shape[0], -1)), axis=-1)
    return -dim / 2. * jnp.log(2 * np.pi * var) - sq / (2 * var)

  def prior_entropy(self, z):
    """Entropy of the prior, one value per example (same shape logic as prior_logp)."""
    dim = np.prod(z.shape[1:])
    return jnp.full((z.shape[0],), dim * (0.5 * np.log(2 * np.pi * self.prior_std() ** 2) + 0.5))

  def discretize(self, x, t):
    """x_{i+1} = x_i + f_i(x_i) + G_i z_i; Euler-Maruyama unless a subclass knows better."""
    dt = 1 / self.N
    drift, diffusion = self.sde(x, t)
    return drift * dt, diffusion * jnp.sqrt(dt)

  @abc.abstractmethod
  def likelihood_importance_cum_weight(self, t, eps=1e-5):
    """int_eps^t g(s)^2 / sigma(s)^2 ds: the unnormalised CDF of the importance time density."""

  def sample_importance_weighted_time_for_likelihood(self, rng, shape, quantile=None, eps=1e-5,
                                                     steps=100):
    """Times with density proportional to g(t)^2 / sigma(t)^2 on [eps, T], by bisection."""
    Z = self.likelihood_importance_cum_weight(self.T, eps=eps)
    if quantile is None:
      quantile = jax.random.uniform(rng, shape, minval=0, maxval=Z)
    lb = jnp.full_like(quantile, eps)
    ub = jnp.full_like(quantile, self.T)

    def bisect(carry, _):
      lb, ub = carry
      mid = (lb + ub) / 2.
      below = self.likelihood_importance_cum_weight(mid, eps=eps) <= quantile
      return (jnp.where(below, mid, lb), jnp.where(below, ub, mid)), None

    (lb, ub), _ = jax.lax.scan(bisect, (lb, ub), None, length=steps)
    return (lb + ub) / 2.

  def reverse(self, score_fn, probability_flow=False):
    """The reverse-time SDE, or with probability_flow=True the probability-flow ODE."""
    forward = self
    scale = 0.5 if probability_flow else 1.

    class ReverseSDE:
      N = forward.N
      T = forward.T

      def __init__(self):
        self.probability_flow = probability_flow

      def sde(self, x, t):
        drift, diffusion = forward.sde(x, t)
        drift = drift - batch_mul(diffusion ** 2, score_fn(x, t) * scale)
        return drift, (jnp.zeros_like(t) if probability_flow else diffusion)

      def discretize(self, x, t):
        f, G = forward.discretize(x, t)
        rev_f = f - batch_mul(G ** 2, score_fn(x, t) * scale)
        return rev_f, (jnp.zeros_like(t) if probability_flow else G)

    return ReverseSDE()


class VPSDE(SDE):
  """Variance preserving SDE (DDPM in the continuous limit), beta(t) linear in t."""

  def __init__(self, beta_min=0.1, beta_max=20., N=1000):
    super().__init__(N)
    self.beta_0 = beta_min
    self.beta_1 = beta_max
    self.discrete_betas = jnp.linspace(beta_min / N, beta_max / N, N)
    self.alphas = 1. - self.discrete_betas
    self.alphas_cumprod = jnp.cumprod(self.alphas, axis=0)
    self.sqrt_alphas_cumprod = jnp.sqrt(self.alphas_cumprod)
    self.sqrt_1m_alphas_cumprod = jnp.sqrt(1. - self.alphas_cumprod)

  @property
  def T(self):
    return 1

  def prior_std(self):
    return 1.

  def _log_mean_coeff(self, t):
    return -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

  def sde(self, x, t):
    beta_t = self.beta_0 + t * (self.beta_1 - self.beta_0)
    return -0.5 * batch_mul(beta_t, x), jnp.sqrt(beta_t)

  def marginal_prob(self, x, t, high_precision=True):
    lmc = self._log_mean_coeff(t)
    if high_precision:  # first-order expansions where exp(.) - 1 would lose digits
      small = jnp.abs(lmc) <= 1e-3
      mean_coeff = jnp.where(small, 1. + lmc, jnp.exp(lmc))
      std = jnp.where(small, jnp.sqrt(-2. * lmc), jnp.sqrt(1. - jnp.exp(2. * lmc)))
    else:
      mean_coeff, std = jnp.exp(lmc), jnp.sqrt(1. - jnp.exp(2. * lmc))
    return batch_mul(mean_coeff, x), std

  def discretize(self, x, t):
    """DDPM discretisation."""
    timestep = (t * (self.N - 1) / self.T).astype(jnp.int32)
    beta = self.discrete_betas[timestep]
    alpha = self.alphas[timestep]
    return batch_mul(jnp.sqrt(alpha), x) - x, jnp.sqrt(beta)

  def likelihood_importance_cum_weight(self, t, eps=1e-5):
    # g^2/sigma^2 = d/dt log(exp(B(t)) - 1) with B(t) = int_0^t beta.
    exponent1 = 0.5 * eps * (eps - 2) * self.beta_0 - 0.5 * eps ** 2 * self.beta_1
    exponent2 = 0.5 * t * (t - 2) * self.beta_0 - 0.5 * t ** 2 * self.beta_1
    term1 = jnp.where(jnp.abs(exponent1) <= 1e-3, -exponent1, 1. - jnp.exp(exponent1))
    term2 = jnp.where(jnp.abs(exponent2) <= 1e-3, -exponent2, 1. - jnp.exp(exponent2))
    return 0.5 * (-2 * jnp.log(term1) + 2 * jnp.log(term2)
                  + self.beta_0 * (-2 * eps + eps ** 2 - (t - 2) * t)
                  + self.beta_1 * (-eps ** 2 + t ** 2))


class subVPSDE(SDE):
  """The sub-VP SDE of score_sde, whose diffusion is discounted by 1 - exp(-2 int beta)."""

  def __init__(self, beta_min=0.1, beta_max=20., N=1000):
    super().__init__(N)
    self.beta_0 = beta_min
    self.beta_1 = beta_max

  @property
  def T(self):
    return 1

  def prior_std(self):
    return 1.

  def sde(self, x, t, high_precision=True):
    beta_t = self.beta_0 + t * (self.beta_1 - self.beta_0)
    exponent = -2 * self.beta_0 * t - (self.beta_1 - self.beta_0) * t ** 2
    discount = 1. - jnp.exp(exponent)
    if high_precision:
      discount = jnp.where(jnp.abs(exponent) <= 1e-3, -exponent, discount)
    return -0.5 * batch_mul(beta_t, x), jnp.sqrt(beta_t * discount)

  def marginal_prob(self, x, t, high_precision=True):
    lmc = -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0
    if high_precision:
      small = jnp.abs(lmc) <= 1e-3
      mean_coeff = jnp.where(small, 1. + lmc, jnp.exp(lmc))
      std = jnp.where(small, -2. * lmc, 1. - jnp.exp(2. * lmc))
    else:
      mean_coeff, std = jnp.exp(lmc), 1. - jnp.exp(2. * lmc)
    return batch_mul(mean_coeff, x), std

  def likelihood_importance_cum_weight(self, t, eps=1e-5):
    exponent1 = 0.5 * eps * (eps * self.beta_1 - (eps - 2) * self.beta_0)
    exponent2 = 0.5 * t * (self.beta_1 * t - (t - 2) * self.beta_0)
    term1 = jnp.where(exponent1 <= 1e-3, jnp.log(exponent1), jnp.log(jnp.expm1(exponent1)))
    term2 = jnp.where(exponent2 <= 1e-3, jnp.log(exponent2), jnp.log(jnp.expm1(exponent2)))
    return 0.5 * (-4 * term1 + 4 * term2
                  + (2 * eps - eps ** 2 + t * (t - 2)) * self.beta_0
                  + (eps ** 2 - t ** 2) * self.beta_1)


class VESDE(SDE):
  """Variance exploding SDE: sigma(t) geometric in t (SMLD/NCSN), or linear when linear=True."""

  def __init__(self, sigma_min=0.01, sigma_max=50., N=1000, linear=False):
    super().__init__(N)
    self.sigma_min = sigma_min
    self.sigma_max = sigma_max
    self.linear = linear
    if linear:
      self.discrete_sigmas = jnp.linspace(sigma_min, sigma_max, N)
    else:
      self.discrete_sigmas = jnp.exp(np.linspace(np.log(sigma_min), np.log(sigma_max), N))

  @property
  def T(self):
    return 1

  def prior_std(self):
    return self.sigma_max

  def sde(self, x, t):
    if self.linear:
      diffusion = self.sigma_max * jnp.sqrt(2 * t)
    else:
      sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** t
      diffusion = sigma * np.sqrt(2 * (np.log(self.sigma_max) - np.log(self.sigma_min)))
    return jnp.zeros_like(x), diffusion

  def marginal_prob(self, x, t):
    if self.linear:
      std = t * self.sigma_max
    else:
      std = self.sigma_min * (self.sigma_max / self.sigma_min) ** t
    return x, std

  def discretize(self, x, t):
    """SMLD (NCSN) discretisation."""
    if self.linear:
      return super().discretize(x, t)
    timestep = (t * (self.N - 1) / self.T).astype(jnp.int32)
    sigma = self.discrete_sigmas[timestep]
    adjacent = jnp.where(timestep == 0, 0., self.discrete_sigmas[jnp.maximum(timestep - 1, 0)])
    return jnp.zeros_like(x), jnp.sqrt(sigma ** 2 - adjacent ** 2)

  def likelihood_importance_cum_weight(self, t, eps=1e-5):
    if self.linear:  # g^2/sigma^2 = 2/t
      return 2. * (jnp.log(t) - jnp.log(eps))
    return 2. * np.log(self.sigma_max / self.sigma_min) * (t - eps)  # constant weight


SDE_NAMES = ('vpsde', 'subvpsde', 'vesde', 'vesde_linear', 'linearvesde')  # the last: the original's name


def get_sde(config):
  """The one SDE factory: (sde, sampling_eps) from config.training.sde and config.model."""
  name = config.training.sde.lower()
  model = config.model
  if name == 'vpsde':
    sde = VPSDE(beta_min=model.beta_min, beta_max=model.beta_max, N=model.num_scales)
  elif name == 'subvpsde':
    sde = subVPSDE(beta_min=model.beta_min, beta_max=model.beta_max, N=model.num_scales)
  elif name in ('vesde', 'vesde_linear', 'linearvesde'):
    sde = VESDE(sigma_min=model.sigma_min, sigma_max=model.sigma_max, N=model.num_scales,
                linear=name != 'vesde')
  else:
    raise ValueError(f"Unknown SDE '{config.training.sde}': set --config.training.sde to one of "
                     f"{', '.join(SDE_NAMES)}.")
  return sde, config.sampling.smallest_time
