"""Tiny NCSN++ (FIR resampling, progressive paths, Fourier features of log sigma) on 8x8x1 PATTERNS,
VE SDE (with the 'tiny' Flow++ dequantizer for --mode train_deq)."""
from configs.tiny import digits_ncsnpp
from configs.tiny.patterns_common import to_patterns


def get_config():
  return to_patterns(digits_ncsnpp.get_config())
