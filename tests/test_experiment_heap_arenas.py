"""experiments/heap_arenas.py: where a second thread's large blocks go under each mode."""
import platform

import pytest

from experiments import heap_arenas

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="glibc tunables")
def test_under_reuse_a_threads_large_blocks_reach_the_main_heap(capsys):
    heap_arenas.main(["--sizes_mb=20,40", "--blocks=12", "--live=2",
                      "--modes=huge_pages,reuse,default"])
    rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    taken = {(mode.strip(), mb.strip()): int(n) for mode, mb, n in rows}
    # Blocks that fit the thread's own 64 MiB heaps stay there; 40 MB ones, two at a time,
    # do not, and without fresh mappings every third comes from the main thread's heap.
    assert taken[("reuse", "20")] == 0 and taken[("reuse", "40")] >= 3
    # With fresh mappings allowed (huge pages, or glibc as it comes) none does.
    assert taken[("huge_pages", "40")] == taken[("default", "40")] == 0


@pytest.mark.skipif(not GLIBC, reason="glibc tunables")
def test_the_modes_tunables_are_the_trainers():
    assert "glibc.malloc.mmap_max=0" in heap_arenas.tunables("reuse")
    assert "mmap_max" not in heap_arenas.tunables("huge_pages")
    assert heap_arenas.tunables("default") == ""
