"""DDPM U-Net (Ho et al. 2020) as in score_sde `models/ddpm.py` (Flax port of diffusion_tf's unet).

Labels are timesteps for the sinusoidal embedding; with config.model.scale_by_sigma the labels are
indices into the SMLD sigmas (largest first) and the output is divided by that sigma.
"""
import functools

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from models import layers, normalization, utils

ResnetBlockDDPM = layers.ResnetBlockDDPM
conv3x3 = layers.ddpm_conv3x3
default_initializer = layers.default_init


@utils.register_model(name='ddpm')
class DDPM(nn.Module):
  """DDPM U-Net: x (B, H, W, C), labels (B,) -> (B, H, W, C)."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x, labels, train=True):
    config = self.config
    m = config.model
    act = layers.get_act(config)
    normalize = normalization.get_normalization(config)
    nf = m.nf
    ch_mult = m.ch_mult
    num_res_blocks = m.num_res_blocks
    attn_resolutions = m.attn_resolutions
    resamp_with_conv = m.resamp_with_conv
    num_resolutions = len(ch_mult)

    AttnBlock = functools.partial(layers.AttnBlock, normalize=normalize)
    ResnetBlock = functools.partial(ResnetBlockDDPM, act=act, normalize=normalize,
                                    dropout=m.dropout)

    if m.conditional:
      temb = layers.get_timestep_embedding(labels, nf)
      temb = nn.Dense(nf * 4, kernel_init=default_initializer())(temb)
      temb = nn.Dense(nf * 4, kernel_init=default_initializer())(act(temb))
    else:
      temb = None

    h = x if config.data.centered else 2 * x - 1.

    # Downsampling path.
    hs = [conv3x3(h, nf)]
    for i_level in range(num_resolutions):
      for _ in range(num_res_blocks):
        h = ResnetBlock(out_ch=nf * ch_mult[i_level])(hs[-1], temb, train)
        if h.shape[1] in attn_resolutions:
          h = AttnBlock()(h)
        hs.append(h)
      if i_level != num_resolutions - 1:
        hs.append(layers.Downsample(with_conv=resamp_with_conv)(hs[-1]))

    h = hs[-1]
    h = ResnetBlock()(h, temb, train)
    h = AttnBlock()(h)
    h = ResnetBlock()(h, temb, train)

    # Upsampling path.
    for i_level in reversed(range(num_resolutions)):
      for _ in range(num_res_blocks + 1):
        h = ResnetBlock(out_ch=nf * ch_mult[i_level])(jnp.concatenate([h, hs.pop()], axis=-1),
                                                      temb, train)
      if h.shape[1] in attn_resolutions:
        h = AttnBlock()(h)
      if i_level != 0:
        h = layers.Upsample(with_conv=resamp_with_conv)(h)

    assert not hs

    h = act(normalize()(h))
    h = conv3x3(h, x.shape[-1], init_scale=0.)

    if m.scale_by_sigma:
      # NCSN-loss training: divide by the sigma indexed by the (integer) label.
      sigmas = utils.get_sigmas(config)
      used_sigmas = sigmas[labels.astype(jnp.int32)]
      h = h / used_sigmas.reshape((x.shape[0], *([1] * len(x.shape[1:]))))
    return h
