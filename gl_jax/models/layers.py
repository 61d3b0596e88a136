"""Building blocks shared by the backbones: PyTorch-compatible convolutions, BatchNorm,
pooling and the Group Loss++ leaky activation.

All tensors are NHWC (``[batch, height, width, channels]``). Convolution kernels are
HWIO (``[kh, kw, in / groups, out]``): a PyTorch ``OIHW`` weight maps to it with
``weight.transpose(2, 3, 1, 0)``.
"""
from __future__ import annotations

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", relu); the
# Caffe port and EfficientNet use comparable He-style fan-out initialisations. Only
# matters when training from scratch: pretrained weights overwrite it.
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

POOLINGS = ("avg", "max", "mix")

# ---------------------------------------------------------------------------------------
# Per-platform kernels. XLA:CPU runs some of this package's ops far slower than the
# arithmetic needs (issue 14): the backward pass of max-pooling (select_and_scatter), of
# depthwise convolutions (the kernel gradient becomes a dense C x C convolution), and
# dense convolutions with tiny outputs or 1 x 1 kernels, and autodiff of training-mode
# BatchNorm. On the CPU the functions below therefore compute the same math from shifted
# strided slices, which XLA:CPU fuses into a few loops, or as one matrix multiply, and
# BatchNorm has a hand-written backward pass; on GPU/TPU XLA's native ops and JAX's
# autodiff are used. Beside them, the XLA flag that moves CPU convolutions from YNNPACK
# to Eigen. This is the ONE place that decides.
# ---------------------------------------------------------------------------------------
_CPU_KERNELS_OVERRIDE: bool | None = None
CPU_KERNELS_ENV = "GL_JAX_CPU_KERNELS"


def cpu_kernels_enabled() -> bool:
    """Whether the shifted-slice CPU kernels replace XLA's native ops.

    Decided when a function is traced (a jitted function keeps the choice it was traced
    with): the ``cpu_kernels(...)`` context if one is active, else the environment
    variable GL_JAX_CPU_KERNELS ('1' on, '0' off), else on exactly when JAX's default
    backend is the CPU. Both paths compute the same function (tests/test_cpu_kernels.py).
    """
    if _CPU_KERNELS_OVERRIDE is not None:
        return _CPU_KERNELS_OVERRIDE
    env = _env_choice()
    return jax.default_backend() == "cpu" if env is None else env


def _env_choice() -> bool | None:
    """GL_JAX_CPU_KERNELS as True ('1', 'true', 'on', 'yes'), False ('0', ...) or None."""
    env = os.environ.get(CPU_KERNELS_ENV, "").strip().lower()
    if env in ("1", "true", "on", "yes"):
        return True
    if env in ("0", "false", "off", "no"):
        return False
    return None


# jaxlib 0.10's XLA:CPU runs convolutions through YNNPACK; its Eigen convolutions were
# 1.3-1.7x faster on the backbones' 3 x 3 shapes here (forward and both gradients,
# float32, 2 cores; whole ResNet and Lite0 training steps about 1.25x faster in
# experiments/bench_models.py) and as exact against float64, while YNNPACK stays the
# faster matrix multiply. XLA reads XLA_FLAGS once, when the first backend starts, so
# the choice is made when this module is imported and only if no backend has started.
EIGEN_CONVOLUTIONS_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
_FLAG_TESTED_JAX = ("0.10.",)  # the flag is experimental: an unknown XLA flag is fatal


def prefer_eigen_convolutions_on_cpu() -> bool:
    """Add EIGEN_CONVOLUTIONS_FLAG to XLA_FLAGS when that can still take effect and the
    user has not decided: no JAX backend started yet, XLA_FLAGS sets no YNNPACK fusion
    type, GL_JAX_CPU_KERNELS is not '0', and this jax version was measured. Only the CPU
    backend reads the flag. Returns whether the flag is now in XLA_FLAGS."""
    flags = os.environ.get("XLA_FLAGS", "")
    if EIGEN_CONVOLUTIONS_FLAG in flags.split():
        return True
    if ("xla_cpu_experimental_ynn_fusion_type" in flags
            or _env_choice() is False
            or not jax.__version__.startswith(_FLAG_TESTED_JAX)):
        return False
    try:
        from jax._src import xla_bridge  # no public way to ask without starting a backend
        if xla_bridge.backends_are_initialized():
            return False
    except (ImportError, AttributeError):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {EIGEN_CONVOLUTIONS_FLAG}".strip()
    return True


@contextlib.contextmanager
def cpu_kernels(enabled: bool | None):
    """Force the CPU kernels on (True) or off (False) while tracing inside the block;
    None restores the automatic choice. Trace (jit) new functions inside the block."""
    global _CPU_KERNELS_OVERRIDE
    previous, _CPU_KERNELS_OVERRIDE = _CPU_KERNELS_OVERRIDE, enabled
    try:
        yield
    finally:
        _CPU_KERNELS_OVERRIDE = previous


prefer_eigen_convolutions_on_cpu()


def _window_slices(padded: jax.Array, window: tuple[int, int], stride: tuple[int, int],
                   out_hw: tuple[int, int]):
    """Yield ((di, dj), padded[:, di::sh, dj::sw, :] cut to out_hw) in row-major order."""
    b, _, _, c = padded.shape
    (kh, kw), (sh, sw), (oh, ow) = window, stride, out_hw
    for di in range(kh):
        for dj in range(kw):
            yield (di, dj), jax.lax.slice(padded, (0, di, dj, 0),
                                          (b, di + (oh - 1) * sh + 1, dj + (ow - 1) * sw + 1, c),
                                          (1, sh, sw, 1))


_NHWC = ("NHWC", "HWIO", "NHWC")


def _padding_pairs(padding, in_hw, window, stride) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        return tuple(jax.lax.padtype_to_pads(in_hw, window, stride, padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _out_hw(in_hw, window, stride, padding) -> tuple[int, int]:
    """A padded, strided window's output size per spatial axis (0 when it does not fit)."""
    return tuple(max((in_hw[a] + sum(padding[a]) - window[a]) // stride[a] + 1, 0)
                 for a in range(2))


def _conv_windows(x, window, stride, padding):
    """((di, dj), window slice) of NHWC ``x`` zero-padded by ``padding`` (a negative pad
    crops): one per tap of a convolution, each the size of its output."""
    padded = jax.lax.pad(x, jnp.zeros((), x.dtype),
                         ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
    return _window_slices(padded, window, stride, _out_hw(x.shape[1:3], window, stride, padding))


def drop_padding_taps(kernel, in_hw, stride, padding):
    """(kernel, padding) of the same convolution without the kernel rows and columns that
    read only padding for every output position.

    Such taps multiply zeros: on maps smaller than the kernel's reach (the last stages of
    the ImageNet-stem networks on 32 px inputs: a 3 x 3 convolution of a 1 x 1 map reads
    its input with the centre tap only, Lite0's 5 x 5 depthwise ones of a 2 x 2 map with
    3 x 3 taps) they were most of the work. Along an axis of input length n, taps before
    lo - (out - 1) * stride read only the low padding and taps from lo + n on only the high
    padding; the rest keep their offsets (new low padding lo - first) and the high padding
    becomes what exactly fits the same outputs (negative: unread input rows cut off).
    Autodiff through the crop gives the dropped taps a zero gradient, as before.
    """
    kh, kw = kernel.shape[:2]
    out_hw = _out_hw(in_hw, (kh, kw), stride, padding)
    keep, pads = [], []
    for a, k in enumerate((kh, kw)):
        (lo, hi), s, n, out = padding[a], stride[a], in_hw[a], out_hw[a]
        first, last = max(0, lo - (out - 1) * s), min(k - 1, lo + n - 1)
        if out < 1 or first > last or (first, last) == (0, k - 1):
            keep.append((0, k))
            pads.append((lo, hi))
            continue
        keep.append((first, last + 1))
        pads.append((lo - first, (out - 1) * s + last - n - lo + 1))
    if keep == [(0, kh), (0, kw)]:
        return kernel, tuple(padding)
    (r0, r1), (c0, c1) = keep
    return kernel[r0:r1, c0:c1], tuple(pads)


def _depthwise_taps(x, kernel, stride, padding):
    total = None
    for (di, dj), window in _conv_windows(x, kernel.shape[:2], stride, padding):
        term = window * kernel[di, dj, 0]
        total = term if total is None else total + term
    return total


def _depthwise_input_grad(g, kernel, in_hw, stride, padding):
    """The input's gradient of ``_depthwise_taps``: the cotangent spread back to input
    positions (stride - 1 zeros between its rows and columns, k - 1 - pad at the edges,
    cropping where the padding was larger) and correlated with the flipped kernel, itself
    a stride-1 shifted-slice sum."""
    config = [(0, 0, 0)]
    for a in range(2):
        k, s, (lo, hi) = kernel.shape[a], stride[a], padding[a]
        covered = (g.shape[1 + a] - 1) * s + k       # padded input rows some window reads
        leftover = in_hw[a] + lo + hi - covered       # rows no window reaches: gradient 0
        config.append((k - 1 - lo, k - 1 - hi + leftover, s - 1))
    config.append((0, 0, 0))
    spread = jax.lax.pad(g, jnp.zeros((), g.dtype), config)
    return _depthwise_taps(spread, kernel[::-1, ::-1], (1, 1), ((0, 0), (0, 0)))


def _depthwise_kernel_grad(x, g, kernel_shape, stride, padding):
    """The kernel's gradient: per tap, the sum over batch and positions of input window x
    cotangent, accumulated in at least float32. All taps go through ONE variadic
    reduction (XLA:CPU runs k x k separate reductions about 3x slower), over the
    positions only: its [B, C] outputs let XLA:CPU split the loop over the batch, which a
    reduction straight to [C] does not (Lite0's kernel gradients about 2x faster, its
    training step about 1.1x; experiments/bench_layer_forms.py --change=depthwise_grad).
    The batch is summed afterwards, on k x k x B x C numbers."""
    kh, kw = kernel_shape[:2]
    acc = jnp.promote_types(g.dtype, jnp.float32)
    products = tuple((window * g).astype(acc)
                     for _, window in _conv_windows(x, (kh, kw), stride, padding))
    zeros = tuple(jnp.zeros((), acc) for _ in products)
    per_image = jax.lax.reduce(products, zeros,
                               lambda a, b: tuple(u + v for u, v in zip(a, b)), (1, 2))
    return jnp.stack(per_image).sum(axis=1).reshape(kh, kw, 1, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, stride, padding):
    return _depthwise_taps(x, kernel, stride, padding)


def _depthwise_fwd(x, kernel, stride, padding):
    return _depthwise_taps(x, kernel, stride, padding), (x, kernel)


def _depthwise_bwd(stride, padding, residuals, g):
    x, kernel = residuals
    return (_depthwise_input_grad(g, kernel, x.shape[1:3], stride, padding).astype(x.dtype),
            _depthwise_kernel_grad(x, g, kernel.shape, stride, padding).astype(kernel.dtype))


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv_shifted(x: jax.Array, kernel: jax.Array, stride: tuple[int, int],
                           padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """Depthwise convolution (multiplier 1) of NHWC ``x`` with an HWIO kernel
    [kh, kw, 1, C], as a sum of kh * kw shifted, strided slices times one kernel tap each.

    The same function as ``lax.conv_general_dilated(..., feature_group_count=C)``, with
    its own backward pass: the input gradient is another shifted-slice sum (of the spread
    cotangent with the flipped kernel), the kernel gradient one variadic reduction. It
    replaces the native grouped convolution, whose kernel gradient XLA:CPU lowers to a
    dense C x C convolution plus a diagonal extraction (EfficientNet-Lite0's training step
    about 5x faster at 112 px; the hand-written backward about 1.3x faster again than
    JAX's autodiff of the slice sum). Taps that read only padding are left out first
    (``drop_padding_taps``).
    """
    stride = tuple(int(s) for s in stride)
    kernel, padding = drop_padding_taps(kernel, x.shape[1:3], stride,
                                        tuple((int(lo), int(hi)) for lo, hi in padding))
    return _depthwise(x, kernel, stride, padding)


# A dense convolution whose output is at most this many pixels (the last stage of an
# ImageNet-stem network on 48-64 px inputs: 2 x 2) runs as one matrix multiply of its
# patches on the CPU: XLA:CPU's convolution took 260 ms for a 3 x 3, 512 -> 512
# convolution on 32 2 x 2 maps, the patch product 3 ms (issue 14).
SMALL_OUTPUT_PIXELS = 9


def conv_patches_dot(x: jax.Array, kernel: jax.Array, stride: tuple[int, int],
                     padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """Dense convolution of NHWC ``x`` with an HWIO kernel as [B*oh*ow, kh*kw*I] patches
    (shifted strided slices, concatenated tap-major) times the kernel as a
    [kh*kw*I, O] matrix: the same function as ``lax.conv_general_dilated``. Taps that
    read only padding are left out first (``drop_padding_taps``)."""
    kernel, padding = drop_padding_taps(kernel, x.shape[1:3], stride, padding)
    kh, kw, i, o = kernel.shape
    taps = [window for _, window in _conv_windows(x, (kh, kw), stride, padding)]
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
    out = jnp.dot(patches.reshape(-1, kh * kw * i), kernel.reshape(kh * kw * i, o))
    return out.reshape(*patches.shape[:3], o)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
    """``jax.lax.conv_general_dilated`` (the signature ``nnx.Conv`` calls), except that
    when ``cpu_kernels_enabled()`` (decided when traced) a 2-D NHWC depthwise convolution
    goes through ``depthwise_conv_shifted``, and a dense one with at most
    SMALL_OUTPUT_PIXELS output pixels, or an unpadded 1 x 1 one, through
    ``conv_patches_dot`` (for 1 x 1 that is a plain matrix multiply, which XLA:CPU runs
    faster than its convolution, its two gradients included). ``conv()`` gives it to every
    ``nnx.Conv``; every other convolution falls through to XLA's op.
    """
    def native():
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kwargs)

    if (not cpu_kernels_enabled() or lhs.ndim != 4 or precision is not None
            or any(v is not None for v in kwargs.values())
            or any(d != 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))):
        return native()
    dims = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if dims != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC):
        return native()
    stride = tuple(int(s) for s in window_strides)
    pads = _padding_pairs(padding, lhs.shape[1:3], rhs.shape[:2], stride)
    channels = lhs.shape[-1]
    if feature_group_count == channels == rhs.shape[-1] > 1 and rhs.shape[2] == 1:
        return depthwise_conv_shifted(lhs, rhs, stride, pads)
    if feature_group_count == 1:
        oh, ow = _out_hw(lhs.shape[1:3], rhs.shape[:2], stride, pads)
        pointwise = rhs.shape[:2] == (1, 1) and pads == ((0, 0), (0, 0))
        if oh * ow <= SMALL_OUTPUT_PIXELS or pointwise:
            return conv_patches_dot(lhs, rhs, stride, pads)
    return native()


def conv(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
         padding: int | str = 0, groups: int = 1, use_bias: bool = False,
         dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
    """A 2-D convolution with PyTorch's padding semantics.

    ``padding`` is an int p (p zeros on every side, as ``torch.nn.Conv2d(padding=p)``;
    this differs from 'SAME' for stride 2 on even inputs, where 'SAME' pads only the
    bottom/right) or the string 'SAME' (TensorFlow's rule, used by EfficientNet).
    ``groups == in_channels`` gives a depthwise convolution. On the CPU some shapes are
    computed another way (see ``conv_general_dilated``).
    """
    pad = padding if isinstance(padding, str) else ((padding, padding), (padding, padding))
    return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size),
                    strides=(stride, stride), padding=pad, feature_group_count=groups,
                    use_bias=use_bias, kernel_init=_CONV_INIT, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs,
                    conv_general_dilated=conv_general_dilated)


def _batch_statistics(x):
    """Per-channel mean and (biased) variance of ``x`` [..., C], two-pass: the variance is
    mean((x - mean)^2), not E[x^2] - E[x]^2 (see ``batch_norm``)."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    return mean, jnp.mean(jnp.square(x - mean), axes)


def batch_norm_autodiff(x, scale, bias, epsilon):
    """Training-mode BatchNorm over the last axis as Flax computes it: (normalised and
    scaled ``x``, batch mean, batch variance), differentiated by JAX."""
    mean, var = _batch_statistics(x)
    return (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias, mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_hand_vjp(x, scale, bias, epsilon):
    return batch_norm_autodiff(x, scale, bias, epsilon)


def _batch_norm_fwd(x, scale, bias, epsilon):
    y, mean, var = batch_norm_autodiff(x, scale, bias, epsilon)
    return (y, mean, var), (x, mean, jax.lax.rsqrt(var + epsilon), scale)  # XLA shares rsqrt


def _batch_norm_bwd(epsilon, residuals, cotangents):
    """With xhat = (x - mean) * inv and n values per channel: d bias = sum g, d scale =
    sum g * xhat, dx = scale * inv * (g - mean g - xhat * mean(g * xhat)), plus the terms
    of the mean's and the variance's own cotangents (1/n and 2 (x - mean) / n each; zero
    in a network, where the running statistics take no gradient)."""
    x, mean, inv, scale = residuals
    g, g_mean, g_var = cotangents
    n = x.size // x.shape[-1]
    axes = tuple(range(x.ndim - 1))
    centred = x - mean
    sum_g = jnp.sum(g, axes)
    sum_g_xhat = jnp.sum(g * centred, axes) * inv
    dx = ((inv * scale) * (g - sum_g / n - centred * (inv * sum_g_xhat / n))
          + g_mean / n + centred * (2.0 * g_var / n))
    return dx, sum_g_xhat, sum_g


_batch_norm_hand_vjp.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def train_batch_norm(x, scale, bias, epsilon):
    """``batch_norm_autodiff`` with a hand-written backward pass: two sums over the
    batch and one elementwise pass, where JAX's autodiff differentiates the mean's and the
    variance's paths separately and XLA:CPU makes more full-size passes of it. Training
    steps at 227 px, batch 32: ResNet-18 1.14x faster, Lite0 1.16x, BN-Inception 1.09x,
    ResNet-50 1.03x; at 112 px 1.00-1.07x (experiments/bench_layer_forms.py
    --change=batch_norm, 3 December).
    """
    return _batch_norm_hand_vjp(x, scale, bias, float(epsilon))


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` whose training-mode call takes ``train_batch_norm`` when
    ``cpu_kernels_enabled()`` (decided when traced) and the plain case holds: channels
    last, no cross-device axis name or mask, scale and bias, one dtype throughout. The
    same function, statistics update included; everything else is Flax's."""

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        running = (self.use_running_average if use_running_average is None
                   else use_running_average)
        plain = (not running and mask is None and self.axis_name is None
                 and self.axis in (-1, x.ndim - 1) and self.scale is not None
                 and self.bias is not None and not self.use_fast_variance
                 and self.dtype in (None, x.dtype)
                 and x.dtype == self.scale[...].dtype == self.mean[...].dtype)
        if not (plain and cpu_kernels_enabled()):
            return super().__call__(x, use_running_average, mask=mask)
        y, mean, var = train_batch_norm(x, self.scale[...], self.bias[...], self.epsilon)
        momentum = self.momentum
        self.mean[...] = jax.lax.stop_gradient(momentum * self.mean[...] + (1 - momentum) * mean)
        self.var[...] = jax.lax.stop_gradient(momentum * self.var[...] + (1 - momentum) * var)
        return y


def batch_norm(num_features: int, *, momentum: float, epsilon: float, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs) -> BatchNorm:
    """BatchNorm over the channel axis, in Flax's momentum convention.

    Training mode (``model.train()``): normalise with the batch's mean/variance and update
    ``running = momentum * running + (1 - momentum) * batch`` (so Flax ``momentum`` m equals
    PyTorch ``momentum`` 1 - m). Eval mode (``model.eval()``): use the running statistics.
    Statistics are float32 even under a bfloat16 compute dtype. ``use_fast_variance`` is
    off because the Caffe-style 0-255 inputs of BN-Inception give large activations, where
    E[x^2] - E[x]^2 cancels badly in float32. On the CPU its training mode has its own
    backward pass (``BatchNorm``).
    """
    return BatchNorm(num_features, momentum=momentum, epsilon=epsilon, dtype=dtype,
                     param_dtype=param_dtype, use_fast_variance=False, rngs=rngs)


def linear(in_features: int, out_features: int, *, param_dtype=jnp.float32,
           rngs: nnx.Rngs) -> nnx.Linear:
    """A float32-compute dense layer (heads run in float32 even for bfloat16 backbones)."""
    return nnx.Linear(in_features, out_features, dtype=jnp.float32, param_dtype=param_dtype,
                      rngs=rngs)


def activation(x: jax.Array, leak: float | None = None, *, cap: float | None = None) -> jax.Array:
    """ReLU (``cap=None``) or ReLU6 (``cap=6``), optionally leaky on the negative side.

    ``leak=None``: ``max(x, 0)`` (then ``min(., cap)``). ``leak=a``:
    ``where(x >= 0, x, a * x)`` then the cap, so ``a = 0`` is the plain ReLU and
    ``a = 1`` removes the ReLU (for ReLU6 only the upper cap remains). This is the Group
    Loss++ "leak" applied to a network's last activation.

    Gradients follow PyTorch's ReLU / ReLU6: 0 at x = 0 and at x = cap (jnp.maximum /
    jnp.minimum would split a tie 0.5 / 0.5); NaN passes through, as in PyTorch.
    """
    # Written as selects, not jnp.maximum / jnp.minimum: their derivative compares the
    # input with the output twice and scales by 0.5 at ties, and XLA:CPU recomputes that
    # inside the backward pass's fusions; the select form trains ResNet-50 at 112 px
    # about 1.3x faster, the other backbones about 1.1x (experiments/bench_layer_forms.py
    # --change=activation).
    # x <= 0 (rather than x > 0 picking x) lets NaN through.
    y = jnp.where(x <= 0, jnp.zeros((), x.dtype), x) if leak is None else \
        jnp.where(x >= 0, x, leak * x)
    return y if cap is None else jnp.where(y >= cap, jnp.asarray(cap, y.dtype), y)


def pool_output_size(size: int, window: int, stride: int, padding: int = 0,
                     ceil_mode: bool = False) -> int:
    """PyTorch's pooled length along one axis (0 when the window does not fit).

    out = floor((size + 2p - window + (stride - 1 if ceil_mode else 0)) / stride) + 1, and
    with ceil_mode a last window that starts inside the right padding is dropped.
    """
    numerator = size + 2 * padding - window + (stride - 1 if ceil_mode else 0)
    out = numerator // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return max(out, 0)


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """torch.nn.Conv2d's output length along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


def _pool_padding(size: int, window: int, stride: int, padding: int,
                  ceil_mode: bool) -> tuple[int, int]:
    """(low, high) padding that reproduces PyTorch's pooled length along one axis.

    The extra right padding that realises the ceil is filled with the reduction's
    identity, so it never contributes (a window may hang over the edge, as in PyTorch).
    """
    out = pool_output_size(size, window, stride, padding, ceil_mode)
    if out < 1:
        raise ValueError(f"pooling window {window} (stride {stride}, padding {padding}) does not "
                         f"fit an input of size {size}")
    high = (out - 1) * stride + window - size - padding
    return padding, max(high, 0)


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0, *,
             ceil_mode: bool = False) -> jax.Array:
    """``torch.nn.MaxPool2d(window, stride, padding, ceil_mode)`` on NHWC input.

    Padding is -inf: padded positions never win, as in PyTorch.
    """
    pads = [(0, 0)] + [_pool_padding(s, window, stride, padding, ceil_mode)
                       for s in x.shape[1:3]] + [(0, 0)]
    if cpu_kernels_enabled():
        return _max_pool_shifted(x, (window, window), (stride, stride), tuple(pads[1:3]))
    return _max_pool_native(x, (window, window), (stride, stride), pads)


def _max_pool_native(x, window, stride, pads):
    # The init value must be a Python scalar: an array constant breaks reverse-mode autodiff.
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1,) + window + (1,),
                                 (1,) + stride + (1,), pads)


def _window_argmax(x, window, stride, pads):
    """(running maximum over the shifted strided slices of the -inf padded input, index
    of the winning tap in row-major order). A tie keeps the earlier tap (strict >), the
    first maximum of the window, as XLA's and PyTorch's max-pooling gradients do."""
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
    out_hw = tuple((padded.shape[1 + a] - window[a]) // stride[a] + 1 for a in range(2))
    index_dtype = jnp.int8 if window[0] * window[1] <= 127 else jnp.int32
    best = tap = None
    for t, (_, values) in enumerate(_window_slices(padded, window, stride, out_hw)):
        if best is None:
            best, tap = values, jnp.zeros(values.shape, index_dtype)
        else:
            wins = values > best
            best = jnp.where(wins, values, best)
            tap = jnp.where(wins, jnp.asarray(t, index_dtype), tap)
    return best, tap


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_shifted(x, window, stride, pads):
    """Max-pooling as a running maximum over shifted strided slices (``_window_argmax``).

    XLA:CPU's own max-pooling backward (select_and_scatter) is slow, and so is plain
    autodiff of the running maximum: XLA fuses the whole chain of comparisons, and the
    BatchNorm + ReLU that produced ``x``, into one loop over the input that re-evaluates
    them for every tap (ResNet-18 at 112 px: one such fusion took 100 ms of a 1.2 s
    step). So the forward pass also keeps each window's winning tap (one byte per output)
    and the backward pass spreads the cotangent from it without reading ``x``. (An
    earlier session suspected XLA:CPU of computing wrong BatchNorm gradients behind such
    a VJP; every backbone's float64 comparison in tests/test_cpu_kernels.py passes with
    this one, odd map sizes included.)
    """
    return _window_argmax(x, window, stride, pads)[0]


def _max_pool_shifted_fwd(x, window, stride, pads):
    best, tap = _window_argmax(x, window, stride, pads)
    return best, (tap, x.shape[1:3])


def _max_pool_shifted_bwd(window, stride, pads, residuals, g):
    """Each tap's share of the cotangent (where it won), placed back at the input rows and
    columns that tap reads (stride - 1 zeros between outputs; the padding cut off by
    negative edge pads), summed over the taps."""
    tap, in_hw = residuals
    total = None
    for t, (di, dj) in enumerate((di, dj) for di in range(window[0]) for dj in range(window[1])):
        config = [(0, 0, 0)]
        for a, offset in enumerate((di, dj)):
            reach = offset + (g.shape[1 + a] - 1) * stride[a] + 1   # padded rows it spans
            config.append((offset - pads[a][0], in_hw[a] + pads[a][0] - reach, stride[a] - 1))
        config.append((0, 0, 0))
        share = jax.lax.pad(jnp.where(tap == t, g, jnp.zeros((), g.dtype)),
                            jnp.zeros((), g.dtype), config)
        total = share if total is None else total + share
    return (total,)


_max_pool_shifted.defvjp(_max_pool_shifted_fwd, _max_pool_shifted_bwd)


def avg_pool_include_pad(x: jax.Array, window: int, stride: int = 1,
                         padding: int = 0) -> jax.Array:
    """``torch.nn.AvgPool2d(window, stride, padding, count_include_pad=True)``, NHWC.

    Zero padding, and every output is divided by ``window**2`` including padded cells
    (the border outputs are therefore damped, exactly as in the Caffe port).
    """
    pads = [(0, 0), (padding, padding), (padding, padding), (0, 0)]
    if cpu_kernels_enabled():
        padded = jnp.pad(x, pads)
        out_hw = tuple(conv_output_size(n, window, stride, padding) for n in x.shape[1:3])
        summed = None
        for _, values in _window_slices(padded, (window, window), (stride, stride), out_hw):
            summed = values if summed is None else summed + values
    else:
        summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, window, window, 1),
                                       (1, stride, stride, 1), pads)
    return summed / jnp.asarray(window * window, x.dtype)


def global_pool(x: jax.Array, pooling: str = "avg", pool_mix: float = 0.5) -> jax.Array:
    """Pool a feature map [B, H, W, C] to [B, C] in float32.

    'avg': mean over H, W; 'max': max over H, W; 'mix' (Group Loss++):
    ``pool_mix * max + (1 - pool_mix) * avg``.
    """
    x = x.astype(jnp.float32)
    if pooling == "avg":
        return jnp.mean(x, axis=(1, 2))
    if pooling == "max":
        return jnp.max(x, axis=(1, 2))
    if pooling == "mix":
        return pool_mix * jnp.max(x, axis=(1, 2)) + (1.0 - pool_mix) * jnp.mean(x, axis=(1, 2))
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def check_images(images: jax.Array, channels: int = 3, min_size: int = 1) -> None:
    """Raise ValueError unless ``images`` is [B, H, W, channels] with H, W >= min_size."""
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[-1] != channels:
        raise ValueError(f"images must have shape [B, H, W, {channels}], got {shape}")
    if min(shape[1:3]) < min_size:
        raise ValueError(f"images must be at least {min_size} px on each side, got shape {shape}")
