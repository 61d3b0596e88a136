"""Command line and library: a trained workdir's embedding function, serialised with
`jax.export` for serving with plain JAX (no gl_jax, Flax or Orbax needed to run it).

    python -m gl_jax.export --workdir=W --output=model.jaxexport [--checkpoint=best|latest]

Writes two files:

* ``model.jaxexport``: ``jax.export``'s serialisation of ``embed(images)``: uint8 RGB
  images [B, S, S, 3] (B any batch size, S = the run's ``data.image_size``) -> float32
  L2-normalised embeddings [B, d]. The run's normalisation, the model in inference mode
  (BatchNorm running statistics) and the checkpoint's parameters are inside it: the
  computation of the trainer's evaluation (``runtime.Embedder``), then the L2
  normalisation its metrics apply. Lowered for CPU, CUDA, ROCm and TPU (``--platforms``).
* ``model.jaxexport.json``: what a server needs to prepare the images (the eval
  transform's resize and crop, done before the function), the normalisation it applies,
  the embedding size, the backbone, the checkpoint step and the sha256 of the run's
  config.json (``describe`` below lists the fields).

Load and call it without gl_jax::

    exported = jax.export.deserialize(open("model.jaxexport", "rb").read())
    embeddings = exported.call(images_uint8)
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gl_jax import ablation
from gl_jax import checkpoints as ckpt
from gl_jax import cli
from gl_jax import runtime
from gl_jax.data import transforms

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- metadata
def normalization_info(name: str) -> dict:
    """What ``gl_jax.data``'s normalisation ``name`` does to uint8 RGB pixels x (0-255):
    network input channel j = (x[..., channel_order[j]] - mean[j]) / std[j]."""
    rgb, bgr = [0, 1, 2], [2, 1, 0]
    presets = {
        "caffe_bgr": (bgr, transforms.CAFFE_BGR_MEAN, np.ones(3)),
        "imagenet": (rgb, 255.0 * transforms.IMAGENET_MEAN.astype(np.float64),
                     255.0 * transforms.IMAGENET_STD.astype(np.float64)),
        "tf_lite": (rgb, np.full(3, 127.0), np.full(3, 128.0)),
        "unit": (rgb, np.zeros(3), np.full(3, 255.0)),
    }
    if name not in presets:
        raise ValueError(f"data.normalization={name!r} is not one of {tuple(presets)}")
    order, mean, std = presets[name]
    # 6 decimals: the float32 constants times 255 (0.485 -> 123.67499...) print as meant.
    return {"name": name, "pixel_range": [0, 255], "channel_order": order,
            "mean": [round(float(v), 6) for v in mean],
            "std": [round(float(v), 6) for v in std],
            "formula": "input[..., j] = (x[..., channel_order[j]] - mean[j]) / std[j]"}


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def describe(config, workdir: str, checkpoint: str, requested: str, exported,
             output: str) -> dict:
    """The JSON written beside the exported function."""
    data = config.data
    size, resize = int(data.image_size), int(data.resize_size)
    interpolation = str(data.get("interpolation", "bilinear"))
    embedding_dim = int(exported.out_avals[0].shape[-1])
    return {
        "format": "jax.export", "format_version": FORMAT_VERSION,
        "file": os.path.basename(output),
        "input": {"shape": ["b", size, size, 3], "dtype": "uint8", "layout": "NHWC",
                  "channels": "RGB"},
        "output": {"shape": ["b", embedding_dim], "dtype": "float32", "l2_normalized": True},
        "image_size": size,
        "resize": {
            "resize_size": resize, "crop_size": size, "interpolation": interpolation,
            "rule": (f"shorter side to {resize} px ({interpolation}; the longer side scaled "
                     f"by the same factor and truncated to an integer), then the centre "
                     f"{size} x {size} crop (offsets rounded); gl_jax.data.eval_transform"),
        },
        "normalization": normalization_info(str(data.normalization)),
        "embedding_dim": embedding_dim,
        "backbone": str(config.model.name),
        "pooling": str(config.model.pooling),
        "checkpoint": {"requested": requested, "step": int(os.path.basename(checkpoint)),
                       "path": os.path.relpath(checkpoint, os.path.abspath(workdir))},
        "dataset": str(data.name),
        "config_sha256": file_sha256(os.path.join(workdir, "config.json")),
        "platforms": list(exported.platforms),
        "jax_version": jax.__version__,
        "calling_convention_version": int(exported.calling_convention_version),
    }


# -------------------------------------------------------------------------- the function
def l2_normalize(x: jax.Array) -> jax.Array:
    """Rows over max(|x|, 1e-12): ``gl_jax.evaluation``'s normalisation, in JAX."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embedding_function(member: ablation.Member, normalization: str):
    """uint8 images [B, S, S, 3] -> L2-normalised float32 embeddings [B, d], with the
    member's parameters and BatchNorm statistics as constants."""
    # Host copies: the exported module then holds plain constants, tied to no device.
    params, model_state = jax.tree.map(np.asarray, (member.params, member.model_state))

    def embed(images: jax.Array) -> jax.Array:
        # The evaluator's own step (inference mode, the run's normalisation), so that the
        # exported embeddings are the ones the trainer's metrics saw.
        raw, _ = runtime._embed_batch(member.graphdef, False, False, False, params,
                                      model_state, images, normalization)
        return l2_normalize(raw.astype(jnp.float32))
    return embed


def check_workdir(workdir: str, checkpoint: str = "best") -> None:
    """A missing workdir, checkpoint or config.json, named before anything loads."""
    ckpt.find(workdir, checkpoint)
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise FileNotFoundError(f"--workdir={workdir!r} has checkpoints but no config.json "
                                "(written by `python -m gl_jax.main` at the start of a run).")


def restore(workdir: str, checkpoint: str = "best"):
    """(config, Member) of a training workdir's selected checkpoint, on one device."""
    config = ablation.load_workdir_config(workdir)
    mesh = runtime.make_mesh(ml_collections.ConfigDict({"num_devices": 1}))
    # num_classes 0: no classifier, whose weights the embedding does not use; the restore
    # is partial, so the checkpoint's classifier is left where it is.
    return config, ablation.restore_member(workdir, config, 0, mesh, checkpoint)


def export_function(embed, image_size: int, platforms: Sequence[str] = PLATFORMS):
    """``jax.export.Exported`` of ``embed`` for uint8 [b, S, S, 3] with a symbolic b."""
    batch = jax.export.symbolic_shape("b")[0]
    spec = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8)
    return jax.export.export(jax.jit(embed), platforms=tuple(platforms))(spec)


# ------------------------------------------------------------------------------ files
def check_output(output: str, flag: str = "--output", example: str = "model.jaxexport") -> str:
    """The folder of ``output`` (created if missing), after checking that it takes files:
    a bad ``flag`` fails before the restore and the work, not after them."""
    if not output:
        raise ValueError(f"{flag} is empty: give the file to write, e.g. {example}")
    if os.path.isdir(output):
        raise ValueError(f"{flag}={output!r} is a folder: give a file name, e.g. "
                         f"{os.path.join(output, example)}")
    folder = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(folder, exist_ok=True)
        # A real write: os.access says yes to root even on a read-only file system.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise PermissionError(f"{flag}={output!r}: cannot write to {folder} "
                              f"({e.strerror or e}).") from e
    return folder


def _write(path: str, payload: bytes) -> None:
    """Whole or not at all: a reader never finds a half-written file at ``path``."""
    partial = f"{path}.{os.getpid()}.tmp"
    try:
        with open(partial, "wb") as f:
            f.write(payload)
        os.replace(partial, path)
    except OSError as e:
        if os.path.exists(partial):
            os.remove(partial)
        raise PermissionError(f"cannot write {path}: {e.strerror or e}") from e


def _serialize(exported) -> bytes:
    try:
        return bytes(exported.serialize())
    except ImportError as e:   # jax leaves the flatbuffers package to its users
        raise ValueError(f"jax.export cannot serialise: {e} (pip install flatbuffers)") from e


def export_embedding(workdir: str, output: str, checkpoint: str = "best", *,
                     platforms: Sequence[str] = PLATFORMS) -> dict:
    """Writes ``output`` (the serialised embedding function of ``workdir``'s checkpoint)
    and ``output + '.json'`` (its metadata, returned). See the module docstring."""
    if isinstance(platforms, str):
        platforms = platforms.split(",")
    platforms = tuple(p.strip().lower() for p in platforms if p.strip())
    unknown = sorted(set(platforms) - set(PLATFORMS))
    if not platforms or unknown:
        raise ValueError(f"platforms must be some of {PLATFORMS}, got {list(platforms)}")
    check_workdir(workdir, checkpoint)
    check_output(output)
    config, member = restore(workdir, checkpoint)
    embed = embedding_function(member, str(config.data.normalization))
    exported = export_function(embed, int(config.data.image_size), platforms)
    info = describe(config, workdir, member.checkpoint, checkpoint, exported, output)
    _write(output, _serialize(exported))
    _write(output + ".json", (json.dumps(info, indent=2) + "\n").encode())
    return info


# ----------------------------------------------------------------------- command line
def _define_flags() -> None:
    """Only when run as a command: importing the library leaves absl's flags alone."""
    flags.DEFINE_string("workdir", None, "Training workdir (with config.json and checkpoints).")
    flags.DEFINE_string("output", None, "File to write, e.g. model.jaxexport; the metadata "
                        "goes beside it as <output>.json.")
    flags.DEFINE_enum("checkpoint", "best", sorted(ckpt.KINDS), "Which checkpoint: the best "
                      "(falls back to the latest when the run saved none) or the latest.")
    flags.DEFINE_list("platforms", list(PLATFORMS), "Platforms to lower for.")
    flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    options = flags.FLAGS
    info = export_embedding(options.workdir, options.output, options.checkpoint,
                            platforms=options.platforms)
    print(f"wrote {options.output} and {options.output}.json: {info['backbone']} at step "
          f"{info['checkpoint']['step']} ({info['checkpoint']['path']}), uint8 "
          f"[b, {info['image_size']}, {info['image_size']}, 3] -> float32 "
          f"[b, {info['embedding_dim']}]", flush=True)


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
