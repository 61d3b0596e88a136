"""gl_jax.models.cpu_kernels computes the same function as XLA's native ops.

A model built with ``cpu_kernels=True`` runs the depthwise convolution, max pooling and
count-include-pad average pooling as shifted-slice sums, dense convolutions with tiny
outputs or 1 x 1 kernels as one matrix multiply, and training-mode BatchNorm with a
closed-form JVP; with ``cpu_kernels=False`` XLA's ops and JAX's autodiff. Both paths are
compared side by side: values, reverse-mode gradients and forward-mode tangents, per layer
over shapes, strides, paddings and odd sizes, and for every backbone end to end (train
mode, against float64).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax.test_util import check_grads

from gl_jax.models import cpu_kernels, layers
from test_models import build

NHWC = ("NHWC", "HWIO", "NHWC")


def _close(a, b, rtol=1e-5):
    """Equal to float32 accumulation-order error, relative to the array's scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    scale = max(float(np.max(np.abs(b))), 1e-30)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


def _both_paths(make_fn, *args, compare_jvp=True):
    """[(value, vjp), ...] of ``make_fn(cpu_kernels)`` with the kernels off, then on, at one
    random cotangent; the forward-mode tangents of both paths along random tangents are
    computed too and checked equal on the way (``compare_jvp``). One jitted program per
    path; the random directions come from NumPy (no random-number programs to compile)."""
    rng = np.random.default_rng(1)
    out = jax.eval_shape(make_fn(False), *args)
    cot = jnp.asarray(rng.normal(size=out.shape), out.dtype)
    directions = tuple(jnp.asarray(rng.normal(size=a.shape), a.dtype) for a in args)
    results, tangents = [], []
    for enabled in (False, True):
        fn = make_fn(enabled)

        @jax.jit
        def run(args, cot, directions):
            value, vjp = jax.vjp(fn, *args)
            return value, vjp(cot), jax.jvp(fn, args, directions)[1]
        value, grads, tangent = run(args, cot, directions)
        results.append((value, grads))
        tangents.append(tangent)
    if compare_jvp:
        _close(tangents[1], tangents[0])
    return results


def _conv(enabled):
    return cpu_kernels.conv_general_dilated if enabled else jax.lax.conv_general_dilated


def test_the_choice_is_fixed_when_the_model_is_built():
    assert layers.resolve_cpu_kernels("auto") == (jax.default_backend() == "cpu")
    assert layers.resolve_cpu_kernels("Off") is False and layers.resolve_cpu_kernels(True)
    with pytest.raises(ValueError, match="cpu_kernels must be True, False, 'auto', 'on' or "
                                         "'off', got 'sometimes'"):
        layers.resolve_cpu_kernels("sometimes")
    images = jnp.ones((2, 8, 8, 3))
    for enabled, native_ops in ((True, False), (False, True)):
        model = build("small_cnn", num_classes=3, cpu_kernels=enabled)
        model.eval()
        jaxpr = str(jax.make_jaxpr(lambda x: model(x)[0])(images))
        assert ("reduce_window_max" in jaxpr) is native_ops


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

    def make_fn(enabled):
        return lambda x, w: _conv(enabled)(x, w, (stride, stride), padding,
                                           dimension_numbers=NHWC,
                                           feature_group_count=channels)
    (out_n, grads_n), (out_c, grads_c) = _both_paths(make_fn, x, w)
    _close(out_c, out_n)
    _close(grads_c[0], grads_n[0])
    _close(grads_c[1], grads_n[1])


@pytest.mark.parametrize("size, kernel, stride, padding", [
    (7, 3, 1, ((1, 1), (1, 1))), (8, 3, 2, ((0, 1), (0, 1))), (9, 5, 2, ((2, 2), (2, 2))),
    (6, 3, 3, ((0, 2), (1, 0))), (5, 3, 1, ((0, 0), (0, 0))),
    (2, 5, 1, ((2, 2), (2, 2))), (2, 5, 2, ((1, 2), (1, 2)))])   # taps that read only padding
def test_depthwise_conv_passes_numerical_gradient_checks(size, kernel, stride, padding):
    """Both modes of depthwise_conv against finite differences (float64), including
    strides whose windows leave input rows unread."""
    rng = np.random.default_rng(size + kernel + stride)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, size, size + 1, 3)))
        w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 3)))
        # Jitted: one program per derivative instead of one per operation of each call.
        conv = jax.jit(lambda x, w: cpu_kernels.depthwise_conv(x, w, (stride, stride), padding))
        check_grads(conv, (x, w), order=1, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


def _batch_norm_step(shape, enabled, dtype=jnp.float32, train=True, seed=0):
    """One BatchNorm layer (non-trivial scale, bias and running statistics): its output
    against a random cotangent, gradients with respect to input, scale and bias, and the
    updated statistics, with the CPU kernels on or off."""
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    bn = layers.batch_norm(channels, momentum=0.9, epsilon=1e-3, dtype=dtype,
                           cpu_kernels=enabled, rngs=nnx.Rngs(0))
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

    (_, (y, new_stats)), grads = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return [y, *jax.tree.leaves(new_stats), *jax.tree.leaves(grads)]


@pytest.mark.parametrize("shape", [(4, 5, 6, 7), (3, 1, 1, 16), (8, 12), (2, 3, 3, 5)])
def test_batch_norm_paths_agree_in_train_mode(shape):
    """The closed-form JVP against JAX's autodiff of the same forward pass: output, both
    running statistics, and the gradients of scale, bias and input."""
    native, kernels = _batch_norm_step(shape, False), _batch_norm_step(shape, True)
    assert len(native) == 6   # y, mean, var, d bias, d scale, d x
    for a, b in zip(kernels, native):
        _close(a, b, rtol=2e-5)


def test_batch_norm_matches_flax():
    """gl_jax's BatchNorm and nnx.BatchNorm (two-pass variance) give the same outputs and
    statistics in train and eval mode, float32 and bfloat16, and draw the same keys."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(30.0, 20.0, size=(4, 3, 3, 6)), jnp.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        ours_rngs, flax_rngs = nnx.Rngs(0), nnx.Rngs(0)
        ours = layers.batch_norm(6, momentum=0.9, epsilon=1e-3, dtype=dtype, rngs=ours_rngs)
        theirs = nnx.BatchNorm(6, momentum=0.9, epsilon=1e-3, dtype=dtype,
                               use_fast_variance=False, rngs=flax_rngs)
        assert jnp.array_equal(jax.random.key_data(ours_rngs.params()),
                               jax.random.key_data(flax_rngs.params()))
        for train in (True, False):
            for module in (ours, theirs):
                module.train() if train else module.eval()
            a, b = ours(x), theirs(x)
            assert a.dtype == b.dtype == dtype
            _close(a.astype(jnp.float32), b.astype(jnp.float32), rtol=1e-2 if dtype ==
                   jnp.bfloat16 else 1e-6)
            _close(ours.mean[...], theirs.mean[...], rtol=1e-6)
            _close(ours.var[...], theirs.var[...], rtol=1e-6)


def test_batch_norm_passes_numerical_gradient_checks():
    """The closed-form JVP (and its transpose) against finite differences (float64),
    through all three outputs: the normalised input and the batch mean and variance."""
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(1.0, 2.0, size=(3, 4, 2, 5)))
        scale, bias = jnp.asarray(rng.uniform(0.5, 2, 5)), jnp.asarray(rng.normal(size=5))
        w_mean, w_var = jnp.asarray(rng.normal(size=5)), jnp.asarray(rng.normal(size=5))

        def fn(x, scale, bias):
            y, mean, var = cpu_kernels.train_batch_norm(x, scale, bias, 1e-3)
            return jnp.sin(y).sum() + mean @ w_mean + var @ w_var
        check_grads(jax.jit(fn), (x, scale, bias), order=1, modes=("fwd", "rev"), atol=1e-6,
                    rtol=1e-6)
        # Differentiated, it gives the primal's own values, bit for bit.
        primal = cpu_kernels.train_batch_norm(x, scale, bias, 1e-3)
        linearized = jax.jvp(lambda *a: cpu_kernels.train_batch_norm(*a, 1e-3),
                             (x, scale, bias), (x, scale, bias))[0]
        for a, b in zip(primal, linearized):
            np.testing.assert_array_equal(a, b)


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

    def make_fn(enabled):
        return lambda x, w: _conv(enabled)(x, w, (stride, stride), padding,
                                           dimension_numbers=NHWC)
    assert "conv_general_dilated" not in str(jax.make_jaxpr(make_fn(True))(x, w))
    (out_n, grads_n), (out_c, grads_c) = _both_paths(make_fn, x, w)
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
    cropped, pads = cpu_kernels.drop_padding_taps(w, in_hw, (stride, stride), padding)
    np.testing.assert_array_equal(cropped, w[rows[0]:rows[1], cols[0]:cols[1]])
    assert pads == new_padding
    # The matrix multiply of a 3 x 3 convolution of a 1 x 1 map contracts over the input
    # channels once, not nine times.
    if in_hw == (1, 1):
        jaxpr = str(jax.make_jaxpr(lambda x, w: cpu_kernels.conv_patches_dot(
            x, w, (1, 1), padding))(jnp.ones((2, 1, 1, 16)), jnp.ones((3, 3, 16, 8))))
        assert "f32[2,16]" in jaxpr and "f32[144" not in jaxpr


def test_which_convolutions_the_cpu_kernels_take():
    """Depthwise, dense with <= SMALL_OUTPUT_PIXELS outputs, and unpadded 1 x 1; grouped
    convolutions and larger dense ones keep XLA's op."""
    def uses_native(x, w, groups=1, stride=1):
        jaxpr = jax.make_jaxpr(lambda x, w: cpu_kernels.conv_general_dilated(
            x, w, (stride, stride), "SAME", dimension_numbers=NHWC,
            feature_group_count=groups))(x, w)
        return "conv_general_dilated" in str(jaxpr)

    x = jnp.ones((1, 6, 6, 4))
    dense, grouped, depthwise = (jnp.ones((3, 3, 4, 8)), jnp.ones((3, 3, 2, 4)),
                                 jnp.ones((3, 3, 1, 4)))
    assert uses_native(x, dense)                             # 36 output pixels
    assert not uses_native(x, dense, stride=2)               # 9: at the limit
    assert uses_native(jnp.ones((1, 4, 4, 4)), dense)        # 16
    assert not uses_native(jnp.ones((1, 3, 3, 4)), dense)    # 9
    assert uses_native(x, grouped, groups=2)
    assert not uses_native(x, depthwise, groups=4)
    assert not uses_native(x, jnp.ones((1, 1, 4, 8)))             # 1 x 1, 36 pixels
    padded_1x1 = jax.make_jaxpr(lambda x, w: cpu_kernels.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC))(x, jnp.ones((1, 1, 4, 8)))
    assert "conv_general_dilated" in str(padded_1x1)             # padded: XLA's op


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

    def make_fn(enabled):
        return lambda x: layers.max_pool(x, window, stride, padding, ceil_mode=ceil_mode,
                                         cpu_kernels=enabled)
    # Forward mode at a tie may take any of the tied inputs' tangents (XLA's rule does not
    # promise the first): compared on distinct values below.
    (out_n, (grad_n,)), (out_c, (grad_c,)) = _both_paths(make_fn, x, compare_jvp=False)
    np.testing.assert_array_equal(out_c, out_n)
    np.testing.assert_allclose(grad_c, grad_n, rtol=1e-6, atol=1e-6)
    x = jnp.asarray(rng.normal(size=(2, size + 2, size, 4)), jnp.float32)
    (out_n, (grad_n,)), (out_c, (grad_c,)) = _both_paths(make_fn, x)
    np.testing.assert_array_equal(out_c, out_n)
    np.testing.assert_allclose(grad_c, grad_n, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size, window, stride, padding", [
    (8, 3, 1, 1), (7, 3, 2, 1), (9, 2, 2, 0), (6, 3, 1, 0)])
def test_avg_pool_matches_native(size, window, stride, padding):
    x = jnp.asarray(np.random.default_rng(size).normal(size=(2, size, size + 2, 3)),
                    jnp.float32)

    def make_fn(enabled):
        return lambda x: layers.avg_pool_include_pad(x, window, stride, padding,
                                                     cpu_kernels=enabled)
    (out_n, (grad_n,)), (out_c, (grad_c,)) = _both_paths(make_fn, x)
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
    and the embedding's forward-mode tangent along the images, computed in ``dtype`` with
    the CPU kernels on or off (same parameters and images)."""
    model = build(name, num_classes=5, dtype=dtype, cpu_kernels=enabled)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, stats = (jax.tree.map(lambda a: a.astype(dtype), t) for t in (params, stats))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, size, size, 3)), dtype)
    direction = jnp.asarray(rng.normal(size=images.shape), dtype)

    def loss(params, stats, images):
        m = nnx.merge(graphdef, params, stats, copy=True)
        embedding, aux = m(images)
        value = jnp.sum(jnp.sin(embedding)) + jnp.sum(aux["logits"] ** 2)
        return value, (embedding, nnx.state(m, nnx.BatchStat))

    def embed(params, stats, images):
        return nnx.merge(graphdef, params, stats, copy=True)(images)[0]

    # Arrays as arguments, not as constants baked into the programs.
    (_, (embedding, new_stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        params, stats, images)
    _, tangent = jax.jit(lambda p, s, x, t: jax.jvp(lambda x: embed(p, s, x), (x,), (t,)))(
        params, stats, images, direction)

    def as_np(tree):
        return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(tree)]
    return {"embedding": as_np(embedding), "statistics": as_np(new_stats),
            "gradients": as_np(grads), "tangent": as_np(tangent)}


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
def test_backbone_outputs_and_derivatives_match_with_cpu_kernels_on_and_off(name, size):
    """Both float32 paths against a float64 run of the native ops: the CPU kernels must be
    as close to it as XLA's own float32 ops are, for the outputs, the reverse-mode
    gradients and the forward-mode tangents (jax.jvp in training mode). (A deep network in
    train mode on a batch of 2 amplifies rounding: EfficientNet-Lite0's float32 gradients
    are ~1e-3 of their scale from the float64 ones on either path, so comparing the two
    float32 paths with a tight tolerance tests rounding order, not correctness; a wrong
    kernel is off by O(1).)"""
    with jax.enable_x64(True):
        reference = _backbone_run(name, size, jnp.float64, enabled=False)
    native = _error(_backbone_run(name, size, jnp.float32, enabled=False), reference)
    kernels = _error(_backbone_run(name, size, jnp.float32, enabled=True), reference)
    # Equally valid float32 summation orders land up to ~2x apart from float64 here.
    for kind in reference:
        assert kernels[kind] <= max(4.0 * native[kind], 1e-5), (kind, kernels, native)


def test_max_pool_passes_numerical_gradient_checks():
    """The CPU max pooling's JVP rule and its transpose against finite differences
    (float64, distinct values: no ties, where the derivative is not defined)."""
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.permutation(2 * 7 * 8 * 3).reshape(2, 7, 8, 3) / 10.0)
        pool = jax.jit(lambda x: layers.max_pool(x, 3, 2, 1, ceil_mode=True, cpu_kernels=True))
        check_grads(pool, (x,), order=1, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


def test_the_config_field_reaches_every_layer():
    """config.model.cpu_kernels decides for every convolution, BatchNorm and pooling of the
    model the trainer builds; 'auto' follows JAX's backend."""
    from gl_jax import runtime
    from train_helpers import quick_config

    def choices(model):
        found = set()
        for _, node in nnx.iter_graph(model):
            if isinstance(node, nnx.Conv):
                found.add(node.conv_general_dilated is cpu_kernels.conv_general_dilated)
            elif hasattr(node, "cpu_kernels"):
                found.add(node.cpu_kernels)
        return found

    for value, expected in (("on", {True}), ("off", {False}),
                            ("auto", {jax.default_backend() == "cpu"})):
        config = quick_config(model__cpu_kernels=value)
        assert choices(runtime.build_model(config, num_classes=3)) == expected
