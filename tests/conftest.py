"""Test session set-up, by the first process (pytest-xdist workers and the CLI runs the tests start inherit it):
- one persistent XLA compilation cache shared by all of them, removed at the end of the session;
- XLA:CPU's backend at optimisation level 0 (`TEST_XLA_FLAGS`), unless XLA_FLAGS already sets a level. Most of the
  suite's time is compiling small programs, not running them: the demo config's training step compiles in 7 s
  instead of 14 and runs in 54 ms instead of 28, with the same loss to the last digit. The level is LLVM's code
  generation: the optimized HLO program is the same (checked on that step, metadata aside), and XLA:CPU uses no
  fast math at either level, so what the tests check is what users run. bench/ and `make demo` compile at XLA's
  default, as users do.
"""

import os
import shutil
import tempfile

TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'

_MADE_CACHE_DIR = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    _MADE_CACHE_DIR = os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='kdiff_jax_xla_cache_')
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def pytest_unconfigure(config):
    """~25 MB of compiled programs per run would otherwise stay in the temp directory (workers leave it alone)."""
    if _MADE_CACHE_DIR is not None:
        shutil.rmtree(_MADE_CACHE_DIR, ignore_errors=True)
