"""The evaluate stage: each model on the test split, clean, under the paper's attack and
under the field's protocol (``evaluate.robust``: SegPGD, CosPGD, SEA at several L-inf radii,
the worst case per image, per tissue, and curves over the attack steps), and on the
transfer sets (the test split perturbed by method one and method two with model 1). The metrics
themselves (both variants) are in :mod:`mlsys.metrics`.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from . import entry, hardware
from .attacks import attack_from_params, check_mode, fast
from .metrics import (SegMetrics, evaluate_chunks, image_hist, image_miou, pack_state, paper_truth, pixel_accuracy,
                      predict, predicted_class, state_accuracy, unpack_state, worst_candidate)
from .model import eval_mode
from .params import EXPERIMENT, METHODS
from .results import json_clean, radius_key
from .robust import SEA_LOSSES, SEA_SCHEDULE, _stages, greedy_worst_miou, inverse_frequency, untargeted, worst_case
from .robust import check as check_attacks
from .robust import label as attack_label


# --------------------------------------------------------------------------- the field's protocol
# (docs/robustness.md; settings: evaluate.robust)
def image_states(logits: torch.Tensor, masks: torch.Tensor, channels: torch.Tensor | None, n_classes: int,
                 threshold: float) -> torch.Tensor:
    """:meth:`SegMetrics.state` of every image on its own: (N, 3C + 9) float64 on the CPU,
    for logits (N, C, H, W), masks (N, H, W) int64 and channel bits (N, H, W) or None.
    Rows add up to the state of the batch (counts exactly, the loss up to float order), so
    per-image choices (worst case, tissue) are sums of rows. Reference: SegMetrics.update
    on each image alone (tests/test_evaluate_robust.py)."""
    logits, masks = logits.float(), masks.to(logits.device)
    n, C = logits.shape[0], n_classes
    loss = F.cross_entropy(logits, masks, reduction="none").flatten(1).double().sum(1)
    pred = predicted_class(logits)
    pixels = torch.full((n,), float(masks[0].numel()), dtype=torch.float64, device=logits.device)
    correct = (pred == masks).flatten(1).sum(1).double()
    hist = image_hist(pred, masks, C)
    tp = hist.diagonal(dim1=1, dim2=2)
    fired = logits.softmax(1) >= threshold
    truth = paper_truth(masks, channels, C)
    paper = torch.stack([(fired & truth).flatten(1).sum(1), (fired & ~truth).flatten(1).sum(1),
                         (~fired & truth).flatten(1).sum(1)], 1).double()
    raw = pixels if channels is not None else torch.zeros_like(pixels)
    return pack_state(loss_sum=loss, pixels=pixels, correct=correct, tp=tp, fp=hist.sum(1) - tp,
                      fn=hist.sum(2) - tp, paper=paper, paper_raw=raw, images=torch.ones_like(pixels),
                      miou_image=image_miou(hist)).cpu()


def curve_points(steps: int, every: int) -> list[int]:
    """Update counts at which a curve is recorded: 0, k, 2k, ... and always ``steps``."""
    return sorted(set(range(0, steps + 1, every)) | {steps})


def robust_seed(chunk: int, radius: float, attack: str) -> int:
    """The seed of an attack's random start on one chunk: the same on every shard and rank."""
    import zlib

    return zlib.crc32(f"{chunk}/{float(radius)!r}/{attack}".encode())


class StepStates:
    """Per-image states (N, S) of one attack run at the update counts ``points``, from the
    logits the attack reports through on_step (no extra forward); ``states(logits)`` ->
    (N, S) as :func:`image_states`, ``masks`` (N, H, W) the true classes.

    ``stages``: updates per radius stage, in the order the attack runs them (APGD: one per
    stage of its schedule; each stage first evaluates its start). ``lowest`` False: the
    attack returns its last iterate (pgd, segpgd, cospgd), the point at t is the image after
    t updates. ``lowest`` True (apgd, each SEA loss): the attack returns, per image, the
    lowest-accuracy iterate of its last stage (later ones win ties), the point at t is
    that image among the current stage's iterates so far -- what the attack returns at
    t = steps. A stage that SEA's early stop ends skips the t of its remaining updates
    (``robust.apgd``); their points get the stage's lowest-accuracy logits as they stood at
    the stop, which is what the stage returns there. Points before ``valid_from`` updates
    are NaN rows: SEA's first stages run at 2 eps and 1.5 eps, so its iterates before the
    last stage (the last 40% of the steps, from that stage's start) lie outside the
    eps-ball and are no attack at eps."""

    def __init__(self, points: list[int], stages: list[int], lowest: bool, states, masks: torch.Tensor,
                 valid_from: int = 0) -> None:
        self.points, self.states, self.lowest, self.masks = set(points), states, lowest, masks
        self.valid_from = valid_from
        self.counts = [(sum(stages[:s]) + k, k == 0) for s, n in enumerate(stages) for k in range(n + 1)]
        self.at: dict[int, torch.Tensor] = {}
        self.low = self.low_acc = None  # lowest mode: each image's logits of lowest accuracy so far
        self.seen = -1                   # lowest mode: the last t reported

    def on_step(self, t: int, logits: torch.Tensor) -> None:
        if not self.lowest:
            if t in self.points:
                self.at[t] = self.states(logits)
            return
        self._fill_skipped(t)
        u, start = self.counts[t]
        acc = pixel_accuracy(logits, self.masks)
        if start:
            self.low, self.low_acc = logits.detach().clone(), acc
        else:
            keep = acc <= self.low_acc
            self.low = torch.where(keep.view(-1, 1, 1, 1), logits.detach(), self.low)
            self.low_acc = torch.minimum(acc, self.low_acc)
        if u in self.points:
            self.at[u] = self.states(self.low)  # a stage start shares its count with the update before it
        self.seen = t

    def _fill_skipped(self, t: int) -> None:
        """Lowest mode: the points of the forwards after the last one seen and before t, which an
        early stop skipped (never a stage's start), at the lowest-accuracy logits as they stand."""
        skipped = [u for u, _ in self.counts[self.seen + 1:t] if u in self.points]
        if skipped:
            state = self.states(self.low)
            self.at.update((u, state) for u in skipped)
        self.seen = max(self.seen, t - 1)

    def result(self, points: list[int]) -> torch.Tensor:
        """(P, N, S) at ``points``."""
        if self.lowest and self.low is not None:  # updates after the last forward: stopped early
            self._fill_skipped(len(self.counts))
        missing = [u for u in points if u not in self.at]
        if missing:
            raise RuntimeError(f"the attack reported no logits at update counts {missing}")
        return torch.stack([self.at[u] if u >= self.valid_from else torch.full_like(self.at[u], math.nan)
                            for u in points])


def worst_of(states: torch.Tensor) -> torch.Tensor:
    """states (K, ..., N, S) of K candidates -> (..., N, S): per image the candidate of lowest
    pixel accuracy, the first of equals, by the rule of ``robust.worst_case``
    (:func:`mlsys.metrics.worst_candidate`); NaN rows (no valid point) are never chosen
    unless all are NaN."""
    which = worst_candidate(state_accuracy(states))
    return torch.gather(states, 0, which[None, ..., None].expand((1,) + states.shape[1:]))[0]


def _attack_curve(model, images, masks, attack: str, eps: float, steps: int, points: list[int], states,
                  generator: torch.Generator, amp: bool, weights: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run one of the field's attacks: (adversarial batch, per-image states (P, N, S) at points,
    and for SEA the per-image states (3, N, S) of each loss's returned image, else None)."""
    if attack == "sea":  # one run per loss; the point at t: per image the worst of the three
        stages = [n for n, _ in _stages(steps, SEA_SCHEDULE)]
        runs = {name: StepStates(points, stages, True, states, masks, valid_from=sum(stages[:-1]))
                for name in SEA_LOSSES}
        adv = untargeted(model, images, masks, attack, eps, steps, generator=generator, amp=amp, weights=weights,
                         on_step=lambda name, t, logits: runs[name].on_step(t, logits))
        each = torch.stack([runs[n].result(points) for n in SEA_LOSSES])  # (3, P, N, S)
        return adv, worst_of(each), each[:, -1]  # the last point is each loss's returned image
    run = StepStates(points, [steps], attack == "apgd", states, masks)
    adv = untargeted(model, images, masks, attack, eps, steps, generator=generator, amp=amp, on_step=run.on_step)
    return adv, run.result(points), None


def candidates(attacks: list[str]) -> list[str]:
    """The candidates of the greedy worst-case mIoU: the attacks in order, "sea" as its three
    runs ("sea/mask-ce-bal", "sea/mask-ce", "sea/js"), as SEA's worse_only.py has them."""
    return [c for a in attacks for c in ([f"sea/{n}" for n in SEA_LOSSES] if a == "sea" else [a])]


def train_class_weights(path: str, n_classes: int) -> tuple[torch.Tensor | None, str]:
    """Mask-CE-Bal's class weights as SEA fixes them per dataset: ``inverse_frequency`` of
    the pixel counts of the TRAINING split's masks of the HDF5 file ``path`` (read here, in
    blocks of masks, so the prepare and train stages are untouched). Returns (weights (C,),
    where they come from); (None, why) where the file has no or an empty training split:
    Mask-CE-Bal then weighs each image by its own masks (a fallback, not SEA's rule)."""
    import h5py

    with h5py.File(path, "r") as f:
        if "split/train" not in f or len(f["split/train"]) == 0:
            return None, f"per-image inverse class frequency (fallback: {path} has no training split)"
        masks = f["masks"]
        keep = np.zeros(len(masks), dtype=bool)
        keep[f["split/train"][:]] = True
        counts = np.zeros(n_classes, dtype=np.int64)
        for start in range(0, len(masks), 256):
            block = masks[start:start + 256][keep[start:start + 256]]
            counts += np.bincount(block.ravel().astype(np.int64), minlength=n_classes)[:n_classes]
    return inverse_frequency(torch.from_numpy(counts)), \
        f"inverse pixel frequency of the train split of {path} ({int(keep.sum())} images), sum 1"


def robust_chunk(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, bits: torch.Tensor | None,
                 tissue: torch.Tensor, n_tissues: int, chunk: int, cfg,
                 weights: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """The protocol ``cfg.robust`` (EvaluateParams) on one chunk: images (N, 3, H, W) in [0, 1],
    masks (N, H, W), bits as SegMetrics.update takes them, tissue (N,) int64 index of each
    image's tissue (of ``n_tissues``). For every radius r (eps = r / 255) every attack runs
    with a generator seeded by ``robust_seed`` (shards and ranks agree), then per image the
    worst case over the attacks (``robust.worst_case``). Returns summed states (S = 3C + 9):
    "robust_attack" (R, A, S), "robust_worst" (R, S), "robust_curve" (R, A + 1, P, S) at
    ``curve_points`` (the last row: per image the worst of the attacks at each point; NaN
    where an attack has no point inside the eps-ball, see ``StepStates``),
    "robust_tissue_clean" (T, S), "robust_tissue_worst" (R, T, S); and per image (not summed)
    "images_robust" (R, K, N, S) of the ``candidates`` K, for the greedy worst-case mIoU.
    weights: SEA's class weights (C,) (``train_class_weights``), None for per-image ones."""
    rc, C, thr = cfg.robust, model.head.out_channels, cfg.paper_threshold
    acfg = hardware.resolve(cfg.attack, images.device, bf16_on_cpu=False)  # evaluate.attack's fast paths
    model = fast(model, acfg.channels_last, acfg.compile)
    points = curve_points(rc.steps, rc.curve_every)

    def states(logits: torch.Tensor) -> torch.Tensor:
        return image_states(logits, masks, bits, C, thr)

    def to_tissue(st: torch.Tensor) -> torch.Tensor:  # (N, S) -> (T, S)
        return torch.zeros(n_tissues, st.shape[1], dtype=torch.float64).index_add_(0, tissue.cpu(), st)

    with torch.no_grad(), eval_mode(model):
        out = {"robust_tissue_clean": to_tissue(states(model(images))).numpy()}
    per_attack, worst, curves, tissue_worst, each = [], [], [], [], []
    for radius in rc.radii:
        advs, finals, along, parts = [], [], [], []
        for attack in rc.attacks:
            g = torch.Generator().manual_seed(robust_seed(chunk, radius, attack))
            adv, curve, runs = _attack_curve(model, images, masks, attack, radius / 255, rc.steps, points, states,
                                             g, acfg.amp, weights)
            with torch.no_grad(), eval_mode(model):
                finals.append(states(model(adv)))
            parts.extend(list(runs) if runs is not None else [finals[-1]])
            advs.append(adv)
            along.append(curve)
        _, _, which = worst_case(model, images, masks, advs)
        w = torch.stack(finals)[which.cpu(), torch.arange(len(images))]  # (N, S): each image's worst attack
        along = torch.stack(along)  # (A, P, N, S)
        per_attack.append(torch.stack(finals).sum(1))
        worst.append(w.sum(0))
        curves.append(torch.cat([along, worst_of(along)[None]]).sum(2))
        tissue_worst.append(to_tissue(w))
        each.append(torch.stack(parts))
    out.update(robust_attack=torch.stack(per_attack).numpy(), robust_worst=torch.stack(worst).numpy(),
               images_robust=torch.stack(each).numpy(),
               robust_curve=torch.stack(curves).numpy(), robust_tissue_worst=torch.stack(tissue_worst).numpy())
    return out


def evaluate_split(model: torch.nn.Module, path: str, split: str, cfg, device: torch.device,
                   store=None, shard=None, group=None, progress: bool = True):
    """Metrics of ``model`` on a split of the HDF5 file ``path``, clean and under the
    attack of ``cfg`` (EvaluateParams), and under the field's protocol ``cfg.robust``
    where enabled, chunk by chunk (``cfg.attack.batch_size`` images).

    Each chunk's counts are kept in ``store`` (a :class:`mlsys.distributed.ChunkStore`)
    and folded in chunk order, so shards (``shard``, or torchrun ranks in ``group``)
    merge into exactly the single-process numbers. Returns (clean SegMetrics, attacked
    SegMetrics, panel arrays of the first ``cfg.n_panel`` images (image, adversarial, mask,
    logits), robust: :func:`robust_merge`'s dict, None where ``cfg.robust.enabled`` is
    false), or None where this process only computed its chunks."""
    from .data import iter_chunks, split_of, split_tissues
    from .distributed import Shard, chunk_sizes, is_main, run_chunks

    shard = shard or Shard()
    acfg, rc, C, thr = cfg.attack, cfg.robust, model.head.out_channels, cfg.paper_threshold
    sizes = chunk_sizes(len(split_of(path, split)), cfg.attack.batch_size)
    tissues = split_tissues(path, split) if rc.enabled else []
    paper_points = curve_points(acfg.steps, rc.curve_every)
    weights, weights_source = train_class_weights(path, C) if rc.enabled else (None, "")

    def compute(batch) -> dict[str, np.ndarray]:
        j, images, masks, bits, names = batch  # bits: channel bits, None for a file without /channels
        torch.manual_seed(j)  # standard PGD's random start: the same draws for a chunk on any shard
        images, masks = images.to(device), masks.to(device)
        clean, attacked = SegMetrics(C, thr), SegMetrics(C, thr)
        with torch.no_grad():
            clean.update(model(images), masks, bits)
        out = {}
        along = StepStates(paper_points, [acfg.steps], False, lambda z: image_states(z, masks, bits, C, thr),
                           masks) if rc.enabled else None  # the paper attack's curve, from its own forwards
        adv = attack_from_params(model, images, acfg, acfg.target, along.on_step if along else None)
        if along:
            out["paper_curve"] = along.result(paper_points).sum(1).numpy()
        with torch.no_grad():
            logits = model(adv)
        attacked.update(logits, masks, bits)
        out.update(clean=clean.state(), attack=attacked.state())
        if rc.enabled:
            ids = torch.tensor([tissues.index(_text(t)) for t in names], dtype=torch.int64)
            out.update(robust_chunk(model, images, masks, bits, ids, len(tissues), j, cfg, weights))
        if j == 0:
            k = min(cfg.n_panel, len(images))
            out.update(panel_images=images[:k].cpu().numpy(), panel_adv=adv[:k].cpu().numpy(),
                       panel_masks=masks[:k].cpu().numpy(), panel_logits=logits[:k].float().cpu().numpy())
        return out

    chunks = ((j, (j, x, y, bits, names)) for j, (_, x, y, names, bits)
              in enumerate(iter_chunks(path, split, cfg.attack.batch_size, channels=True)))
    run_chunks(chunks, compute, store, shard, group, sizes, "evaluate", progress)
    if shard.count > 1 or not is_main(group):
        return None
    clean, attacked, summed, per_image = SegMetrics(C, thr), SegMetrics(C, thr), {}, []
    for j, part in enumerate(store.merged(len(sizes))):
        clean.merge(SegMetrics.from_state(part["clean"], C, thr))
        attacked.merge(SegMetrics.from_state(part["attack"], C, thr))
        for key in part:
            if key.startswith(("robust_", "paper_curve")):
                summed[key] = summed[key] + part[key] if key in summed else part[key].copy()
        if "images_robust" in part:
            per_image.append(part["images_robust"])
        if j == 0:
            panel = tuple(torch.from_numpy(part[k]) for k in ("panel_images", "panel_adv", "panel_masks",
                                                                "panel_logits"))
    robust = None
    if rc.enabled:
        robust = robust_merge(summed, cfg, tissues, C, np.concatenate(per_image, axis=2))
        robust["class_weights"] = None if weights is None else weights.tolist()
        robust["class_weights_source"] = weights_source
    return clean, attacked, panel, robust


def _text(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def robust_merge(summed: dict[str, np.ndarray], cfg, tissues: list[str], n_classes: int,
                 per_image: np.ndarray | None = None) -> dict:
    """The chunks' summed states (``robust_chunk``'s keys and "paper_curve") as SegMetrics:
    {"radii", "attacks", "tissues", "steps" (curve points), "paper_steps",
    "worst": [per radius], "per_attack": {attack: [per radius]},
    "tissue_clean": {tissue: m}, "tissue_worst": {tissue: [per radius]},
    "curves": {attack or "worst": [per radius: [per point, None: no point inside the
    eps-ball]]}, "paper_curve": [per point]}, and with ``per_image`` (R, K, N, S), the
    chunks' "images_robust" in image order: "worst_miou": [per radius: ``worst_miou``]."""
    rc, thr = cfg.robust, cfg.paper_threshold

    def m(vec) -> SegMetrics | None:
        return None if np.isnan(vec).any() else SegMetrics.from_state(vec, n_classes, thr)

    radii = list(rc.radii)
    return {"radii": radii, "attacks": list(rc.attacks), "tissues": tissues,
            "steps": curve_points(rc.steps, rc.curve_every), "paper_steps": curve_points(cfg.attack.steps, rc.curve_every),
            "worst": [m(v) for v in summed["robust_worst"]],
            "per_attack": {a: [m(summed["robust_attack"][r, i]) for r in range(len(radii))]
                           for i, a in enumerate(rc.attacks)},
            "tissue_clean": {t: m(summed["robust_tissue_clean"][i]) for i, t in enumerate(tissues)},
            "tissue_worst": {t: [m(summed["robust_tissue_worst"][r, i]) for r in range(len(radii))]
                             for i, t in enumerate(tissues)},
            "curves": {a: [[m(v) for v in summed["robust_curve"][r, i]] for r in range(len(radii))]
                       for i, a in enumerate([*rc.attacks, "worst"])},
            "paper_curve": [m(v) for v in summed["paper_curve"]],
            **({} if per_image is None else
               {"worst_miou": [worst_miou(per_image[r], summed["robust_worst"][r], candidates(rc.attacks), n_classes)
                               for r in range(len(radii))]})}


def worst_miou(states: np.ndarray, worst: np.ndarray, names: list[str], n_classes: int) -> dict:
    """The greedy worst-case mIoU of SEA (``robust.greedy_worst_miou``) from per-image states
    (K, N, S) of the candidates ``names``, beside the mIoU of the per-image worst case by
    pixel accuracy (its summed state ``worst`` (S,)); both the mean IoU over all classes whose
    union is non-zero, background included, as worse_only.py computes it:
    {"greedy", "by_accuracy", "candidates", "chosen": {candidate: images}, "rounds"}."""
    u, w = unpack_state(torch.from_numpy(states)), unpack_state(torch.from_numpy(worst))
    if u["tp"].shape[-1] != n_classes:
        raise ValueError(f"states of {u['tp'].shape[-1]} classes, expected {n_classes}")
    tp, fp, fn = (u[k].numpy() for k in ("tp", "fp", "fn"))
    greedy, chosen, rounds = greedy_worst_miou(tp, tp + fp + fn)
    wtp, wfp, wfn = (w[k].numpy() for k in ("tp", "fp", "fn"))
    union = wtp + wfp + wfn
    return {"greedy": greedy, "by_accuracy": float(np.mean(wtp[union > 0] / union[union > 0])),
            "candidates": list(names), "chosen": {c: chosen.count(i) for i, c in enumerate(names)}, "rounds": rounds}


def robust_results(robust: dict) -> dict:
    """:func:`robust_merge`'s SegMetrics as the "robust" section of the evaluation JSON:
    {"radii", "attacks", "worst": {radius: metrics}, "per_attack": {attack: {radius: metrics}},
    "tissue": {tissue: {"clean": metrics, "worst": {radius: metrics}}},
    "curves": {attack or "worst": {radius: {"steps", "dice", "accuracy"}}},
    "paper_curve": {"steps", "dice", "accuracy"}, "worst_miou": {radius: ``worst_miou``},
    "class_weights": SEA's Mask-CE-Bal weights (C,) or null (per image), "class_weights_source"};
    radius keys as ``radius_key``, NaN -> null."""
    keys = [radius_key(r) for r in robust["radii"]]

    def curve(steps: list[int], ms: list[SegMetrics | None]) -> dict:
        res = [{} if x is None else x.result() for x in ms]
        return {"steps": list(steps), "dice": [r.get("dice") for r in res], "accuracy": [r.get("accuracy") for r in res]}

    return json_clean({
        "radii": list(robust["radii"]), "attacks": list(robust["attacks"]),
        "worst": {k: x.result() for k, x in zip(keys, robust["worst"])},
        "per_attack": {a: {k: x.result() for k, x in zip(keys, ms)} for a, ms in robust["per_attack"].items()},
        "tissue": {t: {"clean": robust["tissue_clean"][t].result(),
                       "worst": {k: x.result() for k, x in zip(keys, robust["tissue_worst"][t])}}
                   for t in robust["tissues"]},
        "curves": {a: {k: curve(robust["steps"], ms) for k, ms in zip(keys, per_r)}
                   for a, per_r in robust["curves"].items()},
        "paper_curve": curve(robust["paper_steps"], robust["paper_curve"]),
        **({"worst_miou": {k: w for k, w in zip(keys, robust["worst_miou"])}} if "worst_miou" in robust else {}),
        **({"class_weights": robust["class_weights"], "class_weights_source": robust["class_weights_source"]}
           if "class_weights_source" in robust else {})})


# --------------------------------------------------------------------------- the evaluate stage
def main(p, name: str, seed: int, relaunch: list[str], shard_spec: str | None = None) -> None:
    """DVC stage ``evaluate-<name>@<seed>``: the test split, clean, under the evaluation
    attack (``evaluate`` params) and as the seed's transfer sets hold it, into ``metrics/eval/seed<seed>/<name>.json``, the figures
    in ``plots/eval/seed<seed>/<name>/`` and one MLflow run. ``shard_spec`` "i/n" computes
    one shard's chunks only; torchrun ranks (``distributed.nproc.evaluate``) share them."""
    from .distributed import in_processes
    from .hardware import pick_device

    in_processes(p.distributed.nproc.evaluate, relaunch, pick_device(p.evaluate.device), p.distributed.timeout_s,
                 lambda group: _evaluate_stage(p, name, seed, shard_spec, group))


def _evaluate_stage(p, name: str, seed: int, shard_spec: str | None, group) -> None:
    import contextlib
    from pathlib import Path

    import mlflow

    from . import closure, figures, paths, tracking
    from .data import describe_split, read_attrs
    from .distributed import ChunkStore, Shard, is_main
    from .files import atomic_dir, file_md5, require, write_csv, write_json
    from .hardware import pick_device
    from .params import method_tag, section_dict, show_progress
    from .weights import load_weights

    cfg, acfg = p.evaluate, p.evaluate.attack
    shard = Shard.parse(shard_spec) if shard_spec else Shard()
    main = is_main(group) and shard.count == 1  # the process that logs and writes
    weights, stage = paths.weights(name, seed), paths.stage_name("evaluate", name, seed)
    params = {f"evaluate.{k}": v for k, v in section_dict(cfg).items()}
    run = tracking.stage_run(stage, params, p.tracking.experiment,
                             {"mlsys.stage": "evaluate", "mlsys.model": name, "mlsys.method": method_tag(name),
                              "mlsys.attack_mode": acfg.mode, "mlsys.seed": str(seed)}) \
        if main else contextlib.nullcontext()
    with run:  # a refused stage (missing input) ends its run FAILED, leaving no output behind
        check_mode(acfg.mode, "evaluate.attack.mode")
        if cfg.robust.enabled:
            check_attacks(cfg.robust)
        require(weights, paths.stage_name("train", name, seed))
        device = group.device if group else pick_device(cfg.device)
        # the attack's fast paths as this device runs them: what the fingerprint and results record
        cfg = dataclasses.replace(cfg, attack=hardware.resolve(acfg, device, bf16_on_cpu=False))
        acfg = cfg.attack
        model = load_weights(weights, p.model).to(device).eval()
        require(paths.CLEAN, "prepare")
        for m in METHODS:
            require(paths.transfer(m, seed), paths.stage_name("augment", m, seed))
        out = Path(paths.eval_metrics(name, seed))
        store = ChunkStore(out.with_name(f".{out.name}.partial"), {  # finished chunks: resume and merge
            "weights_md5": file_md5(weights), "clean_md5": file_md5(paths.CLEAN),
            "evaluate": section_dict(cfg), "device": device.type,
            "code": closure.digest("mlsys.evaluate")}) if is_main(group) else None
        if main:
            mlflow.log_params(hardware.resolved_params("evaluate.attack", acfg))
            mlflow.set_tag("mlsys.bf16", hardware.describe(device))
            tracking.log_dataset(paths.CLEAN, "evaluation")
            # which data and protocol the numbers come from (`mlsys compare` says it)
            mlflow.set_tag("mlsys.data_split", describe_split(read_attrs(paths.CLEAN)))
        with tracking.timed("compute"):
            done = evaluate_split(model, paths.CLEAN, "test", cfg, device, store, shard, group, show_progress())
        if done is None:  # a shard: its chunks are in the store for the merging run
            if shard.count > 1:
                print(f"{stage} shard {shard}: chunks in {store.folder}; run without --shard to merge")
            return
        clean, attacked, panel, robust = done
        res = {"clean": clean.result(), "attack": attacked.result(),
               # the cross-evaluation: the test split as model 1 of this seed perturbed its training sets
               **{f"transfer_{m}": transfer_result(model, paths.transfer(m, seed), cfg, device)
                  for m in METHODS},
               "paper_truth": clean.paper_truth,
               "attack_settings": {"mode": acfg.mode, "eps": acfg.eps, "steps": acfg.steps,
                                   "target": acfg.target, "alpha": acfg.alpha,
                                   "amp": acfg.amp, "channels_last": acfg.channels_last}}
        mlflow.log_metrics({f"{k}/{m}": v for k in ("clean", "attack", *(f"transfer_{t}" for t in METHODS))
                            for m, v in res[k].items() if v is not None})
        if robust is not None:
            res["robust"] = robust_results(robust)
            # the protocol's strength in words (MLflow keys stay stable: it goes into a tag)
            res["robust"]["labels"] = {a: attack_label(a, cfg.robust.steps) for a in cfg.robust.attacks}
            mlflow.set_tag("mlsys.protocol", "; ".join(res["robust"]["labels"].values()))
            log_robust(res["robust"])
            cw = res["robust"].get("class_weights")  # SEA's Mask-CE-Bal weights, as used
            mlflow.log_param("evaluate.robust.class_weights",
                             "per-image" if cw is None else "[" + ", ".join(f"{w:.6g}" for w in cw) + "]")
            mlflow.set_tag("mlsys.class_weights_source", res["robust"].get("class_weights_source", ""))
        with atomic_dir(paths.eval_figures(name, seed)) as figs:  # a DVC out dir: all or nothing
            fig = figures.perturbation_panel(*panel, f"{name} (seed {seed}) under {acfg.mode} attack "
                                                     f"({acfg.steps} steps, eps {acfg.eps}, target class {acfg.target})")
            mlflow.log_figure(fig, "figures/attack_panel.png")
            figures.save(fig, figs / "attack_panel.png")
            logits = predict(model.cpu(), panel[0], len(panel[0]), torch.device("cpu"))
            fig = figures.prediction_panel(panel[0], panel[2], logits, f"{name} (seed {seed}): test predictions (clean)")
            mlflow.log_figure(fig, "figures/predictions_test.png")
            figures.save(fig, figs / "predictions_clean.png")
            if robust is not None:  # `dvc plots`: each attack's metrics over its steps
                write_csv(figs / "robust_curve.csv", robust_curve_rows(res["robust"]))
                write_csv(figs / "paper_curve.csv", [
                    {"step": t, "dice": d, "accuracy": a} for t, d, a in
                    zip(*(res["robust"]["paper_curve"][k] for k in ("steps", "dice", "accuracy")))])
        write_json(out, {**res, "mlflow_run_id": mlflow.active_run().info.run_id, "machine": hardware.machine()})
        store.remove()
        print(f"{stage}: clean accuracy {res['clean']['accuracy']:.4f} dice {res['clean']['dice']:.4f}"
              f" | attacked accuracy {res['attack']['accuracy']:.4f} dice {res['attack']['dice']:.4f}")
        if robust is not None:
            print(f"{stage}: worst case of {', '.join(robust['attacks'])} ({cfg.robust.steps} steps): "
                  + "; ".join(f"eps {k}/255 accuracy {_show(m['accuracy'])} dice {_show(m['dice'])}"
                              for k, m in res["robust"]["worst"].items()))


def transfer_result(model: torch.nn.Module, path: str, cfg, device: torch.device) -> dict[str, float]:
    """``model``'s metrics on the test split of a transfer set ``path``: the test images as
    another model's perturbation left them (the augment stage's ``<method>_test.h5``), scored
    against their true masks, streamed from the file ``cfg.batch_size`` images at a time."""
    from .data import iter_chunks

    chunks = ((images, masks, bits) for _, images, masks, _, bits
              in iter_chunks(path, "test", cfg.batch_size, channels=True))
    return evaluate_chunks(model, chunks, device, cfg.paper_threshold).result()


def _show(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def log_robust(section: dict) -> None:
    """The "robust" section of an evaluation JSON into the active MLflow run: worst case per
    radius as ``robust/eps<r>/<metric>`` (every metric of SegMetrics.result, the mIoU family
    included), each attack's as ``robust/<attack>/eps<r>/<metric>`` (accuracy, dice, jaccard,
    paper_dice, miou, miou_nuclei, nmiou, miou_image),
    per tissue ``robust/tissue/<tissue>/{clean,eps<r>}/{dice,accuracy}``, the worst-case mIoU
    ``robust/eps<r>/miou_{greedy,by_accuracy}``, and the curves as
    step metrics ``curve/<attack or worst>/eps<r>/{dice,accuracy}`` and ``curve/paper/...``
    with step = t (charts in the MLflow UI). Nulls (no score) are left out."""
    import mlflow

    def put(out: dict, prefix: str, metrics: dict, names=None) -> None:
        for k, v in metrics.items():
            if v is not None and (names is None or k in names):
                out[f"{prefix}/{k}"] = v

    flat: dict[str, float] = {}
    for r, m in section["worst"].items():
        put(flat, f"robust/eps{r}", m)
    for a, per_r in section["per_attack"].items():
        for r, m in per_r.items():
            put(flat, f"robust/{a}/eps{r}", m, ("accuracy", "dice", "jaccard", "paper_dice", "miou", "miou_nuclei",
                                                "nmiou", "miou_image"))
    for t, e in section["tissue"].items():
        put(flat, f"robust/tissue/{t}/clean", e["clean"], ("accuracy", "dice"))
        for r, m in e["worst"].items():
            put(flat, f"robust/tissue/{t}/eps{r}", m, ("accuracy", "dice"))
    for r, w in section.get("worst_miou", {}).items():
        put(flat, f"robust/eps{r}", {"miou_greedy": w["greedy"], "miou_by_accuracy": w["by_accuracy"]})
    mlflow.log_metrics(flat)
    by_step: dict[int, dict[str, float]] = {}
    curves = [(f"curve/{a}/eps{r}", c) for a, per_r in section["curves"].items() for r, c in per_r.items()]
    for name, c in curves + [("curve/paper", section["paper_curve"])]:
        for t, d, acc in zip(c["steps"], c["dice"], c["accuracy"]):
            put(by_step.setdefault(t, {}), name, {"dice": d, "accuracy": acc})
    for t, metrics in sorted(by_step.items()):
        mlflow.log_metrics(metrics, step=t)


def robust_curve_rows(section: dict) -> list[dict]:
    """Rows (attack, radius, step, dice, accuracy) of every curve of a "robust" section
    (attack "worst": per image the worst of the attacks at each step); null -> nan."""
    nan = lambda v: math.nan if v is None else v  # noqa: E731
    return [{"attack": a, "radius": float(r), "step": t, "dice": nan(d), "accuracy": nan(acc)}
            for a, per_r in section["curves"].items() for r, c in per_r.items()
            for t, d, acc in zip(c["steps"], c["dice"], c["accuracy"])]


def cli(argv: list[str] | None = None) -> int:
    """``python -m mlsys.evaluate <model> [--seed S] [--shard I/N]``: the stage as DVC runs it."""
    ap = entry.parser("python -m mlsys.evaluate",
                      "Evaluate one model on the test split, clean and under attack (DVC stage evaluate-<model>@<seed>).")
    ap.add_argument("model", choices=list(EXPERIMENT))
    ap.add_argument("--seed", type=int, help=entry.SEED_HELP)
    ap.add_argument("--shard", metavar="I/N", help=entry.SHARD_HELP)
    return entry.main("mlsys evaluate", "mlsys.evaluate", ap,
                      lambda a, p: main(p, a.model, entry.seed_of(a, p), a.relaunch, a.shard), argv)


if __name__ == "__main__":
    entry.finish(cli())
