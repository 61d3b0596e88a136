"""End-to-end tests of the trainer on the embedded digits config (CPU-sized)."""
import functools
import json
import os

import numpy as np
import pytest

import jax
from flax import nnx

from gl_jax import data as gdata
from gl_jax import errors
from gl_jax import evaluation
from gl_jax import optimizer
from gl_jax import runtime
from gl_jax import train

from train_helpers import REPO, quick_config, read_metrics, read_results


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One uninterrupted run of digits:quick, shared by the tests that compare against it."""
    workdir = str(tmp_path_factory.mktemp("quick"))
    state = train.train_and_evaluate(quick_config(), workdir)
    return workdir, state


@pytest.mark.slow
def test_quick_run_writes_everything(quick_run):
    workdir, state = quick_run
    config = quick_config()
    stages = train.make_stages(config, runtime.load_splits(config)["train"])
    assert int(state.step) == stages[-1].last_step
    for name in ("config.json", "metrics.jsonl", "results.json"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert any(f.startswith("events.out.tfevents")
               for f in os.listdir(os.path.join(workdir, "tensorboard")))
    rows = read_metrics(workdir)
    logged = set().union(*rows)
    for key in ("warmup/loss", "group/loss", "group/group_loss", "group/ce", "group/lr",
                "group/grad_norm", "group/param_norm", "test/recall@1", "final_test/map@r"):
        assert key in logged, key
    results = read_results(workdir)
    assert results["protocol"] == "paper" and "TEST split" in results["note"]
    assert 0.0 < results["test"]["recall@1"] <= 1.0
    # The untrained baseline is the same network before any step (computed independently
    # here) and the gain is the difference.
    before = untrained_metrics(quick_config())
    for key in ("recall@1", "map@r"):
        assert results["untrained_test"][key] == pytest.approx(before[key], abs=1e-6)
        assert results["gain"][key] == pytest.approx(
            results["test"][key] - results["untrained_test"][key], abs=1e-9)


def untrained_metrics(config):
    """Held-out metrics of the configured network at its initialisation."""
    splits = runtime.load_splits(config)
    model = runtime.build_model(config, splits["train"].num_classes)
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    mesh = runtime.make_mesh(config.mesh)
    out = runtime.embed_source([(runtime.Embedder(graphdef, mesh), params, model_state)],
                               splits["test"], config, mesh)
    return evaluation.retrieval_metrics(out["embeddings"][0]["embedding"], out["label"],
                                        nmi=False)


@pytest.mark.slow
def test_digits_quick_fits_its_training_classes(quick_run):
    """The objective is learned: lower group loss and higher accuracy on the training digits.

    (On the held-out digits 5-9 a random-init CNN already has Recall@1 ~0.98 and five
    training classes are too few to beat it; held-out learning is asserted on Omniglot.)"""
    workdir, _ = quick_run
    rows = [r for r in read_metrics(workdir) if "group/group_loss" in r]
    first, last = rows[0], rows[-2:]
    # Measured (default objective: group loss + 0.3 x CE): total 0.94 -> 0.66, group loss
    # 0.49 -> 0.22, CE 1.50 -> 1.45, accuracy 0.23 -> 0.52.
    assert np.mean([r["group/loss"] for r in last]) < first["group/loss"] - 0.15
    assert np.mean([r["group/group_loss"] for r in last]) < first["group/group_loss"] - 0.1
    assert np.mean([r["group/ce"] for r in last]) < first["group/ce"] - 0.02
    assert np.mean([r["group/accuracy"] for r in last]) > first["group/accuracy"] + 0.2


# The image-folder layout, tested on real data: one of the Omniglot zips shipped in the
# package, unzipped into folders.
OMNIGLOT_ZIP = os.path.join(REPO, "gl_jax", "data", "assets", "omniglot",
                            "images_background_small1.zip")


@pytest.mark.slow
def test_image_folder_quick_learns_held_out_omniglot_characters(tmp_path):
    """68 training characters -> 68 unseen ones: Recall@1 clearly above the untrained net."""
    import zipfile
    from configs import image_folder
    with zipfile.ZipFile(OMNIGLOT_ZIP) as z:
        z.extractall(tmp_path / "omniglot")
    config = image_folder.get_config("quick")
    config.data.root = str(tmp_path / "omniglot" / "images_background_small1")
    config.logging.progress = False
    config.schedule.epochs = 3
    config.evals.every_epochs = 3
    config.mesh.num_devices = 2   # 6 x 9 = 54 images per step
    before = untrained_metrics(config)
    train.train_and_evaluate(config, str(tmp_path / "run"))
    after = read_results(str(tmp_path / "run"))["test"]
    print("untrained", before, "trained", after)
    assert after["recall@1"] > before["recall@1"] + 0.1
    assert after["map@r"] > before["map@r"] + 0.05


@pytest.mark.slow
def test_one_and_four_devices_give_the_same_losses(tmp_path):
    assert jax.device_count() >= 4, "tests/conftest.py asks for 4 CPU devices"
    overrides = dict(schedule__epochs=1, schedule__steps_per_epoch=4, warmup__steps_per_epoch=4,
                     logging__every_steps=1, checkpoint__every_steps=100)
    losses = {}
    for devices in (1, 4):
        config = quick_config(mesh__num_devices=devices, **overrides)
        workdir = str(tmp_path / f"dev{devices}")
        train.train_and_evaluate(config, workdir)
        losses[devices] = [(r["step"], r.get("warmup/loss", r.get("group/loss")))
                           for r in read_metrics(workdir)
                           if "warmup/loss" in r or "group/loss" in r]
    assert len(losses[1]) == 8
    assert [s for s, _ in losses[1]] == [s for s, _ in losses[4]]
    one, four = [v for _, v in losses[1]], [v for _, v in losses[4]]
    # The two runs sum in different orders, so float32 results differ in the last bits;
    # once such a difference flips a discrete choice (a max-pool or ReLU decision) the
    # later losses move more: on one 2-core machine steps 1-6 agreed to 1e-6 and step 7
    # was off by 1.7e-4. A sharding mistake (per-device BatchNorm statistics, a loss over
    # one shard only) would change the first steps' losses far beyond 2e-5.
    np.testing.assert_allclose(four[:4], one[:4], rtol=2e-5)
    np.testing.assert_allclose(four, one, rtol=1e-3)


@pytest.mark.slow
def test_sharded_parameters_match_replicated(tmp_path):
    overrides = dict(schedule__epochs=1, schedule__steps_per_epoch=3, warmup__epochs=0,
                     logging__every_steps=1, mesh__num_devices=4)
    result = {}
    for shard in (False, True):
        workdir = str(tmp_path / f"shard{shard}")
        train.train_and_evaluate(quick_config(mesh__shard_params=shard, **overrides), workdir)
        result[shard] = [r["group/loss"] for r in read_metrics(workdir) if "group/loss" in r]
    np.testing.assert_allclose(result[True], result[False], rtol=2e-5)


@pytest.mark.slow
def test_non_finite_loss_stops_naming_step_and_checkpoint(tmp_path):
    config = quick_config(warmup__lr=1e38, logging__every_steps=1)
    with pytest.raises(errors.NonFiniteLossError,
                       match=r"non-finite (loss|param_norm) .* at step 1 \(warmup stage\)\. "
                             r"No checkpoint was saved yet"):
        train.train_and_evaluate(config, str(tmp_path / "nan"))
    # Diverging in the Group Loss stage: the message names the last checkpoint, whose
    # parameters were finite when it was saved.
    config = quick_config(optimizer__lr=1e38, logging__every_steps=1)
    with pytest.raises(errors.NonFiniteLossError,
                       match=r"at step 1[1-5] \(group stage\)\. The last checkpoint, step 10 "
                             r"in .*checkpoints, has finite parameters"):
        train.train_and_evaluate(config, str(tmp_path / "nan_group"))


@pytest.mark.parametrize("overrides,error,match", [
    (dict(sampler__classes_per_batch=3, sampler__samples_per_class=5), ValueError,
     r"config.sampler: the global batch 3 x 5 = 15 is not divisible by the 4 devices"),
    (dict(sampler__classes_per_batch=6), ValueError,
     r"config.sampler.classes_per_batch = 6 but the training split of 'digits' has only 5"),
    (dict(model__name="resnet9000"), ValueError, r"config.model.name = 'resnet9000' is unknown"),
    (dict(model__cpu_kernels="sometimes"), ValueError,
     r"config.model.cpu_kernels = 'sometimes': must be 'auto', 'on' or 'off'"),
    (dict(data__name="image_folder", data__root="/nonexistent/gl_jax"), FileNotFoundError,
     r"config.data.root = '/nonexistent/gl_jax'"),
    (dict(selection__protocol="validation"), ValueError, r"set config.data.val_classes > 0"),
    (dict(mesh__num_devices=64), ValueError, r"config.mesh.num_devices = 64"),
    (dict(optimizer__lr=-1e-3), ValueError, r"config.optimizer.lr = -0.001: a learning rate"),
    (dict(warmup__lr=float("nan")), ValueError, r"config.warmup.lr = nan: a learning rate"),
    (dict(schedule__epochs=-1), ValueError, r"config.schedule.epochs = -1: must be >= 0"),
    (dict(warmup__epochs=-2), ValueError, r"config.warmup.epochs = -2: must be >= 0"),
    (dict(schedule__epochs=0, warmup__epochs=0), ValueError, r"nothing to train"),
    (dict(sampler__samples_per_class=1, sampler__classes_per_batch=4), ValueError,
     r"config.sampler.samples_per_class = 1: must exceed loss.anchors_per_class = 2"),
    (dict(sampler__samples_per_class=2), ValueError,
     r"samples_per_class = 2: must exceed .* every sample of a class an anchor"),
    (dict(evals__ks=(1, 2, 5000)), ValueError,
     r"config.evals.ks = \(1, 2, 5000\): K = 5000 exceeds the 895 items"),
    (dict(selection__metric="recall@3"), ValueError,
     r"config.selection.metric = 'recall@3': the 'test' evaluation \(retrieval\) computes"),
    (dict(optimizer__b2=1.0), ValueError, r"config.optimizer.b2 = 1.0: must be in \[0, 1\)"),
    (dict(checkpoint__every_steps=0), ValueError, r"config.checkpoint.every_steps = 0"),
    (dict(loss__temperature=0.0), ValueError, r"config.loss.temperature = 0.0: must be > 0"),
    (dict(model__freeze_backbone=True), ValueError,
     r"config.model.embedding_dim = 0: with config.model.freeze_backbone = True the embedding "
     r"would be the frozen backbone's pooled feature, which training cannot change"),
])
def test_invalid_configs_fail_before_compiling(overrides, error, match, tmp_path):
    with pytest.raises(error, match=match):
        train.train_and_evaluate(quick_config(**overrides), str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")


@pytest.mark.slow
def test_bfloat16_compute_trains_with_finite_float32_losses(tmp_path):
    config = quick_config(model__dtype="bfloat16", warmup__epochs=0, schedule__epochs=1,
                          schedule__steps_per_epoch=4, logging__every_steps=1)
    state = train.train_and_evaluate(config, str(tmp_path / "bf16"))
    rows = [r for r in read_metrics(str(tmp_path / "bf16")) if "group/loss" in r]
    assert len(rows) == 4 and all(np.isfinite(r["group/loss"]) for r in rows)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state.params))


@pytest.mark.slow
def test_init_from_loads_backbone_and_keeps_new_head(tmp_path):
    from gl_jax import models, weights
    source = models.create_model("small_cnn", num_classes=7, rngs=nnx.Rngs(123))
    saved = weights.save_converted(source, str(tmp_path / "pretrained"), arch="small_cnn",
                                   source="a test model")
    config = quick_config()
    fresh = runtime.build_model(config, 5)
    config.model.init_from = saved
    said = []
    loaded = runtime.build_model(config, 5, say=said.append)
    assert said == [f"init_from {saved}: loaded 15 arrays; kept their initialisation: "
                    "classifier/bias (checkpoint shape (7,), model (5,)), classifier/kernel "
                    "(checkpoint shape (64, 7), model (64, 5)); not used: classifier/bias, "
                    "classifier/kernel"]
    src_backbone = nnx.state(source.backbone)
    np.testing.assert_array_equal(nnx.state(loaded.backbone).conv1.kernel[...],
                                  src_backbone.conv1.kernel[...])
    assert not np.array_equal(nnx.state(fresh.backbone).conv1.kernel[...],
                              src_backbone.conv1.kernel[...])
    # The 7-class head of the source does not fit 5 classes: the new head is kept.
    np.testing.assert_array_equal(loaded.classifier.kernel[...], fresh.classifier.kernel[...])


@pytest.mark.slow
def test_validation_protocol_selects_on_val_and_tests_once(tmp_path):
    config = quick_config(data__val_classes=1, selection__protocol="validation",
                          sampler__classes_per_batch=4, warmup__epochs=0)
    workdir = str(tmp_path / "val")
    train.train_and_evaluate(config, workdir)
    rows = read_metrics(workdir)
    assert sum("val/recall@1" in r for r in rows) == config.schedule.epochs
    assert not any(k.startswith("test/") for r in rows for k in r)
    assert sum(any(k.startswith("final_test/") for k in r) for r in rows) == 1
    results = read_results(workdir)
    assert results["protocol"] == "validation" and "validation split" in results["note"]


def test_warmup_stage_takes_the_betas_of_the_optimizer_config():
    config = quick_config(optimizer__b2=0.95, optimizer__b1=0.8, warmup__lr=1e-3)
    warmup, group = train.make_stages(config, runtime.load_splits(config)["train"])
    params = {"w": jax.numpy.zeros(3)}
    hyper = warmup.tx.init(params).hyperparams
    assert float(hyper["b2"]) == pytest.approx(0.95) and float(hyper["b1"]) == pytest.approx(0.8)
    # lr and eps stay the warm-up's own.
    assert float(hyper["learning_rate"]) == pytest.approx(1e-3)
    assert float(hyper["eps"]) == pytest.approx(float(config.warmup.eps))
    assert float(group.tx.init(params).hyperparams["b2"]) == pytest.approx(0.95)


@pytest.mark.slow
def test_zero_group_epochs_runs_the_warmup_alone(tmp_path):
    config = quick_config(schedule__epochs=0, warmup__epochs=1, warmup__steps_per_epoch=3)
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 3
    rows = read_metrics(str(tmp_path))
    assert any("warmup/loss" in r for r in rows)
    assert not any("group/loss" in r for r in rows)
    results = json.load(open(tmp_path / "results.json"))
    assert 0.0 < results["test"]["recall@1"] <= 1.0


@pytest.mark.slow
def test_classifier_lr_multiplier_reaches_the_metric_loss_stage(tmp_path):
    config = quick_config(optimizer__classifier_lr_multiplier=100.0, warmup__epochs=0,
                          schedule__epochs=1, schedule__steps_per_epoch=2)
    config.loss.name = "proxy_anchor"
    before = runtime.build_model(config, runtime.load_splits(config)["train"].num_classes)
    state = train.train_and_evaluate(config, str(tmp_path / "x100"))
    config.optimizer.classifier_lr_multiplier = 1.0
    plain = train.train_and_evaluate(config, str(tmp_path / "x1"))

    def moved(s, part):
        start = nnx.state(before, nnx.Param)[part]
        return float(sum(np.abs(np.asarray(a) - np.asarray(b)).sum() for a, b in zip(
            jax.tree.leaves(s.params[part]), jax.tree.leaves(start))))
    assert moved(state, "classifier") > 20 * moved(plain, "classifier")
    assert moved(state, "backbone") < 5 * moved(plain, "backbone")


def test_fast_end_to_end_train_resume_and_evaluate(tmp_path, monkeypatch):
    """The fast tier's whole path: two steps per stage, checkpoints, results, a resumed
    rerun that trains nothing, and the evaluator on the same workdir. The run evaluates
    three times, each on the test split (the paper protocol): the untrained network, the
    end of the one Group Loss epoch, and the selected model."""
    from gl_jax import ablation, protocol
    evaluated = []
    evaluate_split = protocol.evaluate_split
    monkeypatch.setattr(protocol, "evaluate_split",
                        lambda *a, **k: evaluated.append(a[4]) or evaluate_split(*a, **k))
    workdir = str(tmp_path / "fast")
    config = quick_config(warmup__steps_per_epoch=2, schedule__steps_per_epoch=2,
                          schedule__epochs=1, schedule__lr_drop_epochs=(),
                          schedule__lr_drop_factors=(), checkpoint__every_steps=100)
    train.train_and_evaluate(config, workdir)
    assert evaluated == ["test", "test", "test"]
    results = read_results(workdir)
    assert results["selected_step"] == 4 and 0.0 < results["test"]["recall@1"] <= 1.0
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                  if s.isdigit()) == [2, 4]
    state = train.train_and_evaluate(config, workdir)   # finished: resumes at the end
    assert int(state.step) == 4
    report = ablation.run(ablation.load_workdir_config(workdir), [workdir], ablation.settings(
        strategies="flip", pictures=False, tsne=False, output_dir=str(tmp_path / "eval")))
    assert [r["name"] for r in report["rows"]] == ["plain", "flip TTA", "all: flip"]
    assert report["rows"][0]["metrics"]["recall@1"] == pytest.approx(
        results["test"]["recall@1"], abs=1e-6)


@pytest.mark.slow
def test_sigterm_while_the_loop_is_blocked_exits_after_the_timeout():
    """A step or a data read that never returns cannot make the process deaf to SIGTERM:
    the process exits with 143 once the preemption timeout has passed."""
    import subprocess
    import sys
    import time
    code = ("import os, signal, threading\n"
            "from gl_jax import preemption\n"
            "with preemption.Preemption(timeout_s=1.0):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    threading.Event().wait()   # blocked for ever, like a read of a FIFO\n")
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "no checkpoint saved within 1 s of SIGTERM" in proc.stderr
    assert time.time() - started < 60


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_head_only_keeps_the_backbone_and_trains_the_head(tmp_path):
    overrides = dict(model__freeze_backbone=True, model__cache_features=False,
                     model__embedding_dim=32, warmup__steps_per_epoch=3,
                     schedule__steps_per_epoch=3, schedule__epochs=1,
                     schedule__lr_drop_epochs=(), schedule__lr_drop_factors=(),
                     optimizer__weight_decay=0.1)
    config = quick_config(**overrides)
    initial = runtime.build_model(config, 5)
    _, params0, stats0 = nnx.split(initial, nnx.Param, ...)
    state = train.train_and_evaluate(config, str(tmp_path / "frozen"))
    params, params0 = _flat(state.params), _flat(params0)
    stats, stats0 = _flat(state.model_state), _flat(stats0)
    backbone = [k for k in params if k.startswith("['backbone']")]
    assert backbone and all(np.array_equal(params[k], params0[k]) for k in backbone)
    assert all(np.array_equal(stats[k], stats0[k]) for k in stats)   # BatchNorm statistics
    for head in ("['embedding']['kernel']", "['classifier']['kernel']"):
        key = next(k for k in params if k.startswith(head))
        assert not np.allclose(params[key], params0[key])


@pytest.mark.slow
def test_cached_features_train_exactly_as_the_frozen_backbone(tmp_path):
    """Features computed once give the losses and parameters of running the frozen
    backbone at every step (digits has no augmentation)."""
    overrides = dict(model__freeze_backbone=True, model__embedding_dim=32,
                     warmup__steps_per_epoch=3, schedule__steps_per_epoch=3,
                     schedule__epochs=2, schedule__lr_drop_epochs=(),
                     schedule__lr_drop_factors=(), logging__every_steps=1)
    runs = {}
    for cached in (True, False):
        workdir = str(tmp_path / f"cached_{cached}")
        state = train.train_and_evaluate(quick_config(model__cache_features=cached,
                                                      **overrides), workdir)
        losses = [r["group/loss"] for r in read_metrics(workdir) if "group/loss" in r]
        runs[cached] = (losses, _flat(state.params), read_results(workdir)["test"])
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-4)
    for key, value in runs[True][1].items():
        np.testing.assert_allclose(value, runs[False][1][key], rtol=1e-4, atol=1e-6,
                                   err_msg=key)
    assert runs[True][2]["recall@1"] == pytest.approx(runs[False][2]["recall@1"], abs=2e-3)


def test_frozen_warmup_stage_trains_the_head_on_features_then_the_group_stage_all():
    config = quick_config(warmup__freeze_backbone=True)
    warmup, group = train.make_stages(config, runtime.load_splits(config)["train"])
    assert warmup.frozen and warmup.from_features
    assert not group.frozen and not group.from_features
    config.model.cache_features = False
    warmup, _ = train.make_stages(config, runtime.load_splits(config)["train"])
    assert warmup.frozen and not warmup.from_features


@pytest.mark.slow
def test_frozen_warmup_on_cached_features_equals_the_uncached_one(tmp_path):
    """The warm-up with a fixed backbone gives the same embedding layer and classifier
    whether it runs the backbone at every step or trains on features computed once; the
    backbone and its BatchNorm statistics stay as they were."""
    overrides = dict(warmup__freeze_backbone=True, model__embedding_dim=32,
                     warmup__epochs=2, warmup__steps_per_epoch=3, schedule__epochs=0)
    initial = runtime.build_model(quick_config(**overrides), 5)
    _, params0, stats0 = map(_flat, nnx.split(initial, nnx.Param, ...))
    runs = {}
    for cached in (True, False):
        state = train.train_and_evaluate(quick_config(model__cache_features=cached,
                                                      **overrides), str(tmp_path / str(cached)))
        runs[cached] = _flat(state.params), _flat(state.model_state)
    (params, stats), (uncached, _) = runs[True], runs[False]
    for key, value in params.items():
        np.testing.assert_allclose(value, uncached[key], rtol=1e-4, atol=1e-6, err_msg=key)
        if key.startswith("['backbone']"):
            assert np.array_equal(value, params0[key]), key
    assert all(np.array_equal(stats[k], stats0[k]) for k in stats)
    classifier = next(k for k in params if k.startswith("['classifier']['kernel']"))
    assert not np.allclose(params[classifier], params0[classifier])


def test_features_feed_the_head_exactly_as_the_images_feed_the_network():
    """An embedder fed pooled features (head only) gives the embeddings of the whole
    network on the images, in the same order, padding rows dropped (71 records, batches
    of 32 on 2 devices: the last batch is padded)."""
    config = quick_config(model__embedding_dim=16, evals__batch_size=32)
    config.mesh.num_devices = 2
    splits = runtime.load_splits(config)
    source = splits["test"]
    model = runtime.build_model(config, splits["train"].num_classes)
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    mesh = runtime.make_mesh(config.mesh)
    features = runtime.backbone_features(graphdef, params, model_state, source, config, mesh,
                                         split="test")
    assert features.shape[0] == len(source) and features.ndim == 2
    whole = runtime.embed_source([(runtime.Embedder(graphdef, mesh), params, model_state)],
                                 source, config, mesh)
    head = runtime.embed_source(
        [(runtime.Embedder(graphdef, mesh, from_features=True), params, model_state)],
        source, config, mesh, features=features)
    np.testing.assert_array_equal(head["index"], whole["index"])
    np.testing.assert_array_equal(head["label"], whole["label"])
    np.testing.assert_allclose(head["embeddings"][0]["embedding"],
                               whole["embeddings"][0]["embedding"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="features go with"):
        runtime.embed_source([(runtime.Embedder(graphdef, mesh), params, model_state)],
                             source, config, mesh, features=features)
    with pytest.raises(ValueError, match="feature rows"):
        runtime.embed_source(
            [(runtime.Embedder(graphdef, mesh, from_features=True), params, model_state)],
            source, config, mesh, features=features[:-1])


def test_backbone_features_are_kept_on_disk_and_reused(tmp_path, monkeypatch):
    """features_dir: the second call loads the file (the backbone does not run), a changed
    data setting or a damaged file computes them again, a head setting does not."""
    config = quick_config(model__embedding_dim=16)
    config.model.features_dir = str(tmp_path / "features")
    splits = runtime.load_splits(config)
    model = runtime.build_model(config, splits["train"].num_classes)
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    mesh = runtime.make_mesh(config.mesh)
    calls = []
    real = runtime.embed_source
    monkeypatch.setattr(runtime, "embed_source", lambda *a, **k: calls.append(1) or real(*a, **k))

    def features(c, split="train"):
        return runtime.backbone_features(graphdef, params, model_state, splits[split], c, mesh,
                                         split=split)

    first = features(config)
    assert len(calls) == 1 and len(os.listdir(config.model.features_dir)) == 1
    np.testing.assert_array_equal(features(config), first)
    head_change = quick_config(model__embedding_dim=8, loss__temperature=3.0,
                               model__freeze_backbone=True)
    head_change.model.features_dir = config.model.features_dir
    np.testing.assert_array_equal(features(head_change), first)
    assert len(calls) == 1
    (path,) = os.listdir(config.model.features_dir)
    # A random backbone (no init_from) depends on the seed: another seed, another file.
    other_seed = quick_config(model__embedding_dim=16)
    other_seed.seed = config.seed + 1
    other_seed.model.features_dir = config.model.features_dir
    features(other_seed)
    assert len(calls) == 2 and len(os.listdir(config.model.features_dir)) == 2
    features(config, split="test")
    assert len(calls) == 3
    # A damaged file is recomputed, with a warning, and rewritten.
    with open(os.path.join(config.model.features_dir, path), "wb") as f:
        f.write(b"not an array")
    np.testing.assert_array_equal(features(config), first)
    assert len(calls) == 4
    np.testing.assert_array_equal(np.load(os.path.join(config.model.features_dir, path)), first)
    changed = quick_config(model__embedding_dim=16, data__normalization="imagenet")
    changed.model.features_dir = config.model.features_dir
    assert not np.array_equal(features(changed), first)
    assert len(calls) == 5


def test_final_test_off_then_on_evaluates_the_finished_run_once(tmp_path):
    """evals.final_test = False: no test metrics; the same run with True later evaluates
    the selected model on the test split without training again."""
    overrides = dict(warmup__epochs=0, schedule__epochs=1, schedule__steps_per_epoch=3,
                     schedule__lr_drop_epochs=(), schedule__lr_drop_factors=(),
                     evals__untrained_baseline=False)
    workdir = str(tmp_path / "run")
    config = quick_config(evals__final_test=False, **overrides)
    state = train.train_and_evaluate(config, workdir)
    results = read_results(workdir)
    assert results["test"] is None and "final_test = False" in results["note"]
    assert not any(k.startswith("final_test/") for r in read_metrics(workdir) for k in r)
    again = train.train_and_evaluate(quick_config(evals__final_test=True, **overrides), workdir)
    assert int(again.step) == int(state.step) == 3
    for key, value in _flat(state.params).items():
        np.testing.assert_array_equal(value, _flat(again.params)[key])
    assert 0.0 < read_results(workdir)["test"]["recall@1"] <= 1.0


@pytest.mark.parametrize("normalization", ["caffe_bgr", "imagenet", "tf_lite", "unit"])
def test_uint8_images_normalised_in_a_jitted_step_equal_the_host_normalisation(normalization):
    """Every level of every channel (each channel shifted, so that a swapped channel order
    shows) gives the host's float32 value bit for bit; float input passes unchanged."""
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    images.reshape(-1, 3)[:256] = (np.arange(256)[:, None] + [0, 85, 170]) % 256
    on_device = jax.jit(runtime.normalize_images, static_argnums=1)
    host = gdata.normalize(images, normalization)
    np.testing.assert_array_equal(np.asarray(on_device(images, normalization)), host)
    np.testing.assert_array_equal(np.asarray(on_device(host, normalization)), host)
    with pytest.raises(ValueError, match=r"uint8 images \(2, 16, 16, 3\) need a normalization"):
        runtime.normalize_images(images, None)
    with pytest.raises(ValueError, match="normalization='rgb'"):
        runtime.normalize_images(images, "rgb")


def test_uint8_batches_train_and_embed_as_host_normalised_ones():
    """The trainer's path (uint8 batches, normalised in the step) gives the parameters,
    BatchNorm statistics, metrics and embeddings of float32 batches normalised on the host."""
    config = quick_config(model__embedding_dim=16)
    config.data.normalization = "imagenet"   # a multiply-add on the device would differ
    splits = runtime.load_splits(config)
    stage = train.make_stages(config, splits["train"])[-1]
    raw = next(gdata.make_train_iterator(splits["train"], stage.data_config,
                                         stage.sampler_config, normalize=False))
    assert raw["image"].dtype == np.uint8
    host = dict(raw, image=gdata.normalize(raw["image"], config.data.normalization))
    model = runtime.build_model(config, splits["train"].num_classes)
    graphdef, state = runtime.create_train_state(model, stage.tx)
    step = jax.jit(functools.partial(train.train_step, graphdef, stage.tx, stage.spec,
                                     normalization=str(config.data.normalization)))
    keys = ("image", "label")
    new_u8, metrics_u8 = step(state, {k: raw[k] for k in keys})
    new_host, metrics_host = step(state, {k: host[k] for k in keys})
    for a, b in zip(jax.tree.leaves((new_u8, metrics_u8)),
                    jax.tree.leaves((new_host, metrics_host))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mesh = runtime.make_mesh(config.mesh)
    embedder = runtime.Embedder(graphdef, mesh, flip=True)
    out_u8 = embedder.step(state.params, state.model_state, raw["image"],
                           normalization=str(config.data.normalization))
    out_host = embedder.step(state.params, state.model_state, host["image"])
    for a, b in zip(out_u8, out_host):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
