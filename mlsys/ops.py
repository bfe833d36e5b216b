"""Fused ops for method two's signed-combination search, and their references.

Method two (docs/method.md) scores every sign vector s in {-1, 0, +1}^C against the true
mask. Candidates are addressed by a base-3 index i in [0, 3^C): digit c of i
(least significant first) gives the sign of class c's direction,
digit 0 -> 0, 1 -> +1, 2 -> -1, so index 0 is the clean image itself.

Two ops:
  candidates(x, dirs, start, count, lo, hi, dtype, channels_last) -> (count, 3, H, W)
      clip(x + sum_c s_c(i) * dirs[c], lo, hi) for i in [start, start + count).
  score(logits, mask, mode, select) -> (scores (N,) float32, best index int64 scalar)
      per candidate: "l1" mean |onehot(mask) - softmax(logits)| over (C, H, W),
      or "ce" mean cross-entropy over (H, W); best = argmin or argmax (first on ties).

The plain-PyTorch references (``*_ref``) define the results; the native extension
(csrc/: schemas in ops.cpp, kernels in ops_cpu.cpp and ops_cuda.cu) must match them.
Native ops are registered as ``torch.ops.mlsys.candidates`` / ``torch.ops.mlsys.score``
with fake kernels below, so they work under ``torch.compile(fullgraph=True)``.

Which implementation serves the ops (see :func:`backend`), decided once at import:
  1. the built extension ``mlsys._C`` (``python setup.py build_ext --inplace`` or
     ``pip install --no-build-isolation --use-pep517 -e .``);
  2. else, in a repository checkout and unless ``MLSYS_JIT=0``, a JIT build of csrc/
     through ``torch.utils.cpp_extension.load`` (a minute on first use, then cached);
  3. else the references, with one warning.
``MLSYS_OPS=reference`` forces the references. A call on a device the native build has
no kernel for (a CUDA tensor with a CPU-only build) uses the reference for that call.
This module imports without mlflow or dvc.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from . import _build
from .params import InputError

_CSRC = Path(__file__).resolve().parent.parent / "csrc"


def base3_digits(index: torch.Tensor | int, n_classes: int) -> torch.Tensor:
    """The base-3 digits of candidate indices, least significant (class 0) first: index
    (...) int64 tensor, or a Python int -> (..., n_classes) int64 in {0, 1, 2} on index's
    device. The one definition of the digit arithmetic (signs: :func:`index_signs`)."""
    index = torch.as_tensor(index, dtype=torch.int64)
    powers = 3 ** torch.arange(n_classes, device=index.device, dtype=torch.int64)
    return (index[..., None] // powers) % 3


def with_digit(index: int, c: int, digit: int) -> int:
    """Base-3 index ``index`` with its digit c (class c's sign) set to ``digit`` in {0, 1, 2}."""
    return index + (digit - int(base3_digits(index, c + 1)[c])) * 3**c


def index_signs(index: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Base-3 indices (K,) int64 -> sign vectors (K, n_classes) int8 in {-1, 0, +1}
    (digit 0 -> 0, 1 -> +1, 2 -> -1)."""
    digits = base3_digits(index, n_classes)
    return torch.where(digits == 2, -1, digits).to(torch.int8)


def candidates_ref(x: torch.Tensor, dirs: torch.Tensor, start: int, count: int,
                   lo: float = 0.0, hi: float = 1.0, dtype: torch.dtype | None = None,
                   channels_last: bool = False) -> torch.Tensor:
    """x: (3, H, W) float image; dirs: (C, 3, H, W) per-class directions (already
    scaled by eps). Returns (count, 3, H, W) candidates in ``dtype`` (default x's)."""
    C = dirs.shape[0]
    if start < 0 or count < 0 or start + count > 3**C:
        raise ValueError(f"candidate range [{start}, {start + count}) outside [0, {3**C})")
    idx = torch.arange(start, start + count, device=x.device)
    return candidates_at(x, dirs, idx, lo, hi, dtype, channels_last)


def candidates_at(x: torch.Tensor, dirs: torch.Tensor, index: torch.Tensor, lo: float = 0.0,
                  hi: float = 1.0, dtype: torch.dtype | None = None,
                  channels_last: bool = False) -> torch.Tensor:
    """The candidates of arbitrary base-3 indices (K,) int64 (plain PyTorch, any device;
    a screened search's short list). x: (3, H, W); dirs: (C, 3, H, W).
    Returns (K, 3, H, W) clip(x + sum_c s_c(i) dirs[c], lo, hi) in ``dtype`` (default x's),
    summed and clipped in float32 like :func:`candidates`."""
    signs = index_signs(index.to(x.device), dirs.shape[0]).to(torch.float32)
    out = x.float()[None] + (signs @ dirs.float().flatten(1)).view(len(index), *x.shape)
    out = out.clamp(lo, hi).to(dtype or x.dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


SCORES = ("l1", "ce")  # the score modes of score / score_ref (augment.method2.score)


def score_ref(logits: torch.Tensor, mask: torch.Tensor, mode: str = "l1",
              select: str = "argmin") -> tuple[torch.Tensor, torch.Tensor]:
    """logits: (N, C, H, W); mask: (H, W) int64 class ids in [0, C).
    Returns (scores (N,) float32, best index () int64)."""
    logits = logits.float()
    if mode == "l1":
        prob = logits.softmax(1)
        onehot = torch.nn.functional.one_hot(mask.long(), logits.shape[1]).permute(2, 0, 1)
        scores = (prob - onehot[None]).abs().mean(dim=(1, 2, 3))
    elif mode == "ce":
        target = mask.long()[None].expand(logits.shape[0], -1, -1)
        scores = torch.nn.functional.cross_entropy(logits, target, reduction="none").mean(dim=(1, 2))
    else:
        raise ValueError(f"score mode {mode!r} is not one of {SCORES}")
    if select == "argmin":
        best = scores.argmin()
    elif select == "argmax":
        best = scores.argmax()
    else:
        raise ValueError(f"select {select!r} is not 'argmin' or 'argmax'")
    return scores, best


# --------------------------------------------------------------------------- loading

def _jit_build() -> bool:
    """Compile csrc/ with torch's JIT extension loader; returns whether CUDA kernels are in."""
    from torch.utils.cpp_extension import CUDA_HOME, load

    global _BUILT_FROM
    stamp = _build.digest_define(_CSRC)
    sources = sorted(str(p) for p in _CSRC.glob("*.cpp"))
    cflags = _build.CXX_FLAGS + [stamp]
    cu = sorted(str(p) for p in _CSRC.glob("*.cu"))
    with_cuda = bool(cu) and torch.version.cuda is not None and CUDA_HOME is not None
    if with_cuda:
        sources += cu
        cflags.append(_build.CUDA_DEFINE)
    module = load(name="mlsys_C", sources=sources, extra_cflags=cflags,
                  extra_cuda_cflags=_build.NVCC_FLAGS + [_build.CUDA_DEFINE, stamp],
                  extra_ldflags=_build.LD_FLAGS, is_python_module=True)
    _BUILT_FROM = getattr(module, "csrc_digest", "unknown")
    return bool(module.cuda_kernels)


def _load() -> tuple[str, bool]:
    """(how the ops are served: "native" | "jit" | "reference", CUDA kernels compiled in)."""
    if os.environ.get("MLSYS_OPS", "") == "reference":
        return "reference", False
    global _BUILT_FROM
    try:
        from mlsys import _C  # registers torch.ops.mlsys.*; needs torch imported first
        _BUILT_FROM = getattr(_C, "csrc_digest", "unknown")
        return "native", bool(_C.cuda_kernels)
    except (ImportError, OSError) as err:
        reason = f"mlsys._C is not built or does not load ({err})"
    if os.environ.get("MLSYS_JIT", "1") != "0" and (_CSRC / "ops.cpp").is_file():
        try:
            return "jit", _jit_build()
        except Exception as err:  # a compiler error must not make the package unusable
            reason += f"; the JIT build of {_CSRC} failed ({type(err).__name__}: {err})"
    warnings.warn(f"mlsys.ops uses the slow PyTorch references: {reason}. Build the extension "
                  "with `python setup.py build_ext --inplace`.", RuntimeWarning, stacklevel=3)
    return "reference", False


def _register_fakes() -> None:
    """Shape-only kernels so torch.compile / FakeTensor can trace through the native ops."""

    def candidates_fake(x, dirs, start, count, lo, hi, dtype, channels_last):
        torch._check(x.dim() == 3 and dirs.dim() == 4 and dirs.shape[1:] == x.shape,
                     lambda: f"mlsys::candidates: x (K, H, W) and dirs (C, K, H, W) expected, "
                             f"got {tuple(x.shape)} and {tuple(dirs.shape)}")
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty((count, *x.shape), dtype=dtype, device=x.device, memory_format=fmt)

    def score_fake(logits, mask, mode, select):
        torch._check(logits.dim() == 4 and mask.shape == logits.shape[2:],
                     lambda: f"mlsys::score: logits (N, C, H, W) and mask (H, W) expected, "
                             f"got {tuple(logits.shape)} and {tuple(mask.shape)}")
        return (logits.new_empty((logits.shape[0],), dtype=torch.float32),
                logits.new_empty((), dtype=torch.int64))

    for name, fn in (("mlsys::candidates", candidates_fake), ("mlsys::score", score_fake)):
        try:
            torch.library.register_fake(name, fn)
        except RuntimeError as err:  # already registered (module reloaded)
            if "already" not in str(err):
                raise


_BUILT_FROM: str | None = None  # csrc digest compiled into the loaded extension
_SERVED_BY, _CUDA_KERNELS = _load()
if _SERVED_BY != "reference":
    _register_fakes()


def backend() -> str:
    """Which implementation serves the ops: "native-cuda" (extension with CUDA kernels and
    a GPU present), "native-cpu", "jit" (extension compiled at import), or "reference"."""
    if _SERVED_BY == "native":
        return "native-cuda" if _CUDA_KERNELS and torch.cuda.is_available() else "native-cpu"
    return _SERVED_BY


class StaleBuildError(InputError, RuntimeError):
    """The loaded extension was compiled from other csrc/ sources than the checkout holds."""


def build_id() -> str:
    """What computes the ops: the backend and the csrc/ digest its extension was built from
    (part of the method-two provenance and chunk fingerprint)."""
    return backend() if _BUILT_FROM is None else f"{backend()}:{_BUILT_FROM}"


def require_current() -> None:
    """Refuse, in one line, an extension built from sources other than this checkout's
    csrc/ (after a kernel edit): results must come from the code DVC sees. Nothing to
    check for the references or where csrc/ is not beside the package (an installed wheel)."""
    if _BUILT_FROM is None or not (_CSRC / "ops.cpp").is_file():
        return
    now = _build.csrc_digest(_CSRC)
    if _BUILT_FROM != now:
        raise StaleBuildError(f"the native ops (mlsys/_C) were built from csrc/ {_BUILT_FROM}, but csrc/ is now "
                              f"{now}; rebuild them with `make setup` (or `.venv/bin/python setup.py build_ext "
                              "--inplace`), then run again")


def _native_for(t: torch.Tensor) -> bool:
    """Whether a native kernel exists for tensors on t's device."""
    if _SERVED_BY == "reference":
        return False
    return t.device.type == "cpu" or (t.device.type == "cuda" and _CUDA_KERNELS)


# --------------------------------------------------------------------------- the ops

def candidates(x: torch.Tensor, dirs: torch.Tensor, start: int, count: int, lo: float = 0.0,
               hi: float = 1.0, dtype: torch.dtype | None = None,
               channels_last: bool = False) -> torch.Tensor:
    """Candidates ``start .. start + count - 1`` of one image, as :func:`candidates_ref`.

    x: (3, H, W) float image; dirs: (C, 3, H, W) float per-class directions (already
    scaled by eps), C <= 8; 0 <= start, start + count <= 3^C; lo <= hi.
    Returns (count, 3, H, W) in ``dtype`` (default x's; float32, bfloat16, float16 or
    float64), channels-last strides when ``channels_last``. Sums and clipping are done
    in float32. Native errors are RuntimeError (the reference raises ValueError)."""
    if _native_for(x):
        return torch.ops.mlsys.candidates(x, dirs, start, count, lo, hi, dtype or x.dtype,
                                          channels_last)
    return candidates_ref(x, dirs, start, count, lo, hi, dtype, channels_last)


def score(logits: torch.Tensor, mask: torch.Tensor, mode: str = "l1",
          select: str = "argmin") -> tuple[torch.Tensor, torch.Tensor]:
    """Score candidates against the true mask, as :func:`score_ref`.

    logits: (N, C, H, W) float, NCHW or channels-last (other strides are copied);
    mask: (H, W) integer class ids in [0, C) (out of range: RuntimeError on CPU; NaN
    scores on CUDA, which avoids a device sync). mode "l1" or "ce"; select "argmin" or
    "argmax". Returns (scores (N,) float32, best () int64, the first on ties) on
    logits' device, computed in float32."""
    if _native_for(logits):
        return torch.ops.mlsys.score(logits, mask, mode, select)
    return score_ref(logits, mask, mode, select)
