"""Throughput of every backbone: forward and forward+backward images per second.

    python experiments/bench_models.py                       # CPU defaults (batch 8, 2 timed steps)
    python experiments/bench_models.py --models=resnet18,small_cnn --sizes=64 --steps=3
    python experiments/bench_models.py --batch=128 --steps=20   # on a GPU

One run prints one table: per backbone and image size, the compile time, forward images/s
(eval mode, jitted), forward+backward images/s (train mode: batch statistics, gradient of
a scalar of the embedding and logits with respect to every parameter, BatchNorm statistics
updated; no optimizer) and the ratio forward / (forward+backward). When an accelerator is
present, ResNet-50 and BN-Inception at 227 px are added in bfloat16 compute (float32
parameters) beside their float32 rows, with the bf16 speed-up.

Parameters are random (He-scaled NumPy draws into a shape-only model) because real
initialisation compiles one program per parameter shape and would dominate a CPU run;
speed does not depend on the values. Timings on a shared CPU vary up to 2x between runs:
compare within one run.
"""
from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gl_jax.models import available_models, count_params, create_model
from gl_jax.models.bninception import final_grid


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(available_models()),
                        help="comma-separated registry names (default: all)")
    parser.add_argument("--sizes", default="64,112,227", help="comma-separated image sizes (px)")
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after 1 warm-up)")
    parser.add_argument("--num_classes", type=int, default=100, help="classifier size")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="bfloat16 rows for resnet50/bninception at 227 px "
                             "(auto: only when an accelerator is present)")
    parser.add_argument("--no_backward", action="store_true", help="time the forward only")
    args = parser.parse_args(argv)
    for name in args.models.split(","):
        if name not in available_models():
            parser.error(f"--models: unknown model {name!r}; known: {available_models()}")
    if args.batch < 1 or args.steps < 1:
        parser.error(f"--batch and --steps must be >= 1, got {args.batch}, {args.steps}")
    return args


def random_model(name: str, num_classes: int, dtype, seed: int = 0) -> nnx.Module:
    """A model of the registry with NumPy-random parameters and statistics (see docstring)."""
    abstract = nnx.eval_shape(lambda: create_model(name, num_classes=num_classes, dtype=dtype,
                                                   rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(abstract)
    filled = []
    for path, var in nnx.to_flat_state(state):
        shape = var.shape
        if path[-1] == "kernel":
            value = rng.normal(0.0, math.sqrt(2.0 / math.prod(shape[:-1])), shape)
        elif path[-1] in ("scale", "var"):
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        filled.append((path, var.replace(jnp.asarray(value, jnp.float32))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _time(fn, *args, steps: int) -> tuple[float, float]:
    """(seconds of the first call = compile + one run, mean seconds of `steps` later calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(fn(*args))
    return first, (time.perf_counter() - start) / steps


def supported_size(name: str, size: int) -> int:
    """The Caffe BN-Inception cannot take every size (e.g. 112 px fails, as in the original):
    use the nearest larger size it takes; other backbones take any size."""
    if name != "bninception":
        return size
    while not final_grid(size):
        size += 1
    return size


def bench_one(name: str, size: int, dtype, args) -> dict:
    model = random_model(name, args.num_classes, dtype)
    images = jax.random.normal(jax.random.key(0), (args.batch, size, size, 3), jnp.float32)
    model.eval()
    eval_graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    @jax.jit
    def forward(params, stats, images):
        return nnx.merge(eval_graphdef, params, stats)(images)[0]

    compile_fwd, fwd = _time(forward, params, stats, images, steps=args.steps)
    row = dict(model=name, size=size, dtype=jnp.dtype(dtype).name, params=count_params(model),
               compile=compile_fwd, fwd=args.batch / fwd)
    if not args.no_backward:
        model.train()
        train_graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

        @jax.jit
        def forward_backward(params, stats, images):
            def loss_fn(params):
                m = nnx.merge(train_graphdef, params, stats, copy=True)
                embedding, aux = m(images)
                loss = jnp.mean(embedding ** 2) + jnp.mean(aux["logits"] ** 2)
                return loss, nnx.state(m, nnx.BatchStat)
            (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            return loss, new_stats, grads

        compile_bwd, step = _time(forward_backward, params, stats, images, steps=args.steps)
        row.update(compile=row["compile"] + compile_bwd, fwd_bwd=args.batch / step)
    return row


def format_table(rows: list[dict]) -> str:
    lines = ["| model | px | dtype | params (M) | first calls s | fwd img/s | fwd+bwd img/s "
             "| fwd / fwd+bwd | bf16 speed-up fwd+bwd |",
             "|---|---|---|---|---|---|---|---|---|"]
    f32 = {(r["model"], r["size"]): r for r in rows if r["dtype"] == "float32"}
    for r in rows:
        fb = r.get("fwd_bwd")
        ratio = f"{r['fwd'] / fb:.2f}" if fb else "-"
        speedup = "-"
        base = f32.get((r["model"], r["size"]))
        if r["dtype"] != "float32" and base is not None and fb and base.get("fwd_bwd"):
            speedup = f"{fb / base['fwd_bwd']:.2f}x"
        lines.append(f"| {r['model']} | {r['size']} | {r['dtype']} | {r['params'] / 1e6:.2f} "
                     f"| {r['compile']:.1f} | {r['fwd']:.1f} | {fb:.1f} | {ratio} | {speedup} |"
                     if fb else
                     f"| {r['model']} | {r['size']} | {r['dtype']} | {r['params'] / 1e6:.2f} "
                     f"| {r['compile']:.1f} | {r['fwd']:.1f} | - | - | - |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    device = jax.devices()[0]
    accelerator = device.platform != "cpu"
    print(f"device: {device.device_kind} ({device.platform}), {jax.device_count()} device(s); "
          f"batch {args.batch}, {args.steps} timed step(s)", flush=True)
    jobs = [(name, supported_size(name, int(size)), jnp.float32) for name in args.models.split(",")
            for size in args.sizes.split(",")]
    if args.bf16 == "on" or (args.bf16 == "auto" and accelerator):
        for name in ("resnet50", "bninception"):
            if name in args.models.split(","):
                if (name, 227, jnp.float32) not in jobs:
                    jobs.append((name, 227, jnp.float32))
                jobs.append((name, 227, jnp.bfloat16))
    rows = []
    for name, size, dtype in jobs:
        row = bench_one(name, size, dtype, args)
        rows.append(row)
        print(f"  {name} {size}px {row['dtype']}: fwd {row['fwd']:.1f} img/s, fwd+bwd "
              f"{row.get('fwd_bwd', float('nan')):.1f} img/s (compile {row['compile']:.1f} s)",
              flush=True)
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()
