"""The sweep command line (gl_jax/sweep.py) and the Omniglot sweep configs."""
import gzip
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from experiments.omniglot import fashion_mnist
from gl_jax import sweep as sweep_lib
from gl_jax.losses import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARE = os.path.join(REPO, "experiments", "omniglot", "compare.py")


def test_apply_sets_dotted_fields_and_refuses_unknown_ones():
    from configs import digits
    base = digits.get_config("quick")
    config = sweep_lib.apply(base, {"loss.temperature": 3.0, "seed": 7,
                                    "schedule.lr_drop_epochs": (2,)})
    assert (config.loss.temperature, config.seed, tuple(config.schedule.lr_drop_epochs)) == (
        3.0, 7, (2,))
    assert base.loss.temperature != 3.0          # the base config is not touched
    with pytest.raises(ValueError, match="loss.temprature"):
        sweep_lib.apply(base, {"loss.temprature": 3.0})
    with pytest.raises(ValueError, match="no section 'los'"):
        sweep_lib.apply(base, {"los.temperature": 3.0})


def test_user_errors_are_one_line(tmp_path, capsys):
    """A missing or non-sweep config, a misspelt field and a bad value in a point: one
    line on stderr and exit status 2, before any run (the point's own process included)."""
    (tmp_path / "typo.py").write_text(textwrap.dedent('''
        from configs import digits
        def get_config(arg=None):
            return digits.get_config("quick")
        def sweep(arg=None):
            return [{"loss.temprature": 5.0}]
    '''))
    (tmp_path / "bad_lr.py").write_text((tmp_path / "typo.py").read_text().replace(
        "loss.temprature", "optimizer.lr").replace("5.0", "-1.0"))
    cases = [([f"--config={tmp_path / 'nope.py'}"], "nope.py: no such sweep config"),
             (["--config=configs/digits.py:quick"], "defines no sweep(arg): not a sweep config"),
             ([f"--config={tmp_path / 'typo.py'}"], "config has no field 'loss.temprature'"),
             ([f"--config={tmp_path / 'bad_lr.py'}", "--point=0"],
              "config.optimizer.lr = -1.0: a learning rate must be a finite number >= 0")]
    for args, expected in cases:
        with pytest.raises(SystemExit) as exit_:
            sweep_lib.main(args + [f"--root={tmp_path / 'runs'}"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
        assert expected in err, err


def test_digest_follows_what_a_run_computes():
    from configs import digits
    base = digits.get_config("quick")
    same = sweep_lib.apply(base, {"evals.final_test": False, "logging.every_steps": 99,
                                  "model.features_dir": "/elsewhere"})
    assert sweep_lib.digest(same) == sweep_lib.digest(base)
    for change in ({"loss.temperature": 3.0}, {"seed": 1}, {"data.image_size": 8}):
        assert sweep_lib.digest(sweep_lib.apply(base, change)) != sweep_lib.digest(base)


def test_table_is_mean_and_sample_std_per_row_in_percent():
    runs = [{"val": {"recall@1": v}, "test": {"recall@1": v + 0.1} if i < 2 else {},
             "train_s": 10.0} for i, v in enumerate((0.30, 0.34, 0.38))]
    text = sweep_lib.table([("gl", runs), ("none", [])])
    header, _, gl, none = text.splitlines()
    assert header.startswith("| run | seeds | val R@1 | tested | test R@1 |")
    assert gl.startswith("| gl | 3 | 34.0 ± 4.0 | 2 | 42.0 ± 2.8 |")   # std of 30/34/38 = 4
    assert gl.endswith("| 10 |") and none.startswith("| none | 0 | - |")


def test_compare_config_runs_every_loss_where_the_registry_reads_it():
    sweep = sweep_lib.Sweep(COMPARE, "/tmp/unused")
    names = {p["loss.name"] for p in sweep.points}
    assert names == set(registry.available_losses()) - {"cross_entropy"}
    assert len(sweep.points) == 6 * 3 + 8 * 3
    digests = set()
    for point in sweep.points:
        config = sweep.config(point)
        name, hparams = registry.hparams_from_config(config.loss)
        assert name == point["loss.name"] and config.seed == point["seed"]
        for key, value in point.items():
            if key.startswith("loss.") and key != "loss.name":
                assert hparams[key[5:]] == value
        digests.add(sweep.workdir(point))
    assert len(digests) == len(sweep.points)
    assert len(sweep_lib.Sweep(COMPARE + ":6_epochs", "/tmp/unused").points) == 18
    with pytest.raises(ValueError, match="compare.py takes"):
        sweep_lib.Sweep(COMPARE + ":7_epochs", "/tmp/unused").config({})


def test_read_idx_reads_and_rejects(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "good.gz"
    with gzip.open(good, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (2, 3, 4))
                + images.tobytes())
    np.testing.assert_array_equal(fashion_mnist.read_idx(str(good)), images)
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(bytes([0, 0, 9, 1]) + (2).to_bytes(4, "big") + b"\x00\x00")
    with pytest.raises(ValueError, match="bad.gz"):
        fashion_mnist.read_idx(str(bad))
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"\x00\x00")
    with pytest.raises(ValueError, match="holds 2 values"):
        fashion_mnist.read_idx(str(short))


TINY = textwrap.dedent('''
    """A two-loss sweep on digits:quick."""
    from configs import digits

    def get_config(arg=None):
        c = digits.get_config("quick")
        c.data.val_classes = 2
        c.sampler.classes_per_batch = c.warmup.classes_per_batch = 3
        c.selection.protocol = "validation"
        c.evals.final_test = False
        c.evals.untrained_baseline = False
        c.warmup.epochs = 0
        c.schedule.epochs, c.schedule.steps_per_epoch = 1, 2
        c.schedule.lr_drop_epochs, c.schedule.lr_drop_factors = (), ()
        c.logging.progress = False
        return c

    def sweep(arg=None):
        return [{"loss.name": n, "seed": s} for n in ("group_loss", "triplet") for s in (0, 1)]

    def test_points(arg=None):
        return [{"loss.name": "triplet", "seed": s} for s in (0, 1)]
''')


@pytest.mark.slow
def test_a_sweep_trains_each_point_once_then_tests_only_the_chosen(tmp_path):
    config_path = tmp_path / "tiny.py"
    config_path.write_text(TINY)
    root, report = tmp_path / "runs", tmp_path / "TINY.md"
    command = [sys.executable, "-m", "gl_jax.sweep", f"--config={config_path}",
               f"--root={root}", f"--report={report}"]
    first = subprocess.run(command + ["--jobs=2"], cwd=REPO, capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "0 of 4 runs done, 4 to go" in first.stdout
    workdirs = sorted((root / "tiny").iterdir())
    assert len(workdirs) == 4
    for workdir in workdirs:
        results = json.loads((workdir / "results.json").read_text())
        assert results["test"] is None
    text = report.read_text()
    assert "| group_loss" not in text   # labels are the overrides
    rows = [line for line in text.splitlines() if line.startswith("| loss.name=")]
    assert len(rows) == 2 and all("| 2 |" in row for row in rows)
    assert "test R@1" not in text                     # nothing tested yet
    report.write_text(text + "\nmy reading of the table\n")   # below the notes marker
    # Again: nothing to train; --test evaluates the two chosen runs and nothing else.
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "4 of 4 runs done, 0 to go" in again.stdout
    tested = subprocess.run(command + ["--test"], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert tested.returncode == 0, tested.stdout[-3000:] + tested.stderr[-3000:]
    has_test = {}
    for workdir in workdirs:
        config = json.loads((workdir / "config.json").read_text())
        has_test[(config["loss"]["name"], config["seed"])] = json.loads(
            (workdir / "results.json").read_text())["test"] is not None
    assert has_test == {("group_loss", 0): False, ("group_loss", 1): False,
                        ("triplet", 0): True, ("triplet", 1): True}
    triplet = next(line for line in report.read_text().splitlines()
                   if line.startswith("| loss.name=triplet"))
    assert "| 2 |" in triplet and "test R@1" in report.read_text()
    assert "my reading of the table" in report.read_text()
    # --report_only writes the table from the finished runs, training nothing.
    report.unlink()
    sweep_lib.main([f"--config={config_path}", f"--root={root}", f"--report={report}",
                    "--report_only"])
    assert "test R@1" in report.read_text() and "(no notes yet)" in report.read_text()
    assert sorted((root / "tiny").iterdir()) == workdirs
