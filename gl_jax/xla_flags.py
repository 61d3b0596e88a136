"""XLA:CPU settings a command line may make for its own process, before JAX starts a
backend (XLA reads ``XLA_FLAGS`` once, then): never on import of any gl_jax module.

``config.cpu.eigen_convolutions``: XLA:CPU of jaxlib 0.10 runs dense convolutions through
YNNPACK; its Eigen convolutions train the default Omniglot run about 1.3x faster on a
2-core CPU (docs/training.md). The flag is experimental and an XLA that does not know it
refuses to start, so it is set only for the jaxlib versions where it was measured, only
when the process can run on nothing but the CPU, and never over the user's own
``XLA_FLAGS`` choice of YNNPACK fusions.
"""
from __future__ import annotations

import importlib.util
import os

EIGEN_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
MEASURED_JAXLIB = ("0.10.",)


def eigen_convolutions_flags(xla_flags: str, *, jaxlib_version: str,
                             cpu_only: bool) -> tuple[str, str | None]:
    """(XLA_FLAGS with Eigen convolutions, None) or (xla_flags unchanged, why not)."""
    if EIGEN_CONVOLUTIONS in xla_flags.split():
        return xla_flags, None
    if "xla_cpu_experimental_ynn_fusion_type" in xla_flags:
        return xla_flags, "XLA_FLAGS already chooses the YNNPACK fusions"
    if not jaxlib_version.startswith(MEASURED_JAXLIB):
        return xla_flags, (f"jaxlib {jaxlib_version} was not measured with it (known: "
                           f"{', '.join(v + 'x' for v in MEASURED_JAXLIB)})")
    if not cpu_only:
        return xla_flags, "an accelerator backend may run this process"
    return f"{xla_flags} {EIGEN_CONVOLUTIONS}".strip(), None


def _cpu_only(environ) -> bool:
    """True when JAX can only start its CPU backend: JAX_PLATFORMS names just 'cpu', or no
    accelerator plugin (jax_plugins, libtpu) is installed."""
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms == "cpu"
    return all(importlib.util.find_spec(name) is None for name in ("jax_plugins", "libtpu"))


def apply(config, environ=None) -> str | None:
    """Sets the process's XLA_FLAGS as ``config.cpu`` asks; call before JAX starts a
    backend. Returns a line for the log: what was set, or why it was not."""
    environ = os.environ if environ is None else environ
    cpu = config.get("cpu")   # absent from configs saved before the field existed
    if not (cpu and cpu.get("eigen_convolutions")):
        return None
    from jaxlib import version   # the version module only: no backend starts
    flags, why_not = eigen_convolutions_flags(environ.get("XLA_FLAGS", ""),
                                              jaxlib_version=version.__version__,
                                              cpu_only=_cpu_only(environ))
    if why_not:
        return f"config.cpu.eigen_convolutions: not set ({why_not})"
    environ["XLA_FLAGS"] = flags
    return "XLA:CPU convolutions: Eigen (config.cpu.eigen_convolutions)"
