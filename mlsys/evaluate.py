"""Segmentation metrics (both variants of DESIGN.md) and model evaluation.

"standard": argmax prediction; per class c, TP/FP/FN pooled over every pixel of the
  split; Dice = 2TP / (2TP + FP + FN), Jaccard = TP / (TP + FP + FN). A class that is
  absent from both truth and prediction over the whole split has no score (NaN) and
  is left out of the macro mean, which averages the five nucleus classes (1..5);
  ``n_classes_scored`` says how many entered it.
"paper": the original code's variant: softmax thresholded at 0.1 per channel
  (several channels may fire), TP/FP/FN pooled over all channels including
  background, one Dice and one Jaccard.
Accuracy is the fraction of pixels whose argmax equals the label; loss the mean
pixel cross-entropy. Counts are sums, so batches (and shards) simply add up.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .params import CLASS_NAMES


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

    def __post_init__(self) -> None:
        z = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
        self.tp, self.fp, self.fn, self.paper = z(self.n_classes), z(self.n_classes), z(self.n_classes), z(3)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, masks: torch.Tensor) -> None:
        """logits: (N, C, H, W); masks: (N, H, W) int64 class ids."""
        logits, masks = logits.float(), masks.to(logits.device)
        self.loss_sum += F.cross_entropy(logits, masks, reduction="sum").item()
        self.pixels += masks.numel()
        pred = logits.argmax(1)
        self.correct += (pred == masks).sum().item()
        C = self.n_classes
        hist = torch.bincount((masks * C + pred).flatten(), minlength=C * C).view(C, C).double().cpu()
        tp = hist.diag()
        self.tp += tp
        self.fp += hist.sum(0) - tp
        self.fn += hist.sum(1) - tp
        fired = logits.softmax(1) > self.threshold
        truth = F.one_hot(masks, C).permute(0, 3, 1, 2).bool()
        self.paper += torch.tensor([(fired & truth).sum().item(), (fired & ~truth).sum().item(),
                                    (~fired & truth).sum().item()], dtype=torch.float64)

    def merge(self, other: "SegMetrics") -> "SegMetrics":
        self.loss_sum += other.loss_sum
        self.pixels += other.pixels
        self.correct += other.correct
        for name in ("tp", "fp", "fn", "paper"):
            getattr(self, name).add_(getattr(other, name))
        return self

    def result(self) -> dict[str, float]:
        """Flat metric dict: loss, accuracy, dice, jaccard (standard macro), paper_dice,
        paper_jaccard, dice/<class>, jaccard/<class>, n_classes_scored."""
        out = {"loss": self.loss_sum / max(self.pixels, 1), "accuracy": self.correct / max(self.pixels, 1)}
        denom = self.tp + self.fp + self.fn
        dice = torch.where(denom > 0, 2 * self.tp / (2 * self.tp + self.fp + self.fn), torch.nan)
        jac = torch.where(denom > 0, self.tp / denom, torch.nan)
        nuclei = [c for c in range(1, self.n_classes) if denom[c] > 0]
        out["dice"] = float(dice[nuclei].mean()) if nuclei else math.nan
        out["jaccard"] = float(jac[nuclei].mean()) if nuclei else math.nan
        out["n_classes_scored"] = float(len(nuclei))
        tp, fp, fn = self.paper.tolist()
        out["paper_dice"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
        out["paper_jaccard"] = tp / (tp + fp + fn) if tp + fp + fn else math.nan
        for c in range(self.n_classes):
            out[f"dice/{CLASS_NAMES[c]}"] = float(dice[c])
            out[f"jaccard/{CLASS_NAMES[c]}"] = float(jac[c])
        return out


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Logits (N, C, H, W) on the CPU for images (N, 3, H, W) in [0, 1], in eval mode."""
    was_training = model.training
    model.eval()
    out = [model(images[i:i + batch_size].to(device)).float().cpu()
           for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, batch_size: int,
             device: torch.device, threshold: float = 0.1) -> dict[str, float]:
    """Metrics of ``model`` on images (N, 3, H, W) in [0, 1] with masks (N, H, W)."""
    was_training = model.training
    model.eval()
    m = SegMetrics(n_classes=model.head.out_channels, threshold=threshold)
    for i in range(0, len(images), batch_size):
        m.update(model(images[i:i + batch_size].to(device)), masks[i:i + batch_size])
    model.train(was_training)
    return m.result()
