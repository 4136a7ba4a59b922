"""CIFAR-10 defaults (mle_score_ode: batch 48 fits order 3; orders 1-2 used 128)."""
from configs.base_config import get_base_config


def get_default_configs():
  config = get_base_config()
  config.training.batch_size = 48
  config.training.n_iters = 4000001
  config.eval.begin_ckpt = config.eval.end_ckpt = config.eval.ckpt_id = 26
  config.eval.batch_size = 2000
  config.eval.enable_sampling = True
  return config
