"""Tiny DDPM++ (the ncsnpp class with VP settings) on 8x8x1 PATTERNS, VP SDE (with the 'tiny' Flow++
dequantizer for --mode train_deq)."""
from configs.tiny.patterns_common import get_tiny_patterns_config


def get_config():
  config = get_tiny_patterns_config()
  config.training.sde = 'vpsde'
  config.sampling.smallest_time = 1e-3
  config.data.centered = True

  model = config.model
  model.name = 'ncsnpp'
  model.scale_by_sigma = False
  model.fir = False
  model.progressive = 'none'
  model.progressive_input = 'none'
  model.embedding_type = 'positional'
  return config
