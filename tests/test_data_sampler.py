"""PKSampler: golden cases, invariants over many batches, determinism, host slicing."""
import collections
import logging

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gl_jax.data.sampler import PKSampler, _max_distinct_batches, host_slice


def _labels(sizes, shuffle_seed=None):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    if shuffle_seed is not None:  # records of a class need not be contiguous in a source
        labels = np.random.default_rng(shuffle_seed).permutation(labels)
    return labels


def _chunks(batches, k):
    return batches.reshape(-1, k)


# ------------------------------------------------------------------ official mode

def test_official_golden_small_case():
    # sizes 3, 1, 2 (max 3), K=2, P=1. Padded lengths min(2n, max+1) = 4, 2, 4
    # -> 2 + 1 + 2 = 5 chunks = 5 batches of one chunk each.
    labels = _labels([3, 1, 2])
    sampler = PKSampler(labels, classes_per_batch=1, samples_per_class=2, seed=3)
    assert sampler.num_batches() == 5
    chunks = [tuple(c) for c in sampler.batches(0)]
    by_class = collections.defaultdict(list)
    for c in chunks:
        by_class[labels[c[0]]].append(c)
    # class 1 (one image, index 3) is padded by repetition to [3, 3].
    assert by_class[1] == [(3, 3)]
    # class 2 (indices 4, 5): shuffled [a, b] + its first 2 -> [a, b, a, b].
    assert len(by_class[2]) == 2 and by_class[2][0] == by_class[2][1]
    assert sorted(by_class[2][0]) == [4, 5]
    # class 0 (indices 0, 1, 2): [a, b, c] + first 1 -> [a, b, c, a]: 3 distinct, one twice.
    used = sorted(by_class[0][0] + by_class[0][1])
    assert set(used) == {0, 1, 2} and len(used) == 4


def test_official_class_too_small_is_never_sampled():
    # SOP case of the official recipe: a 2-image class pads to 4 < K = 6.
    labels = _labels([2, 10, 10, 10])
    sampler = PKSampler(labels, 2, 6, seed=0)
    for epoch in range(5):
        assert not np.isin(np.flatnonzero(labels == 0), sampler.batches(epoch)).any()


@pytest.mark.parametrize("sizes,p,k", [([5, 9, 2, 13, 7, 7, 1, 20], 3, 4),
                                       ([30] * 6 + [3, 4, 50], 4, 5)])
def test_official_invariants_over_epochs(sizes, p, k):
    labels = _labels(sizes, shuffle_seed=1)
    sampler = PKSampler(labels, p, k, mode="official", seed=7)
    counts = np.bincount(labels)
    padded = np.minimum(2 * counts, counts.max() + 1)
    expected_chunks = padded // k
    # epoch length of the official sampler, computed independently.
    assert sampler.num_batches() == expected_chunks.sum() // p
    for epoch in range(20):
        batches = sampler.batches(epoch)
        assert batches.shape == (expected_chunks.sum() // p, p * k)
        chunks = _chunks(batches, k)
        chunk_labels = labels[chunks]
        assert (chunk_labels == chunk_labels[:, :1]).all(), "a chunk mixes classes"
        per_class = np.bincount(chunk_labels[:, 0], minlength=len(sizes))
        # only the last partial batch (< P chunks) may be dropped.
        assert (per_class <= expected_chunks).all()
        assert (expected_chunks - per_class).sum() < p
        for c in np.flatnonzero(per_class == expected_chunks):
            uses = np.bincount(chunks[chunk_labels[:, 0] == c].ravel(), minlength=len(labels))
            members = np.flatnonzero(labels == c)
            used = per_class[c] * k
            # the padded list is a permutation followed by a prefix of it: every image at
            # most twice; if the usable length covers the class, all appear and used - n twice.
            others = np.setdiff1d(np.arange(len(labels)), members)
            assert uses.max() <= 2 and uses[others].sum() == 0
            if used >= len(members):
                assert (uses[members] >= 1).all()
                assert (uses[members] == 2).sum() == used - len(members)
            else:
                assert (uses[members] <= 1).all() and uses[members].sum() == used


def test_official_shuffles_chunks_across_batches():
    labels = _labels([40] * 10)
    sampler = PKSampler(labels, 4, 5, seed=0)
    batches = sampler.batches(0)
    # shuffled chunk order: classes in the first batches are not simply 0, 1, 2, 3.
    firsts = labels[batches[:, ::5]]
    assert len({tuple(r) for r in firsts}) > 1
    assert not (firsts[0] == [0, 1, 2, 3]).all() or not (firsts[1] == [0, 1, 2, 3]).all()


# ------------------------------------------------------------------ balanced mode

def test_max_distinct_batches_golden():
    # chunk counts 5, 1, 1, 1 and P = 2: B = 3 works (3+1+1+1 = 6 >= 6), B = 4 not (7 < 8).
    assert _max_distinct_batches(np.array([5, 1, 1, 1]), 2) == 3
    assert _max_distinct_batches(np.array([2, 2, 2]), 3) == 2
    assert _max_distinct_batches(np.array([9, 9]), 3) == 0


@pytest.mark.parametrize("sizes,p,k", [([5, 9, 2, 13, 7, 7, 1, 20, 3, 3], 3, 4),
                                       ([100, 4, 4, 4, 4, 4], 3, 2),
                                       ([6] * 50, 10, 6)])
def test_balanced_invariants_over_epochs(sizes, p, k):
    labels = _labels(sizes, shuffle_seed=2)
    sampler = PKSampler(labels, p, k, mode="balanced", seed=11)
    counts = np.bincount(labels)
    visits = -(-counts // k)
    b = sampler.num_batches()
    # independent check of the epoch length: B feasible, B + 1 not.
    assert np.minimum(visits, b).sum() >= b * p
    assert np.minimum(visits, b + 1).sum() < (b + 1) * p
    seen = np.zeros(len(labels), int)
    for epoch in range(30):
        batches = sampler.batches(epoch)
        assert batches.shape == (b, p * k)
        grid = labels[batches].reshape(b, p, k)
        assert (grid == grid[:, :, :1]).all(), "a class's K images must be consecutive"
        for row in grid[:, :, 0]:
            assert len(set(row)) == p, "classes in a batch must be distinct"
        for chunk in batches.reshape(-1, k):
            if counts[labels[chunk[0]]] >= k:
                assert len(set(chunk)) == k, "a chunk of a large-enough class repeats an image"
        per_class = np.bincount(grid[:, :, 0].ravel(), minlength=len(sizes))
        assert (per_class <= np.minimum(visits, b)).all()
        seen += np.bincount(batches.ravel(), minlength=len(labels))
        # a class is left out only if every class is down to one chunk (surplus < P).
        if (per_class == 0).any():
            assert per_class.max() <= 1
    # over 30 epochs every image of every class that is not capped at B chunks is seen.
    uncapped = np.isin(labels, np.flatnonzero(visits <= b))
    assert (seen[uncapped] > 0).all()


def test_balanced_small_class_sampled_with_replacement_and_logged_once(caplog):
    labels = _labels([2, 8, 8, 8])
    with caplog.at_level(logging.WARNING):
        sampler = PKSampler(labels, 2, 4, mode="balanced", seed=0)
        for epoch in range(10):
            batches = sampler.batches(epoch)
    assert sum("fewer than samples_per_class" in r.message for r in caplog.records) == 1
    chunks = batches.reshape(-1, 4)
    small = chunks[labels[chunks[:, 0]] == 0]
    assert small.size and set(small.ravel()) <= {0, 1}


# ------------------------------------------------------------------ both modes

@pytest.mark.parametrize("mode", ["official", "balanced"])
def test_deterministic_for_seed_and_epoch(mode):
    labels = _labels([7, 12, 5, 9, 30], shuffle_seed=0)
    a = PKSampler(labels, 3, 3, mode=mode, seed=5)
    b = PKSampler(labels, 3, 3, mode=mode, seed=5)
    np.testing.assert_array_equal(a.batches(4), b.batches(4))
    np.testing.assert_array_equal(a.batches(4), a.batches(4))
    assert not np.array_equal(a.batches(4), a.batches(5))
    assert not np.array_equal(a.batches(4), PKSampler(labels, 3, 3, mode=mode, seed=6).batches(4))


def test_validation_errors():
    with pytest.raises(ValueError, match="fewer than classes_per_batch=4"):
        PKSampler(_labels([5, 5, 5]), 4, 2)
    with pytest.raises(ValueError, match="mode"):
        PKSampler(_labels([5, 5, 5]), 2, 2, mode="random")
    with pytest.raises(ValueError, match="no complete batch"):
        PKSampler(_labels([2, 2, 2]), 2, 6)
    with pytest.raises(ValueError, match="1-D"):
        PKSampler(np.zeros((2, 2)), 1, 1)


def test_host_slices_reassemble_the_global_batch():
    labels = _labels([10] * 8)
    batches = PKSampler(labels, 4, 4, seed=1).batches(0)
    for hosts in (1, 2, 4):
        parts = [host_slice(batches, i, hosts) for i in range(hosts)]
        np.testing.assert_array_equal(np.concatenate(parts, axis=-1), batches)
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        host_slice(batches, 0, 3)
    with pytest.raises(ValueError, match="process_index=2"):
        host_slice(batches, 2, 2)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 25), min_size=2, max_size=12), p=st.integers(1, 4),
       k=st.integers(1, 6), mode=st.sampled_from(["official", "balanced"]),
       epoch=st.integers(0, 1000))
def test_property_batches_are_k_runs_of_one_class(sizes, p, k, mode, epoch):
    labels = _labels(sizes, shuffle_seed=epoch)
    try:
        sampler = PKSampler(labels, p, k, mode=mode, seed=epoch)
    except ValueError as err:  # only the two documented reasons
        assert "fewer than classes_per_batch" in str(err) or "no complete batch" in str(err)
        assume(False)
    batches = sampler.batches(epoch)
    assert batches.shape == (sampler.num_batches(), p * k) and sampler.num_batches() > 0
    grid = labels[batches].reshape(-1, p, k)
    assert (grid == grid[:, :, :1]).all()
    if mode == "balanced":
        assert all(len(set(row)) == p for row in grid[:, :, 0])
