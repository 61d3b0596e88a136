"""Where a backbone's CPU training step goes: its dense convolutions, each timed alone, in
gl_jax and in PyTorch eager, beside the whole training step of both.

    python -m experiments.bench_convs --model=resnet18 --size=112 --batch=32
    python -m experiments.bench_convs --model=resnet50 --size=227 --batch=32 --steps=3

The convolutions are read from the jaxpr of the model's training forward (so they are the
ones XLA runs: the CPU paths of gl_jax/models/layers.py have already replaced depthwise,
tiny-output and unpadded 1 x 1 convolutions by slices and matrix products, which are not
listed and count in the rest of the step). Each
distinct convolution is timed as one jitted forward + backward (the input's and the
kernel's gradient for a random cotangent; only the kernel's when its input has 3
channels, the images, which need no gradient) and as the same PyTorch ``conv2d`` forward
+ backward on NCHW tensors. The table gives one row per distinct shape with how often the
network runs it, then the sums x count, the whole training step of experiments/
bench_models.py in both frameworks and the difference: everything that is not a
convolution (BatchNorm, activations, pooling, the loss, the update, and the layout copies
XLA places around the convolutions' gradients inside the network, which a convolution
timed alone gets on plain inputs). Timings are the fastest of --steps calls; compare
within one run.

--parts adds a table that splits each convolution: its forward alone, forward + input
gradient and forward + kernel gradient, in both frameworks ("-" for the images' gradient,
which the network never takes).

--kernel_grad adds a table of each convolution's kernel gradient alone (no forward, no
input gradient), computed four ways in gl_jax, beside PyTorch's: XLA's convolution (what
autodiff of the convolution gives, and what gl_jax runs), the per-tap matrix products
(one [N*H*W, C_in]^T [N*H*W, C_out] product per kernel tap, each over a shifted window of
the input), the patch matrix product (the windows side by side, one product), and, for
stride 1, the flat-row products (input rows padded and laid end to end, so that every
tap's window is one contiguous run of the flattened input, a shift instead of a strided
window); with each form's GFLOP/s, the least any per-tap form can cost (one tap's product
on contiguous operands, times the taps) and XLA:CPU's rate on a square matrix product. It
asks whether the kernel gradient, the weakest part of XLA:CPU's convolutions on large
maps, can be written faster in XLA's own ops.

--ablate adds gl_jax rows for the same training step with parts of the network replaced
by nearly free stand-ins of the same shapes, to price them: BatchNorm by the identity,
every activation by the identity, max pooling by one strided slice, then all three. The
network no longer computes the same function then; only its speed is of interest.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import bench_models, torch_reference
from gl_jax import host_memory
from gl_jax.models import available_models, layers

Conv = collections.namedtuple("Conv", "lhs rhs stride padding groups")


def model_convolutions(name: str, size: int, batch: int, num_classes: int = 100):
    """Counter of Conv -> number of calls in one training-mode forward of ``name``.

    Raises ValueError for a convolution this benchmark cannot time the same way in both
    frameworks (not NHWC/HWIO, dilated, or batch-grouped)."""
    model = bench_models.random_model(name, num_classes, jnp.float32)
    model.train()
    graphdef, state = nnx.split(model)

    def forward(state, images):
        return nnx.merge(graphdef, state)(images)[0]

    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    jaxpr = jax.make_jaxpr(forward)(state, images).jaxpr
    found = collections.Counter()
    for eqn in _equations(jaxpr):
        if eqn.primitive.name != "conv_general_dilated":
            continue
        p = eqn.params
        dims = p["dimension_numbers"]
        nhwc = jax.lax.conv_dimension_numbers(eqn.invars[0].aval.shape,
                                              eqn.invars[1].aval.shape,
                                              ("NHWC", "HWIO", "NHWC"))
        if (dims != nhwc or p["batch_group_count"] != 1
                or any(d != 1 for d in tuple(p["lhs_dilation"]) + tuple(p["rhs_dilation"]))):
            raise ValueError(f"{name}: convolution {eqn} is not a plain NHWC convolution")
        found[Conv(tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape),
                   tuple(p["window_strides"]), tuple(tuple(pad) for pad in p["padding"]),
                   p["feature_group_count"])] += 1
    return found


def _equations(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in its equations' parameters
    (jit, custom_vjp, remat, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    yield from _equations(inner)


def _fastest(fn, steps: int) -> float:
    """Seconds of the fastest of ``steps`` calls of ``fn()`` after one warm-up."""
    return bench_models._time(fn, steps=steps)[1]


def input_needs_grad(conv: Conv) -> bool:
    return conv.lhs[-1] != 3


# --parts: which gradients each timed call computes besides the forward (None: all that
# the network needs, the images' gradient excepted).
PARTS = {"forward": (), "forward + input gradient": ("input",),
         "forward + kernel gradient": ("kernel",)}


def _wanted(conv: Conv, grads) -> tuple[str, ...]:
    if grads is None:
        return ("input", "kernel") if input_needs_grad(conv) else ("kernel",)
    return tuple(grads)


def jax_forward_backward(conv: Conv, seed: int = 0, grads=None):
    """(jitted function, its arguments): ``conv``'s forward and the gradients ``grads``
    (a subset of ("input", "kernel"); None: as in the network), as PyTorch's step runs
    them. The function returns the loss as well as the gradients: with the gradients
    alone XLA drops the forward convolution (a linear function's gradients do not need
    its output), and before 5 December this benchmark timed gl_jax without it."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(conv.lhs), jnp.float32)
    w = jnp.asarray(rng.standard_normal(conv.rhs) * 0.05, jnp.float32)

    def apply(x, w):
        return jax.lax.conv_general_dilated(
            x, w, conv.stride, conv.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=conv.groups)

    out_shape = jax.eval_shape(apply, x, w).shape
    cotangent = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)

    def loss(x, w):
        return jnp.vdot(apply(x, w), cotangent)
    argnums = tuple(("input", "kernel").index(g) for g in _wanted(conv, grads))
    return jax.jit(jax.value_and_grad(loss, argnums) if argnums else loss), (x, w)


def time_jax(conv: Conv, steps: int, seed: int = 0, grads=None) -> float:
    """Seconds of the jitted forward + backward of ``conv`` alone."""
    fn, args = jax_forward_backward(conv, seed, grads)
    return _fastest(lambda: jax.block_until_ready(fn(*args)), steps)


def time_torch(conv: Conv, steps: int, seed: int = 0, grads=None) -> float:
    """Seconds of PyTorch eager's conv2d forward + backward of the same convolution (the
    gradients ``grads``, as in ``jax_forward_backward``)."""
    import torch
    from torch.nn import functional as F

    wanted = _wanted(conv, grads)
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.standard_normal(conv.lhs).transpose(0, 3, 1, 2).copy(),
                     dtype=torch.float32, requires_grad="input" in wanted)
    w = torch.tensor((rng.standard_normal(conv.rhs) * 0.05).transpose(3, 2, 0, 1).copy(),
                     dtype=torch.float32, requires_grad="kernel" in wanted)
    (top, bottom), (left, right) = conv.padding
    symmetric = top == bottom and left == right

    def step():
        x.grad = w.grad = None
        with torch.set_grad_enabled(bool(wanted)):
            inp = x if symmetric else F.pad(x, (left, right, top, bottom))
            out = F.conv2d(inp, w, stride=conv.stride,
                           padding=(top, left) if symmetric else 0, groups=conv.groups)
            if wanted:
                out.backward(torch.ones_like(out))

    return _fastest(step, steps)


def kernel_grad_flops(conv: Conv) -> float:
    n, h, w, c = conv.lhs
    kh, kw, _, o = conv.rhs
    oh, ow = layers._out_hw((h, w), (kh, kw), conv.stride, conv.padding)
    return 2.0 * n * oh * ow * kh * kw * c * o // conv.groups


def _kernel_vjp(conv: Conv, apply):
    """(x, cotangent) -> the gradient of ``apply(x, kernel)`` with respect to the kernel."""
    def grad(x, g):
        return jax.vjp(lambda w: apply(x, w), jnp.zeros(conv.rhs, x.dtype))[1](g)[0]
    return grad


def _by_convolution(conv: Conv):
    return _kernel_vjp(conv, lambda x, w: jax.lax.conv_general_dilated(
        x, w, conv.stride, conv.padding, dimension_numbers=("NHWC", "HWIO", "NHWC")))


def _per_tap_products(conv: Conv):
    kh, kw = conv.rhs[:2]

    def grad(x, g):
        taps = [jnp.einsum("nhwc,nhwo->co", window, g)
                for _, window in layers._conv_windows(x, (kh, kw), conv.stride, conv.padding)]
        return jnp.stack(taps).reshape(conv.rhs)
    return grad


def _patch_product(conv: Conv):
    """Autodiff of gl_jax's own patch-matrix convolution (layers.conv_patches_dot): the
    transposed patch matrix times the cotangent."""
    return _kernel_vjp(conv, lambda x, w: layers.conv_patches_dot(x, w, conv.stride,
                                                                  conv.padding))


def _flat_row_products(conv: Conv):
    """Stride 1 only. The padded input's rows laid end to end (row length wp): the output
    pixel at flat position f reads tap (i, j) at f + i * wp + j, so each tap's operand is
    one contiguous run of the flattened input. The cotangent gets kw - 1 zero columns per
    row (the positions whose windows would wrap into the next row) and as many rows as the
    padded input, so that both flatten to the same length."""
    n, h, w, c = conv.lhs
    kh, kw, _, o = conv.rhs
    (top, bottom), (left, right) = conv.padding
    hp, wp = h + top + bottom, w + left + right
    oh, ow = hp - kh + 1, wp - kw + 1

    def grad(x, g):
        xp = jax.lax.pad(x, jnp.zeros((), x.dtype),
                         ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
        flat_x = jnp.pad(xp.reshape(n * hp * wp, c), ((0, (kh - 1) * wp + kw - 1), (0, 0)))
        flat_g = jnp.pad(g, ((0, 0), (0, hp - oh), (0, wp - ow), (0, 0))).reshape(-1, o)
        rows = flat_g.shape[0]
        taps = [jax.lax.dot_general(flat_x[i * wp + j:i * wp + j + rows], flat_g,
                                    (((0,), (0,)), ((), ())))
                for i in range(kh) for j in range(kw)]
        return jnp.stack(taps).reshape(conv.rhs)
    return grad


# --kernel_grad: name -> (conv -> function(x, cotangent) -> kernel gradient, or None where
# the form does not apply).
KERNEL_GRAD_FORMS = {
    "XLA convolution": _by_convolution,
    "per-tap products": _per_tap_products,
    "patch product": _patch_product,
    "flat-row products": lambda conv: (_flat_row_products(conv) if conv.stride == (1, 1)
                                       else None),
}


def kernel_grad_inputs(conv: Conv, seed: int = 0):
    rng = np.random.default_rng(seed)
    n, h, w, _ = conv.lhs
    oh, ow = layers._out_hw((h, w), conv.rhs[:2], conv.stride, conv.padding)
    x = jnp.asarray(rng.standard_normal(conv.lhs), jnp.float32)
    g = jnp.asarray(rng.standard_normal((n, oh, ow, conv.rhs[-1])), jnp.float32)
    return x, g


def time_kernel_grads(conv: Conv, steps: int, use_torch: bool) -> dict[str, float | None]:
    """Seconds of the fastest of ``steps`` calls of each kernel-gradient form (None where
    it does not apply), and PyTorch's ("PyTorch", with ``use_torch``)."""
    x, g = kernel_grad_inputs(conv)
    times = {}
    for name, form in KERNEL_GRAD_FORMS.items():
        fn = form(conv) if conv.groups == 1 else None
        if fn is None:
            times[name] = None
            continue
        fn = jax.jit(fn)
        times[name] = _fastest(lambda: jax.block_until_ready(fn(x, g)), steps)
    times[TAP_FLOOR] = time_tap_floor(conv, steps) if conv.groups == 1 else None
    if use_torch:
        times["PyTorch"] = time_torch_kernel_grad(conv, steps, x, g)
    return times


# The least any per-tap form can cost: one tap's matrix product on operands already laid
# out contiguously, times the number of taps (no window copied).
TAP_FLOOR = "tap products without copies"


def time_tap_floor(conv: Conv, steps: int) -> float:
    n, h, w, c = conv.lhs
    kh, kw, _, o = conv.rhs
    oh, ow = layers._out_hw((h, w), (kh, kw), conv.stride, conv.padding)
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n * oh * ow, c)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((n * oh * ow, o)), jnp.float32)
    product = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((0,), (0,)), ((), ()))))
    return kh * kw * _fastest(lambda: jax.block_until_ready(product(a, b)), steps)


def square_matmul_gflops(steps: int, n: int = 2048) -> float:
    """XLA:CPU's rate on a square float32 matrix product, the machine's reference."""
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((n, n)), jnp.float32) for _ in range(2))
    product = jax.jit(jnp.matmul)
    return 2.0 * n ** 3 / _fastest(lambda: jax.block_until_ready(product(a, b)), steps) / 1e9


def torch_kernel_grad(conv: Conv, x, g):
    """A call of PyTorch's kernel gradient alone (aten's convolution_backward asked for
    the weight only) on the same input and cotangent in NCHW; it returns [O, I, kh, kw]."""
    import torch
    from torch.nn import functional as F

    (top, bottom), (left, right) = conv.padding
    xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy())
    if (top, left) != (bottom, right):
        xt, pad = F.pad(xt, (left, right, top, bottom)), [0, 0]
    else:
        pad = [top, left]
    gt = torch.tensor(np.asarray(g).transpose(0, 3, 1, 2).copy())
    w = torch.zeros(conv.rhs[::-1][:2] + conv.rhs[:2])      # [O, I, kh, kw]

    def call():
        return torch.ops.aten.convolution_backward(
            gt, xt, w, None, list(conv.stride), pad, [1, 1], False, [0, 0], conv.groups,
            [False, True, False])[1]
    return call


def time_torch_kernel_grad(conv: Conv, steps: int, x, g) -> float:
    return _fastest(torch_kernel_grad(conv, x, g), steps)


def describe(conv: Conv) -> str:
    n, h, w, c = conv.lhs
    kh, kw, _, o = conv.rhs
    group = f" g{conv.groups}" if conv.groups > 1 else ""
    return f"{kh}x{kw}/{conv.stride[0]} {c}->{o}{group} @ {h}x{w}"


def _first_tap_pool(x, window, stride, padding=0, *, ceil_mode=False):
    """A stand-in for max pooling with its output shape: every window's first element."""
    out = [layers.pool_output_size(x.shape[a], window, stride, padding, ceil_mode)
           for a in (1, 2)]
    short = [max((out[i] - 1) * stride + 1 - x.shape[1 + i], 0) for i in range(2)]
    x = jnp.pad(x, ((0, 0), (0, short[0]), (0, short[1]), (0, 0)))
    return x[:, :(out[0] - 1) * stride + 1:stride, :(out[1] - 1) * stride + 1:stride]


# Stand-ins for --ablate: (object, attribute, replacement).
ABLATIONS = {
    "BatchNorm": (layers.BatchNorm, "__call__", lambda self, x, **kwargs: x),
    "activations": (layers, "activation", lambda x, leak=None, *, cap=None: x),
    "max pooling": (layers, "max_pool", _first_tap_pool),
}


def replaced(names) -> contextlib.ExitStack:
    """A context in which the ABLATIONS ``names`` are swapped in (restored on exit)."""
    stack = contextlib.ExitStack()
    for name in names:
        obj, attr, stand_in = ABLATIONS[name]
        stack.enter_context(mock.patch.object(obj, attr, stand_in))
    return stack


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", choices=available_models())
    parser.add_argument("--size", type=int, default=112, help="image size (px)")
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--steps", type=int, default=5, help="timed calls (after 1 warm-up)")
    parser.add_argument("--torch", choices=("auto", "on", "off"), default="auto",
                        help="the PyTorch columns (auto: when torch is importable)")
    parser.add_argument("--kernel_grad", action="store_true",
                        help="add a table of each convolution's kernel gradient alone in "
                             "four forms written in XLA ops, beside PyTorch's")
    parser.add_argument("--ablate", action="store_true",
                        help="add the step without BatchNorm / activations / max pooling")
    parser.add_argument("--parts", action="store_true",
                        help="add a table of each convolution's forward, forward + input "
                             "gradient and forward + kernel gradient in both frameworks")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.size < 1:
        parser.error(f"--batch, --steps and --size must be >= 1, got {args.batch}, "
                     f"{args.steps}, {args.size}")
    return args


def _ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _ratio(torch_s, jax_s):
    return "-" if torch_s is None else f"{torch_s / jax_s:.2f}x"


def kernel_grad_table(convs, steps: int, use_torch: bool) -> str:
    """--kernel_grad: ms and GFLOP/s of each form per distinct convolution, and the sums
    over the network (a form that does not apply counts as XLA's convolution there)."""
    names = list(KERNEL_GRAD_FORMS) + [TAP_FLOOR] + (["PyTorch"] if use_torch else [])
    lines = ["| kernel gradient of | calls | " + " | ".join(f"{n} ms (GFLOP/s)" for n in names)
             + " |", "|---|---|" + "---|" * len(names)]
    totals = dict.fromkeys(names, 0.0)
    for conv, calls in sorted(convs.items(), key=lambda item: -np.prod(item[0].lhs)):
        times = time_kernel_grads(conv, steps, use_torch)
        flops = kernel_grad_flops(conv)
        for name in names:
            totals[name] += calls * (times[name] if times[name] is not None
                                     else times["XLA convolution"])
        lines.append(f"| {describe(conv)} | {calls} | " + " | ".join(
            "-" if times[n] is None else f"{_ms(times[n])} ({flops / times[n] / 1e9:.0f})"
            for n in names) + " |")
    lines.append(f"| sum x calls | {sum(convs.values())} | "
                 + " | ".join(_ms(totals[n]) for n in names) + " |")
    lines.append(f"\nXLA:CPU square matrix product (2048 x 2048 x 2048): "
                 f"{square_matmul_gflops(steps):.0f} GFLOP/s")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch_reference.steady_allocator()     # as bench_models does: PyTorch's times steady
    use_torch = args.torch == "on"
    if args.torch == "auto":
        try:
            import torch  # noqa: F401
            use_torch = True
        except ImportError:
            use_torch = False
    size = bench_models.supported_size(args.model, args.size)
    convs = model_convolutions(args.model, size, args.batch)
    print(f"{args.model} at {size} px, batch {args.batch}: {sum(convs.values())} dense "
          f"convolutions, {len(convs)} distinct", flush=True)
    lines = ["| convolution | calls | gl_jax ms | PyTorch ms | PyTorch / gl_jax |",
             "|---|---|---|---|---|"]
    total_jax, total_torch = 0.0, 0.0 if use_torch else None
    for conv, calls in sorted(convs.items(), key=lambda item: -np.prod(item[0].lhs)):
        jax_s = time_jax(conv, args.steps)
        torch_s = time_torch(conv, args.steps) if use_torch else None
        total_jax += calls * jax_s
        if use_torch:
            total_torch += calls * torch_s
        lines.append(f"| {describe(conv)} | {calls} | {_ms(jax_s)} | {_ms(torch_s)} "
                     f"| {_ratio(torch_s, jax_s)} |")
    step_args = argparse.Namespace(num_classes=100, batch=args.batch, steps=args.steps,
                                   min_seconds=0.0, no_forward=True, no_backward=False,
                                   torch="on" if use_torch else "off")
    row = bench_models.bench_one(args.model, size, jnp.float32, step_args)
    step_jax = args.batch / row["fwd_bwd"]
    step_torch = args.batch / row["torch"] if use_torch else None
    rest_torch = step_torch - total_torch if use_torch else None
    lines += [f"| all convolutions (sum x calls) | {sum(convs.values())} | {_ms(total_jax)} "
              f"| {_ms(total_torch)} | {_ratio(total_torch, total_jax)} |",
              f"| whole training step | 1 | {_ms(step_jax)} | {_ms(step_torch)} "
              f"| {_ratio(step_torch, step_jax)} |",
              f"| step - convolutions | | {_ms(step_jax - total_jax)} | {_ms(rest_torch)} "
              f"| {_ratio(rest_torch, step_jax - total_jax)} |"]
    if args.ablate:
        step_args.torch = "off"
        for names in [[name] for name in ABLATIONS] + [list(ABLATIONS)]:
            with replaced(names):
                fast = bench_models.bench_one(args.model, size, jnp.float32, step_args)
            lines.append(f"| step without {' + '.join(names)} | | "
                         f"{_ms(args.batch / fast['fwd_bwd'])} | | |")
    if args.parts:
        lines += ["", "| convolution | gl_jax ms: " + " / ".join(PARTS) + " | PyTorch ms: "
                  + " / ".join(PARTS) + " |", "|---|---|---|"]
        for conv in sorted(convs, key=lambda conv: -np.prod(conv.lhs)):
            cells = []
            for timer in (time_jax, time_torch) if use_torch else (time_jax,):
                cells.append(" / ".join(
                    _ms(timer(conv, args.steps, grads=grads) if "input" not in grads
                        or input_needs_grad(conv) else None) for grads in PARTS.values()))
            cells += ["-"] * (2 - len(cells))
            lines.append(f"| {describe(conv)} | {cells[0]} | {cells[1]} |")
    if args.kernel_grad:
        lines += ["", kernel_grad_table(convs, args.steps, use_torch)]
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    host_memory.restart_with_tuned_malloc()    # as `python -m gl_jax.main` runs
    main()
