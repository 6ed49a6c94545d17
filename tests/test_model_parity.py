"""The image_v1 network and the Karras denoisers equal k-diffusion 0.0.15 on the same random weights (fp32, CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from kdiff_jax.factory import make_denoiser, make_model
from kdiff_jax.interop import load_state_dict, model_to_state_dict
from kdiff_jax.models.layers import AdaGN, dropout2d, group_norm, modulated_group_norm
from tests.parity import SIGMAS, K, make_pair, nchw, nhwc, rel_err, small_config

TOL = 1e-5

CASES = {
    'cars_like_skip1_attn': small_config(),
    'grown_skip0': small_config(skip_stages=0),
    'has_variance': small_config(has_variance=True),
    'patch_size_2': small_config(patch_size=2, input_size=[32, 32]),
    'unet_and_mapping_cond': small_config(unet_cond_dim=2, mapping_cond_dim=5),
    'cross_attention': small_config(cross_cond_dim=24, cross_attn_depths=[False, True, True]),
    'no_augment_wrapper_1ch': small_config(augment_wrapper=False, input_channels=1, self_attn_depths=[True] * 3),
}


def _inputs(config, seed=0):
    rng = np.random.default_rng(seed)
    m = config.model
    n = len(SIGMAS)
    x = rng.standard_normal((n, *m.input_size, m.input_channels)).astype(np.float32) * (0.5 + SIGMAS[:, None, None, None])
    kwargs_np, torch_kwargs = {}, {}
    if m.augment_wrapper:
        kwargs_np['aug_cond'] = rng.standard_normal((n, 9)).astype(np.float32) * 0.3
    if m.mapping_cond_dim:
        kwargs_np['mapping_cond'] = rng.standard_normal((n, m.mapping_cond_dim)).astype(np.float32)
    if m.unet_cond_dim:
        kwargs_np['unet_cond'] = rng.standard_normal((n, *m.input_size, m.unet_cond_dim)).astype(np.float32)
    if m.cross_cond_dim:
        kwargs_np['cross_cond'] = rng.standard_normal((n, 7, m.cross_cond_dim)).astype(np.float32)
        padding = np.zeros((n, 7), np.float32)
        padding[:, 5:] = 1  # the last two tokens are padding
        kwargs_np['cross_cond_padding'] = padding
    for k, v in kwargs_np.items():
        torch_kwargs[k] = nchw(v) if k == 'unet_cond' else torch.from_numpy(v)
    return x, kwargs_np, torch_kwargs


@pytest.mark.parametrize('name', list(CASES))
def test_denoiser_matches_k_diffusion(name):
    config = CASES[name]
    torch_denoiser, denoiser = make_pair(config)
    x, kwargs, torch_kwargs = _inputs(config)
    with torch.no_grad():
        ref_d = nhwc(torch_denoiser(nchw(x), torch.from_numpy(SIGMAS), **torch_kwargs))
        ref_f = torch_denoiser.inner_model(nchw(x), torch.from_numpy(SIGMAS), **torch_kwargs)
    jkwargs = {k: jnp.asarray(v) for k, v in kwargs.items()}
    ours_d = denoiser(jnp.asarray(x), jnp.asarray(SIGMAS), **jkwargs)
    ours_f = denoiser.inner_model(jnp.asarray(x), jnp.asarray(SIGMAS), **jkwargs)
    assert ours_d.shape == ref_d.shape
    assert rel_err(ours_d, ref_d) <= TOL
    assert rel_err(ours_f, nhwc(ref_f)) <= TOL  # the raw network too, not only the c_skip-dominated output
    for i in range(len(SIGMAS)):  # every σ on its own, from 0.01 to 80
        assert rel_err(ours_d[i], ref_d[i]) <= TOL


def test_channels_first_images_are_refused_and_a_scalar_sigma_applies_to_all():
    """NCHW images (PyTorch's layout) get an error that names the layout, not a shape error deep inside a matmul;
    a 0-d σ is every image's σ, as k-diffusion takes it."""
    config = CASES[next(iter(CASES))]
    _, denoiser = make_pair(config)
    x, _, _ = _inputs(config)
    with pytest.raises(ValueError, match=r'NHWC.*channels first'):
        denoiser(jnp.asarray(nchw(x).numpy()), jnp.ones((len(x),)))
    sigma = float(SIGMAS[1])
    np.testing.assert_array_equal(denoiser(jnp.asarray(x), jnp.float32(sigma)),
                                  denoiser(jnp.asarray(x), jnp.full((len(x),), sigma, jnp.float32)))


def test_log_variance_matches_k_diffusion():
    config = CASES['has_variance']
    torch_denoiser, denoiser = make_pair(config, seed=3)
    x, kwargs, torch_kwargs = _inputs(config, seed=3)
    with torch.no_grad():
        ref_out, ref_logvar = torch_denoiser.inner_model(nchw(x), torch.from_numpy(SIGMAS), return_variance=True,
                                                         **torch_kwargs)
    out, logvar = denoiser.inner_model(jnp.asarray(x), jnp.asarray(SIGMAS), return_variance=True,
                                       **{k: jnp.asarray(v) for k, v in kwargs.items()})
    assert logvar.shape == (len(SIGMAS),)
    assert rel_err(logvar, ref_logvar.numpy()) <= TOL
    assert rel_err(out, nhwc(ref_out)) <= TOL


@pytest.mark.parametrize('name', ['cars_like_skip1_attn', 'has_variance', 'simple_loss'])
def test_loss_matches_k_diffusion(name):
    config = small_config(loss_config='simple') if name == 'simple_loss' else CASES[name]
    torch_denoiser, denoiser = make_pair(config, seed=1)
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-1, 1, (len(SIGMAS), *config.model.input_size, 3)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    with torch.no_grad():
        ref = torch_denoiser.loss(nchw(x0), nchw(noise), torch.from_numpy(SIGMAS)).numpy()
    ours = denoiser.loss(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(SIGMAS))
    assert type(denoiser).__name__ == type(torch_denoiser).__name__
    assert ours.shape == (len(SIGMAS),)
    assert rel_err(ours, ref) <= TOL


def test_bfloat16_compute_stays_close_to_float32():
    config = small_config()
    _, denoiser32 = make_pair(config)
    config16 = small_config()
    config16.model.dtype = 'bfloat16'
    model16 = make_model(config16, initialize=False)
    load_state_dict(model16, model_to_state_dict(denoiser32.inner_model))
    x, kwargs, _ = _inputs(config)
    sig = jnp.asarray(SIGMAS)
    out16 = make_denoiser(config16, model16).inner_model(jnp.asarray(x), sig)
    out32 = denoiser32.inner_model(jnp.asarray(x), sig)
    assert out16.dtype == jnp.float32  # the output (and preconditioning) stay float32
    assert model16.inner_model.proj_in.kernel.dtype == jnp.float32  # parameters stay float32
    assert 1e-4 < rel_err(out16, out32) < 5e-2  # bf16 really computed, and close


def test_dropout2d_zeroes_whole_channels_in_training_mode():
    layer = dropout2d(0.5, nnx.Rngs(dropout=0))
    x = jnp.ones((4, 8, 8, 64))
    y = np.asarray(layer(x))
    per_channel = y.transpose(0, 3, 1, 2).reshape(4, 64, -1)
    assert set(np.unique(per_channel)) == {0.0, 2.0}  # survivors scaled by 1/(1-p)
    assert (per_channel.min(-1) == per_channel.max(-1)).all()  # each channel all dropped or all kept
    layer.eval()
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(x))


def test_model_dropout_active_only_in_training_mode():
    config = small_config(dropout_rate=0.3)
    _, denoiser = make_pair(config)
    x, _, _ = _inputs(config)
    args = (jnp.asarray(x), jnp.asarray(SIGMAS))
    eval_out = denoiser(*args)
    np.testing.assert_array_equal(np.asarray(denoiser(*args)), np.asarray(eval_out))
    denoiser.train()
    a, b = denoiser(*args), denoiser(*args)
    assert rel_err(a, eval_out) > 1e-4 and rel_err(a, b) > 1e-4


def _modulated_gn_case(shape=(3, 8, 6, 32), groups=8, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2 + rng.standard_normal(shape[-1]) * 3).astype(np.float32)  # group means ≠ 0
    scale, shift = (rng.standard_normal((2, shape[0], shape[-1])) * 0.3).astype(np.float32)
    dz = rng.standard_normal(shape).astype(np.float32)
    return x, scale, shift, dz, groups


def test_modulated_group_norm_gradient_matches_torch_autograd():
    """The hand-written VJP of AdaGN's GN(x)·(1 + scale) + shift against PyTorch autograd of F.group_norm."""
    x, scale, shift, dz, g = _modulated_gn_case()
    z, vjp = jax.vjp(lambda *a: modulated_group_norm(*a, g, 1e-5), *map(jnp.asarray, (x, scale, shift)))
    ours = vjp(jnp.asarray(dz))
    tx, ts, tb = (a.requires_grad_() for a in (nchw(x), torch.from_numpy(scale), torch.from_numpy(shift)))
    ref = torch.nn.functional.group_norm(tx, g, eps=1e-5) * (1 + ts[:, :, None, None]) + tb[:, :, None, None]
    ref.backward(nchw(dz))
    assert rel_err(z, nhwc(ref.detach())) <= TOL
    for got, want in zip(ours, (nhwc(tx.grad), ts.grad.numpy(), tb.grad.numpy())):
        assert got.shape == want.shape
        assert rel_err(got, want) <= TOL


def test_modulated_group_norm_bfloat16_gradient_matches_autodiff():
    """In bf16 (statistics and gradient math in fp32, x and ∂x in bf16) the VJP equals autodiff of the same forward."""
    x, scale, shift, dz, g = _modulated_gn_case(seed=1)
    x16, dz16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(dz, jnp.bfloat16)
    plain = lambda x, s, b: (group_norm(x, g, 1e-5) * (1 + s[:, None, None]) + b[:, None, None]).astype(x.dtype)
    fused = lambda x, s, b: modulated_group_norm(x, s, b, g, 1e-5)
    (z_ref, vjp_ref), (z, vjp) = (jax.vjp(f, x16, jnp.asarray(scale), jnp.asarray(shift)) for f in (plain, fused))
    assert z.dtype == jnp.bfloat16  # the two forwards differ only in fp32 summation order, then round to bf16
    assert rel_err(np.asarray(z, np.float32), np.asarray(z_ref, np.float32)) <= 4e-3
    for got, want in zip(vjp(dz16), vjp_ref(dz16)):
        assert got.dtype == want.dtype
        assert rel_err(np.asarray(got, np.float32), np.asarray(want, np.float32)) <= 1e-2


def test_adagn_training_and_eval_mode_agree_and_eval_mode_has_forward_mode():
    """AdaGN runs `modulated_group_norm` (reverse mode only) in training mode and plain ops in eval mode: both give
    the same output and gradients, and eval mode's JVP (the likelihood's) is the transpose of training mode's VJP."""
    x, _, _, dz, g = _modulated_gn_case(seed=2)
    rng = np.random.default_rng(2)
    cond = {'cond': jnp.asarray(rng.standard_normal((x.shape[0], 16)) * 5, jnp.float32)}  # scales and shifts ≠ 0
    x, dz, v = jnp.asarray(x), jnp.asarray(dz), jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    layer = AdaGN(16, x.shape[-1], g, rngs=nnx.Rngs(0))

    def vjp_in(mode):
        getattr(layer, mode)()
        graphdef, params = nnx.split(layer)
        z, vjp = jax.vjp(lambda x, p: nnx.merge(graphdef, p)(x, cond), x, params)
        return z, *jax.tree.leaves(vjp(dz))
    trained, evaluated = vjp_in('train'), vjp_in('eval')
    assert len(trained) == len(evaluated) == 4  # z, ∂x, and the mapper's kernel and bias
    for a, b in zip(trained, evaluated):
        assert rel_err(a, b) <= 1e-6
    layer.eval()
    _, jv = jax.jvp(lambda x: layer(x, cond), (x,), (v,))
    assert float(jnp.vdot(dz, jv)) == pytest.approx(float(jnp.vdot(trained[1], v)), rel=1e-5)


@pytest.mark.parametrize('layer', ['Downsample2d', 'Upsample2d'])
def test_resampling_and_its_gradient_match_k_diffusion(layer):
    """Downsample2d (two 1-D passes) and Upsample2d (polyphase), forward and input gradient, against k-diffusion's
    layers (a conv2d / conv_transpose2d with the filter on the diagonal) under torch autograd; odd heights included."""
    from kdiff_jax.models import layers
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 12, 16, 5) if layer == 'Upsample2d' else (2, 13, 16, 5)).astype(np.float32)
    ours_layer = getattr(layers, layer)()
    out, vjp = jax.vjp(ours_layer, jnp.asarray(x))
    dy = rng.standard_normal(out.shape).astype(np.float32)
    (dx,) = vjp(jnp.asarray(dy))
    tx = nchw(x).requires_grad_()
    ref = getattr(K.layers, layer)()(tx)
    ref.backward(nchw(dy))
    assert rel_err(out, nhwc(ref.detach())) <= TOL
    assert rel_err(dx, nhwc(tx.grad)) <= TOL
