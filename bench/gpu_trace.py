#!/usr/bin/env python3
"""Where a profiled GPU step's device time goes: kernels from a JAX trace (.xplane.pb) or a PyTorch profiler run.

  python3 bench/gpu_trace.py TRACE.xplane.pb[.gz] --steps 3 [--wall-ms 52.1] [--top 25]
  python3 bench/gpu_trace.py TRACE.json[.gz] --steps 3 ...       # a PyTorch profiler Chrome trace

Written for `bench/train_step.py --gpu --profile DIR`, which traces a few of the timed steps on each side and calls
`summarize_xplane` / `summarize_chrome_trace` on them; this command re-reads a saved trace. Kernel events are summed by
kernel name over the device's stream lines; "busy" is the summed kernel time per step, so busy / wall is the share
of the step during which the GPU computed (the rest is launch gaps, host work and synchronisation). Kernels are
grouped into a few families by name (convolution, GEMM, Triton fusion, XLA loop/reduction fusion, layout transpose,
copy, other).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import re

# (family, pattern on the lower-cased kernel name); the first match wins.
FAMILIES = (
    ('copy', r'memcpy|memset'),
    ('layout transpose', r'nchwtonhwc|nhwctonchw|transpose'),
    ('convolution', r'conv|cudnn|implicit_gemm|dgrad|wgrad|fprop|xmma_fprop'),
    ('gemm (dot)', r'gemm|nvjet|cutlass|xmma|sm90_|matmul|cublas'),
    ('triton fusion', r'triton'),
    ('elementwise/reduction', r'loop_|input_|fusion|reduce|elementwise|vectorized|norm|softmax|adam|foreach'),
)


def family(kernel: str) -> str:
    low = kernel.lower()
    return next((name for name, pattern in FAMILIES if re.search(pattern, low)), 'other')


def table(per_kernel: dict[str, float], launches: dict[str, int], steps: int, wall_ms: float | None, top: int,
          title: str) -> str:
    """A markdown summary: busy time per step, families, and the `top` kernels (ms per step summed over their
    launches: XLA reuses one kernel for fusions of the same shape)."""
    busy = sum(per_kernel.values()) / steps
    lines = [f'### {title}', '',
             f'GPU kernel time {busy:.2f} ms per step' + (
                 f', wall {wall_ms:.2f} ms per step: GPU busy {busy / wall_ms:.0%} of the step'
                 if wall_ms else '') + f'; {len(per_kernel)} distinct kernels', '',
             '| family | ms/step | share |', '|---|---|---|']
    fam = collections.Counter()
    for name, ms in per_kernel.items():
        fam[family(name)] += ms / steps
    lines += [f'| {name} | {ms:.2f} | {ms / busy:.0%} |' for name, ms in fam.most_common()]
    lines += ['', f'| top {top} kernels | family | launches/step | ms/step | share |', '|---|---|---|---|---|']
    for name, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]:
        short = name if len(name) <= 110 else name[:107] + '...'
        lines.append(f'| `{short}` | {family(name)} | {launches[name] / steps:.0f} | {ms / steps:.2f} | '
                     f'{ms / steps / busy:.0%} |')
    return '\n'.join(lines)


def xplane_kernels(path: str) -> tuple[dict[str, float], dict[str, int], list[str]]:
    """{kernel name: total ms} and {kernel name: launches} over the stream lines of the trace's GPU planes, and the
    line names seen."""
    from jax.profiler import ProfileData
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        data = ProfileData.from_serialized_xspace(f.read())
    per_kernel, launches = collections.Counter(), collections.Counter()
    seen = []
    for plane in data.planes:
        if not plane.name.startswith('/device:GPU'):
            continue
        for line in plane.lines:
            seen.append(f'{plane.name}: {line.name}')
            if not line.name.startswith('Stream'):
                continue
            for ev in line.events:
                per_kernel[ev.name] += ev.duration_ns / 1e6
                launches[ev.name] += 1
    return per_kernel, launches, seen


def summarize_xplane(path: str, steps: int, wall_ms: float | None = None, top: int = 25) -> str:
    per_kernel, launches, seen = xplane_kernels(path)
    if not per_kernel:
        return f'no GPU stream events in {path}; GPU lines seen: {seen}'
    return table(per_kernel, launches, steps, wall_ms, top, 'kdiff_jax (XLA) kernels')


def chrome_trace_kernels(path: str) -> tuple[dict[str, float], dict[str, int]]:
    """{kernel name: total ms} and launches from a PyTorch profiler Chrome trace (.json or .json.gz): its 'kernel',
    'gpu_memcpy' and 'gpu_memset' events ('dur' in µs)."""
    import json
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rt') as f:
        trace = json.load(f)
    per_kernel, launches = collections.Counter(), collections.Counter()
    for ev in trace['traceEvents'] if isinstance(trace, dict) else trace:
        if ev.get('cat') in ('kernel', 'gpu_memcpy', 'gpu_memset'):
            per_kernel[ev['name']] += ev['dur'] / 1e3
            launches[ev['name']] += 1
    return per_kernel, launches


def summarize_chrome_trace(path: str, steps: int, wall_ms: float | None = None, top: int = 25) -> str:
    per_kernel, launches = chrome_trace_kernels(path)
    if not per_kernel:
        return f'no GPU kernel events in {path}'
    return table(per_kernel, launches, steps, wall_ms, top, 'PyTorch kernels')


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('trace', help='a .xplane.pb file written by jax.profiler.trace, or a PyTorch profiler Chrome '
                   'trace (.json); either may be gzipped')
    p.add_argument('--steps', type=int, required=True, help='how many steps the trace holds')
    p.add_argument('--wall-ms', type=float, help='wall time of one step, for the busy share')
    p.add_argument('--top', type=int, default=25)
    args = p.parse_args()
    if '.json' in args.trace:
        print(summarize_chrome_trace(args.trace, args.steps, args.wall_ms, args.top))
    else:
        print(summarize_xplane(args.trace, args.steps, args.wall_ms, args.top))


if __name__ == '__main__':
    main()
