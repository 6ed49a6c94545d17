"""The bench/ scripts still run, through bench/gpu.sh's pipeline on the CPU and the demo config (numbers are not
checked here: speed is measured on a quiet machine, see bench/RESULTS.md). Both sides must compute the same thing."""

from __future__ import annotations

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
    autocast), the training step then sampling (one short sampler here), each table in $OUT."""
    env = {**os.environ, **BUSY_OK, 'GPU_FLAG': '', 'WHEELS': '', 'CONFIG': 'demo', 'BATCH': '2',
           'SAMPLERS': 'heun:4', 'PYTHON': sys.executable, 'OUT': str(tmp_path)}
    proc = subprocess.run(['bash', str(ROOT / 'bench' / 'gpu.sh')], capture_output=True, text=True, cwd=ROOT,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train = (tmp_path / 'train_step.md').read_text()
    assert 'bfloat16' in train.splitlines()[0]
    row = table_row(train, 'demo')
    assert row[1] == '2' and float(row[2]) > 0 and float(row[3]) > 0  # images/s on each side
    assert re.search(r'first-step loss jax \d+\.\d+, torch \d+\.\d+', train)
    sampling = (tmp_path / 'sampling.md').read_text()
    row = table_row(sampling, 'heun')
    assert row[1:3] == ['4', '7']  # steps, model evaluations
    # Both sides computed the same samples from the same noise, to bf16 precision (5e-4 seen at 25 steps; the fp32
    # bench agrees to ~6e-7, bench/RESULTS.md): a mismatch of inputs or schedules would show as an O(1) error.
    assert float(row[9]) < 1e-2
