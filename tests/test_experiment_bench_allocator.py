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
    # The child checks that its tunables and JAX's dispatch are what each setting asks for.
    bench_allocator.main(["--models=small_cnn", "--sizes=16", "--batch=2", "--steps=1",
                          "--settings=default,huge_pages,reuse"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| small")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip().strip("|").split("|")]
    assert cells[1] == "16" and len(cells) == 2 + 3 * 3 + 2
    for fastest_median, faults, peak in (cells[2:5], cells[5:8], cells[8:11]):
        fastest, median = (float(x) for x in fastest_median.split(" / "))
        assert 0 <= fastest <= median and int(faults) >= 0 and float(peak) > 50
    assert all(c.endswith("x") and float(c[:-1]) > 0 for c in cells[-2:])


def test_reuse_sets_the_trainers_tunables_and_other_settings_drop_them(monkeypatch):
    monkeypatch.setattr(host_memory, "kernel_offers_huge_pages", lambda: True)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0:glibc.malloc.tcache_count=0")
    tunables = bench_allocator.child_environment("reuse")["GLIBC_TUNABLES"].split(":")
    assert tunables == ["glibc.malloc.tcache_count=0", "glibc.malloc.hugetlb=1",
                        "glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={2 ** 40}"]
    assert host_memory.reuse_asked({"GLIBC_TUNABLES": ":".join(tunables)})
    tunables = bench_allocator.child_environment("huge_pages")["GLIBC_TUNABLES"]
    assert tunables == "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"


def test_one_heap_sets_its_tunables_from_the_process_start(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4:glibc.malloc.tcache_count=0")
    tunables = bench_allocator.child_environment("one_heap")["GLIBC_TUNABLES"].split(":")
    assert tunables == ["glibc.malloc.tcache_count=0", "glibc.malloc.hugetlb=0",
                        "glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                        f"glibc.malloc.trim_threshold={2 ** 64 - 1}"]


def test_tcmalloc_is_preloaded_and_other_settings_drop_an_inherited_preload(monkeypatch,
                                                                            tmp_path):
    library = tmp_path / "libtcmalloc_minimal.so.4"
    library.write_bytes(b"")
    monkeypatch.setenv("LD_PRELOAD", "/somewhere/libother.so")
    env = bench_allocator.child_environment("tcmalloc", str(library))
    assert env["LD_PRELOAD"] == str(library)
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 2 ** 40
    assert "LD_PRELOAD" not in bench_allocator.child_environment("huge_pages", str(library))


def test_a_missing_tcmalloc_fails_before_anything_runs(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="nowhere.so is not a file"):
        bench_allocator.main(["--models=small_cnn", "--sizes=16", "--settings=tcmalloc",
                              f"--tcmalloc={tmp_path / 'nowhere.so'}"])
    import ctypes.util
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(ValueError, match="no libtcmalloc_minimal on this system"):
        bench_allocator.child_environment("tcmalloc")


@pytest.mark.skipif(not host_memory._glibc(), reason="reads the libraries glibc mapped")
def test_the_child_sees_which_libraries_are_mapped():
    assert bench_allocator._mapped("libc.so.6")
    assert not bench_allocator._mapped("/usr/lib/libnot_a_real_library.so.1")
    assert not bench_allocator._mapped(None)


@pytest.mark.skipif(not __import__("ctypes.util").util.find_library("tcmalloc_minimal"),
                    reason="needs the system's libtcmalloc_minimal")
def test_a_tiny_run_with_tcmalloc_preloaded(capsys):
    bench_allocator.main(["--models=small_cnn", "--sizes=16", "--batch=2", "--steps=1",
                          "--settings=default,tcmalloc"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| small")]
    assert len(rows) == 1 and rows[0].rstrip(" |").endswith("x")
