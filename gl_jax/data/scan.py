"""A check of every record of every split before training starts.

Without it a truncated JPEG, a text file named `.jpg` or a dangling symlink surfaces
when the pipeline first reads it (often at the first evaluation, hours in), and a class
too small for the P x K sampler is silently never trained on. `scan_splits` finds all
of them up front and raises one `DataCheckError` that lists them:

  report = scan_splits(splits, sampler_config=config.sampler,
                       skip_corrupt=config.data.skip_corrupt)
  splits = report.splits   # with skip_corrupt: the splits without the unreadable records

Two depths (`full_decode`):
  False ('header'): stat (exists, regular file, not empty), then PIL opens the header
    (format, size, mode) and reads the whole stream cheaply: JPEG is decoded at 1/8
    scale (`draft`, the same entropy decoding, so a truncated or damaged file still
    fails), PNG's chunk CRCs are verified up to IEND; other formats are decoded fully.
  True ('full'): stat, then the decode and RGB conversion the pipeline does.
Array-backed records (digits) need no check; encoded records (TFDS) skip the stat.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import logging
import re
import time
from typing import Callable, Mapping

import numpy as np
from PIL import Image

from gl_jax.data.sampler import MODES, chunks_per_class
from gl_jax.data.sources import (RGB_MODES, ArraySource, EncodedSource, FileSource, Source,
                                 SubsetSource, file_problem, to_rgb)
from gl_jax.data.progress import bar as progress_bar

SKIP_FLAG = "--config.data.skip_corrupt=True"
_BLOCK = 256  # records per thread-pool task: few futures, a smooth progress bar


class DataCheckError(ValueError):
    """The data cannot train as configured: unreadable files and / or undrawable classes."""


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """A record whose image cannot be read: `name` is its file (or `split[index]`)."""
    split: str
    index: int
    name: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ClassIssue:
    """A class of a sampled split that the sampler never draws (chunks 0) or pads."""
    split: str
    label: int
    name: str
    count: int    # readable images of the class
    chunks: int   # chunks of K it yields per epoch; 0 = never drawn


@dataclasses.dataclass(frozen=True)
class ScanReport:
    """What `scan_splits` found. `splits` is what to train and evaluate on.

    bad: every unreadable record (also those of a split that shares files with another).
    undrawable: classes the sampler never draws (only when the scan did not raise, i.e.
      undrawable='warn'). padded: classes smaller than K that the sampler completes with
      repeated images (legitimate, logged).
    """
    mode: str                       # 'header' | 'full'
    records: Mapping[str, int]      # records per split, before any drop
    files_checked: int              # distinct files / encoded records checked
    bad: tuple[BadRecord, ...]
    undrawable: tuple[ClassIssue, ...]
    padded: tuple[ClassIssue, ...]
    seconds: float
    splits: Mapping[str, Source]

    @property
    def ok(self) -> bool:
        return not self.bad and not self.undrawable

    def bad_indices(self, split: str) -> np.ndarray:
        """int64 sorted indices of `split`'s unreadable records."""
        return np.asarray(sorted(b.index for b in self.bad if b.split == split), np.int64)


# ------------------------------------------------------------------ record checks

def _open_check(opener: Callable[[], Image.Image], full: bool) -> str | None:
    """Opens an image and reads its stream: fully (and converts it to RGB, as the pipeline
    does) when `full`, else cheaply (see the module docstring)."""
    with opener() as img:
        if img.mode not in RGB_MODES:
            return f"image mode {img.mode!r} has no conversion to RGB"
        if img.width == 0 or img.height == 0:
            return f"size {img.size}"
        if full:
            img.load()
            to_rgb(img)
        elif img.format == "JPEG":
            img.draft(img.mode, (1, 1))  # 1/8-scale decode: every byte still entropy-decoded
            img.load()
        elif img.format == "PNG":
            img.verify()
        else:  # BMP, GIF, TIFF, WebP: verify() checks little, decode them
            img.load()
    return None


def _reason(err: BaseException) -> str:
    # PIL names an in-memory stream by its repr: noise next to the file's own name.
    message = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err))
    return f"{type(err).__name__}: {message}"


def _check_record(leaf: Source, index: int, full: bool) -> str | None:
    """Why record `index` of a leaf source cannot be read, or None."""
    try:
        if isinstance(leaf, FileSource):
            path = leaf.paths[index]
            problem = file_problem(path)  # before any open: a FIFO would block
            if problem is not None:
                return problem
            return _open_check(lambda: Image.open(path), full)
        if isinstance(leaf, EncodedSource):
            data = leaf.read_bytes(index)
            return _open_check(lambda: Image.open(io.BytesIO(data)), full)
        leaf.load_pil(index)  # another kind of source: its own decode
        return None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...
        return _reason(err)


def _leaf_indices(source: Source) -> tuple[Source, np.ndarray]:
    """The source that holds the images and the index of each record in it."""
    indices = np.arange(len(source), dtype=np.int64)
    while isinstance(source, SubsetSource):
        indices = source.indices[indices]
        source = source.parent
    return source, indices


def _record_keys(leaf: Source, indices: np.ndarray) -> list:
    # files are keyed by path: two splits listing one file check it once.
    if isinstance(leaf, FileSource):
        return [leaf.paths[i] for i in indices]
    return [(id(leaf), int(i)) for i in indices]


def _check_all(tasks: dict, full: bool, threads: int | None, progress: bool) -> dict:
    """{key: (leaf, index)} -> {key: reason} of the unreadable ones, on a thread pool."""
    items = list(tasks.items())
    blocks = [items[i:i + _BLOCK] for i in range(0, len(items), _BLOCK)]

    def check_block(block):
        found = {}
        for key, (leaf, index) in block:
            reason = _check_record(leaf, index, full)
            if reason is not None:
                found[key] = reason
        return found, len(block)

    bad = {}
    bar = progress_bar(total=len(items), desc=f"data scan ({'full' if full else 'header'})",
                       leave=False, unit="img", disable=not progress, mininterval=1.0)
    with bar, concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for found, n in pool.map(check_block, blocks):
            bad.update(found)
            bar.update(n)
    return bad


# ------------------------------------------------------------------ class sizes

def class_issues(source: Source, split: str, sampler_config,
                 drop: np.ndarray | None = None) -> tuple[list[ClassIssue], list[ClassIssue]]:
    """(undrawable, padded) classes of `source` for `sampler_config` (P, K, mode).

    The rule is the sampler's own (`chunks_per_class`): in 'official' mode a class with
    min(2 n, n_max + 1) < K yields no chunk and is never drawn; one with n < K that
    still yields a chunk is padded with its own images repeated. In 'balanced' mode every
    class with an image is drawn; n < K is drawn with replacement. `drop`: records left
    out (unreadable), so n counts readable images; a class left with none is undrawable.
    """
    k = int(sampler_config.samples_per_class)
    mode = str(sampler_config.mode)
    if mode not in MODES:
        raise ValueError(f"sampler.mode={mode!r} is not one of {MODES}")
    labels = source.labels if drop is None else np.delete(source.labels, drop)
    counts = np.bincount(labels, minlength=source.num_classes)
    chunks = chunks_per_class(counts, k, mode)
    undrawable, padded = [], []
    for label in np.flatnonzero((chunks == 0) | (counts < k)):
        issue = ClassIssue(split, int(label), source.class_names[label], int(counts[label]),
                           int(chunks[label]))
        (undrawable if issue.chunks == 0 else padded).append(issue)
    return undrawable, padded


def _class_list(issues: list[ClassIssue], limit: int) -> str:
    shown = ", ".join(f"{c.name!r} ({c.count} image{'' if c.count == 1 else 's'})"
                      for c in issues[:limit])
    return shown + (f", ... ({len(issues) - limit} more)" if len(issues) > limit else "")


def _undrawable_message(issues: list[ClassIssue], source: Source, sampler_config, n_max: int,
                        limit: int) -> str:
    k, mode = int(sampler_config.samples_per_class), str(sampler_config.mode)
    split = issues[0].split
    rule = ("a class of n images yields floor(min(2 n, n_max + 1) / K) chunks of K"
            if mode == "official" else "a class needs at least one readable image")
    fixes = ["--config.sampler.mode=balanced (draws every class, a small one with "
             "replacement)"]
    sizes = [c.count for c in issues if c.count > 0]
    if mode == "official" and sizes:
        fixes.append(f"--config.sampler.samples_per_class={min(2 * min(sizes), n_max + 1)} "
                     "(<= 2 x the smallest class)")
    fixes.append("removing these classes from the data")
    message = (f"{split}: {len(issues)} of {source.num_classes} classes can never be drawn by "
               f"the {mode} sampler with samples_per_class K={k} ({rule}): "
               f"{_class_list(issues, limit)}.\nFix: " + "; or ".join(fixes) + ".")
    if any(c.count == 0 for c in issues):
        message += " A class with 0 readable images can only be removed or repaired."
    return (message + " To train without them on purpose (the reference CombineSampler "
            "does), scan with undrawable='warn'.")


# ------------------------------------------------------------------ entry point

def _bad_message(bad: list[BadRecord], checked: int, mode: str, limit: int) -> str:
    names: dict[str, str] = {}
    for record in bad:  # one line per file, even if two splits list it
        names.setdefault(record.name, record.reason)
    lines = [f"  {name}: {reason}" for name, reason in list(names.items())[:limit]]
    if len(names) > limit:
        lines.append(f"  ... and {len(names) - limit} more")
    splits = sorted({b.split for b in bad})
    return "\n".join(
        [f"{len(names)} of {checked} images cannot be read ({mode} scan; "
         f"{len(bad)} records of split(s) {', '.join(splits)}):"] + lines +
        [f"Fix or remove them, or set {SKIP_FLAG}: the scan then leaves these records out "
         "of every split (training never samples them, evaluation does not count them)."])


def _check_classes(source: Source, split: str, sampler_config, drop: np.ndarray,
                   undrawable: str, limit: int) -> tuple[list, list, list[str]]:
    """(undrawable, padded, error messages) of the sampled split; logs the warnings."""
    never, padded = class_issues(source, split, sampler_config, drop)
    errors = []
    if never:
        n_max = int(np.bincount(np.delete(source.labels, drop)).max(initial=0))
        message = _undrawable_message(never, source, sampler_config, n_max, limit)
        if undrawable == "error":
            errors.append(message)
        else:
            logging.warning("%s", message)
    p = int(sampler_config.classes_per_batch)
    if source.num_classes - len(never) < p:
        errors.append(f"{split}: {source.num_classes - len(never)} classes can be drawn, "
                      f"fewer than classes_per_batch={p}")
    if padded:
        how = ("padded with repeats of their own images (a chunk of K holds duplicates)"
               if str(sampler_config.mode) == "official" else "drawn with replacement")
        logging.warning("%s: %d classes have fewer than samples_per_class=%d images and are "
                        "%s: %s", split, len(padded), int(sampler_config.samples_per_class),
                        how, _class_list(padded, limit))
    return never, padded, errors


def _without(splits: Mapping[str, Source], bad: list[BadRecord]) -> dict[str, Source]:
    """The splits without their unreadable records (labels and class names kept)."""
    kept = dict(splits)
    for split in sorted({b.split for b in bad}):
        source = splits[split]
        drop = [b.index for b in bad if b.split == split]
        if len(drop) == len(source):
            raise DataCheckError(f"{split}: all {len(source)} records are unreadable")
        keep = np.setdiff1d(np.arange(len(source)), drop)
        kept[split] = SubsetSource(source.name, source, keep, relabel=False)
    return kept


def scan_splits(splits: Mapping[str, Source], *, sampler_config=None, skip_corrupt: bool = False,
                full_decode: bool = False, threads: int | None = None, progress: bool = True,
                undrawable: str = "error", sampled_split: str = "train",
                max_listed: int = 20) -> ScanReport:
    """Checks every record of every split and the class sizes of the sampled split.

    Args:
      splits: {'train': source, 'test' | 'query', 'gallery', ['val']: source}.
      sampler_config: `config.sampler` (classes_per_batch, samples_per_class, mode);
        None skips the class-size check.
      skip_corrupt: `config.data.skip_corrupt`. False: an unreadable record raises.
        True: unreadable records are logged and left out of `report.splits` (labels and
        class names unchanged), so the sampler never draws them and its class sizes are
        the readable ones; evaluation then scores the readable records only.
      full_decode: False: header scan; True: full decode (see the module docstring).
      threads: thread-pool size (None: Python's default, min(32, cpus + 4)).
      progress: a tqdm bar on stderr.
      undrawable: 'error' (default) or 'warn' for classes the sampler never draws.
      sampled_split: the split the P x K sampler draws from.
      max_listed: files / classes named in a message.

    Returns a `ScanReport`. Raises `DataCheckError` (a ValueError) listing the first
    `max_listed` unreadable files with their reasons and the total when any record is
    unreadable and not skip_corrupt, and naming the classes the sampler can never draw
    (with the fixes) unless undrawable='warn'; both in one message when both happen.
    """
    if undrawable not in ("error", "warn"):
        raise ValueError(f"undrawable={undrawable!r} is not 'error' or 'warn'")
    if sampler_config is not None and sampled_split not in splits:
        raise ValueError(f"sampled_split={sampled_split!r} is not one of the splits "
                         f"{sorted(splits)}")
    start = time.perf_counter()
    mode = "full" if full_decode else "header"
    tasks: dict = {}
    keys_of: dict[str, list] = {}
    for split, source in splits.items():
        leaf, indices = _leaf_indices(source)
        if isinstance(leaf, ArraySource):  # decoded arrays: nothing can be unreadable
            continue
        keys_of[split] = _record_keys(leaf, indices)
        for key, index in zip(keys_of[split], indices):
            tasks.setdefault(key, (leaf, int(index)))
    unreadable = _check_all(tasks, full_decode, threads, progress) if tasks else {}
    bad = [BadRecord(split, index, key if isinstance(key, str) else
                     splits[split].describe(index), unreadable[key])
           for split, keys in keys_of.items() for index, key in enumerate(keys)
           if key in unreadable]

    errors = []
    if bad and not skip_corrupt:
        errors.append(_bad_message(bad, len(tasks), mode, max_listed))
    elif bad:
        logging.warning("%s\nskip_corrupt=True: these records are left out.",
                        _bad_message(bad, len(tasks), mode, max_listed).rsplit("\n", 1)[0])

    never, padded = [], []
    if sampler_config is not None:
        drop = [b.index for b in bad if b.split == sampled_split] if skip_corrupt else []
        never, padded, message = _check_classes(splits[sampled_split], sampled_split,
                                                sampler_config, np.asarray(drop, np.int64),
                                                undrawable, max_listed)
        errors += message
    if errors:
        raise DataCheckError("data check failed:\n" + "\n".join(errors))
    kept = _without(splits, bad)
    seconds = time.perf_counter() - start
    logging.info("data scan (%s): %d images checked in %.1f s, %d unreadable", mode, len(tasks),
                 seconds, len(bad))
    return ScanReport(mode, {s: len(src) for s, src in splits.items()}, len(tasks), tuple(bad),
                      tuple(never), tuple(padded), seconds, kept)
