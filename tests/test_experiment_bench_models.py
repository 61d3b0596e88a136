"""experiments/bench_models.py: one real (tiny) run of its table, and the table's columns."""
import importlib.util
import os
import platform
import subprocess
import sys

import pytest

from experiments import bench_models


def _cells(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_table_columns_are_computed_from_the_measured_rates():
    rows = [{"model": "m", "size": 100, "dtype": "float32", "params": 2e6, "compile": 1.0,
             "fwd": 30.0, "fwd_bwd": 10.0, "torch": 20.0},
            {"model": "m", "size": 100, "dtype": "bfloat16", "params": 2e6, "compile": 1.0,
             "fwd": None, "fwd_bwd": 25.0, "torch": None}]
    header, _, f32, bf16 = bench_models.format_table(rows).splitlines()
    names = _cells(header)
    f32, bf16 = dict(zip(names, _cells(f32))), dict(zip(names, _cells(bf16)))
    assert f32["step Mpx/s"] == "0.10"          # 10 img/s x 100 x 100 px
    assert f32["fwd / step"] == "3.00"
    assert f32["gl_jax / PyTorch"] == "0.50x"
    assert bf16["bf16 speed-up step"] == "2.50x" and bf16["gl_jax / PyTorch"] == "-"


def test_a_tiny_run_prints_one_row_per_size(capsys):
    bench_models.main(["--models=small_cnn", "--sizes=16,24", "--batch=2", "--steps=1",
                       "--torch=off"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| small")]
    assert [_cells(line)[1] for line in lines] == ["16", "24"]
    for line in lines:
        cells = _cells(line)
        step, mpx = float(cells[6]), float(cells[7])
        assert step > 0 and abs(mpx - step * int(cells[1]) ** 2 / 1e6) <= 0.006


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_the_steady_allocator_takes_effect_on_glibc():
    assert bench_models.torch_reference.steady_allocator() is True


def test_cheap_steps_are_timed_until_they_add_up_to_min_seconds(monkeypatch):
    # A fake clock: the first call takes 30 ms, the later ones 10-12 ms, whatever else runs.
    clock = [0.0]
    monkeypatch.setattr(bench_models.time, "perf_counter", lambda: clock[0])
    calls = []

    def step():
        calls.append(1)
        clock[0] += 0.03 if len(calls) == 1 else 0.01 + 0.001 * (len(calls) % 3)

    first, fastest = bench_models._time(step, steps=2, min_seconds=0.1)
    assert len(calls) == 1 + 10           # warm-up + the calls until 0.1 s is reached (0.111)
    assert fastest == pytest.approx(0.010) and first == pytest.approx(0.03)
    calls.clear()
    bench_models._time(step, steps=2, min_seconds=10.0, max_steps=5)
    assert len(calls) == 1 + 5                      # capped
    calls.clear()
    bench_models._time(step, steps=4, min_seconds=0.0)
    assert len(calls) == 1 + 4                      # at least `steps`


def test_two_steps_are_timed_in_turns_until_both_add_up_to_min_seconds(monkeypatch):
    # Fake clock: "a" takes 10 ms, "b" 40 ms, and b's third call is disturbed (400 ms).
    clock, order = [0.0], []
    monkeypatch.setattr(bench_models.time, "perf_counter", lambda: clock[0])

    def call(name, seconds):
        def run():
            order.append(name)
            clock[0] += seconds(order.count(name))
        return run

    a = call("a", lambda n: 0.01)
    b = call("b", lambda n: 0.4 if n == 3 else 0.04)
    timers = [bench_models._timer(a), bench_models._timer(b)]
    (first_a, fast_a), (first_b, fast_b) = bench_models._time_alternating(
        timers, steps=2, min_seconds=0.1)
    # warm-up a, b, then rounds of turns a a, b b (the first of each untimed): after 10
    # rounds a's timed calls have spent 0.1 s (b's long before)
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 10
    assert fast_a == pytest.approx(0.01) and fast_b == pytest.approx(0.04)
    assert first_b == pytest.approx(0.04)
    order.clear()
    bench_models._time_alternating(timers, steps=3, min_seconds=0.0)
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 3
    order.clear()
    bench_models._time_alternating(timers[:1], steps=3, min_seconds=0.0)
    assert order == ["a"] * 4     # alone, every call after the first is timed


class _FakeTwin:
    """Stands in for TorchTwin: every step "takes" 0.5 s."""

    def __init__(self, size):
        self.size, self.calls, self.closed = size, 0, False

    def __call__(self):
        self.calls += 1
        return 0.5

    def close(self):
        self.closed = True


def test_the_pytorch_twin_is_timed_beside_the_step(monkeypatch, capsys):
    twins = []
    monkeypatch.setattr(bench_models, "torch_step",
                        lambda name, size, args, params: twins.append(_FakeTwin(size))
                        or twins[-1])
    bench_models.main(["--models=small_cnn", "--sizes=16", "--batch=2", "--steps=3",
                       "--min_seconds=0", "--no_forward", "--torch=on"])
    # warm-up + 3 turns of a lead-in and a timed step
    assert [(t.size, t.calls, t.closed) for t in twins] == [(16, 7, True)]
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| small")]
    cells = _cells(row[0])
    assert float(cells[9]) == 4.0 and cells[10].endswith("x")      # 2 images / 0.5 s


def _shadow_torch(tmp_path, monkeypatch, body):
    """Child processes import a package ``torch`` made of ``body`` instead of the real one."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(body)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(tmp_path)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


def test_without_torch_the_twin_is_left_out_or_an_error_with_torch_on(
        tmp_path, monkeypatch, capsys):
    _shadow_torch(tmp_path, monkeypatch, 'raise ImportError("no torch in this test")\n')
    with pytest.raises(ImportError, match="no torch in this test"):
        bench_models.TorchTwin.start("small_cnn", 10, 16, 2, expected_params=1, lr=0.01)
    bench_models.main(["--models=small_cnn", "--sizes=16", "--batch=2", "--steps=1",
                       "--no_forward"])                                   # --torch=auto
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| small")]
    cells = _cells(row[0])
    assert float(cells[6]) > 0 and cells[9] == "-" and cells[10] == "-"
    with pytest.raises(ImportError, match="no torch in this test"):
        bench_models.main(["--models=small_cnn", "--sizes=16", "--batch=2", "--steps=1",
                           "--no_forward", "--torch=on"])


def test_a_twin_process_that_fails_raises_with_its_message(tmp_path, monkeypatch):
    # A broken install (like torchvision's compiled ops not matching torch): not an
    # ImportError, so not "missing": the parent must say what the child printed.
    _shadow_torch(tmp_path, monkeypatch, 'raise RuntimeError("broken torch build")\n')
    with pytest.raises(RuntimeError, match=r"(?s)exited with status 1.*broken torch build"):
        bench_models.TorchTwin.start("small_cnn", 10, 16, 2, expected_params=1, lr=0.01)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_pytorch_runs_in_its_own_process_and_fills_its_column():
    # A fresh interpreter: the test process may hold torch from other tests.
    code = ("import sys; from experiments import bench_models; "
            "bench_models.main(['--models=small_cnn', '--sizes=16', '--batch=2', '--steps=2', "
            "'--no_forward', '--torch=on']); print('parent imported torch:', 'torch' in "
            "sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout
    assert "parent imported torch: False" in out
    cells = _cells([line for line in out.splitlines() if line.startswith("| small")][0])
    assert float(cells[9]) > 0 and float(cells[10].rstrip("x")) > 0


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_a_twin_with_another_parameter_count_is_refused():
    with pytest.raises(RuntimeError, match="parameters, gl_jax has 1"):
        bench_models.TorchTwin.start("small_cnn", 10, 16, 2, expected_params=1, lr=0.01)


def test_a_twin_that_writes_much_to_stderr_does_not_block(tmp_path, monkeypatch):
    # 200 kB, more than a pipe holds, before the child answers.
    _shadow_torch(tmp_path, monkeypatch,
                  'import sys\nsys.stderr.write("x" * 200000)\nraise ImportError("chatty")\n')
    with pytest.raises(ImportError, match="chatty"):
        bench_models.TorchTwin.start("small_cnn", 10, 16, 2, expected_params=1, lr=0.01)
