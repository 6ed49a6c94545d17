"""The CLIs' memory allocator: mimalloc instead of glibc's malloc, for XLA:CPU's per-step temporaries.

Why. XLA:CPU allocates the temporaries of every run of a compiled program with malloc (the cars64 training step at
batch 8: 1.9 GiB, in blocks of up to ~73 MiB). glibc serves blocks above its mmap threshold (at most 32 MiB) with
fresh mmaps and unmaps them when they are freed, so each step touches all its temporaries' pages anew: ~490,000
minor page faults and 1–1.7 s of system CPU per cars64 step on 2 cores. mimalloc keeps freed memory for reuse (for
1 s by default, `MIMALLOC_PURGE_DELAY`): 4,000–15,000 faults per step, and the step's median time was 7.05 and
7.72 s against 8.39 and 8.19 s in interleaved runs (bench/RESULTS.md, session 9). glibc's own tunables removed the faults only by making the step slower.

How. A process's malloc can only be replaced when it starts (LD_PRELOAD), so `use_mimalloc()`, called first by each
CLI, restarts the Python process once (`execve`: same PID, same arguments) with LD_PRELOAD naming the libmimalloc of
the `cmeel-mimalloc` wheel. `preload_env()` is the decision, also used by bench/ to run kdiff_jax's workers as the
CLIs run. Nothing changes (glibc's malloc stays) when:
  - KDIFF_JAX_MALLOC=system (the opt-out; KDIFF_JAX_MALLOC=mimalloc forces it where "auto", the default, would not);
  - LD_PRELOAD is already set: the user's or the platform's choice wins (Colab preloads tcmalloc);
  - the system is not Linux, or the wheel is not installed;
  - with "auto", a JAX accelerator plugin is installed (jax[cuda12]) and JAX_PLATFORMS does not say "cpu": there the
    step's memory is device memory under XLA's own allocator, so there is nothing to gain, and it was not measured.
Only the choice of library is ours; the allocator is mimalloc's.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Mapping

MODES = ('auto', 'mimalloc', 'system')


class MallocChoiceError(ValueError):
    """KDIFF_JAX_MALLOC has a value other than auto, mimalloc or system."""


def mimalloc_library() -> str | None:
    """The absolute path of the `cmeel-mimalloc` wheel's libmimalloc.so, or None when it is not installed."""
    try:
        files = importlib.metadata.files('cmeel-mimalloc') or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == 'libmimalloc.so':
            path = f.locate()
            return str(os.path.realpath(path)) if os.path.exists(path) else None
    return None


def _accelerator_plugin_installed() -> bool:
    """Whether a JAX PJRT plugin (CUDA, ROCm, TPU...) is installed: the `jax_plugins` namespace or entry points."""
    return (importlib.util.find_spec('jax_plugins') is not None
            or bool(importlib.metadata.entry_points(group='jax_plugins')))


def preload_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables to add to `environ` to start a kdiff_jax process under mimalloc: {'LD_PRELOAD': path} or {}."""
    mode = environ.get('KDIFF_JAX_MALLOC', 'auto').strip().lower() or 'auto'
    if mode not in MODES:
        raise MallocChoiceError(f'KDIFF_JAX_MALLOC={environ["KDIFF_JAX_MALLOC"]!r}: must be one of {", ".join(MODES)}')
    if mode == 'system' or environ.get('LD_PRELOAD') or not sys.platform.startswith('linux'):
        return {}
    if mode == 'auto' and environ.get('JAX_PLATFORMS', '').strip().lower() != 'cpu' and _accelerator_plugin_installed():
        return {}
    library = mimalloc_library()
    return {} if library is None else {'LD_PRELOAD': library}


def use_mimalloc() -> None:
    """Restart this Python process under mimalloc where `preload_env` says so; return normally otherwise.

    Call it before anything else in a CLI's `__main__` block (the restart repeats whatever ran before it).
    """
    try:
        extra = preload_env()
    except MallocChoiceError as e:
        sys.exit(f'error: {e}')
    if not extra:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **extra})
