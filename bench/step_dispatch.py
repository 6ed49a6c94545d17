#!/usr/bin/env python3
"""The host's cost of calling kdiff_jax's compiled training step, by how the state is passed (kdiff_jax only).

  python3 bench/step_dispatch.py --gpu [--config cars64] [--batch 64]     # on a GPU (see bench/RESULTS.md, "GPU")
  .venv/bin/python bench/step_dispatch.py --config demo --batch 8          # the same on the CPU

The same train step (`make_train_step`, state donated) is compiled once per variant; only its calling convention
differs, and each variant's state holds the same arrays in the same order:
  nnx      the TrainState with nnx.State fields (each leaf an nnx Variable, flattened and rebuilt in Python per call)
  pure     the same TrainState with plain nested dicts in place of the nnx.State fields (flattened in C++)
  leaves   the state's flat list of arrays
  leaves, no command buffers  (--gpu) as `leaves`, compiled with XLA's command buffers (CUDA graphs) off
For each: "dispatch" is how long a call takes to return without waiting for the step, "synced" the median step with
a wait after each, "pipelined" the mean step when --steps steps are dispatched back to back with one wait at the
end (as train.py runs them). A step whose dispatch takes longer than its device time is host-bound: pipelining
cannot hide it. Variants run in this order until --budget-s seconds have passed; each row prints when done.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def pure_state(state):
    """`state` with every nnx.State in it (parameters, EMA, buffers, optimizer moments) as plain nested dicts."""
    import jax
    from flax import nnx
    is_state = lambda x: isinstance(x, nnx.State)  # noqa: E731
    return jax.tree.map(lambda x: x.to_pure_dict() if is_state(x) else x, state, is_leaf=is_state)


def variant_step(train_step, nnx_def, kind: str, compiler_options: dict | None = None):
    """`train_step` taking and returning the state as `kind` ('nnx', 'pure' or 'leaves'), jitted, state donated.
    The pure and flat forms are turned back into the nnx TrainState inside the trace (same leaf order), so every
    variant compiles the same computation."""
    import jax

    def step(state, batch):
        leaves = state if kind == 'leaves' else jax.tree_util.tree_leaves(state)
        new, metrics = train_step(jax.tree_util.tree_unflatten(nnx_def, leaves), batch)
        if kind == 'nnx':
            return new, metrics
        new_leaves = jax.tree_util.tree_leaves(new)
        return (new_leaves if kind == 'leaves' else
                jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(pure_state(new)), new_leaves)), metrics
    return jax.jit(step, donate_argnums=0, compiler_options=compiler_options)


def measure(step, state, batch, steps: int) -> dict:
    """Compile, then dispatch / synced / pipelined milliseconds per step (module docstring)."""
    import jax
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    holder = [state]

    def call():
        holder[0], metrics = compiled(holder[0], batch)
        return metrics
    for _ in range(2):  # warm-up
        jax.block_until_ready(call())
    synced = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready((call(), holder[0]))
        synced.append(time.perf_counter() - t)
    dispatch = []
    start = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        metrics = call()
        dispatch.append(time.perf_counter() - t)
    jax.block_until_ready((metrics, holder[0]))
    pipelined = (time.perf_counter() - start) / steps
    loss = float(metrics['loss'])
    holder.clear()
    return dict(compile_s=compile_s, dispatch_ms=statistics.median(dispatch) * 1e3,
                synced_ms=statistics.median(synced) * 1e3, pipelined_ms=pipelined * 1e3, loss=loss)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default='cars64')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--steps', type=int, default=10, help='timed steps per variant, synced and pipelined each')
    p.add_argument('--budget-s', type=float, default=1e9, help='start no further variant after this many seconds')
    p.add_argument('--max-load', type=float, default=1.3, help='wait for the 1-min load to drop below this')
    C.add_device_args(p)
    args = p.parse_args()
    start = time.perf_counter()
    import jax
    from kdiff_jax.training.step import make_train_step
    from kdiff_jax.training.optimizer import make_optimizer
    from kdiff_jax.training.state import create_train_state
    from kdiff_jax.factory import make_model
    dtype = C.run_dtype(args)
    C.begin(f'Dispatch cost of the training step by state form (bench/step_dispatch.py): {args.config}, batch '
            f'{args.batch}{C.device_label(args)}', args.max_load)
    config = C.load_bench_config(args.config, dtype)
    tx = make_optimizer(config)
    train_model, state = create_train_state(make_model(config, seed=0), tx, seed=0)
    train_step = make_train_step(config, train_model, tx)
    nnx_def = jax.tree_util.tree_structure(state)
    batch = jax.device_put(C.train_batch(args.config, args.batch))
    print(f'state: {nnx_def.num_leaves} arrays, {sum(x.nbytes for x in jax.tree_util.tree_leaves(state)) / 2**20:.0f} '
          f'MiB; {jax.devices()[0].device_kind}\n')
    variants = [('nnx', 'nnx', None), ('pure', 'pure', None), ('leaves', 'leaves', None)]
    if args.gpu:
        variants.append(('leaves, no command buffers', 'leaves', {'xla_gpu_enable_command_buffer': ''}))
    print('| state passed as | compile s | dispatch ms | synced ms/step | pipelined ms/step | images/s pipelined | '
          'loss |\n|---|---|---|---|---|---|---|', flush=True)
    for name, kind, options in variants:
        if time.perf_counter() - start > args.budget_s:
            print(f'(budget of {args.budget_s:.0f} s spent: {name} not run)')
            continue
        form = {'nnx': lambda s: s, 'pure': pure_state, 'leaves': jax.tree_util.tree_leaves}[kind]
        own = jax.tree.map(lambda x: x.copy(), state)  # each variant donates its own copy
        try:
            r = measure(variant_step(train_step, nnx_def, kind, options), form(own), batch, args.steps)
        except Exception as e:  # noqa: BLE001 -- e.g. a compiler option this XLA does not know: report, go on
            print(f'| {name} | failed: {type(e).__name__}: {str(e)[:200]} |', flush=True)
            continue
        print(f"| {name} | {r['compile_s']:.1f} | {r['dispatch_ms']:.2f} | {r['synced_ms']:.2f} | "
              f"{r['pipelined_ms']:.2f} | {args.batch / r['pipelined_ms'] * 1e3:.1f} | {r['loss']:.4f} |", flush=True)
    print(f'\n{time.perf_counter() - start:.0f} s in all; 1-min load at end: {C.loadavg():.2f}')


if __name__ == '__main__':
    main()
