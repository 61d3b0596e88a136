"""experiments/bench_host_malloc.py: whole trainer runs per GL_JAX_HOST_MALLOC mode."""
import json
import os
import sys

import pytest

from experiments import bench_host_malloc as bench
from gl_jax import host_memory


def test_arguments_after_the_separator_go_to_the_trainer():
    args = bench.parse_args(["--modes=reuse,default", "--rounds=3", "--",
                             "--config=configs/digits.py:quick"])
    assert (args.modes, args.rounds, args.run) == (["reuse", "default"], 3,
                                                   ["--config=configs/digits.py:quick"])
    assert bench.parse_args([]).run == bench.DEFAULT_RUN


def test_bad_arguments_are_errors_naming_the_value():
    with pytest.raises(ValueError, match="GL_JAX_HOST_MALLOC='hugepages'"):
        bench.parse_args(["--modes=reuse,hugepages"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds=0"])


def test_measure_reports_the_childs_own_peak_status_and_stderr(tmp_path):
    def run(code):
        return bench.measure([sys.executable, "-c", code], dict(os.environ), cwd=str(tmp_path))
    # A child's peak is at least what it inherits from this (large) test process at the
    # fork; an allocation 200 MiB larger than that lifts it above, and the next child does
    # not see it.
    _, empty, status, _ = run("pass")
    assert status == 0
    size = empty + (200 << 20)
    seconds, peak, status, tail = run(f"import sys; block = bytearray({size}); "
                                      "sys.stderr.write('bye'); sys.exit(3)")
    assert status == 3 and tail.endswith("bye") and seconds > 0
    assert size < peak < size + (100 << 20)
    _, after, _, _ = run("pass")
    assert after < empty + (50 << 20) < peak


def test_each_run_gets_its_mode_a_fresh_workdir_and_no_inherited_tunables(monkeypatch):
    seen = []

    def fake_measure(command, env, cwd=bench.REPO):
        workdir = command[-1].split("=", 1)[1]
        seen.append((env[host_memory.ENV], "GLIBC_TUNABLES" in env, workdir))
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump({"test": {"recall@1": 0.5}}, f)
        return 2.0, 100 << 20, 0, ""
    monkeypatch.setattr(bench, "measure", fake_measure)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    rows = bench.main(["--modes=huge_pages,reuse", "--rounds=2", "--", "--config=x.py"])
    assert [(m, t) for m, t, _ in seen] == [("huge_pages", False), ("reuse", False)] * 2
    assert len({w for _, _, w in seen}) == 4
    assert [r["recall@1"] for r in rows] == [0.5] * 4 and rows[0]["peak_mb"] == 100


def test_a_failed_run_raises_with_its_stderr(monkeypatch):
    monkeypatch.setattr(bench, "measure", lambda *a, **k: (1.0, 1, 2, "Traceback: boom"))
    with pytest.raises(RuntimeError, match="exited with 2:\nTraceback: boom"):
        bench.one_run("reuse", ["--config=x.py"])


def test_summary_takes_medians_and_ratios_to_the_first_mode():
    rows = [{"mode": "huge_pages", "seconds": s, "peak_mb": 1000.0} for s in (10, 30, 20)]
    rows += [{"mode": "reuse", "seconds": s, "peak_mb": mb} for s, mb in ((15, 900), (16, 1100))]
    table = bench.summary(rows, ["huge_pages", "reuse"]).splitlines()
    assert table[2] == "| huge_pages | 20.0 | 1000 | 1.00x | 1.00x |"
    assert table[3] == "| reuse | 15.5 | 1000 | 0.78x | 1.00x |"
