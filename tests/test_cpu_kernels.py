"""The CPU kernels of gl_jax.models.layers compute the same function as XLA's native ops.

On the CPU backend the depthwise convolution, max-pooling and count-include-pad average
pooling run as shifted-slice sums (``layers.cpu_kernels_enabled()``); elsewhere the native
ops run. Here both paths are traced side by side (``layers.cpu_kernels(True / False)``)
and their outputs and gradients compared: per layer over shapes, strides, paddings and
odd sizes, and for every backbone end to end (train mode, gradient of every parameter).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gl_jax.models import layers
from test_models import build

NHWC = ("NHWC", "HWIO", "NHWC")


def _close(a, b, rtol=1e-5):
    """Equal to float32 accumulation-order error, relative to the array's scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    scale = max(float(np.max(np.abs(b))), 1e-30)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


def _value_and_vjp(fn, *args, seed=1):
    """fn(*args) and its VJP at a random cotangent, one traced (jitted) function."""
    out_shape = jax.eval_shape(fn, *args)
    cot = jax.random.normal(jax.random.key(seed), out_shape.shape, out_shape.dtype)

    @jax.jit
    def run(*args):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cot)
    return run(*args)


def _both_paths(fn, *args):
    results = []
    for enabled in (False, True):
        with layers.cpu_kernels(enabled):
            results.append(_value_and_vjp(fn, *args))
    return results


def test_the_choice_is_made_in_one_place(monkeypatch):
    assert layers.cpu_kernels_enabled() == (jax.default_backend() == "cpu")
    with layers.cpu_kernels(False):
        assert not layers.cpu_kernels_enabled()
        with layers.cpu_kernels(True):
            assert layers.cpu_kernels_enabled()
        assert not layers.cpu_kernels_enabled()
    monkeypatch.setenv(layers.CPU_KERNELS_ENV, "0")
    assert not layers.cpu_kernels_enabled()
    monkeypatch.setenv(layers.CPU_KERNELS_ENV, "1")
    assert layers.cpu_kernels_enabled()


@pytest.mark.parametrize("size, channels, kernel, stride, padding", [
    (8, 4, 3, 1, "SAME"),
    (9, 5, 3, 2, "SAME"),        # odd input, stride 2: TF pads 1 bottom/right only
    (10, 6, 5, 2, "SAME"),       # even input, stride 2: TF pads 1 top, 2 bottom
    (7, 3, 5, 1, "SAME"),
    (11, 4, 3, 2, ((1, 1), (1, 1))),   # PyTorch-style symmetric padding
    (6, 2, 3, 3, ((0, 2), (1, 0))),    # stride 3, asymmetric padding
    (5, 3, 3, 1, "VALID"),
])
def test_depthwise_conv_matches_native(size, channels, kernel, stride, padding):
    rng = np.random.default_rng(size * 100 + kernel)
    x = jnp.asarray(rng.normal(size=(2, size, size + 1, channels)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, channels)), jnp.float32)

    def fn(x, w):
        return layers.conv_general_dilated(x, w, (stride, stride), padding,
                                           dimension_numbers=NHWC,
                                           feature_group_count=channels)
    (out_n, grads_n), (out_c, grads_c) = _both_paths(fn, x, w)
    _close(out_c, out_n)
    _close(grads_c[0], grads_n[0])
    _close(grads_c[1], grads_n[1])


def test_depthwise_conv_is_used_only_for_depthwise_nhwc():
    """Dense and grouped (not depthwise) convolutions keep XLA's op on every backend."""
    x = jnp.ones((1, 6, 6, 4))
    with layers.cpu_kernels(True):
        for w, groups in ((jnp.ones((3, 3, 4, 8)), 1), (jnp.ones((3, 3, 2, 4)), 2)):
            jaxpr = jax.make_jaxpr(lambda x, w, g=groups: layers.conv_general_dilated(
                x, w, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=g))(x, w)
            assert "conv_general_dilated" in str(jaxpr)
        jaxpr = jax.make_jaxpr(lambda x, w: layers.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=4))(
                x, jnp.ones((3, 3, 1, 4)))
        assert "conv_general_dilated" not in str(jaxpr)
    with layers.cpu_kernels(False):
        jaxpr = jax.make_jaxpr(lambda x, w: layers.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=4))(
                x, jnp.ones((3, 3, 1, 4)))
        assert "conv_general_dilated" in str(jaxpr)


@pytest.mark.parametrize("size, window, stride, padding, ceil_mode", [
    (8, 3, 2, 1, False),    # ResNet stem
    (9, 3, 2, 0, True),     # BN-Inception reductions (ceil: last window hangs over)
    (10, 3, 2, 0, True),
    (7, 3, 1, 1, True),     # BN-Inception 5b
    (8, 2, 2, 0, False),    # small_cnn
    (5, 3, 3, 0, True),
])
def test_max_pool_matches_native_including_ties(size, window, stride, padding, ceil_mode):
    rng = np.random.default_rng(size + window)
    # Small integers after a ReLU: many windows hold tied maxima (all zeros, equal values);
    # the gradient must go to the same element (the first maximum) on both paths.
    x = jnp.asarray(np.maximum(rng.integers(-3, 3, size=(2, size, size + 1, 3)), 0),
                    jnp.float32)
    fn = lambda x: layers.max_pool(x, window, stride, padding, ceil_mode=ceil_mode)  # noqa: E731
    (out_n, (grad_n,)), (out_c, (grad_c,)) = _both_paths(fn, x)
    np.testing.assert_array_equal(out_c, out_n)
    np.testing.assert_allclose(grad_c, grad_n, rtol=1e-6, atol=1e-6)
    x = jnp.asarray(rng.normal(size=(2, size + 2, size, 4)), jnp.float32)
    (out_n, (grad_n,)), (out_c, (grad_c,)) = _both_paths(fn, x)
    np.testing.assert_array_equal(out_c, out_n)
    np.testing.assert_allclose(grad_c, grad_n, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size, window, stride, padding", [
    (8, 3, 1, 1), (7, 3, 2, 1), (9, 2, 2, 0), (6, 3, 1, 0)])
def test_avg_pool_matches_native(size, window, stride, padding):
    x = jnp.asarray(np.random.default_rng(size).normal(size=(2, size, size + 2, 3)),
                    jnp.float32)
    fn = lambda x: layers.avg_pool_include_pad(x, window, stride, padding)  # noqa: E731
    (out_n, (grad_n,)), (out_c, (grad_c,)) = _both_paths(fn, x)
    _close(out_c, out_n)
    _close(grad_c, grad_n)


# Sizes that reach every kernel; ResNet-34/50/101 share ResNet-18's stem (the only
# CPU kernel in a ResNet), checked here on ResNet-18 and ResNet-50.
BACKBONES = [pytest.param("resnet18", 33, marks=pytest.mark.slow), ("small_cnn", 9),
             ("small_cnn", 12),
             pytest.param("resnet50", 32, marks=pytest.mark.slow),
             pytest.param("bninception", 64, marks=pytest.mark.slow),
             pytest.param("efficientnet_lite0", 35, marks=pytest.mark.slow)]


@pytest.mark.parametrize("name, size", BACKBONES)
def test_backbone_outputs_and_gradients_match_with_cpu_kernels_on_and_off(name, size):
    model = build(name, num_classes=5)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    images = jax.random.normal(jax.random.key(0), (2, size, size, 3))

    def loss(params):
        m = nnx.merge(graphdef, params, stats, copy=True)
        embedding, aux = m(images)
        value = jnp.sum(jnp.sin(embedding)) + jnp.sum(aux["logits"] ** 2)
        return value, (embedding, nnx.state(m, nnx.BatchStat))

    results = []
    for enabled in (False, True):
        with layers.cpu_kernels(enabled):
            results.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(params))
    ((_, (emb_n, stats_n)), grads_n), ((_, (emb_c, stats_c)), grads_c) = results
    # Float32 tolerance for a deep network in train mode on a batch of 2: perturbing the
    # images by one ulp moves EfficientNet-Lite0's native embedding by ~1e-4 of its scale.
    _close(emb_c, emb_n, rtol=5e-4)
    for a, b in zip(jax.tree.leaves(stats_c), jax.tree.leaves(stats_n)):
        _close(a, b, rtol=5e-4)
    # Gradients relative to the largest gradient of the model: a parameter whose true
    # gradient is ~0 (a BatchNorm bias feeding another BatchNorm) holds only rounding noise.
    flat_n = dict(nnx.to_flat_state(grads_n))
    scale = max(float(jnp.max(jnp.abs(g.get_value()))) for g in flat_n.values())
    for path, grad in nnx.to_flat_state(grads_c):
        np.testing.assert_allclose(grad.get_value(), flat_n[path].get_value(), rtol=2e-3,
                                   atol=2e-4 * scale, err_msg=str(path))
