"""TensorFlow, for data and Inception only, imported without its start-up noise and kept off the
GPUs (JAX owns them)."""
import contextlib
import os
import sys


@contextlib.contextmanager
def quiet_native_stderr():
  """Send what native code writes to stderr (file descriptor 2) to /dev/null for a while;
  Python exceptions still propagate and print once it is restored."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def import_tensorflow():
  """TensorFlow for data and Inception only, imported quietly (its CUDA probe, oneDNN and absl
  start-up lines are not the user's business; TF_CPP_MIN_LOG_LEVEL no longer silences them) and
  kept off the GPUs (JAX owns them)."""
  with quiet_native_stderr():
    import tensorflow as tf
    try:
      tf.config.set_visible_devices([], 'GPU')
    except (RuntimeError, ValueError):  # TF already initialised its devices; nothing to do.
      pass
  return tf
