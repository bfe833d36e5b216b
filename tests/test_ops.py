"""The native method-two ops (csrc/, torch.ops.mlsys.*) against their references in mlsys.ops.

The native tests need the built extension (`python setup.py build_ext --inplace`); they
skip without it, or fail when MLSYS_REQUIRE_NATIVE=1. The tests never compile it
themselves: the JIT fallback of mlsys.ops is switched off here unless MLSYS_JIT is set.
CUDA variants run where a GPU is present.
"""
from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("MLSYS_JIT", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mlsys import ops  # noqa: E402

REQUIRE_NATIVE = os.environ.get("MLSYS_REQUIRE_NATIVE") == "1"
HAS_CUDA = torch.cuda.is_available()

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no GPU"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(7, 5), (13, 17), (32, 32)]
# candidates: |native - reference| per output dtype (fp32 sums may differ in the last bit,
# which can move a bf16 / fp16 rounding by one unit)
CAND_ATOL = {torch.float32: 1e-6, torch.float64: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
# score: both sides compute in fp32 from the same (up-cast) logits, whatever their dtype
SCORE_TOL = {"cpu": dict(rtol=1e-5, atol=1e-6), "cuda": dict(rtol=1e-5, atol=1e-5)}


def need_native(device: str = "cpu") -> None:
    """Skip (or fail, under MLSYS_REQUIRE_NATIVE=1) unless a native kernel serves `device`."""
    if ops.backend() == "reference":
        why = "mlsys._C is not built (python setup.py build_ext --inplace)"
    elif device == "cuda" and not ops._CUDA_KERNELS:
        why = "mlsys._C was built without CUDA kernels"
    else:
        return
    if REQUIRE_NATIVE:
        pytest.fail(f"{why}; MLSYS_REQUIRE_NATIVE=1")
    pytest.skip(why)


def inputs(C: int, H: int, W: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An image in [0, 1] and C directions of mixed size (not only +-eps: sums round)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, H, W, generator=g)
    dirs = 0.05 * torch.randn(C, 3, H, W, generator=g)
    return x.to(device), dirs.to(device)


def ranges(C: int) -> list[tuple[int, int]]:
    """(start, count) pairs: single, odd-sized, offset, and everything; all valid for C."""
    total = 3**C
    wanted = [(0, 1), (0, 5), (1, 37), (100, 37), (total - 1, 1), (0, total)]
    return sorted({(s, min(n, total - s)) for s, n in wanted if s < total})


# --------------------------------------------------------------------------- backend

def test_backend_is_reported():
    assert ops.backend() in {"native-cpu", "native-cuda", "jit", "reference"}
    if REQUIRE_NATIVE:
        assert ops.backend().startswith("native")


def test_reference_can_be_forced():
    code = "import mlsys.ops as o; print(o.backend())"
    env = {**os.environ, "MLSYS_OPS": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "reference"


def test_index_signs_decoding():
    signs = ops.index_signs(torch.tensor([0, 1, 2, 3, 5, 728]), 6)
    assert signs[0].tolist() == [0] * 6
    assert signs[1].tolist() == [1, 0, 0, 0, 0, 0]
    assert signs[2].tolist() == [-1, 0, 0, 0, 0, 0]
    assert signs[3].tolist() == [0, 1, 0, 0, 0, 0]
    assert signs[4].tolist() == [-1, 1, 0, 0, 0, 0]
    assert signs[5].tolist() == [-1] * 6


def test_base3_digits_and_with_digit():
    """The one digit arithmetic: digit c of i is (i // 3**c) % 3 for tensors of any shape and
    Python ints, and with_digit sets one digit and leaves the others."""
    C = 5
    index = torch.arange(3**C)
    digits = ops.base3_digits(index, C)
    assert digits.shape == (3**C, C) and digits.dtype == torch.int64
    assert digits.tolist() == [[(i // 3**c) % 3 for c in range(C)] for i in range(3**C)]
    assert ops.base3_digits(index.view(9, 27), C).tolist() == digits.view(9, 27, C).tolist()
    assert ops.base3_digits(200, C).tolist() == digits[200].tolist() == [2, 0, 1, 1, 2]
    assert (digits * 3 ** torch.arange(C)).sum(1).tolist() == index.tolist()  # they spell the index
    for i in (0, 17, 200, 3**C - 1):
        for c in range(C):
            for v in range(3):
                j = ops.with_digit(i, c, v)
                want = digits[i].clone()
                want[c] = v
                assert digits[j].tolist() == want.tolist(), (i, c, v)


# --------------------------------------------------------------------------- candidates

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,W", SHAPES)
@pytest.mark.parametrize("C", [1, 2, 3, 6])
def test_candidates_match_reference(C, H, W, dtype, channels_last, device):
    need_native(device)
    x, dirs = inputs(C, H, W, device, seed=C * 1000 + H)
    for start, count in ranges(C):
        got = torch.ops.mlsys.candidates(x, dirs, start, count, 0.0, 1.0, dtype, channels_last)
        want = ops.candidates_ref(x, dirs, start, count, 0.0, 1.0, dtype, channels_last)
        assert got.shape == want.shape and got.dtype == dtype and got.device == x.device
        assert got.stride() == want.stride(), (start, count)
        torch.testing.assert_close(got.double(), want.double(), rtol=0,
                                   atol=CAND_ATOL[dtype], msg=lambda m: f"[{start}, +{count}) {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_candidates_mixed_input_dtypes_and_float64(device):
    need_native(device)
    x, dirs = inputs(4, 9, 11, device)
    for xd, dd, out in [(torch.float32, torch.bfloat16, torch.float32),
                        (torch.float16, torch.float32, torch.bfloat16),
                        (torch.float64, torch.float64, torch.float64)]:
        got = torch.ops.mlsys.candidates(x.to(xd), dirs.to(dd), 3, 50, 0.1, 0.9, out, False)
        want = ops.candidates_ref(x.to(xd), dirs.to(dd), 3, 50, 0.1, 0.9, out)
        torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=CAND_ATOL[out])


@pytest.mark.parametrize("device", DEVICES)
def test_candidates_index_zero_is_clean_and_clipped(device):
    need_native(device)
    x, dirs = inputs(6, 8, 8, device)
    cand = torch.ops.mlsys.candidates(x, 10 * dirs, 0, 729, 0.0, 1.0, torch.float32, False)
    assert torch.equal(cand[0], x)
    assert cand.min() >= 0.0 and cand.max() <= 1.0
    empty = torch.ops.mlsys.candidates(x, dirs, 729, 0, 0.0, 1.0, torch.float32, True)
    assert empty.shape == (0, 3, 8, 8)


@pytest.mark.parametrize("dtype, channels_last", [(torch.float32, False), (torch.bfloat16, True)])
def test_candidates_at_arbitrary_indices_match_the_range_op(dtype, channels_last):
    """The screened search's short list (unordered, repeated indices) against the candidates
    of the whole range (the native op where built, else the reference)."""
    x, dirs = inputs(5, 7, 9, "cpu")
    index = torch.tensor([242, 0, 17, 17, 121, 3])
    got = ops.candidates_at(x, dirs, index, 0.0, 1.0, dtype, channels_last)
    want = ops.candidates(x, dirs, 0, 243, 0.0, 1.0, dtype, channels_last)[index]
    assert got.dtype == dtype and got.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(got, want, atol=CAND_ATOL[dtype], rtol=0)


def test_candidates_wrapper_defaults_to_input_dtype():
    need_native()
    x, dirs = inputs(3, 6, 6, "cpu")
    got = ops.candidates(x.bfloat16(), dirs, 0, 27)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ops.candidates_ref(x.bfloat16(), dirs, 0, 27), rtol=0,
                               atol=CAND_ATOL[torch.bfloat16])


# --------------------------------------------------------------------------- score

def logits_for(N: int, C: int, H: int, W: int, dtype, channels_last: bool, device: str,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(N, C, H, W, generator=g)).to(device=device, dtype=dtype)
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last)
    mask = torch.randint(0, C, (H, W), generator=g).to(device)
    return logits, mask


def assert_score_close(got, want, select: str, device: str) -> None:
    (scores, best), (scores_ref, best_ref) = got, want
    assert scores.dtype == torch.float32 and scores.shape == scores_ref.shape
    assert best.dtype == torch.int64 and best.dim() == 0 and best.device == scores_ref.device
    torch.testing.assert_close(scores, scores_ref, **SCORE_TOL[device])
    # near-ties may pick another index: the winner's reference score must be the optimum
    target = scores_ref.min() if select == "argmin" else scores_ref.max()
    torch.testing.assert_close(scores_ref[best], target, **SCORE_TOL[device])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("select", ["argmin", "argmax"])
@pytest.mark.parametrize("mode", ["l1", "ce"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,W", SHAPES)
@pytest.mark.parametrize("C", [1, 2, 3, 6])
def test_score_matches_reference(C, H, W, dtype, channels_last, mode, select, device):
    need_native(device)
    for N in (1, 5, 37):
        logits, mask = logits_for(N, C, H, W, dtype, channels_last, device, seed=N + C)
        assert_score_close(torch.ops.mlsys.score(logits, mask, mode, select),
                           ops.score_ref(logits, mask, mode, select), select, device)


@pytest.mark.parametrize("device", DEVICES)
def test_score_other_strides_and_mask_dtypes(device):
    need_native(device)
    logits, mask = logits_for(6, 5, 12, 10, torch.float32, False, device)
    odd = logits.transpose(2, 3).contiguous().transpose(2, 3)  # neither NCHW nor NHWC
    assert not odd.is_contiguous() and not odd.is_contiguous(memory_format=torch.channels_last)
    for lg, m in [(odd, mask), (logits, mask.to(torch.uint8)), (logits, mask.int()),
                  (logits.double(), mask)]:
        assert_score_close(torch.ops.mlsys.score(lg, m, "ce", "argmin"),
                           ops.score_ref(lg, m, "ce", "argmin"), "argmin", device)


@pytest.mark.parametrize("device", DEVICES)
def test_score_ties_pick_the_first(device):
    need_native(device)
    logits, mask = logits_for(1, 6, 9, 9, torch.float32, False, device)
    logits = logits.expand(7, -1, -1, -1).contiguous()
    for select in ("argmin", "argmax"):
        assert torch.ops.mlsys.score(logits, mask, "l1", select)[1].item() == 0


def test_score_does_not_depend_on_threads():
    need_native()
    logits, mask = logits_for(40, 6, 61, 59, torch.float32, False, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.mlsys.score(logits, mask, "l1", "argmin")[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, torch.ops.mlsys.score(logits, mask, "l1", "argmin")[0])


@pytest.mark.skipif(not HAS_CUDA, reason="no GPU")
def test_score_cuda_out_of_range_mask_gives_nan():
    need_native("cuda")
    logits, mask = logits_for(3, 6, 8, 8, torch.float32, False, "cuda")
    mask[2, 3] = 6
    scores, best = torch.ops.mlsys.score(logits, mask, "l1", "argmin")
    assert torch.isnan(scores).all() and best.item() == 0


# --------------------------------------------------------------------------- argument checks

def _bad_candidate_calls(device: str):
    x, dirs = inputs(3, 5, 4, device)
    f = torch.ops.mlsys.candidates
    yield "x rank", lambda: f(x[0], dirs, 0, 1, 0.0, 1.0, torch.float32, False)
    yield "dirs rank", lambda: f(x, dirs[0], 0, 1, 0.0, 1.0, torch.float32, False)
    yield "dirs shape", lambda: f(x, dirs[:, :, :3], 0, 1, 0.0, 1.0, torch.float32, False)
    yield "x dtype", lambda: f(x.int(), dirs, 0, 1, 0.0, 1.0, torch.float32, False)
    yield "dirs dtype", lambda: f(x, dirs.long(), 0, 1, 0.0, 1.0, torch.float32, False)
    yield "out dtype", lambda: f(x, dirs, 0, 1, 0.0, 1.0, torch.int32, False)
    yield "too many dirs", lambda: f(x, dirs.repeat(3, 1, 1, 1), 0, 1, 0.0, 1.0, torch.float32, False)
    yield "start < 0", lambda: f(x, dirs, -1, 1, 0.0, 1.0, torch.float32, False)
    yield "count < 0", lambda: f(x, dirs, 0, -1, 0.0, 1.0, torch.float32, False)
    yield "past 3^C", lambda: f(x, dirs, 20, 8, 0.0, 1.0, torch.float32, False)
    yield "lo > hi", lambda: f(x, dirs, 0, 1, 1.0, 0.0, torch.float32, False)
    if device == "cuda":
        yield "devices", lambda: f(x.cpu(), dirs, 0, 1, 0.0, 1.0, torch.float32, False)


def _bad_score_calls(device: str):
    logits, mask = logits_for(4, 6, 5, 7, torch.float32, False, device)
    f = torch.ops.mlsys.score
    yield "logits rank", lambda: f(logits[0], mask, "l1", "argmin")
    yield "mask shape", lambda: f(logits, mask.t(), "l1", "argmin")
    yield "mask rank", lambda: f(logits, mask[None], "l1", "argmin")
    yield "mask dtype", lambda: f(logits, mask.float(), "l1", "argmin")
    yield "logits dtype", lambda: f(logits.long(), mask, "l1", "argmin")
    yield "empty", lambda: f(logits[:0], mask, "l1", "argmin")
    yield "mode", lambda: f(logits, mask, "l2", "argmin")
    yield "select", lambda: f(logits, mask, "l1", "min")
    if device == "cpu":  # on CUDA out-of-range ids give NaN scores instead (no sync)
        yield "mask < 0", lambda: f(logits, mask - 1, "l1", "argmin")
        yield "mask >= C", lambda: f(logits, mask + 1, "ce", "argmin")
    else:
        yield "devices", lambda: f(logits, mask.cpu(), "l1", "argmin")


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise(device):
    need_native(device)
    for what, call in [*_bad_candidate_calls(device), *_bad_score_calls(device)]:
        with pytest.raises(RuntimeError):
            call()
            pytest.fail(f"no error for bad {what}")


# --------------------------------------------------------------------------- torch integration

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    need_native(device)
    for C, (H, W), dtype, cl in [(2, (5, 7), torch.float32, False), (3, (4, 4), torch.bfloat16, True)]:
        x, dirs = inputs(C, H, W, device)
        torch.library.opcheck(torch.ops.mlsys.candidates.default,
                              (x, dirs, 1, 5, 0.0, 1.0, dtype, cl))
        logits, mask = logits_for(5, C + 1, H, W, dtype, cl, device)
        torch.library.opcheck(torch.ops.mlsys.score.default, (logits, mask, "l1", "argmin"))
        torch.library.opcheck(torch.ops.mlsys.score.default, (logits, mask, "ce", "argmax"))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """Both ops inside one fullgraph-compiled function (a tiny case: compiling costs ~7 s)."""
    need_native(device)

    def search(x, dirs, mask):
        cand = ops.candidates(x, dirs, 0, 9, 0.0, 1.0, torch.float32, True)
        scores, best = ops.score(cand, mask, "l1", "argmin")  # the 3 channels as 3 "classes"
        return cand, scores, best

    x, dirs = inputs(2, 8, 8, device)
    mask = torch.randint(0, 3, (8, 8)).to(device)
    torch._dynamo.reset()
    got = torch.compile(search, fullgraph=True)(x, dirs, mask)
    for g, w in zip(got, search(x, dirs, mask)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# --------------------------------------------------------------------------- fuzzing

@settings(max_examples=30, deadline=None)
@given(C=st.integers(0, 8), H=st.integers(1, 19), W=st.integers(1, 19),
       data=st.data(), channels_last=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_candidates_fuzz(C, H, W, data, channels_last, dtype):
    need_native()
    total = 3**C
    start = data.draw(st.integers(0, total - 1), label="start")
    count = data.draw(st.integers(0, min(total - start, 60)), label="count")
    lo = data.draw(st.floats(-0.5, 0.5), label="lo")
    hi = data.draw(st.floats(lo, 1.5), label="hi")
    x, dirs = inputs(C, H, W, "cpu", seed=start)
    got = torch.ops.mlsys.candidates(x, dirs, start, count, lo, hi, dtype, channels_last)
    want = ops.candidates_ref(x, dirs, start, count, lo, hi, dtype, channels_last)
    # the layout, not the strides: those of size-1 dims may differ from the reference's
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got.shape == want.shape and got.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=CAND_ATOL[dtype])
