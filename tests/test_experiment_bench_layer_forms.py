"""experiments/bench_layer_forms.py: each earlier form computes what the current one does,
and a tiny interleaved run per change."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_layer_forms
from gl_jax.models import layers


def test_the_maximum_form_computes_the_same_activation():
    x = jnp.asarray(np.random.default_rng(0).normal(scale=5.0, size=(4, 50)), jnp.float32)
    for kwargs in ({}, {"cap": 6.0}, {"leak": 0.1}, {"leak": 0.1, "cap": 6.0}):
        np.testing.assert_array_equal(bench_layer_forms.maximum_form(x, **kwargs),
                                      layers.activation(x, **kwargs))


def test_the_autodiff_max_pool_computes_the_same_values_and_gradients():
    # Small integers after a ReLU: tied maxima, where both must pick the first element.
    x = jnp.asarray(np.maximum(np.random.default_rng(1).integers(-2, 3, (2, 9, 8, 3)), 0),
                    jnp.float32)
    args = ((3, 3), (2, 2), ((1, 1), (1, 1)))
    for fn in (layers._max_pool_shifted, bench_layer_forms.autodiff_max_pool):
        assert fn(x, *args).shape == (2, 5, 4, 3)
    grads = [jax.jit(jax.grad(lambda x, fn=fn: jnp.sum(fn(x, *args) * jnp.arange(3.0))))(x)
             for fn in (layers._max_pool_shifted, bench_layer_forms.autodiff_max_pool)]
    np.testing.assert_array_equal(*grads)
    assert float(jnp.sum(grads[0])) == 2 * 5 * 4 * (0 + 1 + 2)   # each window routes once


@pytest.mark.parametrize("change, attribute", [("activation", "activation"),
                                               ("max_pool", "_max_pool_shifted")])
def test_a_tiny_run_times_both_forms_and_restores_the_layer(capsys, change, attribute):
    original = getattr(layers, attribute)
    bench_layer_forms.main([f"--change={change}", "--models=small_cnn", "--size=16",
                            "--batch=2", "--rounds=2"])
    assert getattr(layers, attribute) is original
    out = capsys.readouterr().out
    assert f"change: {change}" in out
    rows = [line for line in out.splitlines() if line.startswith("| small_cnn")]
    cells = [cell.strip() for cell in rows[-1].strip("|").split("|")]
    assert cells[1] == "16"
    current_min, earlier_min = float(cells[2].split("/")[0]), float(cells[3].split("/")[0])
    assert current_min > 0 and earlier_min > 0
    assert float(cells[5]) < 1e-5        # same loss: the forms compute the same function
