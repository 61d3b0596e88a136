"""Evaluate trained checkpoints with the Group Loss++ inference strategies, export, draw.

    python -m gl_jax.evaluate --workdir=W                       # config from W/config.json
    python -m gl_jax.evaluate --config=configs/cub200.py --config.data.root=... --workdir=W
    python -m gl_jax.evaluate --workdir=W1 --workdir=W2 --workdir=W3     # an ensemble
    python -m gl_jax.evaluate --workdir=W --strategies=rerank,flip --rerank_k1=30

No training: the selected checkpoint of each workdir (``best/``, or ``--checkpoint=latest``)
is restored (parameters and BatchNorm statistics only) and the test split is embedded once
per model variant. Metrics are those of the trainer (retrieval on 'test'; query vs gallery
for In-Shop; CMC/mAP for re-id), for the plain model and with each Group Loss++ strategy
(``gl_jax.inference``): each alone and all together. Written to ``--output_dir`` (default
``<first workdir>/evaluate``):

* ``ablation.md`` / ``ablation.json``: the table (also printed), the settings, the
  checkpoints used and the strategies skipped with the reason;
* ``embeddings.npz``: for each part P ('test', or 'query' and 'gallery'): ``P_embedding``
  (the plain model, L2-normalised; for an ensemble the first model), ``P_embedding_all``
  (every embedding-side strategy applied: flip, pooling, leak, beta, ensemble; re-ranking
  changes distances, not embeddings), ``P_label``, ``P_camera`` (-1 = unknown), ``P_index``
  (record index in the split); ``parts`` and ``workdirs`` as string arrays;
* ``retrieval.png``: a few queries with their top-k neighbours (green frame = same label,
  red = different); ``tsne.png``: a t-SNE map of the embeddings coloured by class.

The plain model is the model as trained (its configured pooling and leak). Ensemble rows
concatenate the members' L2-normalised (or partially normalised) embeddings.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from gl_jax import data as gdata
from gl_jax import evaluation
from gl_jax import inference
from gl_jax import train
from gl_jax import visualize

REID_DATASETS = ("market1501", "dukemtmc")
CHECKPOINT_DIRS = {"best": "best", "latest": "checkpoints"}


# ----------------------------------------------------------------------------- config
def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config the trainer saved as ``workdir/config.json``."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--workdir={workdir!r}: {path} does not exist; pass --config "
                                "with the training configuration.")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _architecture(config) -> tuple:
    return (str(config.model.name), int(config.model.embedding_dim))


def check_same_architecture(config, workdirs: Sequence[str]) -> None:
    """Every workdir's saved config must have the evaluation config's backbone and embedding
    size: one data pipeline (image size, normalisation) feeds all members."""
    expected = _architecture(config)
    found = {}
    for w in workdirs:
        path = os.path.join(w, "config.json")
        if os.path.isfile(path):
            found[w] = _architecture(load_workdir_config(w))
    differing = {w: a for w, a in found.items() if a != expected}
    if differing:
        listing = "; ".join(f"{w}: model {a[0]!r}, embedding_dim {a[1]}" for w, a in found.items())
        raise ValueError(
            f"the checkpoints have different architectures ({listing}), but the evaluation "
            f"config has model {expected[0]!r}, embedding_dim {expected[1]}: an ensemble (and "
            "one evaluate run) needs one architecture, since one data pipeline feeds every "
            "model. Evaluate them separately.")


# ------------------------------------------------------------------------- checkpoints
@dataclasses.dataclass
class Member:
    """One restored model: static graph, parameters, BatchNorm statistics, where from."""
    workdir: str
    graphdef: Any
    params: Any
    model_state: Any
    checkpoint: str   # e.g. '/w/best/40'


def find_checkpoint(workdir: str, which: str = "best") -> tuple[str, int]:
    """(manager directory, step) of the checkpoint to evaluate.

    which: 'best' (the selected model; falls back to the latest when a run saved none) or
    'latest'. Raises FileNotFoundError naming the workdir when there is none."""
    if which not in CHECKPOINT_DIRS:
        raise ValueError(f"--checkpoint must be one of {sorted(CHECKPOINT_DIRS)}, got {which!r}")
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir={workdir!r} does not exist.")
    order = [which] + (["latest"] if which == "best" else [])
    for kind in order:
        directory = os.path.join(workdir, CHECKPOINT_DIRS[kind])
        if not os.path.isdir(directory):
            continue
        steps = [int(name) for name in os.listdir(directory) if name.isdigit()
                 and os.path.isfile(os.path.join(directory, name, "_CHECKPOINT_METADATA"))]
        if steps:
            if kind != which:
                logging.warning("%s has no %s checkpoint; evaluating the latest (step %d).",
                                workdir, which, max(steps))
            return directory, max(steps)
    raise FileNotFoundError(
        f"--workdir={workdir!r} holds no checkpoint (looked for finished steps in "
        f"{', '.join(os.path.join(workdir, CHECKPOINT_DIRS[k]) for k in order)}); train "
        "there first with `python -m gl_jax.main`.")


def restore_member(workdir: str, config, num_classes: int, mesh, which: str = "best") -> Member:
    """Restores only ``params`` and ``model_state`` of the TrainState (no optimizer state),
    replicated over ``mesh``, into the model that ``config.model`` describes."""
    directory, step = find_checkpoint(workdir, which)
    model_config = ml_collections.ConfigDict(config.to_dict())
    model_config.model.init_from = ""   # the checkpoint replaces any initial weights
    abstract_model = nnx.eval_shape(lambda: train.build_model(model_config, num_classes))
    graphdef, params, model_state = nnx.split(abstract_model, nnx.Param, ...)
    replicated = NamedSharding(mesh, P())
    target = {"params": params, "model_state": model_state}
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          target)
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=replicated), target)
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True)))["state"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"the checkpoint {directory}/{step} does not fit the model of the evaluation config "
            f"(model {config.model.name!r}, embedding_dim {config.model.embedding_dim}, "
            f"{num_classes} training classes): {str(e)[:400]}") from e
    finally:
        manager.close()
    return Member(workdir, graphdef, restored["params"], restored["model_state"],
                  f"{directory}/{step}")


# ------------------------------------------------------------------------ model variants
@dataclasses.dataclass(frozen=True)
class Variant:
    """Model-side switches: pooling ('avg' | 'max' | 'mix'), its lambda, last-block leak."""
    pooling: str
    pool_mix: float
    leak: float | None


def trained_variant(config) -> Variant:
    m = config.model
    return Variant(str(m.pooling), float(m.pool_mix), None if m.leak < 0 else float(m.leak))


def variant_graphdef(member: Member, variant: Variant):
    """The member's graph with the variant's (static) attributes; the state is unchanged."""
    model = nnx.merge(member.graphdef, member.params, member.model_state, copy=True)
    model.set_attributes(pooling=variant.pooling, pool_mix=variant.pool_mix)
    model.backbone.leak = variant.leak
    graphdef, _, _ = nnx.split(model, nnx.Param, ...)
    return graphdef


def _embed_step(graphdef, flip: bool, params, model_state, images):
    """Embeddings [B, d] of a batch in inference mode; with ``flip`` also those of the
    horizontally mirrored images (NHWC: the width axis is 2)."""
    model = nnx.merge(graphdef, params, model_state, copy=True)
    model.eval()
    embedding, _ = model(images)
    if not flip:
        return embedding, embedding
    mirrored, _ = model(jnp.flip(images, axis=2))
    return embedding, mirrored


def feature_map_shape(member: Member, image_size: int) -> tuple[int, ...]:
    """Shape of the backbone's last feature map for one image, without computing it."""
    def fmap(params, model_state, images):
        model = nnx.merge(member.graphdef, params, model_state, copy=True)
        model.eval()
        return model.backbone(images)
    shape = jax.eval_shape(fmap, member.params, member.model_state,
                           jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
    return tuple(shape.shape)


def embed_split(members: Sequence[Member], jobs: dict, source, config, mesh,
                desc: str) -> dict:
    """One pass over ``source``: for each (member index, Variant) in ``jobs`` (value: whether
    flipped embeddings are also needed) the embeddings of every record.

    Returns {'label', 'camera', 'index': [n] arrays, (m, variant): {'embedding': [n, d],
    'flipped': [n, d] (only when asked)}}; padding rows are dropped."""
    batch_size = int(config.evals.batch_size)
    data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    steps = {}
    for (m, variant), flip in jobs.items():
        graphdef = variant_graphdef(members[m], variant)
        steps[(m, variant)] = (flip, jax.jit(
            functools.partial(_embed_step, graphdef, flip),
            in_shardings=(replicated, replicated, data_sharding),
            out_shardings=(data_sharding, data_sharding)))
    parts = {key: {"embedding": [], "flipped": []} for key in steps}
    meta = {"label": [], "camera": [], "index": [], "mask": []}
    iterator = gdata.make_eval_iterator(source, config.data, batch_size,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())

    def gather(x):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    for batch in iterator:
        images = jax.make_array_from_process_local_data(data_sharding, batch["image"])
        for key, (flip, step) in steps.items():
            member = members[key[0]]
            embedding, mirrored = step(member.params, member.model_state, images)
            parts[key]["embedding"].append(gather(embedding))
            if flip:
                parts[key]["flipped"].append(gather(mirrored))
        for name in meta:
            meta[name].append(gather(np.asarray(batch[name])))
    logging.info("%s: embedded %d records with %d model variant(s)", desc, len(source),
                 len(steps))
    keep = np.concatenate(meta.pop("mask"))
    out: dict = {name: np.concatenate(v)[keep] for name, v in meta.items()}
    for key, arrays in parts.items():
        out[key] = {name: np.concatenate(v)[keep] for name, v in arrays.items() if v}
    return out


# --------------------------------------------------------------------------- strategies
@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the ablation table: which model variant, flip, beta, re-ranking, members."""
    name: str
    variant: Variant
    flip: bool = False
    beta: float | None = None
    rerank: dict | None = None
    members: tuple[int, ...] = (0,)
    strategies: tuple[str, ...] = ()


def check_strategies(requested, members: Sequence[Member], config, num_items: int
                     ) -> tuple[tuple[str, ...], dict[str, str]]:
    """(strategies to run, {skipped strategy: reason}).

    ``requested`` None = every strategy that applies (the others are skipped with a
    reason); an explicit list that contains one that does not apply raises ValueError."""
    reasons = {}
    if len(members) < 2:
        reasons["ensemble"] = "needs two or more --workdir (independently trained models)"
    backbone = nnx.merge(members[0].graphdef, members[0].params, members[0].model_state,
                         copy=True).backbone
    if not hasattr(backbone, "leak"):
        reasons["leak"] = (f"backbone {config.model.name!r} has no 'leak' attribute (no "
                           "switchable last activation)")
    shape = feature_map_shape(members[0], int(config.data.image_size))
    if len(shape) != 4 or shape[1] * shape[2] <= 1:
        reasons["pool_mix"] = (
            f"backbone {config.model.name!r} at {config.data.image_size} px ends in a feature "
            f"map of shape {shape}: with one spatial position max and average pooling are "
            "equal, so the pooling mix cannot change anything")
    if num_items < 3:
        reasons["rerank"] = f"k-reciprocal re-ranking needs at least 3 items, got {num_items}"
    if requested is None:
        return tuple(s for s in inference.STRATEGIES if s not in reasons), reasons
    bad = {s: reasons[s] for s in requested if s in reasons}
    if bad:
        raise ValueError("--strategies asks for strategies that do not apply: " + "; ".join(
            f"{s}: {r}" for s, r in bad.items()))
    return tuple(requested), {}


def clamp_rerank(rerank: dict, num_items: int) -> dict:
    """k1 <= N - 1 and k2 <= N for a set of N items (small test sets)."""
    out = dict(rerank)
    out["k1"] = max(1, min(int(out["k1"]), num_items - 1))
    out["k2"] = max(1, min(int(out["k2"]), num_items))
    if out != rerank:
        logging.warning("re-ranking %s clamped to %s for %d items", rerank, out, num_items)
    return out


def make_rows(strategies: Sequence[str], settings: inference.Settings, plain: Variant,
              num_members: int, rerank: dict) -> list[Row]:
    """The plain model, each plain ensemble member, each strategy alone, all together."""
    mix = dataclasses.replace(plain, pooling="mix", pool_mix=settings.pool_mix)
    leak = dataclasses.replace(plain, leak=settings.leak)
    alone = {
        "pool_mix": Row(f"pool mix (lambda {settings.pool_mix:g})", mix),
        "leak": Row(f"leak ({settings.leak:g})", leak),
        "beta": Row(f"partial normalisation (beta {settings.beta:g})", plain, beta=settings.beta),
        "rerank": Row(f"re-ranking (k1 {rerank['k1']}, k2 {rerank['k2']}, lambda "
                      f"{rerank['lambda_value']:g})", plain, rerank=rerank),
        "flip": Row("flip TTA", plain, flip=True),
        "ensemble": Row(f"ensemble ({num_members} models)", plain,
                        members=tuple(range(num_members))),
    }
    rows = [Row("plain", plain)]
    rows += [Row(f"plain (model {m + 1})", plain, members=(m,)) for m in range(1, num_members)]
    rows += [dataclasses.replace(alone[s], strategies=(s,)) for s in strategies]
    if strategies:
        rows.append(Row(
            "all: " + " + ".join(strategies),
            Variant("mix" if "pool_mix" in strategies else plain.pooling,
                    settings.pool_mix if "pool_mix" in strategies else plain.pool_mix,
                    settings.leak if "leak" in strategies else plain.leak),
            flip="flip" in strategies,
            beta=settings.beta if "beta" in strategies else None,
            rerank=rerank if "rerank" in strategies else None,
            members=tuple(range(num_members)) if "ensemble" in strategies else (0,),
            strategies=tuple(strategies)))
    return rows


def jobs_for(rows: Sequence[Row]) -> dict:
    """(member, variant) -> whether flipped embeddings are needed, over all rows."""
    jobs: dict = {}
    for row in rows:
        for m in row.members:
            jobs[(m, row.variant)] = jobs.get((m, row.variant), False) or row.flip
    return jobs


def row_embedding(row: Row, embedded: dict) -> np.ndarray:
    """The row's final embedding of one part: per member flip-average (if asked), then L2
    or partial normalisation, then the members side by side."""
    finals = []
    for m in row.members:
        e = embedded[(m, row.variant)]
        raw = inference.flip_average(e["embedding"], e["flipped"]) if row.flip else e["embedding"]
        finals.append(inference.finalize(raw, row.beta))
    return finals[0] if len(finals) == 1 else inference.concatenate(finals)


# ------------------------------------------------------------------------------ metrics
def _ks(config, limit: int) -> tuple[int, ...]:
    ks = tuple(int(k) for k in config.evals.ks if int(k) <= limit)
    if not ks:
        raise ValueError(f"config.evals.ks = {tuple(config.evals.ks)}: every K exceeds {limit}, "
                         "the number of items to rank")
    return ks


def row_metrics(row: Row, embedded: dict, kind: str, config, nmi_cache: dict | None,
                junk_ids: Sequence[int] = ()) -> dict:
    """Metrics of one row. kind: 'retrieval' (test vs itself), 'query_gallery' or 'reid'
    (``junk_ids``: dense labels that are never matches, see ``junk_labels``).

    ``nmi_cache``: None = no NMI; else a dict that memoises NMI per embedding (re-ranking
    changes distances, not the embedding k-means clusters), since k-means is the slow part."""
    if kind == "retrieval":
        test = embedded["test"]
        n = len(test["label"])
        embedding = row_embedding(row, test)
        out = evaluation.retrieval_metrics(
            embedding, test["label"], ks=_ks(config, n - 1), nmi=False, normalize=False,
            rerank=row.rerank)
        if nmi_cache is not None:
            key = (row.variant, row.flip, row.beta, row.members)
            if key not in nmi_cache:
                nmi_cache[key] = evaluation.nmi(embedding, test["label"], seed=int(config.seed),
                                                normalize=False)
            out["nmi"] = nmi_cache[key]
        return out
    query, gallery = embedded["query"], embedded["gallery"]
    q, g = row_embedding(row, query), row_embedding(row, gallery)
    ks = _ks(config, len(gallery["label"]))
    if kind == "reid":
        return evaluation.reid_metrics(q, query["label"], query["camera"], g, gallery["label"],
                                       gallery["camera"], ranks=ks, normalize=False,
                                       rerank=row.rerank, junk_ids=junk_ids)
    return evaluation.retrieval_metrics_query_gallery(q, query["label"], g, gallery["label"],
                                                      ks=ks, normalize=False, rerank=row.rerank)


def eval_kind(splits: dict, config) -> tuple[str, tuple[str, ...]]:
    """('retrieval', ('test',)) or ('query_gallery' | 'reid', ('query', 'gallery'))."""
    if "test" in splits:
        return "retrieval", ("test",)
    if "query" not in splits or "gallery" not in splits:
        raise ValueError(f"dataset {config.data.name!r} has neither a 'test' split nor "
                         f"'query' and 'gallery' splits (has {sorted(splits)})")
    cameras = splits["query"].cameras
    if config.data.name in REID_DATASETS and cameras is not None and cameras.min() >= 0:
        return "reid", ("query", "gallery")
    return "query_gallery", ("query", "gallery")


def junk_labels(splits: dict, parts: Sequence[str]) -> tuple[int, ...]:
    """Dense labels of the re-id ids that are never matches (Market/Duke person 0000, the
    distractors, and -1, junk): the splits carry dense labels 0..C-1, so the raw ids 0 and
    -1 must be looked up in ``class_names`` (the dense label 0 is a real person when the
    set has no distractor)."""
    return gdata.reid_junk_labels(splits[parts[0]])


def format_table(rows: Sequence[dict]) -> str:
    """Markdown: one line per row, a column per metric of the plain row, and the change of
    the first metric (recall@1 or rank@1) against the plain model."""
    skip = {"num_queries", "excluded_queries", "skipped_queries"}
    keys = [k for k in rows[0]["metrics"] if k not in skip]
    main = keys[0]
    base = rows[0]["metrics"][main]
    lines = ["| strategy | " + " | ".join(keys) + f" | change of {main} |",
             "|---|" + "---|" * (len(keys) + 1)]
    for r in rows:
        m = r["metrics"]
        cells = [f"{m[k]:.4f}" if isinstance(m.get(k), float) else str(m.get(k, "")) for k in keys]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {m[main] - base:+.4f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ pictures
def draw_retrieval(row: Row, embedded: dict, kind: str, splits: dict, *, num_queries: int,
                   top_k: int, thumb: int, seed: int):
    """The picture of ``row``'s top-k neighbours for a few random queries.

    Returns (image, {'queries', 'neighbours' (record indices in the query / gallery split),
    'correct'})."""
    if kind == "retrieval":
        query_part, gallery_part = embedded["test"], None
        query_source = gallery_source = splits["test"]
    else:
        query_part, gallery_part = embedded["query"], embedded["gallery"]
        query_source, gallery_source = splits["query"], splits["gallery"]
    q = row_embedding(row, query_part)
    g = None if gallery_part is None else row_embedding(row, gallery_part)
    n_gallery = len(q) - 1 if g is None else len(g)
    top_k = min(int(top_k), n_gallery)
    picked = np.sort(np.random.default_rng(seed).choice(
        len(q), size=min(int(num_queries), len(q)), replace=False))
    if row.rerank is not None:
        _, neighbours = evaluation.k_reciprocal_rerank(q, g, top_k=top_k, normalize=False,
                                                       **row.rerank)
    else:
        _, neighbours = evaluation.knn(q, g, k=top_k, normalize=False)
    neighbours = np.asarray(neighbours)[picked]
    gallery_labels = (query_part if gallery_part is None else gallery_part)["label"]
    gallery_index = (query_part if gallery_part is None else gallery_part)["index"]
    correct = gallery_labels[neighbours] == query_part["label"][picked, None]
    query_records = query_part["index"][picked]
    neighbour_records = gallery_index[neighbours]
    image = visualize.retrieval_grid(
        [query_source.load_pil(int(i)) for i in query_records],
        [[gallery_source.load_pil(int(i)) for i in row_] for row_ in neighbour_records],
        correct, thumb=thumb)
    return image, {"queries": query_records.tolist(), "neighbours": neighbour_records.tolist(),
                   "correct": correct.tolist()}


# ------------------------------------------------------------------------------- driver
def evaluate(config: ml_collections.ConfigDict, workdirs: Sequence[str], *,
             strategies=None, pool_mix: float | None = None, leak: float | None = None,
             beta: float | None = None, rerank_k1: int | None = None,
             rerank_k2: int | None = None, rerank_lambda: float | None = None,
             checkpoint: str = "best", output_dir: str | None = None, nmi: bool | None = None,
             pictures: bool = True, num_queries: int = 8, top_k: int = 5, thumb: int = 64,
             pictures_row: str = "plain", tsne: bool = True, tsne_points: int = 2000,
             tsne_size: int = 800, tsne_iterations: int = 1000) -> dict:
    """Evaluates the checkpoints of ``workdirs`` on the test split (see the module docstring).

    Args:
      config: the training config (data, model, evals sections are used).
      workdirs: one or more training workdirs; several make the ensemble.
      strategies: None / 'auto' = every Group Loss++ strategy that applies; or a list /
        comma-separated string of names from ``gl_jax.inference.STRATEGIES``.
      pool_mix, leak, beta, rerank_k1, rerank_k2, rerank_lambda: override the dataset's
        defaults (``gl_jax.inference.DEFAULTS``); None keeps them.
      checkpoint: 'best' (the selected model) or 'latest'.
      output_dir: where files go; default ``<workdirs[0]>/evaluate``.
      nmi: compute NMI (retrieval sets); None = ``config.evals.nmi``.
      pictures, num_queries, top_k, thumb, pictures_row: the retrieval picture, drawn for
        the row named ``pictures_row`` ('plain' or 'all').
      tsne, tsne_points, tsne_size, tsne_iterations: the t-SNE map of the plain embeddings
        (at most ``tsne_points`` of them, a ``tsne_size`` square).
    Returns:
      dict with 'rows' ([{'name', 'strategies', 'metrics'}]), 'skipped', 'settings',
      'checkpoints', 'table' (Markdown), 'files' and 'pictures'.
    """
    workdirs = list(workdirs)
    if not workdirs:
        raise ValueError("give at least one --workdir")
    if pictures_row not in ("plain", "all"):
        raise ValueError(f"pictures_row must be 'plain' or 'all', got {pictures_row!r}")
    requested = inference.parse_strategies(strategies)
    settings = inference.settings_for(
        str(config.data.name), pool_mix=pool_mix, leak=leak, beta=beta, rerank_k1=rerank_k1,
        rerank_k2=rerank_k2, rerank_lambda=rerank_lambda)
    for w in workdirs:
        find_checkpoint(w, checkpoint)   # a missing checkpoint fails before anything loads
    check_same_architecture(config, workdirs)

    mesh = train.make_mesh(config.mesh)
    if int(config.evals.batch_size) % mesh.size:
        raise ValueError(f"config.evals.batch_size = {config.evals.batch_size} is not divisible "
                         f"by the {mesh.size} devices of the mesh.")
    splits = train.load_splits(config)
    kind, parts = eval_kind(splits, config)
    num_items = sum(len(splits[p]) for p in parts)
    members = [restore_member(w, config, splits["train"].num_classes, mesh, checkpoint)
               for w in workdirs]
    chosen, skipped = check_strategies(requested, members, config, num_items)
    for s, reason in skipped.items():
        logging.info("strategy %s skipped: %s", s, reason)
    rerank = clamp_rerank(settings.rerank, num_items)
    rows = make_rows(chosen, settings, trained_variant(config), len(members), rerank)

    jobs = jobs_for(rows)
    embedded = {p: embed_split(members, jobs, splits[p], config, mesh, f"embed {p}")
                for p in parts}
    junk = junk_labels(splits, parts) if kind == "reid" else ()
    use_nmi = bool(config.evals.nmi) if nmi is None else bool(nmi)
    nmi_cache = {} if use_nmi and kind == "retrieval" else None
    results = []
    for row in rows:
        metrics = row_metrics(row, embedded, kind, config, nmi_cache, junk)
        results.append({"name": row.name, "strategies": list(row.strategies), "metrics": metrics})
        logging.info("%s: %s", row.name, metrics)

    table = format_table(results)
    output_dir = output_dir or os.path.join(workdirs[0], "evaluate")
    is_main = jax.process_index() == 0
    files: dict[str, str] = {}
    report = {
        "dataset": str(config.data.name), "kind": kind,
        "checkpoints": [m.checkpoint for m in members],
        "settings": dataclasses.asdict(settings), "rerank_used": rerank,
        "skipped": skipped, "junk_labels": list(junk), "rows": results, "table": table,
        "files": files, "pictures": {}}
    if not is_main:
        return report
    os.makedirs(output_dir, exist_ok=True)
    skipped_text = "".join(f"\n- skipped {s}: {r}" for s, r in skipped.items())
    markdown = (f"# Group Loss++ ablation: {config.data.name} ({kind})\n\n"
                f"Checkpoints: {', '.join(report['checkpoints'])}\n\n"
                f"Settings ({settings.source}): pool_mix {settings.pool_mix:g}, leak "
                f"{settings.leak:g}, beta {settings.beta:g}, re-ranking {rerank}\n\n"
                f"{table}\n{skipped_text}\n")
    files["table_md"] = os.path.join(output_dir, "ablation.md")
    with open(files["table_md"], "w") as f:
        f.write(markdown)
    print(markdown, flush=True)

    files["embeddings"] = os.path.join(output_dir, "embeddings.npz")
    plain_row, all_row = rows[0], rows[-1]
    arrays = {"parts": np.asarray(parts), "workdirs": np.asarray(workdirs)}
    for p in parts:
        arrays[f"{p}_embedding"] = row_embedding(plain_row, embedded[p])
        arrays[f"{p}_embedding_all"] = row_embedding(dataclasses.replace(all_row, rerank=None),
                                                     embedded[p])
        for name in ("label", "camera", "index"):
            arrays[f"{p}_{name}"] = embedded[p][name]
    np.savez(files["embeddings"], **arrays)

    if pictures:
        row = plain_row if pictures_row == "plain" else all_row
        image, info = draw_retrieval(row, embedded, kind, splits, num_queries=num_queries,
                                     top_k=top_k, thumb=thumb, seed=int(config.seed))
        files["retrieval_png"] = os.path.join(output_dir, "retrieval.png")
        image.save(files["retrieval_png"])
        report["pictures"]["retrieval"] = dict(info, row=row.name)
    if tsne:
        part = parts[-1]   # 'test', or the gallery of query/gallery datasets
        # Coloured and labelled by the dataset's class names (dense labels restart at 0).
        names = np.asarray(splits[part].class_names)[embedded[part]["label"]]
        image, kept = visualize.tsne_map(
            arrays[f"{part}_embedding"], names, max_points=tsne_points,
            size=tsne_size, seed=int(config.seed), iterations=tsne_iterations)
        files["tsne_png"] = os.path.join(output_dir, "tsne.png")
        image.save(files["tsne_png"])
        report["pictures"]["tsne"] = {"part": part, "points": int(len(kept))}
    files["table_json"] = os.path.join(output_dir, "ablation.json")
    with open(files["table_json"], "w") as f:
        json.dump(report, f, indent=2, default=str)
    return report


# ---------------------------------------------------------------------------- command line
def _define_flags():
    # Defined only when run as a program, so that importing this module next to
    # gl_jax.main (which also has --config and --workdir) cannot clash.
    from absl import flags
    from ml_collections import config_flags
    flags.DEFINE_multi_string("workdir", None, "Training workdir(s); several = an ensemble.")
    config_flags.DEFINE_config_file("config", None, "Training config file; default: the "
                                    "first workdir's config.json.", lock_config=False)
    flags.DEFINE_string("strategies", "auto", "Comma-separated subset of "
                        f"{','.join(inference.STRATEGIES)}; 'auto' = every one that applies.")
    flags.DEFINE_float("pool_mix", None, "Pooling mix lambda (default: per dataset).")
    flags.DEFINE_float("leak", None, "Last-block leak slope (default: per dataset).")
    flags.DEFINE_float("beta", None, "Partial normalisation beta (default: per dataset).")
    flags.DEFINE_integer("rerank_k1", None, "Re-ranking k1 (default: per dataset).")
    flags.DEFINE_integer("rerank_k2", None, "Re-ranking k2 (default: per dataset).")
    flags.DEFINE_float("rerank_lambda", None, "Re-ranking lambda (default: per dataset).")
    flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to evaluate.")
    flags.DEFINE_string("output_dir", None, "Output folder; default <first workdir>/evaluate.")
    flags.DEFINE_bool("nmi", None, "Compute NMI (default: config.evals.nmi).")
    flags.DEFINE_bool("pictures", True, "Draw retrieval.png.")
    flags.DEFINE_integer("num_queries", 8, "Queries in retrieval.png.")
    flags.DEFINE_integer("top_k", 5, "Neighbours per query in retrieval.png.")
    flags.DEFINE_integer("thumb", 64, "Thumbnail size in pixels.")
    flags.DEFINE_enum("pictures_row", "plain", ["plain", "all"], "Ranking drawn in retrieval.png.")
    flags.DEFINE_bool("tsne", True, "Draw tsne.png.")
    flags.DEFINE_integer("tsne_points", 2000, "Most points in the t-SNE map.")
    flags.DEFINE_integer("tsne_size", 800, "Side of tsne.png in pixels.")
    flags.DEFINE_integer("tsne_iterations", 1000, "t-SNE iterations (>= 250).")
    flags.mark_flag_as_required("workdir")
    return flags.FLAGS


def main(argv):
    from absl import app
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    FLAGS = _FLAGS
    for w in FLAGS.workdir:   # a clear message about a bad workdir comes first
        find_checkpoint(w, FLAGS.checkpoint)
    config = FLAGS.config if FLAGS.config is not None else load_workdir_config(FLAGS.workdir[0])
    evaluate(config, FLAGS.workdir, strategies=FLAGS.strategies, pool_mix=FLAGS.pool_mix,
             leak=FLAGS.leak, beta=FLAGS.beta, rerank_k1=FLAGS.rerank_k1,
             rerank_k2=FLAGS.rerank_k2, rerank_lambda=FLAGS.rerank_lambda,
             checkpoint=FLAGS.checkpoint, output_dir=FLAGS.output_dir, nmi=FLAGS.nmi,
             pictures=FLAGS.pictures, num_queries=FLAGS.num_queries, top_k=FLAGS.top_k,
             thumb=FLAGS.thumb, pictures_row=FLAGS.pictures_row, tsne=FLAGS.tsne,
             tsne_points=FLAGS.tsne_points, tsne_size=FLAGS.tsne_size,
             tsne_iterations=FLAGS.tsne_iterations)


if __name__ == "__main__":
    from absl import app
    _FLAGS = _define_flags()
    app.run(main)
