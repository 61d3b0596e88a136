"""grain pipelines: the infinite, checkpointable P x K training iterator and the eval iterator.

Training: a `MapDataset` over this host's element positions e = step * L + j
(L = P*K / process_count), mapped to (step -> epoch, batch; j -> global position
g = process_index * L + j) -> source index `sampler.batches(epoch)[batch, g]` -> decoded,
augmented uint8 image, then batched to L BEFORE `mp_prefetch`: each worker produces
whole batches, so the P x K composition survives any worker count. Normalisation to
float32 runs last, in the main process (uint8 crosses the process boundary: 4x less).

Augmentation randomness is `np.random.default_rng([seed, step, g])`: the same global
batch, pixel for pixel, for any number of hosts and workers, and after a resume.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time

import grain
import numpy as np
from absl import flags

from gl_jax.data.sampler import PKSampler, host_slice
from gl_jax.data.sources import CorruptImageError, Source, load_with_fallback
from gl_jax.data.transforms import NORMALIZATIONS, RESAMPLING, eval_transform, normalize
from gl_jax.data.transforms import train_transform

# an "infinite" run: 10**12 steps, far beyond any training.
_MAX_STEPS = 10 ** 12


def make_sampler(source: Source, sampler_config, seed: int = 0) -> PKSampler:
    return PKSampler(source.labels, int(sampler_config.classes_per_batch),
                     int(sampler_config.samples_per_class), str(sampler_config.mode), seed)


def steps_per_epoch(source: Source, sampler_config) -> int:
    """Training steps (global batches) per epoch; see gl_jax.data.sampler for the formula."""
    return make_sampler(source, sampler_config).num_batches()


def validate_data_config(data_config) -> None:
    """Raises ValueError naming the field for values the pipeline cannot use."""
    if data_config.normalization not in NORMALIZATIONS:
        raise ValueError(f"data.normalization={data_config.normalization!r} is not one of "
                         f"{NORMALIZATIONS}")
    interpolation = data_config.get("interpolation", "bilinear")
    if interpolation not in RESAMPLING:
        raise ValueError(f"data.interpolation={interpolation!r} is not one of "
                         f"{tuple(RESAMPLING)}")
    if not 0 < int(data_config.image_size) <= int(data_config.resize_size):
        raise ValueError(f"data.image_size={data_config.image_size} must be in (0, "
                         f"data.resize_size={data_config.resize_size}]")
    low, high = data_config.crop_scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"data.crop_scale={tuple(data_config.crop_scale)} must satisfy "
                         "0 < low <= high <= 1")
    low, high = data_config.crop_ratio
    if not 0 < low <= high:
        raise ValueError(f"data.crop_ratio={tuple(data_config.crop_ratio)} must satisfy "
                         "0 < low <= high")
    if int(data_config.worker_count) < 0:
        raise ValueError(f"data.worker_count={data_config.worker_count} must be >= 0")


def _local_batch_size(global_size: int, process_count: int) -> int:
    if global_size % process_count:
        raise ValueError(f"batch size {global_size} is not divisible by process_count="
                         f"{process_count}")
    return global_size // process_count


class _ClassMembers:
    """label -> sorted indices of that class, computed once per process."""

    def __init__(self, labels: np.ndarray):
        order = np.argsort(labels, kind="stable")
        self.classes, starts = np.unique(labels[order], return_index=True)
        self.groups = np.split(order, starts[1:])

    def __call__(self, label: int) -> np.ndarray:
        return self.groups[int(np.searchsorted(self.classes, label))]


class _TrainElement:
    """Element position -> dict(image uint8 [S,S,3], label, index, step, epoch). Picklable."""

    def __init__(self, source, sampler, data_config, local, process_index, start_step):
        self.source = source
        self.sampler = sampler
        self.local = local
        self.offset = process_index * local
        self.start_step = start_step
        self.steps = sampler.num_batches()
        self.seed = int(data_config.seed)
        self.augment = bool(data_config.augment)
        self.image_size = int(data_config.image_size)
        self.resize_size = int(data_config.resize_size)
        self.scale = tuple(data_config.crop_scale)
        self.ratio = tuple(data_config.crop_ratio)
        self.flip = bool(data_config.flip)
        self.interpolation = str(data_config.get("interpolation", "bilinear"))
        self.skip_corrupt = bool(data_config.skip_corrupt)
        self._init_caches()

    def _init_caches(self):
        # per process; read_threads call __call__ concurrently, hence the lock.
        self._lock = threading.Lock()
        self._cache: dict[int, np.ndarray] = {}
        self._members = None
        self._known_bad: set = set()

    def __getstate__(self):  # worker processes get the arguments, not the caches or lock
        state = self.__dict__.copy()
        for key in ("_lock", "_cache", "_members", "_known_bad"):
            state.pop(key)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_caches()

    def _epoch(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._cache:
                if len(self._cache) >= 2:  # threads may still be finishing the last epoch
                    self._cache.pop(min(self._cache))
                self._cache[epoch] = self.sampler.batches(epoch)
            if self._members is None:
                self._members = _ClassMembers(self.source.labels)
            return self._cache[epoch]

    def record(self, position: int) -> tuple[int, int, int, int]:
        """(source index, step, slot in the global batch, epoch) of element `position`."""
        step = self.start_step + position // self.local
        slot = self.offset + position % self.local
        epoch, batch = divmod(step, self.steps)
        return int(self._epoch(epoch)[batch, slot]), step, slot, epoch

    def __call__(self, position: int) -> dict:
        index, step, slot, epoch = self.record(position)
        image, _ = load_with_fallback(self.source, index, self.skip_corrupt, self._members,
                                      self._known_bad)
        if self.augment:
            rng = np.random.default_rng([self.seed, step, slot])
            image = train_transform(image, rng, self.image_size, self.scale, self.ratio,
                                    self.flip, self.interpolation)
        else:
            image = eval_transform(image, self.image_size, self.resize_size, self.interpolation)
        return dict(image=image, label=np.int32(self.source.labels[index]), index=index,
                    step=step, epoch=epoch)


def _stack(elements) -> dict:
    return dict(image=np.stack([e["image"] for e in elements]),
                label=np.asarray([e["label"] for e in elements], np.int32),
                index=np.asarray([e["index"] for e in elements], np.int64),
                step=elements[0]["step"], epoch=elements[0]["epoch"])


def _normalize_batch(batch: dict, normalization: str) -> dict:
    batch = dict(batch)
    batch["image"] = normalize(batch["image"], normalization)
    return batch


def exit_with_parent(worker_index: int = 0, worker_count: int = 0, *, parent: int,
                     poll_s: float = 1.0) -> threading.Thread:
    """Run in each grain worker: a watcher thread ends the worker once ``parent``, the
    process that started it, is gone (also when it died while the worker was still
    starting). A SIGKILLed trainer runs no clean-up, and its workers (a few hundred MB
    each) would otherwise keep running, reparented, until killed by hand. (A parent-death
    signal would fire when the starting *thread* exits, not the process.)"""
    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)
    watcher = threading.Thread(target=watch, name="gl_jax-exit-with-parent", daemon=True)
    watcher.start()
    return watcher


def _finish(dataset: grain.MapDataset, data_config, normalize: bool = True
            ) -> grain.IterDataset:
    read = grain.ReadOptions(num_threads=int(data_config.get("read_threads", 2)),
                             prefetch_buffer_size=int(data_config.get("prefetch_batches", 2)))
    it = dataset.to_iter_dataset(read)
    workers = int(data_config.worker_count)
    if workers > 0:
        # grain's workers read absl flags; a program that never parsed them (a test, a
        # notebook) would fail there with UnparsedFlagAccessError.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers),
                            worker_init_fn=functools.partial(exit_with_parent,
                                                             parent=os.getpid()))
    if not normalize:
        return it
    return it.map(functools.partial(_normalize_batch,
                                    normalization=str(data_config.normalization)))


def make_train_iterator(source: Source, data_config, sampler_config, *, process_index: int = 0,
                        process_count: int = 1, start_step: int = 0, features=None,
                        normalize: bool = True):
    """An infinite grain iterator of this host's slice of the global P x K batches.

    Yields dict(image float32 [L, S, S, 3] normalised, label int32 [L], index int64 [L]
    (source indices), step int, epoch int), L = P*K / process_count. `normalize=False`:
    the images stay uint8 (a quarter of the bytes to move), for a step that normalises
    them on the device (`gl_jax.runtime.normalize_images`, the same values). Epoch e covers
    steps [e * steps_per_epoch, (e+1) * steps_per_epoch). `start_step` starts the stream
    later (e.g. start_epoch * steps_per_epoch); to resume a run, restore the iterator's
    state instead (`grain.checkpoint.CheckpointRestore`): the next batch is the exact one
    the interrupted run would have got.

    `features` [len(source), C]: precomputed per-record features (a frozen backbone's,
    on fixed inputs); the batches' 'image' is then their rows, nothing is decoded.
    """
    validate_data_config(data_config)
    sampler = make_sampler(source, sampler_config, int(data_config.seed))
    local = _local_batch_size(sampler.batch_size, process_count)
    host_slice(np.zeros((1, sampler.batch_size)), process_index, process_count)  # validates
    element = _TrainElement(source, sampler, data_config, local, process_index, start_step)
    if features is not None:
        if len(features) != len(source):
            raise ValueError(f"features has {len(features)} rows for {len(source)} records")
        element = _FeatureElement(element, np.asarray(features, np.float32))
    logging.info("train data %s: %d images, %d classes, %s sampler %d x %d, %d steps/epoch, "
                 "host %d/%d reads %d per step", source.name, len(source), len(sampler.counts),
                 sampler.mode, sampler.classes_per_batch, sampler.samples_per_class,
                 sampler.num_batches(), process_index, process_count, local)
    dataset = (grain.MapDataset.range(_MAX_STEPS * local).map(element)
               .batch(local, drop_remainder=True, batch_fn=_stack))
    return iter(_finish(dataset, data_config, normalize=normalize and features is None))


class _FeatureElement:
    """The P x K order of `_TrainElement`, with each record's precomputed feature row."""

    def __init__(self, element: _TrainElement, features: np.ndarray):
        self.element, self.features = element, features

    def __call__(self, position: int) -> dict:
        index, step, _, epoch = self.element.record(position)
        return dict(image=self.features[index],
                    label=np.int32(self.element.source.labels[index]), index=index,
                    step=step, epoch=epoch)


class _EvalElement:
    """Element position -> one eval record, or a padding row (mask False) past the end."""

    def __init__(self, source, data_config, global_size, local, process_index, features=None):
        self.source = source
        self.features = features
        self.global_size = global_size
        self.local = local
        self.offset = process_index * local
        self.image_size = int(data_config.image_size)
        self.resize_size = int(data_config.resize_size)
        self.interpolation = str(data_config.get("interpolation", "bilinear"))
        self.skip_corrupt = bool(data_config.skip_corrupt)

    def __call__(self, position: int) -> dict:
        step, slot = divmod(position, self.local)
        index = step * self.global_size + self.offset + slot
        size = self.image_size
        shape = (size, size, 3) if self.features is None else self.features.shape[1:]
        pad = dict(image=np.zeros(shape, np.uint8 if self.features is None else np.float32),
                   label=-1, camera=-1, index=-1, mask=False)
        if index >= len(self.source):
            return pad
        camera = -1 if self.source.cameras is None else int(self.source.cameras[index])
        if self.features is not None:
            return dict(image=self.features[index], label=int(self.source.labels[index]),
                        camera=camera, index=index, mask=True)
        try:
            image = self.source.load_pil(index)
        except CorruptImageError as err:
            if not self.skip_corrupt:
                raise
            # evaluating another image in its place would change the eval set: mask it out.
            logging.warning("skip_corrupt: %s; left out of the evaluation (mask False)", err)
            return dict(pad, index=index)
        return dict(image=eval_transform(image, size, self.resize_size, self.interpolation),
                    label=int(self.source.labels[index]), camera=camera, index=index, mask=True)


def _stack_eval(elements) -> dict:
    return dict(image=np.stack([e["image"] for e in elements]),
                label=np.asarray([e["label"] for e in elements], np.int32),
                camera=np.asarray([e["camera"] for e in elements], np.int32),
                index=np.asarray([e["index"] for e in elements], np.int64),
                mask=np.asarray([e["mask"] for e in elements], bool))


def eval_steps(source: Source, batch_size: int) -> int:
    """Number of eval batches: ceil(len(source) / batch_size)."""
    return -(-len(source) // int(batch_size))


def make_eval_iterator(source: Source, data_config, batch_size: int, *, process_index: int = 0,
                       process_count: int = 1, features=None, normalize: bool = True):
    """One pass over `source` in index order, `batch_size` records per global batch.

    Global batch b holds records [b * batch_size, (b + 1) * batch_size); this host gets
    its contiguous slice of batch_size / process_count rows. Yields dict(image float32
    [L, S, S, 3], label int32 [L], camera int32 [L] (-1 unknown), index int64 [L],
    mask bool [L]); rows past the end are padding (mask False, label/index -1), so every
    batch has the same shape. With skip_corrupt, a corrupt image's row has mask False.
    `normalize=False`: the images stay uint8, as in `make_train_iterator`.

    `features` [len(source), C]: precomputed per-record features (a frozen backbone's);
    the batches' 'image' is then their rows [L, C], nothing is decoded.
    """
    validate_data_config(data_config)
    local = _local_batch_size(int(batch_size), process_count)
    host_slice(np.zeros((1, int(batch_size))), process_index, process_count)  # validates
    if features is not None:
        if len(features) != len(source):
            raise ValueError(f"{source.name}: {len(features)} feature rows for {len(source)} "
                             "records")
        features = np.asarray(features, np.float32)
    element = _EvalElement(source, data_config, int(batch_size), local, process_index, features)
    dataset = (grain.MapDataset.range(eval_steps(source, batch_size) * local).map(element)
               .batch(local, drop_remainder=True, batch_fn=_stack_eval))
    return iter(_finish(dataset, data_config, normalize=normalize and features is None))
