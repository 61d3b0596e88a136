"""Command line and library: the nearest images of query images in an index.

    python -m gl_jax.search --index=OUT.npz --query=IMG [--query=IMG2 ...] [--k=10]
        [--workdir=W] [--picture=grid.png] [--backend=exact|faiss] [--output=found.json]

``--index``: a file written by ``python -m gl_jax.embed`` (or ``gl_jax.Index.save``).
``--query``: anything ``gl_jax.embed``'s ``--images`` takes (an image, a folder, a list
file, ``split:NAME`` or ``split:NAME:I`` of the run's dataset); each image is a query.

The queries are embedded by the index's own model: the workdir and checkpoint it
remembers (``--workdir`` for a copy elsewhere), with the same Group Loss++ switches and
normalisation. A workdir whose config.json differs from the one the index was made with,
or whose checkpoint has moved on to another step, is refused: their embeddings would not
be comparable. Images of any size are fine: the run's eval transform resizes and crops
them exactly as it did the index's images.

For each query the k nearest index entries are printed with their Euclidean distances
between L2-normalised embeddings (the evaluation's ranking; cosine similarity =
1 - d^2 / 2). A query that is itself in the index (the same file, or the same split
record) is left out of its own neighbours, as the evaluation's Recall@K leaves the query
out (``--noexclude_self`` keeps it). ``--picture`` draws the queries and their neighbours
(the evaluator's retrieval grid, with a legend); ``--output`` writes them as JSON.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

from absl import app
from absl import flags
import numpy as np
from PIL import Image, ImageDraw

from gl_jax import ablation
from gl_jax import checkpoints as ckpt
from gl_jax import cli
from gl_jax import embed
from gl_jax import export
from gl_jax import visualize
from gl_jax import xla_flags
from gl_jax import data as gdata
from gl_jax.index import BACKENDS, Index, Neighbours

UNKNOWN = (150, 150, 150)   # frame of a neighbour whose class (or the query's) is unknown


@dataclasses.dataclass
class Found:
    """What a search found: for query i, ``names[i]``, ``classes[i]`` (None: unknown),
    ``excluded[i]`` (its own index row left out, -1: none) and its neighbours
    (``neighbours.*[i]``, nearest first)."""
    index: Index
    names: list
    classes: list
    excluded: np.ndarray
    neighbours: Neighbours
    queries: list   # (embed.Images, record) of each query, to draw it


# ----------------------------------------------------------------------------- the model
def _check_same_model(index: Index, index_path: str, workdir: str, given: bool) -> str:
    """Refuses a workdir whose model is not the index's; returns the checkpoint kind."""
    model = index.model or {}
    requested = (model.get("checkpoint") or {}).get("requested", "best")
    try:
        export.check_workdir(workdir, requested)
    except FileNotFoundError as e:
        if given:
            raise
        raise FileNotFoundError(f"{e} (the workdir the index {index_path} was embedded "
                                "with; --workdir=... names a copy elsewhere)") from e
    digest = export.file_sha256(os.path.join(workdir, "config.json"))
    if digest != model.get("config_sha256"):
        raise ValueError(
            f"--index={index_path} was embedded by another model: its config.json had sha256 "
            f"{str(model.get('config_sha256'))[:12]}... ({model.get('workdir')}), "
            f"{os.path.join(workdir, 'config.json')} has {digest[:12]}...: embed the images "
            f"with this workdir first (python -m gl_jax.embed --workdir={workdir} ...)")
    _, step = ckpt.find(workdir, requested)
    if step != model.get("step"):
        raise ValueError(
            f"--index={index_path} was embedded by step {model.get('step')} of {workdir}, "
            f"whose {requested} checkpoint is now step {step}: embed the images again "
            "(python -m gl_jax.embed) to search with this one")
    return requested


def index_workdir(index: Index, index_path: str, workdir: str | None = None
                  ) -> tuple[str, str]:
    """(workdir, checkpoint kind) of the model that embedded ``index``: its own, or
    ``workdir``, checked to hold the same model (config digest, checkpoint step)."""
    model = index.model or {}
    if not workdir and not model.get("workdir"):
        raise ValueError(f"--index={index_path} does not say which model embedded it (made "
                         "without gl_jax.embed's model identity): give --workdir")
    workdir = workdir or model["workdir"]
    return workdir, _check_same_model(index, index_path, workdir,
                                      given=workdir != model.get("workdir"))


def index_model(index: Index, workdir: str, checkpoint: str) -> embed.Model:
    """The index's model restored from ``workdir``, with the index's Group Loss++
    switches (``index_workdir`` checks the workdir first)."""
    settings = (index.model or {}).get("embedding") or {}
    return embed.load_model(workdir, checkpoint, settings.get("strategies") or (),
                            pool_mix=settings.get("pool_mix"), leak=settings.get("leak"))


# ------------------------------------------------------------------------------ queries
def _resolve(specs: Sequence[str], config) -> list[embed.Images]:
    found = [embed.resolve_images(spec, config, what="--query") for spec in specs]
    for images in found:   # an unreadable query is an error, whatever the index skipped
        if images.stats is not None:
            bad = {n: s for n, s in zip(images.names, images.stats) if isinstance(s, str)}
            if bad:
                raise embed.unreadable_error(f"--query={images.spec}", bad, len(images.names),
                                             skippable=False)
    return found


def _embed_queries(model: embed.Model, found: list[embed.Images],
                   show_progress: bool) -> np.ndarray:
    vectors = []
    for images in found:
        rows, done = model.embed(images.source, show_progress=show_progress)
        missing = np.setdiff1d(np.arange(len(images.names)), done)
        if len(missing):
            reasons = embed.decode_problems(images.source, missing)
            raise embed.unreadable_error(f"--query={images.spec}",
                                         {images.names[i]: r for i, r in reasons.items()},
                                         len(images.names), skippable=False)
        vectors.append(rows)
    return np.concatenate(vectors)


def search_images(index: Index | str, queries: Sequence[str], k: int, *,
                  workdir: str | None = None, backend: str = "exact",
                  exclude_self: bool = True, show_progress: bool = False,
                  index_name: str | None = None) -> Found:
    """The ``k`` nearest entries of ``index`` (an Index or its file) for every image that
    ``queries`` name, embedded by the index's model (see the module docstring).
    ``index_name``: how messages name the index (default: its file, or 'the index')."""
    index_path = index_name or (index if isinstance(index, str) else "the index")
    if isinstance(index, str):
        index = Index.load(index)
    if backend not in BACKENDS:
        raise ValueError(f"--backend={backend!r} is not one of {BACKENDS}")
    index.check_k(k)   # what is cheap to check comes before anything loads
    if not queries:
        raise ValueError("give at least one --query")
    workdir, checkpoint = index_workdir(index, index_path, workdir)
    found = _resolve(queries, ablation.load_workdir_config(workdir))
    names = [name for images in found for name in images.names]
    excluded = np.asarray([index.row_of(n) if exclude_self else -1 for n in names], np.int64)
    index.check_k(k, leave_out_one=bool((excluded >= 0).any()))
    model = index_model(index, workdir, checkpoint)
    vectors = _embed_queries(model, found, show_progress)
    neighbours = index.search(vectors, k, model=model.identity, normalized=True,
                              exclude=excluded, backend=backend)
    classes = []
    for images in found:
        source = images.source
        classes += [source.class_names[label] if label >= 0 else None
                    for label in source.labels.tolist()]
    queries_drawn = [(images, i) for images in found for i in range(len(images.names))]
    return Found(index, names, classes, excluded, neighbours, queries_drawn)


# ------------------------------------------------------------------------------- output
def describe(found: Found, index_path: str) -> str:
    """The printed result: a line about the index, then per query its neighbours."""
    index, model = found.index, found.index.model or {}
    lines = [f"index {index_path}: {len(index)} embeddings of {index.images or '?'} "
             f"({model.get('backbone', '?')}, step {model.get('step', '?')} of "
             f"{model.get('workdir', '?')}); distance: Euclidean between L2-normalised "
             "embeddings (cosine similarity = 1 - d^2/2)"]
    n = found.neighbours
    for q, name in enumerate(found.names):
        notes = [f"class {found.classes[q]}"] if found.classes[q] is not None else []
        if found.excluded[q] >= 0:
            notes.append(f"its own entry {found.excluded[q]} left out")
        lines.append(f"query {name}" + (f" ({', '.join(notes)})" if notes else ""))
        for j in range(n.indices.shape[1]):
            row = int(n.indices[q, j])
            cls = index.class_of(row)
            lines.append(f"  {j + 1:3d}  {n.distances[q, j]:.4f}  {n.paths[q, j]}"
                         + (f"  [{cls}]" if cls is not None else ""))
    return "\n".join(lines)


def as_json(found: Found, index_path: str) -> dict:
    n = found.neighbours
    return {"index": index_path, "k": int(n.indices.shape[1]),
            "distance": "euclidean between L2-normalised embeddings",
            "queries": [{"query": name, "class": found.classes[q],
                         "excluded_row": int(found.excluded[q]),
                         "neighbours": [{"row": int(n.indices[q, j]), "path": str(n.paths[q, j]),
                                         "distance": float(n.distances[q, j]),
                                         "class": found.index.class_of(int(n.indices[q, j]))}
                                        for j in range(n.indices.shape[1])]}
                        for q, name in enumerate(found.names)]}


def _index_images(index: Index):
    """row -> PIL image of an index entry: its split record, or its file."""
    if embed.is_split(index.images) and (index.model or {}).get("workdir"):
        config = ablation.load_workdir_config(index.model["workdir"])
        source = embed.resolve_images(index.images, config).source
        return lambda row: source.load_pil(int(index.records[row]))
    files = gdata.FileSource("index", index.paths.tolist(), np.zeros(len(index), np.int64),
                             ["?"])
    return files.load_pil


def _legend(grid: Image.Image, lines: list[str]) -> Image.Image:
    """``grid`` with the colour key and one line per row of the picture below it."""
    keys = [(visualize.QUERY, "query"), (visualize.CORRECT, "same class"),
            (visualize.WRONG, "other class"), (UNKNOWN, "class unknown")]
    height = 14 * (len(lines) + 1) + visualize.MARGIN
    canvas = Image.new("RGB", (grid.width, grid.height + height), visualize.BACKGROUND)
    canvas.paste(grid, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x, y = visualize.MARGIN, grid.height
    for colour, text in keys:
        draw.rectangle([x, y + 2, x + 9, y + 11], fill=colour)
        draw.text((x + 13, y + 1), text, fill=(0, 0, 0))
        x += 22 + int(draw.textlength(text))
    width = grid.width - 2 * visualize.MARGIN
    for i, line in enumerate(lines, start=1):
        while draw.textlength(line) > width and len(line) > 4:
            line = "..." + line[4:]   # keep the end of a long path: the file's name
        draw.text((visualize.MARGIN, grid.height + 14 * i + 1), line, fill=(0, 0, 0))
    return canvas


def picture(found: Found, *, rows: int = 16, thumb: int = 64) -> Image.Image:
    """The first ``rows`` queries and their neighbours: the evaluator's retrieval grid
    (frames: blue query, green same class, red other class, grey unknown) with a legend
    naming each query and its neighbours' distances."""
    n = found.neighbours
    shown = min(int(rows), len(found.names))
    if shown < 1:
        raise ValueError(f"--picture_rows={rows} must be at least 1")
    load = _index_images(found.index)
    query_images, neighbour_images = [], []
    for q in range(shown):
        images, record = found.queries[q]
        query_images.append(images.source.load_pil(record))
        neighbour_images.append([_or_blank(load, int(r), thumb) for r in n.indices[q]])
    classes = [[found.index.class_of(int(r)) for r in n.indices[q]] for q in range(shown)]
    correct = np.asarray([[c is not None and c == found.classes[q] for c in row]
                          for q, row in enumerate(classes)], bool)
    grid = visualize.retrieval_grid(query_images, neighbour_images, correct, thumb=thumb)
    draw = ImageDraw.Draw(grid)
    tile = thumb + 2 * visualize.BORDER
    for q, row in enumerate(classes):
        for j, cls in enumerate(row):
            if cls is None or found.classes[q] is None:
                x, y = visualize.tile_origin(q, j + 1, thumb)
                draw.rectangle([x, y, x + tile - 1, y + tile - 1], outline=UNKNOWN,
                               width=visualize.BORDER)
    lines = [f"{q + 1}: {found.names[q]}  d = "
             + " ".join(f"{d:.3f}" for d in n.distances[q]) for q in range(shown)]
    if shown < len(found.names):
        lines.append(f"(the first {shown} of {len(found.names)} queries; --picture_rows)")
    return _legend(grid, lines)


def _or_blank(load, row: int, thumb: int) -> Image.Image:
    """The index entry's image, or a blank tile when it can no longer be read."""
    try:
        return load(row)
    except (OSError, ValueError):
        return Image.new("RGB", (thumb, thumb), UNKNOWN)


# ----------------------------------------------------------------------- command line
def _define_flags() -> None:
    """Only when run as a command: importing the library leaves absl's flags alone."""
    flags.DEFINE_string("index", None, "The index: a file written by python -m gl_jax.embed.")
    flags.DEFINE_multi_string("query", None, "Query images: an image, a folder, a list file, "
                              "split:NAME or split:NAME:I; repeat the flag for more.")
    flags.DEFINE_integer("k", 10, "Neighbours per query.")
    flags.DEFINE_string("workdir", None, "The workdir of the index's model (default: the one "
                        "the index remembers); it must hold the same model.")
    flags.DEFINE_enum("backend", "exact", list(BACKENDS), "exact: gl_jax's blocked exact "
                      "search; faiss: faiss's exact IndexFlatL2 (when installed).")
    flags.DEFINE_bool("exclude_self", True, "Leave a query that is in the index out of its "
                      "own neighbours (the evaluation's leave-one-out).")
    flags.DEFINE_string("picture", None, "Draw the queries and their neighbours to this PNG.")
    flags.DEFINE_integer("picture_rows", 16, "Queries drawn in the picture at most.")
    flags.DEFINE_integer("thumb", 64, "Side of each image in the picture, in pixels.")
    flags.DEFINE_string("output", None, "Also write the neighbours as JSON to this file.")
    flags.mark_flags_as_required(["index", "query"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    o = flags.FLAGS
    index = Index.load(o.index)
    for flag, path, example in (("--output", o.output, "found.json"),
                                ("--picture", o.picture, "found.png")):
        if path:   # before the search: its folder is made, or fails now
            export.check_output(path, flag, example)
    workdir = o.workdir or (index.model or {}).get("workdir") or ""
    if os.path.isfile(os.path.join(workdir, "config.json")):   # before a JAX backend starts
        xla_flags.apply(ablation.load_workdir_config(workdir))
    found = search_images(index, o.query, o.k, workdir=o.workdir, backend=o.backend,
                          exclude_self=o.exclude_self, show_progress=True, index_name=o.index)
    print(describe(found, o.index), flush=True)
    if o.output:
        with open(o.output, "w") as f:
            json.dump(as_json(found, o.index), f, indent=1)
    if o.picture:
        picture(found, rows=o.picture_rows, thumb=o.thumb).save(o.picture)
        print(f"wrote {o.picture}", flush=True)


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
