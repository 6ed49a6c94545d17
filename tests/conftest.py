"""Test session set-up: one persistent XLA compilation cache shared by the tests and the CLI runs they start."""

import os
import tempfile

if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:  # set once, by the first process (pytest-xdist workers inherit it)
    os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='kdiff_jax_xla_cache_')

# The files whose tests take longest (benchmark scripts, training and FID runs through the CLIs), first. pytest-xdist
# (`make test`: --dist loadfile --no-loadscope-reorder) hands whole files to whichever worker is free, in this order;
# started last, as their names or their few tests would place them, they left one worker running alone for minutes.
SLOWEST_FILES = ('test_bench.py', 'test_train_cli.py', 'test_train_step.py', 'test_evaluation.py', 'test_convert.py')


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FILES)))  # stable: the rest keep their order
