"""CPU-sized image settings shared by the tiny DIGITS configs (16x16x3, batch 16, 50 noise scales).

Sized so that training, checkpointing, PC sampling and likelihood evaluation each take seconds on
two CPU cores; the network keeps every NCSN++ / DDPM++ component at nf 32, ch_mult (1, 2).
"""
from configs.base_config import get_base_config


def get_tiny_digits_config():
  config = get_base_config()
  config.seed = 0

  training = config.training
  training.batch_size = 16
  training.n_iters = 20
  training.snapshot_freq = 10
  training.snapshot_freq_for_preemption = 5
  training.log_freq = 5
  training.eval_freq = 5
  training.snapshot_sampling = True
  training.continuous = True
  training.reduce_mean = True
  training.likelihood_weighting = False
  training.importance_weighting = False

  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'reverse_diffusion'
  sampling.corrector = 'langevin'
  sampling.n_steps_each = 1
  sampling.snr = 0.16
  sampling.rtol = 1e-3
  sampling.atol = 1e-3

  evaluate = config.eval
  evaluate.begin_ckpt = 1
  evaluate.end_ckpt = 2
  evaluate.ckpt_id = 1
  evaluate.batch_size = 16
  evaluate.num_samples = 16
  evaluate.enable_sampling = False  # FID/IS need the Inception network
  evaluate.enable_loss = True
  evaluate.enable_bpd = True
  evaluate.num_repeats = 1
  evaluate.rtol = 1e-3
  evaluate.atol = 1e-3

  data = config.data
  data.dataset = 'DIGITS'
  data.image_size = 16
  data.num_channels = 3
  data.random_flip = False
  data.uniform_dequantization = False

  model = config.model
  # PC sampling steps. VP needs num_scales > beta_max (= 20), else the DDPM chain's
  # alpha = 1 - beta_max / num_scales goes negative.
  model.num_scales = 50
  model.ema_rate = 0.99
  model.normalization = 'GroupNorm'
  model.nonlinearity = 'swish'
  model.nf = 32
  model.ch_mult = (1, 2)
  model.num_res_blocks = 1
  model.attn_resolutions = (8,)
  model.resamp_with_conv = True
  model.conditional = True
  model.fir_kernel = [1, 3, 3, 1]
  model.skip_rescale = True
  model.resblock_type = 'biggan'
  model.progressive_combine = 'sum'
  model.attention_type = 'ddpm'
  model.init_scale = 0.
  model.fourier_scale = 16
  model.conv_size = 3
  model.dropout = 0.1

  optim = config.optim
  optim.lr = 2e-4
  optim.warmup = 5
  return config
