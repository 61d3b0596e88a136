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
- ``reuse``: glibc serves large blocks from its heap instead of fresh mappings and never
  gives freed memory back (``glibc.malloc.mmap_max=0``, ``glibc.malloc.trim_threshold`` =
  1 TiB), and JAX runs CPU computations on the calling thread
  (``jax_cpu_enable_async_dispatch`` off; ``configure_jax``): the step buffer is then
  allocated by the main thread, whose heap can hold it (glibc's other threads' heaps
  cannot hold blocks over 64 MiB and map them fresh regardless), so the next step reuses
  the same pages. Huge pages as below are asked for too. The heap keeps what it held, and
  when the next buffer does not land where the last one was (a small allocation took the
  start of the hole, or a block of 40 MB or more from another thread, which glibc then
  serves from the main heap: `experiments/heap_arenas.py`), the hole stays resident beside
  it, up to about twice the peak memory of ``huge_pages``. The trainer therefore gives the
  heap's free pages back before and after every evaluation and after a step that leaves
  more resident than one step buffer (``StepWatch``): whole Lite0 runs at 227 px then
  peaked at 7.9-8.7 GB against 8.2-8.3 GB with ``huge_pages``, but one run of an earlier,
  tighter version of the watch reached 13.4 GB within a single step, before any watch
  could act. (With the computations on the calling thread the trainer's own work between
  steps would no longer overlap them; gl_jax.feed reads the next batch in a thread for
  that.) Faster steps (ResNet-50 at 227 px: 1.20x) for memory that is not bounded in every
  case, hence not the default.
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
    hole's pages stay resident beside it unless released (`StepWatch`). The next use of
    a released page faults it in once."""
    if not (_glibc() and reuse_asked()):
        return False
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return True


def resident_now() -> int:
    """This process's resident memory now, in bytes (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class StepWatch:
    """Under heap reuse, keeps the heap's resident memory at about one step buffer above
    what the process holds between steps. Call it after every training step and `reset`
    it around other work (evaluations).

    A step's buffer is freed when the step ends and stays resident for the next step to
    use again; that is the point of ``reuse``. It goes wrong when the next buffer does not
    land where the last one was (a small allocation took the start of the hole, or the
    step's outputs sit above it): the hole stays resident beside the new buffer. So the
    watch measures what one step adds (the resident size after the first step that
    follows a release, minus the size right after that release) and releases the heap's
    free pages (`release_free_memory`) whenever a step leaves more resident than that
    plus half of it (at least `slack`). After the first step, which also leaves
    compilation's garbage behind, it releases unconditionally. In the steady state the
    step finds its pages again and nothing is released; a release costs the next step its
    page faults, as every step pays under ``huge_pages``. A no-op elsewhere."""

    def __init__(self, slack: int = 64 << 20):
        self.active = _glibc() and reuse_asked()
        self.slack = slack
        self.floor = None        # resident bytes right after the last release
        self.step_bytes = None   # what the first step after it added

    def reset(self) -> bool:
        """Release now and measure the next step afresh; returns whether it released."""
        if not self.active:
            return False
        release_free_memory()
        self.floor, self.step_bytes = resident_now(), None
        return True

    def __call__(self) -> bool:
        """Returns whether it released memory."""
        if not self.active:
            return False
        if self.floor is None:
            return self.reset()
        now = resident_now()
        if self.step_bytes is None:
            self.step_bytes = max(now - self.floor, 0)
            return False
        # Half a step's buffer of leeway: what else a step leaves (checkpoint writes,
        # logging) varies by 100 MB or so from step to step, while a buffer placed anew
        # adds a whole one.
        if now <= self.floor + self.step_bytes + max(self.slack, self.step_bytes // 2):
            return False
        return self.reset()


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
