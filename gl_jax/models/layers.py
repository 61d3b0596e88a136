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

from gl_jax.models import cpu_kernels as _cpu

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", relu); the
# Caffe port and EfficientNet use comparable He-style fan-out initialisations. Only
# matters when training from scratch: pretrained weights overwrite it.
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

POOLINGS = ("avg", "max", "mix")


CPU_KERNEL_CHOICES = {"auto": None, "on": True, "true": True, "off": False, "false": False}


def resolve_cpu_kernels(choice: bool | str) -> bool:
    """``cpu_kernels`` as given to a model: True / "on", False / "off", or "auto" (on
    exactly when JAX's default backend is the CPU). Decided once, when the model is built."""
    if isinstance(choice, bool):
        return choice
    key = choice.strip().lower() if isinstance(choice, str) else None
    if key not in CPU_KERNEL_CHOICES:
        raise ValueError(f"cpu_kernels must be True, False, 'auto', 'on' or 'off', "
                         f"got {choice!r}")
    chosen = CPU_KERNEL_CHOICES[key]
    return jax.default_backend() == "cpu" if chosen is None else chosen


def conv(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
         padding: int | str = 0, groups: int = 1, use_bias: bool = False,
         dtype=jnp.float32, param_dtype=jnp.float32, cpu_kernels: bool = False,
         rngs: nnx.Rngs) -> nnx.Conv:
    """A 2-D convolution with PyTorch's padding semantics.

    ``padding`` is an int p (p zeros on every side, as ``torch.nn.Conv2d(padding=p)``;
    this differs from 'SAME' for stride 2 on even inputs, where 'SAME' pads only the
    bottom/right) or the string 'SAME' (TensorFlow's rule, used by EfficientNet).
    ``groups == in_channels`` gives a depthwise convolution. ``cpu_kernels``: some shapes
    go through ``cpu_kernels.conv_general_dilated`` (the same function).
    """
    pad = padding if isinstance(padding, str) else ((padding, padding), (padding, padding))
    return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size),
                    strides=(stride, stride), padding=pad, feature_group_count=groups,
                    use_bias=use_bias, kernel_init=_CONV_INIT, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs,
                    conv_general_dilated=(_cpu.conv_general_dilated if cpu_kernels
                                          else jax.lax.conv_general_dilated))


class BatchNorm(nnx.Module):
    """BatchNorm over the last (channel) axis with Flax's state layout (``scale``, ``bias``
    Params; ``mean``, ``var`` BatchStats) and momentum convention.

    Training mode (``use_running_average`` False, set by ``model.train()``): normalise
    with the batch's two-pass mean and variance and update
    ``running = momentum * running + (1 - momentum) * batch``. Eval mode: the running
    statistics. Statistics are float32 even under a bfloat16 compute ``dtype``.
    ``cpu_kernels``: training mode goes through ``_cpu.train_batch_norm`` (the
    same function, with a closed-form JVP) instead of JAX's autodiff.
    """

    def __init__(self, num_features: int, *, momentum: float, epsilon: float,
                 dtype=jnp.float32, param_dtype=jnp.float32, cpu_kernels: bool = False,
                 rngs: nnx.Rngs):
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        # One key each, as nnx.BatchNorm draws them: later layers initialise as before.
        rngs.params()
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        rngs.params()
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.num_features = num_features
        self.use_running_average = False
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.dtype = dtype
        self.cpu_kernels = bool(cpu_kernels)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        x, scale, bias = (jnp.asarray(a, dtype) for a in (x, self.scale[...], self.bias[...]))
        if self.use_running_average:
            mean, var = (jnp.asarray(a, dtype) for a in (self.mean[...], self.var[...]))
            return (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        stats_dtype = jnp.promote_types(dtype, jnp.float32)
        args = (jnp.asarray(x, stats_dtype), jnp.asarray(scale, stats_dtype),
                jnp.asarray(bias, stats_dtype))
        if self.cpu_kernels:
            y, mean, var = _cpu.train_batch_norm(*args, self.epsilon)
        else:
            y, mean, var = _cpu.train_batch_norm.fun(*args, self.epsilon)
        m = self.momentum
        # set_value, not `[...] =`: Flax's indexed write probes the value's sharding, and
        # with jax 0.10 that probe on a tracer walks every equation traced so far (jax PR
        # 40041): tracing bninception's training step took 2.2 s instead of 0.9-1.3 s.
        self.mean.set_value(jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean))
        self.var.set_value(jax.lax.stop_gradient(m * self.var[...] + (1 - m) * var))
        return y.astype(dtype)


def batch_norm(num_features: int, *, momentum: float, epsilon: float, dtype=jnp.float32,
               param_dtype=jnp.float32, cpu_kernels: bool = False, rngs: nnx.Rngs) -> BatchNorm:
    """``BatchNorm`` in Flax's momentum convention: Flax ``momentum`` m equals PyTorch
    ``momentum`` 1 - m."""
    return BatchNorm(num_features, momentum=momentum, epsilon=epsilon, dtype=dtype,
                     param_dtype=param_dtype, cpu_kernels=cpu_kernels, rngs=rngs)


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
    # about 1.3x faster, the other backbones about 1.1x.
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
             ceil_mode: bool = False, cpu_kernels: bool = False) -> jax.Array:
    """``torch.nn.MaxPool2d(window, stride, padding, ceil_mode)`` on NHWC input.

    Padding is -inf: padded positions never win, as in PyTorch. ``cpu_kernels``: the
    same function through ``cpu_kernels.max_pool``.
    """
    pads = tuple(_pool_padding(s, window, stride, padding, ceil_mode) for s in x.shape[1:3])
    if cpu_kernels:
        return _cpu.max_pool(x, (window, window), (stride, stride), pads)
    # The init value must be a Python scalar: an array constant breaks reverse-mode autodiff.
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                                 (1, stride, stride, 1), ((0, 0), *pads, (0, 0)))


def avg_pool_include_pad(x: jax.Array, window: int, stride: int = 1, padding: int = 0, *,
                         cpu_kernels: bool = False) -> jax.Array:
    """``torch.nn.AvgPool2d(window, stride, padding, count_include_pad=True)``, NHWC.

    Zero padding, and every output is divided by ``window**2`` including padded cells
    (the border outputs are therefore damped, exactly as in the Caffe port).
    """
    if cpu_kernels:
        summed = _cpu.avg_pool_include_pad(x, window, stride, padding)
    else:
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
