"""experiments/bench_allocator.py: settings are checked before any child runs, and one tiny
real run in fresh processes gives one row with both settings' figures."""
import pytest

from experiments import bench_allocator
from gl_jax import host_memory


def test_an_unknown_setting_fails_before_anything_runs():
    with pytest.raises(ValueError, match="unknown setting 'hugepages'"):
        bench_allocator.main(["--models=small_cnn", "--sizes=16", "--settings=default,hugepages"])


def test_the_child_environment_sets_the_tunable_once(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2")
    env = bench_allocator.child_environment("default")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"
    assert env["BENCH_ALLOCATOR_SETTING"] == "default"


@pytest.mark.skipif(not (host_memory._glibc() and host_memory.kernel_offers_huge_pages()),
                    reason="needs glibc and transparent huge pages")
def test_a_tiny_run_in_child_processes(capsys):
    bench_allocator.main(["--models=small_cnn", "--sizes=16", "--batch=2", "--steps=1",
                          "--settings=default,huge_pages"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| small")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip().strip("|").split("|")]
    assert cells[1] == "16" and len(cells) == 2 + 3 * 2 + 1
    for fastest_median, faults, peak in (cells[2:5], cells[5:8]):
        fastest, median = (float(x) for x in fastest_median.split(" / "))
        assert 0 <= fastest <= median and int(faults) >= 0 and float(peak) > 50
    assert cells[-1].endswith("x") and float(cells[-1][:-1]) > 0


def test_one_heap_sets_its_tunables_from_the_process_start(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4:glibc.malloc.tcache_count=0")
    tunables = bench_allocator.child_environment("one_heap")["GLIBC_TUNABLES"].split(":")
    assert tunables == ["glibc.malloc.tcache_count=0", "glibc.malloc.hugetlb=0",
                        "glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                        f"glibc.malloc.trim_threshold={2 ** 64 - 1}"]
