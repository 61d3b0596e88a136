"""Test-wide JAX setup: 4 simulated CPU devices and the persistent compilation cache.

XLA_FLAGS must be set before jax is imported anywhere, which is why it lives here.
"""
import gc
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's persistent compilation cache, set in the environment so that the command lines the
# tests start (python -m gl_jax.main ...) share it: every program, however quick to
# compile, since the tests compile hundreds of small ones. A second run of the fast tier
# takes about half the time of the first; a digits:quick subprocess 8 s instead of 12.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.expanduser("~"), ".cache", "gl_jax", "jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    """The bundled digits dataset's data config (1 validation class), sampler config and
    splits."""
    from gl_jax import data as gdata
    config = gdata.default_config("digits")
    config.val_classes = 1
    return config, gdata.default_sampler_config("digits"), gdata.load_splits(config)


def pytest_sessionfinish(session, exitstatus):
    """The tests leave a heap of millions of objects (JAX's traces and caches). pytest's
    end-of-session cleanup and the atexit handlers run full garbage collections over it,
    seconds each, while xdist waits for its workers: everything alive now is moved out
    of the collector's reach first."""
    gc.freeze()
