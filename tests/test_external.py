"""The external-model wrappers equal k-diffusion 0.0.15's `external.py` on a tiny model built in both frameworks.

The tiny model is F(x, t) = conv1x1(x)·(1 + 0.01·t) + 0.1·x (+ cond), with the same weights in PyTorch (NCHW) and
JAX (NHWC); it serves as an ε-model or a v-model. The DDPM schedule is linear β from 1e-4 to 2e-2 over 1000 steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from kdiff_jax import external
from kdiff_jax.models.layers import Buffer
from tests.oracle import import_k_diffusion
from tests.parity import nchw, nhwc, rel_err

K = import_k_diffusion()

TOL = 1e-5
C = 3
T = 1000
BETAS = np.linspace(1e-4, 2e-2, T, dtype=np.float64)
ALPHAS_CUMPROD = np.cumprod(1 - BETAS).astype(np.float32)  # float32, as CompVis models hold it


# --- the tiny model in both frameworks ----------------------------------------------------------------------------

class TorchTiny(torch.nn.Module):
    def __init__(self, c_out: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(C, c_out, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 0.5)
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=gen) * 0.1)

    def forward(self, x, t, cond=None):
        scale = (1 + 0.01 * t.float())[:, None, None, None]
        out = self.conv(x) * scale + 0.1 * x.repeat(1, self.conv.out_channels // C, 1, 1)
        if cond is not None:
            out = out + cond[:, :, None, None]
        return out


class JaxTiny(nnx.Module):
    def __init__(self, torch_model: TorchTiny):
        c_out = torch_model.conv.out_channels
        self.conv = nnx.Conv(C, c_out, (1, 1), rngs=nnx.Rngs(0))
        self.conv.kernel[...] = jnp.asarray(torch_model.conv.weight.detach().numpy().transpose(2, 3, 1, 0))
        self.conv.bias[...] = jnp.asarray(torch_model.conv.bias.detach().numpy())

    def __call__(self, x, t, cond=None):
        scale = (1 + 0.01 * t.astype(jnp.float32))[:, None, None, None]
        out = self.conv(x) * scale + 0.1 * jnp.tile(x, (1, 1, 1, self.conv.out_features // C))
        if cond is not None:
            out = out + cond[:, None, None, :]
        return out


class TorchCompVis(torch.nn.Module):
    """A latent-diffusion-like object: `apply_model(x, t, cond)` and an `alphas_cumprod` buffer."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.model = TorchTiny(C, seed)
        self.register_buffer('alphas_cumprod', torch.from_numpy(ALPHAS_CUMPROD))

    def apply_model(self, x, t, cond):
        return self.model(x, t, cond=cond)


class JaxCompVis(nnx.Module):
    def __init__(self, torch_model: TorchCompVis):
        self.model = JaxTiny(torch_model.model)
        self.alphas_cumprod = Buffer(jnp.asarray(torch_model.alphas_cumprod.numpy()))

    def apply_model(self, x, t, cond):
        return self.model(x, t, cond=cond)


class Diffusion:
    """Stands in for guided-diffusion's GaussianDiffusion: a float64 NumPy `alphas_cumprod`."""
    alphas_cumprod = np.cumprod(1 - BETAS)


def make_pair(kind: str, quantize: bool = False, seed: int = 0):
    """(k-diffusion wrapper, kdiff_jax wrapper, takes_cond) around the same tiny model."""
    ac_t = torch.from_numpy(ALPHAS_CUMPROD)
    if kind == 'v':
        tm = TorchTiny(C, seed)
        return K.external.VDenoiser(tm), external.VDenoiser(JaxTiny(tm)), False
    if kind == 'eps':
        tm = TorchTiny(C, seed)
        return (K.external.DiscreteEpsDDPMDenoiser(tm, ac_t, quantize),
                external.DiscreteEpsDDPMDenoiser(JaxTiny(tm), ALPHAS_CUMPROD, quantize), False)
    if kind == 'v_ddpm':
        tm = TorchTiny(C, seed)
        return (K.external.DiscreteVDDPMDenoiser(tm, ac_t, quantize),
                external.DiscreteVDDPMDenoiser(JaxTiny(tm), ALPHAS_CUMPROD, quantize), False)
    if kind in ('openai', 'openai_no_learned_sigmas'):
        learned = kind == 'openai'
        tm = TorchTiny(2 * C if learned else C, seed)
        return (K.external.OpenAIDenoiser(tm, Diffusion(), quantize=quantize, has_learned_sigmas=learned),
                external.OpenAIDenoiser(JaxTiny(tm), Diffusion(), quantize=quantize, has_learned_sigmas=learned),
                False)
    if kind == 'compvis':
        tm = TorchCompVis(seed)
        return (K.external.CompVisDenoiser(tm, quantize=quantize),
                external.CompVisDenoiser(JaxCompVis(tm), quantize=quantize), True)
    if kind == 'compvis_v':
        tm = TorchCompVis(seed)
        return (K.external.CompVisVDenoiser(tm, quantize=quantize),
                external.CompVisVDenoiser(JaxCompVis(tm), quantize=quantize), True)
    raise ValueError(kind)


# --- the schedule ---------------------------------------------------------------------------------------------------

def _schedule_pair(quantize=False):
    torch_w, ours, _ = make_pair('eps', quantize)
    return torch_w, ours


def _sigma_probes(table: np.ndarray) -> np.ndarray:
    """Random σ inside and outside the table's range, exact table entries (ends included), σ just either side of
    geometric midpoints, and 0.

    Not the midpoints themselves: there the nearest entry is a tie that the last bit of float32 log decides, and
    XLA's and PyTorch's log round differently on some CPUs (a CI run gave 250 against 251)."""
    rng = np.random.default_rng(1)
    random = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), 24))
    entries = table[[0, 1, 2, 100, 500, 997, 998, 999]]
    low, high = np.log(table[[0, 250, 998]].astype(np.float64)), np.log(table[[1, 251, 999]].astype(np.float64))
    mid = np.exp(np.concatenate([(0.51 * low + 0.49 * high), (0.49 * low + 0.51 * high)]))  # 1% of a gap off
    outside = np.array([table[0] * 0.5, table[-1] * 2, 1e-8, 1e8])
    return np.concatenate([random, entries, mid, outside, [0.]]).astype(np.float32)


def test_schedule_tables_match():
    torch_w, ours = _schedule_pair()
    ref = torch_w.sigmas.numpy()
    assert ours.sigmas.shape == (T,) and ours.sigmas.dtype == jnp.float32
    assert np.max(np.abs(np.asarray(ours.sigmas[...]) / ref - 1)) <= 1e-6
    assert np.max(np.abs(np.asarray(ours.log_sigmas[...]) - torch_w.log_sigmas.numpy())) <= 1e-6
    assert np.isclose(float(ours.sigma_min), float(torch_w.sigma_min), rtol=1e-6)
    assert np.isclose(float(ours.sigma_max), float(torch_w.sigma_max), rtol=1e-6)
    # Independent closed form: σ = √((1 − ᾱ)/ᾱ).
    a = ALPHAS_CUMPROD.astype(np.float64)
    np.testing.assert_allclose(np.asarray(ours.sigmas[...]), np.sqrt((1 - a) / a), rtol=1e-6)


@pytest.mark.parametrize('quantize', [False, True])
def test_sigma_to_t_matches(quantize):
    torch_w, ours = _schedule_pair()
    table = torch_w.sigmas.numpy()
    sigma = _sigma_probes(table)
    ref = torch_w.sigma_to_t(torch.from_numpy(sigma), quantize=quantize).numpy()
    got = np.asarray(jax.jit(lambda s: ours.sigma_to_t(s, quantize))(jnp.asarray(sigma)))
    assert got.shape == sigma.shape
    if quantize:
        np.testing.assert_array_equal(got, ref)
    else:
        # Tables differ by float32 rounding only (ours computed in float64); t is in steps, up to 999.
        np.testing.assert_allclose(got, ref, rtol=0, atol=5e-4)
    # Clamp at the ends, and table entries map to exactly their own step (our own table, our own probes).
    ours_table = np.asarray(ours.sigmas[...])
    idx = np.array([0, 1, 2, 100, 500, 997, 998, 999])
    np.testing.assert_array_equal(np.asarray(ours.sigma_to_t(jnp.asarray(ours_table[idx]), quantize)), idx)
    ends = np.asarray(ours.sigma_to_t(jnp.asarray([1e-8, ours_table[0] * 0.5, ours_table[-1] * 2, 1e8, 0.]),
                                      quantize))
    np.testing.assert_array_equal(ends, [0, 0, T - 1, T - 1, 0])
    # Any shape: a scalar and a 2-D array keep their shapes.
    assert ours.sigma_to_t(jnp.float32(1.), quantize).shape == ()
    assert ours.sigma_to_t(jnp.ones((2, 3)), quantize).shape == (2, 3)


def test_sigma_to_t_default_quantize_follows_module():
    torch_w, ours = _schedule_pair(quantize=True)
    sigma = np.float32([0.05, 1.3, 20.])
    got = np.asarray(ours.sigma_to_t(jnp.asarray(sigma)))
    np.testing.assert_array_equal(got, torch_w.sigma_to_t(torch.from_numpy(sigma)).numpy())
    assert jnp.issubdtype(got.dtype, jnp.integer)


def test_t_to_sigma_matches():
    torch_w, ours = _schedule_pair()
    rng = np.random.default_rng(2)
    t = np.concatenate([rng.uniform(0, T - 1, 20), [0., 0.5, 1., 1.25, 500., 998.7, 998.999, 999.]]).astype(np.float32)
    ref = torch_w.t_to_sigma(torch.from_numpy(t)).numpy()
    got = np.asarray(jax.jit(ours.t_to_sigma)(jnp.asarray(t)))
    assert np.max(np.abs(got / ref - 1)) <= 1e-6
    # Round trip t → σ → t on our own schedule.
    np.testing.assert_allclose(np.asarray(ours.sigma_to_t(ours.t_to_sigma(jnp.asarray(t)))), t, atol=2e-3)


@pytest.mark.parametrize('n', [None, 1, 2, 10, 50])
def test_get_sigmas_matches(n):
    torch_w, ours = _schedule_pair()
    ref = torch_w.get_sigmas(n).numpy()
    got = np.asarray(ours.get_sigmas(n))
    assert got.shape == ref.shape and got[-1] == 0
    assert np.max(np.abs(got[:-1] / ref[:-1] - 1)) <= 1e-6


# --- the denoisers ----------------------------------------------------------------------------------------------------

KINDS = ['v', 'eps', 'v_ddpm', 'openai', 'openai_no_learned_sigmas', 'compvis', 'compvis_v']
N = 6


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    # In range, near the ends and outside the table's range [0.01, 157].
    sigma = np.float32([0.005, 0.012, 0.3, 2.5, 40., 300.])
    x0 = rng.standard_normal((N, 4, 5, C)).astype(np.float32)
    noise = rng.standard_normal((N, 4, 5, C)).astype(np.float32)
    x = x0 + noise * sigma[:, None, None, None]
    cond = rng.standard_normal((N, C)).astype(np.float32)
    return x0, noise, x, sigma, cond


@pytest.mark.parametrize('kind,quantize', [('v', False)] + [(k, q) for k in KINDS[1:] for q in (False, True)])
def test_forward_and_loss_match(kind, quantize):
    torch_w, ours, takes_cond = make_pair(kind, quantize)
    x0, noise, x, sigma, cond = _inputs()
    tkw = {'cond': torch.from_numpy(cond)} if takes_cond else {}
    jkw = {'cond': jnp.asarray(cond)} if takes_cond else {}
    with torch.no_grad():
        ref_d = nhwc(torch_w(nchw(x), torch.from_numpy(sigma), **tkw))
        ref_loss = torch_w.loss(nchw(x0), nchw(noise), torch.from_numpy(sigma), **tkw).numpy()
    got_d = ours(jnp.asarray(x), jnp.asarray(sigma), **jkw)
    got_loss = ours.loss(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(sigma), **jkw)
    assert got_d.shape == x.shape and got_loss.shape == (N,)
    assert rel_err(got_d, ref_d) <= TOL, rel_err(got_d, ref_d)
    assert rel_err(got_loss, ref_loss) <= TOL, rel_err(got_loss, ref_loss)


@pytest.mark.parametrize('kind', ['v', 'eps', 'compvis_v'])
def test_split_jit_and_grad(kind):
    """The wrapper is an NNX module: split/merge under jax.jit gives the eager result; the loss differentiates wrt the
    wrapped model's parameters only (the schedule is a Buffer)."""
    _, ours, takes_cond = make_pair(kind)
    x0, noise, x, sigma, cond = _inputs()
    kw = {'cond': jnp.asarray(cond)} if takes_cond else {}
    graphdef, state = nnx.split(ours)
    params = nnx.state(ours, nnx.Param)
    assert len(jax.tree.leaves(params)) == 2  # conv kernel and bias
    if kind != 'v':
        assert 'sigmas' in state and isinstance(state['sigmas'], Buffer)

    @jax.jit
    def denoise(state, x, sigma):
        return nnx.merge(graphdef, state)(x, sigma, **kw)

    np.testing.assert_allclose(denoise(state, x, sigma), ours(jnp.asarray(x), jnp.asarray(sigma), **kw),
                               rtol=1e-5, atol=1e-5)

    grads = nnx.grad(lambda m: m.loss(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(sigma), **kw).mean())(ours)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == 2 and all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0 for g in leaves)


def test_plain_function_model_and_errors():
    """Any callable works as the inner model; bad inputs get clear errors."""
    tm = TorchTiny(C)
    jm = JaxTiny(tm)
    ours = external.DiscreteEpsDDPMDenoiser(lambda x, t: jm(x, t), ALPHAS_CUMPROD, quantize=False)
    ref = K.external.DiscreteEpsDDPMDenoiser(tm, torch.from_numpy(ALPHAS_CUMPROD), False)
    _, _, x, sigma, _ = _inputs()
    with torch.no_grad():
        ref_d = nhwc(ref(nchw(x), torch.from_numpy(sigma)))
    assert rel_err(jax.jit(ours)(jnp.asarray(x), jnp.asarray(sigma)), ref_d) <= TOL
    with pytest.raises(ValueError, match='alphas_cumprod'):
        external.DiscreteEpsDDPMDenoiser(jm, np.array([0.5]), False)
    with pytest.raises(ValueError, match='alphas_cumprod'):
        external.DiscreteEpsDDPMDenoiser(jm, np.array([0.9, 0.]), False)
    with pytest.raises(TypeError, match='apply_model'):
        external.CompVisDenoiser(jm)


# --- samplers and the log-likelihood through a wrapper -------------------------------------------------------------

@pytest.mark.parametrize('kind', ['eps', 'compvis_v', 'v'])
def test_sample_euler_through_wrapper_matches(kind):
    """kdiff_jax's sample_euler (jitted) on the wrapper's get_sigmas(10) equals k-diffusion's through its wrapper."""
    from kdiff_jax.sampling.samplers import sample_euler
    torch_w, ours, takes_cond = make_pair(kind)
    if kind == 'v':  # VDenoiser has no table: a Karras-like descending schedule on both sides
        sigmas_np = np.append(np.geomspace(20., 0.05, 10), 0.).astype(np.float32)
        ref_sigmas, sigmas = torch.from_numpy(sigmas_np), jnp.asarray(sigmas_np)
    else:
        ref_sigmas, sigmas = torch_w.get_sigmas(10), ours.get_sigmas(10)
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((3, 4, 4, C)).astype(np.float32)
    cond = rng.standard_normal((3, C)).astype(np.float32)
    t_extra = {'cond': torch.from_numpy(cond)} if takes_cond else {}
    j_extra = {'cond': jnp.asarray(cond)} if takes_cond else {}
    with torch.no_grad():
        ref = nhwc(K.sampling.sample_euler(torch_w, nchw(noise) * ref_sigmas[0], ref_sigmas, extra_args=t_extra,
                                           disable=True))
    graphdef, state = nnx.split(ours)

    @jax.jit
    def run(state, x, sigmas, extra):
        return sample_euler(nnx.merge(graphdef, state), x, sigmas, extra_args=extra)

    got = run(state, jnp.asarray(noise) * sigmas[0], sigmas, j_extra)
    assert got.shape == noise.shape
    assert rel_err(got, ref) <= 1e-4, rel_err(got, ref)


def test_log_likelihood_through_wrapper():
    """log_likelihood runs (jitted) through a wrapped discrete ε-model over the table's σ range: finite, shape [N];
    with k-diffusion's Rademacher probe injected it equals k-diffusion's log_likelihood through its wrapper."""
    from kdiff_jax.sampling.likelihood import log_likelihood
    tm = TorchTiny(C)
    with torch.no_grad():
        tm.conv.weight.mul_(0.1)  # a mild model, so the PF-ODE stays tame from σ_min = 0.01 to σ_max = 157
    torch_w = K.external.DiscreteEpsDDPMDenoiser(tm, torch.from_numpy(ALPHAS_CUMPROD), False)
    ours = external.DiscreteEpsDDPMDenoiser(JaxTiny(tm), ALPHAS_CUMPROD, False)
    x = np.random.default_rng(4).standard_normal((2, 3, 3, C)).astype(np.float32) * 0.5

    run = jax.jit(lambda x, lo, hi, probes: log_likelihood(ours, x, lo, hi, probes=probes))
    ll_key, info = jax.jit(lambda x, lo, hi: log_likelihood(ours, x, lo, hi, key=0))(
        jnp.asarray(x), ours.sigma_min, ours.sigma_max)
    assert ll_key.shape == (2,) and ll_key.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(ll_key))) and bool(info['success'])

    # k-diffusion draws its probe with torch.randint_like(x, 2) * 2 - 1 first: draw the same one from the same seed.
    torch.manual_seed(0)
    probe = torch.randint_like(nchw(x), 2) * 2 - 1
    torch.manual_seed(0)
    ref, _ = K.sampling.log_likelihood(torch_w, nchw(x), float(torch_w.sigma_min), float(torch_w.sigma_max))
    got, info = run(jnp.asarray(x), ours.sigma_min, ours.sigma_max, jnp.asarray(nhwc(probe)))
    assert bool(info['success']) and got.shape == (2,)
    assert rel_err(got, ref.detach().numpy()) <= 1e-3, rel_err(got, ref.detach().numpy())
