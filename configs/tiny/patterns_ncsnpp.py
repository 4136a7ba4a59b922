"""Tiny NCSN++ (FIR resampling, progressive paths, Fourier features of log sigma) on 8x8x1 PATTERNS,
VE SDE (with the 'tiny' Flow++ dequantizer for --mode train_deq)."""
from configs.tiny.patterns_common import get_tiny_patterns_config


def get_config():
  config = get_tiny_patterns_config()
  config.training.sde = 'vesde'
  config.sampling.smallest_time = 1e-5
  config.data.centered = False

  model = config.model
  model.name = 'ncsnpp'
  model.scale_by_sigma = True
  model.sigma_min = 0.01
  model.sigma_max = 50.
  model.fir = True
  model.progressive = 'output_skip'
  model.progressive_input = 'residual'
  model.embedding_type = 'fourier'
  return config
