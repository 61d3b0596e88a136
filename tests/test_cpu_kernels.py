"""The CPU kernels of gl_jax.models.layers compute the same function as XLA's native ops.

On the CPU backend the depthwise convolution, max-pooling and count-include-pad average
pooling run as shifted-slice sums and dense convolutions with tiny outputs as one matrix
multiply (``layers.cpu_kernels_enabled()``); elsewhere the native ops run. Here both
paths are traced side by side (``layers.cpu_kernels(True / False)``) and their outputs and
gradients compared: per layer over shapes, strides, paddings and odd sizes, and for every
backbone end to end (train mode, gradient of every parameter, against float64).
Importing the models moves XLA:CPU's convolutions from YNNPACK to Eigen unless the user
said otherwise (checked in fresh processes).
"""
import ast
import os
import subprocess
import sys

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
    (1, 4, 5, 1, "SAME"),        # Lite0's last stages at 32 px: only the centre tap reads input
    (2, 3, 5, 1, "SAME"),        # 2 x 2 map, 5 x 5 kernel: the middle 3 x 3 taps
    (2, 3, 5, 2, "SAME"),        # stride 2 onto 1 x 1 (TF pads 1 top, 2 bottom)
    (3, 2, 3, 2, ((1, 1), (1, 1))),
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


@pytest.mark.parametrize("size, kernel, stride, padding", [
    (7, 3, 1, ((1, 1), (1, 1))), (8, 3, 2, ((0, 1), (0, 1))), (9, 5, 2, ((2, 2), (2, 2))),
    (6, 3, 3, ((0, 2), (1, 0))), (5, 3, 1, ((0, 0), (0, 0))),
    (2, 5, 1, ((2, 2), (2, 2))), (2, 5, 2, ((1, 2), (1, 2)))])   # taps that read only padding
def test_depthwise_backward_passes_numerical_gradient_checks(size, kernel, stride, padding):
    """The hand-written VJP of depthwise_conv_shifted against finite differences (float64),
    including strides whose windows leave input rows unread."""
    from jax.test_util import check_grads
    rng = np.random.default_rng(size + kernel + stride)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, size, size + 1, 3)))
        w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 3)))
        check_grads(lambda x, w: layers.depthwise_conv_shifted(x, w, (stride, stride), padding),
                    (x, w), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def _batch_norm_step(shape, enabled, dtype=jnp.float32, train=True, seed=0):
    """One BatchNorm layer (non-trivial scale, bias and running statistics): its output
    against a random cotangent, gradients with respect to input, scale and bias, and the
    updated statistics, with the CPU kernels on or off."""
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    bn = layers.batch_norm(channels, momentum=0.9, epsilon=1e-3, dtype=dtype, rngs=nnx.Rngs(0))
    bn.scale[...] = jnp.asarray(rng.uniform(0.5, 2.0, channels), jnp.float32)
    bn.bias[...] = jnp.asarray(rng.normal(size=channels), jnp.float32)
    bn.mean[...] = jnp.asarray(rng.normal(size=channels), jnp.float32)
    bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, channels), jnp.float32)
    bn.train() if train else bn.eval()
    graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)
    # Large offsets and scales, as BN-Inception's 0-255 inputs give.
    x = jnp.asarray(rng.normal(30.0, 20.0, size=shape), dtype)
    cot = jnp.asarray(rng.normal(size=shape), dtype)

    def loss(params, x):
        m = nnx.merge(graphdef, params, stats, copy=True)
        y = m(x)
        return jnp.sum((y * cot).astype(jnp.float32)), (y, nnx.state(m, nnx.BatchStat))

    with layers.cpu_kernels(enabled):
        (_, (y, new_stats)), grads = jax.jit(
            jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return [y, *jax.tree.leaves(new_stats), *jax.tree.leaves(grads)]


@pytest.mark.parametrize("shape", [(4, 5, 6, 7), (3, 1, 1, 16), (8, 12), (2, 3, 3, 5)])
def test_batch_norm_matches_flax_in_train_mode(shape):
    """The CPU BatchNorm (hand-written backward) against Flax's, which the GPU/TPU path
    runs: output, both running statistics, and the gradients of scale, bias and input."""
    native, kernels = _batch_norm_step(shape, False), _batch_norm_step(shape, True)
    assert len(native) == 6   # y, mean, var, d bias, d scale, d x
    for a, b in zip(kernels, native):
        _close(a, b, rtol=2e-5)


def test_batch_norm_takes_flax_path_outside_the_plain_float32_train_case():
    """Eval mode and bfloat16 compute run Flax's own call on either setting (bit-equal)."""
    for kwargs in ({"train": False}, {"dtype": jnp.bfloat16}):
        native = _batch_norm_step((2, 3, 3, 4), False, **kwargs)
        kernels = _batch_norm_step((2, 3, 3, 4), True, **kwargs)
        for a, b in zip(kernels, native):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_batch_norm_backward_passes_numerical_gradient_checks():
    """The hand-written VJP against finite differences (float64), through all three
    outputs: the normalised input and the batch mean and variance."""
    from jax.test_util import check_grads
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(1.0, 2.0, size=(3, 4, 2, 5)))
        scale, bias = jnp.asarray(rng.uniform(0.5, 2, 5)), jnp.asarray(rng.normal(size=5))
        w_mean, w_var = jnp.asarray(rng.normal(size=5)), jnp.asarray(rng.normal(size=5))

        def fn(x, scale, bias):
            y, mean, var = layers.train_batch_norm(x, scale, bias, 1e-3)
            return jnp.sin(y).sum() + mean @ w_mean + var @ w_var
        check_grads(fn, (x, scale, bias), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
        # And it is the function it replaces, value for value.
        for a, b in zip(layers.train_batch_norm(x, scale, bias, 1e-3),
                        layers.batch_norm_autodiff(x, scale, bias, 1e-3)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size, in_ch, out_ch, kernel, stride, padding", [
    (2, 6, 5, 3, 1, ((1, 1), (1, 1))),   # ResNet's last stage at 64 px: 2 x 2 maps
    (4, 4, 6, 3, 2, ((1, 1), (1, 1))),   # its stride-2 entry: 4 x 4 -> 2 x 2
    (4, 3, 4, 1, 2, ((0, 0), (0, 0))),   # the 1 x 1 stride-2 shortcut
    (3, 5, 3, 3, 1, "SAME"),              # 3 x 3 output (the largest that qualifies)
    (5, 2, 3, 3, 2, ((0, 2), (1, 0))),   # asymmetric padding
    (1, 4, 4, 3, 1, ((1, 1), (1, 1))),   # a single pixel
    (12, 8, 16, 1, 1, ((0, 0), (0, 0))),  # 1 x 1 (ResNet-50's bottlenecks, Lite0's)
    (11, 4, 6, 1, 2, "VALID"),            # 1 x 1 stride 2 on an odd map (the shortcuts)
    (2, 4, 5, 3, 2, ((1, 1), (1, 1))),   # ResNet's stride-2 entry at 32 px: 2 x 2 -> 1 x 1
    (3, 3, 4, 7, 2, ((3, 3), (3, 3))),   # a 7 x 7 kernel larger than the map
    (4, 3, 2, 3, 2, ((0, 0), (0, 0))),   # unpadded, the last input row unread
])
def test_dense_conv_with_small_output_or_1x1_matches_native(size, in_ch, out_ch, kernel,
                                                            stride, padding):
    rng = np.random.default_rng(size * 100 + kernel * 10 + stride)
    x = jnp.asarray(rng.normal(size=(3, size, size, in_ch)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, in_ch, out_ch)), jnp.float32)

    def fn(x, w):
        return layers.conv_general_dilated(x, w, (stride, stride), padding,
                                           dimension_numbers=NHWC)
    with layers.cpu_kernels(True):
        assert "conv_general_dilated" not in str(jax.make_jaxpr(fn)(x, w))
    (out_n, grads_n), (out_c, grads_c) = _both_paths(fn, x, w)
    _close(out_c, out_n)
    _close(grads_c[0], grads_n[0])
    _close(grads_c[1], grads_n[1])


@pytest.mark.parametrize("in_hw, kernel, stride, padding, rows, cols, new_padding", [
    ((1, 1), 3, 1, ((1, 1), (1, 1)), (1, 2), (1, 2), ((0, 0), (0, 0))),   # centre tap only
    ((2, 2), 3, 2, ((1, 1), (1, 1)), (1, 3), (1, 3), ((0, 0), (0, 0))),   # taps 1-2
    ((2, 2), 5, 1, ((2, 2), (2, 2)), (1, 4), (1, 4), ((1, 1), (1, 1))),   # taps 1-3
    ((1, 4), 3, 1, ((1, 1), (1, 1)), (1, 2), (0, 3), ((0, 0), (1, 1))),   # one axis only
    ((2, 2), 5, 2, ((1, 2), (1, 2)), (1, 3), (1, 3), ((0, 0), (0, 0))),   # TF SAME onto 1 x 1
    ((8, 8), 3, 1, ((1, 1), (1, 1)), (0, 3), (0, 3), ((1, 1), (1, 1))),   # every tap reads
    ((4, 4), 3, 2, ((0, 0), (0, 0)), (0, 3), (0, 3), ((0, 0), (0, 0))),
])
def test_taps_that_read_only_padding_are_dropped(in_hw, kernel, stride, padding, rows, cols,
                                                 new_padding):
    w = jnp.arange(kernel * kernel, dtype=jnp.float32).reshape(kernel, kernel, 1, 1)
    cropped, pads = layers.drop_padding_taps(w, in_hw, (stride, stride), padding)
    np.testing.assert_array_equal(cropped, w[rows[0]:rows[1], cols[0]:cols[1]])
    assert pads == new_padding
    # The matrix multiply of a 3 x 3 convolution of a 1 x 1 map contracts over the input
    # channels once, not nine times.
    if in_hw == (1, 1):
        jaxpr = str(jax.make_jaxpr(lambda x, w: layers.conv_patches_dot(
            x, w, (1, 1), padding))(jnp.ones((2, 1, 1, 16)), jnp.ones((3, 3, 16, 8))))
        assert "f32[2,16]" in jaxpr and "f32[144" not in jaxpr


def test_which_convolutions_the_cpu_kernels_take():
    """Depthwise, dense with <= SMALL_OUTPUT_PIXELS outputs, and unpadded 1 x 1; grouped
    convolutions and larger dense ones keep XLA's op, and so does everything with the
    kernels off."""
    def uses_native(x, w, groups=1, stride=1):
        jaxpr = jax.make_jaxpr(lambda x, w: layers.conv_general_dilated(
            x, w, (stride, stride), "SAME", dimension_numbers=NHWC,
            feature_group_count=groups))(x, w)
        return "conv_general_dilated" in str(jaxpr)

    x = jnp.ones((1, 6, 6, 4))
    dense, grouped, depthwise = (jnp.ones((3, 3, 4, 8)), jnp.ones((3, 3, 2, 4)),
                                 jnp.ones((3, 3, 1, 4)))
    with layers.cpu_kernels(True):
        assert uses_native(x, dense)                             # 36 output pixels
        assert not uses_native(x, dense, stride=2)               # 9: at the limit
        assert uses_native(jnp.ones((1, 4, 4, 4)), dense)        # 16
        assert not uses_native(jnp.ones((1, 3, 3, 4)), dense)    # 9
        assert uses_native(x, grouped, groups=2)
        assert not uses_native(x, depthwise, groups=4)
        assert not uses_native(x, jnp.ones((1, 1, 4, 8)))             # 1 x 1, 36 pixels
        padded_1x1 = jax.make_jaxpr(lambda x, w: layers.conv_general_dilated(
            x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC))(x, jnp.ones((1, 1, 4, 8)))
        assert "conv_general_dilated" in str(padded_1x1)             # padded: XLA's op
    with layers.cpu_kernels(False):
        assert uses_native(x, jnp.ones((1, 1, 4, 8)))
        assert uses_native(x, depthwise, groups=4)
        assert uses_native(jnp.ones((1, 3, 3, 4)), dense)


@pytest.mark.parametrize("size, window, stride, padding, ceil_mode", [
    (8, 3, 2, 1, False),    # ResNet stem
    (9, 3, 2, 0, True),     # BN-Inception reductions (ceil: last window hangs over)
    (10, 3, 2, 0, True),
    (7, 3, 1, 1, True),     # BN-Inception 5b
    (8, 2, 2, 0, False),    # small_cnn
    (5, 3, 3, 0, True),
    (14, 12, 1, 1, False),  # more than 127 taps: the winning tap needs more than a byte
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


def _backbone_run(name, size, dtype, enabled):
    """Embedding, BatchNorm statistics and parameter gradients of one train-mode step,
    computed in ``dtype`` with the CPU kernels on or off (same parameters and images)."""
    model = build(name, num_classes=5, dtype=dtype)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, stats = (jax.tree.map(lambda a: a.astype(dtype), t) for t in (params, stats))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, size, size, 3)), dtype)

    def loss(params):
        m = nnx.merge(graphdef, params, stats, copy=True)
        embedding, aux = m(images)
        value = jnp.sum(jnp.sin(embedding)) + jnp.sum(aux["logits"] ** 2)
        return value, (embedding, nnx.state(m, nnx.BatchStat))

    with layers.cpu_kernels(enabled):
        (_, (embedding, new_stats)), grads = jax.jit(
            jax.value_and_grad(loss, has_aux=True))(params)

    def as_np(tree):
        return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(tree)]
    return {"embedding": as_np(embedding), "statistics": as_np(new_stats),
            "gradients": as_np(grads)}


def _error(run, reference):
    """Largest absolute difference per output kind, relative to that kind's largest
    reference value (a BatchNorm bias feeding another BatchNorm has a true gradient of ~0:
    its entries hold only rounding noise, so per-entry relative errors mean nothing)."""
    errors = {}
    for kind, leaves in reference.items():
        scale = max(float(np.max(np.abs(leaf))) for leaf in leaves)
        errors[kind] = max(float(np.max(np.abs(a - b))) for a, b in zip(run[kind], leaves)) / scale
    return errors


@pytest.mark.parametrize("name, size", BACKBONES)
def test_backbone_outputs_and_gradients_match_with_cpu_kernels_on_and_off(name, size):
    """Both float32 paths against a float64 run of the native ops: the CPU kernels must be
    as close to it as XLA's own float32 ops are. (A deep network in train mode on a batch
    of 2 amplifies rounding: EfficientNet-Lite0's float32 gradients are ~1e-3 of their
    scale from the float64 ones on either path, so comparing the two float32 paths with a
    tight tolerance tests rounding order, not correctness; a wrong kernel is off by O(1).)"""
    with jax.enable_x64(True):
        reference = _backbone_run(name, size, jnp.float64, enabled=False)
    native = _error(_backbone_run(name, size, jnp.float32, enabled=False), reference)
    kernels = _error(_backbone_run(name, size, jnp.float32, enabled=True), reference)
    # Equally valid float32 summation orders land up to ~2x apart from float64 here
    # (measured: Lite0 gradients 5e-4 vs 1e-3, either way round depending on XLA flags).
    for kind in reference:
        assert kernels[kind] <= max(4.0 * native[kind], 1e-5), (kind, kernels, native)


_CONV_PROBE = """
import os, sys
{before}
import jax, jax.numpy as jnp
import gl_jax.models  # noqa: F401  (what a user's program does)
x, w = jnp.ones((8, 28, 28, 64)), jnp.ones((3, 3, 64, 64))
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
hlo = jax.jit(conv).lower(x, w).compile().as_text()
print(repr(os.environ.get("XLA_FLAGS")), "__ynn_fusion" in hlo)
"""


def _probe(before="", **env):
    """(XLA_FLAGS after importing gl_jax.models, whether the compiled convolution runs in
    a YNNPACK fusion), from a fresh Python process."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("XLA_FLAGS", layers.CPU_KERNELS_ENV)}
    environ.update(env, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _CONV_PROBE.format(before=before)], env=environ,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    flags, ynn = out.strip().rsplit(" ", 1)
    return ast.literal_eval(flags), ynn == "True"


@pytest.mark.skipif(not jax.__version__.startswith(layers._FLAG_TESTED_JAX),
                    reason="the YNNPACK convolution flag is set only for measured jax versions")
def test_importing_the_models_moves_cpu_convolutions_to_eigen_unless_told_otherwise():
    flag = layers.EIGEN_CONVOLUTIONS_FLAG
    flags, ynn = _probe()
    assert flags == flag and not ynn
    flags, ynn = _probe(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert flags == f"--xla_force_host_platform_device_count=2 {flag}" and not ynn
    # Opted out, or the user chose YNNPACK fusions: XLA_FLAGS is left alone.
    flags, ynn = _probe(GL_JAX_CPU_KERNELS="0")
    assert flags is None and ynn
    user = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
    assert _probe(XLA_FLAGS=user) == (user, True)
    # A backend that already started has read its flags: nothing is changed.
    flags, ynn = _probe(before="import jax.numpy as jnp; jnp.ones(1).block_until_ready()")
    assert flags is None and ynn
