"""CPU forms of a few layers: the same functions as XLA's native ops, written so that
XLA:CPU runs them fast.

XLA:CPU is slow on some ops the backbones use: the backward pass of max pooling
(select_and_scatter), depthwise convolutions (their kernel gradient becomes a dense C x C
convolution), dense convolutions with tiny outputs or 1 x 1 kernels, and the autodiff of
training-mode BatchNorm. Here the same math is computed from shifted strided slices,
which XLA fuses into a few loops, or as one matrix multiply. On a GPU or TPU XLA's own
ops are the right choice.

Nothing here is chosen from the environment: a model takes ``cpu_kernels`` when it is
built (``models.create_model(..., cpu_kernels="auto")``, auto = on exactly when JAX's
default backend is the CPU) and the layers call these functions or XLA's. Both forms are
the same function with the same derivatives, forward mode included
(tests/test_cpu_kernels.py): the custom rules below are JVP rules, so ``jax.jvp`` and
``jax.jacfwd`` work, and reverse mode transposes them.

All tensors are NHWC; convolution kernels HWIO.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# A dense convolution whose output is at most this many pixels (the last stage of an
# ImageNet-stem network on 48-64 px inputs: 2 x 2) runs as one matrix multiply of its
# patches: XLA:CPU's convolution took 260 ms for a 3 x 3, 512 -> 512 convolution on 32
# 2 x 2 maps, the patch product 3 ms.
SMALL_OUTPUT_PIXELS = 9

_NHWC = ("NHWC", "HWIO", "NHWC")


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


def _padding_pairs(padding, in_hw, window, stride) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        return tuple(jax.lax.padtype_to_pads(in_hw, window, stride, padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _out_hw(in_hw, window, stride, padding) -> tuple[int, int]:
    """A padded, strided window's output size per spatial axis (0 when it does not fit)."""
    return tuple(max((in_hw[a] + sum(padding[a]) - window[a]) // stride[a] + 1, 0)
                 for a in range(2))


def _conv_windows(x, window, stride, padding):
    """((di, dj), window slice) of ``x`` zero-padded by ``padding`` (a negative pad crops):
    one per tap of a convolution, each the size of its output."""
    padded = jax.lax.pad(x, jnp.zeros((), x.dtype),
                         ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
    return _window_slices(padded, window, stride, _out_hw(x.shape[1:3], window, stride, padding))


def drop_padding_taps(kernel, in_hw, stride, padding):
    """(kernel, padding) of the same convolution without the kernel rows and columns that
    read only padding for every output position.

    Such taps multiply zeros: on maps smaller than the kernel's reach (the last stages of
    the ImageNet-stem networks on 32 px inputs: a 3 x 3 convolution of a 1 x 1 map reads
    its input with the centre tap only) they were most of the work. Along an axis of
    input length n, taps before lo - (out - 1) * stride read only the low padding and taps
    from lo + n on only the high padding; the rest keep their offsets (new low padding
    lo - first) and the high padding becomes what exactly fits the same outputs (negative:
    unread input rows cut off). Autodiff through the crop gives the dropped taps a zero
    gradient.
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


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: tuple[int, int],
                   padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """Depthwise convolution (multiplier 1) of ``x`` with a kernel [kh, kw, 1, C], as a sum
    of kh * kw shifted, strided slices times one kernel tap each: the function of
    ``lax.conv_general_dilated(..., feature_group_count=C)``, differentiated by JAX. XLA's
    grouped convolution computes its kernel gradient as a dense C x C convolution plus a
    diagonal extraction on the CPU (EfficientNet-Lite0's training step about 5x slower at
    112 px)."""
    stride = tuple(int(s) for s in stride)
    kernel, padding = drop_padding_taps(kernel, x.shape[1:3], stride,
                                        tuple((int(lo), int(hi)) for lo, hi in padding))
    total = None
    for (di, dj), window in _conv_windows(x, kernel.shape[:2], stride, padding):
        term = window * kernel[di, dj, 0]
        total = term if total is None else total + term
    return total


def conv_patches_dot(x: jax.Array, kernel: jax.Array, stride: tuple[int, int],
                     padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """Dense convolution as [B*oh*ow, kh*kw*I] patches (shifted strided slices,
    concatenated tap-major) times the kernel as a [kh*kw*I, O] matrix: the function of
    ``lax.conv_general_dilated``. Taps that read only padding are left out first."""
    kernel, padding = drop_padding_taps(kernel, x.shape[1:3], stride, padding)
    kh, kw, i, o = kernel.shape
    taps = [window for _, window in _conv_windows(x, (kh, kw), stride, padding)]
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
    out = jnp.dot(patches.reshape(-1, kh * kw * i), kernel.reshape(kh * kw * i, o))
    return out.reshape(*patches.shape[:3], o)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
    """``jax.lax.conv_general_dilated`` (the signature ``nnx.Conv`` calls), except that a
    2-D NHWC depthwise convolution goes through ``depthwise_conv``, and a dense one with
    at most SMALL_OUTPUT_PIXELS output pixels, or an unpadded 1 x 1 one, through
    ``conv_patches_dot`` (for 1 x 1 a plain matrix multiply, which XLA:CPU runs faster
    than its convolution, gradients included). Everything else is XLA's op."""
    def native():
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kwargs)

    if (lhs.ndim != 4 or precision is not None
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
        return depthwise_conv(lhs, rhs, stride, pads)
    if feature_group_count == 1:
        oh, ow = _out_hw(lhs.shape[1:3], rhs.shape[:2], stride, pads)
        pointwise = rhs.shape[:2] == (1, 1) and pads == ((0, 0), (0, 0))
        if oh * ow <= SMALL_OUTPUT_PIXELS or pointwise:
            return conv_patches_dot(lhs, rhs, stride, pads)
    return native()


# ------------------------------------------------------------------------ BatchNorm
def batch_statistics(x):
    """Per-channel mean and (biased) variance of ``x`` [..., C], two-pass: the variance is
    mean((x - mean)^2), not E[x^2] - E[x]^2, which cancels badly for BN-Inception's 0-255
    inputs in float32."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    return mean, jnp.mean(jnp.square(x - mean), axes)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def train_batch_norm(x, scale, bias, epsilon):
    """Training-mode BatchNorm over the last axis: (normalised, scaled and shifted ``x``,
    batch mean, batch variance), as ``layers.BatchNorm`` computes it.

    Its JVP rule is written in closed form. With xhat = (x - mean) * inv, inv =
    rsqrt(var + eps) and means over the n values of each channel:
    d xhat = inv * (dx - mean(dx) - xhat * mean(xhat * dx)), d mean = mean(dx),
    d var = 2 mean((x - mean) * dx). JAX's transpose of it is the usual two-sum backward
    pass, where autodiff of the forward differentiates the mean's and the variance's paths
    separately and XLA:CPU makes more full-size passes (training steps at 227 px 1.03-1.16x
    faster with the closed form)."""
    mean, var = batch_statistics(x)
    return (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias, mean, var


@train_batch_norm.defjvp
def _train_batch_norm_jvp(epsilon, primals, tangents):
    x, scale, bias = primals
    dx, dscale, dbias = tangents
    mean, var = batch_statistics(x)
    inv = jax.lax.rsqrt(var + epsilon)
    xhat = (x - mean) * inv
    axes = tuple(range(x.ndim - 1))
    d_mean = jnp.mean(dx, axes)
    xhat_dx = jnp.mean(xhat * dx, axes)
    d_xhat = inv * (dx - d_mean - xhat * xhat_dx)
    y = (x - mean) * (inv * scale) + bias     # the primal's own expression, bit for bit
    dy = d_xhat * scale + xhat * dscale + dbias
    # 2 mean((x - mean) dx) = 2 xhat_dx / inv
    return (y, mean, var), (dy, d_mean, 2.0 * xhat_dx / inv)


# ----------------------------------------------------------------------------- pooling
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


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window: tuple[int, int], stride: tuple[int, int], pads):
    """Max pooling of ``x`` over ``window`` with ``stride`` and (low, high) ``pads`` per
    spatial axis (-inf padding), as a running maximum over shifted strided slices.

    The JVP rule picks each output's tangent from its window's winning tap (one byte per
    output, kept from the forward pass); its transpose spreads the cotangent back from
    the taps without reading ``x``. Plain autodiff of the running maximum makes XLA:CPU
    fuse the whole chain of comparisons, and the BatchNorm + ReLU before it, into one
    loop that re-evaluates them for every tap (ResNet-18 at 112 px: one such fusion took
    100 ms of a 1.2 s step), and XLA's own max-pooling backward is slow too.
    """
    return _window_argmax(x, window, stride, pads)[0]


@max_pool.defjvp
def _max_pool_jvp(window, stride, pads, primals, tangents):
    (x,), (dx,) = primals, tangents
    best, tap = _window_argmax(x, window, stride, pads)
    padded = jnp.pad(dx, ((0, 0), *pads, (0, 0)))
    zero = jnp.zeros((), dx.dtype)
    d_best = None
    for t, (_, values) in enumerate(_window_slices(padded, window, stride, best.shape[1:3])):
        share = jnp.where(tap == t, values, zero)
        d_best = share if d_best is None else d_best + share
    return best, d_best


def avg_pool_include_pad(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """The sum over each zero-padded window, as shifted strided slices (the caller
    divides): XLA:CPU's reduce_window backward is a slow scatter."""
    padded = jnp.pad(x, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
    out_hw = tuple((n + 2 * padding - window) // stride + 1 for n in x.shape[1:3])
    summed = None
    for _, values in _window_slices(padded, (window, window), (stride, stride), out_hw):
        summed = values if summed is None else summed + values
    return summed
