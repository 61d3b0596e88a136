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
import sys
import threading
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
from gl_jax.feed import BatchFeed
from gl_jax import host_memory
from gl_jax import metric_writers
from gl_jax import models
from gl_jax import protocol
from gl_jax import runtime
from gl_jax import workdir_lock
from gl_jax.losses import registry as loss_registry
from gl_jax.runtime import TrainState

WARMUP, GROUP = "warmup", "group"


def say(message: str) -> None:
    """A line for the person watching (process 0 only), printed between progress bars;
    library chatter goes to absl logging, which the command line keeps at WARNING."""
    if jax.process_index() == 0:
        tqdm.tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


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


# ------------------------------------------------------------------------------ checks
def _require(ok: bool, field: str, value, rule: str) -> None:
    if not ok:
        raise ValueError(f"config.{field} = {value!r}: {rule}.")


def validate_config(config, splits, mesh: Mesh) -> None:
    """Fails before anything compiles, naming the field and why."""
    n_dev = mesh.size
    num_train = splits["train"].num_classes
    for name, (p, k) in {
            "sampler": (config.sampler.classes_per_batch, config.sampler.samples_per_class),
            "warmup": (config.warmup.classes_per_batch, config.warmup.samples_per_class)}.items():
        if name == "warmup" and config.warmup.epochs <= 0:
            continue
        _require(int(p) >= 1, f"{name}.classes_per_batch", p, "must be >= 1")
        _require(int(k) >= 1, f"{name}.samples_per_class", k, "must be >= 1")
        if (p * k) % n_dev:
            raise ValueError(
                f"config.{name}: the global batch {p} x {k} = {p * k} is not divisible by the "
                f"{n_dev} devices of the mesh (config.mesh.num_devices).")
        if p > num_train:
            raise ValueError(
                f"config.{name}.classes_per_batch = {p} but the training split of "
                f"{config.data.name!r} has only {num_train} classes.")
    for field in ("schedule.epochs", "warmup.epochs", "schedule.steps_per_epoch",
                  "warmup.steps_per_epoch"):
        value = config[field.split(".")[0]][field.split(".")[1]]
        _require(int(value) >= 0, field, value, "must be >= 0")
    _require(config.schedule.epochs + config.warmup.epochs > 0, "schedule.epochs",
             config.schedule.epochs, "with warmup.epochs = 0 there is nothing to train")
    for field in ("optimizer.lr", "warmup.lr"):
        value = config[field.split(".")[0]][field.split(".")[1]]
        _require(float(value) >= 0.0 and math.isfinite(float(value)), field, value,
                 "a learning rate must be a finite number >= 0")
    opt = config.optimizer
    _require(float(opt.weight_decay) >= 0.0, "optimizer.weight_decay", opt.weight_decay,
             "must be >= 0")
    for field, value in (("optimizer.b1", opt.b1), ("optimizer.b2", opt.b2)):
        _require(0.0 <= float(value) < 1.0, field, value, "must be in [0, 1)")
    for field, value in (("optimizer.eps", opt.eps), ("warmup.eps", config.warmup.eps)):
        _require(float(value) > 0.0, field, value, "must be > 0")
    _require(float(opt.classifier_lr_multiplier) > 0.0, "optimizer.classifier_lr_multiplier",
             opt.classifier_lr_multiplier, "must be > 0")
    for field in ("evals.every_epochs", "evals.batch_size", "checkpoint.every_steps",
                  "checkpoint.max_to_keep", "logging.every_steps"):
        value = config[field.split(".")[0]][field.split(".")[1]]
        _require(int(value) >= 1, field, value, "must be >= 1")
    if config.evals.batch_size % n_dev:
        raise ValueError(f"config.evals.batch_size = {config.evals.batch_size} is not divisible "
                         f"by the {n_dev} devices of the mesh.")
    if config.selection.protocol not in ("paper", "validation"):
        raise ValueError(f"config.selection.protocol must be 'paper' or 'validation', got "
                         f"{config.selection.protocol!r}.")
    if config.selection.protocol == "validation" and "val" not in splits:
        raise ValueError("config.selection.protocol = 'validation' needs a validation split: "
                         "set config.data.val_classes > 0.")
    loss_name, hparams = loss_registry.hparams_from_config(config.loss)  # unknown -> ValueError
    if loss_name == "group_loss":
        k, anchors = int(config.sampler.samples_per_class), int(hparams["anchors_per_class"])
        _require(anchors >= 0, "loss.anchors_per_class", anchors, "must be >= 0")
        _require(k > anchors, "sampler.samples_per_class", k,
                 f"must exceed loss.anchors_per_class = {anchors}: with every sample of a "
                 "class an anchor the Group Loss is zero")
        _require(float(hparams["temperature"]) > 0, "loss.temperature",
                 hparams["temperature"], "must be > 0")
        _require(int(hparams["num_iterations"]) >= 0, "loss.num_iterations",
                 hparams["num_iterations"], "must be >= 0")
    if len(config.schedule.lr_drop_epochs) != len(config.schedule.lr_drop_factors):
        raise ValueError("config.schedule.lr_drop_epochs and lr_drop_factors differ in length.")
    if config.model.name not in models.available_models():
        raise ValueError(f"config.model.name = {config.model.name!r} is unknown; known: "
                         f"{models.available_models()}.")
    _validate_evals(config, splits)


def _validate_evals(config, splits) -> None:
    """Every K can be ranked in every evaluated split, and the selection metric exists."""
    ks = tuple(int(k) for k in config.evals.ks)
    _require(len(ks) > 0 and min(ks) >= 1, "evals.ks", tuple(config.evals.ks),
             "must be one or more K >= 1")
    name = str(config.data.name)
    val_split = "val" if config.selection.protocol == "validation" else "test"
    for split in sorted({val_split, "test"}):
        kind, parts = protocol.eval_kind(splits, name, split)
        limit = (len(splits[parts[0]]) - 1 if kind == "retrieval"
                 else len(splits["gallery"]))
        _require(max(ks) <= limit, "evals.ks", ks,
                 f"K = {max(ks)} exceeds the {limit} items a query of the {split!r} evaluation "
                 f"can rank")
    kind, _ = protocol.eval_kind(splits, name, val_split)
    metric = protocol.selection_key(str(config.selection.metric), kind)
    known = protocol.metric_names(kind, ks, nmi=bool(config.evals.nmi))
    _require(metric in known, "selection.metric", config.selection.metric,
             f"the {val_split!r} evaluation ({kind}) computes {sorted(known)}")


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
                      LossSpec(), sampler, data_config, frozen=frozen,
                      from_features=cached)
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
                        config.data, evaluates=True, reload_best_at=reload_at, frozen=frozen,
                        from_features=cached and not config.data.augment))
    return stages


def _steps_per_epoch(source, sampler_config, cap) -> int:
    steps = gdata.steps_per_epoch(source, sampler_config)
    return min(steps, int(cap)) if cap > 0 else steps


class _Preemption:
    """SIGTERM (a preempted VM) -> a flag the loop checks after every step, then a save.

    At most two steps are in flight (see `_train_stage`), so the save starts within two
    steps of the signal. If the process has not exited `timeout_s` seconds after the
    signal (a step or a data read that never returns), it exits with status 143 without
    saving: the last checkpoint stays the newest, and the same command resumes from it."""

    def __init__(self, timeout_s: float = 25.0):
        self.requested = False
        self.dispatched = 0          # the loop's last dispatched step
        self.signal_step = None      # `dispatched` when SIGTERM arrived
        self.timeout_s = float(timeout_s)
        self._previous = None
        self._timer: threading.Timer | None = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, nothing to restore
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            return
        self.signal_step = self.dispatched
        logging.warning("SIGTERM received at step %d: saving a checkpoint and stopping.",
                        self.signal_step)
        self.requested = True
        self._timer = threading.Timer(self.timeout_s, self._give_up)
        self._timer.daemon = True
        self._timer.start()

    def _give_up(self):
        logging.error("no checkpoint saved within %.0f s of SIGTERM (a step or a data read "
                      "does not return); exiting without saving. The same command resumes "
                      "from the last checkpoint.", self.timeout_s)
        logging.flush()
        os._exit(143)

    def __exit__(self, *exc):
        if self._timer is not None:
            self._timer.cancel()
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
    make_iterator: Callable    # stage -> a fresh training iterator for it
    features: dict | None = None   # split -> a frozen backbone's features (head-only)
    # Under GL_JAX_HOST_MALLOC=reuse: heap pages a new buffer left behind go back to
    # the kernel (called after each step; `evaluate` resets it before and after).
    heap_watch: host_memory.StepWatch = dataclasses.field(
        default_factory=host_memory.StepWatch)

    @property
    def data_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data"))

    def shardings(self, state):
        return runtime.state_shardings(state, self.mesh, bool(self.config.mesh.shard_params))

    def evaluate(self, state, split: str) -> dict:
        """The protocol's metrics of `split` ('test' = query vs gallery where it applies)."""
        # Under heap reuse the free step buffer would stay resident beside the evaluation's
        # own buffers, and their holes beside the next step's: released on both sides.
        self.heap_watch.reset()
        metrics = protocol.evaluate_split(self.embedder, state.params, state.model_state,
                                          self.splits, split, self.config, self.mesh,
                                          features=self.features)
        self.heap_watch.reset()
        return metrics

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


class _MetricsLog:
    """Step metrics still on the device, read back in groups (a read-back is a host sync)."""

    def __init__(self, run: Run, stage: Stage):
        self.run, self.stage = run, stage
        self.pending: list[tuple[int, dict]] = []
        self.last_good = run.checkpoints.latest.latest_step()

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self) -> None:
        """Reads pending metrics back, stops on a non-finite loss or parameters, logs the
        averages. Every checkpoint is saved right after a flush, so a saved state always
        has finite parameters and came from finite losses."""
        if not self.pending:
            return
        rows = [(s, {k: float(v) for k, v in jax.device_get(m).items()})
                for s, m in self.pending]
        self.pending = []
        for s, row in rows:
            bad = [k for k in ("loss", "param_norm") if not math.isfinite(row.get(k, 0.0))]
            if bad:
                where = (f"The last checkpoint, step {self.last_good} in "
                         f"{self.run.checkpoints.latest.directory}, has finite parameters "
                         "(checked at save) and intact files (checked at restore): rerunning "
                         "the same command resumes from it, and will likely meet the same "
                         "values unless the config changes (e.g. a lower "
                         "--config.optimizer.lr)" if self.last_good is not None
                         else "No checkpoint was saved yet.")
                raise NonFiniteLossError(
                    f"non-finite {bad[0]} {row[bad[0]]} at step {s} ({self.stage.name} stage). "
                    f"{where}")
        if self.run.writer:
            mean = {f"{self.stage.name}/{k}": float(np.mean([r[k] for _, r in rows]))
                    for k in rows[0][1]}
            self.run.writer.write(rows[-1][0], mean)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Runs (or resumes) the configured training in `workdir`; returns the final state.

    Writes `config.json`, `metrics.jsonl`, TensorBoard files in `tensorboard/`,
    checkpoints in `checkpoints/` (latest) and `best/`, and `results.json` with the final
    test metrics of the selected model. One run per workdir (`workdir/.lock`).
    """
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
    final_step = stages[-1].last_step

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

    checkpoints = ckpt.Checkpoints(workdir, config)
    model = runtime.build_model(config, train_source.num_classes)
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
    make_iterator = functools.partial(_train_iterator, splits["train"],
                                      None if features is None else features["train"])

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
              preemption=_Preemption(float(config.checkpoint.preemption_timeout_s)), meta=meta,
              make_iterator=make_iterator,
              val_split="val" if config.selection.protocol == "validation" else "test")

    # Not in a search on the validation split (final_test False): the test split stays
    # untouched until the chosen runs are evaluated.
    if resumed is None and config.evals.untrained_baseline and config.evals.final_test:
        # The same network before any training: the reference the gain is measured from.
        meta["untrained_test"] = run.evaluate(state, "test")
        say(f"before training: test {_headline(meta['untrained_test'])}")
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
    checkpoints.close()
    if run.writer:
        run.writer.close()
    return state


def _train_iterator(source, features, stage: Stage):
    # uint8 batches: train_step normalises them.
    return gdata.make_train_iterator(
        source, stage.data_config, stage.sampler_config, process_index=jax.process_index(),
        process_count=jax.process_count(), features=features if stage.from_features else None,
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
        raise ckpt.NoUsableCheckpointError(
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
    log = _MetricsLog(run, stage)

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
        bar = tqdm.tqdm(total=stage.steps_per_epoch,
                        initial=step - (epoch_end - stage.steps_per_epoch),
                        desc=f"{stage.name} epoch {epoch + 1}/{stage.epochs}", leave=False,
                        disable=not (config.logging.progress and is_main), unit="step")
        in_flight = None
        while step < epoch_end:
            state, metrics = step_fn(state, next(feed))
            run.heap_watch()
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
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
            if step % int(config.checkpoint.every_steps) == 0 and step < epoch_end:
                save()
            if run.preemption.requested:
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


def _reload_best(run: Run, epoch: int, state):
    """At a learning-rate drop, continue from the best parameters so far (the original)."""
    best = run.checkpoints.restore_best(runtime.abstract(state))
    if best is None:
        return state
    say(f"epoch {epoch + 1}: lr drop; continuing from the best checkpoint so far")
    return TrainState(step=state.step, params=best.params, model_state=best.model_state,
                      opt_state=state.opt_state)


def _final_evaluation(run: Run, state, workdir: str, step: int) -> None:
    """Test metrics of the selected (best) model, printed and saved in results.json."""
    meta, protocol_name = run.meta, run.config.selection.protocol
    if not run.config.evals.final_test:
        results = {"protocol": protocol_name, "selected_epoch": meta["best_epoch"],
                   "selected_step": meta["best_step"], "selection_score": meta["best_score"],
                   "test": None, "note": "not evaluated on the test split "
                   "(config.evals.final_test = False)"}
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "results.json"), "w") as f:
                json.dump(results, f, indent=2)
        say("\nNo test evaluation (config.evals.final_test = False); the same command with "
            "--config.evals.final_test=True evaluates this run's selected model.\n")
        return
    best = run.checkpoints.restore_best(runtime.abstract(state))
    metrics = run.evaluate(best if best is not None else state, "test")
    if meta["best_step"] < 0:
        note = "the final model: no evaluation during training selected one"
    elif protocol_name == "paper":
        note = ("model selected on the TEST split (paper protocol), epoch "
                f"{meta['best_epoch']}: these numbers are optimistic")
    else:
        note = f"model selected on the validation split, epoch {meta['best_epoch']}"
    results = {"protocol": protocol_name, "note": note, "selected_epoch": meta["best_epoch"],
               "selected_step": meta["best_step"], "selection_score": meta["best_score"],
               "test": metrics}
    before = meta.get("untrained_test")
    if before:
        results["untrained_test"] = before
        results["gain"] = {k: v - before[k] for k, v in metrics.items()
                           if isinstance(v, float) and k in before}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        if run.writer:
            run.writer.write(step, {f"final_test/{k}": v for k, v in metrics.items()})
        names = [k for k, v in metrics.items() if isinstance(v, float)]
        if before:
            table = metric_writers.markdown_table(
                ["held-out metric", "before training", "after training", "gain"],
                [[k, before[k], metrics[k], f"{metrics[k] - before[k]:+.4f}"] for k in names])
        else:
            table = metric_writers.markdown_table(["held-out metric", "value"],
                                                  [[k, metrics[k]] for k in names])
        say(f"\nTest metrics ({note}):\n{table}\n")


def _headline(metrics: dict) -> str:
    """'recall@1 0.4123, map@r 0.1234' (the first rank metric and MAP@R / mAP)."""
    keys = [k for k in ("recall@1", "rank@1", "map@r", "map") if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys)
