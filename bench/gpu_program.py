#!/usr/bin/env python3
"""The training step as XLA:GPU compiles it, without a GPU: the memory traffic of its fusions, by kind.

  .venv/bin/python bench/gpu_program.py [--config cars64] [--batch 64] [--variants default OPTION=VALUE[:...]]

On the GPU, the step's convolutions and GEMMs run near the card's matmul rate and the rest is XLA's fusions
(normalisation, GELU, dropout, residuals, softmax, AdamW, EMA), which are bound by memory bandwidth: in session
8's profile (bench/RESULTS.md, "GPU") they took 26 of the 40 ms of kernel time per step at cars64, batch 64. This
script compiles the same step (`make_train_step`, state replicated and donated, batch split, bf16 compute) for a
GPU *target* on the CPU, through a compile-only PJRT topology of the CUDA plugin, and reads the optimized HLO: for
each fusion, the bytes it must at least read and write (operands once, outputs once; `gpu_trace.hlo_fusions`, the
byte count used on the profiles), summed by kind, and the calls left to libraries (cuDNN convolutions, cuBLAS).
Each fusion is counted once per step (the step has no loops but the dropout draw's). So a change to the model or an
XLA option can be judged by the bytes of the GPU program it gives, here, before a session with a GPU times it. It
says nothing of the library kernels' speed, and nothing is autotuned. Nor of CUDA graphs: the HLO compiled here
holds no command buffers, even for a chain of 18 fusions with xla_gpu_enable_command_buffer=FUSION,CUBLAS,
xla_gpu_graph_min_graph_size=1 and CUDA 12.9 as runtime and driver version in the target config (session 19), while
the card's step ran as 145 graphs (session 8); recent XLA sources form them from the thunks, after the HLO.

The CUDA plugin (`jax-cuda12-plugin` and `jax-cuda12-pjrt`, the version of jaxlib) is looked for on sys.path, then in
`--plugin-path` (default .venv/gpu-compile, which `make venv` fills from requirements/gpu_compile.txt). The target
is an NVIDIA H100 SXM described from its data sheet (`H100_SXM`), or `--target-config FILE`: a GpuTargetConfig text
proto, such as the one bench/gpu.sh saves from the card it runs on. --variants: `default` (no option) or
OPTION=VALUE[:OPTION=VALUE]... of XLA's (`true`/`false` for flags), compared in one table.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

#: NVIDIA H100 SXM5 80GB (compute capability 9.0), from its data sheet and CUDA's device properties (the memory as
#: nvidia-smi showed it in session 5). XLA's fusion decisions read the SM count, the shared memory and register
#: limits, the L2 size and the memory bandwidth.
H100_SXM = dict(
    name='NVIDIA H100 80GB HBM3', compute_capability=(9, 0), core_count=132, fpus_per_core=128,
    threads_per_block_limit=1024, threads_per_warp=32, threads_per_core_limit=2048,
    shared_memory_per_block=48 * 1024, shared_memory_per_block_optin=227 * 1024, shared_memory_per_core=228 * 1024,
    registers_per_core_limit=65536, registers_per_block_limit=65536, l2_cache_size=50 * 2**20,
    memory_bandwidth=3_350_000_000_000, clock_rate_ghz=1.98, device_memory_size=81559 * 2**20,
    cudnn_version=(9, 8, 0))
BANDWIDTH_GBS = 3000.  # a device-to-device copy's rate on the H100s used (bench/RESULTS.md, "GPU")


def target_config_text(spec: dict) -> str:
    """A GpuTargetConfig text proto (what a compile-only CUDA topology takes) for the device described by `spec`."""
    major, minor = spec['compute_capability']
    fields = [f'  {k}: {spec[k]}' for k in (
        'threads_per_block_limit', 'threads_per_warp', 'shared_memory_per_block', 'shared_memory_per_core',
        'threads_per_core_limit', 'core_count', 'fpus_per_core', 'memory_bandwidth', 'l2_cache_size',
        'clock_rate_ghz', 'device_memory_size', 'shared_memory_per_block_optin', 'registers_per_core_limit',
        'registers_per_block_limit')]
    dnn = dict(zip(('major', 'minor', 'patch'), spec['cudnn_version']))
    return '\n'.join([
        'gpu_device_info {', *fields,
        '  block_dim_limit_x: 2147483647', '  block_dim_limit_y: 65535', '  block_dim_limit_z: 65535',
        f'  cuda_compute_capability {{ major: {major} minor: {minor} }}', '}',
        'platform_name: "CUDA"',
        'dnn_version_info { ' + ' '.join(f'{k}: {v}' for k, v in dnn.items()) + ' }',
        f'device_description_str: "{spec["name"]}"', ''])


def read_target_config(path: str) -> str | bytes:
    """A saved GpuTargetConfig: text proto as str, or the serialized proto as bytes (as the card's jaxlib gave it)."""
    data = Path(path).read_bytes()
    try:
        return data.decode()
    except UnicodeDecodeError:
        return data


def use_cuda_plugin(plugin_path: str | None) -> None:
    """Make the CUDA plugin importable (sys.path, then `plugin_path`) and keep JAX's runtime on the CPU: the GPU is
    only a compilation target here. Call before importing jax."""
    import importlib.util

    def found() -> bool:
        try:
            return importlib.util.find_spec('jax_plugins.xla_cuda12') is not None
        except ModuleNotFoundError:  # no jax_plugins package at all
            return False
    os.environ['JAX_PLATFORMS'] = 'cpu'
    if not found() and plugin_path and Path(plugin_path).is_dir():
        sys.path.insert(0, str(Path(plugin_path).resolve()))
    if not found():
        raise SystemExit('bench/gpu_program.py needs the CUDA plugin of this jaxlib: `make venv` installs it in '
                         '.venv/gpu-compile (requirements/gpu_compile.txt); or pip install jax-cuda12-plugin '
                         'jax-cuda12-pjrt of the same version as jaxlib')


def gpu_mesh(target_config: str):
    """A 1-device 'data' mesh on a compile-only CUDA topology for `target_config`."""
    from jax.experimental import topologies
    from kdiff_jax.training.sharding import DATA_AXIS
    topology = topologies.get_topology_desc(platform='cuda', target_config=target_config, topology='1x1x1')
    return topologies.make_mesh(topology, (1,), (DATA_AXIS,))


def lower_train_step(config_name: str, batch: int, dtype: str, mesh):
    """The training step lowered for `mesh`'s device, as `jit_train_step` compiles it (state replicated and
    donated, batch split over the mesh), from abstract arrays (nothing is initialised or placed). Each variant
    compiles this one lowering with its XLA options."""
    import jax
    import numpy as np
    from kdiff_jax.factory import make_model
    from kdiff_jax.training.optimizer import make_optimizer
    from kdiff_jax.training.sharding import batch_sharded, replicated
    from kdiff_jax.training.state import create_train_state
    from kdiff_jax.training.step import make_train_step
    config = C.load_bench_config(config_name, dtype)
    tx = make_optimizer(config)
    train_model, state = create_train_state(make_model(config, initialize=False), tx, seed=0)
    abstract = lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)  # noqa: E731
    state_sharding = jax.tree.map(lambda _: replicated(mesh), state)
    state = jax.tree.map(lambda x: abstract(x, replicated(mesh)), state)
    images = {k: abstract(v, batch_sharded(mesh)) for k, v in C.train_batch(config_name, batch).items()}
    step = jax.jit(make_train_step(config, train_model, tx), in_shardings=(state_sharding, batch_sharded(mesh)),
                   out_shardings=(state_sharding, replicated(mesh)), donate_argnums=0)
    return step.lower(state, images)


def static_traffic(hlo_text: str) -> dict:
    """What the GPU program of `hlo_text` runs once per step: XLA's fusions by kind and by phase ({kind or phase:
    [count, bytes]}, each fusion's bytes at least, `gpu_trace.hlo_fusions`) and the calls to libraries ({name:
    count}: cuDNN convolutions, whether custom calls or cuDNN fusions, and cuBLAS). A fusion's phase is read from
    the names JAX gives its ops: 'backward' if any is under `transpose(...)` (the gradient), else 'forward' if any is
    under `jvp(...)`, else 'rest' (the optimizer, the EMA, the random draws, the finite check)."""
    from gpu_trace import hlo_fusions
    computations = C.hlo_computations(hlo_text)
    fusion = re.compile(r'\s*(?:ROOT )?%([\w.\-]+) = .* fusion\(.*calls=%([\w.\-]+)')
    calls_of = {name: [m.groups() for line in lines if (m := fusion.match(line))]
                for name, lines in computations.items()}
    fused = {called for pairs in calls_of.values() for _, called in pairs}  # bodies of fusions, not kernels
    with_convolution = {name for name, lines in computations.items() if any(' convolution(' in s for s in lines)}
    kernels, library_fusions = {}, set()
    for name, pairs in calls_of.items():
        if name not in fused:  # a fusion nested in another (Triton's block-level fusions) is part of its kernel
            for instruction, called in pairs:
                key = re.sub(r'[.\-]', '_', instruction)
                if called in with_convolution:
                    library_fusions.add(key)
                else:
                    kernels[key] = _phase('\n'.join(computations.get(called, [])))
    kinds, phases = collections.defaultdict(lambda: [0, 0]), collections.defaultdict(lambda: [0, 0])
    for name, (kind, nbytes) in hlo_fusions(hlo_text).items():
        if name in kernels:
            for total in (kinds[kind], phases[kernels[name]]):
                total[0] += 1
                total[1] += nbytes
    calls = collections.Counter()
    for target in re.findall(r'custom_call_target="([^"]+)"', hlo_text):
        calls['cuDNN convolution' if 'cudnn$conv' in target else 'cuBLAS' if 'cublas' in target else target] += 1
    if library_fusions:
        calls['cuDNN convolution'] += len(library_fusions)
    return dict(fusions=dict(kinds), phases=dict(phases), calls=dict(calls))


def _phase(fused_computation: str) -> str:
    names = re.findall(r'op_name="([^"]*)"', fused_computation)
    return ('backward' if any('transpose(' in n for n in names) else 'forward' if any('jvp(' in n for n in names)
            else 'rest')


def parse_variant(spec: str) -> dict:
    """'default' → {}; 'OPTION=VALUE[:OPTION=VALUE]...' → XLA options (`C.xla_options`)."""
    if spec == 'default':
        return {}
    if not all('=' in o for o in spec.split(':')):
        raise SystemExit(f'bad variant {spec!r}: default, or OPTION=VALUE[:OPTION=VALUE]...')
    return C.xla_options(dict(o.split('=', 1) for o in spec.split(':')))


def print_split(results: list, field: str, name: str, rows: list[str]) -> None:
    """A table of each variant's bytes (and fusion count) by `name` (kind or phase), from `static_traffic`'s `field`."""
    print(f'\nGB/step at least (fusions) by {name}:\n\n| {name} | ' + ' | '.join(s for s, _, _ in results)
          + ' |\n|---|' + '---|' * len(results))
    for row in rows:
        cells = [t[field].get(row) for _, _, t in results]
        print(f'| {row} | ' + ' | '.join(f'{c[1] / 1e9:.2f} ({c[0]})' if c else '' for c in cells) + ' |')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default='cars64')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'], help="the model's compute dtype")
    p.add_argument('--variants', nargs='+', default=['default'], metavar='default|OPTION=VALUE[:...]')
    p.add_argument('--target-config', help='GpuTargetConfig text proto (default: an H100 SXM, H100_SXM)')
    p.add_argument('--plugin-path', default=str(C.ROOT / '.venv' / 'gpu-compile'))
    p.add_argument('--hlo-out', help="also write each variant's optimized HLO here (gzipped)")
    args = p.parse_args()
    variants = [(spec, parse_variant(spec)) for spec in args.variants]
    use_cuda_plugin(args.plugin_path)
    target = read_target_config(args.target_config) if args.target_config else target_config_text(H100_SXM)
    device = re.search(r'device_description_str: "([^"]*)"', target) if isinstance(target, str) else None
    mesh = gpu_mesh(target)
    print(C.machine_header(f'The training step compiled for a GPU, without one (bench/gpu_program.py): '
                           f'{args.config}, batch {args.batch}, {args.dtype}, target '
                           f'{device.group(1) if device else args.target_config}'))
    from tqdm import tqdm
    lowered = lower_train_step(args.config, args.batch, args.dtype, mesh)
    results = []
    for spec, options in tqdm(variants, desc='compiling for the GPU', unit='variant'):
        start = time.perf_counter()
        hlo = lowered.compile(compiler_options=options).as_text()
        results.append((spec, time.perf_counter() - start, static_traffic(hlo)))
        if args.hlo_out:
            Path(args.hlo_out).mkdir(parents=True, exist_ok=True)
            with gzip.open(Path(args.hlo_out) / f'gpu_step_{len(results)}.hlo.txt.gz', 'wt') as f:
                f.write(hlo)
    print('\n| variant | XLA compile s | XLA fusions | GB/step at least | ms at '
          f'{BANDWIDTH_GBS:.0f} GB/s | library calls |\n|---|---|---|---|---|---|')
    for spec, compile_s, t in results:
        count = sum(n for n, _ in t['fusions'].values())
        gb = sum(b for _, b in t['fusions'].values()) / 1e9
        calls = ', '.join(f'{k} {v}' for k, v in sorted(t['calls'].items()))
        print(f'| {spec} | {compile_s:.1f} | {count} | {gb:.2f} | {gb / BANDWIDTH_GBS * 1e3:.2f} | {calls} |')
    kinds = sorted({k for _, _, t in results for k in t['fusions']},
                   key=lambda k: -results[0][2]['fusions'].get(k, (0, 0))[1])
    print_split(results, 'fusions', 'kind', kinds)
    print_split(results, 'phases', 'phase', ['forward', 'backward', 'rest'])
    if args.hlo_out:
        print(f'\noptimized HLO: {args.hlo_out}/gpu_step_*.hlo.txt.gz')


if __name__ == '__main__':
    main()
