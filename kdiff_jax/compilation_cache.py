"""JAX's persistent compilation cache for the command-line tools.

XLA compiles a model's initialisation, train step and sampling loop once per process; the cache keeps those
executables on disk so that re-running a command (resuming a run, sampling again) skips most compile time.
Location: $JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/kdiff_jax/xla.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


def enable_compilation_cache(min_compile_time_s: float = 0.5) -> Path:
    directory = Path(os.environ.get('JAX_COMPILATION_CACHE_DIR') or Path.home() / '.cache' / 'kdiff_jax' / 'xla')
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update('jax_compilation_cache_dir', str(directory))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', min_compile_time_s)
    return directory
