"""Two JAX processes (2 CPU devices each) joined by `jax.distributed`, as two hosts would be.

`python -m gl_jax.main --config.mesh.distributed=True` on each "host", every process
feeding its half of the global batch, must train exactly what one process with the
same 4 devices trains, and write one set of results."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import digits
from gl_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"schedule.epochs": 1, "schedule.steps_per_epoch": 4, "warmup.steps_per_epoch": 3,
             "logging.every_steps": 1, "checkpoint.every_steps": 100}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r.get("warmup/loss", r.get("group/loss"))) for r in rows
            if "warmup/loss" in r or "group/loss" in r]


def _launch(workdir, port, process_id, overrides=OVERRIDES):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [sys.executable, "-m", "gl_jax.main", "--config=configs/digits.py:quick",
           f"--workdir={workdir}", "--config.logging.progress=False",
           "--config.mesh.distributed=True", f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={process_id}"]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    log = open(os.path.join(os.path.dirname(workdir), f"process{process_id}.log"), "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log


@pytest.mark.parametrize("process", [0, 1])
def test_no_process_reads_a_checkpoint_before_its_manifest_is_written(
        tmp_path, monkeypatch, process):
    """With several processes, saving ends in a barrier that process 0 reaches only after
    writing the manifest: a process that went on at once found no manifest, skipped the
    best checkpoint the others restored, and the run hung (seen in the two-process test)."""
    import ml_collections
    from jax.experimental import multihost_utils
    from gl_jax import checkpoints as ckpt

    config = ml_collections.ConfigDict({"checkpoint": {"max_to_keep": 2}})
    checkpoints = ckpt.Checkpoints(str(tmp_path), config)
    barriers = []

    def barrier(name):
        directory = os.path.join(str(tmp_path), "best", "3")
        barriers.append((name, os.path.exists(os.path.join(directory, ckpt.MANIFEST))))

    monkeypatch.setattr(ckpt, "_processes", lambda: (process, 2))
    monkeypatch.setattr(multihost_utils, "sync_global_devices", barrier)
    checkpoints.save_best({"w": np.ones(3, np.float32)}, 3, {"step": 3})
    checkpoints.close()
    assert len(barriers) == 1 and "best/3" in barriers[0][0]
    assert barriers[0][1] == (process == 0)    # process 0 had written it by then


def _one_process_reference(directory, overrides):
    """The same run in this process with the same 4 devices: what the pair must match."""
    config = digits.get_config("quick")
    config.logging.progress = False
    config.mesh.num_devices = 4
    for dotted, value in overrides.items():
        section, field = dotted.split(".")
        config[section][field] = value
    train.train_and_evaluate(config, directory)
    return directory


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(tmp_path):
    workdir = str(tmp_path / "two_hosts" / "run")
    os.makedirs(workdir)
    for i, (code, text) in enumerate(_run_pair(workdir, OVERRIDES)):
        assert code == 0, f"process {i} failed:\n{text[-3000:]}"
        assert "JAX process %d / 2" % i in text
    reference = _one_process_reference(str(tmp_path / "one_host"), OVERRIDES)
    two, one = _losses(workdir), _losses(reference)
    assert len(one) == 7 and [s for s, _ in two] == [s for s, _ in one]
    np.testing.assert_allclose([v for _, v in two], [v for _, v in one], rtol=2e-5)
    # Process 0 evaluates on the embeddings gathered from both processes.
    got = json.load(open(os.path.join(workdir, "results.json")))["test"]
    want = json.load(open(os.path.join(reference, "results.json")))["test"]
    assert got["num_queries"] == want["num_queries"] > 0
    for key in ("recall@1", "recall@2", "map@r"):
        assert got[key] == pytest.approx(want[key], abs=2e-3), key


def _run_pair(workdir, overrides, on_progress=None, timeout=300):
    """Both processes of a two-process run, to the end; `on_progress(procs)` is called
    once process 0 has logged a group-stage step. Returns [(returncode, log text)]."""
    port = _free_port()
    procs = [_launch(workdir, port, i, overrides) for i in (0, 1)]
    deadline = time.time() + timeout
    try:
        if on_progress is not None:
            metrics = os.path.join(workdir, "metrics.jsonl")
            while not (os.path.exists(metrics) and "group/loss" in open(metrics).read()):
                assert time.time() < deadline and all(p.poll() is None for p, _ in procs)
                time.sleep(0.05)
            on_progress(procs)
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for proc, log in procs:       # a hung pair must not outlive the test
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return [(proc.returncode, open(os.path.join(os.path.dirname(workdir),
                                                f"process{i}.log")).read())
            for i, (proc, _) in enumerate(procs)]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step_and_the_rerun_resumes(tmp_path):
    import re
    import signal
    overrides = dict(OVERRIDES, **{"schedule.steps_per_epoch": 60, "logging.every_steps": 5})
    workdir = str(tmp_path / "pair" / "run")
    os.makedirs(workdir)
    ended = _run_pair(workdir, overrides,
                      on_progress=lambda procs: procs[1][0].send_signal(signal.SIGTERM))
    stopped = []
    for i, (code, text) in enumerate(ended):
        assert code == 0, f"process {i}:\n{text[-3000:]}"
        found = re.findall(r"stopped at step (\d+)", text)
        assert found, f"process {i} did not stop early:\n{text[-3000:]}"
        stopped.append(int(found[-1]))
    assert stopped[0] == stopped[1] < 3 + 60, stopped
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    resumed = _run_pair(workdir, overrides)
    for i, (code, text) in enumerate(resumed):
        assert code == 0, f"process {i}:\n{text[-3000:]}"
    assert f"resumed from step {stopped[0]}" in resumed[0][1]   # process 0 prints

    reference = _one_process_reference(str(tmp_path / "one_host"), overrides)
    got = json.load(open(os.path.join(workdir, "results.json")))["test"]
    want = json.load(open(os.path.join(reference, "results.json")))["test"]
    for key in ("recall@1", "recall@2", "map@r"):
        assert got[key] == pytest.approx(want[key], abs=2e-3), key
