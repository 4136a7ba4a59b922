"""LSUN 256x256 defaults."""
from configs.base_config import get_base_config


def get_default_configs():
  config = get_base_config()
  config.training.batch_size = 50
  config.training.n_iters = 3400001
  config.training.snapshot_freq_for_preemption = 5000
  config.sampling.snr = 0.075
  config.eval.begin_ckpt = config.eval.end_ckpt = config.eval.ckpt_id = 52
  config.eval.batch_size = 100
  config.data.dataset = 'LSUN'
  config.data.image_size = 256
  config.data.category = 'church_outdoor'
  config.model.sigma_max = 378.
  config.model.num_scales = 2000
  config.model.dropout = 0.
  return config
