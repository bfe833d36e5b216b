"""Segmentation metrics (both variants: docs/method.md): SegMetrics, and a model's metrics on a
batch of images (used in training for validation and by the evaluate stage).

"standard": argmax prediction; per class c, TP/FP/FN pooled over every pixel of the
  split; Dice = 2TP / (2TP + FP + FN), Jaccard = TP / (TP + FP + FN). A class that is
  absent from both truth and prediction over the whole split has no score (NaN) and
  is left out of the macro mean, which averages the five nucleus classes (1..5);
  ``n_classes_scored`` says how many entered it.
"paper": the original code's variant (PokeNet.py ``dice_cof_iou``): a channel fires
  where its softmax is >= 0.1 (several channels may fire), scored against the raw
  binarised PanNuke mask channels -- the channel bits of :mod:`mlsys.data`, in which
  void pixels are set in no channel and overlap pixels in two -- with TP/FP/FN pooled
  over all channels including background: one Dice and one Jaccard. Files without
  /channels (written before it existed) are scored against the one-hot of the
  semantic label instead; ``paper_truth_raw`` in the result is the fraction of
  pixels scored against the raw channels (1.0 raw, 0.0 semantic) and
  :attr:`SegMetrics.paper_truth` names it ("raw channels", "semantic", "mixed").
  What the raw truth changes (measured): a void pixel's background channel is no
  longer truth (fired: TP -> FP, silent: FN -> TN), an overlap pixel's second class
  channel becomes truth (fired: FP -> TP, silent: TN -> FN); nothing else moves.
  Test fixture (tests/test_metrics.py::test_raw_vs_semantic_truth_difference, 9 8x8
  patches, 101 void and 40 overlap of 576 pixels, random logits): paper_dice 0.2329
  raw vs 0.2582 semantic; a prediction equal to the semantic label scores 0.8708 raw
  vs 1.0. Synthetic default (300 x 32x32; 1.51 % void, 0.018 % overlap pixels): that
  prediction scores 0.9923 raw; model 1 trained on it with the CPU defaults of the time
  (a textbook U-Net, He init, 30 epochs of batch 18; params.yaml has since changed to the
  authors' U-Net, 40 epochs of 8, not measured again) has test paper_dice 0.8083 raw vs
  0.8196 semantic, paper_jaccard 0.6783 vs 0.6944 (standard metrics unchanged). Synthetic 40 x 256x256 (2.96 % void): 0.9850.
Accuracy is the fraction of pixels whose argmax equals the label; loss the mean
pixel cross-entropy. Counts are sums, so batches (and shards) simply add up.

The mIoU family the robustness literature reports (argmax, the "standard" counts):
  "miou": per class c IoU_c = TP_c / (TP_c + FP_c + FN_c) from the counts pooled over
  the whole split, then the mean over all C classes, background included; a class whose
  union is 0 over the whole split (absent from truth and prediction) is left out of the
  mean. As SEA computes it (nmndeep/Robust-Segmentation, tools/infer.py, eval_performance:
  ``ind = union_cls > 0; m_iou = (int_cls[ind] / union_cls[ind]).mean()``; likewise
  semseg/metrics.py ``ious[~ious.isnan()].mean()``), and as RSE's CmIoU does
  (szegedai/Robust-Segmentation-Evaluation, rse/metrics.py: torchmetrics JaccardIndex
  average='macro'; torchmetrics >= 1.4 ``_jaccard_index_reduce`` gives a class with
  ``confmat.sum(1) + confmat.sum(0) == 0`` weight 0).
  "miou_nuclei": the same over the five nucleus classes 1..5 -- by definition the
  "jaccard" key (kept under both names, the same number).
  "nmiou": RSE's NmIoU as its code computes it (rse/metrics.py ``class NmIoU(IoU)``:
  JaccardIndex with average='micro', updated batch by batch and computed once in
  rse/__init__.py ``evaluate``): sum_c TP_c / sum_c (TP_c + FP_c + FN_c), pooled over
  classes AND the whole split -- not per image. With an argmax label on every pixel,
  sum TP = correct and sum FP = sum FN = pixels - correct, so nmiou = acc / (2 - acc):
  no absent-class question arises, and it ranks models exactly as accuracy does.
  "miou_image": the per-image mIoU averaged over images (what "NmIoU" is sometimes taken
  to mean; RSE's code has no per-image mean, its composite_attack only scores whole
  batches): per image the mIoU over its classes with a non-zero union (absent from both
  its truth and its prediction: left out, SEA's rule applied per image; the convention
  of counting such a class as IoU 1 -- or 0, torchmetrics < 1.4 -- is not used), summed
  over images in the state (field "miou_image", with "images"), so chunks add up.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .data import N_CLASSES, unpack_channels
from .model import eval_mode
from .params import CLASS_NAMES


# --------------------------------------------------------------------------- the state vector
# A state is every count of SegMetrics as one float64 vector (..., S), S = 3C + 9 (exact: pixel
# counts stay far below 2**53). States add up: batches, images, shards and chunks merge by
# summing (the one float field, miou_image, up to float order). The fields, in this order
# (widths: 1, or C, or 3):
STATE_FIELDS = ("loss_sum",   # summed pixel cross-entropy
                "pixels",     # pixels counted
                "correct",    # pixels whose argmax class is the true one
                "tp", "fp", "fn",  # (C,) each: the "standard" variant's counts per class
                "paper",      # (3,): the "paper" variant's pooled TP, FP, FN
                "paper_raw",  # pixels whose "paper" truth was the raw channel bits
                "images",     # images counted
                "miou_image")  # summed per-image mIoU (image_miou)
_SCALARS = ("loss_sum", "pixels", "correct", "paper_raw", "images", "miou_image")


def _widths(n_classes: int) -> dict[str, int]:
    return {k: 1 if k in _SCALARS else 3 if k == "paper" else n_classes for k in STATE_FIELDS}


def state_size(n_classes: int) -> int:
    """S, the length of a state of ``n_classes`` classes (3C + 9)."""
    return sum(_widths(n_classes).values())


def pack_state(**counts: torch.Tensor) -> torch.Tensor:
    """The state (..., S) float64 of the counts named by :data:`STATE_FIELDS`, all of them:
    loss_sum, pixels, correct, paper_raw, images, miou_image (...,); tp, fp, fn (..., C);
    paper (..., 3). The one place a state is built (SegMetrics.state, evaluate.image_states)."""
    if set(counts) != set(STATE_FIELDS):
        raise ValueError(f"a state needs the counts {STATE_FIELDS}, got {tuple(counts)}")
    return torch.cat([(counts[k][..., None] if k in _SCALARS else counts[k]).double() for k in STATE_FIELDS], -1)


def unpack_state(states) -> dict[str, torch.Tensor]:
    """Views of the fields of states (..., S) by name (:data:`STATE_FIELDS`): loss_sum,
    pixels, correct, paper_raw, images, miou_image (...,); tp, fp, fn (..., C); paper
    (..., 3). C is read from S. The one place a state is read."""
    states = torch.as_tensor(states)
    size = states.shape[-1] if states.dim() else 0
    n_classes = (size - state_size(0)) // 3
    if n_classes < 1 or state_size(n_classes) != size:
        raise ValueError(f"a state has 3C + {state_size(0)} counts for C >= 1 classes, "
                         f"got shape {tuple(states.shape)}")
    out, at = {}, 0
    for k, width in _widths(n_classes).items():
        out[k] = states[..., at] if k in _SCALARS else states[..., at:at + width]
        at += width
    return out


def state_accuracy(states) -> torch.Tensor:
    """Pixel accuracy (...,) of states (..., S): correct / pixels (NaN for a NaN state)."""
    u = unpack_state(states)
    return u["correct"] / u["pixels"]


def image_hist(pred: torch.Tensor, masks: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Confusion counts of each image: pred, masks (N, H, W) int64 class ids -> (N, C, C)
    float64 on their device, [n, true, predicted]. Summed over n: the batch's counts."""
    n, C = masks.shape[0], n_classes
    offset = torch.arange(n, device=masks.device).view(n, 1, 1) * (C * C)
    return torch.bincount((offset + masks * C + pred).flatten(), minlength=n * C * C).view(n, C, C).double()


def image_miou(hist: torch.Tensor) -> torch.Tensor:
    """Per-image mIoU (N,) float64 of confusion counts (N, C, C) (:func:`image_hist`): the
    mean of TP_c / (TP_c + FP_c + FN_c) over the classes of non-zero union in that image,
    background included; a class absent from both its truth and its prediction is left
    out (module docstring: "miou_image"). Reference: tests/test_metrics.py, by hand."""
    tp = hist.diagonal(dim1=1, dim2=2)
    union = hist.sum(1) + hist.sum(2) - tp
    scored = union > 0  # every image has a pixel, so at least one class
    return torch.where(scored, tp / union.clamp(min=1), 0).sum(1) / scored.sum(1)


# --------------------------------------------------------------------------- pixel accuracy
def predicted_class(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the classes of logits (N, C, H, W) -> (N, H, W), the first of equals, as
    ``argmax(1)``; which on the CPU is far slower (torch 2.13, 2 threads, (32, 6, 32, 32):
    6.3 ms against 0.36 ms for ``max(1).indices``)."""
    return logits.max(1).indices


def pixel_accuracy(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of pixels whose argmax class is the true one, per image: logits (N, C, H, W),
    masks (N, H, W) int64 -> (N,) float32 in [0, 1] (exact order: distinct counts give
    distinct values below 2**24 pixels an image)."""
    return (predicted_class(logits) == masks).flatten(1).float().mean(1)


def worst_candidate(accuracy: torch.Tensor) -> torch.Tensor:
    """The worst-case rule: accuracy (K, ...) of K candidates -> (...) int64, the index of
    the candidate of lowest pixel accuracy, the earlier of equals; NaN (no score) is never
    chosen unless all are NaN. Used by ``robust.worst_case`` (on images) and
    ``evaluate.worst_of`` (on states)."""
    return torch.nan_to_num(accuracy, nan=math.inf).argmin(0)  # argmin: the first minimum


def paper_truth(masks: torch.Tensor, channels: torch.Tensor | None, n_classes: int) -> torch.Tensor:
    """The "paper" variant's truth (N, C, H, W) bool on the masks' device: the raw channel
    bits (N, H, W) where the data has them, else the one-hot of the labels masks (N, H, W)."""
    if channels is None:
        return F.one_hot(masks, n_classes).permute(0, 3, 1, 2).bool()
    if n_classes != N_CLASSES or channels.shape != masks.shape:
        raise ValueError(f"channel bits {tuple(channels.shape)} need {N_CLASSES} classes and the "
                         f"masks' shape; got {n_classes} classes, masks {tuple(masks.shape)}")
    return unpack_channels(channels.to(masks.device), n_classes)


@dataclass
class SegMetrics:
    """Accumulates pixel counts over batches; :meth:`result` turns them into scores."""

    n_classes: int = 6
    threshold: float = 0.1
    loss_sum: float = 0.0
    pixels: int = 0
    correct: int = 0
    tp: torch.Tensor = field(default=None)
    fp: torch.Tensor = field(default=None)
    fn: torch.Tensor = field(default=None)
    paper: torch.Tensor = field(default=None)  # pooled TP, FP, FN of the "paper" variant
    paper_raw: int = 0  # pixels whose "paper" truth was the raw channel bits (others: semantic one-hot)
    images: int = 0  # images counted
    miou_image: float = 0.0  # summed per-image mIoU (image_miou)

    def __post_init__(self) -> None:
        z = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
        self.tp, self.fp, self.fn, self.paper = z(self.n_classes), z(self.n_classes), z(self.n_classes), z(3)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, masks: torch.Tensor, channels: torch.Tensor | None = None) -> None:
        """logits: (N, C, H, W); masks: (N, H, W) int64 class ids; channels: (N, H, W)
        channel bits of :mod:`mlsys.data` (the "paper" truth; C must be 6), or None:
        the "paper" variant then scores against the one-hot of ``masks``."""
        logits, masks = logits.float(), masks.to(logits.device)
        self.loss_sum += F.cross_entropy(logits, masks, reduction="sum").item()
        self.pixels += masks.numel()
        pred = predicted_class(logits)
        self.correct += (pred == masks).sum().item()
        C = self.n_classes
        per_image = image_hist(pred, masks, C)
        self.images += masks.shape[0]
        self.miou_image += image_miou(per_image).cpu().sum().item()
        hist = per_image.sum(0).cpu()  # integer counts: exact in float64
        tp = hist.diag()
        self.tp += tp
        self.fp += hist.sum(0) - tp
        self.fn += hist.sum(1) - tp
        fired = logits.softmax(1) >= self.threshold   # original code: np.where(p < thr, 0, 1)
        truth = paper_truth(masks, channels, C)
        if channels is not None:
            self.paper_raw += masks.numel()
        self.paper += torch.tensor([(fired & truth).sum().item(), (fired & ~truth).sum().item(),
                                    (~fired & truth).sum().item()], dtype=torch.float64)

    def state(self) -> "np.ndarray":
        """All counts as one state vector (S,) float64 (:func:`pack_state`)."""
        f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        return pack_state(loss_sum=f64(self.loss_sum), pixels=f64(self.pixels), correct=f64(self.correct),
                          tp=self.tp, fp=self.fp, fn=self.fn, paper=self.paper,
                          paper_raw=f64(self.paper_raw), images=f64(self.images),
                          miou_image=f64(self.miou_image)).numpy()

    @classmethod
    def from_state(cls, vec, n_classes: int, threshold: float) -> "SegMetrics":
        """The SegMetrics of a state vector (S,) (:meth:`state`, or a sum of them)."""
        m, v = cls(n_classes, threshold), torch.as_tensor(vec, dtype=torch.float64)
        if v.shape != (state_size(n_classes),):
            raise ValueError(f"a state of {n_classes} classes has {state_size(n_classes)} counts, "
                             f"got shape {tuple(v.shape)}")
        u = unpack_state(v)
        m.loss_sum, m.pixels, m.correct = float(u["loss_sum"]), int(u["pixels"]), int(u["correct"])
        m.tp, m.fp, m.fn, m.paper = u["tp"].clone(), u["fp"].clone(), u["fn"].clone(), u["paper"].clone()
        m.paper_raw, m.images, m.miou_image = int(u["paper_raw"]), int(u["images"]), float(u["miou_image"])
        return m

    def merge(self, other: "SegMetrics") -> "SegMetrics":
        self.loss_sum += other.loss_sum
        self.pixels += other.pixels
        self.correct += other.correct
        self.paper_raw += other.paper_raw
        self.images += other.images
        self.miou_image += other.miou_image
        for name in ("tp", "fp", "fn", "paper"):
            getattr(self, name).add_(getattr(other, name))
        return self

    @property
    def paper_truth(self) -> str:
        """What the "paper" variant scored against: "raw channels" (every pixel),
        "semantic" (no pixel: files without /channels) or "mixed"."""
        if self.paper_raw == 0:
            return "semantic"
        return "raw channels" if self.paper_raw == self.pixels else "mixed"

    def result(self) -> dict[str, float]:
        """Flat metric dict (floats only): loss, accuracy, dice, jaccard (standard macro),
        paper_dice, paper_jaccard, paper_truth_raw (fraction of pixels whose "paper"
        truth was the raw channels), dice/<class>, jaccard/<class>, n_classes_scored;
        miou (all classes), miou_nuclei (= jaccard), nmiou (RSE's, pooled), miou_image
        (per-image mean): the module docstring."""
        out = {"loss": self.loss_sum / max(self.pixels, 1), "accuracy": self.correct / max(self.pixels, 1)}
        denom = self.tp + self.fp + self.fn
        dice = torch.where(denom > 0, 2 * self.tp / (2 * self.tp + self.fp + self.fn), torch.nan)
        jac = torch.where(denom > 0, self.tp / denom, torch.nan)
        nuclei = [c for c in range(1, self.n_classes) if denom[c] > 0]
        out["dice"] = float(dice[nuclei].mean()) if nuclei else math.nan
        out["jaccard"] = float(jac[nuclei].mean()) if nuclei else math.nan
        out["n_classes_scored"] = float(len(nuclei))
        scored = [c for c in range(self.n_classes) if denom[c] > 0]
        out["miou"] = float(jac[scored].mean()) if scored else math.nan
        out["miou_nuclei"] = out["jaccard"]
        out["nmiou"] = float(self.tp.sum() / denom.sum()) if denom.sum() > 0 else math.nan
        out["miou_image"] = self.miou_image / self.images if self.images else math.nan
        tp, fp, fn = self.paper.tolist()
        out["paper_dice"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
        out["paper_jaccard"] = tp / (tp + fp + fn) if tp + fp + fn else math.nan
        out["paper_truth_raw"] = self.paper_raw / self.pixels if self.pixels else math.nan
        for c in range(self.n_classes):
            out[f"dice/{CLASS_NAMES[c]}"] = float(dice[c])
            out[f"jaccard/{CLASS_NAMES[c]}"] = float(jac[c])
        return out


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Logits (N, C, H, W) on the CPU for images (N, 3, H, W) in [0, 1], in eval mode."""
    with eval_mode(model):
        return torch.cat([model(images[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(images), batch_size)])


@torch.no_grad()
def evaluate_chunks(model: torch.nn.Module, chunks: Iterable[tuple], device: torch.device,
                    threshold: float = 0.1) -> SegMetrics:
    """The metric counts of ``model`` over chunks (images (n, 3, H, W) in [0, 1], masks (n, H, W),
    channel bits (n, H, W) or None: the "paper" truth), in eval mode: slices of tensors in
    memory, or a split streamed from its file (:func:`mlsys.data.iter_chunks`)."""
    m = SegMetrics(n_classes=model.head.out_channels, threshold=threshold)
    with eval_mode(model):
        for images, masks, bits in chunks:
            m.update(model(images.to(device)), masks, bits)
    return m


def evaluate_model(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, batch_size: int,
             device: torch.device, threshold: float = 0.1, group=None,
             channels: torch.Tensor | None = None) -> dict[str, float]:
    """Metrics of ``model`` on images (N, 3, H, W) in [0, 1] with masks (N, H, W) and,
    where the data has them, channel bits (N, H, W) (the "paper" truth).
    Under torchrun (``group``) each rank passes its share; the counts are summed."""
    m = evaluate_chunks(model, ((images[i:i + batch_size], masks[i:i + batch_size],
                                 None if channels is None else channels[i:i + batch_size])
                                for i in range(0, len(images), batch_size)), device, threshold)
    if group is not None:
        from .distributed import all_sum

        m = SegMetrics.from_state(all_sum(torch.from_numpy(m.state()), group), m.n_classes, threshold)
    return m.result()
