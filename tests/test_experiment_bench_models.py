"""experiments/bench_models.py: one real (tiny) run of its table, and the table's columns."""
import platform

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
def test_the_steady_allocator_takes_effect_on_glibc(capsys):
    assert bench_models.steady_allocator() is True
    bench_models.main(["--models=small_cnn", "--sizes=16", "--batch=2", "--steps=1",
                       "--torch=off"])
    assert "steady allocator: on" in capsys.readouterr().out


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
    (first_a, fast_a), (first_b, fast_b) = bench_models._time_alternating(
        [a, b], steps=2, min_seconds=0.1)
    # warm-up a, b, then rounds a, b: after 10 rounds a has spent 0.1 s (b long before)
    assert order == ["a", "b"] * 11
    assert fast_a == pytest.approx(0.01) and fast_b == pytest.approx(0.04)
    assert first_b == pytest.approx(0.04)
    order.clear()
    bench_models._time_alternating([a, b], steps=3, min_seconds=0.0)
    assert order == ["a", "b"] * 4


def test_the_pytorch_twin_is_timed_beside_the_step(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bench_models, "torch_step",
                        lambda name, size, args, params: lambda: calls.append(size))
    bench_models.main(["--models=small_cnn", "--sizes=16", "--batch=2", "--steps=3",
                       "--min_seconds=0", "--no_forward", "--torch=on"])
    assert calls == [16] * 4                                 # warm-up + 3 rounds
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| small")]
    cells = _cells(row[0])
    assert float(cells[9]) > 0 and cells[10].endswith("x")
