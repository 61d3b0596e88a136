"""What a run needs on the devices, shared by the trainer, the evaluator and experiments.

The mesh and shardings, the configured model, the `TrainState` pytree, the splits of
`config.data`, and the one embedding loop (`embed_source`). Nothing here knows about
stages, losses or the training loop (`gl_jax.train`), or about Group Loss++ tables
(`gl_jax.ablation`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable, Sequence

from absl import logging

import flax
from flax import nnx
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from gl_jax import data as gdata
from gl_jax import models
from gl_jax.data import progress


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # global step (both stages), int32 scalar
    params: Any              # nnx.Param leaves of the model
    model_state: Any         # every other nnx variable (BatchNorm statistics)
    opt_state: Any


# ------------------------------------------------------------------------------ building
def model_arguments(config: ml_collections.ConfigDict, num_classes: int) -> dict:
    """`models.create_model`'s arguments for `config.model` (all but ``rngs``)."""
    m = config.model
    return dict(name=m.name, num_classes=num_classes, embedding_dim=int(m.embedding_dim) or None,
                pooling=m.pooling, pool_mix=float(m.pool_mix),
                leak=None if m.leak < 0 else float(m.leak),
                bn_momentum=None if m.bn_momentum < 0 else float(m.bn_momentum),
                bn_epsilon=None if m.bn_epsilon < 0 else float(m.bn_epsilon),
                dtype=jnp.dtype(m.dtype), cpu_kernels=str(m.cpu_kernels))


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                say: Callable[[str], None] | None = None) -> nnx.Module:
    """The configured backbone + heads, initialised from `config.seed` (and `init_from`;
    `say` is told what it loaded and what kept its initialisation)."""
    m = config.model
    model = models.create_model(**model_arguments(config, num_classes),
                                rngs=nnx.Rngs(int(config.seed)))
    if m.init_from:
        from gl_jax import weights  # only needed when starting from converted weights
        report = weights.load_pretrained(model, m.init_from, arch=m.name)
        if say is not None:
            say(f"init_from {m.init_from}: {report.summary()}")
    return model


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, step: int = 0):
    """Splits `model` into a static graph definition and a `TrainState` pytree."""
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                       model_state=model_state, opt_state=tx.init(params))
    return graphdef, state


def load_splits(config) -> dict:
    """The splits of `config.data`; a missing folder names `config.data.root`."""
    try:
        return gdata.load_splits(config.data)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"config.data.root = {config.data.root!r} ({config.data.name}): "
                                f"{e}") from e


# ------------------------------------------------------------------------------- mesh
def make_mesh(mesh_config) -> Mesh:
    """A one-axis ('data') mesh over `mesh_config.num_devices` devices (-1 or 0: all)."""
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


def abstract(tree):
    """Shape, dtype and sharding of every leaf: an Orbax restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)


def normalize_images(images: jax.Array, normalization: str | None) -> jax.Array:
    """uint8 images [..., 3] -> the network's float32 input, inside a jitted step: the
    same values as the host's `gdata.normalize`, bit for bit (looked up in its table).
    Moving uint8 batches instead of float32 ones takes a quarter of the host's memory
    traffic and of its batch-sized blocks. Any other dtype is taken as normalised already.
    """
    if images.dtype != jnp.uint8:
        return images
    if normalization is None:
        raise ValueError(f"uint8 images {images.shape} need a normalization "
                         "(config.data.normalization) to become the network's input")
    order, table = gdata.normalization_table(normalization)
    table = jnp.asarray(table)
    return jnp.stack([table[images[..., c], j] for j, c in enumerate(order)], axis=-1)


# ----------------------------------------------------------------------------- embedding
def _embed_batch(graphdef, flip: bool, pooled: bool, from_features: bool, params, model_state,
                 images, normalization: str | None = None):
    """Embeddings [B, d] (or, with `pooled`, the pooled backbone features [B, C]) in
    inference mode (BatchNorm running statistics); with `flip` also those of the
    horizontally mirrored images (NHWC: the width axis is 2). `from_features`: `images`
    are pooled backbone features [B, C] and only the head runs. uint8 images are
    normalised first (`normalize_images`)."""
    images = normalize_images(images, normalization)
    model = nnx.merge(graphdef, params, model_state, copy=True)
    model.eval()
    if from_features:
        forward = lambda x: model.head(x)[0]
    else:
        forward = model.pool if pooled else (lambda x: model(x)[0])
    embedding = forward(images)
    if not flip:
        return embedding, embedding
    return embedding, forward(jnp.flip(images, axis=2))


@dataclasses.dataclass(frozen=True)
class Embedder:
    """A jitted embedding step for one model graph, batch-sharded over `mesh`.

    Build it once per graph: calling it with new parameters reuses the compiled step.
    Parameters keep the shardings they arrive with (replicated or `shard_params`).
    `pooled`: the pooled backbone features instead of the embeddings. `from_features`:
    it is fed pooled backbone features (`backbone_features`) and runs only the head."""
    graphdef: Any
    mesh: Mesh
    flip: bool = False
    pooled: bool = False
    from_features: bool = False

    def __post_init__(self):
        if self.from_features and (self.flip or self.pooled):
            raise ValueError("an Embedder fed pooled features can neither flip nor pool")

    @functools.cached_property
    def step(self):
        data = NamedSharding(self.mesh, P("data"))
        return jax.jit(functools.partial(_embed_batch, self.graphdef, self.flip, self.pooled,
                                         self.from_features),
                       static_argnames="normalization", out_shardings=(data, data))


def embed_source(jobs: Sequence[tuple[Embedder, Any, Any]], source, config, mesh: Mesh, *,
                 desc: str = "embed", features: np.ndarray | None = None) -> dict:
    """One pass over `source` embedding every record with each (embedder, params,
    model_state) of `jobs`; every process gets the embeddings of all records.
    `features`: the records' pooled backbone features, fed instead of the images (to
    embedders built with `from_features`).

    Returns {'label', 'camera', 'index': [n], 'embeddings': [{'embedding': [n, d],
    'flipped': [n, d] (only for a flipping embedder)} per job]}; padding rows dropped."""
    batch_size = int(config.evals.batch_size)
    data_sharding = NamedSharding(mesh, P("data"))
    if any(embedder.from_features != (features is not None) for embedder, _, _ in jobs):
        raise ValueError("embed_source: features go with (and only with) from_features "
                         "embedders")
    # uint8 batches, normalised by the embedding step.
    iterator = gdata.make_eval_iterator(source, config.data, batch_size,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count(), features=features,
                                        normalize=False)
    normalization = str(config.data.normalization)

    def gather(x):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    parts = [{"embedding": [], "flipped": []} for _ in jobs]
    meta = {"label": [], "camera": [], "index": [], "mask": []}
    show = bool(config.logging.progress) and jax.process_index() == 0
    for batch in progress.bar(iterator, total=gdata.eval_steps(source, batch_size), desc=desc,
                              disable=not show, leave=False):
        images = jax.make_array_from_process_local_data(data_sharding, batch["image"])
        for out, (embedder, params, model_state) in zip(parts, jobs):
            embedding, mirrored = embedder.step(params, model_state, images,
                                                normalization=normalization)
            out["embedding"].append(gather(embedding))
            if embedder.flip:
                out["flipped"].append(gather(mirrored))
        for name in meta:
            meta[name].append(gather(np.asarray(batch[name])))
    keep = np.concatenate(meta.pop("mask"))
    result: dict = {name: np.concatenate(v)[keep] for name, v in meta.items()}
    result["embeddings"] = [{k: np.concatenate(v)[keep] for k, v in out.items() if v}
                            for out in parts]
    return result


# ------------------------------------------------------------------ frozen-backbone features
# Model fields that do not change what the backbone computes (they only shape the head or
# say how to train it): two runs that differ in these share their backbone features.
_HEAD_FIELDS = ("embedding_dim", "freeze_backbone", "cache_features", "features_dir")


def _features_key(config, source, split: str) -> str:
    """A digest of everything the pooled features of `source` depend on."""
    model = {k: v for k, v in config.model.to_dict().items() if k not in _HEAD_FIELDS}
    data = {k: v for k, v in config.data.to_dict().items() if k not in ("seed", "scan")}
    weights = []
    if config.model.init_from:
        for folder, _, files in sorted(os.walk(config.model.init_from)):
            for name in sorted(files):
                stat = os.stat(os.path.join(folder, name))
                weights.append([os.path.relpath(os.path.join(folder, name),
                                                config.model.init_from),
                                stat.st_size, stat.st_mtime_ns])
    key = {"model": model, "data": data, "split": split, "source": source.name,
           "records": len(source),
           "labels": hashlib.sha1(np.ascontiguousarray(source.labels).tobytes()).hexdigest(),
           "weights": weights,
           # A backbone without init_from is random: its features depend on the seed.
           "seed": None if config.model.init_from else int(config.seed)}
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def backbone_features(graphdef, params, model_state, source, config, mesh: Mesh, *,
                      split: str) -> np.ndarray:
    """The frozen backbone's pooled features [len(source), C] of every record of `source`
    (the eval transform), in index order.

    With `config.model.features_dir` set they are kept there as `.npy` files named by a
    digest of the model and data settings, the weights' files (names, sizes, times) and
    the split, and later runs with the same backbone and data (a sweep over head or loss
    settings) load them instead of running the backbone again."""
    path = ""
    if config.model.features_dir:
        path = os.path.join(config.model.features_dir,
                            f"{split}_{_features_key(config, source, split)}.npy")
        if os.path.isfile(path):
            try:
                features = np.load(path)
            except (OSError, ValueError) as e:
                logging.warning("%s: unreadable (%s); computing the features again", path, e)
            else:
                if features.ndim == 2 and len(features) == len(source):
                    return features
                logging.warning("%s holds %s, not %d rows; computing the features again",
                                path, features.shape, len(source))
    replicated = NamedSharding(mesh, P())
    params, model_state = jax.device_put((params, model_state), replicated)
    out = embed_source([(Embedder(graphdef, mesh, pooled=True), params, model_state)], source,
                       config, mesh, desc=f"backbone features ({split})")
    rows = out["embeddings"][0]["embedding"]
    features = np.zeros((len(source), rows.shape[1]), np.float32)
    features[out["index"]] = rows
    if path and jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{os.getpid()}.tmp.npy"   # a crash leaves no half-written cache
        np.save(partial, features)
        os.replace(partial, path)
    return features
