"""Every test process runs in the environment of the main.py subprocesses of tests/
(harness.main_env): the tests' XLA flags and their persistent JAX compilation cache, so that a
program several tests build is compiled once per machine. JAX reads both when first imported or
started, after this."""
import os

from harness import main_env

os.environ.update(main_env())
