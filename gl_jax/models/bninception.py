"""BN-Inception (Inception v2 with BatchNorm) with the structure of the Caffe port.

This is the backbone of the Group Loss paper: the network that Cadene's
``pretrainedmodels`` ported from Caffe, as loaded by the original Group Loss code. Its
attribute names are the port's, flat on the backbone: ``conv1_7x7_s2``,
``conv1_7x7_s2_bn``, ``conv2_3x3_reduce``, ..., ``inception_3a_1x1``,
``inception_3a_1x1_bn``, ``inception_3a_double_3x3_2``, ``inception_5b_pool_proj_bn``.
Every convolution has a bias (Caffe) and is followed by BatchNorm and ReLU.

An inception block with input x concatenates, on channels, in this order:
    1x1:         relu(bn(conv1x1(x)))                         (absent in 3c, 4e)
    3x3:         relu(bn(conv3x3_s(relu(bn(conv1x1(x))))))
    double 3x3:  relu(bn(conv3x3_s(relu(bn(conv3x3(relu(bn(conv1x1(x)))))))))
    pool:        relu(bn(conv1x1(avgpool3x3(x))))   -- 5b: max-pool 3x3/1 instead;
                 3c, 4e: maxpool 3x3/2 (ceil mode) of x, no projection
The average pools are 3x3/1 with zero padding 1, dividing by 9 everywhere (Caffe's
count_include_pad). Max pools use PyTorch's ceil_mode=True output sizes.

Input: Caffe convention, BGR channel order, 0-255, minus (104, 117, 128), std 1 (the data
pipeline does this). At 224 or 227 px the final map is 7x7x1024; the port's 7x7 average
pool is then the global average, which is what we compute at every size.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gl_jax.models import layers


class InceptionSpec(NamedTuple):
    """Channel counts of one block; ``stride == 2`` marks the grid-reduction blocks."""

    name: str
    in_channels: int
    n1x1: int          # 0 = no 1x1 branch
    n3x3_reduce: int
    n3x3: int
    double_reduce: int
    double_3x3: int
    pool_proj: int     # 0 = pool output passed through unprojected
    pool: str          # 'avg' | 'max'
    stride: int


# The Caffe port's table (Ioffe & Szegedy 2015, Table 1 as implemented in the port).
INCEPTION_BLOCKS = (
    InceptionSpec("3a", 192, 64, 64, 64, 64, 96, 32, "avg", 1),
    InceptionSpec("3b", 256, 64, 64, 96, 64, 96, 64, "avg", 1),
    InceptionSpec("3c", 320, 0, 128, 160, 64, 96, 0, "max", 2),
    InceptionSpec("4a", 576, 224, 64, 96, 96, 128, 128, "avg", 1),
    InceptionSpec("4b", 576, 192, 96, 128, 96, 128, 128, "avg", 1),
    InceptionSpec("4c", 576, 160, 128, 160, 128, 160, 128, "avg", 1),
    InceptionSpec("4d", 608, 96, 128, 192, 160, 192, 128, "avg", 1),
    InceptionSpec("4e", 608, 0, 128, 192, 192, 256, 0, "max", 2),
    InceptionSpec("5a", 1056, 352, 192, 320, 160, 224, 128, "avg", 1),
    InceptionSpec("5b", 1024, 352, 192, 320, 192, 224, 128, "max", 1),
)


def final_grid(size: int) -> int:
    """Side of the final feature map for an input side ``size``; 0 if the network cannot
    take it.

    The grid-reduction blocks (3c, 4e) concatenate a 3x3/2 convolution (padding 1,
    ceil(n / 2) rows) with a 3x3/2 ceil-mode max-pool (ceil((n - 1) / 2) rows): they agree
    only for even n, so e.g. 112 px fails here exactly as in the original PyTorch port.
    """
    n = layers.conv_output_size(size, 7, 2, 3)
    n = layers.pool_output_size(n, 3, 2, ceil_mode=True)
    n = layers.pool_output_size(n, 3, 2, ceil_mode=True)
    for spec in INCEPTION_BLOCKS:
        if spec.stride == 2:
            conv = layers.conv_output_size(n, 3, 2, 1)
            if n < 1 or conv != layers.pool_output_size(n, 3, 2, ceil_mode=True):
                return 0
            n = conv
    return n


def block_out_channels(spec: InceptionSpec) -> int:
    pooled = spec.pool_proj if spec.pool_proj else spec.in_channels
    return spec.n1x1 + spec.n3x3 + spec.double_3x3 + pooled


class BNInception(nnx.Module):
    """images [B, H, W, 3] (Caffe-normalised BGR) -> feature map [B, h, w, 1024].

    ``leak`` makes the last block's (inception_5b's) four branch activations leaky.
    """

    def __init__(self, *, bn_momentum: float, bn_epsilon: float, leak: float | None = None,
                 dtype=jnp.float32, param_dtype=jnp.float32, cpu_kernels: bool = False,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.leak = leak
        self.cpu_kernels = cpu_kernels
        bn = dict(momentum=bn_momentum, epsilon=bn_epsilon, dtype=dtype, param_dtype=param_dtype,
                  cpu_kernels=cpu_kernels)
        conv = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, cpu_kernels=cpu_kernels)

        def add_unit(name, in_channels, out_channels, kernel, stride=1, padding=0):
            """conv ``name`` + BatchNorm ``name_bn``, the port's naming."""
            setattr(self, name, layers.conv(in_channels, out_channels, kernel, stride=stride,
                                            padding=padding, rngs=rngs, **conv))
            setattr(self, f"{name}_bn", layers.batch_norm(out_channels, rngs=rngs, **bn))

        add_unit("conv1_7x7_s2", 3, 64, 7, stride=2, padding=3)
        add_unit("conv2_3x3_reduce", 64, 64, 1)
        add_unit("conv2_3x3", 64, 192, 3, padding=1)
        for spec in INCEPTION_BLOCKS:
            prefix = f"inception_{spec.name}"
            if spec.n1x1:
                add_unit(f"{prefix}_1x1", spec.in_channels, spec.n1x1, 1)
            add_unit(f"{prefix}_3x3_reduce", spec.in_channels, spec.n3x3_reduce, 1)
            add_unit(f"{prefix}_3x3", spec.n3x3_reduce, spec.n3x3, 3, spec.stride, 1)
            add_unit(f"{prefix}_double_3x3_reduce", spec.in_channels, spec.double_reduce, 1)
            add_unit(f"{prefix}_double_3x3_1", spec.double_reduce, spec.double_3x3, 3, 1, 1)
            add_unit(f"{prefix}_double_3x3_2", spec.double_3x3, spec.double_3x3, 3, spec.stride, 1)
            if spec.pool_proj:
                add_unit(f"{prefix}_pool_proj", spec.in_channels, spec.pool_proj, 1)
        self.num_features = block_out_channels(INCEPTION_BLOCKS[-1])

    def _unit(self, name: str, x: jax.Array, leak: float | None = None) -> jax.Array:
        return layers.activation(getattr(self, f"{name}_bn")(getattr(self, name)(x)), leak)

    def _block(self, spec: InceptionSpec, x: jax.Array, leak: float | None) -> jax.Array:
        prefix = f"inception_{spec.name}"
        branches = []
        if spec.n1x1:
            branches.append(self._unit(f"{prefix}_1x1", x, leak))
        y = self._unit(f"{prefix}_3x3_reduce", x)
        branches.append(self._unit(f"{prefix}_3x3", y, leak))
        y = self._unit(f"{prefix}_double_3x3_reduce", x)
        y = self._unit(f"{prefix}_double_3x3_1", y)
        branches.append(self._unit(f"{prefix}_double_3x3_2", y, leak))
        if spec.stride == 2:
            pooled = layers.max_pool(x, 3, 2, ceil_mode=True, cpu_kernels=self.cpu_kernels)
        elif spec.pool == "max":
            pooled = layers.max_pool(x, 3, 1, 1, ceil_mode=True, cpu_kernels=self.cpu_kernels)
        else:
            pooled = layers.avg_pool_include_pad(x, 3, 1, 1, cpu_kernels=self.cpu_kernels)
        branches.append(self._unit(f"{prefix}_pool_proj", pooled, leak) if spec.pool_proj
                        else pooled)
        return jnp.concatenate(branches, axis=-1)

    def __call__(self, images: jax.Array) -> jax.Array:
        layers.check_images(images)
        for side in images.shape[1:3]:
            if not final_grid(side):
                valid = [n for n in range(max(side - 24, 1), side + 25) if final_grid(n)]
                raise ValueError(
                    f"bninception cannot take images of shape {tuple(images.shape)}: side "
                    f"{side} gives branches of different sizes in a grid-reduction block "
                    f"(the original Caffe port fails the same way); nearby valid sides: {valid}")
        x = images.astype(self.dtype)
        x = self._unit("conv1_7x7_s2", x)
        x = layers.max_pool(x, 3, 2, ceil_mode=True, cpu_kernels=self.cpu_kernels)
        x = self._unit("conv2_3x3_reduce", x)
        x = self._unit("conv2_3x3", x)
        x = layers.max_pool(x, 3, 2, ceil_mode=True, cpu_kernels=self.cpu_kernels)
        for index, spec in enumerate(INCEPTION_BLOCKS):
            last = index == len(INCEPTION_BLOCKS) - 1
            x = self._block(spec, x, self.leak if last else None)
        return x
