"""bench/gpu_program.py: the training step compiled for a GPU target on this GPU-less machine (XLA:GPU through the
CUDA plugin's compile-only topology), and its byte count on programs whose traffic is known."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.test_bench import table_row

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_program_compiles_the_training_step_for_a_gpu_without_one(tmp_path):
    """bench/gpu_program.py compiles the demo config's training step for an H100 through the CUDA plugin's
    compile-only topology (this machine has no GPU): each 3×3 convolution becomes three cuDNN calls (forward, data
    gradient, kernel gradient), the 1×1 ones GEMM fusions, and the fusions' bytes are summed by kind."""
    from flax import nnx
    from kdiff_jax.factory import make_model
    sys.path.insert(0, str(ROOT / 'bench'))
    import _common as C
    model = make_model(C.load_bench_config('demo'), initialize=False)
    convs_3x3 = sum(1 for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                    if path[-1] == 'kernel' and v.ndim == 4 and v.shape[:2] == (3, 3))
    assert convs_3x3 > 10
    import gpu_program as G
    target = tmp_path / 'card.txtpb'  # as bench/gpu.sh saves a card's description (here: ours, renamed)
    target.write_text(G.target_config_text({**G.H100_SXM, 'name': 'H100 read from a file'}))
    proc = subprocess.run([sys.executable, str(ROOT / 'bench' / 'gpu_program.py'), '--config', 'demo', '--batch', '2',
                           '--target-config', str(target), '--hlo-out', str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=900, env={**os.environ, 'JAX_PLATFORMS': ''})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'target H100 read from a file' in proc.stdout
    row = table_row(proc.stdout, 'default')
    assert float(row[1]) > 0 and int(row[2]) > 100 and float(row[3]) > 0, row  # compile s, fusions, GB
    assert f'cuDNN convolution {3 * convs_3x3}' in row[5], row
    assert re.search(r'\| reduction \(normalisation statistics.*\| \d+\.\d\d \(\d+\) \|', proc.stdout), proc.stdout
    phases = {p: table_row(proc.stdout, p)[1].split() for p in ('forward', 'backward', 'rest')}  # 'GB', '(count)'
    gb = {p: float(cell[0]) for p, cell in phases.items()}
    # the backward pass moves more than the forward; at batch 2 the optimizer and the EMA ('rest') move the most
    assert gb['rest'] > gb['backward'] > gb['forward'] > 0, phases
    assert sum(int(cell[1].strip('()')) for cell in phases.values()) == int(row[2])  # every fusion in one phase
    with gzip.open(tmp_path / 'gpu_step_1.hlo.txt.gz', 'rt') as f:
        hlo = f.read()
    assert 'ENTRY' in hlo and '__cudnn$convBackwardFilter' in hlo


def test_gpu_program_counts_each_fusions_bytes_once():
    """The byte count of bench/gpu_program.py on programs whose traffic is known, compiled for the H100 target: an
    elementwise map of a 512×512 float32 array reads 1 MiB and writes 1 MiB in one fusion; a row sum reads 1 MiB and
    writes 2 KiB; the row sums of its first 8 columns read those 16 KiB only. A gradient's fusion is in the
    backward phase. An XLA flag given as OPTION=true reaches XLA as a boolean (it refuses the string)."""
    code = '''
import json, sys
sys.path.insert(0, "bench")
import gpu_program as G, _common as C
G.use_cuda_plugin(G.__file__.rsplit("/", 2)[0] + "/.venv/gpu-compile")
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = G.gpu_mesh(G.target_config_text(G.H100_SXM))
x = jax.ShapeDtypeStruct((512, 512), jnp.float32, sharding=NamedSharding(mesh, P()))
options = C.xla_options({"xla_gpu_enable_triton_gemm": "false"})
out = {}
for name, fn in (("map", lambda a: jnp.sin(a) * 2), ("row sum", lambda a: a.sum(axis=1)),
                 ("sliced", lambda a: jnp.square(a[:, :8]).sum(axis=1)),
                 ("gradient", jax.grad(lambda a: jnp.sum(jnp.sin(a) ** 2)))):
    hlo = jax.jit(fn, compiler_options=options).lower(x).compile().as_text()
    out[name] = G.static_traffic(hlo)
print(json.dumps(out))
'''
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, 'JAX_PLATFORMS': ''})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out['map']['fusions'] == {'other elementwise': [1, 2 * 2**20]} and out['map']['calls'] == {}
    reduction = 'reduction (normalisation statistics, bias and scale gradients)'
    assert out['row sum']['fusions'] == {reduction: [1, 2**20 + 512 * 4]}
    assert out['sliced']['fusions'] == {reduction: [1, 512 * 8 * 4 + 512 * 4]}  # reads only the slice it sums
    assert out['map']['phases'] == {'rest': [1, 2 * 2**20]}  # no gradient taken: neither forward nor backward
    # d/da Σ sin² a = 2 sin a cos a: computed under the gradient's transpose, in one fusion of 1 MiB in, 1 MiB out
    assert out['gradient']['phases'] == {'backward': [1, 2 * 2**20]}, out['gradient']
