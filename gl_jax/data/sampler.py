"""The P x K class-balanced batch sampler (P = classes_per_batch, K = samples_per_class).

Both modes are pure functions of (labels, P, K, seed, epoch): every host computes the
same global batch order, and a resumed run recomputes exactly the same batches.

`official` (the official code's CombineSampler, exactly):
  1. shuffle each class's indices;
  2. pad class c by repeating its own first images to length min(2 n_c, n_max + 1);
  3. cut each class into chunks of K, dropping the rest (a class with min(2 n_c,
     n_max + 1) < K is never sampled);
  4. shuffle the chunks; consecutive groups of P chunks form a batch, the last partial
     batch is dropped. Two chunks of one class can land in one batch.
  Epoch length: floor(sum_c floor(min(2 n_c, n_max + 1) / K) / P) batches (constant).

`balanced` (every batch has exactly P distinct classes with K images each):
  1. class c gets v_c = ceil(n_c / K) chunks of K: its shuffled images, the last chunk
     completed by other images of the class drawn without repetition within the chunk;
     a class with n_c < K is drawn with replacement (logged once per sampler);
  2. the epoch has B batches, B the largest integer with sum_c min(v_c, B) >= B P (the
     most batches of P distinct classes that the chunk counts allow); class c
     contributes min(v_c, B) chunks;
  3. the surplus sum_c min(v_c, B) - B P (< P) chunks are dropped one at a time, each
     time from a class with the most chunks left (ties at random);
  4. the chunks are laid out class after class in a shuffled class order, and chunk t
     goes to batch t mod B (a run of <= B chunks of one class lands in B distinct
     batches, so the classes in a batch are distinct);
  5. batch order and the order of the P classes inside each batch are shuffled.
  Every class appears every epoch unless all classes are down to one chunk (then fewer
  than P random classes sit out), and every image of a class with v_c <= B chunks
  appears unless that class lost a chunk in step 3 (< P chunks per epoch). A class
  with more than B chunks of images contributes B chunks of random images. Epoch
  length B is constant.

Within a batch the K images of a class are consecutive, class after class (the Group
Loss takes the first occurrences of each class as anchors, which are random because
step 1 shuffles).
"""
from __future__ import annotations

import logging

import numpy as np

MODES = ("official", "balanced")


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), 0x5A3D])


def chunks_per_class(counts, samples_per_class: int, mode: str) -> np.ndarray:
    """int64 [C]: the chunks of K images class c yields each epoch, from its size counts[c].

    official: floor(min(2 n_c, n_max + 1) / K), so 0 (the class is never sampled) when
    min(2 n_c, n_max + 1) < K. balanced: ceil(n_c / K) >= 1 for every non-empty class.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if mode == "official":
        return np.minimum(2 * counts, counts.max() + 1) // int(samples_per_class)
    return -(-counts // int(samples_per_class))


class PKSampler:
    """Global P x K batches of source indices for each epoch.

    Args:
      labels: int [N], the class of each record of the source (any integers).
      classes_per_batch: P.
      samples_per_class: K.
      mode: 'official' or 'balanced' (see the module docstring for the exact rules).
      seed: with the epoch number, determines everything.

    `batches(epoch)` -> int64 [num_batches, P * K] of indices into the source.
    """

    def __init__(self, labels, classes_per_batch: int, samples_per_class: int,
                 mode: str = "official", seed: int = 0):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
        if mode not in MODES:
            raise ValueError(f"sampler mode={mode!r} is not one of {MODES}")
        if classes_per_batch < 1 or samples_per_class < 1:
            raise ValueError(f"classes_per_batch={classes_per_batch} and samples_per_class="
                             f"{samples_per_class} must be >= 1")
        self.classes, inverse = np.unique(labels, return_inverse=True)
        if len(self.classes) < classes_per_batch:
            raise ValueError(f"the dataset has {len(self.classes)} classes, fewer than "
                             f"classes_per_batch={classes_per_batch}")
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse)
        # members[c]: indices of class c in increasing index order (before any shuffle).
        self.members = np.split(order, np.cumsum(counts)[:-1])
        self.counts = counts
        self.classes_per_batch = int(classes_per_batch)
        self.samples_per_class = int(samples_per_class)
        self.batch_size = self.classes_per_batch * self.samples_per_class
        self.mode = mode
        self.seed = int(seed)
        k = self.samples_per_class
        self.chunks_per_class = chunks_per_class(counts, k, mode)
        if mode == "official":
            self._num_batches = int(self.chunks_per_class.sum() // self.classes_per_batch)
        else:
            self._num_batches = _max_distinct_batches(self.chunks_per_class,
                                                      self.classes_per_batch)
            small = counts < k
            if small.any():  # logged here, once, not at every epoch
                logging.warning("balanced sampler: %d classes have fewer than samples_per_class="
                                "%d images and are sampled with replacement (e.g. class %s with "
                                "%d)", int(small.sum()), k, self.classes[np.argmax(small)],
                                int(counts[np.argmax(small)]))
        if self._num_batches == 0:
            raise ValueError(
                f"{mode} sampler: no complete batch of {classes_per_batch} x {samples_per_class}"
                f" fits the class sizes (largest class {counts.max()}, "
                f"{len(counts)} classes)")

    def num_batches(self, epoch: int = 0) -> int:
        """Batches per epoch; the same for every epoch (see the module docstring)."""
        del epoch
        return self._num_batches

    def __len__(self) -> int:
        return self._num_batches

    def batches(self, epoch: int) -> np.ndarray:
        """int64 [num_batches, P * K]: the source indices of every batch of `epoch`."""
        rng = _epoch_rng(self.seed, epoch)
        if self.mode == "official":
            out = self._official(rng)
        else:
            out = self._balanced(rng)
        return out.reshape(self._num_batches, self.batch_size)

    def _official(self, rng: np.random.Generator) -> np.ndarray:
        k, n_max = self.samples_per_class, int(self.counts.max())
        chunks = []
        for members in self.members:
            shuffled = rng.permutation(members)
            # CombineSampler: inds.extend(inds[:n_max - n + 1]); the slice stops at n.
            padded = np.concatenate([shuffled, shuffled[:n_max - len(shuffled) + 1]])
            usable = (len(padded) // k) * k
            chunks.extend(padded[:usable].reshape(-1, k))
        chunks = np.stack(chunks)
        chunks = chunks[rng.permutation(len(chunks))]
        return chunks[:self._num_batches * self.classes_per_batch]

    def _balanced(self, rng: np.random.Generator) -> np.ndarray:
        k, p, b = self.samples_per_class, self.classes_per_batch, self._num_batches
        class_chunks = []
        for members in self.members:
            n = len(members)
            shuffled = rng.permutation(members)
            v = -(-n // k)
            fill = v * k - n
            if fill:
                if n >= k:
                    # complete the last chunk with images not already in it.
                    last = shuffled[(v - 1) * k:]
                    pool = shuffled[:(v - 1) * k]
                    extra = rng.choice(pool, fill, replace=False)
                else:
                    extra = rng.choice(members, fill, replace=True)
                shuffled = np.concatenate([shuffled, extra])
                if n >= k:
                    assert len(np.unique(np.concatenate([last, extra]))) == k
            class_chunks.append(shuffled.reshape(v, k)[:b])
        # sum_c min(v_c, B) - B P < P surplus chunks: drop them one at a time from the class
        # with the most chunks left (ties at random), so a class keeps a chunk if any can.
        kept = np.asarray([len(c) for c in class_chunks])
        for _ in range(int(kept.sum()) - b * p):
            kept[rng.choice(np.flatnonzero(kept == kept.max()))] -= 1
        sequence = np.concatenate([class_chunks[c][:kept[c]]
                                   for c in rng.permutation(len(class_chunks))])
        # chunk t -> batch t mod b, slot t // b: a class's consecutive run lands in distinct
        # batches.
        grid = sequence.reshape(p, b, k).transpose(1, 0, 2)  # [b, p, k]
        grid = grid[rng.permutation(b)]
        slots = np.argsort(rng.random((b, p)), axis=1)
        grid = np.take_along_axis(grid, slots[:, :, None], axis=1)
        return grid.reshape(b * p, k)


def _max_distinct_batches(chunks_per_class: np.ndarray, classes_per_batch: int) -> int:
    """Largest B with sum_c min(v_c, B) >= B * P (B batches of P distinct classes exist)."""
    low, high = 0, int(chunks_per_class.sum() // classes_per_batch)
    while low < high:  # sum_c min(v_c, B) - B P is concave in B: bisect on feasibility.
        mid = (low + high + 1) // 2
        if np.minimum(chunks_per_class, mid).sum() >= mid * classes_per_batch:
            low = mid
        else:
            high = mid - 1
    return low


def host_slice(global_batch: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This host's contiguous slice of global batches [..., P*K] -> [..., P*K / process_count]."""
    size = global_batch.shape[-1]
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count="
                         f"{process_count})")
    if size % process_count:
        raise ValueError(f"global batch size {size} is not divisible by process_count="
                         f"{process_count}")
    local = size // process_count
    return global_batch[..., process_index * local:(process_index + 1) * local]
