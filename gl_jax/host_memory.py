"""Huge pages for large host buffers: the command lines restart themselves once with glibc's
``glibc.malloc.hugetlb=1`` tunable when the kernel offers transparent huge pages.

XLA:CPU allocates the intermediates of a jitted step as host buffers and frees them after
the step. glibc maps such large blocks fresh and unmaps them on free, so every step pays
one page fault per 4 KiB page: EfficientNet-Lite0's training step at 112 px, batch 32,
took about 200,000 faults (800 MB of fresh pages) per step. With the tunable, glibc asks
for transparent huge pages on those mappings (2 MiB pages, 512 times fewer faults), for
the same resident memory. `experiments/bench_allocator.py` measures it; docs/models.md
has the table.

glibc reads its tunables only when a process starts, hence the restart: ``python -m
gl_jax.main`` calls ``restart_with_huge_pages()`` before its imports and is replaced by the
same command with ``GLIBC_TUNABLES`` extended (same process id, so launchers and
schedulers do not notice). Nothing happens off glibc, when the kernel's transparent huge
pages are ``never``, when ``GLIBC_TUNABLES`` already sets the tunable (0 keeps glibc's
default), or when ``GL_JAX_HOST_MALLOC=default``. The restarted process carries
``GL_JAX_HOST_MALLOC_RESTARTED=1`` and never restarts again.
"""
from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
ENV = "GL_JAX_HOST_MALLOC"
# Set in the restarted process's environment: a second restart never happens, even where
# the environment comes back without GLIBC_TUNABLES (glibc drops it in secure mode).
RESTARTED = "GL_JAX_HOST_MALLOC_RESTARTED"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):    # not a glibc system
        return False


def kernel_offers_huge_pages() -> bool:
    try:
        with open(THP_ENABLED) as f:
            mode = f.read()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def environment_with_huge_pages(environ) -> dict | None:
    """``environ`` plus ``glibc.malloc.hugetlb=1`` in GLIBC_TUNABLES, or None when nothing
    should change (see the module docstring)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (environ.get(ENV, "").strip().lower() == "default" or TUNABLE in tunables
            or RESTARTED in environ or not _glibc() or not kernel_offers_huge_pages()):
        return None
    return dict(environ, **{RESTARTED: "1", "GLIBC_TUNABLES": with_hugetlb(tunables, 1)})


def with_hugetlb(tunables: str, value: int) -> str:
    """A GLIBC_TUNABLES string with ``glibc.malloc.hugetlb`` set to ``value``, every other
    tunable kept."""
    return with_tunables(tunables, {TUNABLE: value})


def with_tunables(tunables: str, settings: dict) -> str:
    """A GLIBC_TUNABLES string with each ``name: value`` of ``settings`` set (appended in
    order, replacing any earlier setting of that name), every other tunable kept."""
    kept = [t for t in tunables.split(":") if t and t.split("=", 1)[0] not in settings]
    return ":".join(kept + [f"{name}={value}" for name, value in settings.items()])


def huge_pages_asked(environ=None) -> bool:
    """Whether this process's GLIBC_TUNABLES ask glibc for huge pages (1, or 2 for the
    kernel's hugetlbfs pool)."""
    tunables = (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "")
    values = [t.split("=", 1)[-1] for t in tunables.split(":") if t.startswith(TUNABLE + "=")]
    return bool(values) and values[-1].strip() in ("1", "2")


def restart_with_huge_pages() -> None:
    """Replace this process by the same command line with huge pages asked for, if they
    are not yet (returns without doing anything otherwise). Call it first thing in a
    program's ``__main__``: the restart repeats whatever ran before it."""
    env = environment_with_huge_pages(os.environ)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
