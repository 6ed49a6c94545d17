"""The training loop behind train.py: set-up (fresh, resumed, continued from PyTorch, grown), steps, demo grids,
metrics, checkpoints, clean shutdown on SIGTERM/SIGINT.

A run lives in `<out_dir>/<name>/`: `checkpoints/` (orbax, keep-N), `metrics.csv`, `tb/` (TensorBoard), and
`demo_<step>.png` grids of EMA samples (dpmpp_2m, 50 Karras steps, the same seeds every time). With
--evaluate-every, FID and KID of EMA samples against the un-augmented reals (evaluation/evaluator.py) go to the same
metrics; with --gns, the gradient noise scale (gns.py) is a metric of every logged step.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from ..factory import count_params, denoiser_class, make_model
from ..images import make_grid, save_grid, to_uint8
from .checkpointing import TrainCheckpointer, abstract_like
from .metrics import MetricsLogger
from .optimizer import make_optimizer
from .sharding import data_mesh, jit_train_step, replicate, replicated, shard_batch, xla_owned
from .state import TrainModel, TrainState, create_train_state
from .step import make_train_step

log = logging.getLogger(__name__)

LOG_EVERY = 25
DEMO_SEED = 0
#: A run whose last this many micro-batches were all non-finite (and so skipped) has diverged: it stops.
MAX_CONSECUTIVE_SKIPS = 100


class TrainingDiverged(RuntimeError):
    """Every micro-batch of the last MAX_CONSECUTIVE_SKIPS had a non-finite loss or gradient."""


@dataclass
class TrainOptions:
    name: str = 'model'
    out_dir: str = 'runs'
    batch_size: int = 64
    grad_accum_steps: int = 1
    lr: float | None = None
    resume: str | None = None
    grow: str | None = None
    grow_config: str | None = None
    demo_every: int = 500
    save_every: int = 10000
    evaluate_every: int = -1
    evaluate_n: int = 2000
    sample_n: int = 64
    seed: int = 0
    end_step: int | None = None
    gns: bool = False
    num_workers: int = 0
    keep: int = 3
    inception_weights: str | None = None

    def check(self, device_count: int) -> None:
        """Raise ConfigError for options no run can use, before anything is built."""
        from ..config import ConfigError
        at_least = {'batch_size': 1, 'grad_accum_steps': 1, 'keep': 1, 'sample_n': 1, 'num_workers': 0}
        if self.evaluate_every > 0:
            at_least['evaluate_n'] = 2
        for name, lowest in at_least.items():
            if getattr(self, name) < lowest:
                raise ConfigError(f'--{name.replace("_", "-")} must be >= {lowest}, got {getattr(self, name)}')
        if self.end_step is not None and self.end_step < 0:
            raise ConfigError(f'--end-step must be >= 0, got {self.end_step}')
        if self.batch_size % device_count:
            raise ConfigError(f'--batch-size {self.batch_size} must be divisible by the {device_count} devices')
        gns_groups = max(device_count, 2)
        if self.gns and self.batch_size % gns_groups:
            raise ConfigError(f'--gns: --batch-size {self.batch_size} must split into {gns_groups} equal groups')
        if self.grow and not self.grow_config:
            raise ConfigError('--grow requires --grow-config (the config of the model to grow from)')


class StopRequested:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then it saves and exits cleanly)."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _load_grow_source(opts: TrainOptions, config):
    from ..config import load_config
    from .grow import grow_model
    old_config = load_config(opts.grow_config)
    path = Path(opts.grow)
    from ..checkpoint import is_model_checkpoint
    if is_model_checkpoint(path):  # a converted model checkpoint
        from ..checkpoint import load_model
        old_model = load_model(path, old_config)
    elif path.is_dir():  # a kdiff_jax training run (or its checkpoints/): its EMA weights
        from .checkpointing import load_ema_model
        old_model, _ = load_ema_model(path, config=old_config)
    else:  # a PyTorch checkpoint: its model_ema
        from ..interop import model_from_torch_checkpoint
        old_model = model_from_torch_checkpoint(path, old_config, which='model_ema')
    return grow_model(old_model, old_config, config, seed=opts.seed)


def initial_state(opts: TrainOptions, config, tx, checkpointer: TrainCheckpointer, mesh):
    """(TrainModel, TrainState, data iterator state or None, description of where the state came from)."""
    latest = checkpointer.latest_step()
    train_model, state = create_train_state(make_model(config, seed=opts.seed, initialize=False), tx, opts.seed)
    target = abstract_like(state, replicated(mesh))  # the structure to restore into
    if latest is not None:  # re-running a command resumes the run itself, whatever --resume/--grow it started from
        restored, data_state = checkpointer.restore(target)
        started = f' (its own checkpoints, not --resume {opts.resume})' if opts.resume else ''
        return (train_model, xla_owned(restored), data_state,
                f'resumed from {checkpointer.directory} step {latest}{started}')
    if opts.resume:
        from ..interop import CheckpointError
        path = Path(opts.resume)
        if path.is_dir():  # a kdiff_jax run directory or its checkpoints/
            other = TrainCheckpointer(path / 'checkpoints' if (path / 'checkpoints').is_dir() else path,
                                      asynchronous=False)
            if other.latest_step() is None:
                raise CheckpointError(f'--resume {path}: no complete kdiff_jax training checkpoint in '
                                      f'{other.directory}')
            restored, data_state = other.restore(target)
            return train_model, xla_owned(restored), data_state, f'resumed from {path} step {other.latest_step()}'
        from ..interop import read_checkpoint_file
        from ..interop.torch_train import is_torch_train_checkpoint, train_state_from_torch
        ckpt = read_checkpoint_file(path)
        if not is_torch_train_checkpoint(ckpt):
            raise CheckpointError(f'--resume {path}: not a k-diffusion train.py checkpoint (needs model, model_ema, '
                                  'opt, step) nor a kdiff_jax training run or checkpoint directory')
        train_model, state = train_state_from_torch(ckpt, config, tx, opts.seed, source=str(path))
        return train_model, replicate(state, mesh), None, f'continued PyTorch run {path} at step {int(state.step)}'
    if opts.grow:
        train_model, state = create_train_state(_load_grow_source(opts, config), tx, opts.seed)
        return train_model, replicate(state, mesh), None, f'grown from {opts.grow}'
    train_model, state = create_train_state(make_model(config, seed=opts.seed), tx, opts.seed)
    return train_model, replicate(state, mesh), None, 'fresh start'


def ema_denoiser(config, train_model: TrainModel, state: TrainState):
    """The denoiser around the EMA weights (eval mode): what demo grids and FID/KID sample from."""
    return denoiser_class(config)(train_model.merge(state.ema_params, state.buffers, train=False),
                                  config['model']['sigma_data'])


def demo_samples(config, train_model: TrainModel, state: TrainState, n: int, mesh) -> np.ndarray:
    """n EMA samples (dpmpp_2m, 50 Karras steps) with fixed seeds, so grids are comparable across a run."""
    from ..generate import sample_batches
    n_padded = -(-n // mesh.size) * mesh.size
    return np.asarray(next(sample_batches(ema_denoiser(config, train_model, state), config, n_padded, mesh,
                                          DEMO_SEED)))[:n]


def train(opts: TrainOptions, config) -> Path:
    """Train until `opts.end_step` (or forever / until SIGTERM/SIGINT); returns the run directory."""
    from ..data.pipeline import make_train_iterator

    run_dir = Path(opts.out_dir) / opts.name
    is_main = jax.process_index() == 0
    mesh = data_mesh()
    opts.check(mesh.size)
    gns_groups = max(mesh.size, 2) if opts.gns else 0  # per-device gradients (two halves on a single device)
    extractor = None
    if opts.evaluate_every > 0:  # fail before anything else if the Inception weights are missing
        from ..evaluation.inception import FIDFeatureExtractor
        extractor = FIDFeatureExtractor.load(opts.inception_weights)
    tx = make_optimizer(config, lr=opts.lr, grad_accum_steps=opts.grad_accum_steps)
    checkpointer = TrainCheckpointer(run_dir / 'checkpoints', keep=opts.keep)
    train_model, state, data_state, origin = initial_state(opts, config, tx, checkpointer, mesh)
    step_fn = jit_train_step(make_train_step(config, train_model, tx, lr=opts.lr, gns_groups=gns_groups), mesh,
                             state)
    local_batch = opts.batch_size // jax.process_count()
    data = make_train_iterator(config, batch_size=local_batch, seed=opts.seed, shard_index=jax.process_index(),
                               shard_count=jax.process_count(), num_workers=opts.num_workers)
    if data_state is not None:
        data.set_state(data_state)
    metrics_log = MetricsLogger(run_dir, enabled=is_main)
    step = int(state.step)
    if is_main:
        params = count_params(train_model.merge(state.params, state.buffers, train=False))
        tqdm.write(f'{origin}; {params:,} parameters; {mesh.size} device(s), {jax.process_count()} process(es); '
                   f'global batch {opts.batch_size} x {opts.grad_accum_steps} accumulation step(s)')

    def save(force=False):
        checkpointer.save(step, state, data.get_state(), config, force=force)

    evaluator = None
    if extractor is not None:
        from ..evaluation.evaluator import FeatureSet, TrainingEvaluator, dataset_images
        reals = dataset_images(config, opts.evaluate_n, seed=opts.seed)
        evaluator = TrainingEvaluator(FeatureSet(extractor, mesh, opts.batch_size), reals, config, opts.evaluate_n)

    def evaluate():
        values = evaluator(ema_denoiser(config, train_model, state), step)
        metrics_log.scalars(step, values)
        if is_main:
            tqdm.write(f"step {step}: FID {values['fid']:.4f}, KID {values['kid']:.6f} "
                       f"({opts.evaluate_n} EMA samples vs {opts.evaluate_n} reals)")

    def demo():
        images = demo_samples(config, train_model, state, opts.sample_n, mesh)
        if is_main:
            path = save_grid(images, run_dir / f'demo_{step:08}.png')
            metrics_log.image(step, 'demo', make_grid(to_uint8(images)))
            tqdm.write(f'demo grid: {path}')

    reason, diverged = 'end step reached', None
    with StopRequested() as stop, tqdm(initial=step, total=opts.end_step, disable=not is_main,
                                       dynamic_ncols=True) as bar:
        last_time, last_step = time.perf_counter(), step
        last_skipped, consecutive_skips = int(state.skipped), 0
        try:
            while opts.end_step is None or step < opts.end_step:
                batch = next(data)
                state, metrics = step_fn(state, shard_batch({'image': batch['image'],
                                                             'aug_cond': batch['aug_cond']}, mesh))
                step += 1
                bar.update(1)
                if step % LOG_EVERY == 0 or step == 1:
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    values['images_per_s'] = (step - last_step) * opts.batch_size / max(now - last_time, 1e-9)
                    values['skipped_images'] = float(getattr(data, 'skipped', 0))
                    # micro-batches skipped since the last log: all of them extends the run of skips, else it ends
                    all_skipped = int(values['skipped']) - last_skipped == step - last_step
                    consecutive_skips = consecutive_skips + step - last_step if all_skipped else 0
                    last_time, last_step, last_skipped = now, step, int(values['skipped'])
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                                    **({'gns': f"{values['gns']:.4g}"} if 'gns' in values else {}))
                    metrics_log.scalars(step, values)
                    if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                        reason = f'diverged: the last {consecutive_skips} micro-batches were all non-finite'
                        diverged = TrainingDiverged(
                            f'the run diverged: the loss or gradient of each of the last {consecutive_skips} '
                            f'micro-batches (steps {step - consecutive_skips + 1}-{step}) was NaN or infinite, so '
                            'none of them changed the model. The latest checkpoints hold the weights that diverged: '
                            'start again, or from a checkpoint saved before the divergence, with a lower '
                            'learning rate')
                        break
                if opts.demo_every > 0 and step % opts.demo_every == 0:
                    demo()
                if evaluator is not None and step % opts.evaluate_every == 0:
                    evaluate()
                if opts.save_every > 0 and step % opts.save_every == 0:
                    save()
                if stop.signal:
                    reason = f'{stop.signal} received'
                    break
        except Exception:  # keep the steps done: save the state of the last completed step, then fail as before
            if jax.process_count() == 1:  # (with several processes, a save would wait for the others)
                _save_after_error(save, checkpointer, step)
            raise
    save(force=True)
    checkpointer.close()
    metrics_log.close()
    if is_main:
        tqdm.write(f'stopped at step {step} ({reason}); checkpoint saved')
        print(f'run directory: {run_dir.absolute()} (checkpoints/, metrics.csv, tb/, demo_*.png)')
    if diverged is not None:
        raise diverged
    return run_dir


def _save_after_error(save, checkpointer: TrainCheckpointer, step: int) -> None:
    """Save after an error inside the loop. The state is that of the last completed step unless the error came
    from the step itself, whose donated input state is then gone: that save fails, and the last checkpoint stays."""
    try:
        save(force=True)
        checkpointer.close()
        print(f'training stopped by an error; the state of step {step} was saved', file=sys.stderr)
    except Exception as e:  # noqa: BLE001
        print(f'training stopped by an error; saving the state of step {step} failed too ({e})', file=sys.stderr)
