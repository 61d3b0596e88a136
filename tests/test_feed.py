"""BatchFeed: the trainer's batches fetched one ahead, with the checkpointed position of
the last batch taken (not of the one fetched ahead)."""
import threading

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from gl_jax import checkpoints as ckpt
from gl_jax import data as gdata
from gl_jax.feed import BatchFeed


@pytest.fixture(scope="module")
def sharding():
    return NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), P("data"))


def _iterator(digits):
    config, sampler_config, splits = digits
    return gdata.make_train_iterator(splits["train"], config, sampler_config)


def test_same_batches_as_the_iterator_and_fetched_ahead_in_another_thread(digits, sharding):
    want = [next(it) for it in [_iterator(digits)] for _ in range(4)]
    threads = []

    class Recording:
        """The grain iterator, noting which thread each batch is read on."""

        def __init__(self, inner):
            self.inner = inner

        def __next__(self):
            threads.append(threading.current_thread().name)
            return next(self.inner)

        def get_state(self):
            return self.inner.get_state()

    feed = BatchFeed(Recording(_iterator(digits)), sharding)
    try:
        got = [next(feed) for _ in range(4)]
        feed.get_state()                  # waits for the fetch ahead
        assert len(threads) == 5          # the fifth is the one fetched ahead
    finally:
        feed.close()
    for a, b in zip(want, got):
        assert isinstance(b["image"], jax.Array) and b["image"].sharding == sharding
        np.testing.assert_array_equal(np.asarray(b["image"]), a["image"])
        np.testing.assert_array_equal(np.asarray(b["label"]), a["label"])
    assert set(threads) != {threading.current_thread().name}
    assert all(name.startswith("gl_jax-feed") for name in threads)


@pytest.mark.parametrize("taken", [0, 1, 3])
def test_checkpoint_holds_the_position_after_the_last_batch_taken(digits, sharding, tmp_path,
                                                                  taken):
    """Saved through Checkpoints while a batch is fetched ahead, restored into a fresh grain
    iterator: the next batch is the one the feed would have returned next."""
    feed = BatchFeed(_iterator(digits), sharding)
    try:
        for _ in range(taken):
            next(feed)
        checkpoints = ckpt.Checkpoints(str(tmp_path), _checkpoint_config())
        state = {"w": np.zeros(3, np.float32)}
        checkpoints.save(state, feed, {"step": taken + 1})
        want = [np.asarray(next(feed)["image"]) for _ in range(2)]
    finally:
        feed.close()
    resumed = _iterator(digits)
    checkpoints.restore_iterator(taken + 1, resumed)
    for a in want:
        np.testing.assert_array_equal(next(resumed)["image"], a)


def _checkpoint_config():
    config = ml_collections.ConfigDict()
    config.checkpoint = ml_collections.ConfigDict(dict(max_to_keep=2))
    return config


class _Failing:
    """Batches 0, 1, then an error for batch 2, then batch 3."""

    def __init__(self):
        self.position = 0

    def get_state(self):
        return {"position": self.position}

    def __next__(self):
        self.position += 1
        if self.position == 3:
            raise OSError("disk gone while reading batch 2")
        n = self.position - 1
        return {"image": np.full((2, 1), n, np.float32), "label": np.full(2, n, np.int32)}


def test_an_error_surfaces_at_the_batch_it_concerns(sharding):
    feed = BatchFeed(_Failing(), sharding)
    try:
        assert np.asarray(next(feed)["label"]).tolist() == [0, 0]
        # batch 2's read has failed by now (fetched ahead); the position is still readable.
        assert feed.get_state() == {"position": 1}
        assert np.asarray(next(feed)["label"]).tolist() == [1, 1]
        assert feed.get_state() == {"position": 2}
        with pytest.raises(OSError, match="disk gone while reading batch 2"):
            next(feed)
        assert np.asarray(next(feed)["label"]).tolist() == [3, 3]
    finally:
        feed.close()


def test_end_of_data_and_close(sharding):
    closed = []

    class Short:
        def __init__(self):
            self.items = iter([{"image": np.zeros((2, 1), np.float32),
                                "label": np.zeros(2, np.int32)}])

        def get_state(self):
            return {}

        def __next__(self):
            return next(self.items)

        def close(self):
            closed.append(True)

    feed = BatchFeed(Short(), sharding)
    assert list(feed)[0]["image"].shape == (2, 1)
    feed.close()
    assert closed == [True]
