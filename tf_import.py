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


class Lazy:
  """A module imported on first attribute access, so that programs that never touch it (toy
  runs, config checks) do not pay TensorFlow's seconds of start-up."""

  def __init__(self, load):
    self._load, self._module = load, None

  def __getattr__(self, name):
    if self._module is None:
      self._module = self._load()
    return getattr(self._module, name)


def _import_tfds():
  import_tensorflow()
  with quiet_native_stderr():
    import tensorflow_datasets
  return tensorflow_datasets


tf = Lazy(import_tensorflow)
tfds = Lazy(_import_tfds)
