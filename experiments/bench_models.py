"""Forward and training-step throughput of the backbones: gl_jax (jitted) beside PyTorch.

    python experiments/bench_models.py --models=efficientnet_lite0,resnet18,resnet50,small_cnn \
        --sizes=112 --batch=32 --no_forward --cpu_kernels=on,off

One row per backbone, image size and ``--cpu_kernels`` choice: the eval-mode forward's
and the training step's images/s (train mode, loss mean(pooled^2) + mean(logits^2),
gradient of every parameter, SGD). When torch is installed (torchvision too for the
ResNets) the same step of a PyTorch twin (experiments/torch_twins.py) is timed beside it
in a child process of its own, so that the two frameworks share no heap or thread pool.
The steps of one backbone and size are timed in turns, so that the slow minutes of a
shared machine fall on all of them; each speed is the fastest of ``--steps``. Timings
vary between runs: compare the ratios within one run.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import multiprocessing
import os
import runpy
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gl_jax.models import abstract_model, available_models, count_params
from gl_jax.models.bninception import final_grid
from gl_jax.models.layers import CPU_KERNEL_CHOICES, resolve_cpu_kernels

NUM_CLASSES, LR = 100, 0.01
TWINS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_twins.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(available_models()))
    p.add_argument("--sizes", default="64,112", help="image sides in px, comma-separated")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps of each, after a warm-up")
    p.add_argument("--cpu_kernels", default="auto", help="comma list of auto, on, off")
    p.add_argument("--torch", choices=("auto", "on", "off"), default="auto",
                   help="the PyTorch column (auto: when torch is installed)")
    p.add_argument("--no_forward", action="store_true", help="time the training step only")
    args = p.parse_args(argv)
    args.models, args.cpu_kernels = args.models.split(","), args.cpu_kernels.split(",")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    unknown = (set(args.models) - set(available_models())
               | set(args.cpu_kernels) - set(CPU_KERNEL_CHOICES))
    if unknown or args.batch < 1 or args.steps < 1:
        p.error(f"unknown --models or --cpu_kernels {sorted(unknown)}, or --batch or --steps "
                f"below 1; models: {available_models()}")
    return args


def random_model(name: str, cpu_kernels: str) -> nnx.Module:
    """The registry's model with He-scaled NumPy parameters: real initialisation compiles a
    program per parameter shape, which would dominate a short CPU run."""
    graphdef, state = nnx.split(abstract_model(name, num_classes=NUM_CLASSES,
                                               cpu_kernels=cpu_kernels))
    rng, filled = np.random.default_rng(0), []
    for path, var in nnx.to_flat_state(state):
        if path[-1] == "kernel":
            value = rng.normal(0.0, math.sqrt(2.0 / math.prod(var.shape[:-1])), var.shape)
        else:
            value = np.full(var.shape, 1.0 if path[-1] in ("scale", "var") else 0.0)
        filled.append((path, var.replace(jnp.asarray(value, jnp.float32))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def jax_timers(model: nnx.Module, images):
    """(forward, training step) timers: each call runs once and returns its seconds."""
    model.eval()
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    model.train()
    train_graphdef = nnx.split(model, nnx.Param, nnx.BatchStat)[0]

    def loss_fn(params, stats, x):
        m = nnx.merge(train_graphdef, params, stats, copy=True)
        aux = m(x)[1]
        loss = jnp.mean(aux["pooled"] ** 2) + jnp.mean(aux["logits"] ** 2)
        return loss, nnx.state(m, nnx.BatchStat)

    def step(params, stats, x):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x)
        return loss, stats, jax.tree.map(lambda w, g: w - LR * g, params, grads)

    def timer(fn):
        def run():
            start = time.perf_counter()
            jax.block_until_ready(fn(params, stats, images))
            return time.perf_counter() - start
        return run
    return (timer(jax.jit(lambda p, s, x: nnx.merge(graphdef, p, s)(x)[0])),
            timer(jax.jit(step)))


def _twin_process(conn, name: str, size: int, batch: int) -> None:
    runpy.run_path(TWINS)["serve"](conn, name, NUM_CLASSES, size, batch, LR)


class TorchTwin:
    """PyTorch's training step of the same backbone in a spawned process: this one never
    imports torch, and the frameworks share no heap or thread pool. A call runs one step
    there and returns the seconds it took, as measured there."""

    def __init__(self, name: str, size: int, batch: int):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.name, self.process = name, ctx.Process(target=_twin_process,
                                                    args=(child, name, size, batch))
        self.process.start()
        child.close()    # else a dead child's end stays open here and recv never returns
        self.params = self(None)

    def __call__(self, message="step"):
        try:
            if message:
                self.conn.send(message)
            return self.conn.recv()
        except (EOFError, BrokenPipeError):
            self.process.join()
            raise RuntimeError(f"the PyTorch twin of {self.name} exited with code "
                               f"{self.process.exitcode} (its traceback is above)") from None

    def close(self) -> None:
        self.conn.close()
        self.process.join()


def torch_wanted(name: str, choice: str) -> bool:
    found = all(importlib.util.find_spec(m) for m in ("torch", "torchvision")
                if m == "torch" or name.startswith("resnet"))
    if choice == "on" and not found:
        raise ImportError(f"--torch=on: torch (and torchvision for ResNets) for {name}")
    return choice != "off" and found


def time_in_turns(timers, steps: int) -> list[tuple[float, float]]:
    """(first call's seconds, fastest of ``steps`` later calls) per timer. After one
    warm-up each, rounds give every timer a turn; with several timers a turn is an untimed
    call, then the timed one, so that the timed step follows one of its own, as in a
    training loop, and not the other's freeing of its memory."""
    firsts, best = [timer() for timer in timers], [math.inf] * len(timers)
    for _ in range(steps):
        for i, timer in enumerate(timers):
            if len(timers) > 1:
                timer()
            best[i] = min(best[i], timer())
    return list(zip(firsts, best))


def bench(name: str, size: int, args) -> list[dict]:
    """The rows of one backbone and size, one per ``--cpu_kernels`` choice."""
    while name == "bninception" and not final_grid(size):    # it takes only some sizes
        size += 1
    images = jax.random.normal(jax.random.key(0), (args.batch, size, size, 3))
    models = [random_model(name, choice) for choice in args.cpu_kernels]
    rows = [dict(model=name, size=size, params=count_params(models[0]), first=0.0, fwd=None,
                 torch=None, cpu_kernels=c if c != "auto" else
                 f"auto ({'on' if resolve_cpu_kernels(c) else 'off'})") for c in args.cpu_kernels]
    forwards, steps = zip(*(jax_timers(model, images) for model in models))
    if not args.no_forward:
        for row, (first, fastest) in zip(rows, time_in_turns(forwards, args.steps)):
            row.update(first=first, fwd=args.batch / fastest)
    twin = TorchTwin(name, size, args.batch) if torch_wanted(name, args.torch) else None
    try:
        if twin and twin.params != rows[0]["params"]:
            raise RuntimeError(f"{name}: the PyTorch twin has {twin.params} parameters, "
                               f"gl_jax {rows[0]['params']}")
        timings = time_in_turns(list(steps) + ([twin] if twin else []), args.steps)
    finally:
        if twin:
            twin.close()
    for row, (first, fastest) in zip(rows, timings):
        row.update(first=row["first"] + first, step=args.batch / fastest,
                   torch=args.batch / timings[-1][1] if twin else None)
    return rows


HEADER = ("| model | px | cpu_kernels | params (M) | first calls s | fwd img/s | step img/s "
          "| PyTorch step img/s | gl_jax / PyTorch |\n" + "|---" * 9 + "|")


def format_row(r: dict) -> str:
    def num(value, fmt=".1f"):
        return "-" if value is None else f"{value:{fmt}}"
    ratio = r["step"] / r["torch"] if r["torch"] else None
    return (f"| {r['model']} | {r['size']} | {r['cpu_kernels']} | {r['params'] / 1e6:.2f} "
            f"| {r['first']:.1f} | {num(r['fwd'])} | {r['step']:.1f} | {num(r['torch'])} "
            f"| {num(ratio, '.2f')}{'x' if ratio else ''} |")


def main(argv=None):
    args = parse_args(argv)
    device = jax.devices()[0]
    print(f"{device.device_kind} ({device.platform}), batch {args.batch}, fastest of "
          f"{args.steps} steps, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n{HEADER}",
          flush=True)
    for name in args.models:
        for size in args.sizes:
            for row in bench(name, size, args):
                print(format_row(row), flush=True)


if __name__ == "__main__":
    main()
