"""The model registry and ``create_model``: one entry per backbone, one interface for all.

BatchNorm momentum is in Flax's convention throughout:
``running = momentum * running + (1 - momentum) * batch_statistic``;
Flax momentum m is PyTorch momentum 1 - m. Defaults per backbone:

| backbone | momentum (Flax) | = PyTorch | epsilon | why |
|---|---|---|---|---|
| resnet* | 0.9 | 0.1 | 1e-5 | torchvision's BatchNorm2d defaults |
| bninception | 0.1 | 0.9 | 1e-5 | the Group Loss code builds every BN with momentum=0.9 (PyTorch) |
| efficientnet_lite0 | 0.99 | 0.01 | 1e-3 | TF EfficientNet-Lite's batch_norm_momentum / epsilon |
| small_cnn | 0.9 | 0.1 | 1e-5 | torch-like default |

The BN-Inception default (PyTorch 0.9 = Flax 0.1) makes the running statistics follow
the last few batches almost entirely (0.9 weight on the newest batch): that is what the
original code does, whether or not it was intended.
"""
from __future__ import annotations

import dataclasses
import math
import types
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from gl_jax.models import layers
from gl_jax.models.bninception import BNInception
from gl_jax.models.efficientnet_lite import EfficientNetLite0
from gl_jax.models.embedding_model import EmbeddingModel
from gl_jax.models.resnet import ResNet18, ResNet34, ResNet50, ResNet101
from gl_jax.models.small_cnn import SmallCNN


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and its BatchNorm defaults (Flax momentum convention).

    ``input_format`` documents what the data pipeline must feed (the model does not
    normalise): 'imagenet' = RGB in [0, 1] minus mean (0.485, 0.456, 0.406) divided by std
    (0.229, 0.224, 0.225); 'caffe_bgr' = BGR, 0-255, minus (104, 117, 128), std 1;
    'imagenet_lite' = RGB, (x_0_255 - 127) / 128 (TF EfficientNet-Lite's input, which the
    packaged ImageNet weights expect);
    'any' = whatever the user trains with.
    """

    build: Callable[..., nnx.Module]
    bn_momentum: float
    bn_epsilon: float
    num_features: int
    input_format: str
    description: str


_REGISTRY = {
    "resnet18": BackboneSpec(ResNet18, 0.9, 1e-5, 512, "imagenet", "torchvision ResNet-18"),
    "resnet34": BackboneSpec(ResNet34, 0.9, 1e-5, 512, "imagenet", "torchvision ResNet-34"),
    "resnet50": BackboneSpec(ResNet50, 0.9, 1e-5, 2048, "imagenet", "torchvision ResNet-50 (v1.5)"),
    "resnet101": BackboneSpec(ResNet101, 0.9, 1e-5, 2048, "imagenet",
                              "torchvision ResNet-101 (v1.5)"),
    "bninception": BackboneSpec(BNInception, 0.1, 1e-5, 1024, "caffe_bgr",
                                "BN-Inception, Caffe port (Cadene pretrainedmodels / Group Loss)"),
    "efficientnet_lite0": BackboneSpec(EfficientNetLite0, 0.99, 1e-3, 1280, "imagenet_lite",
                                       "EfficientNet-Lite0 (efficientnet_pytorch naming)"),
    "small_cnn": BackboneSpec(SmallCNN, 0.9, 1e-5, 64, "any",
                              "3-conv net for 8-32 px inputs (tests, digits)"),
}

registry = types.MappingProxyType(_REGISTRY)


def available_models() -> list[str]:
    """Sorted names accepted by ``create_model``."""
    return sorted(_REGISTRY)


def create_model(name: str, *, num_classes: int, embedding_dim: int | None = None,
                 pooling: str = "avg", pool_mix: float = 0.5, leak: float | None = None,
                 bn_momentum: float | None = None, bn_epsilon: float | None = None,
                 dtype=jnp.float32, param_dtype=jnp.float32, cpu_kernels: bool | str = "auto",
                 rngs: nnx.Rngs) -> EmbeddingModel:
    """Build ``name`` wrapped in the common interface ``embedding, aux = model(images)``.

    Args:
      name: one of ``available_models()``.
      num_classes: size of the classifier over the training classes (the Group Loss
        prior); 0 = no classifier (no 'logits' in aux).
      embedding_dim: None = the embedding is the pooled backbone feature (the paper);
        an int d adds ``Linear(num_features, d)``.
      pooling: 'avg', 'max' or 'mix' (``pool_mix * max + (1 - pool_mix) * avg``).
      pool_mix: lambda of the 'mix' pooling, in [0, 1].
      leak: None = plain ReLU at the last block's final activation; a float a = leaky
        slope a there (1.0 = identity). Pooling and leak change no parameter.
      bn_momentum, bn_epsilon: BatchNorm settings in Flax's convention; None = the
        backbone's default (see the module docstring).
      dtype: compute dtype of the backbone (e.g. jnp.bfloat16 on accelerators); the head
        and all outputs are float32.
      param_dtype: dtype of the parameters (keep float32).
      cpu_kernels: True, False or "auto" (on when JAX's default backend is the CPU): a
        few layers use the forms of ``gl_jax.models.cpu_kernels``, the same function
        (values and derivatives) that XLA:CPU runs faster. Fixed here, at build time.
      rngs: ``nnx.Rngs`` for the initialisation.

    The model starts in training mode (BatchNorm uses batch statistics and updates its
    running averages); call ``model.eval()`` for inference, ``model.train()`` to go back.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; known models: {available_models()}")
    spec = _REGISTRY[name]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
    if embedding_dim is not None and (isinstance(embedding_dim, bool)
                                      or not isinstance(embedding_dim, int) or embedding_dim < 1):
        raise ValueError(f"embedding_dim must be None or an int >= 1, got {embedding_dim!r}")
    if pooling not in layers.POOLINGS:
        raise ValueError(f"pooling must be one of {layers.POOLINGS}, got {pooling!r}")
    if not 0.0 <= float(pool_mix) <= 1.0:
        raise ValueError(f"pool_mix must be in [0, 1], got {pool_mix!r}")
    if leak is not None and not math.isfinite(float(leak)):
        raise ValueError(f"leak must be None or a finite float, got {leak!r}")
    momentum = spec.bn_momentum if bn_momentum is None else float(bn_momentum)
    epsilon = spec.bn_epsilon if bn_epsilon is None else float(bn_epsilon)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"bn_momentum must be in [0, 1) (Flax convention), got {bn_momentum!r}")
    if not epsilon > 0.0:
        raise ValueError(f"bn_epsilon must be > 0, got {bn_epsilon!r}")
    backbone = spec.build(bn_momentum=momentum, bn_epsilon=epsilon,
                          leak=None if leak is None else float(leak), dtype=dtype,
                          param_dtype=param_dtype,
                          cpu_kernels=layers.resolve_cpu_kernels(cpu_kernels), rngs=rngs)
    return EmbeddingModel(backbone, num_classes=num_classes, embedding_dim=embedding_dim,
                          pooling=pooling, pool_mix=float(pool_mix), param_dtype=param_dtype,
                          rngs=rngs)


class _ShapeKeys:
    """Stands in for ``nnx.Rngs`` where only shapes are built: keys from a Python counter.

    ``nnx.Rngs`` counts its draws in a Variable, and with jax 0.10 every write of a traced
    value into a Variable walks the whole trace so far (fixed upstream in jax-ml/jax#40041),
    so tracing BN-Inception's construction with it takes seconds; these keys take a tenth
    of that and never reach a shape.
    """

    def __init__(self):
        self._count = 0

    def params(self) -> jax.Array:
        self._count += 1
        return jax.random.key(self._count)


def abstract_model(name: str, **kwargs) -> EmbeddingModel:
    """``create_model(name, **kwargs)``'s structure without its initialisation: every
    parameter and statistic is a ``jax.ShapeDtypeStruct`` (a restore or conversion target;
    no program is compiled). Takes every argument of ``create_model`` but ``rngs``."""
    if "rngs" in kwargs:
        raise ValueError("abstract_model draws no random numbers; do not pass rngs")
    return nnx.eval_shape(lambda: create_model(name, rngs=_ShapeKeys(), **kwargs))


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param`` leaves; BatchNorm statistics excluded,
    as in PyTorch's ``sum(p.numel() for p in model.parameters())``)."""
    return sum(math.prod(leaf.shape)
               for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
