"""A --config path works from any directory: config files import their sibling modules as
a package (``from configs import common``), which gl_jax.cli makes importable."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What gl_jax.main and gl_jax.evaluate do with --config, minus the run.
_PARSE = """
import sys
from absl import flags
from ml_collections import config_flags
from gl_jax import cli
config_flags.DEFINE_config_file("config", None, "config file")
if sys.argv.pop(1) == "fix":
    cli.config_package_importable(sys.argv)
flags.FLAGS(sys.argv)
print(flags.FLAGS.config.{field})
"""


def _parse(config_arg, cwd, field, fix=True):
    env = dict(os.environ, PYTHONPATH=REPO)   # gl_jax itself, as an installed package is
    # The repository root must not be what makes `configs` importable.
    assert os.path.abspath(cwd) != REPO
    return subprocess.run([sys.executable, "-c", _PARSE.format(field=field),
                           "fix" if fix else "keep", config_arg],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def config_package(tmp_path):
    package = tmp_path / "project" / "myconfigs"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "base.py").write_text("VALUE = 7\n")
    (package / "run.py").write_text(
        "import ml_collections\nfrom myconfigs import base\n\n"
        "def get_config(arg=None):\n"
        "    return ml_collections.ConfigDict(dict(value=base.VALUE, arg=arg or 'none'))\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return package, elsewhere


def test_a_config_importing_its_package_loads_from_another_directory(config_package):
    package, elsewhere = config_package
    broken = _parse(f"--config={package / 'run.py'}", elsewhere, "value", fix=False)
    assert broken.returncode != 0 and "No module named 'myconfigs'" in broken.stderr
    for args in ([f"--config={package / 'run.py'}"], [f"--config={package / 'run.py'}:quick"]):
        done = _parse(args[0], elsewhere, "arg")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == ("quick" if args[0].endswith(":quick") else "none")
    # a relative path, from the package's parent's parent
    done = _parse("--config=project/myconfigs/run.py", package.parent.parent, "value")
    assert done.returncode == 0 and done.stdout.strip() == "7", done.stderr


def test_the_shipped_configs_load_by_absolute_path_from_another_directory(tmp_path):
    done = _parse(f"--config={os.path.join(REPO, 'configs', 'omniglot.py')}", tmp_path,
                  "model.name")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "small_cnn"


def test_nothing_is_added_for_a_config_outside_a_package(tmp_path):
    (tmp_path / "alone.py").write_text("")
    before = list(sys.path)
    from gl_jax import cli
    cli.config_package_importable(["prog", f"--config={tmp_path / 'alone.py'}",
                                   "--config.x=1"])
    assert sys.path == before
