"""Shared machinery of the bench/ scripts: same weights on both sides, one subprocess per side, load bookkeeping.

Every measurement runs in a fresh worker process (`python bench/<script>.py --worker '<json>'`) so that
  * the peak resident memory of each side is its own (the worker reports /proc/self/status VmHWM, and VmRSS after
    its imports, before any model exists),
  * PyTorch's OpenMP threads (which spin after each op) never compete with XLA's thread pool,
  * neither side benefits from the other's warm caches.
The parent writes the weights once (a perturbed random k-diffusion model, so no tensor is zero) to an .npz file that
both workers load: the same converted weights on both sides. The JAX worker never imports torch.

Load hygiene: the machine is shared. `wait_for_quiet` waits for the 1-minute load average to drop below a threshold
before a script starts, and every worker run is bracketed by /proc/stat samples: the CPU time the whole machine
spent minus the worker's own CPU time, divided by the wall time, is the CPU (in cores) that *other* processes used
during the measurement ("others"). A run during which others used more than `--max-others` cores is repeated.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

USER_HZ = os.sysconf('SC_CLK_TCK')


# ---------------------------------------------------------------------------------------------------- load bookkeeping

def loadavg() -> float:
    return float(Path('/proc/loadavg').read_text().split()[0])


def _busy_seconds() -> float:
    fields = Path('/proc/stat').read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / USER_HZ


def busy_cores(window_s: float = 2.) -> float:
    """CPU cores busy (all processes) over the next `window_s` seconds; call while no worker of ours runs."""
    b0, t0 = _busy_seconds(), time.perf_counter()
    time.sleep(window_s)
    return (_busy_seconds() - b0) / (time.perf_counter() - t0)


def wait_for_quiet(max_load: float = 1.3, max_wait_s: float = 600., quiet=None) -> float:
    """Wait until the 1-min load average is below `max_load` (at most `max_wait_s`); returns the load then."""
    start = time.time()
    while True:
        load = loadavg()
        if load < max_load:
            return load
        if time.time() - start > max_wait_s:
            print(f'WARNING: 1-min load still {load:.2f} after {max_wait_s:.0f} s; measuring anyway', file=sys.stderr)
            return load
        if quiet is None:
            print(f'waiting for the machine to settle: 1-min load {load:.2f} >= {max_load}', file=sys.stderr)
        time.sleep(10)


def wait_for_idle_others(max_cores: float = 0.2, max_wait_s: float = float(os.environ.get("BENCH_IDLE_WAIT_S", 300))) -> float:
    """Wait until other processes use less than `max_cores` cores (2-s windows); returns the last sample."""
    start = time.time()
    while True:
        busy = busy_cores()
        if busy < max_cores or time.time() - start > max_wait_s:
            return busy
        time.sleep(3)


# ---------------------------------------------------------------------------------------------------- workers

def worker_malloc_env(side: str | None) -> dict[str, str]:
    """The allocator of a worker: kdiff_jax's ('jax') as its CLIs run, under `kdiff_jax.malloc.preload_env()`
    (mimalloc on a Linux CPU host); every other side with the system's malloc, as k-diffusion's users run it, unless
    BENCH_TORCH_MALLOC=mimalloc (to measure PyTorch under the same allocator)."""
    from kdiff_jax import malloc
    if side == 'jax':
        return malloc.preload_env()
    if side == 'torch' and os.environ.get('BENCH_TORCH_MALLOC') == 'mimalloc':
        return malloc.preload_env({**os.environ, 'KDIFF_JAX_MALLOC': 'mimalloc'})
    return {}


def malloc_line() -> str:
    """Which allocator each side's workers run with, for the reports' headers."""
    name = lambda side: 'mimalloc' if worker_malloc_env(side) else 'system malloc'
    return f'malloc: kdiff_jax {name("jax")}, PyTorch {name("torch")}'


def run_worker(script: str, spec: dict, *, env: dict | None = None,
               max_others: float = float(os.environ.get('BENCH_MAX_OTHERS', 0.3)), retries: int = 2,
               timeout: float = 900.) -> dict:
    """Run `script --worker spec` in a fresh process; returns its result dict plus load fields.

    A run during which other processes used more than `max_others` cores ($BENCH_MAX_OTHERS) is repeated, at most
    `retries` times.

    The worker's environment is this process's, plus `worker_malloc_env(spec['side'])`, plus `env`.

    Added fields: wall_s (of the whole process), others_cores (CPU used by other processes during it),
    load_start (1-min load average when it started), attempts.
    """
    best = None
    for attempt in range(1, retries + 2):
        wait_for_idle_others()
        load_start = loadavg()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        b0, t0 = _busy_seconds(), time.perf_counter()
        proc = subprocess.run([sys.executable, script, '--worker', json.dumps(spec)], capture_output=True, text=True,
                              env={**os.environ, **worker_malloc_env(spec.get('side')), **(env or {})},
                              timeout=timeout, cwd=ROOT)
        wall = time.perf_counter() - t0
        busy = _busy_seconds() - b0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(f'worker {spec} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}')
        own = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        result = json.loads(proc.stdout.rsplit('RESULT ', 1)[1])
        result.update(wall_s=wall, others_cores=max(0., (busy - own) / wall), load_start=load_start, attempts=attempt)
        if best is None or result['others_cores'] < best['others_cores']:
            best = result
        if result['others_cores'] <= max_others:
            break
        print(f'  (others used {result["others_cores"]:.2f} cores during {spec.get("side")}: repeating)',
              file=sys.stderr)
    return best


def memory_status() -> dict:
    """VmHWM (peak resident set) and VmRSS of this process, in MiB."""
    out = {}
    for line in Path('/proc/self/status').read_text().splitlines():
        key, _, value = line.partition(':')
        if key in ('VmHWM', 'VmRSS'):
            out[key] = int(value.split()[0]) / 1024
    return out


def worker_main(handlers: dict) -> bool:
    """If this process was started as a worker, run handlers[spec['side']](spec), print its result, return True."""
    if len(sys.argv) < 3 or sys.argv[1] != '--worker':
        return False
    spec = json.loads(sys.argv[2])
    rss_after_imports = memory_status()['VmRSS']
    result = handlers[spec['side']](spec)
    mem = memory_status()
    result.setdefault('peak_rss_mb', mem['VmHWM'])  # a handler that profiles after measuring sets its own
    result.update(rss_after_imports_mb=rss_after_imports)
    print('RESULT ' + json.dumps(result), flush=True)
    return True


# ---------------------------------------------------------------------------------------------------- timing

def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def repeats_for(first_s: float, target_s: float, lo: int = 2, hi: int = 10) -> int:
    """How many timed repeats fit in about `target_s` given one call takes `first_s`."""
    return int(max(lo, min(hi, round(target_s / max(first_s, 1e-6)))))


# ---------------------------------------------------------------------------------------------------- models / weights

def load_bench_config(name: str, dtype: str = 'float32'):
    """configs/<name>.py with the model's compute dtype set to `dtype` (float32 or bfloat16)."""
    from kdiff_jax.config import apply_overrides, load_config
    return apply_overrides(load_config(str(ROOT / 'configs' / f'{name}.py')), [f'--config.model.dtype={dtype}'])


def write_weights(config_name: str, path: Path, seed: int = 0, scale: float = 0.02) -> Path:
    """A k-diffusion model of `config_name` with random weights, every tensor perturbed (so proj_out is not zero and
    the output depends on the whole network; tests.parity.perturb_), saved as a state_dict .npz."""
    import numpy as np
    import torch
    from kdiff_jax.config import to_kdiffusion_dict
    from tests.parity import K, perturb_
    torch.manual_seed(seed)
    model = perturb_(K.config.make_model(to_kdiffusion_dict(load_bench_config(config_name))), seed, scale)
    np.savez(path, **{k: v.numpy() for k, v in model.state_dict().items()})
    return path


def jax_model(config_name: str, weights: str, dtype: str = 'float32'):
    """(config, network) of kdiff_jax with the weights of `weights` (.npz state_dict); no torch import."""
    import numpy as np
    from kdiff_jax.factory import make_model
    from kdiff_jax.interop import load_state_dict
    config = load_bench_config(config_name, dtype)
    model = make_model(config, initialize=False)
    with np.load(weights) as f:
        load_state_dict(model, {k: f[k] for k in f.files})
    return config, model


def train_batch(config_name: str, batch_size: int, seed: int = 0) -> dict:
    """The training benchmarks' batch (numpy): images in (-1, 1), tanh of a normal draw, and augmentation
    conditions."""
    import numpy as np
    m = load_bench_config(config_name).model
    rng = np.random.default_rng(seed)
    return {'image': np.tanh(rng.standard_normal((batch_size, *m.input_size, m.input_channels))).astype(np.float32),
            'aug_cond': (rng.standard_normal((batch_size, 9)) * 0.2).astype(np.float32)}


def jax_train_step(config_name: str, weights: str, dtype: str, batch: dict):
    """(step, state, batch) of kdiff_jax's training as train.py builds it: the TrainState (AdamW, EMA) replicated
    over a 1-device data mesh, `make_train_step` jitted with the state donated, `batch` placed on the mesh."""
    from kdiff_jax.training.optimizer import make_optimizer
    from kdiff_jax.training.sharding import data_mesh, jit_train_step, replicate, shard_batch
    from kdiff_jax.training.state import create_train_state
    from kdiff_jax.training.step import make_train_step
    config, model = jax_model(config_name, weights, dtype)
    mesh = data_mesh()
    tx = make_optimizer(config)
    train_model, state = create_train_state(model, tx, seed=0)
    state = replicate(state, mesh)
    step = jit_train_step(make_train_step(config, train_model, tx), mesh, state)
    return step, state, shard_batch(batch, mesh)


def step_runner(compiled, state, batch):
    """A callable that runs the compiled train step once and returns its metrics, by default after waiting for the
    step (`run(block=False)` only dispatches it). The step donates its state, so each call passes the state returned
    by the previous call."""
    import jax
    holder = [state]

    def run(block: bool = True):
        holder[0], metrics = compiled(holder[0], batch)
        if block:
            jax.block_until_ready((holder[0], metrics))
        return metrics
    return run


def pipelined_time(dispatch, wait, steps: int) -> float:
    """Seconds per step when `steps` steps are dispatched back to back and waited for once at the end, as a
    training loop that reads its metrics only now and then runs (the host prepares the next step while the device
    computes). `dispatch()` starts one step and returns something `wait` blocks on."""
    start = time.perf_counter()
    for _ in range(steps):
        last = dispatch()
    wait(last)
    return (time.perf_counter() - start) / steps


def torch_model(config_name: str, weights: str, device: str = 'cpu'):
    """(config, k-diffusion inner model, its Karras denoiser wrapper) with the weights of `weights`, on `device`."""
    import numpy as np
    import torch
    from kdiff_jax.config import to_kdiffusion_dict
    from tests.oracle import import_k_diffusion
    K = import_k_diffusion()
    config = load_bench_config(config_name)
    kd = to_kdiffusion_dict(config)
    inner = K.config.make_model(kd)
    with np.load(weights) as f:
        inner.load_state_dict({k: torch.from_numpy(f[k]) for k in f.files}, strict=True)
    inner = inner.to(device)
    return config, inner, K.config.make_denoiser_wrapper(kd)(inner), K


def jax_matmul_ceiling(gpu: bool = False, repeats: int = 5) -> float:
    """GFLOP/s of one square matmul: fp32 2048² on the CPU, bf16 8192² on a GPU."""
    import jax
    import jax.numpy as jnp
    n, dtype = (8192, jnp.bfloat16) if gpu else (2048, jnp.float32)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t, _ = median_time(lambda: f(a).block_until_ready(), repeats)
    return 2 * n ** 3 / t / 1e9


def torch_matmul_ceiling(gpu: bool = False, repeats: int = 5) -> float:
    """As `jax_matmul_ceiling`, in PyTorch."""
    import torch
    n, dtype, device = (8192, torch.bfloat16, 'cuda') if gpu else (2048, torch.float32, 'cpu')
    a = torch.randn(n, n, dtype=dtype, device=device)

    def mm():
        a @ a
        torch_sync(gpu)
    mm()
    t, _ = median_time(mm, repeats)
    return 2 * n ** 3 / t / 1e9


# ---------------------------------------------------------------------------------------------------- GPU

# Dense bf16 tensor-core peak in TFLOP/s (no sparsity), from NVIDIA's data sheets, by the name the device reports;
# MFU = a step's model FLOPs / its time / this. The more specific names come first.
BF16_PEAK_TFLOPS = (('H100 PCIe', 756.), ('H100 NVL', 835.), ('H100', 989.), ('H200', 989.), ('A100', 312.))


def bf16_peak_tflops(device_name: str) -> float:
    """The data-sheet bf16 peak of `device_name`, or nan when the card is not in the table."""
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in device_name), float('nan'))


def add_device_args(parser):
    """The --gpu and --dtype options of the scripts that run on a GPU too."""
    parser.add_argument('--gpu', action='store_true', help='run both sides on the GPU')
    parser.add_argument('--dtype', choices=('float32', 'bfloat16'),
                        help='compute dtype (default: bfloat16 on a GPU, else float32)')


def run_dtype(args) -> str:
    """The compute dtype of a run: --dtype, else bfloat16 on a GPU and float32 on the CPU."""
    return args.dtype or ('bfloat16' if args.gpu else 'float32')


def device_label(args) -> str:
    """', <dtype>[ on the GPU]', for a script's title."""
    return f', {run_dtype(args)}' + (' on the GPU' if args.gpu else '')


def jax_gpu_memory(gpu: bool) -> dict:
    """On a GPU, this process's JAX device: its name and the allocator's peak bytes in use, in MiB ({} on the CPU)."""
    if not gpu:
        return {}
    import jax
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    return dict(device=device.device_kind, gpu_peak_mb=stats.get('peak_bytes_in_use', float('nan')) / 2 ** 20)


def torch_gpu_memory(gpu: bool) -> dict:
    """As `jax_gpu_memory`, for PyTorch's CUDA caching allocator."""
    if not gpu:
        return {}
    import torch
    return dict(device=torch.cuda.get_device_name(), gpu_peak_mb=torch.cuda.max_memory_allocated() / 2 ** 20)


def torch_sync(gpu: bool):
    """Wait for queued CUDA work (PyTorch returns before the GPU is done); nothing on the CPU."""
    if gpu:
        import torch
        torch.cuda.synchronize()


def torch_precision(spec: dict):
    """The PyTorch side's precision, as k-diffusion's train.py sets it: on a GPU TF32 for matmuls and cuDNN; a bf16
    autocast region when spec['dtype'] is bfloat16 (on the CPU too). Returns the autocast context."""
    import torch
    if spec['gpu']:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.autocast('cuda' if spec['gpu'] else 'cpu', dtype=torch.bfloat16, enabled=spec['dtype'] == 'bfloat16')


# ---------------------------------------------------------------------------------------------------- HLO text

def xla_options(options: dict[str, str]) -> dict:
    """XLA options given as text (OPTION=VALUE on a command line) as `jax.jit(compiler_options=...)` takes them:
    'true' and 'false' as booleans (XLA refuses the strings for its flags), everything else as given."""
    return {k: {'true': True, 'false': False}.get(v.strip().lower(), v) for k, v in options.items()}


def hlo_computations(hlo_text: str) -> dict[str, list[str]]:
    """The computations of an HLO module's text (`compiled.as_text()`): name → its instruction lines."""
    computations, current = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line.strip())
        if head and ('->' in line or line.startswith('ENTRY')):
            current = computations.setdefault(head.group(1), [])
        elif current is not None:
            current.append(line)
    return computations


# ---------------------------------------------------------------------------------------------------- reporting

def cpu_description(cpuinfo: str | None = None) -> str:
    """'<model name> (family F, model M; <vector ISA>)' from /proc/cpuinfo, e.g. 'AMD EPYC (family 25, model 1;
    AVX2, no AVX-512)'. VMs of one machine kind report the same model name on CPUs whose vector units differ (an
    AMD EPYC with and without AVX-512), and the tables depend on it."""
    if cpuinfo is None:
        try:
            cpuinfo = Path('/proc/cpuinfo').read_text()
        except OSError:
            return platform.processor() or platform.machine()
    first = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(':')
        if sep and key.strip() not in first:
            first[key.strip()] = value.strip()
    flags = set(first.get('flags', '').split())
    if 'avx512f' in flags:
        isa = 'AVX-512' + (', AMX' if 'amx_tile' in flags else '')
    elif 'avx2' in flags:
        isa = 'AVX2, no AVX-512'
    else:
        isa = 'no AVX2'
    name = first.get('model name') or platform.processor() or platform.machine()
    if 'cpu family' in first and 'model' in first:
        return f'{name} (family {first["cpu family"]}, model {first["model"]}; {isa})'
    return f'{name} ({isa})'


def machine_header(title: str) -> str:
    import importlib.metadata as md

    def v(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return '?'
    return (f'# {title}\n\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · {cpu_description()}, {os.cpu_count()} '
            f'cores · jax {v("jax")}, jaxlib {v("jaxlib")}, flax {v("flax")}, torch {v("torch")}, '
            f'k-diffusion {v("k-diffusion")} · XLA_FLAGS={os.environ.get("XLA_FLAGS", "") or "(none)"} · '
            f'{malloc_line()}')


def temp_dir() -> Path:
    """A fresh scratch directory for the run's inputs (converted weights, batches, noise) and its workers' outputs,
    removed when this process exits: cars128's weights alone are 190 MB, and each run makes a new one."""
    path = Path(tempfile.mkdtemp(prefix='kdiff_bench_'))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def begin(title: str, max_load: float) -> Path:
    """The start of every benchmark: wait for a quiet machine, print the header and the load; a fresh temp dir."""
    load0 = wait_for_quiet(max_load)
    tmp = temp_dir()
    print(machine_header(title))
    print(f'1-min load at start: {load0:.2f}\n')
    return tmp


def rel_err(a, b) -> float:
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
