"""Fields shared by every config; dataset defaults and experiment files override them.

Field names and defaults follow score_sde / score_flow / mle_score_ode; fields those codes lacked
(marked NEW) have defaults that reproduce the original behaviour.
"""
import ml_collections
from ml_collections import config_dict


def get_base_config():
  config = ml_collections.ConfigDict()
  config.seed = 42

  config.training = training = ml_collections.ConfigDict()
  training.sde = 'vesde'
  training.batch_size = 128
  training.n_iters = 1300001
  training.snapshot_freq = 50000
  training.log_freq = 100
  training.eval_freq = 100
  training.snapshot_freq_for_preemption = 10000  # checkpoints-meta/, latest only
  training.snapshot_sampling = True
  training.likelihood_weighting = False
  training.importance_weighting = False
  training.continuous = True
  training.n_jitted_steps = 1
  training.reduce_mean = False
  training.smallest_time = 1e-5
  training.score_matching_order = 1
  # NEW: weights of the order-1, order-2 and order-3 terms (the image code sums them unweighted;
  # the toy code used (1, 0.5, 0.1)).
  training.loss_weights = (1.0, 1.0, 1.0)
  # NEW: exact Jacobians instead of Rademacher JVP estimators (allowed for dim <= 2, as toy.py).
  training.exact_jacobian = False
  # NEW: start (fine-tune) from this checkpoint: one of ours, or a legacy score_sde/score_flow file.
  training.restore_from = ''
  # NEW: continue that checkpoint's Adam moments and step (and so its learning-rate schedule), as
  # the original resumed released checkpoints; False starts a fresh optimizer at step 0.
  training.restore_optimizer = True
  # NEW: what a non-finite loss or gradient does: 'stop' (exit non-zero) or 'skip' (count it).
  training.nonfinite = 'stop'
  # NEW: split each device's batch into this many microbatches whose gradients are summed inside
  # the step (same update as the whole batch, for less memory); must divide the per-device batch.
  training.n_microbatches = 1
  # NEW: what the score network keeps for the backward pass: 'none', 'convs' (conv and matmul
  # outputs; elementwise work is recomputed) or 'nothing' (losses.REMAT_POLICIES).
  training.remat = 'none'

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = 'pc'
  sampling.predictor = 'reverse_diffusion'
  sampling.corrector = 'langevin'
  sampling.n_steps_each = 1
  sampling.noise_removal = True
  sampling.probability_flow = False
  sampling.snr = 0.16
  sampling.smallest_time = 1e-3
  sampling.rtol = 1e-5  # NEW: ODE sampler tolerances (the originals hard-coded these)
  sampling.atol = 1e-5

  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.begin_ckpt = 1
  evaluate.end_ckpt = 1
  evaluate.ckpt_id = 1  # the score checkpoint --mode train_deq trains the dequantizer for
  # NEW: eval and train_deq score this file (msgpack or checkpoint_N), not begin..end_ckpt / ckpt_id
  evaluate.restore_from = ''
  evaluate.batch_size = 1024
  evaluate.enable_sampling = False
  evaluate.num_samples = 50000
  evaluate.enable_loss = False
  evaluate.enable_bpd = True
  evaluate.bpd_dataset = 'test'
  evaluate.num_repeats = 5
  evaluate.bound = False
  evaluate.dsm = True
  # 'uniform' (False, the original's default), 'flowpp' (True: --mode train_deq's Flow++) or NEW
  # 'truncated_normal' (i-DODE's training-free dequantizer); any type, so old True/False still work.
  evaluate.dequantizer = config_dict.FieldReference(False, field_type=object)
  evaluate.num_deq_samples = 1  # NEW: K dequantization draws per image, importance weighted
  evaluate.offset = True
  evaluate.rtol = 1e-5  # NEW: likelihood ODE tolerances, Hutchinson noise and solver route
  evaluate.atol = 1e-5
  evaluate.hutchinson_type = 'Rademacher'
  evaluate.likelihood_solver = 'jax'  # 'jax' (jitted Dormand-Prince) or 'scipy' (the original)
  evaluate.enable_ode_score = False  # NEW: the ScoreODE score gap diagnostic (ode_score.py)
  evaluate.ode_score_nt = 100
  evaluate.wait_for_ckpt = False  # NEW: wait for training to write missing checkpoints
  evaluate.wait_timeout = 86400.  # NEW: seconds to wait for one checkpoint (0: forever)
  evaluate.wait_poll = 60.  # NEW: seconds between looks for a missing checkpoint
  evaluate.num_bpd_batches = 0  # NEW: bits/dim batches per repeat (0: the whole split)
  evaluate.bound_num_times = 1000  # NEW: time samples N of the variational bound (eval.bound)
  evaluate.stats_num_images = 0  # NEW: --mode fid_stats over this many images (0: all)
  evaluate.overwrite_stats = False  # NEW: --mode fid_stats may replace an existing stats file
  evaluate.inception_handle = 'https://tfhub.dev/tensorflow/tfgan/eval/inception/1'
  evaluate.stats_dir = 'assets/stats'

  config.deq = deq = ml_collections.ConfigDict()
  deq.n_iters = 300001
  deq.ema_rate = 0.99
  deq.dropout = 0.0
  deq.offset = True
  # NEW: Flow++ variant. 'auto' builds the one score_flow built for the dataset (CIFAR10:
  # 'cifar10'; ImageNet 32 / 64: 'imagenet32' / 'imagenet64'); or name 'cifar10', 'imagenet32',
  # 'imagenet64' or 'tiny' (CPU tests).
  deq.model = 'auto'
  # NEW: the dequantizer's Adam (score_flow reused config.optim: lr 2e-4, warmup 5000, clip 1 in
  # every config; beta1, eps and weight decay still come from config.optim).
  deq.lr = 2e-4
  deq.warmup = 5000
  deq.grad_clip = 1.

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'CIFAR10'
  data.image_size = 32
  data.random_flip = True
  data.centered = False
  data.uniform_dequantization = False
  data.num_channels = 3
  data.path = ''  # NEW: .npz file for dataset 'NPZ', or a local ImageNet32 directory
  data.tfds_dir = ''  # NEW: TFDS data_dir ('' = TFDS default)
  data.num_bits = 8  # NEW: bits per pixel of the images (bits/dim offset, dequantization bins)

  config.model = model = ml_collections.ConfigDict()
  model.name = 'ncsnpp'
  model.sigma_min = 0.01
  model.sigma_max = 50.
  model.num_scales = 1000
  model.beta_min = 0.1
  model.beta_max = 20.
  model.dropout = 0.1
  model.embedding_type = 'fourier'
  model.data_init = False
  model.trainable_embedding = False
  model.ema_rate = 0.9999
  model.ema_start = 0  # NEW: EMA copies the params until this step (toy.py: 500)

  config.optim = optim = ml_collections.ConfigDict()
  optim.weight_decay = 0.
  optim.optimizer = 'Adam'
  optim.lr = 2e-4
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.warmup = 5000
  optim.schedule = 'constant'  # NEW: or 'cosine' (decay to 0 at training.n_iters after the warm-up)
  optim.grad_clip = 1.
  return config
