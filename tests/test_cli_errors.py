"""What the command lines do with a mistake on the command line, as a user meets it: one
`error: ...` line on stderr naming the flag, field, file or path, exit status 2, no
traceback (which --verbosity=1 or GL_JAX_TRACEBACK=1 bring back); a closed stdout; the
dependencies' logging; a busy workdir refused before JAX is imported.

Each command runs in a subprocess from the repository root. The fast tier keeps the cases
whose config loads without JAX; the rest (each a few seconds: the shipped configs import
JAX) are slow.
"""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = "--config=configs/digits.py:quick"


def _run(module, *args, env=None, stdout=subprocess.PIPE):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))


def _main(*args, env=None):
    return _run("gl_jax.main", *args, env=env)


def _assert_one_line(proc, *expected):
    """Exit status 2 and a single line on stderr, `error: ...` holding every `expected`."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for text in expected:
        assert text in lines[0]
    return lines[0]


@pytest.fixture
def tiny_config(tmp_path):
    """A config file that loads without JAX (the shipped ones import it: seconds)."""
    path = tmp_path / "tiny.py"
    path.write_text("import ml_collections\n\n\ndef get_config():\n"
                    "    return ml_collections.ConfigDict(dict(optimizer=dict(lr=0.1)))\n")
    return path


# ---------------------------------------------------------------- flags and config files
@pytest.mark.parametrize("content,expected", [
    (None, "the config file '{path}' does not exist."),
    ("raise RuntimeError('boom')\n", "--config={path}: RuntimeError: boom"),
    ("def get_config(:\n", "--config={path}: SyntaxError: "),
])
def test_a_missing_or_failing_config_file_is_one_line(tmp_path, content, expected):
    path = tmp_path / "config.py"
    if content is not None:
        path.write_text(content)
    proc = _main(f"--config={path}", f"--workdir={tmp_path / 'w'}")
    _assert_one_line(proc, expected.format(path=path))
    assert not (tmp_path / "w").exists()


def test_a_missing_workdir_flag_is_one_line(tiny_config):
    _assert_one_line(_main(f"--config={tiny_config}"), "error: --workdir is required")


def test_a_flag_error_shows_its_traceback_when_asked(tiny_config, tmp_path):
    args = (f"--config={tiny_config}", f"--workdir={tmp_path}", "--config.optimizer.lrr=1")
    line = _assert_one_line(_main(*args), "--config.optimizer.lrr: config.optimizer has no "
                            "field 'lrr'", 'Did you mean "lr"')
    for shown in (_main(*args, "--verbosity=1"), _main("--verbosity", "1", *args),
                  _main(*args, env={"GL_JAX_TRACEBACK": "1"})):
        assert shown.returncode != 0 and "Traceback" in shown.stderr
        assert line not in shown.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args,expected", [
    (["--config.foo=1"], "error: --config.foo: config has no field 'foo'."),
    (["--config.optimizer.lrr=1"], "error: --config.optimizer.lrr: config.optimizer has no "
                                   "field 'lrr'. Did you mean \"lr\" instead of \"lrr\"?"),
    (["--config=configs/digits.py:bogus"], "error: --config=configs/digits.py:bogus: "
                                           "configs/digits.py takes no argument or 'quick', "
                                           "got 'bogus'"),
    (["--config.schedule.epochs=abc"], "error: --config.schedule.epochs=abc: invalid literal "
                                       "for int() with base 10: 'abc'"),
    (["--config.optimizer.lr"], "error: Missing value for flag --config.optimizer.lr"),
    (["--no_such_flag=1"], "error: Unknown command line flag 'no_such_flag'"),
])
def test_a_flag_error_with_a_shipped_config_is_one_line(tmp_path, args, expected):
    proc = _main(DIGITS, f"--workdir={tmp_path / 'w'}", *args)
    assert _assert_one_line(proc) == expected
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_an_unknown_evaluate_setting_is_one_line(tmp_path):
    proc = _run("gl_jax.evaluate", f"--workdir={tmp_path}", "--evaluate.rerank_k=3")
    _assert_one_line(proc, "--evaluate.rerank_k: evaluate has no field 'rerank_k'.")


# ----------------------------------------------------------------------- the workdir
@pytest.mark.slow
@pytest.mark.parametrize("case", ["proc", "file", "under_file", "empty"])
def test_an_unusable_workdir_is_one_line_naming_it(tmp_path, case):
    (tmp_path / "a_file").write_text("")
    workdir, expected = {
        "proc": ("/proc/gl_jax_wd", "the workdir '/proc/gl_jax_wd' cannot be created"),
        "file": (str(tmp_path / "a_file"), f"the workdir '{tmp_path / 'a_file'}' is a file, "
                                           "not a directory."),
        "under_file": (str(tmp_path / "a_file" / "w"),
                       f"the workdir '{tmp_path / 'a_file' / 'w'}' cannot be created: "
                       f"'{tmp_path / 'a_file'}' is a file, not a directory."),
        "empty": ("", "--workdir is empty"),
    }[case]
    _assert_one_line(_main(DIGITS, f"--workdir={workdir}"), expected)


@pytest.mark.slow
def test_a_config_refused_by_the_trainer_leaves_no_new_workdir(tmp_path):
    """Checked after the trainer's imports (the model name needs the registry): a workdir
    the command created for the run goes again; one the user made stays."""
    new, own = tmp_path / "new" / "w", tmp_path / "own"
    own.mkdir()
    for workdir in (new, own):
        _assert_one_line(_main(DIGITS, f"--workdir={workdir}", "--config.model.name=resnet9000"),
                         "config.model.name = 'resnet9000' is unknown")
    assert not new.exists() and (tmp_path / "new").is_dir()   # only what it created
    assert own.is_dir()


@pytest.mark.slow
def test_distributed_without_a_coordinator_is_one_line(tmp_path):
    proc = _main(DIGITS, f"--workdir={tmp_path / 'w'}", "--config.mesh.distributed=True")
    _assert_one_line(proc, "config.mesh.distributed = True: coordinator_address should be "
                           "defined", "pass --coordinator_address=HOST:PORT")
    assert not (tmp_path / "w").exists()


_IMPORTED_JAX = """
import atexit, runpy, sys
atexit.register(lambda: print("jax imported:", "jax" in sys.modules))
sys.argv = ["gl_jax.main", *sys.argv[1:]]
runpy.run_module("gl_jax.main", run_name="__main__", alter_sys=True)
"""


def test_a_busy_workdir_is_refused_before_jax_is_imported(tmp_path):
    from gl_jax import workdir_lock
    with workdir_lock.WorkdirLock(str(tmp_path)):   # another run, as far as flock can tell
        proc = subprocess.run(
            [sys.executable, "-c", _IMPORTED_JAX, DIGITS, f"--workdir={tmp_path}"],
            cwd=REPO, capture_output=True, text=True, timeout=300,
            env=dict(os.environ, JAX_PLATFORMS="cpu"))
        holder = f"pid {os.getpid()}"
    _assert_one_line(proc, f"the workdir '{tmp_path}' is in use by another run", holder)
    assert proc.stdout.strip() == "jax imported: False"


# -------------------------------------------------------------------- config values
@pytest.mark.slow
@pytest.mark.parametrize("scan", ["ful", "of"])
def test_an_unknown_data_scan_is_refused_naming_the_field(tmp_path, scan):
    proc = _main(DIGITS, f"--workdir={tmp_path / 'w'}", f"--config.data.scan={scan}")
    assert _assert_one_line(proc) == (f"error: config.data.scan = '{scan}': must be one of "
                                      "'header', 'full', 'off'.")
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_an_invalid_image_size_is_refused_before_the_workdir_is_written(tmp_path):
    proc = _main(DIGITS, f"--workdir={tmp_path / 'w'}", "--config.data.image_size=0")
    _assert_one_line(proc, "config.data.image_size = 0: must be in (0, "
                     "config.data.resize_size = 16]")
    assert not (tmp_path / "w").exists()
    # The trainer called as a library refuses it too, before config.json.
    from gl_jax import train
    from train_helpers import quick_config
    with pytest.raises(ValueError, match=r"config.data.image_size = 0"):
        train.train_and_evaluate(quick_config(data__image_size=0), str(tmp_path / "lib"))
    assert not (tmp_path / "lib" / "config.json").exists()


@pytest.mark.slow
def test_a_data_root_that_is_a_file_says_so(tmp_path):
    root = tmp_path / "not_a_folder.zip"
    root.write_text("")
    proc = _main(DIGITS, f"--workdir={tmp_path / 'w'}", "--config.data.name=image_folder",
                 f"--config.data.root={root}")
    line = _assert_one_line(proc, f"data.root '{root}' is a file, not a folder")
    assert "does not exist" not in line


# -------------------------------------------------------------- stdout and logging
def test_help_into_a_closed_pipe_stops_quietly():
    read, write = os.pipe()
    os.close(read)   # the reader is gone before the first byte: `... | head -0`
    try:
        proc = _run("gl_jax.main", "--helpshort", stdout=write)
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr[-3000:]


@pytest.mark.slow
def test_a_run_piped_into_head_stops_quietly_after_the_first_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "gl_jax.main", DIGITS,
                             f"--workdir={tmp_path}", "--config.logging.progress=False"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    first = proc.stdout.readline()
    proc.stdout.close()   # what `| head -1` does after its line
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 141, stderr[-3000:]
    assert first.startswith("data digits") and stderr == ""


@pytest.mark.slow
def test_convert_weights_prints_only_its_own_lines(tmp_path):
    out = tmp_path / "lite0"
    proc = _run("gl_jax.convert_weights", "--arch=efficientnet_lite0", f"--output={out}")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    summary, wrote = proc.stdout.splitlines()
    assert summary.startswith("efficientnet_lite0 <- ") and "loaded 247 tensors" in summary
    assert wrote == f"wrote {out}"
    # Its user errors are the same one line as the trainer's.
    again = _run("gl_jax.convert_weights", "--arch=efficientnet_lite0", f"--output={out}")
    _assert_one_line(again, f"{out} already holds converted weights")
    _assert_one_line(_run("gl_jax.convert_weights", "--arch=resnet1", f"--output={out}"),
                     "error: --arch=resnet1: value should be one of")
    a_file = out / "metadata.json"
    for output in (a_file, a_file / "under"):   # a file, and a folder under a file
        _assert_one_line(_run("gl_jax.convert_weights", "--arch=efficientnet_lite0",
                              f"--output={output}"),
                         f"error: output directory {output}: {a_file} is a file, not a "
                         "directory")
