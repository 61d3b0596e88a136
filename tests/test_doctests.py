"""The `>>>` examples in the docstrings run and print what they show."""
import doctest
import importlib

import pytest

MODULES = ["gl_jax.losses._group_loss", "gl_jax.losses._triplet", "gl_jax.losses._contrastive",
           "gl_jax.losses._multi_similarity", "gl_jax.losses._proxy_anchor",
           "gl_jax.losses._normalized_softmax", "gl_jax.strategies"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
