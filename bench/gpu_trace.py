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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

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


def open_maybe_gzipped(path: str, mode: str):
    """`path` opened for reading, through gzip when it ends in .gz."""
    return gzip.open(path, mode) if path.endswith('.gz') else open(path, mode)


def xplane_kernels(path: str) -> tuple[dict[str, float], dict[str, int], list[str]]:
    """{kernel name: total ms} and {kernel name: launches} over the stream lines of the trace's GPU planes, and the
    line names seen."""
    from jax.profiler import ProfileData
    with open_maybe_gzipped(path, 'rb') as f:
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


def summarize_xplane(path: str, steps: int, wall_ms: float | None = None, top: int = 25,
                     hlo_text: str | None = None, bandwidth_gbs: float = 3000.) -> str:
    """The kernel table of a JAX trace; with the step's optimized HLO, also its fusions' traffic (`fusion_traffic`)."""
    per_kernel, launches, seen = xplane_kernels(path)
    if not per_kernel:
        return f'no GPU stream events in {path}; GPU lines seen: {seen}'
    summary = table(per_kernel, launches, steps, wall_ms, top, 'kdiff_jax (XLA) kernels')
    if hlo_text is not None:
        summary += '\n\n' + fusion_traffic(per_kernel, launches, hlo_text, steps, bandwidth_gbs)
    return summary


def chrome_trace_kernels(path: str) -> tuple[dict[str, float], dict[str, int]]:
    """{kernel name: total ms} and launches from a PyTorch profiler Chrome trace (.json or .json.gz): its 'kernel',
    'gpu_memcpy' and 'gpu_memset' events ('dur' in µs)."""
    import json
    with open_maybe_gzipped(path, 'rt') as f:
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


# What an XLA fusion computes, from the ops inside it: the first entry whose ops it all contains names it.
# The categories of `fusion_traffic`.
FUSION_KINDS = (
    ('matmul fusion', {'dot'}),
    ('dropout random bits', {'xor', 'shift-right-logical'}),
    ('optimizer update (AdamW)', {'sqrt', 'divide'}),
    ('GELU, fwd or bwd (with what XLA fused to it)', {'erf'}),
    ('softmax (attention)', {'exponential'}),
    ('reduction (normalisation statistics, bias and scale gradients)', {'reduce'}),
    ('padding / concatenation', {'pad'}),
    ('padding / concatenation', {'concatenate'}),
)
DTYPE_BYTES = {'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'pred': 1, 's8': 1, 'u8': 1, 's64': 8, 'u64': 8}


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape such as 'bf16[64,64,64,128]{3,2,1,0}' or a tuple of them."""
    total = 0
    for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', shape):
        n = 1
        for d in filter(None, dims.split(',')):
            n *= int(d)
        total += n * DTYPE_BYTES.get(dtype, 0)
    return total


def hlo_fusions(hlo_text: str) -> dict[str, tuple[str, int]]:
    """{kernel name: (kind, bytes)} for each fusion instruction of an optimized HLO module: its kind from the ops of
    the computation it calls (FUSION_KINDS), and the bytes it must move at least (operands read once, outputs
    written once; an operand that the fusion only slices counts the slices' bytes, since the kernel reads just
    those: e.g. one parameter's gradient cut from a GEMM's output that holds many). XLA:GPU names a fusion's kernel
    after the instruction, with '.' and '-' as '_'."""
    computations = C.hlo_computations(hlo_text)
    instr = re.compile(r'\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+?)(?:\{[^}]*\})? ([\w\-]+)\((.*)$')
    shapes, fusions = {}, {}
    for lines in computations.values():
        for line in lines:
            m = instr.match(line)
            if m:
                shapes[m.group(1)] = m.group(2)
                if m.group(3) == 'fusion':
                    fusions[m.group(1)] = (m.group(2), m.group(4))
    out = {}
    for name, (shape, rest) in fusions.items():
        calls = re.search(r'calls=%?([\w.\-]+)', rest)
        ops = {m.group(3) for line in computations.get(calls.group(1) if calls else '', [])
               if (m := instr.match(line))}
        kind = next((k for k, needs in FUSION_KINDS if needs <= ops), 'other elementwise')
        operands = re.findall(r'%([\w.\-]+)', rest.split(')', 1)[0])
        read = _bytes_read(computations.get(calls.group(1), []) if calls else [], instr)
        nbytes = shape_bytes(shape) + sum(read.get(i, shape_bytes(shapes.get(o, ''))) for i, o in enumerate(operands))
        out[re.sub(r'[.\-]', '_', name)] = (kind, nbytes)
    return out


def _bytes_read(body: list[str], instr: re.Pattern) -> dict[int, int]:
    """{parameter number: bytes} for the parameters of a fused computation that are used only by `slice`s: the
    bytes of those slices (at most the parameter's own)."""
    params, users = {}, collections.defaultdict(list)
    for line in body:
        m = instr.match(line)
        if not m:
            continue
        if m.group(3) == 'parameter':
            params[m.group(1)] = (int(re.match(r'\s*(\d+)', m.group(4)).group(1)), shape_bytes(m.group(2)))
        for operand in re.findall(r'%([\w.\-]+)', m.group(4).split(')', 1)[0]):
            users[operand].append((m.group(3), shape_bytes(m.group(2))))
    return {number: min(full, sum(b for _, b in users[name])) for name, (number, full) in params.items()
            if users[name] and all(op == 'slice' for op, _ in users[name])}


def fusion_traffic(per_kernel: dict[str, float], launches: dict[str, int], hlo_text: str, steps: int,
                   bandwidth_gbs: float = 3000.) -> str:
    """XLA's fusion kernels by what they compute: ms and GB per step, achieved GB/s, and the time the same bytes
    would take at `bandwidth_gbs` (the floor of this fusion plan). Library kernels (cuDNN, cuBLAS) and copies are
    listed as such."""
    fusions = hlo_fusions(hlo_text)
    ms, gb = collections.Counter(), collections.Counter()
    for name, t in per_kernel.items():
        kind, nbytes = fusions.get(name, (f'library kernel: {family(name)}', 0))
        ms[kind] += t / steps
        gb[kind] += nbytes * launches[name] / steps / 1e9  # a deduplicated kernel runs once per fusion using it
    lines = ['| kernels | ms/step | GB/step (at least) | GB/s | ms at ' f'{bandwidth_gbs:.0f} GB/s |',
             '|---|---|---|---|---|']
    for kind, t in ms.most_common():
        rate = f'{gb[kind] / t * 1e3:.0f}' if gb[kind] else ''
        floor = f'{gb[kind] / bandwidth_gbs * 1e3:.2f}' if gb[kind] else ''
        lines.append(f"| {kind} | {t:.2f} | {f'{gb[kind]:.2f}' if gb[kind] else ''} | {rate} | {floor} |")
    fused_ms = sum(t for k, t in ms.items() if gb[k])
    total_gb = sum(gb.values())
    lines.append(f'\nXLA fusions: {fused_ms:.2f} ms per step moving at least {total_gb:.1f} GB '
                 f'({total_gb / fused_ms * 1e3:.0f} GB/s); at {bandwidth_gbs:.0f} GB/s the same bytes take '
                 f'{total_gb / bandwidth_gbs * 1e3:.2f} ms')
    return '\n'.join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('trace', help='a .xplane.pb file written by jax.profiler.trace, or a PyTorch profiler Chrome '
                   'trace (.json); either may be gzipped')
    p.add_argument('--steps', type=int, required=True, help='how many steps the trace holds')
    p.add_argument('--wall-ms', type=float, help='wall time of one step, for the busy share')
    p.add_argument('--top', type=int, default=25)
    p.add_argument('--hlo', help="the step's optimized HLO text (jax_train_hlo.txt[.gz]): adds what XLA's fusion "
                   'kernels compute and the bytes they move')
    p.add_argument('--bandwidth', type=float, default=3000., help='GB/s for the floor of the fusions (default: '
                   "the H100's measured copy rate)")
    args = p.parse_args()
    if '.json' in args.trace:
        print(summarize_chrome_trace(args.trace, args.steps, args.wall_ms, args.top))
        return
    hlo_text = None
    if args.hlo:
        with open_maybe_gzipped(args.hlo, 'rt') as f:
            hlo_text = f.read()
    print(summarize_xplane(args.trace, args.steps, args.wall_ms, args.top, hlo_text, args.bandwidth))


if __name__ == '__main__':
    main()
