"""experiments/bench_convs.py: the convolutions it finds in a backbone, and a tiny run."""
import jax
import numpy as np
import pytest

from experiments import bench_convs
from experiments.bench_convs import Conv
from gl_jax.models import layers


def _cells(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_resnet18_runs_twenty_dense_convolutions_seventeen_as_convolution_ops_on_cpu():
    shortcut = Conv((2, 28, 28, 64), (1, 1, 64, 128), (2, 2), ((0, 0), (0, 0)), 1)
    with layers.cpu_kernels(False):
        convs = bench_convs.model_convolutions("resnet18", 112, 2)
    assert sum(convs.values()) == 20      # stem + 8 blocks x 2 + 3 downsampling 1 x 1
    stem = Conv((2, 112, 112, 3), (7, 7, 3, 64), (2, 2), ((3, 3), (3, 3)), 1)
    assert convs[stem] == 1 and not bench_convs.input_needs_grad(stem)
    assert convs[Conv((2, 28, 28, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)), 1)] == 4
    assert convs[shortcut] == 1
    with layers.cpu_kernels(True):        # the 1 x 1 shortcuts become matrix multiplies
        cpu = bench_convs.model_convolutions("resnet18", 112, 2)
    assert sum(cpu.values()) == 17 and shortcut not in cpu


def test_only_the_convolutions_xla_runs_are_listed():
    # On the CPU the depthwise convolutions are shifted-slice sums, not convolutions.
    with layers.cpu_kernels(True):
        cpu = bench_convs.model_convolutions("efficientnet_lite0", 64, 2)
    with layers.cpu_kernels(False):
        native = bench_convs.model_convolutions("efficientnet_lite0", 64, 2)
    assert all(conv.groups == 1 for conv in cpu)
    depthwise = {conv: n for conv, n in native.items() if conv.groups > 1}
    assert sum(depthwise.values()) == 16 and all(c.groups == c.lhs[-1] for c in depthwise)


def test_the_timed_function_runs_the_forward_convolution_as_pytorch_does():
    """Forward, input gradient and kernel gradient: three convolutions in the compiled
    function (two for the stem, whose images need no gradient)."""
    for conv, expected in [
            (Conv((2, 9, 9, 4), (3, 3, 4, 5), (1, 1), ((1, 1), (1, 1)), 1), 3),
            (Conv((2, 9, 9, 3), (3, 3, 3, 5), (2, 2), ((1, 1), (1, 1)), 1), 2)]:
        fn, args = bench_convs.jax_forward_backward(conv)
        assert _convolutions(fn, args) == expected
    conv = Conv((2, 9, 9, 4), (3, 3, 4, 5), (1, 1), ((1, 1), (1, 1)), 1)
    for grads, expected in [((), 1), (("input",), 2), (("kernel",), 2)]:   # --parts
        assert _convolutions(*bench_convs.jax_forward_backward(conv, grads=grads)) == expected


def _convolutions(fn, args):
    hlo = fn.lower(*args).compile().as_text()
    return sum(" convolution(" in line for line in hlo.splitlines())


def test_parts_splits_each_convolution_into_forward_and_each_gradient(capsys):
    bench_convs.main(["--model=small_cnn", "--size=16", "--batch=2", "--steps=1",
                      "--torch=off", "--parts"])
    out = capsys.readouterr().out
    assert "| convolution | gl_jax ms: forward / forward + input gradient / forward + " in out
    rows = {_cells(line)[0]: _cells(line) for line in out.split("gl_jax ms: forward")[1]
            .splitlines() if line.startswith("| 3x3")}
    assert set(rows) == {"3x3/1 3->32 @ 16x16", "3x3/1 32->64 @ 16x16", "3x3/1 64->64 @ 8x8"}
    for name, row in rows.items():
        times = row[1].split(" / ")
        assert len(times) == 3 and row[2] == "-"
        assert (times[1] == "-") == name.startswith("3x3/1 3->")   # the images: no gradient
        assert all(float(t) > 0 for t in times if t != "-")


def test_a_tiny_run_sums_the_convolutions_it_timed(capsys):
    bench_convs.main(["--model=small_cnn", "--size=16", "--batch=2", "--steps=1",
                      "--torch=off"])
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("| ") and not line.startswith("| convolution |")]
    rows = {_cells(line)[0]: _cells(line) for line in lines}
    assert set(rows) == {"3x3/1 3->32 @ 16x16", "3x3/1 32->64 @ 16x16", "3x3/1 64->64 @ 8x8",
                         "all convolutions (sum x calls)", "whole training step",
                         "step - convolutions"}
    convs = [row for name, row in rows.items() if "@" in name]
    total = sum(int(row[1]) * float(row[2]) for row in convs)
    assert abs(float(rows["all convolutions (sum x calls)"][2]) - total) <= 0.15
    step, rest = float(rows["whole training step"][2]), float(rows["step - convolutions"][2])
    assert step > 0 and abs(step - total - rest) <= 0.15
    assert rows["whole training step"][3] == "-"       # no PyTorch column with --torch=off


def test_the_ablation_stand_ins_keep_shapes_and_are_restored():
    import jax.numpy as jnp
    x = jnp.arange(2 * 15 * 14 * 3, dtype=jnp.float32).reshape(2, 15, 14, 3)
    for window, stride, padding, ceil_mode in [(3, 2, 1, False), (3, 2, 0, True),
                                               (3, 1, 1, True), (2, 2, 0, False)]:
        pooled = layers.max_pool(x, window, stride, padding, ceil_mode=ceil_mode)
        stand_in = bench_convs._first_tap_pool(x, window, stride, padding, ceil_mode=ceil_mode)
        assert stand_in.shape == pooled.shape
    originals = (layers.BatchNorm.__call__, layers.activation, layers.max_pool)
    try:
        with bench_convs.replaced(list(bench_convs.ABLATIONS)):
            assert layers.activation is not originals[1]
            assert float(layers.activation(jnp.float32(-2.0))) == -2.0
            raise RuntimeError("leave the block by an error")
    except RuntimeError:
        pass
    assert (layers.BatchNorm.__call__, layers.activation, layers.max_pool) == originals


def test_ablate_adds_one_row_per_stand_in_and_one_for_all(capsys):
    bench_convs.main(["--model=small_cnn", "--size=16", "--batch=2", "--steps=1",
                      "--torch=off", "--ablate"])
    names = [_cells(line)[0] for line in capsys.readouterr().out.splitlines()
             if line.startswith("| step without")]
    assert names == ["step without BatchNorm", "step without activations",
                     "step without max pooling",
                     "step without BatchNorm + activations + max pooling"]


def _kernel_grad_reference(x, g, conv):
    """The kernel gradient from its definition in float64: dW[i, j, c, o] = sum over n, h,
    w of x_padded[n, h * sh + i, w * sw + j, c] * g[n, h, w, o]."""
    (top, bottom), (left, right) = conv.padding
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
    g = np.asarray(g, np.float64)
    kh, kw, c, o = conv.rhs
    (sh, sw), (_, oh, ow, _) = conv.stride, g.shape
    out = np.zeros(conv.rhs)
    for i in range(kh):
        for j in range(kw):
            window = xp[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw, :]
            out[i, j] = np.einsum("nhwc,nhwo->co", window, g)
    return out


KERNEL_GRAD_CASES = [
    Conv((2, 9, 9, 4), (3, 3, 4, 5), (1, 1), ((1, 1), (1, 1)), 1),
    Conv((2, 9, 7, 3), (3, 3, 3, 6), (1, 1), ((0, 2), (1, 0)), 1),    # uneven padding
    Conv((2, 7, 9, 3), (3, 5, 3, 4), (1, 1), ((1, 1), (2, 2)), 1),    # 3 x 5
    Conv((2, 9, 9, 3), (7, 7, 3, 4), (2, 2), ((3, 3), (3, 3)), 1),    # a stem
    Conv((3, 8, 8, 5), (3, 3, 5, 2), (2, 2), ((1, 1), (1, 1)), 1),
    Conv((2, 5, 5, 4), (1, 1, 4, 3), (1, 1), ((0, 0), (0, 0)), 1),
]


@pytest.mark.parametrize("conv", KERNEL_GRAD_CASES, ids=bench_convs.describe)
def test_every_kernel_gradient_form_is_the_kernel_gradient(conv):
    x, g = bench_convs.kernel_grad_inputs(conv, seed=3)
    expected = _kernel_grad_reference(x, g, conv)
    applied = 0
    for name, form in bench_convs.KERNEL_GRAD_FORMS.items():
        fn = form(conv)
        if fn is None:
            assert name == "flat-row products" and conv.stride != (1, 1)
            continue
        got = np.asarray(jax.jit(fn)(x, g))
        assert got.shape == conv.rhs, name
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4, err_msg=name)
        applied += 1
    assert applied == (4 if conv.stride == (1, 1) else 3)


@pytest.mark.parametrize("conv", KERNEL_GRAD_CASES, ids=bench_convs.describe)
def test_pytorchs_timed_kernel_gradient_is_the_kernel_gradient(conv):
    pytest.importorskip("torch")
    x, g = bench_convs.kernel_grad_inputs(conv, seed=4)
    got = bench_convs.torch_kernel_grad(conv, x, g)().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_allclose(got, _kernel_grad_reference(x, g, conv), rtol=1e-5, atol=1e-4)


def test_kernel_grad_table_prices_each_form(capsys):
    bench_convs.main(["--model=small_cnn", "--size=16", "--batch=2", "--steps=1",
                      "--torch=off", "--kernel_grad"])
    out = capsys.readouterr().out
    table = out.split("| kernel gradient of |")[1].splitlines()
    header = _cells("| kernel gradient of |" + table[0])
    assert header[2:] == [f"{name} ms (GFLOP/s)" for name in
                          [*bench_convs.KERNEL_GRAD_FORMS, bench_convs.TAP_FLOOR]]
    rows = [_cells(line) for line in table[2:] if line.startswith("| 3x3")]
    assert rows and all(len(row) == len(header) for row in rows)
    for row in rows:
        for cell in row[2:]:
            ms, gflops = cell.split(" (")
            assert float(ms) > 0 and float(gflops.rstrip(")")) >= 0
    total = [_cells(line) for line in table if line.startswith("| sum x calls")][0]
    assert all(float(cell) > 0 for cell in total[2:])
    rate = out.split("XLA:CPU square matrix product (2048 x 2048 x 2048): ")[1].split()[0]
    assert float(rate) > 0
