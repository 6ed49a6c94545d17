"""The bench/ scripts still run, through bench/gpu.sh's pipeline on the CPU and the demo config (numbers are not
checked here: speed is measured on a quiet machine, see bench/RESULTS.md). Both sides must compute the same thing."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The test machine is busy (the suite runs in parallel): do not wait for it to settle or repeat noisy runs.
BUSY_OK = {'BENCH_IDLE_WAIT_S': '0', 'BENCH_MAX_OTHERS': '99'}


def table_row(out: str, first_cell: str) -> list[str]:
    rows = [line for line in out.splitlines() if line.startswith(f'| {first_cell} |')]
    assert len(rows) == 1, out
    return [cell.strip() for cell in rows[0].strip('|').split('|')]


def test_gpu_script_pipeline_on_the_cpu(tmp_path):
    """bench/gpu.sh end to end with the GPU flag left out: bf16 on both sides (JAX's compute dtype, PyTorch's CPU
    autocast), the training step in 2 rounds (a row each and the median of their ratios) then sampling (one short
    sampler here), each table in $OUT; the scripts' scratch directories (weights, batches) are gone afterwards."""
    scratch = tmp_path / 'scratch'
    scratch.mkdir()
    env = {**os.environ, **BUSY_OK, 'GPU_FLAG': '', 'WHEELS': '', 'CONFIG': 'demo', 'BATCHES': '2', 'ROUNDS': '2',
           'SAMPLERS': 'heun:4', 'PYTHON': sys.executable, 'OUT': str(tmp_path), 'TMPDIR': str(scratch)}
    proc = subprocess.run(['bash', str(ROOT / 'bench' / 'gpu.sh')], capture_output=True, text=True, cwd=ROOT,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not list(scratch.glob('kdiff_bench_*')), list(scratch.iterdir())
    # on a GPU, the card's description for bench/gpu_program.py; the CPU's topology has none, which it says
    assert 'this jaxlib gives no target config for cpu' in (tmp_path / 'gpu.txt').read_text()
    train = (tmp_path / 'train_step.md').read_text()
    assert 'bfloat16' in train.splitlines()[0]
    rows = [line.strip('|').split('|') for line in train.splitlines() if line.startswith('| demo | 2 |')]
    assert len(rows) == 2
    for row in rows:
        assert float(row[2]) > 0 and float(row[3]) > 0  # images/s on each side
    ratios = sorted(float(row[4].strip().rstrip('x')) for row in rows)
    median = re.search(r'2 rounds .*ratio median (\d+\.\d+)x, range (\d+\.\d+)–(\d+\.\d+)x', train)
    assert median and [float(median.group(i)) for i in (2, 3)] == ratios and float(median.group(1)) == ratios[1]
    assert re.search(r'first-step loss jax \d+\.\d+, torch \d+\.\d+', train)
    assert re.search(r'pipelined, .*: kdiff_jax \d+\.\d+, PyTorch \d+\.\d+ img/s', train)
    sampling = (tmp_path / 'sampling.md').read_text()
    row = table_row(sampling, 'heun')
    assert row[1:3] == ['4', '7']  # steps, model evaluations
    # Both sides computed the same samples from the same noise, to bf16 precision (5e-4 seen at 25 steps; the fp32
    # bench agrees to ~6e-7, bench/RESULTS.md): a mismatch of inputs or schedules would show as an O(1) error.
    assert float(row[9]) < 1e-2
    # --profile: both sides' summaries (no GPU here, so the JAX one says it found no GPU kernels), the raw traces
    # and the optimized HLO, compressed, in $OUT.
    assert 'no GPU stream events' in (tmp_path / 'jax_train_kernels.md').read_text()
    assert 'aten::' in (tmp_path / 'torch_train_kernels.md').read_text()
    for name in ('jax_train.xplane.pb.gz', 'jax_train_hlo.txt.gz', 'torch_train_trace.json.gz'):
        assert (tmp_path / name).stat().st_size > 1000, name
    with gzip.open(tmp_path / 'jax_train_hlo.txt.gz', 'rt') as f:
        assert 'ENTRY' in f.read()


def test_gpu_script_skips_the_parts_its_budget_leaves_no_time_for(tmp_path):
    """BUDGET_S bounds bench/gpu.sh (a device call may run 600 s): a part with under a minute left is skipped, with a
    message naming it, and the script still ends normally."""
    env = {**os.environ, **BUSY_OK, 'GPU_FLAG': '', 'WHEELS': '', 'CONFIG': 'demo', 'BATCHES': '2 4',
           'PYTHON': sys.executable, 'OUT': str(tmp_path), 'BUDGET_S': '30'}
    proc = subprocess.run(['bash', str(ROOT / 'bench' / 'gpu.sh')], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for part in ('training step at batch 2', 'training step at batch 4', 'sampling'):
        assert re.search(rf'skipped \(\d+ s of BUDGET_S=30 left\): {part}', proc.stderr), proc.stderr
    assert (tmp_path / 'train_step.md').read_text() == '' and not (tmp_path / 'sampling.md').exists()


def test_step_flops_counted_on_the_cpu_match_the_bf16_step(tmp_path):
    """XLA:GPU gives no cost analysis of the lowered step, so train_step.py --gpu counts its FLOPs in a CPU worker
    (`flops_worker`, run here in-process) in float32: the count must match that of the bf16 step the GPU runs (the
    same program in another dtype)."""
    sys.path.insert(0, str(ROOT / 'bench'))
    import _common as C
    import numpy as np
    from train_step import flops_worker, lowered_flops
    weights = C.write_weights('demo', tmp_path / 'w.npz')
    np.savez(tmp_path / 'batch.npz', **C.train_batch('demo', 2))
    counted = flops_worker(dict(config='demo', weights=str(weights), batch=str(tmp_path / 'batch.npz')))
    step, state, batch = C.jax_train_step('demo', str(weights), 'bfloat16', C.train_batch('demo', 2))
    bf16 = lowered_flops(step.lower(state, batch))
    # Equal but for the bf16 program's dtype conversions, which XLA counts as element operations (0.5% at demo).
    assert counted['flops'] > 1e8 and abs(counted['flops'] / bf16 - 1) < 0.01


def test_torch_step_reports_its_first_steps_loss_however_many_steps_are_timed(tmp_path):
    """The report's "first-step loss" on the PyTorch side is the first step's, whatever number of steps --target-s
    leaves to time (the worker runs in-process here, once timing 2 steps and once 10)."""
    sys.path.insert(0, str(ROOT / 'bench'))
    import _common as C
    import numpy as np
    from train_step import torch_worker
    weights = C.write_weights('demo', tmp_path / 'w.npz')
    np.savez(tmp_path / 'batch.npz', **C.train_batch('demo', 2))
    spec = dict(side='torch', gpu=False, dtype='float32', profile=None, config='demo', weights=str(weights),
                batch=str(tmp_path / 'batch.npz'))
    few, many = (torch_worker({**spec, 'target_s': target_s}) for target_s in (0., 1e6))
    assert (len(few['times']), len(many['times'])) == (2, 10)
    assert few['loss'] == many['loss'] and np.isfinite(few['loss'])


def test_cpu_description_names_the_vector_units():
    """The tables' header tells apart CPUs that share a model name (an AMD EPYC VM with or without AVX-512)."""
    sys.path.insert(0, str(ROOT / 'bench'))
    from _common import cpu_description

    def cpuinfo(name, family, model, flags):
        core = f'vendor_id\t: x\ncpu family\t: {family}\nmodel\t\t: {model}\nmodel name\t: {name}\nflags\t\t: {flags}\n'
        return core + '\n' + core.replace('model name\t: ', 'model name\t: second ')  # two processors: the first counts
    assert cpu_description(cpuinfo('AMD EPYC', 25, 1, 'fpu sse2 avx fma avx2 bmi2')) == \
        'AMD EPYC (family 25, model 1; AVX2, no AVX-512)'
    assert cpu_description(cpuinfo('AMD EPYC', 25, 17, 'avx2 avx512f avx512bw avx512_bf16')) == \
        'AMD EPYC (family 25, model 17; AVX-512)'
    assert cpu_description(cpuinfo('Intel(R) Xeon(R) Processor', 6, 143, 'avx2 avx512f amx_bf16 amx_tile')) == \
        'Intel(R) Xeon(R) Processor (family 6, model 143; AVX-512, AMX)'
    assert cpu_description('model name\t: Old\nflags\t: sse2 avx\n') == 'Old (no AVX2)'


def test_gpu_trace_summary():
    """bench/gpu_trace.py's table: per-step times, families from kernel names, shares of the busy time."""
    sys.path.insert(0, str(ROOT / 'bench'))
    from gpu_trace import family, table
    names = {'sm90_xmma_fprop_implicit_gemm_bf16bf16_nhwc': 'convolution', 'nvjet_sm90_tst_128x128': 'gemm (dot)',
             'loop_add_fusion_16': 'elementwise/reduction', 'memcpy32_post': 'copy',
             'triton_softmax_1': 'triton fusion',
             'void cudnn::engines_precompiled::nchwToNhwcKernel': 'layout transpose',
             'input_transpose_fusion_89': 'layout transpose', 'mystery': 'other'}
    assert {name: family(name) for name in names} == names
    out = table({'sm90_xmma_fprop_x': 30., 'loop_add_fusion_1': 9., 'memcpy128': 3.},
                {'sm90_xmma_fprop_x': 6, 'loop_add_fusion_1': 3, 'memcpy128': 3}, steps=3, wall_ms=20., top=2,
                title='t')
    assert 'GPU kernel time 14.00 ms per step, wall 20.00 ms per step: GPU busy 70% of the step' in out
    assert '| convolution | 10.00 | 71% |' in out and '| copy | 1.00 | 7% |' in out
    assert '`sm90_xmma_fprop_x` | convolution | 2 | 10.00 | 71% |' in out and 'memcpy128`' not in out  # top 2 only


def test_pytorch_chrome_trace_kernels(tmp_path):
    """Kernels, copies and memsets of a PyTorch profiler trace count; CPU ops and GPU annotations (which span
    kernels, e.g. 'Optimizer.step#AdamW.step') do not."""
    sys.path.insert(0, str(ROOT / 'bench'))
    from gpu_trace import chrome_trace_kernels
    events = [{'cat': 'kernel', 'name': 'k1', 'dur': 1500.}, {'cat': 'kernel', 'name': 'k1', 'dur': 500.},
              {'cat': 'gpu_memcpy', 'name': 'Memcpy HtoD', 'dur': 100.},
              {'cat': 'gpu_user_annotation', 'name': 'Optimizer.step#AdamW.step', 'dur': 5000.},
              {'cat': 'cpu_op', 'name': 'aten::add', 'dur': 70.}]
    path = tmp_path / 'trace.json.gz'
    with gzip.open(path, 'wt') as f:
        json.dump({'traceEvents': events}, f)
    per_kernel, launches = chrome_trace_kernels(str(path))
    assert per_kernel == {'k1': 2., 'Memcpy HtoD': .1} and launches == {'k1': 2, 'Memcpy HtoD': 1}


def test_hlo_fusion_kinds_and_bytes():
    """bench/gpu_trace.py reads an optimized HLO module (here XLA:CPU's): each fusion's kind from the ops it fuses,
    the bytes it moves at least (operands and outputs once), and its kernel name ('.' and '-' as '_')."""
    import jax
    import jax.numpy as jnp
    sys.path.insert(0, str(ROOT / 'bench'))
    from gpu_trace import fusion_traffic, hlo_fusions
    f = jax.jit(lambda x, y: (jnp.sum(jnp.exp(x) * y, axis=0), jnp.sqrt(x) / y))
    hlo = f.lower(jnp.ones((64, 32)), jnp.ones((64, 32))).compile().as_text()
    fusions = hlo_fusions(hlo)
    by_kind = {kind: nbytes for kind, nbytes in fusions.values()}
    assert by_kind['optimizer update (AdamW)'] == 3 * 64 * 32 * 4  # sqrt(x) / y: two f32[64,32] in, one out
    assert by_kind['softmax (attention)'] == 3 * 64 * 32 * 4  # exp(x) * y
    reduction = next(name for name, (kind, _) in fusions.items() if kind.startswith('reduction'))
    assert '.' not in reduction and '-' not in reduction
    # The AdamW-like kernel: 2 launches per step of 24576 B in 0.0002 ms per step: 245.76 GB/s.
    name = next(name for name, (kind, _) in fusions.items() if kind.startswith('optimizer'))
    out = fusion_traffic({name: 0.0004, 'sm90_xmma_fprop_x': 1.}, {name: 4, 'sm90_xmma_fprop_x': 2}, hlo, steps=2)
    assert '| optimizer update (AdamW) | 0.00 | 0.00 | 246 | 0.00 |' in out, out
    assert '| library kernel: convolution | 0.50 |  |  |  |' in out


def test_step_dispatch_forms_compute_the_same_step():
    """bench/step_dispatch.py on the CPU: the training step called with the state as the nnx TrainState and as plain
    dicts gives a row each, and both reach the same loss from the same state (the same computation; only the calling
    convention differs). The third form, the flat list, is these states' leaves, in the order both use; each form
    costs a compilation of the step (~17 s here), so it is left out."""
    proc = subprocess.run([sys.executable, str(ROOT / 'bench' / 'step_dispatch.py'), '--config', 'demo', '--batch', '2',
                           '--steps', '2', '--max-load', '1000', '--variants', 'nnx', 'pure'], capture_output=True,
                          text=True, cwd=ROOT, timeout=900, env={**os.environ, **BUSY_OK})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '| leaves |' not in proc.stdout  # --variants chose the rows
    rows = {form: table_row(proc.stdout, form) for form in ('nnx', 'pure')}
    for row in rows.values():
        assert all(float(cell) > 0 for cell in row[1:5]), row  # compile s, dispatch, synced, pipelined ms
    assert len({row[6] for row in rows.values()}) == 1, rows  # the loss after the same steps
