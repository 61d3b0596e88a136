"""Training-step throughput of the Group Loss step, and what the loss itself costs.

    python experiments/bench_train.py                                   # CPU: ResNet-18/50, 112 px
    python experiments/bench_train.py --models=resnet50,bninception --size=227 --dtype=bfloat16

For each backbone it jits `gl_jax.train.train_step` (the real step: forward, Group Loss
+ cross-entropy, backward, RAdam update, BatchNorm statistics) on a 6 x 9 = 54 batch and
times it after compilation; side by side, in the same run, the same step with the
cross-entropy alone, so the ratio shows the Group Loss's share of a step. With
`--pipeline`, batches come from the real grain pipeline on generated JPEGs instead of
one fixed device array (the input side's cost is then included).
"""
from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time

import numpy as np

import jax
import jax.numpy as jnp
import ml_collections

from gl_jax import models
from gl_jax import optimizer
from gl_jax import runtime
from gl_jax import train


def make_config(model_name, size, dtype):
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = ml_collections.ConfigDict(dict(
        name=model_name, embedding_dim=0, pooling="avg", pool_mix=0.5, leak=-1.0,
        bn_momentum=-1.0, bn_epsilon=-1.0, dtype=dtype, init_from=""))
    return config


def pipeline_batches(size, batch, steps):
    """Real grain batches from generated JPEGs (P x K = 6 x 9)."""
    from PIL import Image
    from gl_jax import data as gdata
    root = tempfile.mkdtemp(prefix="bench_train_")
    rng = np.random.default_rng(0)
    for c in range(6):
        os.makedirs(os.path.join(root, f"class{c:02d}"))
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (size + 40, size + 60, 3), np.uint8)).save(
                os.path.join(root, f"class{c:02d}", f"{i}.jpg"))
    data_config = gdata.default_config("image_folder")
    data_config.root, data_config.image_size, data_config.resize_size = root, size, size + 29
    data_config.train_classes = 6
    sampler = gdata.default_sampler_config("image_folder")
    source = gdata.image_folder_source(root)
    it = gdata.make_train_iterator(source, data_config, sampler)
    return it


def bench_model(name, args):
    num_classes = 100
    config = make_config(name, args.size, args.dtype)
    model = runtime.build_model(config, num_classes)
    tx = optimizer.make_optimizer(1e-4, weight_decay=1e-5)
    graphdef, state = runtime.create_train_state(model, tx)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(54, args.size, args.size, 3)), jnp.float32),
             "label": jnp.asarray(np.repeat(np.arange(6), 9), jnp.int32)}
    specs = {"group loss + CE": train.LossSpec(name="group_loss", hparams=tuple(sorted(dict(
                 temperature=24.0, num_iterations=1, anchors_per_class=2, random_anchors=False,
                 ce_weight=1.0).items()))),
             "CE only": train.LossSpec()}
    it = pipeline_batches(args.size, 54, args.steps) if args.pipeline else None
    out = {}
    for label, spec in specs.items():
        step = jax.jit(functools.partial(train.train_step, graphdef, tx, spec),
                       donate_argnums=(0,))
        s = jax.tree.map(jnp.copy, state)
        start = time.perf_counter()
        s, metrics = step(s, batch)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(args.steps):
            b = batch
            if it is not None:
                nb = next(it)
                b = {"image": jnp.asarray(nb["image"]), "label": jnp.asarray(nb["label"])}
            start = time.perf_counter()
            s, metrics = step(s, b)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        assert np.isfinite(float(metrics["loss"]))
        out[label] = (float(np.median(times)), compile_s)
    return out, models.count_params(model)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--pipeline", action="store_true", help="feed real grain batches")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}; "
          f"batch 6 x 9 = 54 at {args.size} px, {args.dtype}, median of {args.steps} steps"
          f"{', grain pipeline feeding' if args.pipeline else ''}\n")
    print("| backbone | params | GL step s | GL images/s | CE-only step s | GL / CE time "
          "| compile s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        r, params = bench_model(name, args)
        gl, ce = r["group loss + CE"], r["CE only"]
        print(f"| {name} | {params / 1e6:.1f}M | {gl[0]:.3f} | {54 / gl[0]:.1f} | {ce[0]:.3f} | "
              f"{gl[0] / ce[0]:.2f} | {gl[1]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
