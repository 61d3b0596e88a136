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

Shared machinery (mesh, model, TrainState, checkpoints, embedding, the evaluation
protocol) lives in `gl_jax.runtime`, `gl_jax.checkpoints` and `gl_jax.protocol`; nothing
but the command line and this module's test imports this module.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
from typing import Any, Callable

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax
import tqdm

from gl_jax import checkpoints as ckpt
from gl_jax import data as gdata
from gl_jax import metric_writers
from gl_jax import models
from gl_jax import protocol
from gl_jax import runtime
from gl_jax.losses import registry as loss_registry
from gl_jax.runtime import TrainState

WARMUP, GROUP = "warmup", "group"


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


# ------------------------------------------------------------------------------ optimizer
def lr_schedule(base_lr: float, boundaries, factors) -> Callable[[jax.Array], jax.Array]:
    """Piecewise-constant lr: `base_lr * factors[i]` from step `boundaries[i]` on.

    Factors are relative to the initial lr (not cumulative), as the original code sets
    `lr / 10` at each drop."""
    boundaries, factors = tuple(int(b) for b in boundaries), tuple(float(f) for f in factors)

    def schedule(count):
        lr = jnp.asarray(base_lr, jnp.float32)
        for boundary, factor in zip(boundaries, factors):
            lr = jnp.where(count >= boundary, base_lr * factor, lr)
        return lr
    return schedule


def _in_classifier(params):
    """True for the leaves under the model's `classifier` (the proxies of proxy losses)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[0], "key", None) == "classifier", params)


def _radam_decoupled(learning_rate, weight_decay, b1, b2, eps, classifier_lr_multiplier):
    # Decoupled weight decay: the decay is added after RAdam's rescaling, so the step is
    # p <- p - lr * (radam_direction + wd * p), as torch's RAdam(decoupled_weight_decay).
    parts = [optax.scale_by_radam(b1=b1, b2=b2, eps=eps),
             optax.add_decayed_weights(weight_decay)]
    if classifier_lr_multiplier != 1.0:
        # A larger lr for the classifier alone, as Proxy-Anchor trains its proxies (x100);
        # the decay term is scaled with it, as in a torch parameter group with its own lr.
        parts.append(optax.masked(optax.scale(classifier_lr_multiplier), _in_classifier))
    return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))


def make_optimizer(learning_rate, *, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                   classifier_lr_multiplier=1.0):
    """RAdam with decoupled weight decay; the lr (a float or schedule) is logged from the state.

    `classifier_lr_multiplier` scales the steps of the classifier's weights (the proxies
    of the proxy-based losses) relative to the rest of the model."""
    return optax.inject_hyperparams(_radam_decoupled, static_args=("classifier_lr_multiplier",))(
        learning_rate=learning_rate, weight_decay=weight_decay, b1=b1, b2=b2, eps=eps,
        classifier_lr_multiplier=float(classifier_lr_multiplier))


# ------------------------------------------------------------------------------- steps
@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Static description of the training objective of one stage."""
    name: str | None = None     # None: cross-entropy only (the warm-up stage); else a
                                # gl_jax.losses.registry name
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


def train_step(graphdef, tx, spec: LossSpec, state: TrainState, batch):
    """One optimisation step on the global batch; returns the new state and scalar metrics."""

    # model_state is an argument (not a closure) so that BatchNorm may update it inside
    # the gradient trace.
    def loss_fn(params, model_state):
        model = nnx.merge(graphdef, params, model_state, copy=True)
        model.train()
        embedding, aux = model(batch["image"])
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
    metrics.update(grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                   lr=opt_state.hyperparams["learning_rate"])
    new_state = TrainState(step=state.step + 1, params=params, model_state=model_state,
                           opt_state=opt_state)
    return new_state, metrics


# ------------------------------------------------------------------------------ checks
def validate_config(config, splits, mesh: Mesh) -> None:
    """Fails before anything compiles, naming the field and why."""
    n_dev = mesh.size
    for name, (p, k) in {
            "sampler": (config.sampler.classes_per_batch, config.sampler.samples_per_class),
            "warmup": (config.warmup.classes_per_batch, config.warmup.samples_per_class)}.items():
        if name == "warmup" and config.warmup.epochs <= 0:
            continue
        if (p * k) % n_dev:
            raise ValueError(
                f"config.{name}: the global batch {p} x {k} = {p * k} is not divisible by the "
                f"{n_dev} devices of the mesh (config.mesh.num_devices).")
        num_train = splits["train"].num_classes
        if p > num_train:
            raise ValueError(
                f"config.{name}.classes_per_batch = {p} but the training split of "
                f"{config.data.name!r} has only {num_train} classes.")
    if config.evals.batch_size % n_dev:
        raise ValueError(f"config.evals.batch_size = {config.evals.batch_size} is not divisible "
                         f"by the {n_dev} devices of the mesh.")
    if config.selection.protocol not in ("paper", "validation"):
        raise ValueError(f"config.selection.protocol must be 'paper' or 'validation', got "
                         f"{config.selection.protocol!r}.")
    if config.selection.protocol == "validation" and "val" not in splits:
        raise ValueError("config.selection.protocol = 'validation' needs a validation split: "
                         "set config.data.val_classes > 0.")
    loss_registry.hparams_from_config(config.loss)   # unknown name / field -> ValueError
    if len(config.schedule.lr_drop_epochs) != len(config.schedule.lr_drop_factors):
        raise ValueError("config.schedule.lr_drop_epochs and lr_drop_factors differ in length.")
    if config.model.name not in models.available_models():
        raise ValueError(f"config.model.name = {config.model.name!r} is unknown; known: "
                         f"{models.available_models()}.")


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

    @property
    def last_step(self) -> int:
        return self.first_step + self.epochs * self.steps_per_epoch


def make_stages(config, train_source) -> list[Stage]:
    stages, step = [], 0
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
                      LossSpec(), sampler, data_config)
        stages.append(stage)
        step = stage.last_step
    spe = _steps_per_epoch(train_source, config.sampler, config.schedule.steps_per_epoch)
    drops = [(e - 1) * spe for e in config.schedule.lr_drop_epochs]
    opt = config.optimizer
    tx = make_optimizer(lr_schedule(float(opt.lr), drops, config.schedule.lr_drop_factors),
                        weight_decay=float(opt.weight_decay), b1=float(opt.b1), b2=float(opt.b2),
                        eps=float(opt.eps),
                        classifier_lr_multiplier=float(opt.classifier_lr_multiplier))
    loss_name, loss_hparams = loss_registry.hparams_from_config(config.loss)
    spec = LossSpec(name=loss_name, hparams=tuple(sorted(loss_hparams.items())),
                    seed=int(config.seed))
    reload_at = (frozenset(int(e) - 1 for e in config.schedule.lr_drop_epochs)
                 if config.schedule.reload_best_at_drop else frozenset())
    stages.append(Stage(GROUP, step, int(config.schedule.epochs), spe, tx, spec, config.sampler,
                        config.data, evaluates=True, reload_best_at=reload_at))
    return stages


def _steps_per_epoch(source, sampler_config, cap) -> int:
    steps = gdata.steps_per_epoch(source, sampler_config)
    return min(steps, int(cap)) if cap > 0 else steps


class _Preemption:
    """Turns SIGTERM (a preempted VM) into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, nothing to restore
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


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
    preemption: _Preemption
    meta: dict                 # bookkeeping saved with each checkpoint
    val_split: str             # where the best model is selected: 'val' or 'test'

    @property
    def data_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data"))

    def shardings(self, state):
        return runtime.state_shardings(state, self.mesh, bool(self.config.mesh.shard_params))

    def evaluate(self, state, split: str) -> dict:
        """The protocol's metrics of `split` ('test' = query vs gallery where it applies)."""
        return protocol.evaluate_split(self.embedder, state.params, state.model_state,
                                       self.splits, split, self.config, self.mesh)

    def selection_score(self, metrics: dict) -> float:
        kind, _ = protocol.eval_kind(self.splits, str(self.config.data.name), self.val_split)
        return float(metrics[protocol.selection_key(self.config.selection.metric, kind)])


class _MetricsLog:
    """Step metrics still on the device, read back in groups (a read-back is a host sync)."""

    def __init__(self, run: Run, stage: Stage):
        self.run, self.stage = run, stage
        self.pending: list[tuple[int, dict]] = []
        self.last_good = run.checkpoints.latest.latest_step()

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self) -> None:
        """Reads pending metrics back, stops on a non-finite loss, logs the averages."""
        if not self.pending:
            return
        rows = [(s, {k: float(v) for k, v in jax.device_get(m).items()})
                for s, m in self.pending]
        self.pending = []
        for s, row in rows:
            if not math.isfinite(row["loss"]):
                where = (f"the last good checkpoint is step {self.last_good} in "
                         f"{self.run.checkpoints.latest.directory}" if self.last_good is not None
                         else "no checkpoint was saved yet")
                raise NonFiniteLossError(
                    f"non-finite loss {row['loss']} at step {s} ({self.stage.name} stage); "
                    f"{where}. Rerunning the same command resumes from it.")
        if self.run.writer:
            mean = {f"{self.stage.name}/{k}": float(np.mean([r[k] for _, r in rows]))
                    for k in rows[0][1]}
            self.run.writer.write(rows[-1][0], mean)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Runs (or resumes) the configured training in `workdir`; returns the final state.

    Writes `config.json`, `metrics.jsonl`, TensorBoard files in `tensorboard/`,
    checkpoints in `checkpoints/` (latest) and `best/`, and `results.json` with the final
    test metrics of the selected model.
    """
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = runtime.make_mesh(config.mesh)
    splits = runtime.load_splits(config)
    validate_config(config, splits, mesh)
    train_source = splits["train"]
    stages = make_stages(config, train_source)
    final_step = stages[-1].last_step

    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    logging.info("mesh %s over %d devices (%d processes); %d training classes; stages: %s",
                 dict(mesh.shape), mesh.size, jax.process_count(), train_source.num_classes,
                 ", ".join(f"{s.name} {s.epochs} x {s.steps_per_epoch} steps" for s in stages))

    meta = {"step": 0, "best_score": -math.inf, "best_step": -1, "best_epoch": -1,
            "protocol": config.selection.protocol}
    checkpoints = ckpt.Checkpoints(workdir, config)
    resume_step, resume_meta = checkpoints.latest_meta()
    start = 0 if resume_step is None else resume_step
    # The stage the run continues in (the last one if everything is done).
    current = next((s for s in stages if start < s.last_step), stages[-1])

    model = runtime.build_model(config, train_source.num_classes)
    graphdef, state = runtime.create_train_state(model, current.tx)
    del model
    state = jax.device_put(state, runtime.state_shardings(state, mesh,
                                                          bool(config.mesh.shard_params)))
    if resume_step is not None:
        meta.update(resume_meta)
        state = checkpoints.restore_state(resume_step, runtime.abstract(state))
        logging.info("resumed from step %d (%s stage) in %s", resume_step, current.name, workdir)
    checkpoints.discard_best_after(start)
    run = Run(config=config, mesh=mesh, graphdef=graphdef, splits=splits,
              checkpoints=checkpoints,
              writer=metric_writers.MetricWriter(workdir) if is_main else None,
              embedder=runtime.Embedder(graphdef, mesh), preemption=_Preemption(), meta=meta,
              val_split="val" if config.selection.protocol == "validation" else "test")

    stopped_early = False
    with run.preemption:
        for stage in stages:
            if stage.last_step <= start:
                continue
            mid_stage = stage.first_step < start
            state, stopped_early = _run_stage(run, stage, state,
                                              resume_step if mid_stage else None)
            if stopped_early:
                break

    if not stopped_early:
        _final_evaluation(run, state, workdir, final_step)
    checkpoints.close()
    if run.writer:
        run.writer.close()
    return state


def _run_stage(run: Run, stage: Stage, state, resume_step):
    """Trains one stage, from its start or from `resume_step` inside it.

    Returns (state, stopped_early)."""
    config, checkpoints, meta = run.config, run.checkpoints, run.meta
    is_main = jax.process_index() == 0
    resuming = resume_step is not None
    # A new stage starts a fresh optimizer on the current parameters.
    if not resuming:
        state = TrainState(step=state.step, params=state.params, model_state=state.model_state,
                           opt_state=stage.tx.init(state.params))
    stage_shardings = run.shardings(state)
    state = jax.device_put(state, stage_shardings)
    iterator = gdata.make_train_iterator(
        run.splits["train"], stage.data_config, stage.sampler_config,
        process_index=jax.process_index(), process_count=jax.process_count())
    if resuming:
        checkpoints.restore_iterator(resume_step, iterator)
    step_fn = jax.jit(functools.partial(train_step, run.graphdef, stage.tx, stage.spec),
                      in_shardings=(stage_shardings, run.data_sharding),
                      out_shardings=(stage_shardings, NamedSharding(run.mesh, P())),
                      donate_argnums=(0,))

    step = int(state.step)
    log = _MetricsLog(run, stage)

    def save():
        log.flush()
        meta["step"] = step
        checkpoints.save(state, iterator, meta)
        log.last_good = step

    while step < stage.last_step:
        epoch = (step - stage.first_step) // stage.steps_per_epoch   # 0-based within the stage
        epoch_end = stage.first_step + (epoch + 1) * stage.steps_per_epoch
        if step == epoch_end - stage.steps_per_epoch and epoch in stage.reload_best_at:
            state = _reload_best(run, epoch, state)
        bar = tqdm.tqdm(total=stage.steps_per_epoch,
                        initial=step - (epoch_end - stage.steps_per_epoch),
                        desc=f"{stage.name} epoch {epoch + 1}/{stage.epochs}",
                        disable=not (config.logging.progress and is_main), unit="step")
        while step < epoch_end:
            batch = next(iterator)
            state, metrics = step_fn(state, runtime.to_global(batch, run.data_sharding))
            step += 1
            log.add(step, metrics)
            bar.update(1)
            if step % int(config.logging.every_steps) == 0:
                log.flush()
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
            if step % int(config.checkpoint.every_steps) == 0 and step < epoch_end:
                save()
            if run.preemption.requested:
                save()
                bar.close()
                logging.warning("stopped at step %d after SIGTERM; the same command resumes.",
                                step)
                _close(iterator)
                return state, True
        bar.close()
        log.flush()
        if stage.evaluates and (epoch + 1) % int(config.evals.every_epochs) == 0:
            metrics = run.evaluate(state, run.val_split)
            score = run.selection_score(metrics)
            if run.writer:
                run.writer.write(step, {f"{run.val_split}/{k}": v for k, v in metrics.items()})
            logging.info("epoch %d: %s %s = %.4f", epoch + 1, run.val_split,
                         config.selection.metric, score)
            if score > meta["best_score"]:
                meta.update(best_score=score, best_step=step, best_epoch=epoch + 1)
                checkpoints.save_best(state, step, dict(meta))
        save()
    _close(iterator)
    return state, False


def _close(iterator) -> None:
    """Stops the grain worker processes of a multiprocess iterator (no-op otherwise)."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def _reload_best(run: Run, epoch: int, state):
    """At a learning-rate drop, continue from the best parameters so far (the original)."""
    best = run.checkpoints.restore_best(runtime.abstract(state))
    if best is None:
        return state
    logging.info("epoch %d: lr drop; reloading the best checkpoint so far", epoch + 1)
    return TrainState(step=state.step, params=best.params, model_state=best.model_state,
                      opt_state=state.opt_state)


def _final_evaluation(run: Run, state, workdir: str, step: int) -> None:
    """Test metrics of the selected (best) model, printed and saved in results.json."""
    best = run.checkpoints.restore_best(runtime.abstract(state))
    metrics = run.evaluate(best if best is not None else state, "test")
    meta, protocol_name = run.meta, run.config.selection.protocol
    note = ("model selected on the TEST split (paper protocol): these numbers are optimistic"
            if protocol_name == "paper" else "model selected on the validation split")
    results = {"protocol": protocol_name, "note": note, "selected_epoch": meta["best_epoch"],
               "selected_step": meta["best_step"], "selection_score": meta["best_score"],
               "test": metrics}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        if run.writer:
            run.writer.write(step, {f"final_test/{k}": v for k, v in metrics.items()})
        table = metric_writers.markdown_table(
            ["metric", "value"], [[k, v] for k, v in metrics.items()])
        print(f"\nTest metrics ({note}; epoch {meta['best_epoch']}):\n{table}\n", flush=True)
