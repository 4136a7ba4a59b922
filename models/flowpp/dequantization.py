"""Conditional Flow++ variational dequantizer q(noise | x) of ScoreFlow (Song et al. 2021).

A flow maps u ~ N(0, I) (the image's shape) to noise in (0, 1)^D conditioned on the image x in
[0, 1]: checkerboard (column) split, then per coupling step ActNorm, [invertible 1x1 conv],
mixture-of-logistics coupling conditioned on the other half and on features of x, swap halves;
merge; sigmoid. One module serves every variant; `VARIANTS` holds the original sizes, and
config.deq.model='auto' (the default) picks one by dataset and image size as score_flow did
(`auto_variant`).

Parameter tree: 'processor' (context), 'norm_k', 'pointwise_k' (cifar10), 'coupling_k'
(k = 0, 1, ... over all stages); inside each, flat names as score_flow ('proj_W', 'c0_c1_W',
'block0_conv_c1_V' / '_g' / '_b', 'norm0_g', 'W0', 'pos_emb', ...). score_flow named the
top-level modules by class instead (Norm_0, MixLogisticAttnCoupling_0, ShallowProcessor_0, ...);
see modules.py for the other differences a legacy-checkpoint import would have to map.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import modules


@dataclasses.dataclass(frozen=True)
class FlowppVariant:
  """Sizes and wiring of one dequantizer variant (field names follow score_flow)."""
  filters: int  # conditioner width of each coupling
  components: int  # logistic mixture components
  blocks: int  # conditioner blocks per coupling
  heads: int  # attention heads (couplings and processor)
  coupling_attn: bool  # self-attention in the coupling conditioners
  use_ln: bool  # layer norms in the coupling conditioners
  final_nonlinearity: bool  # concat_elu before each coupling's output conv
  weight_norm: bool  # weight-normalised 3x3 convs (imagenet32)
  pointwise: bool  # invertible 1x1 conv before each coupling (cifar10)
  stages: int  # split / couplings / merge repeats
  couplings_per_stage: int
  proc_filters: int  # context processor width
  proc_blocks: int
  proc_attn: bool
  proc_ln: bool


VARIANTS = {
  # dequantization_cifar10.py: ShallowProcessor, 4 x (Norm, Pointwise, MixLogisticAttnCoupling).
  'cifar10': FlowppVariant(filters=96, components=32, blocks=2, heads=4, coupling_attn=True,
                           use_ln=True, final_nonlinearity=False, weight_norm=False,
                           pointwise=True, stages=1, couplings_per_stage=4, proc_filters=32,
                           proc_blocks=3, proc_attn=False, proc_ln=False),
  # dequantization_imagenet32.py: DeepProcessor with attention, 2 x 4 attention couplings.
  'imagenet32': FlowppVariant(filters=128, components=32, blocks=8, heads=4, coupling_attn=True,
                              use_ln=True, final_nonlinearity=True, weight_norm=True,
                              pointwise=False, stages=2, couplings_per_stage=4, proc_filters=32,
                              proc_blocks=8, proc_attn=True, proc_ln=True),
  # dequantization_imagenet64.py: DeepProcessor without attention, 4 couplings without attention.
  'imagenet64': FlowppVariant(filters=96, components=4, blocks=5, heads=4, coupling_attn=False,
                              use_ln=True, final_nonlinearity=True, weight_norm=False,
                              pointwise=False, stages=1, couplings_per_stage=4, proc_filters=32,
                              proc_blocks=5, proc_attn=False, proc_ln=True),
  # CPU tests: the cifar10 wiring at a few channels and two couplings (each half once).
  'tiny': FlowppVariant(filters=8, components=3, blocks=1, heads=2, coupling_attn=True,
                        use_ln=True, final_nonlinearity=False, weight_norm=False, pointwise=True,
                        stages=1, couplings_per_stage=2, proc_filters=8, proc_blocks=1,
                        proc_attn=False, proc_ln=False),
}


AUTO = 'auto'  # config.deq.model default: the variant score_flow built for the dataset


def get_variant(name):
  """The FlowppVariant of an explicit name, refused in one line if unknown."""
  if name not in VARIANTS:
    raise ValueError(f'unknown dequantizer model {name!r}; set config.deq.model to {AUTO!r} or '
                     f'one of {sorted(VARIANTS)}.')
  return VARIANTS[name]


def auto_variant(dataset, image_size):
  """The variant name score_flow's models/utils.py built for a dataset, so defaults match it.

  CIFAR10 (any size) -> 'cifar10'; ImageNet 32x32 -> 'imagenet32', 64x64 -> 'imagenet64'. The
  original built nothing for other data (it failed), so those need an explicit config.deq.model.
  """
  name = str(dataset).lower()
  if name == 'cifar10':
    return 'cifar10'
  if name == 'imagenet' and image_size in (32, 64):
    return f'imagenet{image_size}'
  raise ValueError(f'config.deq.model={AUTO!r} picks a dequantizer only for CIFAR10 and ImageNet '
                   f'32x32 / 64x64 (as score_flow); for {dataset} at {image_size}x{image_size} '
                   f'set --config.deq.model to one of {sorted(VARIANTS)}.')


def _split(h, inverse):
  return (modules.checkerboard_merge(h) if inverse else modules.checkerboard_split(h)), None


def _merge(h, inverse):
  return _split(h, not inverse)


def _flip(h, inverse):
  return (h[1], h[0]), None


class Dequantization(nn.Module):
  """__call__(u, x) -> (noise, sldj); __call__(noise, x, inverse=True) -> (u, inverse sldj).

  x is the image in [0, 1] (B, H, W, C), W even. The forward sldj is log |det d noise / d u| per
  example, so log q(noise | x) = log N(u; 0, I) - sldj. With inverse=True the second output is
  log |det d u / d noise| (= minus the forward sldj at that u).
  Dropout (config.deq.dropout) acts in the context processor only, as in score_flow.
  """
  variant: FlowppVariant
  dropout: float = 0.
  bisection_iters: int = 100

  @nn.compact
  def __call__(self, eps, x, inverse=False, train=False):
    v = self.variant
    if eps.shape != x.shape or eps.ndim != 4 or eps.shape[2] % 2:
      raise ValueError(f'dequantizer needs u and x of one NHWC shape with even width; got '
                       f'{eps.shape} and {x.shape}.')
    context = modules.ContextProcessor(
      filters=v.proc_filters, blocks=v.proc_blocks, attn=v.proc_attn, use_ln=v.proc_ln,
      heads=v.heads, weight_norm=v.weight_norm, dropout=self.dropout, name='processor')(
        x, train=train)

    layers, k = [], 0
    for _ in range(v.stages):
      layers.append(_split)
      for _ in range(v.couplings_per_stage):
        layers.append(modules.Norm(name=f'norm_{k}'))
        if v.pointwise:
          layers.append(modules.Pointwise(name=f'pointwise_{k}'))
        coupling = modules.MixLogisticCoupling(
          filters=v.filters, blocks=v.blocks, components=v.components, heads=v.heads,
          attn=v.coupling_attn, use_ln=v.use_ln, final_nonlinearity=v.final_nonlinearity,
          weight_norm=v.weight_norm, bisection_iters=self.bisection_iters, name=f'coupling_{k}')
        layers.append(lambda h, inverse, c=coupling: c(h, context=context, inverse=inverse,
                                                       train=train))
        layers.append(_flip)
        k += 1
      layers.append(_merge)

    sldj = jnp.zeros((eps.shape[0],), eps.dtype)
    h = eps
    if inverse:
      # Undo the final sigmoid: h = logit(noise), log |dh/dnoise| = -log noise - log(1 - noise).
      logn, log1mn = jnp.log(h), jnp.log1p(-h)
      h = logn - log1mn
      sldj = sldj - modules.sumflat(logn + log1mn)
    for layer in (layers[::-1] if inverse else layers):
      h, logd = layer(h, inverse)
      if logd is not None:
        sldj = sldj + logd
    if not inverse:
      # noise = sigmoid(h): log |d noise / dh| = -softplus(h) - softplus(-h). The clip changes
      # noise only where float32 rounds the sigmoid to exactly 0 or 1 (|h| > ~17), so that
      # noise lies strictly inside (0, 1).
      sldj = sldj + modules.sumflat(-jax.nn.softplus(h) - jax.nn.softplus(-h))
      tiny = jnp.finfo(h.dtype).tiny
      h = jnp.clip(jax.nn.sigmoid(h), tiny, 1. - jnp.finfo(h.dtype).epsneg)
    return h, sldj
