"""Every test process compiles as the main.py subprocesses of tests/ do (tests/harness.py): with the
tests' XLA flags and through their persistent JAX cache, so that a program several tests build is
compiled once per machine."""
import os

from harness import CACHE, xla_flags

os.environ['XLA_FLAGS'] = xla_flags()  # read when JAX first starts its backend, after this

import jax  # noqa: E402

jax.config.update('jax_compilation_cache_dir', CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
