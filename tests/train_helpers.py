"""Shared by the trainer's tests: a CPU-sized digits config, reading a workdir back, and
`python -m gl_jax.main` in a subprocess."""
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from configs import digits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick_config(**overrides):
    config = digits.get_config("quick")
    config.logging.progress = False
    for dotted, value in overrides.items():
        section, field = dotted.split("__")
        config[section][field] = value
    return config


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def latest_params(workdir):
    """The parameters of the newest checkpoint as a flat {path: array} dict."""
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    flat = jax.tree_util.tree_flatten_with_path(restored["state"]["params"])[0]
    return step, {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def assert_same_params(workdir, reference, step=40):
    """The newest checkpoints of two runs hold the same step and bit-identical parameters."""
    step_a, params_a = latest_params(workdir)
    step_b, params_b = latest_params(reference)
    assert step_a == step_b == step and params_a.keys() == params_b.keys()
    for key in params_a:
        np.testing.assert_array_equal(params_a[key], params_b[key], err_msg=key)


class _Run:
    """`python -m gl_jax.main` on digits:quick in a subprocess, its output in a file (a pipe
    nobody reads would fill up and block the child)."""

    def __init__(self, workdir, *flags, env=None):
        os.makedirs(workdir, exist_ok=True)
        self.log = os.path.join(workdir, f"log{time.time_ns()}.txt")
        cmd = [sys.executable, "-m", "gl_jax.main", "--config=configs/digits.py:quick",
               f"--workdir={workdir}", "--config.logging.progress=False", *flags]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, **(env or {})))

    def output(self):
        with open(self.log) as f:
            return f.read()

    def wait(self, timeout=600):
        self.proc.wait(timeout=timeout)
        return self.proc.returncode, self.output()


def _run_main(workdir, *flags):
    return _Run(workdir, *flags).wait()


def _wait_for_checkpoint(run, workdir, min_step, timeout=300):
    ckpt = os.path.join(workdir, "checkpoints")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isdir(ckpt) and any(d.isdigit() and int(d) >= min_step for d in os.listdir(ckpt)):
            return
        if run.proc.poll() is not None:
            raise AssertionError(f"the run ended before step {min_step}:\n{run.output()}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared in time")


