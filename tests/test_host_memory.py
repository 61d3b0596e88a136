"""gl_jax.host_memory: the command lines restart once with glibc's tunables (huge pages, and
large blocks kept in the heap), after which a jitted call's large buffers stop costing a
page fault per 4 KiB page."""
import ast
import os
import platform
import subprocess
import sys

import pytest

from gl_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _thp_mode() -> str:
    try:
        with open(host_memory.THP_ENABLED) as f:
            return f.read()
    except OSError:
        return ""


def _child_env(**extra) -> dict:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def huge_pages_offered(tmp_path, monkeypatch):
    """A glibc system whose kernel offers transparent huge pages on request."""
    thp = tmp_path / "enabled"
    thp.write_text("always [madvise] never\n")
    monkeypatch.setattr(host_memory, "THP_ENABLED", str(thp))
    monkeypatch.setattr(host_memory, "_glibc", lambda: True)
    return thp


REUSE = f"glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={2 ** 40}"


def test_the_tunables_are_added_to_the_environment(huge_pages_offered):
    env = host_memory.tuned_environment({"HOME": "/h"})
    assert env == {"HOME": "/h", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
                   host_memory.RESTARTED: "1"}
    env = host_memory.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2",
                                         host_memory.ENV: " Reuse"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1:" + REUSE
    env = host_memory.tuned_environment({host_memory.ENV: "huge_pages"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_an_unknown_mode_is_an_error_naming_it(huge_pages_offered):
    with pytest.raises(ValueError, match="GL_JAX_HOST_MALLOC='hugepages': expected one of "
                                         "huge_pages, reuse, default"):
        host_memory.tuned_environment({host_memory.ENV: "hugepages"})


@pytest.mark.parametrize("environ", [
    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},              # the restarted process
    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},              # the user's own choices
    {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=65536"},
    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
    {host_memory.ENV: "Default"},                              # opted out
    {host_memory.RESTARTED: "1"},                              # tunables dropped on the way
])
def test_nothing_changes_when_set_already_or_opted_out(huge_pages_offered, environ):
    assert host_memory.tuned_environment(environ) is None


@pytest.mark.parametrize("thp", ["always madvise [never]\n", None])
def test_without_the_kernels_huge_pages_only_reuse_is_set(huge_pages_offered, thp):
    if thp is None:
        huge_pages_offered.unlink()
    else:
        huge_pages_offered.write_text(thp)
    assert host_memory.tuned_environment({host_memory.ENV: "reuse"})["GLIBC_TUNABLES"] == REUSE
    assert host_memory.tuned_environment({}) is None


def test_nothing_changes_off_glibc(monkeypatch, tmp_path):
    thp = tmp_path / "enabled"
    thp.write_text("[always] madvise never\n")
    monkeypatch.setattr(host_memory, "THP_ENABLED", str(thp))

    def not_glibc(name):
        raise ValueError(f"unrecognized configuration name {name}")
    monkeypatch.setattr(host_memory.os, "confstr", not_glibc)
    assert host_memory.tuned_environment({}) is None


@pytest.mark.parametrize("tunables, asked", [
    ("", False), ("glibc.malloc.hugetlb=1", True),
    ("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2", True),
    ("glibc.malloc.hugetlb=0", False), ("glibc.malloc.hugetlb=1:glibc.malloc.hugetlb=0", False),
])
def test_huge_pages_asked_reads_the_last_setting(tunables, asked):
    assert host_memory.huge_pages_asked({"GLIBC_TUNABLES": tunables}) is asked


@pytest.mark.parametrize("tunables, asked", [
    ("", False), (REUSE, True), ("glibc.malloc.mmap_max=0:glibc.malloc.mmap_max=8", False),
    ("glibc.malloc.mmap_max=00", False), ("glibc.malloc.hugetlb=1", False),
])
def test_reuse_asked_reads_the_last_setting(tunables, asked):
    assert host_memory.reuse_asked({"GLIBC_TUNABLES": tunables}) is asked


def test_jax_is_configured_only_under_reuse(monkeypatch):
    # Not run here (JAX's backend may have started); whether configure_jax would act.
    calls = []
    monkeypatch.setattr(host_memory, "reuse_asked", lambda environ=None: True)
    monkeypatch.setitem(sys.modules, "jax", type(sys)("jax"))
    sys.modules["jax"].config = type("C", (), {"update": lambda *a: calls.append(a[-2:])})()
    for chosen in ("default", "huge_pages"):
        monkeypatch.setenv(host_memory.ENV, chosen)
        assert host_memory.configure_jax() is False and calls == []
    monkeypatch.setenv(host_memory.ENV, "reuse")
    assert host_memory.configure_jax() is True
    assert calls == [("jax_cpu_enable_async_dispatch", False)]


@pytest.mark.skipif(not GLIBC, reason="a glibc tunable")
def test_the_restart_happens_once_with_the_same_command_line(tmp_path):
    code = ("import os, sys; from gl_jax import host_memory; "
            "host_memory.THP_ENABLED = sys.argv[1]; host_memory.restart_with_tuned_malloc(); "
            "from jax._src import xla_bridge; "
            "print(os.getpid(), os.environ['GLIBC_TUNABLES'], sys.argv[2], "
            "xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value)")
    thp = tmp_path / "enabled"
    thp.write_text("always [madvise] never\n")
    done = subprocess.run([sys.executable, "-c", code, str(thp), "an argument"],
                          capture_output=True, text=True, check=True,
                          env=_child_env(GLIBC_TUNABLES="", GL_JAX_HOST_MALLOC="reuse"))
    lines = done.stdout.splitlines()
    # One line: the restarted process's, with JAX's CPU computations on the calling thread.
    assert len(lines) == 1
    assert lines[0].endswith(f" glibc.malloc.hugetlb=1:{REUSE} an argument False")


@pytest.mark.skipif(not GLIBC, reason="a glibc tunable")
@pytest.mark.parametrize("module, loads_jax_first", [
    ("gl_jax.main", False), ("gl_jax.evaluate", False), ("experiments.bench_trainer", False),
    # The benchmarks that import JAX at the top restart after it (a second lost, no harm:
    # the backend and its threads start on first use).
    ("experiments.bench_models", True), ("experiments.bench_convs", True),
    ("experiments.bench_layer_forms", True),
])
def test_the_command_lines_restart_first(module, loads_jax_first, tmp_path):
    thp = tmp_path / "enabled"
    thp.write_text("always [madvise] never\n")
    # os.execve replaced by a report: what it would run, and what was loaded by then.
    code = f"""
import os, runpy, sys
from gl_jax import host_memory
host_memory.THP_ENABLED = {str(thp)!r}
def report(path, argv, env):
    print(path == sys.executable, argv == sys.orig_argv, env["GLIBC_TUNABLES"],
          "jax" in sys.modules, "tensorflow" in sys.modules)
    sys.exit(0)
os.execve = report
runpy.run_module({module!r}, run_name="__main__")
print("no restart")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=_child_env(GLIBC_TUNABLES=""))
    assert done.stdout.split() == ["True", "True", "glibc.malloc.hugetlb=1",
                                   str(loads_jax_first), "False"]


# A child process (the tunables are read at start): the minor page faults of each of 100
# calls of a jitted function with a 64 MiB output, JAX configured as the command lines do.
_FAULTS = """
import resource
from gl_jax import host_memory
host_memory.configure_jax()
import jax, jax.numpy as jnp
double = jax.jit(lambda x: x * 2.0)
x = jnp.ones((16, 1024, 1024), jnp.float32)
for _ in range(100):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = double(x).block_until_ready()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env) -> list[int]:
    done = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True,
                          text=True, check=True)
    return [int(line) for line in done.stdout.split()]


@pytest.mark.skipif(not GLIBC or "[never]" in _thp_mode() or not _thp_mode(),
                    reason="needs glibc and the kernel's transparent huge pages")
def test_huge_pages_remove_the_page_faults_of_a_repeated_jitted_call():
    default = _child_env(GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    if "[madvise]" in _thp_mode():
        # 64 MiB of fresh 4 KiB pages: 16,384 faults (huge pages only where asked for).
        assert min(_faults(default)[2:]) > 15000
    huge = host_memory.tuned_environment(_child_env(GLIBC_TUNABLES=""))
    assert huge["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert max(_faults(huge)[2:]) < 1000


@pytest.mark.skipif(not GLIBC, reason="glibc tunables")
def test_reuse_alone_stops_most_page_faults_of_a_repeated_jitted_call():
    # Without huge pages, so that only pages used again avoid the 16,384 faults. The heap
    # grows during the first calls, and now and then later (small allocations land in the
    # holes the large blocks leave: 6-7 of 300 calls faulted on this machine), then holds
    # the pattern; by default every call maps fresh pages.
    faults = _faults(_child_env(GLIBC_TUNABLES="glibc.malloc.hugetlb=0:" + REUSE,
                                GL_JAX_HOST_MALLOC="reuse"))
    assert sum(f > 8000 for f in faults) <= 20, faults
    if "[madvise]" in _thp_mode() or "[never]" in _thp_mode():
        assert min(_faults(_child_env(GLIBC_TUNABLES="glibc.malloc.hugetlb=0"))[2:]) > 15000


# A child process: a 256 MiB block from the heap, touched, then freed below a small block
# that keeps it from being the heap's top; resident bytes before the release, what the
# release gave back, and whether it ran.
_RELEASE = """
import ctypes, os
from gl_jax import host_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
big = libc.malloc(256 << 20)
ctypes.memset(big, 1, 256 << 20)
pin = libc.malloc(4096)
libc.free(big)
before = resident()
released = host_memory.release_free_memory()
print(before, before - resident(), released)
"""


def _release(tunables: str) -> tuple[int, int, str]:
    done = subprocess.run([sys.executable, "-c", _RELEASE], capture_output=True, text=True,
                          env=_child_env(GLIBC_TUNABLES=tunables), check=True)
    before, given_back, released = done.stdout.split()
    return int(before), int(given_back), released


@pytest.mark.skipif(not GLIBC, reason="glibc tunables")
def test_release_gives_the_free_heap_pages_back_under_reuse_only():
    # Under reuse the freed block stays resident (never trimmed) until the release.
    before, given_back, released = _release("glibc.malloc.hugetlb=0:" + REUSE)
    assert released == "True"
    assert before > 256 << 20
    assert given_back > 240 << 20
    # Elsewhere glibc maps such a block on its own and unmaps it at free: nothing to do.
    before, given_back, released = _release("glibc.malloc.hugetlb=0")
    assert released == "False"
    assert before < 200 << 20


def test_the_step_watch_releases_after_the_first_step_and_when_a_step_leaves_more(
        monkeypatch):
    reads, released = iter([1000, 1600, 1600, 1650, 2300, 1000, 1600, 900]), []
    monkeypatch.setattr(host_memory, "resident_now", lambda: next(reads))
    monkeypatch.setattr(host_memory, "release_free_memory",
                        lambda: released.append(True) or True)
    monkeypatch.setattr(host_memory, "_glibc", lambda: True)
    monkeypatch.setenv("GLIBC_TUNABLES", REUSE)
    watch = host_memory.StepWatch(slack=100)
    # First step: released (floor 1000); 1600: the step adds 600; 1600, 1650: within
    # 1000 + 600 + 100; 2300: released (floor 1000); 1600: the step measured again.
    assert [watch() for _ in range(6)] == [True, False, False, False, True, False]
    assert (watch.floor, watch.step_bytes, len(released)) == (1000, 600, 2)
    assert watch.reset() and (watch.floor, watch.step_bytes, len(released)) == (900, None, 3)


def test_the_step_watch_does_nothing_without_reuse(monkeypatch):
    monkeypatch.setattr(host_memory, "resident_now", lambda: pytest.fail("read"))
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    watch = host_memory.StepWatch()
    assert not watch.active and watch() is False and watch.reset() is False


# A child under the reuse tunables: "steps" that allocate a 256 MiB block, touch it, pin
# a block above it and free it. The third step finds the block's pages again; before the
# fourth, a small allocation takes the start of the hole, so the block goes above it and
# the hole's pages stay resident: what the watch is for. Before the first step a mapping
# of 768 MiB, touched and unmapped (as compilation's memory), sets a resident peak that no
# step reaches again: watching the peak would miss the fourth step.
_STEPS = """
import ctypes
from gl_jax import host_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = libc.mmap.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
transient = libc.mmap(None, 768 << 20, 3, 0x22, -1, 0)     # read/write, private anonymous
ctypes.memset(transient, 1, 768 << 20)
libc.munmap(transient, 768 << 20)
size, pins = 256 << 20, []
def step():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    pins.append(libc.malloc(8 << 20))
    libc.free(block)
watch = host_memory.StepWatch(slack=64 << 20)
results = []
for i in range(4):
    if i == 3:
        pins.append(libc.malloc(1 << 20))
    step()
    before = host_memory.resident_now()
    results.append((watch(), before - host_memory.resident_now()))
print(results)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc tunables")
def test_the_step_watch_gives_back_a_hole_left_beside_the_step_buffer():
    done = subprocess.run([sys.executable, "-c", _STEPS], capture_output=True, text=True,
                          env=_child_env(GLIBC_TUNABLES="glibc.malloc.hugetlb=0:" + REUSE),
                          check=True)
    results = ast.literal_eval(done.stdout)
    assert [released for released, _ in results] == [True, False, False, True]
    assert results[0][1] > 240 << 20 and results[3][1] > 240 << 20   # bytes given back
    # Nothing given back after steps 2 and 3 (the interpreter itself may touch a new page
    # between the two reads, which depended on the size of host_memory's docstring).
    assert results[1][1] <= 0 and results[2][1] <= 0
