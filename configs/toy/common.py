"""Settings of the original toy experiments (toy.py), scaled to a 2-core CPU.

Original: batch 5000, 100k iterations, Adam lr 1e-3, clip 1, EMA 0.999 after 500 steps, MLP
encoder [128, 128] / time embedding 64 / decoder [512, 512], VE 0.01 -> 50, eps 1e-5, loss weights
(1, 0.5, 0.1) with exact Jacobians. Scaled here: batch 1000 and a few thousand steps (see
docs/toy_demo.md).
"""
from configs.base_config import get_base_config


def get_toy_config(dataset, dim, sde='vesde'):
  config = get_base_config()
  config.seed = 0
  training = config.training
  training.sde = sde
  training.batch_size = 1000
  training.n_iters = 3000
  training.snapshot_freq = 1000
  training.snapshot_freq_for_preemption = 250
  training.log_freq = 100
  training.eval_freq = 500
  training.snapshot_sampling = True
  training.reduce_mean = True
  training.likelihood_weighting = False
  training.importance_weighting = False
  training.smallest_time = 1e-5
  training.exact_jacobian = True
  training.loss_weights = (1.0, 0.5, 0.1)

  config.sampling.method = 'ode'
  config.sampling.smallest_time = 1e-5

  evaluate = config.eval
  evaluate.batch_size = 1000
  evaluate.num_samples = 1000
  evaluate.num_repeats = 1
  evaluate.enable_sampling = False
  evaluate.enable_bpd = True
  evaluate.bpd_dataset = 'test'

  data = config.data
  data.dataset = dataset
  data.dim = dim
  data.image_size = 0
  data.num_channels = 0
  data.centered = False
  data.random_flip = False
  data.uniform_dequantization = False

  model = config.model
  model.name = 'mlp'
  model.scale_by_sigma = sde == 'vesde'  # the linear VE and VP nets predict the noise
  model.encoder_layers = (128, 128)
  model.temb_dim = 64
  model.decoder_layers = (512, 512)
  model.dropout = 0.
  model.ema_rate = 0.999
  model.ema_start = 500
  model.sigma_min = 0.01
  model.sigma_max = 50.

  optim = config.optim
  optim.lr = 1e-3
  optim.warmup = 0
  optim.grad_clip = 1.
  return config
