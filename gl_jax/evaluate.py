"""Command line: Group Loss++ evaluation of trained checkpoints (library: `gl_jax.ablation`).

    python -m gl_jax.evaluate --workdir=W                      # config from W/config.json
    python -m gl_jax.evaluate --config=configs/cub200.py --config.data.root=... --workdir=W
    python -m gl_jax.evaluate --workdir=W1 --workdir=W2 --workdir=W3     # an ensemble
    python -m gl_jax.evaluate --workdir=W --evaluate.strategies=rerank,flip \\
        --evaluate.rerank_k1=30

`--evaluate.<field>` overrides a field of `gl_jax.ablation.default_settings()` (which
strategies, their values, the checkpoint, the output folder, the pictures).
"""
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from gl_jax import ablation
from gl_jax import checkpoints
from gl_jax import cli
from gl_jax import xla_flags

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("workdir", None, "Training workdir(s); several = an ensemble.")
config_flags.DEFINE_config_file("config", None, "Training config file; default: the "
                                "first workdir's config.json.", lock_config=False)
flags.mark_flag_as_required("workdir")


def define_settings_flag(argv=None):
    """--evaluate, defined when the command runs rather than on import: ml_collections
    applies the --evaluate.<field> overrides as it defines the flag, and an unknown field
    is a one-line error only inside gl_jax.cli.run."""
    config_flags.DEFINE_config_dict("evaluate", ablation.default_settings(),
                                    "Evaluate settings, e.g. --evaluate.strategies=rerank,flip.",
                                    sys_argv=argv)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    settings = FLAGS.evaluate
    for w in FLAGS.workdir:   # a clear message about a bad workdir comes first
        if not os.path.isdir(w):
            raise FileNotFoundError(f"--workdir={w!r} does not exist.")
    config = FLAGS.config if FLAGS.config is not None else ablation.load_workdir_config(
        FLAGS.workdir[0])
    # Before anything starts a JAX backend: Orbax does, when it looks for the checkpoints.
    chosen = xla_flags.apply(config)
    if chosen:
        logging.info(chosen)
    for w in FLAGS.workdir:
        checkpoints.find(w, settings.checkpoint)
    ablation.run(config, FLAGS.workdir, settings)


if __name__ == "__main__":
    cli.run(main, before_flags=define_settings_flag)
