"""Training: the stages and the loop (`train_step`, `train_and_evaluate`).

One run has two stages (Group Loss paper, section 4 and the official code):

1. `warmup`: classification fine-tuning of the backbone and a new classifier over the
   training classes with plain cross-entropy (its own RAdam, no weight decay);
2. `group`: Group Loss training from there, total loss
   `mean(group_loss) + ce_weight * mean(cross_entropy)`, RAdam with decoupled weight
   decay and the recipe's learning-rate drops (optionally reloading the best checkpoint
   so far at each drop).

The global step counts through both stages. The step is a pure function of a
`TrainState` pytree, jitted with explicit shardings over a `jax.sharding.Mesh` with one
`data` axis: the global batch is split over the devices of every host, parameters are
replicated (or sharded with `mesh.shard_params`), and the loss sees the whole global batch.
Checkpoints (Orbax) hold the state, the data iterator's position and the run's
bookkeeping, so that a restarted run continues exactly where the last one stopped.

Beside it: the config checks (`gl_jax.config_checks`), the optimizers (`gl_jax.optimizer`),
SIGTERM handling (`gl_jax.preemption`), what the run prints and writes (`gl_jax.report`),
and the machinery it shares with the evaluator (mesh, model, TrainState, checkpoints,
embedding, the evaluation protocol: `gl_jax.runtime`, `gl_jax.checkpoints`,
`gl_jax.protocol`). Of gl_jax, only the command lines (`main`, `sweep`) import this module.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import optax

from gl_jax import checkpoints as ckpt
from gl_jax import data as gdata
from gl_jax import metric_writers
from gl_jax import protocol
from gl_jax import report
from gl_jax import runtime
from gl_jax import workdir_lock
from gl_jax.config_checks import validate_config
from gl_jax.data import progress
from gl_jax.errors import NoUsableCheckpointError
from gl_jax.feed import BatchFeed
from gl_jax.losses import registry as loss_registry
from gl_jax.optimizer import lr_schedule, make_optimizer
from gl_jax.preemption import Preemption
from gl_jax.report import say
from gl_jax.runtime import TrainState

WARMUP, GROUP = "warmup", "group"


# ------------------------------------------------------------------------------- steps
@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Static description of the training objective of one stage."""
    # None: cross-entropy only (the warm-up stage); else a gl_jax.losses.registry name
    name: str | None = None
    hparams: tuple = ()         # sorted (key, value) pairs of registry.hparams_from_config
    seed: int = 0

    @property
    def needs_proxies(self) -> bool:
        return self.name is not None and loss_registry.needs_proxies(self.name)


def compute_loss(spec: LossSpec, embedding, logits, labels, step, proxies=None):
    """Total loss and its parts; logits arrive in float32 from the model head."""
    logits = logits.astype(jnp.float32)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    if spec.name is None:
        ce = loss_registry.cross_entropy(logits, labels)
        return ce, {"ce": ce, "accuracy": accuracy, "loss": ce}
    key = jax.random.fold_in(jax.random.key(spec.seed), step)
    total, parts = loss_registry.metric_loss(
        spec.name, embeddings=embedding, logits=logits, labels=labels, proxies=proxies,
        step_key=key, **dict(spec.hparams))
    return total, {**parts, "accuracy": accuracy}


def _in_backbone(path) -> bool:
    return getattr(path[0], "key", None) == "backbone"


def train_step(graphdef, tx, spec: LossSpec, state: TrainState, batch, *, frozen: bool = False,
               from_features: bool = False, normalization: str | None = None):
    """One optimisation step on the global batch; returns the new state and scalar metrics.

    `frozen`: the backbone's parameters and BatchNorm statistics stay as they are (no
    gradient flows into it); only the embedding layer and the classifier train.
    `from_features`: `batch['image']` holds the frozen backbone's pooled features.
    uint8 images are normalised first with `normalization` (`runtime.normalize_images`)."""
    images = runtime.normalize_images(batch["image"], normalization)

    # model_state is an argument (not a closure) so that BatchNorm may update it inside
    # the gradient trace.
    def loss_fn(params, model_state):
        model = nnx.merge(graphdef, params, model_state, copy=True)
        model.train()
        if frozen:
            model.backbone.eval()   # BatchNorm uses (and keeps) its running statistics
        if from_features:
            pooled = images
        else:
            pooled = model.pool(images)
            if frozen:
                pooled = jax.lax.stop_gradient(pooled)
        embedding, aux = model.head(pooled)
        # Proxy-based losses use the classifier's weights as proxies ([d, m] -> [m, d]),
        # read inside the gradient trace so that they are trained.
        proxies = model.classifier.kernel[...].T if spec.needs_proxies else None
        loss, metrics = compute_loss(spec, embedding, aux["logits"], batch["label"], state.step,
                                     proxies)
        _, _, model_state = nnx.split(model, nnx.Param, ...)
        return loss, (metrics, model_state)

    grads, (metrics, model_state) = jax.grad(loss_fn, has_aux=True)(state.params,
                                                                    state.model_state)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if frozen:   # weight decay must not move the frozen backbone either
        params = jax.tree_util.tree_map_with_path(
            lambda path, new, old: old if _in_backbone(path) else new, params, state.params)
    metrics.update(grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                   lr=opt_state.hyperparams["learning_rate"])
    new_state = TrainState(step=state.step + 1, params=params, model_state=model_state,
                           opt_state=opt_state)
    return new_state, metrics


# ----------------------------------------------------------------------------- the stages
@dataclasses.dataclass
class Stage:
    name: str
    first_step: int            # global step at which the stage starts
    epochs: int
    steps_per_epoch: int
    tx: optax.GradientTransformation
    spec: LossSpec
    sampler_config: Any
    data_config: Any
    evaluates: bool = False    # evaluate (and select the best model) at epoch ends
    reload_best_at: frozenset = frozenset()   # 0-based epochs that start from the best so far
    frozen: bool = False       # only the embedding layer and classifier train
    from_features: bool = False   # frozen on fixed inputs: train on cached features

    @property
    def last_step(self) -> int:
        return self.first_step + self.epochs * self.steps_per_epoch


def make_stages(config, train_source) -> list[Stage]:
    stages, step = [], 0
    frozen = bool(config.model.freeze_backbone)
    # A frozen backbone on un-augmented inputs computes the same features every epoch:
    # compute them once (config.model.cache_features) and train the head on them.
    cached = frozen and bool(config.model.cache_features)
    # The warm-up alone may keep the backbone fixed (config.warmup.freeze_backbone): it
    # then trains the embedding layer and classifier on cached features, an epoch for the
    # cost of a matrix multiply, so that the group stage starts from an informed prior.
    warmup_frozen = frozen or bool(config.warmup.freeze_backbone)
    if config.warmup.epochs > 0:
        sampler = ml_collections.ConfigDict({"classes_per_batch": config.warmup.classes_per_batch,
                                             "samples_per_class": config.warmup.samples_per_class,
                                             "mode": "balanced"})
        data_config = ml_collections.ConfigDict(config.data.to_dict())
        data_config.augment = False   # the recipe fine-tunes with the test-style transform
        spe = _steps_per_epoch(train_source, sampler, config.warmup.steps_per_epoch)
        stage = Stage(WARMUP, step, int(config.warmup.epochs), spe,
                      # Its own lr and eps (the recipe's); the betas of config.optimizer,
                      # so that a run which shortens RAdam's rectification (smaller b2)
                      # does so for both stages.
                      make_optimizer(float(config.warmup.lr), eps=float(config.warmup.eps),
                                     b1=float(config.optimizer.b1),
                                     b2=float(config.optimizer.b2)),
                      LossSpec(), sampler, data_config, frozen=warmup_frozen,
                      from_features=warmup_frozen and bool(config.model.cache_features))
        stages.append(stage)
        step = stage.last_step
    spe = _steps_per_epoch(train_source, config.sampler, config.schedule.steps_per_epoch)
    drops = [(e - 1) * spe for e in config.schedule.lr_drop_epochs]
    opt = config.optimizer
    tx = make_optimizer(lr_schedule(float(opt.lr), drops, config.schedule.lr_drop_factors),
                        name=str(opt.name),
                        weight_decay=float(opt.weight_decay), b1=float(opt.b1), b2=float(opt.b2),
                        eps=float(opt.eps),
                        head_lr_multiplier=float(opt.head_lr_multiplier),
                        classifier_lr_multiplier=float(opt.classifier_lr_multiplier))
    loss_name, loss_hparams = loss_registry.hparams_from_config(config.loss)
    spec = LossSpec(name=loss_name, hparams=tuple(sorted(loss_hparams.items())),
                    seed=int(config.seed))
    reload_at = (frozenset(int(e) - 1 for e in config.schedule.lr_drop_epochs)
                 if config.schedule.reload_best_at_drop else frozenset())
    stages.append(Stage(GROUP, step, int(config.schedule.epochs), spe, tx, spec, config.sampler,
                        config.data, evaluates=True, reload_best_at=reload_at, frozen=frozen,
                        from_features=cached and not config.data.augment))
    return stages


def _steps_per_epoch(source, sampler_config, cap) -> int:
    steps = gdata.steps_per_epoch(source, sampler_config)
    return min(steps, int(cap)) if cap > 0 else steps


# ------------------------------------------------------------------------------ the run
@dataclasses.dataclass
class Run:
    """What every stage of one run shares."""
    config: Any
    mesh: Mesh
    graphdef: Any
    splits: dict
    checkpoints: ckpt.Checkpoints
    writer: metric_writers.MetricWriter | None
    embedder: runtime.Embedder
    preemption: Preemption
    meta: dict                 # bookkeeping saved with each checkpoint
    val_split: str             # where the best model is selected: 'val' or 'test'
    make_iterator: Callable    # stage -> a fresh training iterator for it
    features: dict | None = None   # split -> a frozen backbone's features (head-only)

    @property
    def data_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data"))

    def shardings(self, state):
        return runtime.state_shardings(state, self.mesh, bool(self.config.mesh.shard_params))

    def evaluate(self, state, split: str) -> dict:
        """The protocol's metrics of `split` ('test' = query vs gallery where it applies)."""
        return protocol.evaluate_split(self.embedder, state.params, state.model_state,
                                       self.splits, split, self.config, self.mesh,
                                       features=self.features)

    def selection_score(self, metrics: dict) -> float:
        kind, _ = protocol.eval_kind(self.splits, str(self.config.data.name), self.val_split)
        return float(metrics[protocol.selection_key(self.config.selection.metric, kind)])

    def evaluate_epoch(self, stage: Stage, state, step: int) -> None:
        """The epoch-end evaluation: metrics logged, the best model kept. Runs after the
        epoch-end checkpoint, so a crash here loses no training."""
        epoch = (step - stage.first_step) // stage.steps_per_epoch   # 1-based, finished
        metrics = self.evaluate(state, self.val_split)
        score = self.selection_score(metrics)
        if self.writer:
            self.writer.write(step, {f"{self.val_split}/{k}": v for k, v in metrics.items()})
        if score > self.meta["best_score"]:
            self.meta.update(best_score=score, best_step=step, best_epoch=epoch)
            self.checkpoints.save_best(state, step, dict(self.meta))
        say(f"epoch {epoch}/{stage.epochs}: {self.val_split} {self.config.selection.metric} "
            f"{score:.4f} (best {self.meta['best_score']:.4f}, epoch {self.meta['best_epoch']})")


def _evaluates_at(stage: Stage, step: int, every_epochs: int) -> bool:
    """True when `step` ends an epoch of `stage` that is followed by an evaluation."""
    done = step - stage.first_step
    return (stage.evaluates and 0 < done <= stage.epochs * stage.steps_per_epoch
            and done % stage.steps_per_epoch == 0
            and (done // stage.steps_per_epoch) % every_epochs == 0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Runs (or resumes) the configured training in `workdir`; returns the final state.

    Writes `config.json`, `metrics.jsonl`, TensorBoard files in `tensorboard/`,
    checkpoints in `checkpoints/` (latest) and `best/`, and `results.json` with the final
    test metrics of the selected model. One run per workdir (`workdir/.lock`).
    """
    # Orbax takes only absolute paths; the messages that name the workdir are clearer too.
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() != 0:
        return _train_and_evaluate(config, workdir)
    with workdir_lock.WorkdirLock(workdir):
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config, workdir: str) -> TrainState:
    is_main = jax.process_index() == 0
    mesh = runtime.make_mesh(config.mesh)
    splits = runtime.load_splits(config)
    validate_config(config, splits, mesh)
    if config.data.scan != "off":
        # Every record read before the first step: bad files fail now, not hours in.
        splits = gdata.scan_splits(
            splits, sampler_config=config.sampler, skip_corrupt=bool(config.data.skip_corrupt),
            full_decode=config.data.scan == "full", undrawable=str(config.sampler.undrawable),
            progress=bool(config.logging.progress) and is_main).splits
    train_source = splits["train"]
    stages = make_stages(config, train_source)

    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    say(f"data {config.data.name}: " + ", ".join(
        f"{name} {len(src):,} images / {src.num_classes:,} classes"
        for name, src in splits.items()) + f"; {mesh.size} device(s), "
        f"{jax.process_count()} process(es)")
    say("stages: " + ", ".join(f"{s.name} {s.epochs} epoch(s) x {s.steps_per_epoch} steps "
                               f"of {s.sampler_config.classes_per_batch} x "
                               f"{s.sampler_config.samples_per_class}" for s in stages if s.epochs))
    say(f"writing to {workdir}: checkpoints/, best/, tensorboard/, metrics.jsonl, "
        "results.json")

    with ckpt.Checkpoints(workdir, config) as checkpoints:
        return _train_with(config, workdir, checkpoints, mesh, splits, stages)


def _train_with(config, workdir: str, checkpoints: ckpt.Checkpoints, mesh, splits,
                stages: list[Stage]) -> TrainState:
    """`_train_and_evaluate` from building the model on, with the workdir's checkpoints."""
    is_main = jax.process_index() == 0
    train_source, final_step = splits["train"], stages[-1].last_step
    model = runtime.build_model(config, train_source.num_classes, say=say)
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    del model

    def fresh_state(stage: Stage):
        state = TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                           model_state=model_state, opt_state=stage.tx.init(params))
        return jax.device_put(state, runtime.state_shardings(state, mesh,
                                                             bool(config.mesh.shard_params)))

    features = None
    if bool(config.model.freeze_backbone) and bool(config.model.cache_features):
        # The frozen backbone computes the same eval-transform features at every
        # evaluation (and, on fixed inputs, at every training step): compute each split's
        # once (or load them from config.model.features_dir) and run only the head.
        features = {name: runtime.backbone_features(graphdef, params, model_state, source,
                                                    config, mesh, split=name)
                    for name, source in splits.items()}
        say(f"frozen backbone: features of {', '.join(features)} ready "
            f"({next(iter(features.values())).shape[1]}-d); the head "
            + ("trains and " if any(s.from_features for s in stages) else "")
            + "is evaluated on them")
    # The training split's features, for the stages that train on them (a frozen
    # warm-up before a full fine-tune needs no others): computed when first asked for.
    train_features = functools.cache(
        lambda: features["train"] if features is not None else runtime.backbone_features(
            graphdef, params, model_state, splits["train"], config, mesh, split="train"))
    make_iterator = functools.partial(_train_iterator, splits["train"], train_features)

    meta = {"step": 0, "best_score": -math.inf, "best_step": -1, "best_epoch": -1,
            "protocol": config.selection.protocol}
    resumed = _resume(checkpoints, stages, fresh_state, make_iterator)
    if resumed is None:
        start, state, iterator = 0, fresh_state(stages[0]), None
    else:
        start, saved_meta, state, iterator = resumed
        meta.update(saved_meta)
        say(f"resumed from step {start} in {workdir}")
    checkpoints.discard_after(start)
    run = Run(config=config, mesh=mesh, graphdef=graphdef, splits=splits,
              checkpoints=checkpoints,
              writer=metric_writers.MetricWriter(workdir) if is_main else None,
              embedder=runtime.Embedder(graphdef, mesh, from_features=features is not None),
              features=features,
              preemption=Preemption(float(config.checkpoint.preemption_timeout_s)), meta=meta,
              make_iterator=make_iterator,
              val_split="val" if config.selection.protocol == "validation" else "test")

    # Not in a search on the validation split (final_test False): the test split stays
    # untouched until the chosen runs are evaluated.
    if resumed is None and config.evals.untrained_baseline and config.evals.final_test:
        # The same network before any training: the reference the gain is measured from.
        meta["untrained_test"] = run.evaluate(state, "test")
        say(f"before training: test {report.headline(meta['untrained_test'])}")
    stopped_early = False
    with run.preemption:
        # Killed during an epoch-end evaluation: that evaluation comes first.
        for stage in stages:
            if _evaluates_at(stage, start, int(config.evals.every_epochs)):
                run.evaluate_epoch(stage, state, start)
        for stage in stages:
            if stage.last_step <= start:
                continue
            mid_stage = stage.first_step < start
            state, stopped_early = _run_stage(run, stage, state, iterator if mid_stage else None)
            if stopped_early:
                break

    if not stopped_early:
        _final_evaluation(run, state, workdir, final_step)
    if run.writer:
        run.writer.close()
    return state


def _train_iterator(source, features, stage: Stage):
    # uint8 batches: train_step normalises them.
    return gdata.make_train_iterator(
        source, stage.data_config, stage.sampler_config, process_index=jax.process_index(),
        process_count=jax.process_count(), features=features() if stage.from_features else None,
        normalize=False)


def _resume(checkpoints: ckpt.Checkpoints, stages: list[Stage], fresh_state, make_iterator):
    """(step, meta, state, iterator) of the newest checkpoint that restores in full, or None
    when the workdir has none. `iterator` is None at a stage's last step (the next stage
    starts its own). Damaged checkpoints are skipped with a warning; when every one is
    damaged, NoUsableCheckpointError says so and how to start fresh."""
    failures: list = []
    for step in checkpoints.candidates(failures):
        try:
            meta = checkpoints.restore_meta(step)
            # The stage that saved it: its optimizer state has that stage's structure.
            stage = next(s for s in stages if s.first_step < step <= s.last_step)
            state = checkpoints.restore_state(step, runtime.abstract(fresh_state(stage)))
            iterator = None
            if step < stage.last_step:
                iterator = make_iterator(stage)
                checkpoints.restore_iterator(step, iterator)
            return step, meta, state, iterator
        except StopIteration:
            failures.append((step, "its step is beyond this config's stages"))
        except Exception as e:  # noqa: BLE001 - any failure means: not this checkpoint
            logging.warning("checkpoint %d in %s cannot be restored (%s: %s); trying the "
                            "previous one.", step, checkpoints.latest.directory,
                            type(e).__name__, str(e)[:300])
            failures.append((step, f"{type(e).__name__}: {str(e)[:200]}"))
    if failures:
        listing = "; ".join(f"step {s}: {why}" for s, why in failures)
        raise NoUsableCheckpointError(
            f"no checkpoint in {checkpoints.latest.directory} can be restored ({listing}). "
            f"To start this run afresh, move {checkpoints.workdir}/checkpoints and "
            f"{checkpoints.workdir}/best away (or delete them), or use a new --workdir.")
    return None


def _run_stage(run: Run, stage: Stage, state, iterator):
    """Trains one stage, from its start or, given the restored `iterator`, from inside it.

    Returns (state, stopped_early)."""
    # A new stage starts a fresh optimizer on the current parameters.
    if iterator is None:
        state = TrainState(step=state.step, params=state.params, model_state=state.model_state,
                           opt_state=stage.tx.init(state.params))
        iterator = run.make_iterator(stage)
    feed = BatchFeed(iterator, run.data_sharding)
    try:
        return _train_stage(run, stage, state, feed)
    finally:
        feed.close()


def _train_stage(run: Run, stage: Stage, state, feed: BatchFeed):
    """The step loop of `_run_stage`, its batches from `feed`."""
    config, checkpoints, meta = run.config, run.checkpoints, run.meta
    is_main = jax.process_index() == 0
    stage_shardings = run.shardings(state)
    state = jax.device_put(state, stage_shardings)
    step_fn = jax.jit(functools.partial(train_step, run.graphdef, stage.tx, stage.spec,
                                        frozen=stage.frozen,
                                        from_features=stage.from_features,
                                        normalization=str(stage.data_config.normalization)),
                      in_shardings=(stage_shardings, run.data_sharding),
                      out_shardings=(stage_shardings, NamedSharding(run.mesh, P())),
                      donate_argnums=(0,))

    step = int(state.step)
    log = report.StepMetrics(run.writer, stage.name, checkpoints.latest.directory,
                             last_good=checkpoints.latest.latest_step())

    def save():
        log.flush()
        meta["step"] = step
        checkpoints.save(state, feed, meta)
        log.last_good = step

    while step < stage.last_step:
        epoch = (step - stage.first_step) // stage.steps_per_epoch   # 0-based within the stage
        epoch_end = stage.first_step + (epoch + 1) * stage.steps_per_epoch
        if step == epoch_end - stage.steps_per_epoch and epoch in stage.reload_best_at:
            state = _reload_best(run, epoch, state)
        bar = progress.bar(total=stage.steps_per_epoch,
                           initial=step - (epoch_end - stage.steps_per_epoch),
                           desc=f"{stage.name} epoch {epoch + 1}/{stage.epochs}", leave=False,
                           disable=not (config.logging.progress and is_main), unit="step")
        in_flight = None
        while step < epoch_end:
            state, metrics = step_fn(state, next(feed))
            step += 1
            run.preemption.dispatched = step
            log.add(step, metrics)
            bar.update(1)
            # At most two steps in flight: the device stays busy, and a SIGTERM waits for
            # no more than the running step and the one queued behind it.
            if in_flight is not None:
                jax.block_until_ready(in_flight)
            in_flight = metrics["loss"]
            if step % int(config.logging.every_steps) == 0:
                log.flush()
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", refresh=False)
            if step % int(config.checkpoint.every_steps) == 0 and step < epoch_end:
                save()
            if run.preemption.should_stop(step):
                save()
                bar.close()
                logging.warning("stopped at step %d, %d step(s) after SIGTERM; the same "
                                "command resumes.", step, step - run.preemption.signal_step)
                return state, True
        bar.close()
        save()
        if _evaluates_at(stage, step, int(config.evals.every_epochs)):
            run.evaluate_epoch(stage, state, step)
    return state, False


def _restore_best(run: Run, state):
    """(the best state so far or None, why the selected model could not be restored or None).

    None and no reason: nothing was selected yet. A reason: an evaluation selected a model
    (`meta['best_step']`) whose checkpoint is damaged, missing or fails to restore."""
    failures: list = []
    best = run.checkpoints.restore_best(runtime.abstract(state), failures)
    if best is not None or run.meta["best_step"] < 0:
        return best, None
    return None, ("; ".join(f"best/{s}: {why}" for s, why in failures)
                  or "best/ holds no checkpoint")


def _reload_best(run: Run, epoch: int, state):
    """At a learning-rate drop, continue from the best parameters so far (the original)."""
    best, unrestored = _restore_best(run, state)
    if best is None:
        if unrestored is not None:
            say(f"epoch {epoch + 1}: lr drop; the best checkpoint so far (step "
                f"{run.meta['best_step']}) cannot be restored ({unrestored}): continuing from "
                f"the current parameters (step {int(state.step)}) instead")
        return state
    say(f"epoch {epoch + 1}: lr drop; continuing from the best checkpoint so far")
    return TrainState(step=state.step, params=best.params, model_state=best.model_state,
                      opt_state=state.opt_state)


def _final_evaluation(run: Run, state, workdir: str, step: int) -> None:
    """Test metrics of the selected (best) model, printed and saved in results.json with
    the step they are of: the final model's when the selected one cannot be restored."""
    protocol_name = run.config.selection.protocol
    if not run.config.evals.final_test:
        report.final_results(workdir, run.meta, protocol_name, None)
        return
    best, unrestored = _restore_best(run, state)
    evaluated = best if best is not None else state
    evaluated_step = int(evaluated.step)
    if unrestored is not None:
        say(f"the selected model (step {run.meta['best_step']}) cannot be restored "
            f"({unrestored}): evaluating the final model (step {evaluated_step}) instead; "
            "results.json says so")
    metrics = run.evaluate(evaluated, "test")
    if run.writer:
        run.writer.write(step, {f"final_test/{k}": v for k, v in metrics.items()})
    report.final_results(workdir, run.meta, protocol_name, metrics,
                         evaluated_step=evaluated_step, unrestored=unrestored)
