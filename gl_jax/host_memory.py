"""Host memory for XLA:CPU's step buffers: the command lines restart themselves once with
glibc tunables that stop every training step from paying for fresh pages.

XLA:CPU allocates the intermediates of a jitted step as host buffers and frees them after
the step. glibc maps such large blocks fresh and unmaps them on free, so every step's
buffers are new pages the kernel must fault in and zero: EfficientNet-Lite0's training
step at 112 px, batch 32, took about 200,000 faults (800 MB of fresh pages) per step,
ResNet-50's at 227 px about 4.5 GB. ``GL_JAX_HOST_MALLOC`` chooses what to do about it:

- ``huge_pages`` (the default): only ``glibc.malloc.hugetlb=1``: glibc asks for
  transparent huge pages on those mappings (2 MiB pages, 512 times fewer faults); the
  kernel still zeroes every fresh page, and resident memory does not grow.
- ``reuse``: glibc serves large blocks from its heap instead of fresh
  mappings and never gives freed memory back (``glibc.malloc.mmap_max=0``,
  ``glibc.malloc.trim_threshold`` = 1 TiB), and JAX runs CPU computations on the calling
  thread (``jax_cpu_enable_async_dispatch`` off; ``configure_jax``): the step buffer is
  then allocated by the main thread, whose heap can hold it (glibc's other threads' heaps
  cannot hold blocks over 64 MiB and map them fresh regardless), so the next step reuses
  the same pages. Huge pages as below are asked for too. The heap keeps what it held,
  and a small allocation in the hole of a freed step buffer sends the next one above it
  with the hole still resident (up to about twice the peak memory of ``huge_pages``);
  the trainer trims the heap after evaluations and after steps that set a new resident
  peak (``GrowthWatch``), which helps in some runs and not in others (steady steps that
  keep two buffer regions in use set no new peak: a Lite0 run at 227 px peaked at 8.9 GB once
  and 14.9 GB the next time, against 8.3 GB with ``huge_pages``). (With the computations
  on the calling thread the trainer's own work between steps would no longer overlap
  them; gl_jax.feed reads the next batch in a thread for that.) Faster steps (ResNet-50
  at 227 px: 1.20x) for uncertain memory, hence not the default.
- ``default``: glibc and JAX as they come.

`experiments/bench_allocator.py` measures the settings; docs/models.md has the tables.

glibc reads its tunables only when a process starts, hence the restart: ``python -m
gl_jax.main`` calls ``restart_with_tuned_malloc()`` before its imports and is replaced by
the same command with ``GLIBC_TUNABLES`` extended (same process id, so launchers and
schedulers do not notice). Nothing happens off glibc, when ``GLIBC_TUNABLES`` already sets
one of these tunables (the user's own choice), or with ``GL_JAX_HOST_MALLOC=default``;
huge pages are left out when the kernel's transparent huge pages are ``never``. The
restarted process carries ``GL_JAX_HOST_MALLOC_RESTARTED=1`` and never restarts again.
"""
from __future__ import annotations

import ctypes
import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
# Large blocks from the heap (never a fresh mapping), and freed memory never trimmed.
REUSE_TUNABLES = {"glibc.malloc.mmap_max": 0, "glibc.malloc.trim_threshold": 2 ** 40}
ENV = "GL_JAX_HOST_MALLOC"
MODES = ("huge_pages", "reuse", "default")
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


def mode(environ=None) -> str:
    """The ``GL_JAX_HOST_MALLOC`` setting (``huge_pages`` when unset); a ValueError names
    an unknown value."""
    value = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
    if value and value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value or MODES[0]


def tuned_environment(environ) -> dict | None:
    """``environ`` with the tunables of its ``GL_JAX_HOST_MALLOC`` mode added to
    GLIBC_TUNABLES, or None when nothing should change (see the module docstring)."""
    chosen = mode(environ)
    tunables = environ.get("GLIBC_TUNABLES", "")
    ours = [TUNABLE, *REUSE_TUNABLES]
    if (chosen == "default" or RESTARTED in environ or not _glibc()
            or any(name in tunables for name in ours)):
        return None
    settings = {TUNABLE: 1} if kernel_offers_huge_pages() else {}
    if chosen == "reuse":
        settings.update(REUSE_TUNABLES)
    if not settings:
        return None
    return dict(environ, **{RESTARTED: "1",
                            "GLIBC_TUNABLES": with_tunables(tunables, settings)})


def with_hugetlb(tunables: str, value: int) -> str:
    """A GLIBC_TUNABLES string with ``glibc.malloc.hugetlb`` set to ``value``, every other
    tunable kept."""
    return with_tunables(tunables, {TUNABLE: value})


def with_tunables(tunables: str, settings: dict) -> str:
    """A GLIBC_TUNABLES string with each ``name: value`` of ``settings`` set (appended in
    order, replacing any earlier setting of that name), every other tunable kept."""
    kept = [t for t in tunables.split(":") if t and t.split("=", 1)[0] not in settings]
    return ":".join(kept + [f"{name}={value}" for name, value in settings.items()])


def _last_setting(name: str, environ) -> str | None:
    """The value this process's GLIBC_TUNABLES give ``name`` last (glibc reads them in
    order), or None."""
    tunables = (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "")
    values = [t.split("=", 1)[1] for t in tunables.split(":") if t.startswith(name + "=")]
    return values[-1].strip() if values else None


def huge_pages_asked(environ=None) -> bool:
    """Whether this process's GLIBC_TUNABLES ask glibc for huge pages (1, or 2 for the
    kernel's hugetlbfs pool)."""
    return _last_setting(TUNABLE, environ) in ("1", "2")


def reuse_asked(environ=None) -> bool:
    """Whether this process's GLIBC_TUNABLES keep large blocks in the heap
    (``glibc.malloc.mmap_max=0``)."""
    return _last_setting("glibc.malloc.mmap_max", environ) == "0"


def configure_jax() -> bool:
    """Under ``reuse`` (the mode, with its tunables in effect), run JAX's CPU computations on
    the calling thread, so that the main thread allocates their buffers from the heap that
    keeps them. Must come before JAX
    starts its CPU backend (the flag is read then). Returns whether it did."""
    if mode() != "reuse" or not reuse_asked():
        return False
    import jax
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def release_free_memory() -> bool:
    """Under heap reuse (``glibc.malloc.mmap_max=0`` in effect), gives the free pages of
    glibc's heaps back to the kernel (``malloc_trim(0)``); returns whether it did.

    A freed step buffer stays resident for the next step; when a small allocation lands
    in its hole, the next buffer no longer fits there and is placed above it, and the
    hole's pages stay resident beside it unless released (`GrowthWatch`). The next use of
    a released page faults it in once."""
    if not (_glibc() and reuse_asked()):
        return False
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return True


def resident_peak() -> int:
    """This process's peak resident memory so far, in bytes (Linux's ru_maxrss, KiB)."""
    import resource     # not on every platform; only called where glibc is
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class GrowthWatch:
    """Called after each training step under heap reuse: when the process's resident peak
    rose by more than `slack` bytes since the last call, free heap memory is released
    (`release_free_memory`). In the steady state the step reuses its pages and
    the peak stays put, so nothing is released; a new peak means a buffer went somewhere
    new (the first steps, after an evaluation) and the hole it left would stay resident.
    (A Lite0 run at 227 px, batch 64, grew to 14 GB over its first two steps without it,
    against 8.4 GB with ``huge_pages``.) Steady steps that keep two buffer regions in use
    set no new peak and keep both resident: this does not catch them. A no-op elsewhere."""

    def __init__(self, slack: int = 64 << 20):
        self.active = _glibc() and reuse_asked()
        self.slack = slack
        self.peak = resident_peak() if self.active else 0

    def __call__(self) -> bool:
        """Returns whether it released memory."""
        if not self.active:
            return False
        peak = resident_peak()
        if peak <= self.peak + self.slack:
            return False
        self.peak = peak
        return release_free_memory()


def restart_with_tuned_malloc() -> None:
    """Replace this process by the same command line with the tunables of
    ``GL_JAX_HOST_MALLOC`` (if they are not set yet), then ``configure_jax``. Call it first
    thing in a program's ``__main__``: the restart repeats whatever ran before it."""
    env = tuned_environment(os.environ)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
    configure_jax()
