"""Checks of a training config, before anything compiles: each failure is a ValueError that
names the config field, its value and the rule it breaks.

`validate_fields` needs the config alone: the command line runs it before it imports JAX or
writes to the workdir. `validate_config` adds the checks against the data and the mesh.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jax.sharding import Mesh

# config.data.scan: what gl_jax.data.scan reads of every file before training ('off': nothing).
SCAN_MODES = ("header", "full", "off")
# config.optimizer.name (gl_jax.optimizer.OPTIMIZERS, which imports JAX).
OPTIMIZERS = ("radam", "adamw")


def _require(ok: bool, field: str, value, rule: str) -> None:
    if not ok:
        raise ValueError(f"config.{field} = {value!r}: {rule}.")


def validate_fields(config) -> None:
    """The checks that need neither the data nor JAX, naming the field and why."""
    _require(config.data.scan in SCAN_MODES, "data.scan", config.data.scan,
             f"must be one of {', '.join(map(repr, SCAN_MODES))}")
    size, resize = config.data.image_size, config.data.resize_size
    _require(0 < int(size) <= int(resize), "data.image_size", size,
             f"must be in (0, config.data.resize_size = {resize}]")
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
    _require(opt.name in OPTIMIZERS, "optimizer.name", opt.name,
             f"must be one of {', '.join(map(repr, OPTIMIZERS))}")
    for field in ("classifier_lr_multiplier", "head_lr_multiplier"):
        value = float(opt[field])
        _require(value > 0.0 and math.isfinite(value), f"optimizer.{field}", opt[field],
                 "must be a finite number > 0")
    for field in ("evals.every_epochs", "evals.batch_size", "checkpoint.every_steps",
                  "checkpoint.max_to_keep", "logging.every_steps"):
        value = config[field.split(".")[0]][field.split(".")[1]]
        _require(int(value) >= 1, field, value, "must be >= 1")
    if config.selection.protocol not in ("paper", "validation"):
        raise ValueError(f"config.selection.protocol must be 'paper' or 'validation', got "
                         f"{config.selection.protocol!r}.")
    if len(config.schedule.lr_drop_epochs) != len(config.schedule.lr_drop_factors):
        raise ValueError("config.schedule.lr_drop_epochs and lr_drop_factors differ in length.")
    if bool(config.model.freeze_backbone):
        _require(int(config.model.embedding_dim) > 0, "model.embedding_dim",
                 config.model.embedding_dim,
                 "with config.model.freeze_backbone = True the embedding would be the frozen "
                 "backbone's pooled feature, which training cannot change: give the head an "
                 "embedding layer (e.g. --config.model.embedding_dim=128)")


def validate_config(config, splits, mesh: Mesh) -> None:
    """Fails before anything compiles, naming the field and why."""
    # Imported here, not above: validate_fields runs before the command line imports JAX.
    from gl_jax import models
    from gl_jax.losses import registry as loss_registry
    from gl_jax.models import layers

    validate_fields(config)
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
    if config.evals.batch_size % n_dev:
        raise ValueError(f"config.evals.batch_size = {config.evals.batch_size} is not divisible "
                         f"by the {n_dev} devices of the mesh.")
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
    _require(str(config.model.cpu_kernels).strip().lower() in layers.CPU_KERNEL_CHOICES,
             "model.cpu_kernels", config.model.cpu_kernels, "must be 'auto', 'on' or 'off'")
    if config.model.name not in models.available_models():
        raise ValueError(f"config.model.name = {config.model.name!r} is unknown; known: "
                         f"{models.available_models()}.")
    _validate_evals(config, splits)


def _validate_evals(config, splits) -> None:
    """Every K can be ranked in every evaluated split, and the selection metric exists."""
    from gl_jax import protocol   # see validate_config

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
