#!/usr/bin/env python3
"""Where the kdiff_jax training step's host memory goes (CPU): the breakdown behind bench/RESULTS.md's memory note.

  .venv/bin/python bench/step_memory.py [--config cars64] [--batch 8] [--steps 2]

One process builds the TrainState and compiles the step (as bench/train_step.py does), then prints:
the resident set (RSS) before compiling and the TrainState's bytes; XLA's buffer assignment of the step (arguments,
outputs, donated aliases, temporaries); the RSS after compiling and after glibc's `malloc_trim` (heap that compiling
freed but the allocator kept); then, with the peak reset (/proc/self/clear_refs), the RSS sampled every 20 ms
while the steps run. RSS growth during a step beyond XLA's temporaries is memory the runtime allocates outside the
buffer assignment. It runs on glibc's malloc, in this process (not restarted under mimalloc as the CLIs are:
kdiff_jax/malloc.py), since it measures what glibc keeps.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default='cars64')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--steps', type=int, default=2)
    args = p.parse_args()
    tmp = C.begin(f'Training-step memory (bench/step_memory.py): {args.config}, batch {args.batch}', 1e9)
    weights = C.write_weights(args.config, tmp / 'w.npz')  # imports torch: before the baseline below
    import jax
    jax.config.update('jax_enable_compilation_cache', False)
    mib = lambda n: n / 2 ** 20
    rss = lambda: C.memory_status()['VmRSS']

    step, state, batch = C.jax_train_step(args.config, str(weights), 'float32', C.train_batch(args.config, args.batch))
    state_mib = mib(sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, 'nbytes')))
    before = rss()
    compiled = step.lower(state, batch).compile()
    after_compile = rss()
    ctypes.CDLL('libc.so.6').malloc_trim(0)
    after_trim = rss()
    b = compiled.memory_analysis()
    temps = mib(b.temp_size_in_bytes)

    Path('/proc/self/clear_refs').write_text('5')  # reset VmHWM: the peak below is the steps' own
    samples, running, after_step = [], [True], []

    def sample_rss():
        while running[0]:
            samples.append((len(after_step), rss()))  # (steps finished, RSS)
            time.sleep(0.02)
    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    run = C.step_runner(compiled, state, batch)
    for _ in range(args.steps):
        run()
        after_step.append(rss())
    running[0] = False
    sampler.join()
    peak = C.memory_status()['VmHWM']

    rows = [('RSS before compiling (runtime, model, TrainState, batch)', before),
            ('  of which the TrainState (params, EMA, optimizer moments)', state_mib),
            ("XLA buffer assignment: arguments / outputs / donated (aliased)",
             f'{mib(b.argument_size_in_bytes):.0f} / {mib(b.output_size_in_bytes):.0f} / '
             f'{mib(b.alias_size_in_bytes):.0f}'),
            ('XLA buffer assignment: temporaries', temps),
            ('RSS after compiling', after_compile),
            ('RSS after malloc_trim (heap freed by compiling, kept by glibc: the difference)', after_trim),
            ('RSS after each step', ' / '.join(f'{r:.0f}' for r in after_step)),
            ('peak RSS while the steps ran', peak),
            ('  growth over the trimmed RSS', peak - after_trim),
            ('  growth beyond XLA\'s temporaries (runtime allocations outside the buffer assignment)',
             peak - after_trim - temps),
            ('lowest RSS sampled after the first step (memory freed and re-allocated each step)',
             min((r for done, r in samples if done >= 1), default=float('nan')))]
    print('| quantity | MiB |\n|---|---|')
    for name, value in rows:
        print(f'| {name} | {value if isinstance(value, str) else f"{value:.0f}"} |')


if __name__ == '__main__':
    main()
