"""Throughput of every backbone: forward and training-step images per second, beside PyTorch.

    python experiments/bench_models.py                       # CPU defaults (batch 8, 2 timed steps)
    python experiments/bench_models.py --models=resnet18,small_cnn --sizes=64 --steps=3
    python experiments/bench_models.py --models=efficientnet_lite0,resnet18,resnet50 \
        --sizes=112 --batch=32 --no_forward                  # the training step vs PyTorch
    python experiments/bench_models.py --batch=128 --steps=20   # on a GPU

One run prints one table: per backbone and image size, the compile time, forward images/s
(eval mode, jitted), training-step images/s (train mode: batch statistics, loss
mean(embedding^2) + mean(logits^2), gradient with respect to every parameter, plain SGD
update, BatchNorm statistics updated), the step's megapixels/s (images/s x px^2: equal
across sizes when no size hits a slow path) and the ratio forward / step. When torch (and
torchvision for the ResNets) is importable, the same training step of the same backbone
(experiments/torch_reference.py: same batch, size, loss, SGD; PyTorch eager, NCHW) is
timed in the same run, in turns with gl_jax's step (one step of each per round, so both
meet the same state of a shared machine), and the table adds its images/s and gl_jax /
PyTorch. PyTorch runs in a child process of its own, one per row, driven over a pipe:
this process never imports torch, so neither framework's heap or threads are in the
other's way. torch is never a dependency of gl_jax (--torch=off skips it). When an
accelerator is present, ResNet-50 and BN-Inception at 227 px are added in bfloat16
compute (float32 parameters) beside their float32 rows, with the bf16 speed-up.

Parameters are random (He-scaled NumPy draws into a shape-only model) because real
initialisation compiles one program per parameter shape and would dominate a CPU run;
speed does not depend on the values. Every speed is the fastest of --steps timed steps
(after one warm-up; cheap steps are repeated until they add up to --min_seconds).
PyTorch's process keeps freed memory in its heap (``torch_reference.steady_allocator``):
with glibc's default, PyTorch's step time depended on what the process had run before.
gl_jax's process runs as the trainer does (``gl_jax.host_memory``: huge pages, or heap
reuse with ``GL_JAX_HOST_MALLOC=reuse``) and calls no mallopt: one would override the
reuse tunables' trim threshold (mallopt takes at most 2 GiB), and ResNet-50's 4.5 GB step
buffer at 227 px went back to the kernel after every step (0.70x PyTorch instead of
about 1.0x).
Timings on a shared CPU still vary between runs: compare within one run. Run with
PYTHONPATH=. from a worktree, or the installed gl_jax is imported (in both processes).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gl_jax import host_memory
from gl_jax.models import available_models, count_params, create_model
from gl_jax.models.bninception import final_grid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference  # noqa: E402  (imports torch only in the twin's own process)

LEARNING_RATE = 0.01


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(available_models()),
                        help="comma-separated registry names (default: all)")
    parser.add_argument("--sizes", default="64,112,227", help="comma-separated image sizes (px)")
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after 1 warm-up)")
    parser.add_argument("--min_seconds", type=float, default=1.0,
                        help="time more steps (up to 50) until they add up to this many "
                             "seconds, per model, size and framework")
    parser.add_argument("--num_classes", type=int, default=100, help="classifier size")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="bfloat16 rows for resnet50/bninception at 227 px "
                             "(auto: only when an accelerator is present)")
    parser.add_argument("--no_backward", action="store_true", help="time the forward only")
    parser.add_argument("--no_forward", action="store_true",
                        help="skip the eval-mode forward (time the training step only)")
    parser.add_argument("--torch", choices=("auto", "on", "off"), default="auto",
                        help="PyTorch eager twin of each float32 row (auto: when importable)")
    args = parser.parse_args(argv)
    for name in args.models.split(","):
        if name not in available_models():
            parser.error(f"--models: unknown model {name!r}; known: {available_models()}")
    if args.batch < 1 or args.steps < 1:
        parser.error(f"--batch and --steps must be >= 1, got {args.batch}, {args.steps}")
    if args.min_seconds < 0:
        parser.error(f"--min_seconds must be >= 0, got {args.min_seconds}")
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


def _timer(call):
    """A zero-argument function that runs ``call`` once and returns its seconds, until its
    results are ready."""
    def timer():
        start = time.perf_counter()
        jax.block_until_ready(call())
        return time.perf_counter() - start
    return timer


def _time(fn, *args, steps: int, min_seconds: float = 0.0,
          max_steps: int = 50) -> tuple[float, float]:
    """(seconds of the first call = compile + one run, seconds of the fastest of the later
    calls: at least `steps` of them, more while they have taken less than `min_seconds`
    in all, up to `max_steps`). The minimum is the least disturbed by other processes on
    a shared CPU, and cheap steps get more tries at an undisturbed one."""
    return _time_alternating([_timer(lambda: fn(*args))], steps=steps,
                             min_seconds=min_seconds, max_steps=max_steps)[0]


def _time_alternating(timers, *, steps: int, min_seconds: float = 0.0,
                      max_steps: int = 50) -> list[tuple[float, float]]:
    """``_time`` for several steps at once, taking turns. Each timer runs its step once and
    returns the seconds it took (``_timer``, or ``TorchTwin`` from its own process). Each
    is called once (compile + run), then rounds of one turn of each, in order, until
    there have been `steps` rounds and every one has taken `min_seconds` in all (at most
    `max_steps` rounds). Returns (first, fastest) per timer. Taking turns puts the two
    frameworks' steps side by side in time, so that a shared machine's slower minutes
    fall on both (timed one after the other, minutes apart, the same command's ratios
    moved by up to 1.5x between runs; docs/models.md).

    With several timers a turn is two calls, the second timed: the timed step follows a
    step of its own, as in a training loop. Timed right after the other framework's step
    instead, a step pays for the memory it freed seconds before: on a VM that hands
    memory freed for 2 s back to its host (free page reporting; `python -m
    experiments.page_reporting`), touching it again costs several times more, and
    gl_jax's step maps its buffer afresh each step under the default huge pages."""
    firsts = [timer() for timer in timers]
    times = [[] for _ in timers]
    while len(times[0]) < steps or (min(sum(t) for t in times) < min_seconds
                                    and len(times[0]) < max_steps):
        for timer, spent in zip(timers, times):
            if len(timers) > 1:
                timer()   # the lead-in step, not timed
            spent.append(timer())
    return [(first, min(spent)) for first, spent in zip(firsts, times)]


class TorchTwin:
    """PyTorch's twin of one row's training step, in a child process of its own
    (``python experiments/torch_reference.py``, same interpreter and environment, so the
    same allocator settings). Calling it runs one step there and returns its seconds as
    measured in the child. ``start`` raises ImportError, with the child's message, when
    torch (or torchvision for the ResNets) is not importable there."""

    def __init__(self, process: subprocess.Popen, errors):
        self.process, self.errors = process, errors

    @classmethod
    def start(cls, name: str, num_classes: int, size: int, batch: int,
              expected_params: int, lr: float) -> "TorchTwin":
        # stderr to a file, not a pipe: a chatty child could fill a pipe and block.
        errors = tempfile.TemporaryFile(mode="w+")
        process = subprocess.Popen(
            [sys.executable, torch_reference.__file__], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=errors, text=True)
        twin = cls(process, errors)
        spec = dict(name=name, num_classes=num_classes, size=size, batch=batch,
                    expected_params=expected_params, lr=lr)
        reply = twin._ask(json.dumps(spec))
        if "missing" in reply:
            twin.close()
            raise ImportError(f"PyTorch twin of {name}: {reply['missing']}")
        return twin

    def _ask(self, line: str) -> dict:
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
            answer = self.process.stdout.readline()
        except BrokenPipeError:
            answer = ""
        if not answer:
            self.process.stdin.close()
            code = self.process.wait()
            self.errors.seek(0)
            err = self.errors.read()
            raise RuntimeError(f"the PyTorch twin process ({torch_reference.__file__}) "
                               f"exited with status {code}:\n{err[-3000:]}")
        return json.loads(answer)

    def __call__(self) -> float:
        return self._ask("step")["seconds"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait()
        self.process.stdout.close()
        self.errors.close()


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
    row = dict(model=name, size=size, dtype=jnp.dtype(dtype).name, params=count_params(model),
               compile=0.0, fwd=None)
    if not args.no_forward:
        model.eval()
        eval_graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

        @jax.jit
        def forward(params, stats, images):
            return nnx.merge(eval_graphdef, params, stats)(images)[0]

        compile_fwd, fwd = _time(forward, params, stats, images, steps=args.steps,
                                 min_seconds=args.min_seconds)
        row.update(compile=compile_fwd, fwd=args.batch / fwd)
    if not args.no_backward:
        train_step, params, stats = make_train_step(model)
        timers = [_timer(lambda: train_step(params, stats, images))]
        twin = None
        if args.torch != "off" and row["dtype"] == "float32":
            twin = torch_step(name, size, args, row["params"])
        try:
            timers += [twin] if twin is not None else []
            timings = _time_alternating(timers, steps=args.steps,
                                        min_seconds=args.min_seconds)
        finally:
            if twin is not None:
                twin.close()
        (compile_bwd, step), torch_timing = timings[0], timings[1:]
        row.update(compile=row["compile"] + compile_bwd, fwd_bwd=args.batch / step)
        if torch_timing:
            row["torch"] = args.batch / torch_timing[0][1]
    return row


def make_train_step(model: nnx.Module):
    """(jitted step, params, batch statistics) of the benchmark's training step: train mode,
    loss mean(embedding^2) + mean(logits^2), plain SGD; ``step(params, stats, images)``
    returns (loss, new statistics, new params). Traced at its first call."""
    model.train()
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    @jax.jit
    def train_step(params, stats, images):
        def loss_fn(params):
            m = nnx.merge(graphdef, params, stats, copy=True)
            embedding, aux = m(images)
            loss = jnp.mean(embedding ** 2) + jnp.mean(aux["logits"] ** 2)
            return loss, nnx.state(m, nnx.BatchStat)
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new_params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
        return loss, new_stats, new_params

    return train_step, params, stats


def torch_step(name: str, size: int, args, params: int) -> TorchTwin | None:
    """PyTorch eager's twin of the same training step in its own process (``TorchTwin``),
    or None when torch is missing (an error with --torch=on). ``bench_one`` times it in
    turns with gl_jax's step and closes it after the row."""
    try:
        return TorchTwin.start(name, args.num_classes, size, args.batch,
                               expected_params=params, lr=LEARNING_RATE)
    except ImportError:
        if args.torch == "on":
            raise
        return None


def _num(value, fmt=".1f", suffix=""):
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def format_table(rows: list[dict]) -> str:
    lines = ["| model | px | dtype | params (M) | first calls s | fwd img/s | step img/s "
             "| step Mpx/s | fwd / step | PyTorch step img/s | gl_jax / PyTorch "
             "| bf16 speed-up step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f32 = {(r["model"], r["size"]): r for r in rows if r["dtype"] == "float32"}
    for r in rows:
        fb, fwd, pt = r.get("fwd_bwd"), r.get("fwd"), r.get("torch")
        speedup = None
        base = f32.get((r["model"], r["size"]))
        if r["dtype"] != "float32" and base is not None and fb and base.get("fwd_bwd"):
            speedup = fb / base["fwd_bwd"]
        lines.append(
            f"| {r['model']} | {r['size']} | {r['dtype']} | {r['params'] / 1e6:.2f} "
            f"| {r['compile']:.1f} | {_num(fwd)} | {_num(fb)} "
            f"| {_num(fb * r['size'] ** 2 / 1e6 if fb else None, '.2f')} "
            f"| {_num(fwd / fb if fwd and fb else None, '.2f')} | {_num(pt)} "
            f"| {_num(fb / pt if fb and pt else None, '.2f', 'x')} "
            f"| {_num(speedup, '.2f', 'x')} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    device = jax.devices()[0]
    accelerator = device.platform != "cpu"
    print(f"device: {device.device_kind} ({device.platform}), {jax.device_count()} device(s); "
          f"batch {args.batch}, {args.steps} timed step(s); gl_jax's huge pages: "
          f"{'on' if host_memory.huge_pages_asked() else 'off'}; heap reuse: "
          f"{'on' if host_memory.reuse_asked() else 'off'}", flush=True)
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
        print(f"  {name} {size}px {row['dtype']}: fwd {_num(row['fwd'])} img/s, step "
              f"{_num(row.get('fwd_bwd'))} img/s, PyTorch step {_num(row.get('torch'))} img/s "
              f"(compile {row['compile']:.1f} s)", flush=True)
    print()
    print(format_table(rows))


if __name__ == "__main__":
    host_memory.restart_with_tuned_malloc()    # as `python -m gl_jax.main` runs
    main()
