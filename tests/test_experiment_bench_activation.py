"""experiments/bench_activation.py: the two forms agree, and a tiny interleaved run."""
import jax.numpy as jnp
import numpy as np

from experiments import bench_activation
from gl_jax.models import layers


def test_the_maximum_form_computes_the_same_activation():
    x = jnp.asarray(np.random.default_rng(0).normal(scale=5.0, size=(4, 50)), jnp.float32)
    for kwargs in ({}, {"cap": 6.0}, {"leak": 0.1}, {"leak": 0.1, "cap": 6.0}):
        np.testing.assert_array_equal(bench_activation.maximum_form(x, **kwargs),
                                      layers.activation(x, **kwargs))


def test_a_tiny_run_times_both_forms_and_restores_the_activation(capsys):
    original = layers.activation
    bench_activation.main(["--models=small_cnn", "--size=16", "--batch=2", "--rounds=2"])
    assert layers.activation is original
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| small_cnn")]
    cells = [cell.strip() for cell in rows[-1].strip("|").split("|")]
    assert cells[1] == "16"
    select_min, maximum_min = float(cells[2].split("/")[0]), float(cells[3].split("/")[0])
    assert select_min > 0 and maximum_min > 0
    assert float(cells[5]) < 1e-5        # same loss: the forms differ only at exact ties
