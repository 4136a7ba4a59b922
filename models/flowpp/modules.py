"""Layers of the Flow++ dequantizer (Ho et al. 2019), shared by every variant.

Rewritten in flax.linen from score_flow's models/flowpp/modules_{cifar10,imagenet32,imagenet64}.py
(themselves ported from aravindsrinivas/flowpp). Data-dependent initialisation: every conv/dense
layer draws a random direction, then sets its scale and bias from the first (init) batch so that
its output is zero-mean with standard deviation `init_scale` per channel; ActNorm (`Norm`) does
the same per position. Weight normalisation (W = g V / |V|, Salimans & Kingma 2016) is used by the
'imagenet32' variant, as in the original.

Differences from the original code, all deliberate:
- the plain layers' weight and bias initialisers used two different random weights, so the
  bias did not centre the output; here both use the same weight (the design intent);
- the original ran the plain convolutions with dimension_numbers 'NWHC' (a transposed 3x3
  kernel, the same function class); here every convolution is NHWC/HWIO;
- layer-norm scales are (C,) instead of (1, 1, 1, C);
- logit(CDF) is computed as log F - log(1 - F) instead of clipping F, and its inverse bisects in
  logit space; identical maps, exact where F rounds to 0 or 1 in float32;
- imagenet64: the original named every gated block's output conv 'c2' (flax refuses the repeated
  parameter name from the second block on) and made position embeddings ('pos_emb',
  'pos_emb_dq') that nothing used; here each block has its own name and no unused parameter;
- the couplings' first and last convs are 'proj_in' / 'proj_out' in every variant (the ImageNet
  originals: 'c1' / '<last block>_c2'; cifar10: 'proj_in' / '<last block>_proj_out').
Every layer's __call__ returns (output, logdet) with logdet the per-example log |det d out / d in|
of the direction it ran in (None for volume-preserving reshapes).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import logistic


def sumflat(x):
  """Sum over all but the batch axis."""
  return jnp.sum(x.reshape((x.shape[0], -1)), axis=1)


def _moments(y, axes):
  m = jnp.mean(y, axis=axes)
  v = jnp.mean(jnp.square(y), axis=axes) - jnp.square(m)
  return m, v


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, window_strides=(1, 1), padding='SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _dense(x, w):
  return jnp.einsum('...i,io->...o', x, w)


def _data_init_layer(mod, x, *, name, shape, apply, init_scale, weight_norm):
  """A linear layer (apply(x, W) + b) with data-dependent init; params are made in `mod`."""
  axes = tuple(range(x.ndim - 1))
  if weight_norm:
    v = mod.param(f'{name}_V', nn.initializers.normal(0.05, x.dtype), shape)
    sq = jnp.sum(jnp.square(v), axis=tuple(range(v.ndim - 1)))
    vnorm = v * jax.lax.rsqrt(jnp.maximum(sq, 1e-12))

    def g_init(_):
      _, var = _moments(apply(x, vnorm), axes)
      return init_scale * jax.lax.rsqrt(var + 1e-6)

    w = mod.param(f'{name}_g', g_init) * vnorm
  else:
    def w_init(rng):
      v = jax.random.normal(rng, shape, x.dtype) * 0.05
      _, var = _moments(apply(x, v), axes)
      return v * (init_scale * jax.lax.rsqrt(var + 1e-6))

    w = mod.param(f'{name}_W', w_init)
  y = apply(x, w)
  b = mod.param(f'{name}_b', lambda _: -_moments(y, axes)[0])
  y = y + b
  # Zero-mean unit-variance per channel on the init batch (checked by the tests).
  mod.sow('intermediates', name, y / init_scale)
  return y


def conv2d(mod, x, *, name, features, kernel=(3, 3), init_scale=1., weight_norm=False):
  """3x3 SAME convolution with data-dependent init (optionally weight-normalised)."""
  return _data_init_layer(mod, x, name=name, shape=(*kernel, x.shape[-1], features), apply=_conv,
                          init_scale=init_scale, weight_norm=weight_norm)


def nin(mod, x, *, name, features, init_scale=1.):
  """Per-position dense layer (network-in-network) with data-dependent init."""
  return _data_init_layer(mod, x, name=name, shape=(x.shape[-1], features), apply=_dense,
                          init_scale=init_scale, weight_norm=False)


def layernorm(mod, x, *, name, eps=1e-5):
  """Layer norm over the channel axis."""
  c = x.shape[-1]
  g = mod.param(f'{name}_g', nn.initializers.ones, (c,), x.dtype)
  b = mod.param(f'{name}_b', nn.initializers.zeros, (c,), x.dtype)
  m = jnp.mean(x, axis=-1, keepdims=True)
  v = jnp.mean(jnp.square(x - m), axis=-1, keepdims=True)
  return (x - m) * jax.lax.rsqrt(v + eps) * g + b


def concat_elu(x):
  return jax.nn.elu(jnp.concatenate([x, -x], axis=-1))


def gate(x):
  a, b = jnp.split(x, 2, axis=-1)
  return a * jax.nn.sigmoid(b)


def gated_conv(mod, x, *, name, a=None, use_nin, dropout, train, weight_norm):
  """Gated residual block: x + gate(conv(concat_elu(conv(concat_elu(x)) + nin(a))))."""
  f = x.shape[-1]
  c1 = conv2d(mod, concat_elu(x), name=f'{name}_c1', features=f, weight_norm=weight_norm)
  if a is not None:  # short-cut from the auxiliary (context) input
    c1 = c1 + nin(mod, concat_elu(a), name=f'{name}_a_proj', features=f)
  c1 = concat_elu(c1)
  if dropout > 0:
    c1 = nn.Dropout(rate=dropout, deterministic=not train)(c1)
  if use_nin:
    c2 = nin(mod, c1, name=f'{name}_c2', features=2 * f, init_scale=0.1)
  else:
    c2 = conv2d(mod, c1, name=f'{name}_c2', features=2 * f, init_scale=0.1,
                weight_norm=weight_norm)
  return x + gate(c2)


def gated_attn(mod, x, *, name, pos_emb, heads, dropout, train):
  """Gated residual multi-head self-attention over all positions."""
  bs, h, w, ch = x.shape
  if ch % heads:
    raise ValueError(f'attention channels {ch} are not divisible by heads {heads}; '
                     'change the variant.')
  t, d = h * w, ch // heads
  c = nin(mod, x + pos_emb[None], name=f'{name}_proj1', features=3 * ch)
  c = jnp.transpose(c.reshape(bs, t, 3, heads, d), (2, 0, 3, 1, 4))  # 3, b, heads, t, d
  q, k, v = c[0], c[1], c[2]
  wts = jax.nn.softmax(jnp.einsum('bhTd,bhtd->bhTt', q, k) / jnp.sqrt(float(d)), axis=-1)
  a = jnp.einsum('bhTt,bhtd->bhTd', wts, v)
  a = jnp.transpose(a, (0, 2, 1, 3)).reshape(bs, h, w, ch)
  if dropout > 0:
    a = nn.Dropout(rate=dropout, deterministic=not train)(a)
  c2 = nin(mod, a, name=f'{name}_proj2', features=2 * ch, init_scale=0.1)
  return x + gate(c2)


def checkerboard_split(x):
  """(B, H, W, C) -> even and odd columns, each (B, H, W/2, C) (score_flow's 'checkerboard')."""
  b, h, w, c = x.shape
  x = x.reshape(b, h, w // 2, 2, c)
  return x[:, :, :, 0], x[:, :, :, 1]


def checkerboard_merge(pair):
  """Inverse of checkerboard_split."""
  a, b = pair
  bs, h, w2, c = a.shape
  return jnp.stack([a, b], axis=3).reshape(bs, h, 2 * w2, c)


class Norm(nn.Module):
  """ActNorm on each member of a tuple: per-position scale and bias, data-dependent init."""
  init_scale: float = 1.

  @nn.compact
  def __call__(self, inputs, inverse=False):
    out, logd = [], 0.
    for i, x in enumerate(inputs):
      def g_init(_, x=x):
        _, v = _moments(x, 0)
        return self.init_scale * jax.lax.rsqrt(v + 1e-6)

      g = jnp.maximum(self.param(f'norm{i}_g', g_init), 1e-10)
      b = self.param(f'norm{i}_b', lambda _, x=x, g=g: -jnp.mean(x, axis=0) * g)
      if not inverse:
        y = x * g + b
        self.sow('intermediates', f'norm{i}', y / self.init_scale)
      else:
        y = (x - b) / g
      out.append(y)
      logd = logd + jnp.sum(jnp.log(g))
    logd = jnp.full((inputs[0].shape[0],), logd)
    return tuple(out), (-logd if inverse else logd)


class Pointwise(nn.Module):
  """Invertible 1x1 convolution on each member of a tuple (identity plus small noise at init)."""
  noisy_identity_init: float = 0.001

  @nn.compact
  def __call__(self, inputs, inverse=False):
    out, logd = [], 0.
    for i, x in enumerate(inputs):
      c = x.shape[-1]
      if self.noisy_identity_init:
        init = lambda key, c=c, dt=x.dtype: (
          jnp.eye(c, dtype=dt) + self.noisy_identity_init * jax.random.normal(key, (c, c), dt))
      else:  # random rotation
        init = lambda key, c=c, dt=x.dtype: jnp.linalg.qr(jax.random.normal(key, (c, c), dt))[0]
      w = self.param(f'W{i}', init)
      out.append(_dense(x, jnp.linalg.inv(w) if inverse else w))
      logd = logd + x.shape[1] * x.shape[2] * jnp.linalg.slogdet(w)[1]
    logd = jnp.full((inputs[0].shape[0],), logd)
    return tuple(out), (-logd if inverse else logd)


class MixLogisticCoupling(nn.Module):
  """Flow++ coupling: the second half goes through a mixture-of-logistics CDF, a logit and an
  elementwise affine map, all conditioned on the first half and the context.

  filters/blocks/components/heads size the conditioner; `attn` adds self-attention to each of its
  blocks ('cifar10', 'imagenet32'); `use_ln` adds layer norms; `final_nonlinearity` applies
  concat_elu before the output convolution (the ImageNet variants).
  """
  filters: int
  blocks: int
  components: int
  heads: int = 4
  attn: bool = True
  use_ln: bool = True
  final_nonlinearity: bool = False
  weight_norm: bool = False
  init_scale: float = 0.1
  dropout: float = 0.
  min_logscale: float = -7.
  bisection_iters: int = 100

  def conditioner(self, x, context, train):
    b, h, w, c = x.shape
    k = self.components
    x = conv2d(self, x, name='proj_in', features=self.filters, weight_norm=self.weight_norm)
    if self.attn:
      pos_emb = self.param('pos_emb', nn.initializers.normal(0.01, x.dtype), (h, w, self.filters))
    for i in range(self.blocks):
      name = f'block{i}'
      x = gated_conv(self, x, name=f'{name}_conv', a=context, use_nin=True, dropout=self.dropout,
                     train=train, weight_norm=self.weight_norm)
      if self.use_ln:
        x = layernorm(self, x, name=f'{name}_ln1')
      if self.attn:
        x = gated_attn(self, x, name=f'{name}_attn', pos_emb=pos_emb, heads=self.heads,
                       dropout=self.dropout, train=train)
        if self.use_ln:
          x = layernorm(self, x, name=f'{name}_ln2')
    if self.final_nonlinearity:
      x = concat_elu(x)
    x = conv2d(self, x, name='proj_out', features=c * (2 + 3 * k), init_scale=self.init_scale,
               weight_norm=self.weight_norm)
    x = x.reshape(b, h, w, c, 2 + 3 * k)
    s, t = jnp.tanh(x[..., 0]), x[..., 1]
    logits, means, logscales = jnp.split(x[..., 2:], 3, axis=-1)
    logscales = jnp.maximum(logscales, self.min_logscale)
    return dict(prior_logits=logits, means=means, logscales=logscales), s, t

  @nn.compact
  def __call__(self, pair, context=None, inverse=False, train=False):
    cf, ef = pair
    mix, s, t = self.conditioner(cf, context, train)
    if not inverse:
      # CDF then logit: y = logit(F(ef)); d y / d ef = pdf / (F (1 - F)).
      y, logcdf, logsf = logistic.mixlogistic_logit_cdf(x=ef, **mix)
      logd = logistic.mixlogistic_logpdf(x=ef, **mix) - logcdf - logsf
      out = y * jnp.exp(s) + t
      return (cf, out), sumflat(logd + s)
    y = (ef - t) * jnp.exp(-s)
    out = logistic.mixlogistic_inv_logit_cdf(y=y, iters=self.bisection_iters, **mix)
    _, logcdf, logsf = logistic.mixlogistic_logit_cdf(x=out, **mix)
    logd = logistic.mixlogistic_logpdf(x=out, **mix) - logcdf - logsf
    return (cf, out), -sumflat(logd + s)


class ContextProcessor(nn.Module):
  """Features of the image x in [0, 1] on the half-width grid, fed to every coupling.

  'cifar10': conv + 3 gated convs (ShallowProcessor); 'imagenet32': conv + 8 x (gated conv, LN,
  attention, LN); 'imagenet64': conv + 5 x (gated conv, LN) (DeepProcessor).
  """
  filters: int = 32
  blocks: int = 3
  attn: bool = False
  use_ln: bool = False
  heads: int = 4
  weight_norm: bool = False
  dropout: float = 0.

  @nn.compact
  def __call__(self, x, train=False):
    this, that = checkerboard_split(x - 0.5)
    h = conv2d(self, jnp.concatenate([this, that], axis=-1), name='proj', features=self.filters,
               weight_norm=self.weight_norm)
    if self.attn:
      pos_emb = self.param('pos_emb_dq', nn.initializers.normal(0.01, h.dtype), h.shape[1:])
    for i in range(self.blocks):
      h = gated_conv(self, h, name=f'c{i}', use_nin=False, dropout=self.dropout, train=train,
                     weight_norm=self.weight_norm)
      if self.use_ln:
        h = layernorm(self, h, name=f'dqln{i}')
      if self.attn:
        h = gated_attn(self, h, name=f'dqattn{i}', pos_emb=pos_emb, heads=self.heads,
                       dropout=self.dropout, train=train)
        if self.use_ln:
          h = layernorm(self, h, name=f'ln{i}')
    return h
