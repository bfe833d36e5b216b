"""Tests of the synthetic PanNuke-like generator (mlsys.synthetic): determinism, the
raw PanNuke array layout, PanNuke-like label statistics and class distinguishability."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from mlsys.synthetic import TISSUES, generate, generate_chunks, tissue_types

N_STATS, SIZE = 200, 32


@pytest.fixture(scope="module")
def data():
    """One modest set shared by the statistics tests (about a second to make)."""
    return generate(N_STATS, SIZE, 0, progress=False)


def semantic(masks: np.ndarray) -> np.ndarray:
    """(N, H, W, 6) instance masks -> (N, H, W) class 0..5, lowest channel wins
    (the rule mlsys.data uses)."""
    nucleus = masks[..., :5] != 0
    return np.where(nucleus.any(-1), nucleus.argmax(-1) + 1, 0)


def instances(masks: np.ndarray):
    """Yield (patch, channel, id, pixel mask (H, W)) for every instance."""
    for i, c in itertools.product(range(len(masks)), range(5)):
        ch = masks[i, ..., c]
        for v in np.unique(ch[ch > 0]):
            yield i, c, v, ch == v


# --------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_arrays():
    a, b = generate(6, SIZE, 7, progress=False), generate(6, SIZE, 7, progress=False)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_different_seed_differs():
    a, b = generate(4, SIZE, 1, progress=False), generate(4, SIZE, 2, progress=False)
    assert not np.array_equal(a[0], b[0])
    assert not np.array_equal(a[1], b[1])


def test_patch_i_independent_of_n():
    small, large = generate(5, SIZE, 3, progress=False), generate(10, SIZE, 3, progress=False)
    for x, y in zip(small, large):
        assert np.array_equal(x, y[:5])


@pytest.mark.parametrize("size, chunk", [(32, 3), (16, 64), (24, 1)])
def test_streamed_chunks_are_the_same_bytes(size, chunk):
    n, seed = 7, 5
    want = generate(n, size, seed, progress=False)
    got = list(generate_chunks(n, size, seed, chunk, progress=False))
    assert [len(c[0]) for c in got] == [min(chunk, n - s) for s in range(0, n, chunk)]
    for w, g in zip(want, zip(*got)):
        g = np.concatenate(g)
        assert g.dtype == w.dtype and np.array_equal(g, w)
    assert np.array_equal(tissue_types(n, seed), want[2])  # without drawing the patches


def test_streamed_bad_chunk():
    with pytest.raises(ValueError, match="chunk must be an integer >= 1, got 0"):
        next(generate_chunks(3, 16, 0, 0))


# --------------------------------------------------------------------------- layout
def test_layout(data):
    images, masks, types = data
    assert images.shape == (N_STATS, SIZE, SIZE, 3) and images.dtype == np.float64
    assert masks.shape == (N_STATS, SIZE, SIZE, 6) and masks.dtype == np.float64
    assert types.shape == (N_STATS,) and types.dtype.kind == "U"
    assert set(types.tolist()) <= set(TISSUES) and len(set(types.tolist())) >= 3
    assert images.min() >= 0 and images.max() <= 255
    assert np.array_equal(images, np.round(images))
    assert set(np.unique(masks[..., 5]).tolist()) <= {0.0, 1.0}
    ids = masks[..., :5]
    assert ids.min() >= 0 and np.array_equal(ids, np.round(ids))
    assert ids.max() > 255                            # ids must not be cast to uint8
    # Background is only where no class channel is set.
    assert not ((masks[..., 5] == 1) & (ids != 0).any(-1)).any()


def test_instance_ids_unique_and_non_contiguous(data):
    _, masks, _ = data
    gaps = False
    for i in range(N_STATS):
        per_channel = [set(np.unique(masks[i, ..., c]).tolist()) - {0.0} for c in range(5)]
        for a, b in itertools.combinations(per_channel, 2):
            assert not (a & b), f"patch {i}: an id is used in two class channels"
        ids = sorted(set().union(*per_channel))
        gaps |= any(b - a > 1 for a, b in zip(ids, ids[1:]))
    assert gaps


def test_bad_arguments_raise():
    for kwargs, name in (({"n": 0, "size": 32}, "n"), ({"n": -3, "size": 32}, "n"),
                         ({"n": 2, "size": 7}, "size"), ({"n": 2, "size": 0}, "size")):
        with pytest.raises(ValueError, match=rf"^{name} "):
            generate(seed=0, progress=False, **kwargs)


# --------------------------------------------------------------------------- statistics
def test_class_statistics(data):
    _, masks, _ = data
    sem = semantic(masks)
    assert 0.70 <= masks[..., 5].mean() <= 0.92
    assert 0.70 <= (sem == 0).mean() <= 0.92
    pixels = np.bincount(sem.ravel(), minlength=6)
    assert (pixels[1:] > 0).all(), pixels
    assert pixels[4] == pixels[1:].min(), "dead must be the rarest class"
    assert (masks[..., 3] > 0).any((1, 2)).mean() < 0.15
    void = (masks == 0).all(-1)
    assert void.any()
    overlap = (masks[..., :5] != 0).sum(-1) >= 2
    assert overlap.any()
    assert overlap.any((1, 2)).mean() < 0.15          # rare, like PanNuke


def test_some_nuclei_touch(data):
    _, masks, _ = data
    inst = masks[..., :5].max(-1)
    a, b = inst[:, 1:, :], inst[:, :-1, :]
    touching = (a > 0) & (b > 0) & (a != b)
    assert touching.any((1, 2)).sum() >= 10


def test_classes_distinguishable(data):
    images, masks, _ = data
    sem = semantic(masks)
    means = np.array([images[sem == c].mean(0) for c in range(6)])
    for a, b in itertools.combinations(range(6), 2):
        assert np.linalg.norm(means[a] - means[b]) > 15, (a, b, means)
    area = {c: [] for c in range(5)}
    elong = {c: [] for c in range(5)}
    for _, c, _, m in instances(masks[:80]):
        area[c].append(m.sum())
        ys, xs = np.nonzero(m)
        if len(ys) >= 4:
            ev = np.linalg.eigvalsh(np.cov(np.stack([ys, xs])) + 1e-3 * np.eye(2))
            elong[c].append(ev[1] / ev[0])
    assert np.mean(area[0]) > 1.5 * np.mean(area[1])           # neoplastic > inflammatory
    assert np.mean(area[0]) > np.mean(area[4]) > np.mean(area[1])  # epithelial in between
    assert np.median(elong[2]) > 2 * max(np.median(elong[1]), np.median(elong[4]))  # spindles


def test_nucleus_size_scales_with_patch():
    _, small, _ = generate(6, 32, 5, progress=False)
    images, large, _ = generate(2, 256, 5, progress=False)
    assert images.shape == (2, 256, 256, 3) and large.shape == (2, 256, 256, 6)
    assert 0.6 <= large[..., 5].mean() <= 0.98
    mean_area = lambda m: np.mean([x.sum() for *_, x in instances(m)])
    assert mean_area(large) > 3 * mean_area(small)
