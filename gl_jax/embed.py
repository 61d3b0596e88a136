"""Command line and library: embeddings of any images with a trained workdir's model.

    python -m gl_jax.embed --workdir=W --images=PATH --output=OUT.npz [--checkpoint=latest]
        [--no_normalize] [--skip_corrupt] [--shard_size=4096] [--strategies=flip,pool_mix,leak]

``--images`` is one of:

* a folder: every image file under it (recursively, sorted; names starting with ``._``
  skipped); an image's class is the first folder level under PATH (``PATH/cat/x/1.jpg``:
  ``cat``), none (-1) for the images directly in PATH;
* a text file listing image paths, one per line (blank lines and ``#`` lines skipped;
  relative paths are relative to the list's folder); no classes;
* one image file (by its extension: .jpg, .png, ...);
* ``split:NAME``: the run's own dataset split NAME (``test``, ``train``, ``val``,
  ``query``, ``gallery``) as its config loads it, with its classes; ``split:NAME:I`` is
  record I of it. The default Omniglot run's test alphabets are ``split:test``.

The workdir's selected checkpoint (``best/``, falling back to the latest when the run saved
none; ``--checkpoint=latest``) embeds them with the run's own eval transform, normalisation
and batch size, through the evaluation's own embedding loop (``runtime.embed_source``):
the embeddings are those the trainer's metrics were measured on, L2-normalised by the
metrics' rule (``--no_normalize``: the raw ones). ``--strategies`` applies Group Loss++
switches as ``python -m gl_jax.evaluate`` does (flip TTA, pooling mix, leak; values from
``--pool_mix`` / ``--leak``, else the dataset's defaults).

OUT is an index file (``gl_jax.index``: embeddings, paths, labels, class names, the
model's identity); ``python -m gl_jax.search --index=OUT`` searches it.

Big collections: the images are embedded in shards of ``--shard_size``, each written whole
to ``OUT.parts/`` as it is done; a run that is stopped (killed, preempted) resumes from the
finished shards when the same command runs again. A shard is reused only when it was made
by the same checkpoint, settings and image list (names, labels, file sizes and times: one
digest); shards of anything else are deleted, with a line saying so. OUT is assembled
from the shards, written whole, and ``OUT.parts/`` removed: the same bytes as a run never
stopped.

Unreadable images follow the data scan's rules (missing, empty or special files, images
that do not decode): one ``error:`` line naming them, exit status 2; with
``--skip_corrupt`` they are left out, listed in OUT (``skipped_paths``,
``skipped_reasons``) and named on stdout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging as std_logging
import os
import re
import shlex
import shutil
from typing import Callable, Sequence

from absl import app
from absl import flags
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from gl_jax import ablation
from gl_jax import checkpoints as ckpt
from gl_jax import cli
from gl_jax import data as gdata
from gl_jax import export
from gl_jax import index as index_lib
from gl_jax import runtime
from gl_jax import strategies as glpp
from gl_jax import xla_flags
from gl_jax.data import progress
from gl_jax.data.sources import IMAGE_EXTENSIONS, file_problem
from gl_jax.evaluation import exact_knn

SPLIT = "split:"
STRATEGIES = ("flip", "pool_mix", "leak")   # the embedding-side Group Loss++ switches
DEFAULT_SHARD_SIZE = 4096
_LISTED = 5   # unreadable files named in one error line


# ------------------------------------------------------------------------------ images
@dataclasses.dataclass(frozen=True)
class Images:
    """What an --images (or --query) value names, ready to embed.

    spec: the value resolved (an absolute path, or 'split:NAME[:I]'); kind: 'folder',
    'list', 'image' or 'split'; source: one record per image (paths = its names);
    names: each record's name (a file path, or the dataset's name for a split record);
    stats: per record (size, mtime_ns), or the reason it cannot be read, for files;
    None for a split."""
    spec: str
    kind: str
    source: gdata.Source
    names: list
    stats: list | None


def _is_image_name(name: str) -> bool:
    return not os.path.basename(name).startswith("._") and name.lower().endswith(
        IMAGE_EXTENSIONS)


def is_split(spec: str) -> bool:
    """A 'split:NAME[:I]' value (an existing path of that name stays a path)."""
    return spec.startswith(SPLIT) and not os.path.exists(spec)


def _file_images(spec: str, kind: str, paths: list[str], labels: list[int],
                 class_names: list[str]) -> Images:
    stats = []
    for path in paths:
        problem = file_problem(path)   # the data scan's first check: stat, never open
        if problem is None:
            info = os.stat(path)
            stats.append((int(info.st_size), int(info.st_mtime_ns)))
        else:
            stats.append(problem)
    source = gdata.FileSource(f"images:{spec}", paths, labels, class_names)
    return Images(spec, kind, source, list(paths), stats)


def _folder(spec: str, root: str, what: str) -> Images:
    """Every image under ``root``; class = first folder level (-1 directly in root)."""
    found, seen = [], {os.path.realpath(root)}
    for folder, subfolders, files in os.walk(root, followlinks=True):
        # Sorted, and each real folder once: a link back up the tree is not walked again.
        keep = []
        for name in sorted(subfolders):
            real = os.path.realpath(os.path.join(folder, name))
            if real not in seen:
                seen.add(real)
                keep.append(name)
        subfolders[:] = keep
        found += [os.path.join(folder, f) for f in sorted(files) if _is_image_name(f)]
    if not found:
        raise ValueError(f"{what}={spec!r}: no image files under {root} (looked for "
                         f"{', '.join(IMAGE_EXTENSIONS)}, in any subfolder)")
    firsts = [os.path.relpath(p, root).split(os.sep) for p in found]
    class_names = sorted({parts[0] for parts in firsts if len(parts) > 1})
    label_of = {name: i for i, name in enumerate(class_names)}
    labels = [label_of[parts[0]] if len(parts) > 1 else -1 for parts in firsts]
    return _file_images(root, "folder", found, labels, class_names)


def _list_file(spec: str, path: str, what: str) -> Images:
    """The image paths a text file lists, one per line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{what}={spec!r} is neither an image file (by its extension: "
                         f"{', '.join(IMAGE_EXTENSIONS)}) nor a UTF-8 text file listing "
                         "image paths") from None
    base = os.path.dirname(path)
    paths = [os.path.normpath(os.path.join(base, os.path.expanduser(line.strip())))
             for line in lines if line.strip() and not line.strip().startswith("#")]
    if not paths:
        raise ValueError(f"{what}={spec!r}: the list {path} names no image")
    return _file_images(path, "list", paths, [-1] * len(paths), [])


def parse_split(spec: str, what: str = "--images") -> tuple[str, int | None]:
    """'split:NAME' -> (NAME, None); 'split:NAME:I' -> (NAME, I)."""
    parts = spec[len(SPLIT):].split(":")
    if len(parts) > 2 or not parts[0] or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"{what}={spec!r}: write split:NAME (a split of the run's dataset, "
                         "e.g. split:test) or split:NAME:I (its record I)")
    return parts[0], (int(parts[1]) if len(parts) == 2 else None)


def _split(spec: str, config, what: str) -> Images:
    name, record = parse_split(spec, what)
    splits = runtime.load_splits(config)
    if name not in splits:
        raise ValueError(f"{what}={spec!r}: the run's dataset {config.data.name!r} has the "
                         f"splits {', '.join(sorted(splits))}")
    source = splits[name]
    if record is not None:
        if record >= len(source):
            raise ValueError(f"{what}={spec!r}: split {name!r} has {len(source)} records "
                             f"(0 to {len(source) - 1})")
        source = gdata.SubsetSource(source.name, source, [record], relabel=False)
    return Images(spec, "split", source, [source.describe(i) for i in range(len(source))],
                  None)


def resolve_images(spec: str, config=None, what: str = "--images") -> Images:
    """The images that an --images value names (see the module docstring). ``config``:
    the run's config, needed for 'split:NAME'. A missing path or an empty folder or list
    -> a one-line error naming it."""
    if not spec:
        raise ValueError(f"{what} is empty: give a folder, a list file, an image or "
                         "split:NAME")
    if is_split(spec):
        if config is None:
            raise ValueError(f"{what}={spec!r}: a split needs the run's config")
        return _split(spec, config, what)
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isdir(path):
        return _folder(spec, path, what)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}={spec!r} does not exist")
    if _is_image_name(path):
        return _file_images(path, "image", [path], [-1], [])
    return _list_file(spec, path, what)


def unreadable_error(what: str, bad: dict[str, str], total: int,
                     skippable: bool = True) -> ValueError:
    """One line naming the unreadable images ({name: reason})."""
    listed = "; ".join(f"{name}: {reason}" for name, reason in list(bad.items())[:_LISTED])
    more = f"; and {len(bad) - _LISTED} more" if len(bad) > _LISTED else ""
    head = ("an unreadable image" if len(bad) == 1
            else f"{len(bad)} of {total} images cannot be read")
    fix = ("fix or remove them; --skip_corrupt leaves them out and lists them in the output"
           if skippable else "fix or remove them")
    return ValueError(f"{what}: {head}: {listed}{more} ({fix})")


def decode_problems(source: gdata.Source, records: Sequence[int]) -> dict[int, str]:
    """{record: reason} of records of ``source`` that an embedding pass left out: the
    decoder's own error, read again (only these few records are)."""
    reasons = {}
    for record in records:
        try:
            source.load_pil(int(record))
        except Exception as e:   # noqa: BLE001 - PIL raises OSError, SyntaxError, ...
            cause = e.__cause__ or e
            # PIL names an in-memory stream by its repr: noise beside the file's own name.
            text = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(cause))
            reasons[int(record)] = " ".join(f"{type(cause).__name__}: {text}".split())
        else:   # repaired since the pass read it
            reasons[int(record)] = "did not decode in the embedding pass"
    return reasons


# ------------------------------------------------------------------------------- model
@contextlib.contextmanager
def _dropping(logger: std_logging.Logger, drop):
    """`logger` without the records for which `drop(record)` is true, inside the block."""
    class _Drop(std_logging.Filter):
        def filter(self, record: std_logging.LogRecord) -> bool:
            return not drop(record)
    quiet = _Drop()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _quiet_skips():
    """The eval pipeline logs each image it leaves out; here they are collected and named
    in one line instead (an error, or the stdout summary)."""
    return _dropping(std_logging.getLogger(),
                     lambda record: str(record.msg).startswith("skip_corrupt:"))


def _mesh_for(batch_size: int):
    """Every device that divides the eval batch evenly (the trainer's mesh, as far as this
    machine has its devices)."""
    count = len(jax.devices())
    while batch_size % count:
        count -= 1
    return runtime.make_mesh(ml_collections.ConfigDict({"num_devices": count}))


@dataclasses.dataclass
class Model:
    """A workdir's restored model, ready to embed sources: the evaluation's embedder on a
    mesh, the run's config and the identity written with its embeddings."""
    workdir: str
    config: ml_collections.ConfigDict
    identity: dict
    embedder: runtime.Embedder
    params: object
    model_state: object

    def embed(self, source: gdata.Source, *, normalize: bool = True,
              show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(float32 embeddings [m, d], their record indices in ``source`` [m]): every
        record that decodes, in order; those that do not are left out (see
        ``decode_problems``)."""
        config = ml_collections.ConfigDict(self.config.to_dict())
        config.data.skip_corrupt = True      # a bad image is masked out, not fatal here
        config.logging.progress = bool(show_progress)
        with _quiet_skips():
            out = runtime.embed_source([(self.embedder, self.params, self.model_state)],
                                       source, config, self.embedder.mesh, desc="embed")
        found = out["embeddings"][0]
        raw = found["embedding"].astype(np.float32)
        if self.embedder.flip and len(raw):
            raw = glpp.flip_average(raw, found["flipped"].astype(np.float32))
        # The metrics' own normalisation: the vectors their Recall@K ranked.
        vectors = exact_knn.l2_normalize(raw) if normalize else raw
        return vectors, out["index"].astype(np.int64)


def embedding_settings(config, strategies: Sequence[str], pool_mix: float | None,
                       leak: float | None) -> dict:
    """{'strategies': sorted names, 'pool_mix', 'leak'}: the switches and their values
    (None when off; the dataset's defaults where not given), checked."""
    if isinstance(strategies, str):
        strategies = [s for s in strategies.split(",") if s.strip()]
    chosen = sorted({s.strip() for s in strategies})
    unknown = [s for s in chosen if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"--strategies: {unknown} not among the embedding switches "
                         f"{list(STRATEGIES)} (beta, rerank and ensemble are the evaluator's)")
    values = glpp.settings_for(str(config.data.name), pool_mix=pool_mix, leak=leak)
    return {"strategies": chosen,
            "pool_mix": float(values.pool_mix) if "pool_mix" in chosen else None,
            "leak": float(values.leak) if "leak" in chosen else None}


def load_model(workdir: str, checkpoint: str = "best", strategies: Sequence[str] = (), *,
               pool_mix: float | None = None, leak: float | None = None) -> Model:
    """The model of ``workdir``'s checkpoint (``best`` or ``latest``), with the Group
    Loss++ switches ``strategies`` (any of flip, pool_mix, leak) applied as the evaluator
    applies them."""
    export.check_workdir(workdir, checkpoint)
    config, member = export.restore(workdir, checkpoint)
    settings = embedding_settings(config, strategies, pool_mix, leak)
    chosen = tuple(settings["strategies"])
    if chosen:   # a switch this backbone lacks is refused, as by the evaluator
        ablation.check_strategies(chosen, [member], config, num_items=3, flag="--strategies")
    variant = ablation.trained_variant(config)
    if settings["pool_mix"] is not None:
        variant = dataclasses.replace(variant, pooling="mix", pool_mix=settings["pool_mix"])
    if settings["leak"] is not None:
        variant = dataclasses.replace(variant, leak=settings["leak"])
    mesh = _mesh_for(int(config.evals.batch_size))
    embedder = runtime.Embedder(ablation.variant_graphdef(member, variant), mesh,
                                flip="flip" in chosen)
    params, model_state = jax.device_put((member.params, member.model_state),
                                         NamedSharding(mesh, P()))
    step = int(os.path.basename(member.checkpoint))
    identity = {
        "workdir": os.path.abspath(workdir),
        "checkpoint": {"requested": checkpoint,
                       "path": os.path.relpath(member.checkpoint, os.path.abspath(workdir))},
        "step": step,
        "config_sha256": export.file_sha256(os.path.join(workdir, "config.json")),
        "image_size": int(config.data.image_size),
        "backbone": str(config.model.name),
        "embedding": settings,
    }
    return Model(os.path.abspath(workdir), config, identity, embedder, params, model_state)


# ------------------------------------------------------------------------------ shards
def _job_digest(model: Model, images: Images, normalize: bool, shard_size: int) -> str:
    """What a shard's content depends on: the model, the settings and the image list."""
    h = hashlib.sha256()
    job = {"format_version": index_lib.FORMAT_VERSION, "normalize": bool(normalize),
           "shard_size": int(shard_size), "images": images.spec,
           "checkpoint": model.identity["checkpoint"]["path"],
           "model": {k: model.identity[k] for k in index_lib.IDENTITY}}
    h.update(json.dumps(job, sort_keys=True).encode())
    labels = images.source.labels
    for i, name in enumerate(images.names):
        stat = images.stats[i] if images.stats is not None else ""
        h.update(f"{name}\t{int(labels[i])}\t{stat}\n".encode())
    return h.hexdigest()


def _shard_path(parts: str, shard: int) -> str:
    return os.path.join(parts, f"shard-{shard:06d}.npz")


def _read_shard(path: str, job: str, start: int, stop: int) -> dict | None:
    """A finished shard of this job, or None (absent, unreadable, of another job)."""
    try:
        shard = index_lib.read_npz(path, "shard")
    except (FileNotFoundError, ValueError):
        return None
    records = shard.get("records", np.zeros(0))
    if (str(shard.get("job", np.asarray("")).item()) != job
            or not np.all((records >= start) & (records < stop))
            or len(records) != len(shard.get("embeddings", ()))):
        return None
    return shard


def _clear_other_jobs(parts: str, job: str, say: Callable[[str], None]) -> None:
    """Deletes ``parts`` when it holds shards of another job (other checkpoint, settings or
    images), saying so."""
    names = [n for n in os.listdir(parts) if n.startswith("shard-") and n.endswith(".npz")]
    for name in names:
        try:
            with np.load(os.path.join(parts, name), allow_pickle=False) as z:
                theirs = str(z["job"].item())
        except (OSError, ValueError, KeyError, EOFError):
            continue   # a damaged shard: this job writes it again
        if theirs != job:
            say(f"{parts} holds shards of another embedding job (another checkpoint, "
                "settings or image list): starting over")
            shutil.rmtree(parts)
            return


def _embed_shard(model: Model, images: Images, start: int, stop: int, normalize: bool,
                 job: str) -> dict:
    """The arrays of one shard: records [start, stop) that are readable, embedded."""
    stats = images.stats or [None] * len(images.names)
    unreadable = {i: stats[i] for i in range(start, stop) if isinstance(stats[i], str)}
    todo = np.asarray([i for i in range(start, stop) if i not in unreadable], np.int64)
    vectors, done = np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    if len(todo):
        subset = gdata.SubsetSource(images.source.name, images.source, todo, relabel=False)
        vectors, found = model.embed(subset, normalize=normalize)
        done = todo[found]
    unreadable.update(decode_problems(images.source, np.setdiff1d(todo, done)))
    skipped = sorted(unreadable)
    return {"job": np.asarray(job), "embeddings": vectors, "records": done,
            "skipped": np.asarray(skipped, np.int64),
            "reasons": np.asarray([unreadable[i] for i in skipped], dtype=str).reshape(-1)}


def embed_images(workdir: str, images: str, output: str, *, checkpoint: str = "best",
                 normalize: bool = True, skip_corrupt: bool = False,
                 shard_size: int = DEFAULT_SHARD_SIZE, strategies: Sequence[str] = (),
                 pool_mix: float | None = None, leak: float | None = None,
                 show_progress: bool = True, say: Callable[[str], None] = print,
                 after_shard: Callable[[int, int], None] | None = None) -> index_lib.Index:
    """Embeds the images ``images`` names with ``workdir``'s model and writes ``output``
    (an index file); returns it as an ``Index``. See the module docstring.

    ``say`` gets the lines for the person watching (resumed shards, skipped images);
    ``after_shard(done, total)`` runs after each shard is written (tests stop the process
    there)."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, (int, np.integer)) \
            or shard_size < 1:
        raise ValueError(f"--shard_size={shard_size!r} must be a positive number of images")
    export.check_workdir(workdir, checkpoint)
    export.check_output(output, example="embeddings.npz")
    config = ablation.load_workdir_config(workdir)
    found = resolve_images(images, config)
    total = len(found.names)
    if found.stats is not None and not skip_corrupt:
        bad = {found.names[i]: s for i, s in enumerate(found.stats) if isinstance(s, str)}
        if bad:   # before the model loads: nothing is embedded for a list that fails
            raise unreadable_error("--images", bad, total)
    model = load_model(workdir, checkpoint, strategies, pool_mix=pool_mix, leak=leak)
    return write_embeddings(model, found, output, normalize=normalize,
                            skip_corrupt=skip_corrupt, shard_size=int(shard_size),
                            show_progress=show_progress, say=say, after_shard=after_shard)


def write_embeddings(model: Model, found: Images, output: str, *, normalize: bool = True,
                     skip_corrupt: bool = False, shard_size: int = DEFAULT_SHARD_SIZE,
                     show_progress: bool = True, say: Callable[[str], None] = print,
                     after_shard: Callable[[int, int], None] | None = None
                     ) -> index_lib.Index:
    """``embed_images`` once the model is loaded and the images resolved: the shards
    (reused where a stopped run left them), then ``output``."""
    total = len(found.names)
    job = _job_digest(model, found, normalize, int(shard_size))
    parts = output + ".parts"
    is_main = jax.process_index() == 0
    if os.path.isdir(parts):
        _clear_other_jobs(parts, job, say)
    os.makedirs(parts, exist_ok=True)

    bounds = [(start, min(start + int(shard_size), total))
              for start in range(0, total, int(shard_size))]
    shards = [_read_shard(_shard_path(parts, s), job, *b) for s, b in enumerate(bounds)]
    reused = sum(s is not None for s in shards)
    if reused:
        say(f"resuming: {reused} of {len(bounds)} shards in {parts} are done")
    bar = progress.bar(total=total, desc="embed", unit="img", disable=not show_progress,
                       initial=sum(b[1] - b[0] for b, s in zip(bounds, shards) if s is not None))
    with bar:
        for s, (start, stop) in enumerate(bounds):
            if shards[s] is None:
                shards[s] = _embed_shard(model, found, start, stop, normalize, job)
                if is_main:
                    index_lib.write_npz(_shard_path(parts, s), shards[s])
                bar.update(stop - start)
            if not skip_corrupt and len(shards[s]["skipped"]):
                bad = {found.names[i]: r for i, r in zip(shards[s]["skipped"].tolist(),
                                                         shards[s]["reasons"].tolist())}
                raise unreadable_error("--images", bad, total)
            if after_shard is not None:
                after_shard(s + 1, len(bounds))
    result = _assemble(model, found, shards, normalize)
    if is_main:
        result.save(output)
        shutil.rmtree(parts, ignore_errors=True)
    if result.skipped:
        listed = "; ".join(f"{p} ({r})" for p, r in result.skipped[:_LISTED])
        extra = len(result.skipped) - _LISTED
        more = f"; and {extra} more" if extra > 0 else ""
        say(f"skipped {len(result.skipped)} unreadable image(s), listed in {output} "
            f"(skipped_paths): {listed}{more}")
    return result


def _assemble(model: Model, found: Images, shards: list[dict],
              normalize: bool) -> index_lib.Index:
    """The index of every shard's rows, in image-list order."""
    records = np.concatenate([s["records"] for s in shards])
    if not len(records):
        raise ValueError(f"--images={found.spec!r}: none of the {len(found.names)} images "
                         "can be read")
    vectors = np.concatenate([s["embeddings"] for s in shards if len(s["records"])])
    skipped = [(found.names[i], r) for s in shards
               for i, r in zip(s["skipped"].tolist(), s["reasons"].tolist())]
    names = np.asarray(found.names, dtype=str)
    return index_lib.Index(vectors, names[records], found.source.labels[records],
                           class_names=found.source.class_names, model=model.identity,
                           normalized=normalize, records=records, skipped=skipped,
                           images=found.spec)


# ------------------------------------------------------------------ after a training run
def use_commands(workdir: str) -> str:
    """The lines a finished training run ends with: the command that embeds its held-out
    images (the test split, or the gallery where the dataset has queries and a gallery)
    and the one that searches them with one of its images."""
    try:
        dataset = gdata.DATASETS.get(str(ablation.load_workdir_config(workdir).data.name))
    except (OSError, ValueError, AttributeError):   # never fail the end of a training run
        dataset = None
    kind = dataset.eval_kind if dataset is not None else "retrieval"
    gallery, query = ("test", "test") if kind == "retrieval" else ("gallery", "query")
    output = os.path.join(workdir, "embed", f"{gallery}.npz")
    return "\n".join([
        f"Embed the {gallery} images with this model, then search them (docs/use.md):",
        f"  python -m gl_jax.embed --workdir={shlex.quote(workdir)} --images=split:{gallery} "
        f"--output={shlex.quote(output)}",
        f"  python -m gl_jax.search --index={shlex.quote(output)} --query=split:{query}:0 "
        "--k=5"])


# ----------------------------------------------------------------------- command line
def _define_flags() -> None:
    """Only when run as a command: importing the library leaves absl's flags alone."""
    flags.DEFINE_string("workdir", None, "Training workdir (with config.json and checkpoints).")
    flags.DEFINE_string("images", None, "A folder (recursively; class = first folder level), "
                        "a text file listing image paths, one image, or split:NAME (the run's "
                        "own dataset split, e.g. split:test).")
    flags.DEFINE_string("output", None, "The .npz to write (an index file for "
                        "gl_jax.search); shards go to <output>.parts/ meanwhile.")
    flags.DEFINE_enum("checkpoint", "best", sorted(ckpt.KINDS), "Which checkpoint: the best "
                      "(falls back to the latest when the run saved none) or the latest.")
    flags.DEFINE_bool("no_normalize", False, "Keep the raw embeddings (default: "
                      "L2-normalised as the evaluation's metrics normalise them).")
    flags.DEFINE_bool("skip_corrupt", False, "Leave unreadable images out (listed in the "
                      "output and on stdout) instead of stopping with an error.")
    flags.DEFINE_integer("shard_size", DEFAULT_SHARD_SIZE, "Images per shard (a stopped run "
                         "resumes from the finished shards); best a multiple of the run's "
                         "evals.batch_size.")
    flags.DEFINE_list("strategies", [], f"Group Loss++ switches, any of {list(STRATEGIES)}.")
    flags.DEFINE_float("pool_mix", None, "Lambda of the pooling mix (default: the dataset's).")
    flags.DEFINE_float("leak", None, "Slope of the last block's leaky ReLU (default: the "
                       "dataset's).")
    flags.mark_flags_as_required(["workdir", "images", "output"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    o = flags.FLAGS
    if os.path.isfile(os.path.join(o.workdir, "config.json")):
        # Before anything starts a JAX backend (finding a checkpoint does): XLA reads its
        # flags once. A workdir without config.json is refused by embed_images.
        xla_flags.apply(ablation.load_workdir_config(o.workdir))
    result = embed_images(o.workdir, o.images, o.output, checkpoint=o.checkpoint,
                          normalize=not o.no_normalize, skip_corrupt=o.skip_corrupt,
                          shard_size=o.shard_size, strategies=o.strategies,
                          pool_mix=o.pool_mix, leak=o.leak,
                          say=lambda line: print(line, flush=True))
    model = result.model
    classes = f", {len(result.class_names)} classes" if result.class_names else ""
    print(f"wrote {o.output}: {len(result)} embeddings ({result.dim}-d, "
          f"{'L2-normalised' if result.normalized else 'raw'}{classes}) of {result.images}, "
          f"{model['backbone']} at step {model['step']} ({model['checkpoint']['path']})",
          flush=True)


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
