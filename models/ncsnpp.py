"""NCSN++ (VE configs) and DDPM++ (VP / sub-VP configs): one U-Net class, score_sde's wiring.

Options (config.model): resblock_type 'ddpm' | 'biggan'; progressive 'none' | 'output_skip' |
'residual'; progressive_input 'none' | 'input_skip' | 'residual'; progressive_combine 'sum' |
'cat'; embedding_type 'fourier' (of log sigma under VE, of the label otherwise) | 'positional';
fir / fir_kernel; skip_rescale; init_scale; scale_by_sigma (VE: divide the output by sigma, so
the network returns the score). Module creation order, and so every parameter name, is the
original's (checkpoint compatibility).
"""
import functools

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from models import layers, layerspp, utils

ResnetBlockDDPM = layerspp.ResnetBlockDDPMpp
ResnetBlockBigGAN = layerspp.ResnetBlockBigGANpp
Combine = layerspp.Combine
conv3x3 = layerspp.conv3x3
group_norm = layerspp.group_norm
get_act = layers.get_act
default_initializer = layers.default_init

PROGRESSIVE = ('none', 'output_skip', 'residual')
PROGRESSIVE_INPUT = ('none', 'input_skip', 'residual')
EMBEDDINGS = ('fourier', 'positional')
RESBLOCKS = ('ddpm', 'biggan')


def _check(value, allowed, field):
  if value not in allowed:
    raise ValueError(f"Unknown {field} '{value}': set config.model.{field} to one of "
                     f"{', '.join(allowed)}.")


@utils.register_model(name='ncsnpp')
class NCSNpp(nn.Module):
  """NCSN++ / DDPM++ U-Net: x (B, H, W, C), time_cond (B,) -> (B, H, W, C)."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x, time_cond, train=True):
    config = self.config
    m = config.model
    act = get_act(config)
    nf = m.nf
    ch_mult = m.ch_mult
    num_res_blocks = m.num_res_blocks
    attn_resolutions = m.attn_resolutions
    dropout = m.dropout
    resamp_with_conv = m.resamp_with_conv
    num_resolutions = len(ch_mult)
    conditional = m.conditional
    fir = m.fir
    fir_kernel = tuple(m.fir_kernel)
    skip_rescale = m.skip_rescale
    resblock_type = m.resblock_type.lower()
    progressive = m.progressive.lower()
    progressive_input = m.progressive_input.lower()
    embedding_type = m.embedding_type.lower()
    init_scale = m.init_scale
    combine_method = m.progressive_combine.lower()
    _check(resblock_type, RESBLOCKS, 'resblock_type')
    _check(progressive, PROGRESSIVE, 'progressive')
    _check(progressive_input, PROGRESSIVE_INPUT, 'progressive_input')
    _check(embedding_type, EMBEDDINGS, 'embedding_type')
    combiner = functools.partial(Combine, method=combine_method)
    is_ve = config.training.sde.lower() == 'vesde'  # geometric VE: the label is sigma
    if m.scale_by_sigma and not is_ve:
      raise ValueError("config.model.scale_by_sigma needs training.sde = 'vesde' (the score "
                       'function rescales other SDEs): set config.model.scale_by_sigma = False.')

    # Time / noise-level embedding.
    if embedding_type == 'fourier':
      if not config.training.continuous:
        raise ValueError('Fourier features need continuous labels: set '
                         "config.training.continuous = True or config.model.embedding_type = "
                         "'positional'.")
      used_sigmas = time_cond
      temb = layerspp.GaussianFourierProjection(
        embedding_size=nf, scale=m.fourier_scale, trainable=m.trainable_embedding)(
          jnp.log(used_sigmas) if is_ve else time_cond)
    else:
      if is_ve:
        raise ValueError('Positional embeddings expect time labels, not VE sigmas: set '
                         "config.model.embedding_type = 'fourier' for training.sde = 'vesde'.")
      temb = layers.get_timestep_embedding(time_cond, nf)

    if conditional:
      temb = nn.Dense(nf * 4, kernel_init=default_initializer())(temb)
      temb = nn.Dense(nf * 4, kernel_init=default_initializer())(act(temb))
    else:
      temb = None

    AttnBlock = functools.partial(layerspp.AttnBlockpp, init_scale=init_scale,
                                  skip_rescale=skip_rescale)
    Upsample = functools.partial(layerspp.Upsample, with_conv=resamp_with_conv, fir=fir,
                                 fir_kernel=fir_kernel)
    Downsample = functools.partial(layerspp.Downsample, with_conv=resamp_with_conv, fir=fir,
                                   fir_kernel=fir_kernel)
    pyramid_upsample = functools.partial(layerspp.Upsample, fir=fir, fir_kernel=fir_kernel,
                                         with_conv=progressive == 'residual')
    pyramid_downsample = functools.partial(layerspp.Downsample, fir=fir, fir_kernel=fir_kernel,
                                           with_conv=progressive_input == 'residual')
    if resblock_type == 'ddpm':
      ResnetBlock = functools.partial(ResnetBlockDDPM, act=act, dropout=dropout,
                                      init_scale=init_scale, skip_rescale=skip_rescale)
    else:
      ResnetBlock = functools.partial(ResnetBlockBigGAN, act=act, dropout=dropout, fir=fir,
                                      fir_kernel=fir_kernel, init_scale=init_scale,
                                      skip_rescale=skip_rescale)

    if not config.data.centered:
      x = 2 * x - 1.  # data in [0, 1] -> [-1, 1]

    # Downsampling path.
    input_pyramid = x if progressive_input != 'none' else None
    hs = [conv3x3(x, nf)]
    for i_level in range(num_resolutions):
      for _ in range(num_res_blocks):
        h = ResnetBlock(out_ch=nf * ch_mult[i_level])(hs[-1], temb, train)
        if h.shape[1] in attn_resolutions:
          h = AttnBlock()(h)
        hs.append(h)

      if i_level != num_resolutions - 1:
        if resblock_type == 'ddpm':
          h = Downsample()(hs[-1])
        else:
          h = ResnetBlock(down=True)(hs[-1], temb, train)

        if progressive_input == 'input_skip':
          input_pyramid = pyramid_downsample()(input_pyramid)
          h = combiner()(input_pyramid, h)
        elif progressive_input == 'residual':
          input_pyramid = pyramid_downsample(out_ch=h.shape[-1])(input_pyramid)
          input_pyramid = (input_pyramid + h) / np.sqrt(2.) if skip_rescale else input_pyramid + h
          h = input_pyramid
        hs.append(h)

    h = hs[-1]
    h = ResnetBlock()(h, temb, train)
    h = AttnBlock()(h)
    h = ResnetBlock()(h, temb, train)

    # Upsampling path.
    pyramid = None
    for i_level in reversed(range(num_resolutions)):
      for _ in range(num_res_blocks + 1):
        h = ResnetBlock(out_ch=nf * ch_mult[i_level])(jnp.concatenate([h, hs.pop()], axis=-1),
                                                      temb, train)
      if h.shape[1] in attn_resolutions:
        h = AttnBlock()(h)

      if progressive != 'none':
        if i_level == num_resolutions - 1:
          if progressive == 'output_skip':
            pyramid = conv3x3(act(group_norm(h)), x.shape[-1], bias=True, init_scale=init_scale)
          else:
            pyramid = conv3x3(act(group_norm(h)), h.shape[-1], bias=True)
        else:
          if progressive == 'output_skip':
            pyramid = pyramid_upsample()(pyramid)
            pyramid = pyramid + conv3x3(act(group_norm(h)), x.shape[-1], bias=True,
                                        init_scale=init_scale)
          else:
            pyramid = pyramid_upsample(out_ch=h.shape[-1])(pyramid)
            pyramid = (pyramid + h) / np.sqrt(2.) if skip_rescale else pyramid + h
            h = pyramid

      if i_level != 0:
        if resblock_type == 'ddpm':
          h = Upsample()(h)
        else:
          h = ResnetBlock(up=True)(h, temb, train)

    assert not hs

    if progressive == 'output_skip':
      h = pyramid
    else:
      h = act(group_norm(h))
      h = conv3x3(h, x.shape[-1], init_scale=init_scale)

    if m.scale_by_sigma:
      h = h / used_sigmas.reshape((x.shape[0], *([1] * len(x.shape[1:]))))
    return h
