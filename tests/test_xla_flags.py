"""gl_jax.xla_flags: the command lines' XLA:CPU choice, made before JAX starts a backend."""
import os
import subprocess
import sys

import ml_collections
import pytest

from gl_jax import xla_flags

FLAG = xla_flags.EIGEN_CONVOLUTIONS


@pytest.mark.parametrize("flags, version, cpu_only, expected, why", [
    ("", "0.10.2", True, FLAG, None),
    ("--xla_force_host_platform_device_count=2", "0.10.0", True,
     f"--xla_force_host_platform_device_count=2 {FLAG}", None),
    (FLAG, "0.10.2", True, FLAG, None),                         # already there: once
    ("--xla_cpu_experimental_ynn_fusion_type=individual_convolution", "0.10.2", True,
     "--xla_cpu_experimental_ynn_fusion_type=individual_convolution", "already chooses"),
    ("", "0.11.0", True, "", "jaxlib 0.11.0 was not measured"),   # unknown flag: fatal
    ("", "0.10.2", False, "", "an accelerator backend may run"),
])
def test_the_flag_is_added_only_where_it_was_measured_and_asked(
        flags, version, cpu_only, expected, why):
    got, reason = xla_flags.eigen_convolutions_flags(flags, jaxlib_version=version,
                                                     cpu_only=cpu_only)
    assert got == expected
    assert (reason is None) if why is None else (why in reason)


def _config(on):
    return ml_collections.ConfigDict({"cpu": {"eigen_convolutions": on}})


def test_apply_changes_only_the_environment_it_is_given():
    environ = {"JAX_PLATFORMS": "cpu"}
    assert xla_flags.apply(_config(False), environ) is None and environ == {
        "JAX_PLATFORMS": "cpu"}
    message = xla_flags.apply(_config(True), environ)
    from jaxlib import version
    if version.__version__.startswith(xla_flags.MEASURED_JAXLIB):
        assert environ["XLA_FLAGS"] == FLAG and "Eigen" in message
    else:
        assert "XLA_FLAGS" not in environ and "not measured" in message
    environ = {"JAX_PLATFORMS": "cuda,cpu"}
    assert "accelerator" in xla_flags.apply(_config(True), environ)
    assert "XLA_FLAGS" not in environ
    # A config saved before the field existed asks for nothing.
    assert xla_flags.apply(ml_collections.ConfigDict({"seed": 0}), {}) is None


_PROBE = """
import os, sys, ml_collections
from gl_jax import xla_flags
xla_flags.apply(ml_collections.ConfigDict({"cpu": {"eigen_convolutions": sys.argv[1] == "on"}}))
import jax, jax.numpy as jnp
x, w = jnp.ones((8, 28, 28, 64)), jnp.ones((3, 3, 64, 64))
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
print("__ynn_fusion" in jax.jit(conv).lower(x, w).compile().as_text())
"""


@pytest.mark.slow
def test_the_flag_reaches_xla_when_set_before_the_backend_starts():
    from jaxlib import version
    if not version.__version__.startswith(xla_flags.MEASURED_JAXLIB):
        pytest.skip(f"jaxlib {version.__version__}: the flag is not set")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    ynn = {}
    for choice in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", _PROBE, choice], env=env, check=True,
                             capture_output=True, text=True, timeout=120)
        ynn[choice] = out.stdout.strip().splitlines()[-1] == "True"
    assert ynn == {"on": False, "off": True}
