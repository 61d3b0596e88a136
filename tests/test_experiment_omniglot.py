"""The loss-comparison script's own logic (no training: that is the experiment)."""
import gzip
import importlib.util
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run():
    spec = importlib.util.spec_from_file_location(
        "omniglot_run", os.path.join(REPO, "experiments", "omniglot", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_file_follows_dataset_and_warmup(run):
    assert run.parse_args([]).results.endswith(os.path.join("omniglot", "RESULTS.md"))
    assert run.parse_args(["--dataset=fashion_mnist"]).results.endswith(
        "RESULTS_fashion_mnist.md")
    assert run.parse_args(["--warmup_epochs=2"]).results.endswith("RESULTS_warmup.md")
    assert run.parse_args(["--epochs=6"]).results.endswith("RESULTS_6_epochs.md")


def test_warmup_config_trains_the_warmup_alone(run, tmp_path):
    args = run.parse_args(["--warmup_epochs=2", "--steps_per_epoch=7", "--warmup_lr=5e-4"])
    main = run.base_config(args, str(tmp_path), 10)
    warm = run.warmup_config(args, str(tmp_path), 10, seed=3)
    assert main.warmup.epochs == 0          # the loss runs start from the warmed weights
    assert (warm.warmup.epochs, warm.warmup.steps_per_epoch, warm.schedule.epochs) == (2, 7, 0)
    assert warm.warmup.lr == 5e-4 and warm.seed == 3 and warm.data.seed == 3
    # No evaluation (hence no "best" model selected on the test classes) before the end.
    assert warm.evals.every_epochs > warm.warmup.epochs
    # Another seed or warm-up length is another cached run.
    assert run.run_id(warm) != run.run_id(run.warmup_config(args, str(tmp_path), 10, seed=4))


def test_loss_settings_change_the_run_id_and_land_where_the_registry_reads(run, tmp_path):
    from gl_jax.losses import registry
    args = run.parse_args([])
    ids = set()
    for name, overrides in (("group_loss", {}), ("group_loss", {"temperature": 3.0}),
                            ("triplet", {}), ("proxy_anchor", {})):
        c = run.base_config(args, str(tmp_path), 10)
        run.set_loss(c, name, overrides)
        got_name, hparams = registry.hparams_from_config(c.loss)
        assert got_name == name
        for k, v in overrides.items():
            assert hparams[k] == v
        ids.add(run.run_id(c))
    assert len(ids) == 4


def test_ablation_changes_one_setting_each(run):
    rows = run.ablation_runs({"temperature": 10.0, "anchors_per_class": 2, "num_iterations": 1})
    assert all(name == "group_loss" and len(o) == 1 for _, name, o in rows)
    temperatures = [o["temperature"] for _, _, o in rows if "temperature" in o]
    assert temperatures == [1.0, 3.0, 30.0]
    assert {"ce_weight": 0.0} in [o for _, _, o in rows]
    # The main setting's own value is not repeated as an ablation row.
    rows = run.ablation_runs({"temperature": 3.0, "anchors_per_class": 1, "num_iterations": 3})
    assert {"temperature": 3.0} not in [o for _, _, o in rows]
    assert {"anchors_per_class": 1} not in [o for _, _, o in rows]


def test_table_gives_mean_and_sample_std_in_percent(run):
    runs = [{"test": {"recall@1": v, "nmi": 0.5}, "wall_s": 10.0} for v in (0.30, 0.34, 0.38)]
    text = run.table([("gl", runs), ("none", [])], [("pixels", {"recall@1": 0.2})])
    lines = text.splitlines()
    assert lines[2].startswith("| pixels | - | 20.0 |")
    assert "| gl | 3 | 34.0 ± 4.0 |" in lines[3]       # sample std of 30, 34, 38 = 4
    assert "50.0 ± 0.0" in lines[3] and lines[3].endswith("| 10 |")
    assert "not run" in lines[4]


def test_read_idx_reads_and_rejects(run, tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "good.gz"
    with gzip.open(good, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (2, 3, 4))
                + images.tobytes())
    np.testing.assert_array_equal(run._read_idx(str(good)), images)
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(bytes([0, 0, 9, 1]) + (2).to_bytes(4, "big") + b"\x00\x00")
    with pytest.raises(ValueError, match="bad.gz"):
        run._read_idx(str(bad))
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"\x00\x00")
    with pytest.raises(ValueError, match="holds 2 values"):
        run._read_idx(str(short))


def test_embedded_omniglot_or_an_image_folder(run, tmp_path):
    args = run.parse_args([])
    embedded = run.base_config(args, "", 136)
    assert (embedded.data.name, embedded.data.root) == ("omniglot", "")
    folder = run.base_config(args, str(tmp_path), 5)
    assert (folder.data.name, folder.data.train_classes) == ("image_folder", 5)
    assert run.run_id(embedded) != run.run_id(folder)
