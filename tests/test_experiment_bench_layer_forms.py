"""experiments/bench_layer_forms.py: each earlier form computes what the current one does,
and a tiny interleaved run per change."""
from unittest import mock

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


def test_the_native_pointwise_form_computes_the_same_convolution():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 7, 7, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(1, 1, 4, 6)), jnp.float32)
    nhwc = ("NHWC", "HWIO", "NHWC")
    for stride in (1, 2):
        outs = [fn(x, w, (stride, stride), "VALID", dimension_numbers=nhwc)
                for fn in (layers.conv_general_dilated, bench_layer_forms.native_pointwise)]
        assert outs[0].shape == (2, 7 // stride + stride - 1, 7 // stride + stride - 1, 6)
        np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_the_per_channel_depthwise_grad_computes_the_same_kernel_gradient():
    rng = np.random.default_rng(3)
    for stride, padding, kernel in ((1, ((1, 1), (1, 1)), 3), (2, ((1, 2), (1, 2)), 5)):
        x = jnp.asarray(rng.normal(size=(3, 9, 8, 5)), jnp.float32)
        out_hw = layers._out_hw((9, 8), (kernel, kernel), (stride, stride), padding)
        g = jnp.asarray(rng.normal(size=(3, *out_hw, 5)), jnp.float32)
        grads = [fn(x, g, (kernel, kernel, 1, 5), (stride, stride), padding)
                 for fn in (layers._depthwise_kernel_grad,
                            bench_layer_forms.per_channel_depthwise_grad)]
        assert grads[0].shape == (kernel, kernel, 1, 5)
        np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-5)
        # and against the native grouped convolution's kernel gradient
        w = jnp.zeros((kernel, kernel, 1, 5), jnp.float32)
        _, vjp = jax.vjp(lambda w: jax.lax.conv_general_dilated(
            x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=5), w)
        np.testing.assert_allclose(grads[0], vjp(g)[0], rtol=1e-4, atol=1e-4)


def test_the_autodiff_batch_norm_is_what_the_hand_written_backward_replaces():
    """Same outputs and gradients (scale, bias, input) as layers.train_batch_norm."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(3.0, 2.0, size=(4, 5, 5, 6)), jnp.float32)
    scale, bias = jnp.asarray(rng.uniform(0.5, 2, 6), jnp.float32), jnp.zeros(6, jnp.float32)
    cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    results = [jax.value_and_grad(lambda *a, fn=fn: jnp.sum(fn(*a, 1e-5)[0] * cot),
                                  argnums=(0, 1, 2))(x, scale, bias)
               for fn in (layers.train_batch_norm, layers.batch_norm_autodiff)]
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_every_tap_computes_the_same_convolutions_as_dropping_padding_taps():
    """On a 1 x 1 map (3 x 3 dense, 5 x 5 depthwise) the earlier form keeps the whole
    kernel; outputs and both gradients match."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 1, 1, 4)), jnp.float32)
    dense = jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)
    depthwise = jnp.asarray(rng.normal(size=(5, 5, 1, 4)), jnp.float32)
    cases = ((layers.conv_patches_dot, dense, ((1, 1), (1, 1))),
             (layers.depthwise_conv_shifted, depthwise, ((2, 2), (2, 2))))
    for conv, w, padding in cases:
        assert bench_layer_forms.every_tap(w, (1, 1), (1, 1), padding) == (w, padding)
        results = []
        for crop in (layers.drop_padding_taps, bench_layer_forms.every_tap):
            with mock.patch.object(layers, "drop_padding_taps", crop):
                results.append(jax.value_and_grad(
                    lambda x, w: jnp.sum(jnp.sin(conv(x, w, (1, 1), padding))),
                    argnums=(0, 1))(x, w))
        for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert float(jnp.max(jnp.abs(results[0][1][1]))) > 0   # the centre tap's gradient


# small_cnn has no 1 x 1 convolution. ResNet-18 at 16 px and batch 2 would end in 1 x 1
# maps BatchNorm-ed over 2 values, where float32 rounding alone moves the loss by 1e-2
# (either form against float64); 64 px and batch 4 is well conditioned.
@pytest.mark.parametrize("change, attribute, model, size, batch", [
    ("activation", "activation", "small_cnn", 16, 2),
    ("max_pool", "_max_pool_shifted", "small_cnn", 16, 2),
    ("pointwise", "conv_general_dilated", "resnet18", 64, 4),
    ("depthwise_grad", "_depthwise_kernel_grad", "efficientnet_lite0", 32, 2),
    ("batch_norm", "train_batch_norm", "small_cnn", 16, 2),
    ("padding_taps", "drop_padding_taps", "resnet18", 32, 4)])   # 1 x 1 last maps
def test_a_tiny_run_times_both_forms_and_restores_the_layer(capsys, change, attribute, model,
                                                            size, batch):
    original = getattr(layers, attribute)
    bench_layer_forms.main([f"--change={change}", f"--models={model}", f"--size={size}",
                            f"--batch={batch}", "--rounds=2"])
    assert getattr(layers, attribute) is original
    out = capsys.readouterr().out
    assert f"change: {change}" in out
    rows = [line for line in out.splitlines() if line.startswith(f"| {model}")]
    cells = [cell.strip() for cell in rows[-1].strip("|").split("|")]
    assert cells[1] == str(size)
    current_min, earlier_min = float(cells[2].split("/")[0]), float(cells[3].split("/")[0])
    assert current_min > 0 and earlier_min > 0
    assert float(cells[5]) < 1e-5        # same loss: the forms compute the same function
