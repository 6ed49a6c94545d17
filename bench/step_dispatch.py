#!/usr/bin/env python3
"""The host's cost of calling kdiff_jax's compiled training step, by how the state is passed (kdiff_jax only).

  python3 bench/step_dispatch.py --gpu [--config cars64] [--batch 64]     # on a GPU (see bench/RESULTS.md, "GPU")
  .venv/bin/python bench/step_dispatch.py --config demo --batch 8          # the same on the CPU

The same train step (`make_train_step`) is compiled once per variant as train.py compiles it (`jit_train_step`: state
replicated over the 1-device data mesh and donated, batch split over it, `cpu_compiler_options`); only its
calling convention, and optionally an XLA option, differ. Each form holds the same arrays in the same order:
  nnx      the TrainState with nnx.State fields (each leaf an nnx Variable, flattened and rebuilt in Python per call)
  pure     the same TrainState with plain nested dicts in place of the nnx.State fields (flattened in C++)
  leaves   the state's flat list of arrays
--variants takes FORM[:OPTION=VALUE]..., e.g. `leaves:xla_gpu_enable_command_buffer=` (XLA's command buffers, i.e.
CUDA graphs, off). Default: nnx, pure, leaves, and with --gpu also that command-buffer variant.
For each: "dispatch" is how long a call takes to return without waiting for the step, "synced" the median step with
a wait after each, "pipelined" the mean step when --steps steps are dispatched back to back with one wait at the
end (as train.py runs them). A step whose dispatch takes longer than its device time is host-bound: pipelining
cannot hide it. Variants run in the order given until --budget-s seconds have passed; each row prints when done.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


FORMS = ('nnx', 'pure', 'leaves')


def pure_state(state):
    """`state` with every nnx.State in it (parameters, EMA, buffers, optimizer moments) as plain nested dicts."""
    import jax
    from flax import nnx
    is_state = lambda x: isinstance(x, nnx.State)  # noqa: E731
    return jax.tree.map(lambda x: x.to_pure_dict() if is_state(x) else x, state, is_leaf=is_state)


def parse_variant(spec: str) -> tuple[str, dict]:
    """'FORM[:OPTION=VALUE]...' → (form, XLA options, `C.xla_options`)."""
    form, *options = spec.split(':')
    if form not in FORMS or not all('=' in o for o in options):
        raise SystemExit(f'bad variant {spec!r}: FORM[:OPTION=VALUE]..., FORM one of {", ".join(FORMS)}')
    return form, C.xla_options(dict(o.split('=', 1) for o in options))


def variant_step(train_step, nnx_def, form: str, mesh, example, options: dict):
    """`train_step` taking and returning the state in `form` ('nnx', 'pure' or 'leaves'; `example` is the state in
    that form), compiled by `jit_train_step` with `options` added. The pure and flat forms are turned back into the
    nnx TrainState inside the trace (same leaf order), so every variant computes the same step."""
    import jax
    from kdiff_jax.training.sharding import jit_train_step

    def step(state, batch):
        leaves = state if form == 'leaves' else jax.tree_util.tree_leaves(state)
        new, metrics = train_step(jax.tree_util.tree_unflatten(nnx_def, leaves), batch)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(example),
                                            jax.tree_util.tree_leaves(new)), metrics
    return jit_train_step(step, mesh, example, options)


def measure(step, state, batch, steps: int) -> dict:
    """Compile, then dispatch / synced / pipelined milliseconds per step (module docstring), with bench/_common's
    step runner and timers, and the loss of the last step."""
    import jax
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    run = C.step_runner(compiled, state, batch)
    for _ in range(2):  # warm-up
        run()
    synced, _ = C.median_time(run, steps)
    dispatch, last = [], []

    def dispatch_one():
        t = time.perf_counter()
        last[:] = [run(block=False)]
        dispatch.append(time.perf_counter() - t)
        return last[0]
    pipelined = C.pipelined_time(dispatch_one, jax.block_until_ready, steps)
    return dict(compile_s=compile_s, dispatch_ms=statistics.median(dispatch) * 1e3, synced_ms=synced * 1e3,
                pipelined_ms=pipelined * 1e3, loss=float(last[0]['loss']))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default='cars64')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--steps', type=int, default=10, help='timed steps per variant, synced and pipelined each')
    p.add_argument('--budget-s', type=float, default=1e9, help='start no further variant after this many seconds')
    p.add_argument('--variants', nargs='+', metavar='FORM[:OPTION=VALUE]', help='what to compare (see above)')
    p.add_argument('--max-load', type=float, default=1.3, help='wait for the 1-min load to drop below this')
    C.add_device_args(p)
    args = p.parse_args()
    variants = args.variants or list(FORMS) + (['leaves:xla_gpu_enable_command_buffer='] if args.gpu else [])
    parsed = [(spec, *parse_variant(spec)) for spec in variants]
    start = time.perf_counter()
    import jax
    from kdiff_jax.factory import make_model
    from kdiff_jax.training.optimizer import make_optimizer
    from kdiff_jax.training.sharding import data_mesh, replicate, shard_batch
    from kdiff_jax.training.state import create_train_state
    from kdiff_jax.training.step import make_train_step
    dtype = C.run_dtype(args)
    C.begin(f'Dispatch cost of the training step by state form (bench/step_dispatch.py): {args.config}, batch '
            f'{args.batch}{C.device_label(args)}', args.max_load)
    config = C.load_bench_config(args.config, dtype)
    tx = make_optimizer(config)
    train_model, state = create_train_state(make_model(config, seed=0), tx, seed=0)
    train_step = make_train_step(config, train_model, tx)
    mesh = data_mesh(jax.devices()[:1])
    state = replicate(state, mesh)
    nnx_def = jax.tree_util.tree_structure(state)
    batch = shard_batch(C.train_batch(args.config, args.batch), mesh)
    print(f'state: {nnx_def.num_leaves} arrays, {sum(x.nbytes for x in jax.tree_util.tree_leaves(state)) / 2**20:.0f} '
          f'MiB; {jax.devices()[0].device_kind}\n')
    print('| variant | compile s | dispatch ms | synced ms/step | pipelined ms/step | images/s pipelined | '
          'loss |\n|---|---|---|---|---|---|---|', flush=True)
    for name, form, options in parsed:
        if time.perf_counter() - start > args.budget_s:
            print(f'(budget of {args.budget_s:.0f} s spent: {name} not run)')
            continue
        own = {'nnx': lambda s: s, 'pure': pure_state, 'leaves': jax.tree_util.tree_leaves}[form](
            jax.tree.map(lambda x: x.copy(), state))  # each variant donates its own copy
        try:
            r = measure(variant_step(train_step, nnx_def, form, mesh, own, options), own, batch, args.steps)
        except Exception as e:  # noqa: BLE001 -- e.g. a compiler option this XLA does not know: report, go on
            print(f'| {name} | failed: {type(e).__name__}: {str(e)[:200]} |', flush=True)
            continue
        print(f"| {name} | {r['compile_s']:.1f} | {r['dispatch_ms']:.2f} | {r['synced_ms']:.2f} | "
              f"{r['pipelined_ms']:.2f} | {args.batch / r['pipelined_ms'] * 1e3:.1f} | {r['loss']:.4f} |", flush=True)
    print(f'\n{time.perf_counter() - start:.0f} s in all; 1-min load at end: {C.loadavg():.2f}')


if __name__ == '__main__':
    main()
