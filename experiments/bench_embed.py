"""Benchmark: `gl_jax.embed` against the trainer's own evaluation pass, same model, same
images (the run's test split), same batch size, in one process.

* evaluation: `runtime.embed_source` with the trainer's embedder over the test split, as
  `protocol.evaluate_split` runs it at every evaluation (the embeddings only, no metrics),
  the model restored and the split loaded beforehand, as in the trainer;
* embed, the pass: `embed.write_embeddings` with the model loaded and the images
  resolved: the shards (each written to disk), the digest, the output file; also with
  small shards (`--small_shards`), to show what shards cost;
* embed, the whole call: `embed.embed_images(workdir, "split:test", ...)`, all that the
  command does after its imports: also restoring the checkpoint, loading the split and
  compiling the embedding step (costs that do not grow with the number of images).

Each is run once to compile, then `--repeats` times in turn; the median wall time is
reported as images per second and as a multiple of the evaluation's.

    python experiments/bench_embed.py                  # trains omniglot:quick first (~30 s)
    python experiments/bench_embed.py --workdir=W      # any trained workdir
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gl_jax import xla_flags  # noqa: E402  (before JAX starts a backend)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="a trained workdir (default: train "
                        "configs/omniglot.py:quick into a temporary folder)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--small_shards", type=int, default=256)
    args = parser.parse_args()

    from configs import omniglot
    from gl_jax import ablation
    workdir = args.workdir
    config = (ablation.load_workdir_config(workdir) if workdir
              else omniglot.get_config("quick"))
    xla_flags.apply(config)   # the commands' XLA:CPU settings, for both sides alike
    import jax
    import ml_collections
    from gl_jax import embed, runtime, train
    scratch = tempfile.mkdtemp(prefix="bench_embed_")
    if workdir is None:
        workdir = os.path.join(scratch, "run")
        config.logging.progress = False
        train.train_and_evaluate(config, workdir)
        config = ablation.load_workdir_config(workdir)

    mesh = runtime.make_mesh(config.mesh)
    splits = runtime.load_splits(config)
    test = splits["test"]
    member = ablation.restore_member(workdir, config, splits["train"].num_classes, mesh)
    quiet = ml_collections.ConfigDict(config.to_dict())
    quiet.logging.progress = False
    jobs = [(runtime.Embedder(member.graphdef, mesh), member.params, member.model_state)]

    def evaluation():
        runtime.embed_source(jobs, test, quiet, mesh)

    output = os.path.join(scratch, "out.npz")
    model = embed.load_model(workdir)
    found = embed.resolve_images("split:test", config)

    def embed_pass(shard_size):
        return lambda: embed.write_embeddings(model, found, output, shard_size=shard_size,
                                              show_progress=False)

    def whole_call():
        embed.embed_images(workdir, "split:test", output, show_progress=False)

    cases = {"trainer's evaluation pass": evaluation,
             "gl_jax.embed pass (one shard)": embed_pass(embed.DEFAULT_SHARD_SIZE),
             f"gl_jax.embed pass (shards of {args.small_shards})": embed_pass(args.small_shards),
             "gl_jax.embed whole call": whole_call}
    times = {name: [] for name in cases}
    for run in cases.values():   # compile
        run()
    for _ in range(args.repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    base = statistics.median(times["trainer's evaluation pass"])
    print(f"{config.data.name} test split: {len(test)} images, {config.model.name} at "
          f"{config.data.image_size} px, batch {config.evals.batch_size}, {mesh.size} "
          f"device(s) ({jax.devices()[0].platform}); median of {args.repeats}")
    print(f"| {'pass':36s} | seconds | images/s | time / evaluation |")
    print(f"|{'-' * 38}|---------|----------|-------------------|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name:36s} | {median:7.3f} | {len(test) / median:8.0f} | "
              f"{median / base:17.2f} |")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
