"""Speed of the Group Loss: jitted JAX against the same equations in NumPy and PyTorch eager.

        python experiments/bench_loss.py                 # the issue's five (n, m) sizes
        python experiments/bench_loss.py --sizes=54x100,512x1000 --dim=512 --repeats=5

For each batch size n and class count m it times, in one run, the forward and the
forward+backward of: the jitted `gl_jax.losses.group_loss`; a NumPy implementation of the
same equations (forward only: NumPy has no autodiff); and, when torch is installed,
PyTorch eager (the framework of the original implementation), forward and autograd
backward. It prints a Markdown table with the ratios other / JAX. Median of `--repeats`
timed calls after one warm-up call (which includes JAX's compilation).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import jax
import jax.numpy as jnp

from gl_jax import losses

try:
    import torch
except ImportError:  # optional comparison
    torch = None

TEMPERATURE = 24.0
ANCHORS_PER_CLASS = 2
ITERATIONS = 1


def make_problem(n, m, d, seed=0):
    rng = np.random.default_rng(seed)
    samples_per_class = 9 if n % 9 == 0 else 7 if n % 7 == 0 else 6 if n % 6 == 0 else 8
    labels = (np.arange(n) // samples_per_class) % m
    logits = rng.normal(size=(n, m)).astype(np.float32)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    anchors = np.array(losses.anchor_mask(labels, ANCHORS_PER_CLASS))
    return logits, labels.astype(np.int32), anchors, feats


def numpy_forward(logits, labels, anchors, feats):
    z = logits / TEMPERATURE
    e = np.exp(z - z.max(1, keepdims=True))
    x = e / e.sum(1, keepdims=True)
    x[anchors] = 0.0
    x[anchors, labels[anchors]] = 1.0
    c = feats - feats.mean(1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    w = np.maximum(c @ c.T, 0.0)
    np.fill_diagonal(w, 1.0)
    for _ in range(ITERATIONS):
        x = x * (w @ x)
        x /= x.sum(1, keepdims=True)
    return -np.log(x[np.arange(len(labels)), labels] + 1e-12).mean()


def torch_loss(logits, labels, anchors, feats):
    x = torch.softmax(logits / TEMPERATURE, dim=1)
    onehot = torch.nn.functional.one_hot(labels, logits.shape[1]).to(x.dtype)
    x = torch.where(anchors[:, None], onehot, x)
    c = feats - feats.mean(1, keepdim=True)
    c = c / c.norm(dim=1, keepdim=True)
    w = torch.relu(c @ c.T)
    w = torch.where(torch.eye(len(w), dtype=torch.bool), torch.ones_like(w), w)
    for _ in range(ITERATIONS):
        x = x * (w @ x)
        x = x / x.sum(1, keepdim=True)
    return -torch.log(x[torch.arange(len(labels)), labels] + 1e-12).mean()


def time_call(fn, repeats):
    fn()  # warm-up (and compilation for JAX)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench(n, m, d, repeats):
    logits, labels, anchors, feats = make_problem(n, m, d)
    args = [jnp.asarray(a) for a in (logits, labels, anchors, feats)]

    def jax_mean(lg, lb, an, ft):
        return jnp.mean(losses.group_loss(lg, lb, an, ft, temperature=TEMPERATURE,
                                          num_iterations=ITERATIONS))

    fwd = jax.jit(jax_mean)
    fwd_bwd = jax.jit(jax.value_and_grad(jax_mean, argnums=(0, 3)))
    row = {
        "jax_fwd": time_call(lambda: fwd(*args).block_until_ready(), repeats),
        "jax_fwd_bwd": time_call(lambda: jax.block_until_ready(fwd_bwd(*args)), repeats),
        "numpy_fwd": time_call(lambda: numpy_forward(logits, labels, anchors, feats), repeats),
    }
    # The three implementations must agree before their speeds mean anything.
    np.testing.assert_allclose(float(fwd(*args)), numpy_forward(logits, labels, anchors, feats),
                               rtol=1e-4)
    if torch is not None:
        t_args = [torch.from_numpy(logits), torch.from_numpy(labels).long(),
                  torch.from_numpy(anchors), torch.from_numpy(feats)]

        def torch_fwd():
            with torch.no_grad():
                return torch_loss(*t_args)

        def torch_fwd_bwd():
            lg = t_args[0].clone().requires_grad_(True)
            ft = t_args[3].clone().requires_grad_(True)
            torch_loss(lg, t_args[1], t_args[2], ft).backward()

        np.testing.assert_allclose(float(torch_fwd()), float(fwd(*args)), rtol=1e-4)
        row["torch_fwd"] = time_call(torch_fwd, repeats)
        row["torch_fwd_bwd"] = time_call(torch_fwd_bwd, repeats)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="54x100,35x98,60x11318,512x1000,4096x1000",
                        help="comma-separated n x m pairs")
    parser.add_argument("--dim", type=int, default=1024, help="embedding size d (BN-Inception: 1024)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; "
          f"torch {torch.__version__ if torch else 'not installed'}; d = {args.dim}, "
          f"T = {TEMPERATURE}, iterations = {ITERATIONS}; median of {args.repeats}, ms\n")
    header = ["n x m", "JAX fwd", "JAX fwd+bwd", "NumPy fwd", "NumPy/JAX fwd"]
    if torch is not None:
        header += ["torch fwd", "torch fwd+bwd", "torch/JAX fwd", "torch/JAX fwd+bwd"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for size in args.sizes.split(","):
        n, m = (int(v) for v in size.lower().split("x"))
        r = bench(n, m, args.dim, args.repeats)
        cells = [f"{n} x {m}", f"{r['jax_fwd'] * 1e3:.2f}", f"{r['jax_fwd_bwd'] * 1e3:.2f}",
                 f"{r['numpy_fwd'] * 1e3:.2f}", f"{r['numpy_fwd'] / r['jax_fwd']:.1f}x"]
        if torch is not None:
            cells += [f"{r['torch_fwd'] * 1e3:.2f}", f"{r['torch_fwd_bwd'] * 1e3:.2f}",
                      f"{r['torch_fwd'] / r['jax_fwd']:.1f}x",
                      f"{r['torch_fwd_bwd'] / r['jax_fwd_bwd']:.1f}x"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
