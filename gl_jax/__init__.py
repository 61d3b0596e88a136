"""gl_jax: the Group Loss and Group Loss++ for deep metric learning in JAX/Flax NNX."""

__version__ = "0.1.0"


def __getattr__(name):
    # `gl_jax.Index` on first use: `import gl_jax` itself stays free of JAX.
    if name == "Index":
        from gl_jax.index import Index
        return Index
    raise AttributeError(f"module 'gl_jax' has no attribute {name!r}")
