"""Tiny DDPM++ on 16x16x3 DIGITS (VP SDE) with the 'tiny' Flow++ dequantizer: a CPU smoke run of
--mode train then --mode train_deq (and eval with --config.eval.dequantizer=True).

The U-Net has one resolution level without attention so that the dequantizer's steps, which
differentiate through the score model, stay cheap on a CPU.
"""
from configs.tiny.digits_ddpmpp import get_config as get_ddpmpp_config


def get_config():
  config = get_ddpmpp_config()
  config.model.ch_mult = (1,)
  config.model.attn_resolutions = ()

  deq = config.deq
  deq.model = 'tiny'
  deq.n_iters = 20
  deq.ema_rate = 0.9
  deq.lr = 1e-3
  deq.warmup = 5
  deq.grad_clip = 1.
  return config
