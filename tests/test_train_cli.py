"""train.py end to end on the bundled digits: outputs, exact resume, device-count change, SIGTERM, SIGKILL mid-save."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from kdiff_jax.config import apply_overrides, load_config
from kdiff_jax.factory import make_model
from kdiff_jax.training.checkpointing import TrainCheckpointer, abstract_like
from kdiff_jax.training.optimizer import make_optimizer
from kdiff_jax.training.sharding import data_mesh, replicated
from kdiff_jax.training.state import create_train_state
from tests.host_devices import host_devices_flags

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--config.model.input_size=[8,8]', '--config.model.depths=[1,1]', '--config.model.channels=[8,16]',
        '--config.model.self_attn_depths=[false,true]', '--config.model.mapping_out=16',
        '--config.model.dropout_rate=0.1']
BASE = ['--config', str(ROOT / 'configs' / 'demo.py'), *TINY, '--batch-size', '8', '--sample-n', '4',
        '--demo-every', '0', '--seed', '3']


def train_cmd(out_dir, name, *extra):
    return [sys.executable, str(ROOT / 'train.py'), *BASE, '--out-dir', str(out_dir), '--name', name, *extra]


def run_train(out_dir, name, *extra, devices=None, succeeds=True):
    env = dict(os.environ)
    if devices:
        env['XLA_FLAGS'] = host_devices_flags(devices)
    result = subprocess.run(train_cmd(out_dir, name, *extra), capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=900)
    if succeeds:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def final_params(run_dir: Path, step: int | None = None, overrides=()) -> dict[str, np.ndarray]:
    config = apply_overrides(load_config(str(ROOT / 'configs' / 'demo.py')), TINY + list(overrides))
    _, state = create_train_state(make_model(config, initialize=False), make_optimizer(config), 0)
    ckpt = TrainCheckpointer(run_dir / 'checkpoints', asynchronous=False)
    restored, _ = ckpt.restore(abstract_like(state, replicated(data_mesh())), step)
    return {'/'.join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(restored.params)} | {
        'ema/' + '/'.join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(restored.ema_params)}


def assert_same_params(a, b, rtol=0., atol=0.):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=atol, err_msg=key)


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
    """An uninterrupted 8-step run, with a demo grid and metrics."""
    out = tmp_path_factory.mktemp('runs')
    result = run_train(out, 'ref', '--end-step', '8', '--save-every', '4', '--demo-every', '4')
    return out / 'ref', result


def test_run_writes_checkpoints_metrics_tensorboard_and_demo_grids(reference_run):
    run_dir, result = reference_run
    assert 'fresh start' in result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(f'run directory: {run_dir.absolute()}')
    assert TrainCheckpointer(run_dir / 'checkpoints', asynchronous=False).manager.all_steps() == [4, 8]
    assert (run_dir / 'demo_00000004.png').exists() and (run_dir / 'demo_00000008.png').exists()
    lines = (run_dir / 'metrics.csv').read_text().splitlines()
    assert {'step', 'loss', 'lr', 'ema_decay', 'images_per_s', 'skipped', 'skipped_images'} <= set(lines[0].split(','))
    assert len(lines) >= 2
    assert list((run_dir / 'tb').glob('events.out.tfevents.*'))


@pytest.fixture(scope='module')
def half_run(tmp_path_factory):
    """The reference run's command stopped at --end-step 4 (saved on exit); each test resumes its own copy."""
    out = tmp_path_factory.mktemp('runs')
    run_train(out, 'split', '--end-step', '4', '--save-every', '100')
    return out / 'split'


def test_rerunning_the_same_command_resumes_exactly(reference_run, half_run, tmp_path):
    ref_dir, _ = reference_run
    shutil.copytree(half_run, tmp_path / 'split')
    second = run_train(tmp_path, 'split', '--end-step', '8', '--save-every', '100')
    assert 'resumed from' in second.stdout + second.stderr and 'step 4' in second.stdout + second.stderr
    assert_same_params(final_params(tmp_path / 'split'), final_params(ref_dir))


def test_resume_on_a_different_device_count(reference_run, half_run, tmp_path):
    """Steps 1-4 on 1 device, 5-8 on 2 (the state re-sharded on restore) end where the 1-device run ends."""
    ref_dir, _ = reference_run
    shutil.copytree(half_run, tmp_path / 'split')
    second = run_train(tmp_path, 'split', '--end-step', '8', devices=2)
    assert 'resumed from' in second.stdout + second.stderr and '2 device(s)' in second.stdout + second.stderr
    assert_same_params(final_params(tmp_path / 'split'), final_params(ref_dir), rtol=1e-4, atol=1e-6)


def test_resume_from_another_runs_directory(reference_run, half_run, tmp_path):
    """--resume RUN (a run directory, as --grow and sample.py take it) continues that run under a new name, exactly;
    re-running the same command then resumes the new run's own checkpoint, not RUN again."""
    ref_dir, _ = reference_run
    command = ('--resume', half_run, '--save-every', '100')
    result = run_train(tmp_path, 'continued', *command, '--end-step', '6')
    assert f'resumed from {half_run} step 4' in result.stdout + result.stderr
    result = run_train(tmp_path, 'continued', *command, '--end-step', '8')
    assert f'step 6 (its own checkpoints, not --resume {half_run})' in result.stdout + result.stderr
    assert_same_params(final_params(tmp_path / 'continued'), final_params(ref_dir))


def bad_setup(case: str, tmp_path: Path, run: Path) -> tuple[list, str]:
    """(extra train.py arguments, expected message) of a setup that cannot train; `run` is a finished run."""
    if case == 'resume_a_bare_state_dict':
        from safetensors.numpy import save_file
        save_file({'inner_model.proj_in.weight': np.zeros((8, 1, 1, 1), np.float32)}, tmp_path / 'bare.safetensors')
        return ['--resume', tmp_path / 'bare.safetensors'], 'not a k-diffusion train.py checkpoint'
    if case == 'resume_a_directory_without_checkpoints':
        (tmp_path / 'empty').mkdir()
        return ['--resume', tmp_path / 'empty'], 'no complete kdiff_jax training checkpoint in'
    if case == 'resume_a_pytorch_run_of_another_model':
        other = write_torch_train_checkpoint(tmp_path / 'other.pth', ['--config.model.channels=[8,8]'])
        return ['--resume', other], 'does not match the model of the config'
    if case == 'rerun_with_another_model':
        shutil.copytree(run, tmp_path / 'bad')
        return ['--config.model.channels=[8,24]'], 'does not fit the model and optimizer of this config'
    if case == 'unprepared_mnist':
        (tmp_path / 'empty').mkdir()
        return (['--config.dataset.type=mnist', f'--config.dataset.location={tmp_path / "empty"}'],
                "dataset.type 'mnist': no prepared copy")
    assert case == 'keep_none'  # one of the options TrainOptions.check refuses (the next test has them all)
    return ['--keep', '0'], '--keep must be >= 1, got 0'


@pytest.mark.parametrize('case', ['resume_a_bare_state_dict', 'resume_a_directory_without_checkpoints',
                                  'resume_a_pytorch_run_of_another_model', 'rerun_with_another_model',
                                  'unprepared_mnist', 'keep_none'])
def test_a_bad_setup_is_one_clear_error(tmp_path, half_run, case):
    """Exit status 2 and one `error:` message, no traceback, no step taken."""
    extra, message = bad_setup(case, tmp_path, half_run)
    result = run_train(tmp_path, 'bad', *extra, '--end-step', '6', succeeds=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-3000:]
    assert result.stderr.count('error: ') == 1, result.stderr[-3000:]
    if case != 'rerun_with_another_model':  # (there orbax's restore threads print 'Event loop is closed' at exit)
        assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    checkpoints = tmp_path / 'bad' / 'checkpoints'
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == (
        ['4'] if case == 'rerun_with_another_model' else []) if checkpoints.exists() else True


@pytest.mark.parametrize('options,devices,message', [
    (dict(keep=0), 1, '--keep must be >= 1, got 0'),
    (dict(sample_n=0), 1, '--sample-n must be >= 1, got 0'),
    (dict(batch_size=0), 1, '--batch-size must be >= 1, got 0'),
    (dict(grad_accum_steps=0), 1, '--grad-accum-steps must be >= 1, got 0'),
    (dict(end_step=-1), 1, '--end-step must be >= 0, got -1'),
    (dict(evaluate_every=10, evaluate_n=1), 1, '--evaluate-n must be >= 2, got 1'),
    (dict(batch_size=7), 2, '--batch-size 7 must be divisible by the 2 devices'),
    (dict(batch_size=3, gns=True), 1, '--gns: --batch-size 3 must split into 2 equal groups'),
    (dict(grow='runs/old'), 1, '--grow requires --grow-config'),
])
def test_options_no_run_can_use_are_refused(options, devices, message):
    from kdiff_jax.config import ConfigError
    from kdiff_jax.training.loop import TrainOptions
    with pytest.raises(ConfigError, match=message):
        TrainOptions(**options).check(devices)
    TrainOptions().check(devices)  # the defaults are fine


def test_a_diverged_run_stops_with_an_error(tmp_path):
    """A learning rate that sends the weights to infinity: every later micro-batch is skipped, and after 100 such
    steps the run saves and stops with one error instead of skipping forever."""
    result = run_train(tmp_path, 'diverged', '--lr', '1e6', '--end-step', '400', succeeds=False)
    assert result.returncode == 2 and 'error: the run diverged' in result.stderr, result.stderr[-3000:]
    latest = TrainCheckpointer(tmp_path / 'diverged' / 'checkpoints', asynchronous=False).latest_step()
    assert latest is not None and 100 <= latest < 400
    assert f'stopped at step {latest} (diverged' in result.stdout + result.stderr


def test_an_error_inside_the_loop_keeps_the_steps_done(tmp_path, monkeypatch):
    """An error after some steps (here the demo grid's sampling) saves the state of the last completed step before
    the run fails with it."""
    from kdiff_jax.training import loop

    def broken_demo(*args, **kwargs):
        raise RuntimeError('demo sampling failed')
    monkeypatch.setattr(loop, 'demo_samples', broken_demo)
    config = apply_overrides(load_config(str(ROOT / 'configs' / 'demo.py')), TINY)
    options = loop.TrainOptions(name='err', out_dir=str(tmp_path), batch_size=8, sample_n=4, demo_every=3,
                                save_every=100, end_step=10, seed=3)
    with pytest.raises(RuntimeError, match='demo sampling failed'):
        loop.train(options, config)
    assert TrainCheckpointer(tmp_path / 'err' / 'checkpoints', asynchronous=False).latest_step() == 3


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(train_cmd(tmp_path, 'term', '--save-every', '100000'), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 600
    while not (tmp_path / 'term' / 'metrics.csv').exists():  # written after the first step
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert 'SIGTERM received' in out + err
    steps = TrainCheckpointer(tmp_path / 'term' / 'checkpoints', asynchronous=False).manager.all_steps()
    assert len(steps) == 1 and steps[0] >= 1


def test_sigkill_during_a_save_loses_nothing(reference_run, tmp_path):
    """Killed while a checkpoint is being written, the next run resumes from the last complete one and ends where an
    uninterrupted run ends."""
    ref_dir, _ = reference_run
    ckpt_dir = tmp_path / 'kill' / 'checkpoints'
    proc = subprocess.Popen(train_cmd(tmp_path, 'kill', '--save-every', '1', '--end-step', '8'),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    killed_during = None
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        partial = [p.name for p in ckpt_dir.glob('*') if 'tmp' in p.name] if ckpt_dir.exists() else []
        complete = [p for p in ckpt_dir.glob('*') if p.name.isdigit()] if ckpt_dir.exists() else []
        if partial and complete:
            proc.send_signal(signal.SIGKILL)
            killed_during = partial
            break
        time.sleep(0.002)
    proc.wait()
    assert killed_during, 'the run finished before a save could be interrupted'
    assert proc.returncode == -signal.SIGKILL
    last_complete = TrainCheckpointer(ckpt_dir, asynchronous=False).latest_step()
    assert last_complete is not None and last_complete < 8
    resumed = run_train(tmp_path, 'kill', '--save-every', '100', '--end-step', '8')
    assert f'step {last_complete}' in resumed.stdout + resumed.stderr
    assert_same_params(final_params(tmp_path / 'kill', 8), final_params(ref_dir, 8))


def write_torch_train_checkpoint(path: Path, overrides=()) -> Path:
    """A k-diffusion train.py checkpoint at step 41 (weights, EMA, AdamW state after one step) of the TINY demo
    model, or of the model `overrides` make of it."""
    import torch
    from kdiff_jax.config import to_kdiffusion_dict
    from tests.oracle import import_k_diffusion
    K = import_k_diffusion()
    config = apply_overrides(load_config(str(ROOT / 'configs' / 'demo.py')), TINY + list(overrides))
    inner = K.config.make_model(to_kdiffusion_dict(config))
    opt = torch.optim.AdamW(inner.parameters(), lr=1e-3)
    inner(torch.randn(2, 1, 8, 8), torch.ones(2)).square().mean().backward()
    opt.step()
    torch.save({'model': inner.state_dict(), 'model_ema': inner.state_dict(), 'opt': opt.state_dict(),
                'sched': {}, 'ema_sched': {'last_epoch': 1}, 'epoch': 0, 'step': 41, 'gns_stats': None}, path)
    return path


def test_resume_accepts_a_pytorch_train_checkpoint(tmp_path):
    """--resume run.pth: a k-diffusion train.py checkpoint (weights, EMA, AdamW state, step) continues here."""
    write_torch_train_checkpoint(tmp_path / 'run.pth')
    result = run_train(tmp_path, 'from_torch', '--resume', tmp_path / 'run.pth', '--end-step', '44')
    assert 'continued PyTorch run' in result.stdout + result.stderr and 'at step 42' in result.stdout + result.stderr
    assert TrainCheckpointer(tmp_path / 'from_torch' / 'checkpoints', asynchronous=False).latest_step() == 44


def test_grow_from_a_run_through_the_cli(tmp_path):
    """--grow RUN --grow-config OLD: a skip_stages 1 run grown into the skip_stages 0 model, then trained on."""
    import json
    from kdiff_jax.config import config_to_dict
    old = apply_overrides(load_config(str(ROOT / 'configs' / 'demo.py')), TINY + ['--config.model.skip_stages=1'])
    (tmp_path / 'old.json').write_text(json.dumps(config_to_dict(old)))
    # a large learning rate sets the old run's weights ~lr/3 apart from its EMA, far beyond what the grown run's two
    # steps at the default lr can move a weight, so the comparison below tells which of the two the grow started from
    run_train(tmp_path, 'small', '--config.model.skip_stages=1', '--end-step', '2', '--lr', '0.03')
    grown = run_train(tmp_path, 'grown', '--grow', tmp_path / 'small', '--grow-config', tmp_path / 'old.json',
                      '--end-step', '2')
    assert 'grown from' in grown.stdout + grown.stderr
    params = final_params(tmp_path / 'grown')
    old = final_params(tmp_path / 'small', overrides=['--config.model.skip_stages=1'])
    assert params.keys() == old.keys()
    assert max(np.abs(old[key] - old['ema/' + key]).max() for key in old if not key.startswith('ema/')) > 5e-3
    moved_at_most = 2 * 1e-3 * 1.01  # two AdamW steps at lr 1e-3 move each weight by at most ~lr per step
    for key, value in params.items():
        if key.startswith('ema/'):
            continue
        if 'proj_out' in key:  # zeroed by the grow, then two steps
            assert np.abs(value).max() <= moved_at_most, key
        elif 'proj_in' not in key:  # everything else starts from the old run's EMA weights
            assert np.abs(value - old['ema/' + key]).max() <= moved_at_most, key
