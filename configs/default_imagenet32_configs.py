"""ImageNet 32x32 defaults (mle_score_ode: batch 48 fits order 3; orders 1-2 used 128)."""
from configs.base_config import get_base_config


def get_default_configs():
  config = get_base_config()
  config.training.batch_size = 48
  config.training.n_iters = 1400001
  config.eval.begin_ckpt = config.eval.end_ckpt = config.eval.ckpt_id = 26
  config.eval.num_repeats = 1
  config.data.dataset = 'ImageNet'
  config.data.random_flip = False
  config.model.dropout = 0.
  return config
