"""A tiny convolutional backbone for 8-32 px inputs (sklearn digits, CPU tests and demos).

    conv1 3x3 (3 -> 32) + BN + ReLU
    conv2 3x3 (32 -> 64) + BN + ReLU, then 2x2 max-pool (stride 2)
    conv3 3x3 (64 -> 64) + BN + activation (the "last block": leak applies here)

images [B, H, W, 3] -> feature map [B, H // 2, W // 2, 64]; about 56k parameters.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gl_jax.models import layers


class SmallCNN(nnx.Module):
    def __init__(self, *, bn_momentum: float, bn_epsilon: float, leak: float | None = None,
                 width: int = 32, dtype=jnp.float32, param_dtype=jnp.float32,
                 cpu_kernels: bool = False, rngs: nnx.Rngs):
        bn = dict(momentum=bn_momentum, epsilon=bn_epsilon, dtype=dtype, param_dtype=param_dtype,
                  cpu_kernels=cpu_kernels)
        conv = dict(padding=1, dtype=dtype, param_dtype=param_dtype, cpu_kernels=cpu_kernels,
                    rngs=rngs)
        self.dtype = dtype
        self.cpu_kernels = cpu_kernels
        self.leak = leak
        self.conv1 = layers.conv(3, width, 3, **conv)
        self.bn1 = layers.batch_norm(width, rngs=rngs, **bn)
        self.conv2 = layers.conv(width, 2 * width, 3, **conv)
        self.bn2 = layers.batch_norm(2 * width, rngs=rngs, **bn)
        self.conv3 = layers.conv(2 * width, 2 * width, 3, **conv)
        self.bn3 = layers.batch_norm(2 * width, rngs=rngs, **bn)
        self.num_features = 2 * width

    def __call__(self, images: jax.Array) -> jax.Array:
        layers.check_images(images, min_size=2)
        x = images.astype(self.dtype)
        x = layers.activation(self.bn1(self.conv1(x)))
        x = layers.activation(self.bn2(self.conv2(x)))
        x = layers.max_pool(x, 2, 2, cpu_kernels=self.cpu_kernels)
        return layers.activation(self.bn3(self.conv3(x)), self.leak)
