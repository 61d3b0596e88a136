"""Training: `create_train_state`, `train_step`, `eval_step`, `train_and_evaluate`.

One run has two stages (reference section 2):

1. `warmup`: classification fine-tuning of the backbone and a new classifier over the
   training classes with plain cross-entropy (its own RAdam, no weight decay);
2. `group`: Group Loss training from there, total loss
   `mean(group_loss) + ce_weight * mean(cross_entropy)`, RAdam with decoupled weight
   decay and the reference's learning-rate drops (optionally reloading the best
   checkpoint so far at each drop).

The global step counts through both stages. The step is a pure function of a
`TrainState` pytree, jitted with explicit shardings over a `jax.sharding.Mesh` with one
`data` axis: the global batch is split over the devices of every host, parameters are
replicated (or sharded with `mesh.shard_params`), and the loss sees the whole global batch.
Checkpoints (Orbax) hold the state, the data iterator's position and the run's
bookkeeping, so that a restarted run continues exactly where the last one stopped.
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
import flax
from flax import nnx
import grain
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from gl_jax import data as gdata
from gl_jax import evaluation
from gl_jax.losses import registry as loss_registry
from gl_jax import metric_writers
from gl_jax import models

WARMUP, GROUP = "warmup", "group"


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # global step (both stages), int32 scalar
    params: Any              # nnx.Param leaves of the model
    model_state: Any         # every other nnx variable (BatchNorm statistics)
    opt_state: Any


# ------------------------------------------------------------------------------ building
def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nnx.Module:
    """The configured backbone + heads, initialised from `config.seed` (and `init_from`)."""
    m = config.model
    model = models.create_model(
        m.name, num_classes=num_classes, embedding_dim=int(m.embedding_dim) or None,
        pooling=m.pooling, pool_mix=float(m.pool_mix),
        leak=None if m.leak < 0 else float(m.leak),
        bn_momentum=None if m.bn_momentum < 0 else float(m.bn_momentum),
        bn_epsilon=None if m.bn_epsilon < 0 else float(m.bn_epsilon),
        dtype=jnp.dtype(m.dtype), rngs=nnx.Rngs(int(config.seed)))
    if m.init_from:
        from gl_jax import weights  # only needed when starting from converted weights
        weights.load_pretrained(model, m.init_from, arch=m.name)
    return model


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


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, step: int = 0):
    """Splits `model` into a static graph definition and a `TrainState` pytree."""
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                       model_state=model_state, opt_state=tx.init(params))
    return graphdef, state


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
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
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


def eval_step(graphdef, params, model_state, images):
    """Embeddings of a batch in inference mode (BatchNorm running statistics)."""
    model = nnx.merge(graphdef, params, model_state, copy=True)
    model.eval()
    embedding, _ = model(images)
    return embedding


# ------------------------------------------------------------------------------- mesh
def make_mesh(mesh_config) -> Mesh:
    devices = jax.devices()
    n = len(devices) if mesh_config.num_devices in (-1, 0) else int(mesh_config.num_devices)
    if n > len(devices):
        raise ValueError(f"config.mesh.num_devices = {n} but only {len(devices)} devices exist.")
    return Mesh(np.asarray(devices[:n]), ("data",), axis_types=(AxisType.Auto,))


def state_shardings(state, mesh: Mesh, shard_params: bool):
    """Replicated leaves, or with `shard_params` each leaf split over `data` along its
    largest axis that the device count divides (GSPMD then gathers what a step needs)."""
    replicated = NamedSharding(mesh, P())
    size = mesh.shape["data"]

    def rule(x):
        shape = getattr(x, "shape", ())
        if not shard_params or size == 1 or not shape:
            return replicated
        candidates = [i for i, d in enumerate(shape) if d % size == 0]
        if not candidates:
            return replicated
        axis = max(candidates, key=lambda i: shape[i])
        spec = [None] * len(shape)
        spec[axis] = "data"
        return NamedSharding(mesh, P(*spec))
    return jax.tree.map(rule, state)


def to_global(batch: dict, sharding: NamedSharding, keys=("image", "label")) -> dict:
    """This host's slice of the global batch -> arrays sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
            for k in keys}


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


def load_splits(config) -> dict:
    try:
        return gdata.load_splits(config.data)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"config.data.root = {config.data.root!r} ({config.data.name}): "
                                f"{e}") from e


# ----------------------------------------------------------------------------- evaluation
class Embedder:
    """Computes the embeddings of a split with a jitted, sharded `eval_step`."""

    def __init__(self, graphdef, mesh: Mesh, state_sharding, config):
        self.config = config
        self.data_sharding = NamedSharding(mesh, P("data"))
        self._step = jax.jit(
            functools.partial(eval_step, graphdef),
            in_shardings=(state_sharding.params, state_sharding.model_state, self.data_sharding),
            out_shardings=self.data_sharding)

    def __call__(self, state: TrainState, source, desc: str = "embed") -> dict:
        config = self.config
        it = gdata.make_eval_iterator(source, config.data, config.evals.batch_size,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
        total = gdata.eval_steps(source, config.evals.batch_size)
        parts = {"embedding": [], "label": [], "camera": [], "mask": []}
        show = config.logging.progress and jax.process_index() == 0
        for batch in tqdm.tqdm(it, total=total, desc=desc, disable=not show, leave=False):
            images = jax.make_array_from_process_local_data(self.data_sharding, batch["image"])
            emb = self._step(state.params, state.model_state, images)
            parts["embedding"].append(np.asarray(multihost_utils.process_allgather(emb, tiled=True)))
            for key in ("label", "camera", "mask"):
                parts[key].append(np.asarray(multihost_utils.process_allgather(
                    np.asarray(batch[key]), tiled=True)))
        out = {k: np.concatenate(v) for k, v in parts.items()}
        keep = out.pop("mask")
        return {k: v[keep] for k, v in out.items()}


def evaluate_split(embed: Embedder, state, splits, name: str, config) -> dict:
    """Metrics of one split; 'test' for query/gallery datasets means query vs gallery."""
    ks = tuple(int(k) for k in config.evals.ks)
    if name == "test" and "test" not in splits:
        query = embed(state, splits["query"], "embed query")
        gallery = embed(state, splits["gallery"], "embed gallery")
        if query["camera"].min() >= 0 and config.data.name in ("market1501", "dukemtmc"):
            return evaluation.reid_metrics(
                query["embedding"], query["label"], query["camera"], gallery["embedding"],
                gallery["label"], gallery["camera"], ranks=ks,
                junk_ids=gdata.reid_junk_labels(splits["query"]))
        return evaluation.retrieval_metrics_query_gallery(
            query["embedding"], query["label"], gallery["embedding"], gallery["label"], ks=ks)
    out = embed(state, splits[name], f"embed {name}")
    ks = tuple(k for k in ks if k < len(out["label"]))
    return evaluation.retrieval_metrics(out["embedding"], out["label"], ks=ks,
                                        nmi=bool(config.evals.nmi), seed=int(config.seed))


def selection_score(metrics: dict, config) -> float:
    key = config.selection.metric
    if key not in metrics and key.startswith("recall@"):
        key = "rank@" + key.split("@")[1]   # re-id datasets report CMC rank@K
    return float(metrics[key])


# ----------------------------------------------------------------------------- the run
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
        data_config.augment = False   # the reference fine-tunes with the test-style transform
        spe = _steps_per_epoch(train_source, sampler, config.warmup.steps_per_epoch)
        stage = Stage(WARMUP, step, int(config.warmup.epochs), spe,
                      # Its own lr and eps (the reference's); the betas of config.optimizer,
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
    stages.append(Stage(GROUP, step, int(config.schedule.epochs), spe, tx, spec, config.sampler,
                        config.data))
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


class Checkpoints:
    """Latest checkpoints (state + data iterator + bookkeeping) and the best one."""

    def __init__(self, workdir: str, config):
        options = ocp.CheckpointManagerOptions(max_to_keep=int(config.checkpoint.max_to_keep),
                                               create=True)
        self.latest = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options)
        self.best = ocp.CheckpointManager(os.path.join(workdir, "best"),
                                          options=ocp.CheckpointManagerOptions(max_to_keep=1,
                                                                               create=True))

    def save(self, state, iterator, meta: dict) -> None:
        step = int(meta["step"])
        if step in self.latest.all_steps():
            return
        self.latest.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(iterator),
            meta=ocp.args.JsonSave(meta)))
        self.latest.wait_until_finished()

    def latest_meta(self) -> tuple[int | None, dict | None]:
        """The newest readable checkpoint's step and bookkeeping; corrupt ones are skipped."""
        for step in sorted(self.latest.all_steps(), reverse=True):
            try:
                meta = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
                return step, dict(meta["meta"])
            except Exception as e:  # a half-written or damaged checkpoint
                logging.warning("checkpoint %d in %s is unreadable (%s); trying the previous one.",
                                step, self.latest.directory, e)
        return None, None

    def restore_state(self, step: int, abstract_state):
        return self.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]

    def restore_iterator(self, step: int, iterator) -> None:
        """Puts `iterator` (freshly built with the same arguments) where step `step` left it."""
        self.latest.restore(step, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(iterator)))

    def save_best(self, state, step: int, meta: dict) -> None:
        for stale in [s for s in self.best.all_steps() if s >= step]:
            self.best.delete(stale)
        self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)))
        self.best.wait_until_finished()

    def restore_best(self, abstract_state):
        step = self.best.latest_step()
        if step is None:
            return None
        return self.best.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]

    def discard_best_after(self, step: int) -> None:
        """A best checkpoint newer than the resumed state belongs to the lost future."""
        for s in [s for s in self.best.all_steps() if s > step]:
            self.best.delete(s)

    def close(self):
        self.latest.close()
        self.best.close()


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)


def _format_table(metrics: dict) -> str:
    rows = [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in metrics.items()]
    return "\n".join(["| metric | value |", "|---|---|", *rows])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Runs (or resumes) the configured training in `workdir`; returns the final state.

    Writes `config.json`, `metrics.jsonl`, TensorBoard files in `tensorboard/`,
    checkpoints in `checkpoints/` (latest) and `best/`, and `results.json` with the final
    test metrics of the selected model.
    """
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = make_mesh(config.mesh)
    splits = load_splits(config)
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

    # Bookkeeping that travels with each checkpoint.
    meta = {"step": 0, "best_score": -math.inf, "best_step": -1, "best_epoch": -1,
            "protocol": config.selection.protocol}
    checkpoints = Checkpoints(workdir, config)
    resume_step, resume_meta = checkpoints.latest_meta()
    start = 0 if resume_step is None else resume_step
    # The stage the run continues in (the last one if everything is done).
    current = next((s for s in stages if start < s.last_step), stages[-1])

    model = build_model(config, train_source.num_classes)
    graphdef, state = create_train_state(model, current.tx)
    del model
    shardings = state_shardings(state, mesh, bool(config.mesh.shard_params))
    state = jax.device_put(state, shardings)
    if resume_step is not None:
        meta.update(resume_meta)
        state = checkpoints.restore_state(resume_step, _abstract(state))
        logging.info("resumed from step %d (%s stage) in %s", resume_step, current.name, workdir)
    checkpoints.discard_best_after(start)
    data_sharding = NamedSharding(mesh, P("data"))
    embed = Embedder(graphdef, mesh, shardings, config)
    writer = metric_writers.MetricWriter(workdir) if is_main else None

    val_split = "val" if config.selection.protocol == "validation" else "test"
    stopped_early = False
    with _Preemption() as preemption:
        for stage in stages:
            if stage.last_step <= start:
                continue
            mid_stage = stage.first_step < start
            state, stopped_early = _run_stage(
                stage, resume_step if mid_stage else None, state, meta, graphdef, data_sharding,
                embed, splits, checkpoints, writer, config, preemption, val_split, mesh)
            if stopped_early:
                break

    if not stopped_early:
        state = _final_evaluation(state, embed, splits, checkpoints, writer, config, workdir,
                                  meta, final_step)
    checkpoints.close()
    if writer:
        writer.close()
    return state


def _run_stage(stage: Stage, resume_step, state, meta, graphdef, data_sharding, embed, splits,
               checkpoints, writer, config, preemption, val_split, mesh):
    """Trains one stage, from its start or from `resume_step` inside it.

    Returns (state, stopped_early)."""
    is_main = jax.process_index() == 0
    resuming = resume_step is not None
    # A new stage starts a fresh optimizer on the current parameters.
    if not resuming:
        state = TrainState(step=state.step, params=state.params, model_state=state.model_state,
                           opt_state=stage.tx.init(state.params))
    stage_shardings = state_shardings(state, mesh, bool(config.mesh.shard_params))
    state = jax.device_put(state, stage_shardings)
    iterator = gdata.make_train_iterator(
        splits["train"], stage.data_config, stage.sampler_config,
        process_index=jax.process_index(), process_count=jax.process_count())
    if resuming:
        checkpoints.restore_iterator(resume_step, iterator)
    step_fn = jax.jit(functools.partial(train_step, graphdef, stage.tx, stage.spec),
                      in_shardings=(stage_shardings, data_sharding),
                      out_shardings=(stage_shardings, NamedSharding(mesh, P())),
                      donate_argnums=(0,))

    step = int(state.step)
    pending: list[tuple[int, dict]] = []   # device metrics not yet read back
    last_good = checkpoints.latest.latest_step()

    def flush():
        """Reads pending metrics back, stops on a non-finite loss, logs the averages."""
        nonlocal pending
        if not pending:
            return
        rows = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
        pending = []
        for s, row in rows:
            if not math.isfinite(row["loss"]):
                where = (f"the last good checkpoint is step {last_good} in "
                         f"{checkpoints.latest.directory}" if last_good is not None
                         else "no checkpoint was saved yet")
                raise NonFiniteLossError(
                    f"non-finite loss {row['loss']} at step {s} ({stage.name} stage); {where}. "
                    f"Rerunning the same command resumes from it.")
        if writer:
            mean = {f"{stage.name}/{k}": float(np.mean([r[k] for _, r in rows])) for k in rows[0][1]}
            writer.write(rows[-1][0], mean)

    def save():
        nonlocal last_good
        flush()
        meta["step"] = step
        checkpoints.save(state, iterator, meta)
        last_good = step

    while step < stage.last_step:
        epoch = (step - stage.first_step) // stage.steps_per_epoch   # 0-based within the stage
        epoch_end = stage.first_step + (epoch + 1) * stage.steps_per_epoch
        if stage.name == GROUP and step == epoch_end - stage.steps_per_epoch:
            state = _maybe_reload_best(stage, epoch, state, checkpoints, config)
        bar = tqdm.tqdm(total=stage.steps_per_epoch,
                        initial=step - (epoch_end - stage.steps_per_epoch),
                        desc=f"{stage.name} epoch {epoch + 1}/{stage.epochs}",
                        disable=not (config.logging.progress and is_main), unit="step")
        while step < epoch_end:
            batch = next(iterator)
            state, metrics = step_fn(state, to_global(batch, data_sharding))
            step += 1
            pending.append((step, metrics))
            bar.update(1)
            if step % int(config.logging.every_steps) == 0:
                flush()
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
            if step % int(config.checkpoint.every_steps) == 0 and step < epoch_end:
                save()
            if preemption.requested:
                save()
                bar.close()
                logging.warning("stopped at step %d after SIGTERM; the same command resumes.",
                                step)
                _close(iterator)
                return state, True
        bar.close()
        flush()
        if stage.name == GROUP and (epoch + 1) % int(config.evals.every_epochs) == 0:
            metrics = evaluate_split(embed, state, splits, val_split, config)
            score = selection_score(metrics, config)
            if writer:
                writer.write(step, {f"{val_split}/{k}": v for k, v in metrics.items()})
            logging.info("epoch %d: %s %s = %.4f", epoch + 1, val_split, config.selection.metric,
                         score)
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


def _maybe_reload_best(stage, epoch, state, checkpoints, config):
    """At a learning-rate drop, continue from the best parameters so far (the original)."""
    drops = {int(e) - 1 for e in config.schedule.lr_drop_epochs}
    if epoch not in drops or not config.schedule.reload_best_at_drop:
        return state
    abstract = _abstract(state)
    best = checkpoints.restore_best(abstract)
    if best is None:
        return state
    logging.info("epoch %d: lr drop; reloading the best checkpoint so far", epoch + 1)
    return TrainState(step=state.step, params=best.params, model_state=best.model_state,
                      opt_state=state.opt_state)


def _final_evaluation(state, embed, splits, checkpoints, writer, config, workdir, meta, step):
    """Test metrics of the selected (best) model, printed and saved in results.json."""
    best = checkpoints.restore_best(_abstract(state))
    selected = best if best is not None else state
    metrics = evaluate_split(embed, selected, splits, "test", config)
    protocol = config.selection.protocol
    note = ("model selected on the TEST split (paper protocol): these numbers are optimistic"
            if protocol == "paper" else "model selected on the validation split")
    results = {"protocol": protocol, "note": note, "selected_epoch": meta["best_epoch"],
               "selected_step": meta["best_step"], "selection_score": meta["best_score"],
               "test": metrics}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        if writer:
            writer.write(step, {f"final_test/{k}": v for k, v in metrics.items()})
        table = _format_table(metrics)
        print(f"\nTest metrics ({note}; epoch {meta['best_epoch']}):\n{table}\n", flush=True)
    return state
