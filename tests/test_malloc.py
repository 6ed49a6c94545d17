"""kdiff_jax.malloc: the CLIs restart under mimalloc on a Linux CPU host, and the ways that is declined.

The other CLI tests (test_train_cli, test_sample_cli, test_evaluation) start the CLIs as users do, so they run the
whole training, sampling and evaluation under mimalloc.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdiff_jax import malloc

ROOT = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith('linux')
pytestmark = pytest.mark.skipif(not LINUX, reason='LD_PRELOAD and the cmeel-mimalloc wheel are Linux-only')

# What runs after `use_mimalloc()` reports whether libmimalloc is mapped into the process, and its PID and argv.
PROBE = ("import os, sys; from kdiff_jax.malloc import use_mimalloc; pid = os.getpid(); use_mimalloc(); "
         "print(pid == os.getpid(), 'libmimalloc' in open('/proc/self/maps').read(), sys.argv[1:])")


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ('LD_PRELOAD', 'KDIFF_JAX_MALLOC', 'JAX_PLATFORMS', 'MIMALLOC_VERBOSE')}
    return {**env, **extra}


def run_probe(*args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', PROBE, *args], capture_output=True, text=True, cwd=ROOT,
                          env=clean_env(**env), timeout=60)


def test_the_wheel_provides_a_malloc_replacement():
    library = malloc.mimalloc_library()
    assert library is not None and os.path.isfile(library)
    assert b'mi_malloc' in Path(library).read_bytes()  # mimalloc's own entry point, beside the malloc it overrides


def test_a_process_restarts_once_under_mimalloc_with_its_pid_and_arguments():
    result = run_probe('--flag', 'value')
    assert result.returncode == 0, result.stderr
    assert result.stdout.split('\n')[0] == "True True ['--flag', 'value']"


@pytest.mark.parametrize('env', [{'KDIFF_JAX_MALLOC': 'system'}, {'LD_PRELOAD': 'libm.so.6'}])
def test_the_opt_out_and_a_users_preload_keep_the_system_malloc(env):
    result = run_probe(**env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split('\n')[0] == 'True False []'


def test_an_unknown_choice_is_one_clear_error():
    result = run_probe(KDIFF_JAX_MALLOC='jemalloc')
    assert result.returncode == 1
    assert result.stderr.strip() == "error: KDIFF_JAX_MALLOC='jemalloc': must be one of auto, mimalloc, system"
    with pytest.raises(malloc.MallocChoiceError):
        malloc.preload_env({'KDIFF_JAX_MALLOC': 'jemalloc'})


def test_without_the_wheel_nothing_changes():
    # -S: no site-packages, so no cmeel-mimalloc (kdiff_jax.malloc needs only the standard library).
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); {PROBE}"
    result = subprocess.run([sys.executable, '-S', '-c', code], capture_output=True, text=True, cwd=ROOT,
                            env=clean_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split('\n')[0] == 'True False []'


def test_an_accelerator_plugin_keeps_the_system_malloc_unless_the_platform_is_the_cpu_or_it_is_asked_for(
        tmp_path, monkeypatch):
    library = malloc.mimalloc_library()
    assert malloc.preload_env({}) == {'LD_PRELOAD': library}
    (tmp_path / 'jax_plugins').mkdir()  # a JAX plugin namespace on the path, as jax[cuda12] installs one
    monkeypatch.syspath_prepend(str(tmp_path))
    assert malloc.preload_env({}) == {}
    assert malloc.preload_env({'JAX_PLATFORMS': 'cpu'}) == {'LD_PRELOAD': library}
    assert malloc.preload_env({'KDIFF_JAX_MALLOC': 'mimalloc'}) == {'LD_PRELOAD': library}


@pytest.mark.parametrize('cli', ['train.py', 'sample.py', 'evaluate.py'])
def test_each_cli_runs_under_mimalloc(cli):
    # mimalloc announces its start-up on stderr when MIMALLOC_VERBOSE is set; --help exits before any JAX work.
    ran = lambda **env: subprocess.run([sys.executable, cli, '--help'], capture_output=True, text=True, cwd=ROOT,
                                       env=clean_env(MIMALLOC_VERBOSE='1', **env), timeout=120)
    under = ran()
    assert under.returncode == 0, under.stderr
    assert 'mimalloc: process init' in under.stderr
    system = ran(KDIFF_JAX_MALLOC='system')
    assert system.returncode == 0, system.stderr
    assert 'mimalloc' not in system.stderr
