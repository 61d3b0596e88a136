"""A CPU speed change of gl_jax/models/layers.py against the form it replaced, in one
training step of each backbone, interleaved in one process.

    python -m experiments.bench_layer_forms --change=max_pool --models=resnet18 --size=112

--change picks the pair:
  activation  the select-form activations vs the jnp.maximum / jnp.minimum form. Same
              outputs; gradients differ only at exact ties (x = 0, x = cap), where the
              select form gives PyTorch's 0 and jnp.maximum 0.5.
  max_pool    the CPU max-pooling with its own backward pass (the winning tap kept by the
              forward pass) vs plain autodiff of the same running maximum. Same outputs
              and gradients.
  pointwise   unpadded 1 x 1 convolutions as a matrix multiply vs XLA's convolution op.
              Same function, float32 rounding apart.
  depthwise_grad
              the depthwise kernel gradient reduced per image first ([B, C] per tap,
              then the batch) vs one reduction straight to [C] per tap. Same gradient,
              float32 rounding apart (summation order).
  padding_taps
              depthwise and small-output dense convolutions without the kernel taps that
              read only padding (layers.drop_padding_taps) vs with every tap. Same
              function; matters on maps smaller than the kernel's reach (32 px inputs).
  batch_norm  training-mode BatchNorm with its hand-written backward pass (two sums) vs
              JAX's autodiff of the same forward (Flax's form). Same function, float32
              rounding apart.

Each backbone's training step (experiments/bench_models.py) is compiled once per form,
then the two are timed alternately --rounds times: the rows give the fastest and the
median step and earlier / current, so drifts of a shared machine hit both alike.
"""
from __future__ import annotations

import argparse
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_models
from gl_jax import host_memory
from gl_jax.models import available_models, layers


def maximum_form(x, leak=None, *, cap=None):
    """The earlier ``layers.activation``: jnp.maximum / jnp.minimum."""
    y = jnp.maximum(x, 0) if leak is None else jnp.where(x >= 0, x, leak * x)
    return y if cap is None else jnp.minimum(y, cap)


def autodiff_max_pool(x, window, stride, pads):
    """The earlier ``layers._max_pool_shifted``: the same running maximum, differentiated
    by JAX (no custom VJP)."""
    return layers._window_argmax(x, window, stride, pads)[0]


CURRENT_CONV = layers.conv_general_dilated   # taken at import, before any patching


def native_pointwise(lhs, rhs, *args, **kwargs):
    """The earlier ``layers.conv_general_dilated`` for 1 x 1 convolutions: XLA's op."""
    if rhs.shape[:2] == (1, 1):
        return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs)
    return CURRENT_CONV(lhs, rhs, *args, **kwargs)


def per_channel_depthwise_grad(x, g, kernel_shape, stride, padding):
    """The earlier ``layers._depthwise_kernel_grad``: every tap's products reduced over
    batch and positions at once, in one variadic reduction."""
    kh, kw = kernel_shape[:2]
    acc = jnp.promote_types(g.dtype, jnp.float32)
    products = tuple((window * g).astype(acc)
                     for _, window in layers._conv_windows(x, (kh, kw), stride, padding))
    zeros = tuple(jnp.zeros((), acc) for _ in products)
    sums = jax.lax.reduce(products, zeros,
                          lambda a, b: tuple(u + v for u, v in zip(a, b)), (0, 1, 2))
    return jnp.stack(sums).reshape(kh, kw, 1, -1)


def every_tap(kernel, in_hw, stride, padding):
    """The earlier convolutions: no ``layers.drop_padding_taps``, every tap computed."""
    return kernel, tuple(padding)


# --change: (name in layers, earlier form); the current form is whatever layers holds.
CHANGES = {"activation": ("activation", maximum_form),
           "max_pool": ("_max_pool_shifted", autodiff_max_pool),
           "pointwise": ("conv_general_dilated", native_pointwise),
           "depthwise_grad": ("_depthwise_kernel_grad", per_channel_depthwise_grad),
           "batch_norm": ("train_batch_norm", layers.batch_norm_autodiff),
           "padding_taps": ("drop_padding_taps", every_tap)}


def compare(name: str, size: int, batch: int, rounds: int, change: str) -> dict:
    attribute, earlier = CHANGES[change]
    images = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32)
    steps = {}
    for form, fn in (("current", getattr(layers, attribute)), ("earlier", earlier)):
        # The form is read when the step is traced, at its first call.
        with mock.patch.object(layers, attribute, fn):
            step, params, stats = bench_models.make_train_step(
                bench_models.random_model(name, 100, jnp.float32))
            loss = jax.block_until_ready(step(params, stats, images))[0]
        steps[form] = (step, params, stats, float(loss))
    times = {form: [] for form in steps}
    for _ in range(rounds):
        for form, (step, params, stats, _) in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step(params, stats, images))
            times[form].append(time.perf_counter() - start)
    row = dict(model=name, size=size,
               loss_gap=abs(steps["current"][3] - steps["earlier"][3]))
    for form, ts in times.items():
        row[form] = (min(ts), float(np.median(ts)))
    return row


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--change", choices=sorted(CHANGES), default="max_pool")
    parser.add_argument("--models", default="resnet18,resnet50,efficientnet_lite0,bninception")
    parser.add_argument("--size", type=int, default=112, help="image size (px)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6, help="timed calls per form")
    args = parser.parse_args(argv)
    for name in args.models.split(","):
        if name not in available_models():
            parser.error(f"--models: unknown model {name!r}; known: {available_models()}")
    if min(args.size, args.batch, args.rounds) < 1:
        parser.error("--size, --batch and --rounds must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    lines = [f"change: {args.change}",
             "| model | px | current ms (min / median) | earlier ms (min / median) "
             "| earlier / current (min) | loss gap |", "|---|---|---|---|---|---|"]
    for name in args.models.split(","):
        size = bench_models.supported_size(name, args.size)
        r = compare(name, size, args.batch, args.rounds, args.change)
        (c_min, c_med), (e_min, e_med) = r["current"], r["earlier"]
        lines.append(f"| {name} | {size} | {c_min * 1e3:.0f} / {c_med * 1e3:.0f} "
                     f"| {e_min * 1e3:.0f} / {e_med * 1e3:.0f} | {e_min / c_min:.2f}x "
                     f"| {r['loss_gap']:.1e} |")
        print(lines[-1], flush=True)
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    host_memory.restart_with_tuned_malloc()    # as `python -m gl_jax.main` runs
    main()
