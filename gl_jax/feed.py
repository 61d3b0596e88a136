"""The trainer's input: global batches, the next one fetched while the current step runs.

The host's work for the next batch (grain's last stage in this process, the copy into a
global array) overlaps the running step: one thread fetches a batch ahead of the loop,
whatever JAX's dispatch does (on some backends a computation runs on the calling
thread). Image batches arrive uint8 (the step normalises them).

A checkpoint must hold the position after the last batch the loop *took*, not after the
one fetched ahead: `get_state` is the iterator's state from just before that fetch, so a
resumed run gets the fetched-ahead batch again, exactly as without the feed.
"""
from __future__ import annotations

import concurrent.futures

from gl_jax import runtime


class BatchFeed:
    """`next(feed)` -> the next batch of `iterator` as arrays sharded by `sharding`."""

    def __init__(self, iterator, sharding, keys=("image", "label")):
        self.iterator = iterator
        self._sharding, self._keys = sharding, keys
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gl_jax-feed")
        self._ahead: concurrent.futures.Future | None = None

    def _fetch(self):
        """(state before the fetch, global batch or the exception the fetch raised)."""
        state = self.iterator.get_state()
        try:
            return state, runtime.to_global(next(self.iterator), self._sharding, self._keys)
        except BaseException as e:  # noqa: BLE001 - raised by __next__ for the step it concerns
            return state, e

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        ahead = self._ahead or self._pool.submit(self._fetch)
        _, batch = ahead.result()
        if isinstance(batch, BaseException):
            self._ahead = None
            raise batch
        self._ahead = self._pool.submit(self._fetch)
        return batch

    def get_state(self):
        """The iterator's state just after the last batch `next` returned."""
        if self._ahead is None:
            return self.iterator.get_state()
        state, _ = self._ahead.result()
        return state

    def close(self) -> None:
        """Waits for the fetch ahead, stops the thread, and closes the iterator (grain's
        worker processes), if it can be closed."""
        if self._ahead is not None:
            self._ahead.result()
            self._ahead = None
        self._pool.shutdown(wait=True)
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()
