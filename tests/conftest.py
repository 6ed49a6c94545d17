"""Test session set-up: one persistent XLA compilation cache shared by the tests and the CLI runs they start."""

import os
import tempfile

if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:  # set once, by the first process (pytest-xdist workers inherit it)
    os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='kdiff_jax_xla_cache_')
