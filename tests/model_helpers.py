"""Shape-only backbones for the tests: a model's structure without its random
initialisation, which compiles one program per parameter shape (tens of seconds on a
2-core CPU for the big backbones)."""
import jax
from flax import nnx

from gl_jax.models import create_model


class ShapeKeys:
    """Stands in for ``nnx.Rngs`` when only shapes are built: keys from a Python counter.

    ``nnx.Rngs`` counts its draws in a Variable, and with jax 0.10 every write of a traced
    value into a Variable walks the whole trace so far (fixed upstream in jax-ml/jax#40041):
    tracing bninception's construction takes about 1.7 s with ``nnx.Rngs`` and 0.2 s with
    these keys. The keys never reach a shape; tests/test_models.py checks that both give
    the same state.
    """

    def __init__(self):
        self._count = 0

    def params(self) -> jax.Array:
        self._count += 1
        return jax.random.key(self._count)


def build_abstract(name: str, **kwargs):
    """``create_model(name, **kwargs)`` under ``nnx.eval_shape`` (1000 classes unless
    given): parameters and statistics are ShapeDtypeStructs."""
    kwargs.setdefault("num_classes", 1000)
    return nnx.eval_shape(lambda: create_model(name, rngs=ShapeKeys(), **kwargs))
