"""CPU-sized settings of the PATTERNS data (8x8x1, four grey levels, known entropy): a tiny DIGITS
config (its model and SDE kept) on one 8x8 resolution level without attention, trained in a minute
or two."""


def to_patterns(config):
  """The tiny DIGITS `config` (digits_ddpmpp / digits_ncsnpp) moved to PATTERNS, in place."""
  data = config.data
  data.dataset = 'PATTERNS'
  data.image_size = 8
  data.num_channels = 1
  data.num_bits = 8  # the demo (scripts/bpd_demo.py) scores the four levels as 2-bit data

  training = config.training
  training.batch_size = 32
  training.n_iters = 1000
  training.snapshot_freq = 500
  training.snapshot_freq_for_preemption = 250
  training.log_freq = 50
  training.eval_freq = 250
  training.snapshot_sampling = False

  model = config.model
  model.nf = 16
  model.ch_mult = (1,)
  model.attn_resolutions = ()
  model.dropout = 0.
  model.ema_rate = 0.999

  config.optim.lr = 2e-3
  config.optim.warmup = 50
  config.optim.schedule = 'cosine'
  config.eval.batch_size = 64

  deq = config.deq
  deq.model = 'tiny'
  deq.n_iters = 600
  deq.ema_rate = 0.99
  deq.lr = 2e-3
  deq.warmup = 20
  deq.grad_clip = 1.
  return config
