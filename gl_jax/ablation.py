"""Trained checkpoints -> the Group Loss++ ablation table, embeddings, pictures.

The library behind `python -m gl_jax.evaluate` (see that module for the command line).
No training: the selected checkpoint of each workdir (``best/``, or
``settings.checkpoint = 'latest'``) is restored (parameters and BatchNorm statistics only)
and the test split is embedded once per model variant. Metrics follow the evaluation
protocol of the trainer (``gl_jax.protocol``), for the plain model and with each Group
Loss++ strategy (``gl_jax.strategies``): each alone and all together. Written to
``settings.output_dir`` (default ``<first workdir>/evaluate``):

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
import json
import os
from typing import Any, Sequence

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
from ml_collections import config_dict
import numpy as np

from gl_jax import checkpoints as ckpt
from gl_jax import evaluation
from gl_jax import metric_writers
from gl_jax import models
from gl_jax import protocol
from gl_jax import runtime
from gl_jax import strategies as glpp
from gl_jax import visualize


# ---------------------------------------------------------------------------- settings
def default_settings() -> ml_collections.ConfigDict:
    """The evaluate command's settings (`--evaluate.<field>=...` on its command line)."""
    c = ml_collections.ConfigDict()
    c.strategies = "auto"     # comma-separated subset of gl_jax.strategies.STRATEGIES; 'auto'
                              # = every one that applies, 'all' = every one (or an error)
    # Group Loss++ values; unset = the dataset's defaults (gl_jax.data.registry).
    c.pool_mix = config_dict.placeholder(float)
    c.leak = config_dict.placeholder(float)
    c.beta = config_dict.placeholder(float)
    c.rerank_k1 = config_dict.placeholder(int)
    c.rerank_k2 = config_dict.placeholder(int)
    c.rerank_lambda = config_dict.placeholder(float)
    c.checkpoint = "best"     # | 'latest'
    c.output_dir = config_dict.placeholder(str)   # unset: <first workdir>/evaluate
    c.nmi = config_dict.placeholder(bool)         # unset: config.evals.nmi
    c.pictures = True         # retrieval.png
    c.num_queries = 8
    c.top_k = 5
    c.thumb = 64              # thumbnail side in pixels
    c.pictures_row = "plain"  # the ranking drawn: 'plain' | 'all'
    c.tsne = True             # tsne.png
    c.tsne_points = 2000
    c.tsne_size = 800
    c.tsne_iterations = 1000  # >= 250
    return c


def settings(**overrides) -> ml_collections.ConfigDict:
    """`default_settings()` with `overrides` (unknown names are errors)."""
    c = default_settings()
    for key, value in overrides.items():
        if key not in c:
            raise ValueError(f"unknown evaluate setting {key!r}; known: {sorted(c)}")
        c[key] = value
    return c


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


def restore_member(workdir: str, config, num_classes: int, mesh, which: str = "best") -> Member:
    """Restores only ``params`` and ``model_state`` of the TrainState (no optimizer state),
    replicated over ``mesh``, into the model that ``config.model`` describes."""
    directory, step = ckpt.find(workdir, which)
    # Shapes only: the checkpoint replaces the initialisation and any `init_from` weights.
    abstract_model = models.abstract_model(**runtime.model_arguments(config, num_classes))
    graphdef, params, model_state = nnx.split(abstract_model, nnx.Param, ...)
    replicated = NamedSharding(mesh, P())
    target = {"params": params, "model_state": model_state}
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          target)
    try:
        restored = ckpt.restore_model(directory, step, target)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"the checkpoint {directory}/{step} does not fit the model of the evaluation config "
            f"(model {config.model.name!r}, embedding_dim {config.model.embedding_dim}, "
            f"{num_classes} training classes): {str(e)[:400]}") from e
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
    replicated = NamedSharding(mesh, P())
    keys = list(jobs)
    # Each member's state goes to the devices once, whatever number of variants use it.
    placed = {m: jax.device_put((members[m].params, members[m].model_state), replicated)
              for m in {m for m, _ in keys}}
    work = [(runtime.Embedder(variant_graphdef(members[m], variant), mesh, jobs[(m, variant)]),
             *placed[m]) for m, variant in keys]
    out = runtime.embed_source(work, source, config, mesh, desc=desc)
    logging.info("%s: embedded %d records with %d model variant(s)", desc, len(source),
                 len(keys))
    embeddings = out.pop("embeddings")
    out.update(zip(keys, embeddings))
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


def check_strategies(requested, members: Sequence[Member], config, num_items: int,
                     flag: str = "--evaluate.strategies"
                     ) -> tuple[tuple[str, ...], dict[str, str]]:
    """(strategies to run, {skipped strategy: reason}).

    ``requested`` None = every strategy that applies (the others are skipped with a
    reason); an explicit list that contains one that does not apply raises ValueError
    naming ``flag``."""
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
        return tuple(s for s in glpp.STRATEGIES if s not in reasons), reasons
    bad = {s: reasons[s] for s in requested if s in reasons}
    if bad:
        raise ValueError(f"{flag} asks for strategies that do not apply: "
                         + "; ".join(f"{s}: {r}" for s, r in bad.items()))
    return tuple(requested), {}


def clamp_rerank(rerank: dict, num_items: int) -> dict:
    """k1 <= N - 1 and k2 <= N for a set of N items (small test sets)."""
    out = dict(rerank)
    out["k1"] = max(1, min(int(out["k1"]), num_items - 1))
    out["k2"] = max(1, min(int(out["k2"]), num_items))
    if out != rerank:
        logging.warning("re-ranking %s clamped to %s for %d items", rerank, out, num_items)
    return out


def make_rows(strategies: Sequence[str], settings: glpp.Settings, plain: Variant,
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
        raw = glpp.flip_average(e["embedding"], e["flipped"]) if row.flip else e["embedding"]
        finals.append(glpp.finalize(raw, row.beta))
    return finals[0] if len(finals) == 1 else glpp.concatenate(finals)


# ------------------------------------------------------------------------------ metrics
def row_metrics(row: Row, embedded: dict, kind: str, config, nmi_cache: dict | None,
                junk_ids: Sequence[int] = ()) -> dict:
    """Metrics of one row. kind: 'retrieval' (test vs itself), 'query_gallery' or 'reid'
    (``junk_ids``: dense labels that are never matches, see ``junk_labels``).

    ``nmi_cache``: None = no NMI; else a dict that memoises NMI per embedding (re-ranking
    changes distances, not the embedding k-means clusters), since k-means is the slow part."""
    parts = {name: dict(part, embedding=row_embedding(row, part))
             for name, part in embedded.items()}
    out = protocol.metrics(kind, parts, config, normalize=False, rerank=row.rerank,
                           junk_ids=junk_ids, nmi=False)
    if kind == "retrieval" and nmi_cache is not None:
        (part,) = parts.values()
        key = (row.variant, row.flip, row.beta, row.members)
        if key not in nmi_cache:
            nmi_cache[key] = evaluation.nmi(part["embedding"], part["label"],
                                            seed=int(config.seed), normalize=False)
        out["nmi"] = nmi_cache[key]
    return out


def format_table(rows: Sequence[dict]) -> str:
    """Markdown: one line per row, a column per metric of the plain row, and the change of
    the first metric (recall@1 or rank@1) against the plain model."""
    skip = {"num_queries", "excluded_queries", "skipped_queries"}
    keys = [k for k in rows[0]["metrics"] if k not in skip]
    main = keys[0]
    base = rows[0]["metrics"][main]
    return metric_writers.markdown_table(
        ["strategy", *keys, f"change of {main}"],
        [[r["name"], *(r["metrics"].get(k, "") for k in keys),
          f"{r['metrics'][main] - base:+.4f}"] for r in rows])


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
def run(config: ml_collections.ConfigDict, workdirs: Sequence[str],
        options: ml_collections.ConfigDict | None = None) -> dict:
    """Evaluates the checkpoints of ``workdirs`` on the test split (see the module docstring).

    Args:
      config: the training config (data, model, evals sections are used).
      workdirs: one or more training workdirs; several make the ensemble.
      options: the evaluate settings (``default_settings()`` documents each field; None =
        the defaults).
    Returns:
      dict with 'rows' ([{'name', 'strategies', 'metrics'}]), 'skipped', 'settings',
      'checkpoints', 'table' (Markdown), 'files' and 'pictures'.
    """
    o = default_settings() if options is None else options
    workdirs = list(workdirs)
    if not workdirs:
        raise ValueError("give at least one --workdir")
    if o.pictures_row not in ("plain", "all"):
        raise ValueError(f"pictures_row must be 'plain' or 'all', got {o.pictures_row!r}")
    checkpoint = o.checkpoint
    requested = glpp.parse_strategies(o.strategies)
    settings = glpp.settings_for(
        str(config.data.name), pool_mix=o.pool_mix, leak=o.leak, beta=o.beta,
        rerank_k1=o.rerank_k1, rerank_k2=o.rerank_k2, rerank_lambda=o.rerank_lambda)
    for w in workdirs:
        ckpt.find(w, checkpoint)   # a missing checkpoint fails before anything loads
    check_same_architecture(config, workdirs)

    mesh = runtime.make_mesh(config.mesh)
    if int(config.evals.batch_size) % mesh.size:
        raise ValueError(f"config.evals.batch_size = {config.evals.batch_size} is not divisible "
                         f"by the {mesh.size} devices of the mesh.")
    splits = runtime.load_splits(config)
    kind, parts = protocol.eval_kind(splits, str(config.data.name))
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
    junk = protocol.junk_labels(splits, kind)
    use_nmi = bool(config.evals.nmi) if o.nmi is None else bool(o.nmi)
    nmi_cache = {} if use_nmi and kind == "retrieval" else None
    results = []
    for row in rows:
        metrics = row_metrics(row, embedded, kind, config, nmi_cache, junk)
        results.append({"name": row.name, "strategies": list(row.strategies), "metrics": metrics})
        logging.info("%s: %s", row.name, metrics)

    table = format_table(results)
    output_dir = o.output_dir or os.path.join(workdirs[0], "evaluate")
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

    if o.pictures:
        row = plain_row if o.pictures_row == "plain" else all_row
        image, info = draw_retrieval(row, embedded, kind, splits, num_queries=o.num_queries,
                                     top_k=o.top_k, thumb=o.thumb, seed=int(config.seed))
        files["retrieval_png"] = os.path.join(output_dir, "retrieval.png")
        image.save(files["retrieval_png"])
        report["pictures"]["retrieval"] = dict(info, row=row.name)
    if o.tsne:
        part = parts[-1]   # 'test', or the gallery of query/gallery datasets
        # Coloured and labelled by the dataset's class names (dense labels restart at 0).
        names = np.asarray(splits[part].class_names)[embedded[part]["label"]]
        image, kept = visualize.tsne_map(
            arrays[f"{part}_embedding"], names, max_points=o.tsne_points,
            size=o.tsne_size, seed=int(config.seed), iterations=o.tsne_iterations)
        files["tsne_png"] = os.path.join(output_dir, "tsne.png")
        image.save(files["tsne_png"])
        report["pictures"]["tsne"] = {"part": part, "points": int(len(kept))}
    files["table_json"] = os.path.join(output_dir, "ablation.json")
    with open(files["table_json"], "w") as f:
        json.dump(report, f, indent=2, default=str)
    return report
