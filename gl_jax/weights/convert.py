"""Convert PyTorch state dicts (torchvision ResNet, Caffe-port BN-Inception,
EfficientNet-Lite) into the parameters of a gl_jax model.

Each parameter of the model (a leaf of ``nnx.state(model)``, path like
``('backbone', 'layer1', 0, 'conv1', 'kernel')``) is matched to one PyTorch key by
two rules:

* the module path -> the PyTorch module name, per architecture (`ARCHITECTURES`);
* the leaf name -> the PyTorch tensor name and layout:

  | gl_jax leaf | PyTorch | transform |
  |---|---|---|
  | conv ``kernel`` [kh, kw, in/g, out] | ``weight`` [out, in/g, kh, kw] | ``.transpose(2,3,1,0)`` |
  | linear ``kernel`` [in, out] | ``weight`` [out, in] | ``transpose()`` |
  | ``bias`` | ``bias`` | - |
  | BatchNorm ``scale`` / ``bias`` | ``weight`` / ``bias`` | - |
  | BatchNorm ``mean`` / ``var`` | ``running_mean`` / ``running_var`` | - |

  (HWIO from OIHW; a depthwise [C, 1, k, k] becomes [k, k, 1, C], Flax's layout for
  ``feature_group_count=C``.) ``num_batches_tracked`` has no counterpart and is
  ignored. Per-channel vectors stored as [1, C] (the first BN-Inception port) are
  flattened to [C].

The classifier head of the file (``fc``, ``last_linear``, ``_fc``) goes into the
model's ``classifier`` only when that makes sense: the model has no extra embedding
layer (its classifier reads the pooled feature, like the file's) and the shapes agree.
Otherwise the head keys are reported as skipped, never as errors.

Everything that does not fit is reported by name in a `ConversionReport`: PyTorch keys
the model needs but the file lacks (missing), keys of the file no parameter uses
(unexpected), and keys whose shape after the transform differs from the parameter's
(wrong shape). With ``strict=True`` (the default) any of these raises a ValueError
listing them all and the model is left untouched.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["ArchitectureRule", "ARCHITECTURES", "ConversionReport", "torch_key_map",
           "convert_state_dict"]

Path = tuple  # an nnx state path: str attribute names and int list indices


@dataclasses.dataclass(frozen=True)
class ArchitectureRule:
    """How one architecture's module paths are named in its PyTorch state dict.

    Attributes:
      backbone_name: maps the module path below ``backbone`` (e.g. ``('layer1', 0,
        'conv1')``) to the PyTorch module name (``'layer1.0.conv1'``).
      head: the PyTorch name of the ImageNet classifier (``'fc'``...).
      source: a short description of the expected file.
    """

    backbone_name: Callable[[Path], str]
    head: str
    source: str


def _dotted(path: Path) -> str:
    """torchvision-style names: attribute names and list indices joined by dots."""
    return ".".join(str(p) for p in path)


ARCHITECTURES: dict[str, ArchitectureRule] = {
    **{name: ArchitectureRule(_dotted, "fc", f"torchvision {name} state dict")
       for name in ("resnet18", "resnet34", "resnet50", "resnet101")},
    "bninception": ArchitectureRule(
        _dotted, "last_linear",
        "Caffe-ported BN-Inception (Cadene pretrainedmodels bn_inception-*.pth)"),
    "efficientnet_lite0": ArchitectureRule(
        _dotted, "_fc",
        "EfficientNet-Lite0 in efficientnet_pytorch naming (efficientnet-lite0-*.pth)"),
}

# gl_jax leaf name -> PyTorch tensor name.
_LEAF_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var", "kernel": "weight"}
_IGNORED_SUFFIXES = (".num_batches_tracked",)


def _to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    """PyTorch layout -> Flax layout for one tensor (see the module table).

    Per-channel vectors saved as [1, C] (the first BN-Inception port, from torch < 0.2)
    are flattened to [C].
    """
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf != "kernel" and array.ndim == 2 and array.shape[0] == 1:
        return array.reshape(-1)
    return array


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did, key by key (PyTorch names).

    Attributes:
      loaded: keys copied into the model.
      missing: keys the model needs that the file lacks.
      unexpected: keys of the file that no parameter uses.
      wrong_shape: ``(key, file shape in Flax layout, parameter shape)`` triples.
      skipped_head: head keys of the file not loaded (no classifier, an embedding layer
        in between, different class count, or ``head='drop'``).
      not_in_file: model parameters outside the backbone with no counterpart in the file
        (the new embedding layer / classifier); they keep their initialisation.
    """

    loaded: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    wrong_shape: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)
    skipped_head: list[str] = dataclasses.field(default_factory=list)
    not_in_file: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every backbone parameter was loaded and the file had no surprises."""
        return not (self.missing or self.unexpected or self.wrong_shape)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.missing:
            lines.append(f"missing from the file ({len(self.missing)}): {self.missing}")
        if self.unexpected:
            lines.append(f"unexpected in the file ({len(self.unexpected)}): {self.unexpected}")
        if self.wrong_shape:
            lines.append("wrong shape (key, file shape in Flax layout, parameter shape) "
                         f"({len(self.wrong_shape)}): {self.wrong_shape}")
        if self.skipped_head:
            lines.append(f"head not loaded: {self.skipped_head}")
        if self.not_in_file:
            lines.append(f"kept their initialisation: {self.not_in_file}")
        return "; ".join(lines)


def _check_arch(arch: str) -> ArchitectureRule:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; convertible: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def torch_key_map(arch: str, model: nnx.Module) -> dict[Path, str]:
    """The PyTorch key of every parameter/statistic of ``model`` that has one.

    Returns ``{nnx state path: torch key}``; backbone leaves map through the
    architecture's naming rule, ``classifier`` to the file's head. Other leaves (an
    ``embedding`` layer) have no key and are absent.
    """
    rule = _check_arch(arch)
    mapping = {}
    for path, _ in nnx.to_flat_state(nnx.state(model)):
        *module, leaf = path
        if leaf not in _LEAF_NAMES:
            continue
        if module and module[0] == "backbone":
            mapping[tuple(path)] = f"{rule.backbone_name(tuple(module[1:]))}.{_LEAF_NAMES[leaf]}"
        elif module == ["classifier"]:
            mapping[tuple(path)] = f"{rule.head}.{_LEAF_NAMES[leaf]}"
    return mapping


def _path_name(path: Sequence) -> str:
    return "/".join(str(p) for p in path)


def convert_state_dict(arch: str, state_dict: Mapping[str, np.ndarray], model: nnx.Module, *,
                       head: str = "auto", strict: bool = True) -> ConversionReport:
    """Copy a PyTorch state dict into ``model`` (in place) and report what happened.

    Args:
      arch: a key of `ARCHITECTURES` (the gl_jax model name).
      state_dict: PyTorch key -> array, e.g. from `load_state_dict`.
      model: a gl_jax ``EmbeddingModel`` built for ``arch``.
      head: 'auto' = load the file's classifier into ``model.classifier`` when the model
        has no embedding layer and the shapes agree, else skip it; 'drop' = never load it.
      strict: raise on any missing / unexpected / wrong-shape key (the model is then
        unchanged); with False, load what fits and return the report.
    Returns:
      The `ConversionReport`.
    Raises:
      ValueError: unknown arch/head, or (strict) a report that is not ``ok``.
    """
    rule = _check_arch(arch)
    if head not in ("auto", "drop"):
        raise ValueError(f"head must be 'auto' or 'drop', got {head!r}")
    state = nnx.state(model)
    key_map = torch_key_map(arch, model)
    report = ConversionReport()
    head_prefix = rule.head + "."
    use_head = head == "auto" and getattr(model, "embedding", None) is None
    new_values: dict[Path, np.ndarray] = {}
    used: set[str] = set()

    for path, variable in nnx.to_flat_state(state):
        path = tuple(path)
        key = key_map.get(path)
        if key is None:
            report.not_in_file.append(_path_name(path))
            continue
        expected = tuple(variable.get_value().shape)
        is_head = key.startswith(head_prefix) and path[0] == "classifier"
        if is_head and not use_head:
            report.not_in_file.append(_path_name(path))
            continue
        if key not in state_dict:
            if is_head:
                report.not_in_file.append(_path_name(path))
            else:
                report.missing.append(key)
            continue
        array = _to_flax_layout(path[-1], np.asarray(state_dict[key]))
        if tuple(array.shape) != expected:
            if is_head:  # e.g. 1000 ImageNet classes into a 100-class classifier
                report.not_in_file.append(_path_name(path))
                continue
            report.wrong_shape.append((key, tuple(array.shape), expected))
            used.add(key)
            continue
        new_values[path] = array
        used.add(key)
        report.loaded.append(key)

    for key in state_dict:
        if key in used or key.endswith(_IGNORED_SUFFIXES):
            continue
        if key.startswith(head_prefix):
            report.skipped_head.append(key)
        else:
            report.unexpected.append(key)

    if strict and not report.ok:
        raise ValueError(f"{arch}: the state dict does not match the model: "
                         f"{report.summary()}")
    for path, variable in nnx.to_flat_state(state):
        if tuple(path) in new_values:
            old = variable.get_value()
            variable.set_value(jnp.asarray(new_values[tuple(path)], dtype=old.dtype))
    nnx.update(model, state)
    logging.info("%s: %s", arch, report.summary())
    return report
