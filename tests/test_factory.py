"""Building networks from a config (kdiff_jax/factory.py): the RNG streams used while tracing the construction."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax._src.interpreters import partial_eval

from kdiff_jax.factory import _build_model, _Rngs, abstract_model, make_model
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


def test_parameter_keys_are_constants_of_the_initialisation_program():
    """Inside make_model's jit the seeds are known, so each parameter's key is computed while tracing and enters the
    program as a constant: XLA compiles no fold_in (flax's streams put one threefry loop per parameter there; cars64's
    initialisation compiled in 27 s with them, 18 s without). The parameters are those of flax's streams."""
    config = small_config(input_size=[8, 8], depths=[1, 1], channels=[8, 8], self_attn_depths=[False, True],
                          mapping_out=16, augment_wrapper=False)

    def init(make_rngs):
        return jax.jit(lambda: nnx.split(_build_model(config, make_rngs()))[1])

    ours, flax_ = init(lambda: _Rngs(params=3, dropout=4)), init(lambda: nnx.Rngs(params=3, dropout=4))
    assert 'fold_in' not in ours.lower().as_text()
    assert 'fold_in' in flax_.lower().as_text()  # the probe sees flax's draws
    state, reference = ours(), flax_()
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(reference)) > 20
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference)):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)
