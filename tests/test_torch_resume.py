"""A PyTorch k-diffusion train.py run continues in kdiff_jax: the next steps equal k-diffusion's own next steps."""

from __future__ import annotations

import jax
import numpy as np
import torch

from kdiff_jax.interop import read_checkpoint_file
from kdiff_jax.interop.torch_train import train_state_from_torch
from kdiff_jax.interop.torch_state import model_to_state_dict
from kdiff_jax.training.optimizer import make_optimizer
from kdiff_jax.training.step import make_loss_and_update
from tests.parity import K, nchw, torch_state_dict_np
from tests.test_train_step import _batches, _torch_setup, tiny_config


def _torch_step(denoiser, ema, opt, sched, ema_sched, batch):
    x0, aug, noise, sigma = batch
    denoiser.loss(nchw(x0), nchw(noise), torch.from_numpy(sigma), aug_cond=torch.from_numpy(aug)).mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    K.utils.ema_update(denoiser.inner_model, ema, ema_sched.get_value())
    ema_sched.step()


def test_resume_pytorch_run_continues_identically(tmp_path):
    config = tiny_config()
    denoiser, ema, opt, sched, ema_sched = _torch_setup(config)
    batches = list(_batches(config, 5))
    for step, batch in enumerate(batches[:3]):
        _torch_step(denoiser, ema, opt, sched, ema_sched, batch)
    torch.save({'model': denoiser.inner_model.state_dict(), 'model_ema': ema.state_dict(),
                'opt': opt.state_dict(), 'sched': sched.state_dict(), 'ema_sched': ema_sched.state_dict(),
                'epoch': 0, 'step': step, 'gns_stats': None}, tmp_path / 'run.pth')

    tx = make_optimizer(config)
    train_model, state = train_state_from_torch(read_checkpoint_file(tmp_path / 'run.pth'), config, tx, seed=0)
    assert int(state.step) == 3 and int(state.ema_updates) == 3 and int(state.opt_state.gradient_step) == 3
    update = jax.jit(make_loss_and_update(config, train_model, tx))
    for batch in batches[3:]:
        _torch_step(denoiser, ema, opt, sched, ema_sched, batch)
        state, _ = update(state, *batch, jax.random.key(0))
    for params, ref in ((state.params, denoiser.inner_model), (state.ema_params, ema)):
        ours = model_to_state_dict(train_model.merge(params, state.buffers, train=False))
        for key, value in torch_state_dict_np(ref).items():
            np.testing.assert_allclose(ours[key], value, rtol=2e-5, atol=1e-7, err_msg=key)
