"""Importing gl_jax and building its models leave the process as it was, and the command
lines run as the one process the user started (no restart).

Each check runs in a fresh Python process: the test process has JAX set up by conftest.
"""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

_IMPORT_AND_BUILD = r"""
import importlib, json, os, pkgutil, sys
# The dependencies' own import-time settings (jax: TF_CPP_MIN_LOG_LEVEL, scikit-learn:
# KMP_*) are theirs: imported first, so that only gl_jax's own changes count.
for dependency in ("jax", "flax.nnx", "optax", "orbax.checkpoint", "grain", "sklearn.cluster",
                   "ml_collections", "absl.app", "PIL.Image", "tqdm"):
    importlib.import_module(dependency)
before = dict(os.environ)
import gl_jax
from gl_jax import losses
losses_registry = hasattr(losses, "registry")   # as README writes it, before anything else
names = sorted(m.name for m in pkgutil.walk_packages(gl_jax.__path__, "gl_jax.")
               if not m.name.endswith("__main__"))
from absl import flags
for name in names:
    defined = set(flags.FLAGS)
    importlib.import_module(name)
    for flag in set(flags.FLAGS) - defined:   # each command line defines --workdir etc.
        delattr(flags.FLAGS, flag)
from flax import nnx
from gl_jax import models
for name in models.available_models():
    models.abstract_model(name, num_classes=3)   # every layer built, shapes only
model = models.create_model("small_cnn", num_classes=3, rngs=nnx.Rngs(0))
model(__import__("jax.numpy").numpy.ones((1, 8, 8, 3)))
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({"modules": len(names), "changed": changed, "losses_registry": losses_registry,
                  "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
                  "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES")}))
"""


def _fresh_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **extra)
    return env


@pytest.mark.slow   # every module and model: about 8 s
def test_importing_every_module_and_building_every_model_changes_no_environment():
    import json
    xla_flags = "--xla_force_host_platform_device_count=2"
    out = subprocess.run([sys.executable, "-c", _IMPORT_AND_BUILD],
                         env=_fresh_env(XLA_FLAGS=xla_flags),
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["modules"] >= 30          # the walk found the package, not nothing
    assert report["changed"] == []
    assert report["losses_registry"]
    assert report["XLA_FLAGS"] == xla_flags
    assert report["GLIBC_TUNABLES"] is None


_AUDIT = r"""
import runpy, sys
def hook(event, args):
    if event in ("os.exec", "os.posix_spawn", "os.fork", "subprocess.Popen"):
        print("PROCESS-EVENT", event, file=sys.stderr, flush=True)
sys.addaudithook(hook)
sys.argv = ["gl_jax.main", "--helpshort"]
runpy.run_module("gl_jax.main", run_name="__main__", alter_sys=True)
"""


def test_the_command_line_neither_restarts_nor_spawns_to_show_its_help():
    out = subprocess.run([sys.executable, "-c", _AUDIT], env=_fresh_env(), capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode in (0, 1), out.stderr[-3000:]    # absl's help exits with 1
    assert "--workdir" in out.stdout             # the help was printed by this process
    assert "PROCESS-EVENT" not in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_strace_sees_one_execve_for_the_command_line(tmp_path):
    log = tmp_path / "strace.log"
    out = subprocess.run(["strace", "-f", "-e", "trace=execve", "-o", str(log),
                          sys.executable, "-m", "gl_jax.main", "--helpshort"],
                         env=_fresh_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
    if out.returncode != 0 and "ptrace" in out.stderr:
        pytest.skip(f"strace cannot trace here: {out.stderr.strip()[:200]}")
    assert out.returncode in (0, 1) and "--workdir" in out.stdout, out.stderr[-3000:]
    calls = [line for line in log.read_text().splitlines()
             if "execve(" in line and "resumed" not in line]
    assert len(calls) == 1, calls
