"""gl_jax: the Group Loss and Group Loss++ for deep metric learning in JAX/Flax NNX."""

__version__ = "0.1.0"
