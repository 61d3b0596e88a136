"""A k-nearest-neighbour index over embeddings: exact search, one file, the model it needs.

    from gl_jax import Index
    index = Index.load("W/embed/test.npz")          # what `python -m gl_jax.embed` writes
    found = index.search(query_embeddings, k=5)      # found.indices, .distances, .paths

Built from embeddings [n, d], their paths, labels and class names, and the identity of the
model that made them (``model``: the sha256 of the run's config.json, the checkpoint step,
the image size and the Group Loss++ switches): a search given queries with another
model's identity is refused, since their distances would mean nothing.

Distances are Euclidean between L2-normalised embeddings, the ranking of the evaluation
(``gl_jax.evaluation.exact_knn``; cosine similarity = 1 - d^2 / 2): ``distances`` are
non-decreasing along a row, and among exactly equal distances the smaller index row comes
first. Embeddings stored un-normalised (``normalized=False``) are normalised in memory, by
the metrics' own rule. The exact search runs in blocks of queries, jitted and sharded over
this process's devices, never forming the whole query x index matrix;
``backend='faiss'`` uses faiss's exact ``IndexFlatL2`` when faiss is installed.

File format (``save`` / ``load``): one ``.npz`` (numpy's zip of ``.npy`` arrays, read with
``allow_pickle=False``): ``embeddings`` float32 [n, d], ``paths`` str [n], ``labels``
int64 [n] (-1 = unknown), ``class_names`` str [C] (``labels`` index it), ``records``
int64 [n] (each row's position in the embedded image list), ``skipped_paths`` and
``skipped_reasons`` str [m] (unreadable images left out), and ``meta``: a JSON string
(``format``, ``format_version``, ``normalized``, ``distance``, ``model``, ``images``).
The file is written whole or not at all, with fixed zip timestamps: the same content gives
the same bytes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from typing import Any, Mapping, Sequence

import numpy as np

FORMAT = "gl_jax.embeddings"
FORMAT_VERSION = 1
BACKENDS = ("exact", "faiss")
# What makes two sets of embeddings comparable (``model``'s fields): the workdir's path
# is left out, so that a copied or moved workdir still serves its own index.
IDENTITY = ("config_sha256", "step", "image_size", "embedding")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)   # zip's earliest date: no clock in the bytes


@dataclasses.dataclass(frozen=True)
class Neighbours:
    """The k nearest index rows of each of q queries, nearest first.

    indices: int32 [q, k] rows of the index. distances: float32 [q, k], Euclidean
    between L2-normalised embeddings (non-decreasing along a row). paths: str [q, k].
    labels: int64 [q, k] (-1 = unknown)."""
    indices: np.ndarray
    distances: np.ndarray
    paths: np.ndarray
    labels: np.ndarray


# ----------------------------------------------------------------------------- helpers
def _strings(values, n: int, what: str) -> np.ndarray:
    array = np.asarray([str(v) for v in values], dtype=str)
    if array.shape != (n,):
        raise ValueError(f"{what} has {array.size} entries for {n} embeddings")
    return array


def model_difference(expected: Mapping | None, given: Mapping | None) -> str | None:
    """Why embeddings of model ``given`` cannot be compared with those of ``expected``
    (None: they can, or one side does not say which model it is)."""
    if not expected or not given:
        return None
    differing = [f"{key} {given.get(key)!r} instead of {expected.get(key)!r}"
                 for key in IDENTITY if expected.get(key) != given.get(key)]
    return "; ".join(differing) or None


def _normalize(x: np.ndarray) -> np.ndarray:
    from gl_jax.evaluation import exact_knn   # the metrics' own rule (imports JAX)
    return exact_knn.l2_normalize(np.asarray(x, np.float32))


def write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """``arrays`` as an .npz at ``path``, atomically (a temporary file beside it, then a
    rename) and without pickles; zip timestamps fixed, so equal arrays give equal bytes."""
    partial = f"{path}.{os.getpid()}.tmp"
    try:
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for name, value in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
                with z.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
        os.replace(partial, path)
    except OSError as e:
        if os.path.exists(partial):
            os.remove(partial)
        raise PermissionError(f"cannot write {path}: {e.strerror or e}") from e


def read_npz(path: str, what: str) -> dict[str, np.ndarray]:
    """Every array of an .npz written by ``write_npz`` (no pickles); a missing or
    unreadable file -> one-line FileNotFoundError / ValueError naming ``what``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path!r} does not exist" if not os.path.exists(path)
                                else f"{what}: {path!r} is not a file")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        if not isinstance(e, OSError) and not zipfile.is_zipfile(path):
            # np.load takes any file that is not a zip for a pickle, and says so.
            raise ValueError(f"{what}: {path!r} is not a .npz file (not a zip archive); "
                             "give a file that python -m gl_jax.embed wrote") from e
        raise ValueError(f"{what}: {path!r} is not a readable .npz file "
                         f"({type(e).__name__}: {' '.join(str(e).split())})") from e


# ------------------------------------------------------------------------------- index
class Index:
    """Embeddings with their paths, labels and model, searchable by k nearest neighbours.

    Args:
      embeddings: [n, d] finite numbers (float32 after conversion), n >= 1.
      paths: n names (file paths, or a dataset's record names); default '0', '1', ...
      labels: n ints indexing ``class_names``, -1 = unknown; default all -1.
      class_names: the names of the labels.
      model: the identity of the model that embedded them (``gl_jax.embed`` fills it:
        ``config_sha256``, ``step``, ``image_size``, ``embedding`` and where it is,
        ``workdir`` and ``checkpoint``); None = unknown, nothing is checked.
      normalized: whether the embeddings are L2-normalised already.
      records: each row's position in the embedded image list; default 0..n-1.
      skipped: (path, reason) of images left out (unreadable), kept with the file.
      images: what was embedded (``gl_jax.embed``'s --images, resolved).
    """

    def __init__(self, embeddings, paths: Sequence[str] | None = None,
                 labels: Sequence[int] | None = None, *, class_names: Sequence[str] = (),
                 model: Mapping[str, Any] | None = None, normalized: bool = False,
                 records: Sequence[int] | None = None,
                 skipped: Sequence[tuple[str, str]] = (), images: str = ""):
        from gl_jax.evaluation import _checks   # finite, 2-D, any real dtype -> float32
        self.embeddings = _checks.as_embeddings("embeddings", embeddings)
        n = len(self.embeddings)
        self.paths = _strings(range(n) if paths is None else paths, n, "paths")
        self.labels = (np.full(n, -1, np.int64) if labels is None
                       else np.asarray(labels, np.int64).reshape(-1))
        if self.labels.shape != (n,):
            raise ValueError(f"labels has {self.labels.size} entries for {n} embeddings")
        self.class_names = [str(c) for c in class_names]
        if self.labels.size and self.labels.max() >= len(self.class_names):
            raise ValueError(f"labels go up to {int(self.labels.max())} but there are "
                             f"{len(self.class_names)} class names")
        self.records = (np.arange(n, dtype=np.int64) if records is None
                        else np.asarray(records, np.int64).reshape(-1))
        if self.records.shape != (n,):
            raise ValueError(f"records has {self.records.size} entries for {n} embeddings")
        self.model = dict(model) if model else None
        self.normalized = bool(normalized)
        self.skipped = [(str(p), str(r)) for p, r in skipped]
        self.images = str(images)
        self._unit = None      # the L2-normalised embeddings, made on the first search
        self._faiss = None
        self._rows = None      # path -> first row, made on the first `row_of`

    def __len__(self) -> int:
        return len(self.embeddings)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __repr__(self) -> str:
        step = (self.model or {}).get("step")
        return (f"Index({len(self)} x {self.dim}, {len(self.class_names)} classes"
                + (f", model step {step}" if step is not None else "") + ")")

    def class_of(self, row: int) -> str | None:
        """The class name of ``row``, None when unknown."""
        label = int(self.labels[row])
        return self.class_names[label] if label >= 0 else None

    def row_of(self, path: str) -> int:
        """The first row whose path is ``path``, -1 when none is."""
        if self._rows is None:
            self._rows = {}
            for row, p in enumerate(self.paths.tolist()):
                self._rows.setdefault(p, row)
        return self._rows.get(str(path), -1)

    # ------------------------------------------------------------------------ search
    def _gallery(self) -> np.ndarray:
        if self._unit is None:
            self._unit = self.embeddings if self.normalized else _normalize(self.embeddings)
        return self._unit

    def check_k(self, k, leave_out_one: bool = False) -> int:
        """``k`` as an int in [1, entries a query can get]; ValueError naming it otherwise."""
        limit = len(self) - (1 if leave_out_one else 0)
        where = (f"the index's {len(self)} entries less the query's own"
                 if leave_out_one else "the number of entries in the index")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= limit:
            raise ValueError(f"k={k!r} must be an integer from 1 to {limit} ({where})")
        return int(k)

    def search(self, queries, k: int, *, model: Mapping[str, Any] | None = None,
               normalized: bool = False, exclude: Sequence[int] | None = None,
               backend: str = "exact", block_size: int = 1024) -> Neighbours:
        """The ``k`` nearest index rows of each query (see the module docstring).

        Args:
          queries: [q, d] query embeddings (d = the index's).
          k: neighbours per query, 1 <= k <= len(index) (one fewer with ``exclude``).
          model: the identity of the model that embedded the queries; refused (ValueError)
            when it is not the index's. None: not checked.
          normalized: the queries are L2-normalised already (by the metrics' rule, as
            ``gl_jax.embed`` writes them); otherwise they are normalised here.
          exclude: per query an index row to leave out of its neighbours (-1: none), e.g.
            the query's own entry: the evaluation's leave-one-out.
          backend: 'exact' (blocked, jitted, sharded over this process's devices) or
            'faiss' (its exact IndexFlatL2; needs faiss installed).
          block_size: queries per block of the exact search.
        Returns:
          ``Neighbours`` (indices, distances, paths, labels), each [q, k].
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
        reason = model_difference(self.model, model)
        if reason:
            raise ValueError(f"the queries come from another model than the index's "
                             f"({reason}): embed them with the index's model")
        from gl_jax.evaluation import _checks
        q = _checks.as_embeddings("queries", queries)
        if q.shape[1] != self.dim:
            raise ValueError(f"the queries have {q.shape[1]} dimensions and the index "
                             f"{self.dim}: they come from another model")
        q = q if normalized else _normalize(q)
        if exclude is None:
            exclude = np.full(len(q), -1, np.int64)
        exclude = np.asarray(exclude, np.int64).reshape(-1)
        if exclude.shape != (len(q),):
            raise ValueError(f"exclude has {exclude.size} entries for {len(q)} queries")
        leave_out = bool((exclude >= 0).any())
        k = self.check_k(k, leave_out)
        wanted = k + 1 if leave_out else k
        if backend == "faiss":
            distances, indices = self._faiss_search(q, wanted)
        else:
            from gl_jax.evaluation import exact_knn
            distances, indices = exact_knn.knn(q, self._gallery(), k=wanted, normalize=False,
                                               block_size=block_size)
        distances, indices = _leave_out(np.asarray(distances), np.asarray(indices), exclude, k)
        return Neighbours(indices=indices.astype(np.int32), distances=distances,
                          paths=self.paths[indices], labels=self.labels[indices])

    def _faiss_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from gl_jax.evaluation import clustering
        if not clustering.faiss_available():
            raise ValueError("backend='faiss' but faiss is not installed (pip install "
                             "faiss-cpu); the exact backend needs nothing more")
        import faiss
        if self._faiss is None:
            self._faiss = faiss.IndexFlatL2(self.dim)
            self._faiss.add(np.ascontiguousarray(self._gallery()))
        squared, indices = self._faiss.search(np.ascontiguousarray(q), k)
        # Squared L2 in faiss: the exact backend's distances are the square roots.
        return np.sqrt(np.maximum(squared, 0.0)).astype(np.float32), indices

    # -------------------------------------------------------------------------- files
    def arrays(self) -> dict[str, np.ndarray]:
        """What ``save`` writes (see the module docstring)."""
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "normalized": self.normalized,
                "distance": "euclidean between L2-normalised embeddings",
                "model": self.model, "images": self.images}
        return {
            "embeddings": self.embeddings,
            "paths": self.paths,
            "labels": self.labels,
            "class_names": np.asarray(self.class_names, dtype=str).reshape(-1),
            "records": self.records,
            "skipped_paths": np.asarray([p for p, _ in self.skipped], dtype=str).reshape(-1),
            "skipped_reasons": np.asarray([r for _, r in self.skipped], dtype=str).reshape(-1),
            "meta": np.asarray(json.dumps(meta, sort_keys=True)),
        }

    def save(self, path: str) -> None:
        """One .npz file at ``path``, written whole or not at all (no pickles)."""
        write_npz(path, self.arrays())

    @classmethod
    def load(cls, path: str) -> "Index":
        """The index saved at ``path`` (by ``save`` or ``python -m gl_jax.embed``)."""
        arrays = read_npz(path, "--index")
        try:
            meta = json.loads(str(arrays["meta"].item()))
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            if int(meta.get("format_version", 0)) > FORMAT_VERSION:
                raise ValueError(f"format_version {meta['format_version']} is newer than "
                                 f"this gl_jax's {FORMAT_VERSION}")
            skipped = zip(arrays["skipped_paths"].tolist(), arrays["skipped_reasons"].tolist())
            return cls(arrays["embeddings"], arrays["paths"].tolist(), arrays["labels"],
                       class_names=arrays["class_names"].tolist(), model=meta.get("model"),
                       normalized=bool(meta.get("normalized")), records=arrays["records"],
                       skipped=list(skipped), images=meta.get("images", ""))
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"--index: {path!r} is not a gl_jax embeddings file "
                             f"({type(e).__name__}: {' '.join(str(e).split())})") from e

    # The embed command's output is an index file: the same format, the same reader.
    from_embeddings_file = load


def _leave_out(distances: np.ndarray, indices: np.ndarray, exclude: np.ndarray, k: int):
    """The first k neighbours of each row other than its ``exclude`` row (order kept)."""
    if indices.shape[1] == k:
        return distances, indices
    kept = indices != exclude[:, None]
    # A stable sort of 'dropped' flags moves the dropped entry to the end, order kept.
    order = np.argsort(~kept, axis=1, kind="stable")[:, :k]
    return (np.take_along_axis(distances, order, axis=1),
            np.take_along_axis(indices, order, axis=1))
