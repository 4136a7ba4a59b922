"""The optimizer of every trained model: Adam with warm-up, an optional cosine decay and global
gradient-norm clipping, as score_sde's flax.optim set-up, in optax."""
import optax

LR_SCHEDULES = ('constant', 'cosine')


def get_lr_schedule(config):
  """lr * min(step / warmup, 1) as score_sde ('constant'); 'cosine' then decays it to 0 by
  training.n_iters (half a cosine over the steps after the warm-up)."""
  optim = config.optim
  kind = optim.get('schedule', 'constant')
  if kind not in LR_SCHEDULES:
    raise ValueError(f"optim.schedule is '{kind}': set --config.optim.schedule to one of "
                     f"{', '.join(LR_SCHEDULES)}.")
  warmup = max(int(optim.warmup), 0)
  if kind == 'constant':
    return optax.linear_schedule(0., optim.lr, warmup) if warmup else optim.lr
  return optax.warmup_cosine_decay_schedule(0., optim.lr, warmup,
                                            max(int(config.training.n_iters), warmup + 1))


def get_optimizer(config):
  """Adam as score_sde's flax.optim.Adam + optimization_manager, in optax (a one-line ValueError
  for an optimizer or schedule it does not have; config_checks builds one to check a config).

  - the learning rate of get_lr_schedule: lr * min(step / warmup, 1) (step = updates applied so
    far, so the first update has lr 0, as the original), constant after it or cosine-decayed.
  - beta1 = config.optim.beta1, beta2 = 0.999, eps added to sqrt of the corrected second moment.
  - decoupled weight decay as flax.optim.Adam: p <- p - lr * (adam_update + weight_decay * p),
    i.e. optax.adamw with the same (warmed-up) lr.
  - the gradient is first clipped to global norm config.optim.grad_clip (disabled if < 0).
  """
  optim = config.optim
  if optim.optimizer != 'Adam':
    raise ValueError(f"optim.optimizer is '{optim.optimizer}': only 'Adam' is supported; "
                     "set --config.optim.optimizer=Adam.")
  schedule = get_lr_schedule(config)
  tx = optax.adamw(schedule, b1=optim.beta1, b2=0.999, eps=optim.eps,
                   weight_decay=optim.weight_decay)
  if optim.grad_clip >= 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
  return tx
