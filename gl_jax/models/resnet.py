"""ResNet-18/34/50/101 with torchvision's structure and attribute names.

The state paths under ``backbone`` are torchvision's state-dict keys with '.' -> path
separators: ``conv1``, ``bn1``, ``layer1[0].conv1``, ``layer2[0].downsample[0]`` (the 1x1
convolution) and ``downsample[1]`` (its BatchNorm), ... Blocks are torchvision's v1.5: in
a Bottleneck the stride sits on the 3x3 convolution. Convolutions have no bias.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from gl_jax.models import layers


class BasicBlock(nnx.Module):
    """Two 3x3 convolutions + identity/projection shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, *, bn: dict, conv: dict,
                 rngs: nnx.Rngs):
        out = width * self.expansion
        self.conv1 = layers.conv(in_channels, width, 3, stride=stride, padding=1, rngs=rngs, **conv)
        self.bn1 = layers.batch_norm(width, rngs=rngs, **bn)
        self.conv2 = layers.conv(width, out, 3, padding=1, rngs=rngs, **conv)
        self.bn2 = layers.batch_norm(out, rngs=rngs, **bn)
        self.downsample = _shortcut(in_channels, out, stride, bn=bn, conv=conv, rngs=rngs)

    def __call__(self, x: jax.Array, leak: float | None = None) -> jax.Array:
        y = layers.activation(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return layers.activation(y + _apply_shortcut(self.downsample, x), leak)


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand x4 + shortcut (ResNet-50/101)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, *, bn: dict, conv: dict,
                 rngs: nnx.Rngs):
        out = width * self.expansion
        self.conv1 = layers.conv(in_channels, width, 1, rngs=rngs, **conv)
        self.bn1 = layers.batch_norm(width, rngs=rngs, **bn)
        self.conv2 = layers.conv(width, width, 3, stride=stride, padding=1, rngs=rngs, **conv)
        self.bn2 = layers.batch_norm(width, rngs=rngs, **bn)
        self.conv3 = layers.conv(width, out, 1, rngs=rngs, **conv)
        self.bn3 = layers.batch_norm(out, rngs=rngs, **bn)
        self.downsample = _shortcut(in_channels, out, stride, bn=bn, conv=conv, rngs=rngs)

    def __call__(self, x: jax.Array, leak: float | None = None) -> jax.Array:
        y = layers.activation(self.bn1(self.conv1(x)))
        y = layers.activation(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return layers.activation(y + _apply_shortcut(self.downsample, x), leak)


def _shortcut(in_channels, out_channels, stride, *, bn, conv, rngs):
    """torchvision's ``downsample = Sequential(conv1x1(stride), BatchNorm)`` or None."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nnx.List([layers.conv(in_channels, out_channels, 1, stride=stride, rngs=rngs, **conv),
                     layers.batch_norm(out_channels, rngs=rngs, **bn)])


def _apply_shortcut(downsample, x):
    if downsample is None:
        return x
    projection, norm = downsample
    return norm(projection(x))


class ResNet(nnx.Module):
    """torchvision ResNet without ``avgpool``/``fc`` (the EmbeddingModel adds those).

    images [B, H, W, 3] -> feature map [B, ceil(H/32), ceil(W/32), 512 * expansion].
    ``leak`` makes the very last activation (after layer4's last residual add) leaky.
    """

    def __init__(self, block: type, stage_sizes: tuple[int, ...], *, bn_momentum: float,
                 bn_epsilon: float, leak: float | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, cpu_kernels: bool = False, rngs: nnx.Rngs):
        bn = dict(momentum=bn_momentum, epsilon=bn_epsilon, dtype=dtype, param_dtype=param_dtype,
                  cpu_kernels=cpu_kernels)
        conv = dict(dtype=dtype, param_dtype=param_dtype, cpu_kernels=cpu_kernels)
        self.dtype = dtype
        self.cpu_kernels = cpu_kernels
        self.leak = leak
        self.conv1 = layers.conv(3, 64, 7, stride=2, padding=3, rngs=rngs, **conv)
        self.bn1 = layers.batch_norm(64, rngs=rngs, **bn)
        channels = 64
        for stage, blocks in enumerate(stage_sizes):
            width = 64 * 2 ** stage
            stage_blocks = []
            for index in range(blocks):
                stride = 2 if (stage > 0 and index == 0) else 1
                stage_blocks.append(block(channels, width, stride, bn=bn, conv=conv, rngs=rngs))
                channels = width * block.expansion
            setattr(self, f"layer{stage + 1}", nnx.List(stage_blocks))
        self.num_stages = len(stage_sizes)
        self.num_features = channels

    def __call__(self, images: jax.Array) -> jax.Array:
        x = images.astype(self.dtype)
        x = layers.activation(self.bn1(self.conv1(x)))
        x = layers.max_pool(x, 3, 2, 1, cpu_kernels=self.cpu_kernels)
        for stage in range(1, self.num_stages + 1):
            blocks = getattr(self, f"layer{stage}")
            for index, block in enumerate(blocks):
                last = stage == self.num_stages and index == len(blocks) - 1
                x = block(x, self.leak if last else None)
        return x


ResNet18 = functools.partial(ResNet, BasicBlock, (2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, BasicBlock, (3, 4, 6, 3))
ResNet50 = functools.partial(ResNet, Bottleneck, (3, 4, 6, 3))
ResNet101 = functools.partial(ResNet, Bottleneck, (3, 4, 23, 3))
