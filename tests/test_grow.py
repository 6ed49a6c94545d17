"""Growing a model (skip_stages 1 → 0, patch_size 2 → 1) gives what k-diffusion's --grow gives."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kdiff_jax.config import to_kdiffusion_dict
from kdiff_jax.factory import make_model
from kdiff_jax.interop import load_state_dict, model_to_state_dict
from kdiff_jax.training.grow import grow_model
from tests.parity import K, SIGMAS, nchw, nhwc, perturb_, rel_err, small_config, torch_state_dict_np


@pytest.mark.parametrize('old,new', [(dict(skip_stages=1), dict(skip_stages=0)),
                                     (dict(patch_size=2, input_size=[16, 16]), dict(patch_size=1))],
                         ids=['skip_stages', 'patch_size'])
def test_grow_matches_k_diffusion(old, new):
    old_config, new_config = small_config(**old), small_config(**new)
    old_torch = perturb_(K.config.make_model(to_kdiffusion_dict(old_config)), seed=2).eval()
    old_model = make_model(old_config, initialize=False)
    load_state_dict(old_model, torch_state_dict_np(old_torch))
    ours = grow_model(old_model, old_config, new_config)
    old_sd = torch_state_dict_np(old_torch)

    # k-diffusion's --grow: reshape the old model in place, then load it into a model of the new config
    if old_config.model.skip_stages != new_config.model.skip_stages:
        old_torch.set_skip_stages(new_config.model.skip_stages)
    if old_config.model.patch_size != new_config.model.patch_size:
        old_torch.set_patch_size(new_config.model.patch_size)
    grown_torch = K.config.make_model(to_kdiffusion_dict(new_config)).eval()
    grown_torch.load_state_dict(old_torch.state_dict())

    ours_sd, ref_sd = model_to_state_dict(ours), torch_state_dict_np(grown_torch)
    assert ours_sd.keys() == ref_sd.keys()
    for key, value in ref_sd.items():
        assert ours_sd[key].shape == value.shape
        if '.proj_in.' in key:  # freshly (randomly) initialised on both sides: not the old weights
            assert old_sd[key].shape != value.shape or not np.array_equal(ours_sd[key], old_sd[key])
            continue
        np.testing.assert_array_equal(ours_sd[key], value, err_msg=key)
    assert not ours_sd['inner_model.proj_out.weight'].any() and not ours_sd['inner_model.proj_out.bias'].any()

    # with the same proj_in and a non-zero proj_out, the two grown networks compute the same function
    with torch.no_grad():
        grown_torch.inner_model.proj_out.weight.normal_(0, 0.05)
    load_state_dict(ours, torch_state_dict_np(grown_torch))
    x = np.random.default_rng(0).standard_normal((len(SIGMAS), *new_config.model.input_size, 3)).astype(np.float32)
    with torch.no_grad():
        ref = nhwc(grown_torch(nchw(x), torch.from_numpy(SIGMAS)))
    assert rel_err(ours(jnp.asarray(x), jnp.asarray(SIGMAS)), ref) <= 1e-5


def test_grow_rejects_other_architecture_changes():
    with pytest.raises(ValueError, match='only skip_stages and patch_size may differ'):
        grow_model(make_model(small_config(), initialize=False), small_config(), small_config(channels=[32, 48, 64]))
