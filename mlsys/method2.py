"""Method two, the paper's second altered training set (paper eq. 3-5, "enhancement"), and
its stage.

C per-class FGSM directions a_c = eps * sign(grad_x J(x, full-area c)) from one batched
backward; every sign vector s in {-1, 0, +1}^C gives a candidate clip(x + sum_c s_c a_c, 0, 1);
every candidate is scored against the TRUE mask and the best kept (argmin of the mean
|onehot - softmax| in the original code). The candidates are addressed by a base-3 index
(see :mod:`mlsys.ops`, index 0 = the clean image); generation and scoring go through the
fused ops there, whose plain-PyTorch references define the results.
Fast paths (Method2Params): a bf16-autocast forward may screen the candidates, but the
winner is always decided by fp32 scores (the ``exact_top`` best rescored); channels-last
candidates; a torch.compile'd forward; and, beyond the paper, a "screened" local search
that scores a few dozen candidates, guided by a separable guess of the others' logits
(not exact: benchmarks/screened.py measures how often it finds the optimum). The searches
import with torch alone (the stage's code imports the rest when it runs).
Run by DVC as ``python -m mlsys.method2 --seed S``.
"""
from __future__ import annotations


import numpy as np
import torch

from . import augment, entry, hardware, ops
from .attacks import compiled, input_grad
from .model import eval_mode
from .params import Method2Params, ParamsError


# --------------------------------------------------------------------------- the search
SEARCHES = ("exact", "screened")  # augment.method2.search
SELECTS = ("argmin", "argmax")    # augment.method2.select


def class_directions(model: torch.nn.Module, x: torch.Tensor, eps: float, amp: bool = False) -> torch.Tensor:
    """a[n, c] = eps * sign(grad_x CE(model(x_n), full-area c)) for x (N, 3, H, W):
    returns (N, C, 3, H, W), all from one batched backward pass."""
    n, C = len(x), model.head.out_channels
    rep = x.repeat_interleave(C, dim=0)                      # (N*C, 3, H, W): image n, class c
    target = torch.arange(C, device=x.device).repeat(n)      # class of each copy
    target = target[:, None, None].expand(-1, *x.shape[2:])
    with eval_mode(model):
        g = input_grad(model, rep, target, amp=amp)
    return (eps * g.sign()).view(n, C, *x.shape[1:])


def _forward(net, cand: torch.Tensor, amp: bool) -> torch.Tensor:
    """Logits of a candidate batch; amp: in a bf16-autocast forward."""
    with torch.autocast(cand.device.type, torch.bfloat16, enabled=amp):
        return net(cand)


def _scores(net, x, dirs, mask, index: torch.Tensor | None, score: str, select: str, chunk: int,
            amp: bool, channels_last: bool) -> torch.Tensor:
    """Scores (K,) float32 on x's device of candidates ``index`` (K,) int64, or of all
    3^C when None (through the fused range op), ``chunk`` per forward. amp: bf16
    candidates and a bf16-autocast forward (screening quality, not exact)."""
    dtype = torch.bfloat16 if amp else torch.float32
    total = 3 ** dirs.shape[0] if index is None else len(index)
    out = []
    for start in range(0, total, chunk):
        count = min(chunk, total - start)
        if index is None:
            cand = ops.candidates(x, dirs, start, count, 0.0, 1.0, dtype, channels_last)
        else:
            cand = ops.candidates_at(x, dirs, index[start:start + count], 0.0, 1.0, dtype, channels_last)
        out.append(ops.score(_forward(net, cand, amp), mask, score, select)[0])  # on the device: no sync
    return torch.cat(out)


def _pick(scores: torch.Tensor, select: str) -> torch.Tensor:
    """Position of the best score (argmin / argmax; the first on ties), on the device."""
    return scores.argmin() if select == "argmin" else scores.argmax()


def _short_list(scores: torch.Tensor, k: int, select: str) -> torch.Tensor:
    """The ``k`` best positions of ``scores`` (ties: lower position first), in ascending
    order, so that a later first-on-ties pick among them is the lowest index."""
    order = torch.argsort(scores if select == "argmin" else -scores, stable=True)
    return order[:k].sort().values


# --------------------------------------------------------------------------- screened search
def neighbours(index: int, n_classes: int) -> list[int]:
    """The 2C indices one digit (one class's sign) away from ``index``, class by class."""
    digits = ops.base3_digits(index, n_classes).tolist()
    return [ops.with_digit(index, c, v) for c in range(n_classes) for v in range(3) if v != digits[c]]


def one_class_effects(logits: dict[int, torch.Tensor], centre: int, n_classes: int) -> torch.Tensor:
    """E (C, 3, K, H, W): E[c, v] = logits(centre with digit c set to v) - logits(centre),
    zero at the centre's own digit; ``logits`` holds the centre and its neighbours."""
    base = logits[centre]
    effects = torch.zeros(n_classes, 3, *base.shape, device=base.device)
    digits = ops.base3_digits(centre, n_classes).tolist()
    for c in range(n_classes):
        for v in range(3):
            if v != digits[c]:
                effects[c, v] = logits[ops.with_digit(centre, c, v)] - base
    return effects


def separable_logits(centre: torch.Tensor, effects: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
    """The screened search's surrogate, logits(s) ~ logits(centre) + sum_c E[c, s_c]: the
    one-class changes measured around the centre, added as if the classes did not interact.
    centre: (K, H, W); effects: (C, 3, K, H, W) from :func:`one_class_effects`;
    digits: (N, C) of the candidates. Returns (N, K, H, W)."""
    out = centre.expand(len(digits), *centre.shape).clone()
    for c in range(effects.shape[0]):
        out += effects[c][digits[:, c]]
    return out


@torch.no_grad()
def screened_scores(model: torch.nn.Module, x: torch.Tensor, dirs: torch.Tensor, mask: torch.Tensor,
                    score: str = "l1", select: str = "argmin", chunk: int = 243, screen_k: int = 8,
                    amp: bool = False, channels_last: bool = False) -> torch.Tensor:
    """Beyond the paper: a local search that scores only a few of the 3^C candidates.

    From a centre (first the clean image) the 2C candidates one sign away are scored;
    their logits give :func:`separable_logits`, a guess of every candidate's logits, and
    the ``screen_k`` candidates whose guessed score is best and that are not yet scored
    are scored. The best candidate scored so far becomes the next centre; the search ends
    when a round leaves the centre the best. So the winner is the best of all candidates
    scored, and no worse than any candidate one sign away from it.
    Returns scores (3^C,) float32 on x's device: those of the candidates scored (amp:
    bf16-autocast forwards), +inf (argmin) or -inf (argmax) for the others."""
    C = dirs.shape[0]
    total = 3**C
    digits = ops.base3_digits(torch.arange(total, device=x.device), C)  # (3^C, C) of every candidate
    worst = float("inf") if select == "argmin" else float("-inf")
    dtype = torch.bfloat16 if amp else torch.float32
    scores = torch.full((total,), worst, device=x.device)
    scored = torch.zeros(total, dtype=torch.bool, device=x.device)
    logits: dict[int, torch.Tensor] = {}  # float32 logits (K, H, W) of every candidate scored

    def measure(index: torch.Tensor) -> None:
        index = index[~scored[index]]
        for start in range(0, len(index), chunk):
            part = index[start:start + chunk]
            out = _forward(model, ops.candidates_at(x, dirs, part, 0.0, 1.0, dtype, channels_last), amp).float()
            scores[part] = ops.score(out, mask, score, select)[0]
            scored[part] = True
            logits.update(zip(part.tolist(), out))

    centre = 0
    while True:
        measure(torch.tensor([centre, *neighbours(centre, C)], device=x.device))
        base, effects = logits[centre], one_class_effects(logits, centre, C)
        guess = torch.cat([ops.score(separable_logits(base, effects, digits[s:s + chunk]), mask, score,
                                     select)[0] for s in range(0, total, chunk)])
        guess[scored] = worst
        left = int((~scored).sum())
        if left:
            measure(_short_list(guess, min(screen_k, left), select))
        best = int(_pick(scores, select))
        if best == centre:
            return scores
        centre = best


@torch.no_grad()
def search_image(model: torch.nn.Module, x: torch.Tensor, dirs: torch.Tensor, mask: torch.Tensor,
                 score: str = "l1", select: str = "argmin", chunk: int = 243, amp: bool = False,
                 channels_last: bool = False, exact_top: int = 16, search: str = "exact",
                 screen_k: int = 8, compile: bool = False) -> tuple[int, float]:
    """Best of the 3^C candidates of one image against its true mask (model in eval mode).

    x: (3, H, W) in [0, 1]; dirs: (C, 3, H, W); mask: (H, W) int64.
    search "exact" (the paper): every candidate is scored. "screened" (beyond the paper):
    :func:`screened_scores`, a local search that scores a few dozen. amp: those scores
    come from bf16-autocast forwards, and the ``exact_top`` best of them are rescored in
    fp32; the winner is always decided by fp32 scores. channels_last: candidates in
    channels-last layout (the model's weights are left alone); compile: a
    torch.compile'd forward (exact search: its batches keep one shape). The exact search
    syncs with the host once, at the end; the screened one once a round.
    Returns (best base-3 index, its fp32 score); ties go to the lowest index."""
    if search not in SEARCHES:
        raise ValueError(f"search {search!r} is not one of {SEARCHES}")
    net = compiled(model) if compile and search == "exact" else model
    kw = dict(score=score, select=select, chunk=chunk, channels_last=channels_last)
    if search == "screened":
        scores = screened_scores(model, x, dirs, mask, screen_k=screen_k, amp=amp, **kw)
    else:
        scores = _scores(net, x, dirs, mask, None, amp=amp, **kw)
    index = None                                             # None: positions are the indices
    if amp:                                                  # fp32 decides among the bf16 short list
        top = min(exact_top, int(scores.isfinite().sum())) if search == "screened" else exact_top
        index = _short_list(scores, top, select)
        scores = _scores(net, x, dirs, mask, index, amp=False, **kw)
    best = _pick(scores, select)
    pos = best if index is None else index[best]
    idx, value = torch.stack([pos.double(), scores[best].double()]).tolist()  # the one sync
    return int(idx), value


def method_two(model: torch.nn.Module, x: torch.Tensor, masks: torch.Tensor, cfg: Method2Params
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Signed-combination search for a batch x (N, 3, H, W) with true masks (N, H, W),
    with the search, precision, layout and compile settings of ``cfg``.

    The directions are always computed in fp32 (C backward passes, cheap beside the 3^C
    forwards), so that with ``cfg.amp`` the candidates, and the fp32 winner among the
    bf16 short list, are those of the fp32 search.
    Returns (best images (N, 3, H, W), sign vectors (N, C) int8, scores (N,) float32,
    base-3 indices (N,) int64). "auto" fast paths resolve for x's device
    (:func:`mlsys.hardware.resolve`: the bf16 screen where bf16 is native, CPUs included)."""
    cfg = hardware.resolve(cfg, x.device, bf16_on_cpu=True)
    dirs = class_directions(model, x, cfg.eps)
    out, idxs, scores = [], [], []
    with eval_mode(model):
        for i in range(len(x)):
            idx, value = search_image(model, x[i], dirs[i], masks[i], cfg.score, cfg.select, cfg.chunk,
                                      amp=cfg.amp, channels_last=cfg.channels_last, exact_top=cfg.exact_top,
                                      search=cfg.search, screen_k=cfg.screen_k, compile=cfg.compile)
            out.append(ops.candidates_ref(x[i], dirs[i], idx, 1)[0])
            idxs.append(idx)
            scores.append(value)
    idxs_t = torch.tensor(idxs, dtype=torch.int64)
    return (torch.stack(out), ops.index_signs(idxs_t, dirs.shape[1]),
            torch.tensor(scores, dtype=torch.float32), idxs_t)


# --------------------------------------------------------------------------- the stage
def check(cfg: Method2Params) -> None:
    """One-line errors for choices the search does not know, and a stale native build."""
    for key, value, known in (("search", cfg.search, SEARCHES), ("select", cfg.select, SELECTS),
                              ("score", cfg.score, ops.SCORES)):
        if value not in known:
            raise ParamsError(f"params: augment.method2.{key} = {value!r} is invalid; expected one of {list(known)}")
    ops.require_current()


def settings(cfg, device: torch.device) -> Method2Params:
    """``augment.method2`` with its "auto" fast paths resolved for ``device``: the bf16 screen
    wherever bf16 is native, CPUs included, since fp32 decides the winner."""
    return hardware.resolve(cfg.method2, device, bf16_on_cpu=True)


def perturb(model: torch.nn.Module, x: torch.Tensor, masks: torch.Tensor, cfg: Method2Params) -> dict:
    adv, signs, scores, index = method_two(model, x, masks, cfg)
    return {"images": adv, "signs": signs, "score": scores, "index": index}


METHOD = augment.Method(
    name="method2", module="mlsys.method2", settings=settings, perturb=perturb, check=check,
    kernels=ops.build_id,
    columns=lambda n_classes: {"signs": ((n_classes,), np.int8), "score": ((), np.float32), "index": ((), np.int64)})

if __name__ == "__main__":
    entry.finish(augment.cli(METHOD))
