"""Test session set-up: one persistent XLA compilation cache shared by the tests and the CLI runs they start."""

import os
import tempfile

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='kdiff_jax_xla_cache_'))
