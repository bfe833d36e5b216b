"""The paper's two altered training sets, built with model 1's own gradients.

Method one (paper eq. 2): for each image, a targeted attack toward full-area class
c for every class in turn, each pass starting from the previous pass's output; the
final image joins the method-one set with the image's TRUE mask.

Method two (paper eq. 3-5, "enhancement"): C per-class FGSM directions
a_c = eps * sign(grad_x J(x, full-area c)) from one batched backward; every sign
vector s in {-1, 0, +1}^C gives a candidate clip(x + sum_c s_c a_c, 0, 1); every
candidate is scored against the TRUE mask and the best kept (argmin of the mean
|onehot - softmax| in the original code). The candidates are addressed by a base-3
index (see :mod:`mlsys.ops`, index 0 = the clean image); generation and scoring go
through the fused ops there, whose plain-PyTorch references define the results.
Fast paths (Method2Params): a bf16-autocast forward may screen the candidates, but the
winner is always decided by fp32 scores (the ``exact_top`` best rescored); channels-last
candidates; a torch.compile'd forward; and, beyond the paper, a "screened" local search
that scores a few dozen candidates, guided by a separable guess of the others' logits
(not exact: benchmarks/screened.py measures how often it finds the optimum). This module's searches
import with torch alone (the stage code imports data and distributed when it runs).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import hardware, ops
from .attacks import attack_from_params, compiled, eval_mode, input_grad

if TYPE_CHECKING:  # the searches import with torch alone (GPU machines: no yaml, tqdm, mlflow, dvc)
    from .distributed import Group, Shard
    from .params import Method1Params, Method2Params


# --------------------------------------------------------------------------- method one
def method_one(model: torch.nn.Module, x: torch.Tensor, cfg: Method1Params,
               classes: list[int] | None = None) -> torch.Tensor:
    """Layered targeted attack: x (N, 3, H, W) in [0, 1] -> perturbed batch, after one
    targeted pass toward each class of ``classes`` (default 0..C-1) in turn."""
    classes = list(range(model.head.out_channels)) if classes is None else classes
    for c in classes:
        x = attack_from_params(model, x, cfg, c)
    return x


# --------------------------------------------------------------------------- method two
SEARCHES = ("exact", "screened")


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
def base3_digits(n_classes: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(3^C, C) int64: digit c of every base-3 index (0 -> sign 0, 1 -> +1, 2 -> -1)."""
    powers = 3 ** torch.arange(n_classes, device=device)
    return (torch.arange(3**n_classes, device=device)[:, None] // powers) % 3


def neighbours(index: int, n_classes: int) -> list[int]:
    """The 2C indices one digit (one class's sign) away from ``index``, class by class."""
    out = []
    for c in range(n_classes):
        digit = (index // 3**c) % 3
        out += [index + (v - digit) * 3**c for v in range(3) if v != digit]
    return out


def one_class_effects(logits: dict[int, torch.Tensor], centre: int, n_classes: int) -> torch.Tensor:
    """E (C, 3, K, H, W): E[c, v] = logits(centre with digit c set to v) - logits(centre),
    zero at the centre's own digit; ``logits`` holds the centre and its neighbours."""
    base = logits[centre]
    effects = torch.zeros(n_classes, 3, *base.shape, device=base.device)
    for c in range(n_classes):
        digit = (centre // 3**c) % 3
        for v in range(3):
            if v != digit:
                effects[c, v] = logits[centre + (v - digit) * 3**c] - base
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
    digits = base3_digits(C, x.device)
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


# --------------------------------------------------------------------------- the stage's work
def _model_digest(model: torch.nn.Module) -> str:
    """sha256 of the model's parameters and buffers (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fast_paths(method: str, cfg, device: torch.device) -> Method1Params | Method2Params:
    """``method``'s section of ``cfg`` (AugmentParams) with its "auto" fast paths resolved for
    ``device``: a bf16 screen only for method two (its winner is decided in fp32), never
    bf16 in method one's attack loop on a CPU (:func:`mlsys.hardware.resolve`)."""
    return hardware.resolve(getattr(cfg, method), device, bf16_on_cpu=method == "method2")


def build_set(method: str, model: torch.nn.Module, clean: str | os.PathLike, out: str | os.PathLike,
              cfg, device: torch.device, provenance: dict, progress: bool = True, shard: Shard | None = None,
              group: Group | None = None) -> dict[str, float] | None:
    """Write data/<method>.h5: the training split of ``clean`` perturbed by ``method``
    (true masks and channel bits kept), chunk by chunk (``batch_size`` images). Returns summary
    statistics, or None where this process only computed chunks (a ``shard`` of
    several, or a torchrun rank other than 0).

    Every finished chunk is kept in ``.<out name>.partial/`` beside ``out`` under a
    fingerprint of the inputs (clean data md5, model weights, settings, device type,
    ops backend and kernel digest, source of the code that computes them): a killed run resumes from its last finished chunk, shards computed
    elsewhere are merged, and the dataset is the same bytes as one uninterrupted
    process writes. The folder is removed once ``out`` is complete."""
    from .data import create_dataset, file_md5, has_channels, image_size, iter_chunks, split_of
    from .distributed import ChunkStore, Shard, chunk_sizes, is_main, run_chunks, source_digest

    shard = Shard() if shard is None else shard
    mcfg = fast_paths(method, cfg, device)  # what the fingerprint and the provenance record
    train = split_of(clean, "train")
    n = len(train)
    C = model.head.out_channels
    model.to(device)
    out = Path(out)
    main = is_main(group)
    store = ChunkStore(out.with_name(f".{out.name}.partial"), {
        "method": method, "settings": asdict(mcfg), "n": n, "classes": C,
        "clean_md5": file_md5(clean), "model": _model_digest(model), "device": device.type,
        "ops": ops.build_id() if method == "method2" else None,  # backend and csrc/ digest of the kernels
        "code": source_digest("augment", "attacks", "ops", "model")}) if main else None

    def compute(batch) -> dict[str, np.ndarray]:
        j, images, masks = batch
        torch.manual_seed(j)  # any random draw: per chunk, the same on any shard
        x, y = images.to(device), masks.to(device)
        if method == "method1":
            return {"images": method_one(model, x, mcfg).cpu().numpy()}
        adv, signs, scores, index = method_two(model, x, y, mcfg)
        return {"images": adv.cpu().numpy(), "signs": signs.cpu().numpy(),
                "score": scores.cpu().numpy(), "index": index.cpu().numpy()}

    bs = mcfg.batch_size
    chunks = ((j, (j, images, masks)) for j, (_, images, masks, _) in enumerate(iter_chunks(clean, "train", bs)))
    sizes = chunk_sizes(n, bs)
    before = run_chunks(chunks, compute, store, shard, group, sizes, method, progress)
    if shard.count > 1 or not main:
        return None

    extra = {"signs": ((C,), np.int8), "score": ((), np.float32), "index": ((), np.int64)} \
        if method == "method2" else None
    attrs = {**provenance, "kind": method, "source": f"{method} of {os.fspath(clean)}",
             "settings": asdict(mcfg), "class_order": list(range(C)),
             "mode": getattr(mcfg, "mode", "signed-combination search")}
    linf, l2 = [], []
    splits = {"train": np.arange(n), "valid": np.arange(0), "test": np.arange(0)}
    channels = has_channels(clean)  # an older clean file without /channels gives a set without them
    with create_dataset(out, n, image_size(clean), attrs, splits, extra, channels) as w:
        for j, ((idx, images, masks, tissue, bits), result) in enumerate(
                zip(iter_chunks(clean, "train", bs, channels=True), store.merged(len(sizes)))):
            if len(result["images"]) != len(idx):
                raise RuntimeError(f"{method}: chunk {j} in {store.folder} holds {len(result['images'])} "
                                   f"images, not {len(idx)}")
            w.write(j * bs, masks=masks.to(torch.uint8), tissue=tissue,
                    **({} if bits is None else {"channels": bits}), **result)
            d = (torch.from_numpy(result["images"]) - images).flatten(1)
            linf += d.abs().amax(1).tolist()
            l2 += d.norm(dim=1).tolist()
    store.remove()
    resumed = sum(sizes[j] for j in before)
    if resumed:
        print(f"{method}: resumed {resumed} of {n} images from {store.folder} (an interrupted run's or shards')")
    return {"n_images": float(n), "mean_linf": float(np.mean(linf)), "mean_l2": float(np.mean(l2))}


# --------------------------------------------------------------------------- the augment stage
def main(p, method: str, seed: int, argv: list[str], shard_spec: str | None = None) -> None:
    """DVC stage ``augment-<method>@<seed>``: ``data/seed<seed>/<method>.h5``, the training
    split perturbed with seed ``seed``'s model 1, its summary in ``metrics/augment/...`` and one
    MLflow run. ``shard_spec`` "i/n" computes one shard's chunks only; torchrun ranks
    (``distributed.nproc.augment``) share them; either way the merged file is the same bytes."""
    from .distributed import in_processes
    from .hardware import pick_device

    in_processes(p.distributed.nproc.augment, argv, pick_device(p.augment.device), p.distributed.timeout_s,
                 lambda group: _augment_stage(p, method, seed, shard_spec, group))


def _augment_stage(p, method: str, seed: int, shard_spec: str | None, group) -> None:
    import contextlib

    import mlflow

    from . import figures, paths, tracking
    from .data import file_md5, head, require, write_json
    from .distributed import Shard, is_main
    from .metrics import predict
    from .params import section_dict, show_progress
    from .hardware import pick_device
    from .train import load_weights

    shard = Shard.parse(shard_spec) if shard_spec else Shard()
    main = is_main(group) and shard.count == 1  # the process that logs and writes
    mcfg = getattr(p.augment, method)
    weights, out, stage = paths.weights("model1", seed), paths.dataset(method, seed), \
        paths.stage_name("augment", method, seed)
    params = {f"augment.{method}.{k}": v for k, v in section_dict(mcfg).items()}
    run = tracking.stage_run(stage, params, p.tracking.experiment,
                             {"mlsys.stage": "augment", "mlsys.method": method, "mlsys.seed": str(seed),
                              "mlsys.ops_backend": ops.build_id()}) if main else contextlib.nullcontext()
    with run:  # a refused stage (missing input, stale kernels) ends its run FAILED, leaving nothing behind
        require(weights, paths.stage_name("train", "model1", seed))
        if method == "method2":
            ops.require_current()
        device = group.device if group else pick_device(p.augment.device)
        model = load_weights(weights, p.model).to(device).eval()
        require(paths.CLEAN, "prepare")
        if main:
            tracking.log_dataset(paths.CLEAN, "source")
        provenance = {"producing_model": weights, "producing_model_md5": file_md5(weights),
                      "seed": seed, "ops_backend": ops.build_id(), "device": hardware.describe(device)}
        resolved = fast_paths(method, p.augment, device)  # as build_set runs it
        if main:
            mlflow.log_params(hardware.resolved_params(f"augment.{method}", resolved))
            mlflow.set_tag("mlsys.bf16", hardware.describe(device))
        with tracking.timed("compute"):
            stats = build_set(method, model, paths.CLEAN, out, p.augment, device, provenance, show_progress(),
                              shard, group)
        if stats is None:
            if shard.count > 1:
                print(f"{stage} shard {shard}: chunks in .{Path(out).name}.partial; run without --shard to merge")
            return
        mlflow.log_metrics(stats)
        write_json(paths.augment_metrics(method, seed),
                   {**stats, "fast_paths": {"amp": resolved.amp, "channels_last": resolved.channels_last}})
        tracking.log_dataset(out, "output")
        clean, _ = head(paths.CLEAN, "train", 4)
        pert, masks = head(out, "train", 4)
        logits = predict(model.cpu(), pert, len(pert), torch.device("cpu"))
        mlflow.log_figure(figures.perturbation_panel(clean, pert, masks, logits, f"{method} training set (seed {seed})"),
                          "figures/perturbation_panel.png")
        print(f"{stage}: {out} ({int(stats['n_images'])} images, mean L-inf {stats['mean_linf']:.4f})")
