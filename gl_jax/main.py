"""Command line: `python -m gl_jax.main --config=configs/digits.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.optimizer.lr=1e-4`; a config file may
take an argument after a colon (`configs/cars196.py:quick`). Running the same command
again resumes from the last checkpoint in DIR.
"""
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from gl_jax import cli
from gl_jax import config_checks
from gl_jax import workdir_lock
from gl_jax import xla_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0. Unset: detected (Cloud TPU, SLURM, "
                    "Open MPI) or read from JAX_COORDINATOR_ADDRESS.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (unset: detected).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index (unset: detected).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    # What needs neither JAX nor the data, before the trainer's imports (Flax, Orbax:
    # seconds) and before the workdir gets anything: a bad value or an unusable workdir.
    config_checks.validate_fields(config)
    created = not os.path.exists(FLAGS.workdir)
    workdir_lock.prepare(FLAGS.workdir)
    try:
        _train(config)
    except BaseException:
        if created:   # a run refused before it wrote anything leaves no workdir behind
            workdir_lock.remove_if_unused(FLAGS.workdir)
        raise


def _train(config) -> None:
    import jax
    from gl_jax import train
    # Before anything starts a JAX backend, which reads XLA_FLAGS once.
    chosen = xla_flags.apply(config)
    if chosen:
        logging.info(chosen)
    if config.mesh.distributed:
        # Multi-host (e.g. a Cloud TPU VM pod slice): every process runs this same command;
        # coordinates come from the environment (TPU metadata, SLURM, Open MPI) unless the
        # flags give them (any other cluster, or several processes on one machine).
        # Collectives between CPU devices of different processes need gloo; accelerators
        # use their own (ICI, NCCL), so this changes nothing on a GPU or TPU host.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        try:
            jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                       num_processes=FLAGS.num_processes,
                                       process_id=FLAGS.process_id)
        except ValueError as e:   # nothing in the environment says where the others are
            raise ValueError(
                f"config.mesh.distributed = True: {e} (jax.distributed finds the coordinator "
                "on Cloud TPU, SLURM and Open MPI; elsewhere pass --coordinator_address="
                "HOST:PORT --num_processes=N --process_id=I)") from e
    where = (f"JAX process {jax.process_index()} / {jax.process_count()}, local devices "
             f"{jax.local_devices()}")
    if jax.process_count() > 1:
        print(where, flush=True)   # each host's log says which process it is
    else:
        logging.info(where)
    train.train_and_evaluate(config, FLAGS.workdir)


def refuse_busy_workdir(argv):
    """A workdir another run holds is refused before absl loads the config file, which
    imports JAX (seconds); the trainer's WorkdirLock is what keeps two runs apart. The
    processes of a multi-host run share the workdir, but process 0 locks it only after
    jax.distributed.initialize, which waits for every process: after their checks."""
    workdirs = list(cli.flag_values(argv, "workdir"))
    if workdirs and workdirs[-1]:   # absl keeps the last; empty: main's message
        workdir_lock.check_free(workdirs[-1])


if __name__ == "__main__":
    cli.run(main, before_flags=refuse_busy_workdir)
