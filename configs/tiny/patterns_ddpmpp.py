"""Tiny DDPM++ (the ncsnpp class with VP settings) on 8x8x1 PATTERNS, VP SDE (with the 'tiny' Flow++
dequantizer for --mode train_deq)."""
from configs.tiny import digits_ddpmpp
from configs.tiny.patterns_common import to_patterns


def get_config():
  return to_patterns(digits_ddpmpp.get_config())
