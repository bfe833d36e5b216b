"""Kernel inputs: the native ops against their references on fuzzed shapes, and fuzzed
bad arguments (index ranges, shapes, dtypes, mask values) that must raise a Python
exception, never crash or read out of bounds. Complements test_ops.py (fixed sweeps,
candidates fuzzing)."""
from __future__ import annotations

import os

os.environ.setdefault("MLSYS_JIT", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mlsys import ops  # noqa: E402
from test_ops import SCORE_TOL, assert_score_close, need_native  # noqa: E402

MASK_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.int16]


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 40), C=st.integers(1, 8), H=st.integers(1, 23), W=st.integers(1, 23),
       mode=st.sampled_from(["l1", "ce"]), select=st.sampled_from(["argmin", "argmax"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       layout=st.sampled_from(["nchw", "nhwc", "strided"]), mask_dtype=st.sampled_from(MASK_DTYPES),
       seed=st.integers(0, 2**16), scale=st.floats(0.0, 30.0))
def test_score_fuzz(N, C, H, W, mode, select, dtype, layout, mask_dtype, seed, scale):
    need_native()
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(N, C, H, W, generator=g)).to(dtype)
    if layout == "nhwc":
        logits = logits.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        logits = torch.randn(N, C, W, H, generator=g).to(dtype).transpose(2, 3)
    mask = torch.randint(0, C, (H, W), generator=g).to(mask_dtype)
    got = torch.ops.mlsys.score(logits, mask, mode, select)
    want = ops.score_ref(logits, mask, mode, select)
    assert_score_close(got, want, select, "cpu")


@settings(max_examples=60, deadline=None)
@given(C=st.integers(0, 9), start=st.integers(-2**62, 2**62), count=st.integers(-2**62, 2**62),
       small=st.booleans())
def test_candidates_out_of_range_indices_raise(C, start, count, small):
    """Any (start, count) outside [0, 3^C], including near-overflow values, is refused."""
    need_native()
    total = 3**C
    if small:  # near the valid range, where off-by-one errors live
        start, count = start % (total + 3) - 1, count % (total + 3) - 1
    x, dirs = torch.rand(3, 4, 5), torch.rand(C, 3, 4, 5)
    valid = C <= 8 and start >= 0 and count >= 0 and start + count <= total
    if valid:
        if count > 2000:
            return
        got = torch.ops.mlsys.candidates(x, dirs, start, count, 0.0, 1.0, torch.float32, False)
        torch.testing.assert_close(got, ops.candidates_ref(x, dirs, start, count))
    else:
        with pytest.raises(RuntimeError, match="mlsys::candidates"):
            torch.ops.mlsys.candidates(x, dirs, start, count, 0.0, 1.0, torch.float32, False)


@settings(max_examples=40, deadline=None)
@given(C=st.integers(1, 7), H=st.integers(1, 9), W=st.integers(1, 9), bad=st.integers(-1000, 1000),
       at=st.integers(0, 80), mask_dtype=st.sampled_from([torch.int64, torch.int32, torch.int16]))
def test_score_mask_values_outside_the_classes_raise(C, H, W, bad, at, mask_dtype):
    need_native()
    logits = torch.randn(3, C, H, W)
    mask = torch.zeros(H, W, dtype=mask_dtype)
    mask.view(-1)[at % (H * W)] = bad
    if 0 <= bad < C:
        assert_score_close(torch.ops.mlsys.score(logits, mask, "ce", "argmin"),
                           ops.score_ref(logits, mask, "ce", "argmin"), "argmin", "cpu")
    else:
        with pytest.raises(RuntimeError, match="mask values should be class ids"):
            torch.ops.mlsys.score(logits, mask, "ce", "argmin")


@settings(max_examples=40, deadline=None)
@given(xs=st.lists(st.integers(0, 6), min_size=0, max_size=5), ds=st.lists(st.integers(0, 6), min_size=0, max_size=5),
       ls=st.lists(st.integers(0, 6), min_size=0, max_size=5), ms=st.lists(st.integers(0, 6), min_size=0, max_size=3))
def test_wrong_ranks_and_shapes_raise(xs, ds, ls, ms):
    """Random ranks and sizes for every tensor argument: either the shapes fit (and the
    result matches the reference) or a RuntimeError names the op."""
    need_native()
    x, dirs = torch.rand(tuple(xs)), torch.rand(tuple(ds))
    fits = len(xs) == 3 and len(ds) == 4 and tuple(ds[1:]) == tuple(xs) and ds[0] <= 8
    if fits:
        out = torch.ops.mlsys.candidates(x, dirs, 0, 1, 0.0, 1.0, torch.float32, False)
        torch.testing.assert_close(out, ops.candidates_ref(x, dirs, 0, 1))
    else:
        with pytest.raises(RuntimeError, match="mlsys::candidates"):
            torch.ops.mlsys.candidates(x, dirs, 0, 1, 0.0, 1.0, torch.float32, False)
    logits, mask = torch.randn(tuple(ls)), torch.zeros(tuple(ms), dtype=torch.int64)
    fits = len(ls) == 4 and len(ms) == 2 and tuple(ms) == tuple(ls[2:]) and logits.numel() > 0
    if fits:
        got = torch.ops.mlsys.score(logits, mask, "l1", "argmin")
        torch.testing.assert_close(got[0], ops.score_ref(logits, mask)[0], **SCORE_TOL["cpu"])
    else:
        with pytest.raises(RuntimeError, match="mlsys::score"):
            torch.ops.mlsys.score(logits, mask, "l1", "argmin")


@pytest.mark.parametrize("bad", [torch.float32, torch.bool, torch.complex64])
def test_wrong_dtypes_raise(bad):
    need_native()
    x, dirs = torch.rand(3, 4, 4), torch.rand(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="mlsys::"):
        torch.ops.mlsys.candidates(x.to(torch.int32), dirs, 0, 1, 0.0, 1.0, torch.float32, False)
    with pytest.raises(RuntimeError, match="mlsys::"):
        torch.ops.mlsys.candidates(x, dirs.to(torch.complex64), 0, 1, 0.0, 1.0, torch.float32, False)
    logits, mask = torch.randn(2, 3, 4, 4), torch.zeros(4, 4)
    if bad != torch.bool:  # a bool mask holds class ids 0 and 1: allowed
        with pytest.raises(RuntimeError, match="mlsys::score"):
            torch.ops.mlsys.score(logits, mask.to(bad), "l1", "argmin")
    with pytest.raises(RuntimeError, match="mlsys::score"):
        torch.ops.mlsys.score(logits.to(torch.int64), mask.long(), "l1", "argmin")
