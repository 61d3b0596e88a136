"""Building blocks shared by the backbones: PyTorch-compatible convolutions, BatchNorm,
pooling and the Group Loss++ leaky activation.

All tensors are NHWC (``[batch, height, width, channels]``). Convolution kernels are
HWIO (``[kh, kw, in / groups, out]``): a PyTorch ``OIHW`` weight maps to it with
``weight.transpose(2, 3, 1, 0)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", relu); the
# Caffe port and EfficientNet use comparable He-style fan-out initialisations. Only
# matters when training from scratch: pretrained weights overwrite it.
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

POOLINGS = ("avg", "max", "mix")


def conv(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
         padding: int | str = 0, groups: int = 1, use_bias: bool = False,
         dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
    """A 2-D convolution with PyTorch's padding semantics.

    ``padding`` is an int p (p zeros on every side, as ``torch.nn.Conv2d(padding=p)``;
    this differs from 'SAME' for stride 2 on even inputs, where 'SAME' pads only the
    bottom/right) or the string 'SAME' (TensorFlow's rule, used by EfficientNet).
    ``groups == in_channels`` gives a depthwise convolution.
    """
    pad = padding if isinstance(padding, str) else ((padding, padding), (padding, padding))
    return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size),
                    strides=(stride, stride), padding=pad, feature_group_count=groups,
                    use_bias=use_bias, kernel_init=_CONV_INIT, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)


def batch_norm(num_features: int, *, momentum: float, epsilon: float, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """BatchNorm over the channel axis, in Flax's momentum convention.

    Training mode (``model.train()``): normalise with the batch's mean/variance and update
    ``running = momentum * running + (1 - momentum) * batch`` (so Flax ``momentum`` m equals
    PyTorch ``momentum`` 1 - m). Eval mode (``model.eval()``): use the running statistics.
    Statistics are float32 even under a bfloat16 compute dtype. ``use_fast_variance`` is
    off because the Caffe-style 0-255 inputs of BN-Inception give large activations, where
    E[x^2] - E[x]^2 cancels badly in float32.
    """
    return nnx.BatchNorm(num_features, momentum=momentum, epsilon=epsilon, dtype=dtype,
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
    """
    y = jnp.maximum(x, 0) if leak is None else jnp.where(x >= 0, x, leak * x)
    return y if cap is None else jnp.minimum(y, cap)


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
    # The init value must be a Python scalar: an array constant breaks reverse-mode autodiff.
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max,
                                 (1, window, window, 1), (1, stride, stride, 1), pads)


def avg_pool_include_pad(x: jax.Array, window: int, stride: int = 1,
                         padding: int = 0) -> jax.Array:
    """``torch.nn.AvgPool2d(window, stride, padding, count_include_pad=True)``, NHWC.

    Zero padding, and every output is divided by ``window**2`` including padded cells
    (the border outputs are therefore damped, exactly as in the Caffe port).
    """
    pads = [(0, 0), (padding, padding), (padding, padding), (0, 0)]
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
