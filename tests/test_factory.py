"""Building networks from a config (kdiff_jax/factory.py): the RNG streams used while tracing the construction."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax._src.interpreters import partial_eval

from kdiff_jax.factory import _Rngs, abstract_model, make_model
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
