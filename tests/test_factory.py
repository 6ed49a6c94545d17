"""Building networks from a config (kdiff_jax/factory.py): the RNG streams used while tracing the construction, and
the initializers' draws (kdiff_jax/models/init.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.interpreters import partial_eval

from kdiff_jax.factory import _build_model, _initial_state, _Rngs, abstract_model, make_model
from kdiff_jax.models.init import deferred_draws, torch_default_init
from tests.parity import small_config


def key_data(key) -> np.ndarray:
    return np.asarray(jax.random.key_data(key))


def test_streams_draw_the_keys_of_flax_streams():
    """Same seeds, same calls: the same keys as nnx.Rngs, from the streams and from their forks (what dropout keeps),
    and the same counters afterwards, so models and checkpoints do not change."""
    def draws(rngs):
        return [key_data(k) for k in (rngs.params(), rngs.params(), rngs.dropout(), rngs.dropout.fork()(),
                                      rngs.dropout.fork()())]

    ours, flax_ = _Rngs(params=3, dropout=4), nnx.Rngs(params=3, dropout=4)
    np.testing.assert_array_equal(draws(ours), draws(flax_))
    assert len({a.tobytes() for a in draws(_Rngs(params=3, dropout=4))}) == 5  # all different
    assert int(ours.params.count[...]) == int(flax_.params.count[...]) == 2
    assert int(ours.dropout.count[...]) == int(flax_.dropout.count[...]) == 3


def test_construction_does_not_scan_the_trace_for_each_parameter(monkeypatch):
    """Building a model under eval_shape/jit draws a key per parameter. With flax's own streams each draw asked a
    tracer for its sharding, and jax answered with an error message naming the tracer's origin, found by scanning
    every equation traced so far (JaxprStackFrame.find_progenitors): construction was quadratic in the model's size
    (cars128: 6,480 scans). None may happen now."""
    scans = []
    original = partial_eval.JaxprStackFrame.find_progenitors
    monkeypatch.setattr(partial_eval.JaxprStackFrame, 'find_progenitors',
                        lambda self, tracer: scans.append(1) or original(self, tracer))
    config = small_config()
    jax.jit(lambda: nnx.Rngs(0).params()).lower()  # the probe catches a draw from flax's own stream
    assert scans, 'the probe did not catch the scan of an nnx.Rngs draw under jit'
    scans.clear()
    abstract_model(config)
    make_model(config, initialize=False)
    assert not scans, f'{len(scans)} scans of the trace while building the model'


def test_initialisation_program_draws_each_shape_once_with_the_values_of_per_parameter_draws():
    """Inside make_model's jit the seeds are known, so each parameter's key is computed while tracing and enters the
    program as a constant: XLA compiles no fold_in (flax's streams put one threefry loop per parameter there). And
    the parameters of one shape are drawn together (models/init.py), so the program holds far fewer loops than
    parameters. The values are bit for bit those of flax's streams drawing parameter by parameter."""
    config = small_config(input_size=[8, 8], depths=[1, 1], channels=[8, 8], self_attn_depths=[False, True],
                          mapping_out=16, augment_wrapper=False)

    def build(make_rngs):
        return lambda: _build_model(config, make_rngs())

    ours = jax.jit(lambda: _initial_state(build(lambda: _Rngs(params=3, dropout=4))))
    flax_ = jax.jit(lambda: nnx.split(build(lambda: nnx.Rngs(params=3, dropout=4))())[1])
    assert 'fold_in' not in ours.lower().as_text()
    assert 'fold_in' in flax_.lower().as_text()  # the probe sees flax's draws
    loops = [lowered.compile().as_text().count(' while(') for lowered in (ours.lower(), flax_.lower())]
    kernels = [x for x in jax.tree.leaves(nnx.state(abstract_model(config), nnx.Param)) if x.ndim >= 2]
    assert loops[1] >= len(kernels) > 2 * loops[0], (loops, len(kernels))
    state, reference = ours(), flax_()
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(reference)) > 20
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference)):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('shape', [(7, 5), (3, 3, 6, 4), (1, 1, 16, 24)])
def test_torch_default_init_is_flax_variance_scaling_drawn_flat(shape):
    """U(±1/√fan_in) drawn as a flat vector (models/init.py): bit for bit flax's variance_scaling(1/3, 'fan_in',
    'uniform') on the shape, called directly and deferred."""
    key = jax.random.key(11)
    reference = nnx.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')(key, shape, jnp.float32)
    np.testing.assert_array_equal(torch_default_init(key, shape, jnp.float32), reference)
    with deferred_draws() as draws:
        placeholders = [torch_default_init(k, shape, jnp.float32) for k in (jax.random.key(10), key)]
    filled = draws.fill({'a': placeholders[0], 'b': placeholders[1]})
    np.testing.assert_array_equal(filled['b'], reference)
    assert np.abs(np.asarray(filled['a'])).max() > 0 and not np.array_equal(filled['a'], filled['b'])


def test_a_deferred_draw_missing_from_the_state_is_an_error():
    """A module that stored f(placeholder) rather than the placeholder would keep f(0): fill refuses."""
    with deferred_draws() as draws:
        kept = torch_default_init(jax.random.key(0), (4, 4), jnp.float32)
        changed = torch_default_init(jax.random.key(1), (4, 4), jnp.float32) * 2
    with pytest.raises(RuntimeError, match='1 of 2 deferred parameter draws are not in the model state'):
        draws.fill([kept, changed])
