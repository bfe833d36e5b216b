"""The paper's kinds of figures, with one colour legend for every figure.

- prediction panel: image, true mask and prediction (as label maps and per class)
- perturbation panel: image, perturbed image, amplified difference, prediction
- loss curves: train/valid loss per epoch, one model or the four models together
- metric bars: each model clean vs under attack; per-class Dice bars in the class colours
- robustness: worst-case metrics against the radius; Dice along the attack steps
- cross-evaluation: every model against every perturbation, a heat map
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from .params import CLASS_NAMES  # noqa: E402

# background, neoplastic, inflammatory, connective, dead, epithelial (PanNuke's usual colours)
CLASS_COLOURS = ("#000000", "#ff0000", "#00ff00", "#0000ff", "#ffff00", "#ff8c00")
CMAP = ListedColormap(CLASS_COLOURS)


def _img(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()


def _labels(ax, y) -> None:
    ax.imshow(np.asarray(y), cmap=CMAP, vmin=0, vmax=len(CLASS_NAMES) - 1, interpolation="nearest")


def _legend(fig) -> None:
    handles = [Patch(facecolor=c, edgecolor="grey", label=n) for c, n in zip(CLASS_COLOURS, CLASS_NAMES)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)


def _finish(fig, axes, column_titles: list[str], title: str):
    """Column titles, no ticks, figure title and the class legend under the panel."""
    for ax, name in zip(axes[0], column_titles):
        ax.set_title(name, fontsize=8)
    for ax in np.ravel(axes):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    _legend(fig)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return fig


def prediction_panel(images: torch.Tensor, masks: torch.Tensor, logits: torch.Tensor, title: str):
    """Rows = images. Columns: image, true mask, prediction, then per class c of
    1..5 the true (outline) and predicted (filled) region of c."""
    n = len(images)
    pred = logits.argmax(1)
    cols = 3 + len(CLASS_NAMES) - 1
    fig, axes = plt.subplots(n, cols, figsize=(1.7 * cols, 1.8 * n + 0.8), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(_img(images[i]))
        _labels(axes[i, 1], masks[i])
        _labels(axes[i, 2], pred[i])
        for c in range(1, len(CLASS_NAMES)):
            ax = axes[i, 2 + c]
            ax.imshow((pred[i] == c).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if (masks[i] == c).any():
                ax.contour((masks[i] == c).numpy(), levels=[0.5], colors=[CLASS_COLOURS[c]], linewidths=1)
    return _finish(fig, axes, ["image", "true mask", "prediction"]
                   + [f"{n}\n(pred, true outline)" for n in CLASS_NAMES[1:]], title)


def perturbation_panel(images: torch.Tensor, perturbed: torch.Tensor, masks: torch.Tensor,
                       logits: torch.Tensor, title: str, subtitles: list[str] | None = None):
    """Rows = images. Columns: image, perturbed image, |difference| amplified to the
    full range, true mask, prediction on the perturbed image."""
    n = len(images)
    fig, axes = plt.subplots(n, 5, figsize=(9, 1.9 * n + 0.8), squeeze=False)
    pred = logits.argmax(1)
    for i in range(n):
        diff = (perturbed[i].float() - images[i].float()).abs()
        scale = float(diff.max()) or 1.0
        axes[i, 0].imshow(_img(images[i]))
        axes[i, 1].imshow(_img(perturbed[i]))
        axes[i, 2].imshow(_img(diff / scale))
        axes[i, 2].set_xlabel(f"max |d| = {scale:.3f}", fontsize=7)
        _labels(axes[i, 3], masks[i])
        _labels(axes[i, 4], pred[i])
        if subtitles:
            axes[i, 0].set_ylabel(subtitles[i], fontsize=7)
    return _finish(fig, axes, ["image", "perturbed", "difference (amplified)", "true mask",
                               "prediction (perturbed)"], title)


def loss_curves(histories: dict[str, list[dict]], title: str, keys=("train_loss", "valid_loss")):
    """One line per (model, key); x = epoch (1-based)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, rows in histories.items():
        for key in keys:
            ax.plot([r["epoch"] + 1 for r in rows], [r[key] for r in rows], marker="o", markersize=3,
                    linestyle="-" if key.startswith("valid") else "--",
                    label=f"{name} {key.replace('_', ' ')}" if len(histories) > 1 or len(keys) > 1 else name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def loss_bands(histories: dict[str, list[list[dict]]], title: str, key: str = "valid_loss"):
    """Mean over seeds of ``key`` per epoch for each model, with a band from the lowest to the
    highest seed; ``histories[model]`` is one per-epoch history per seed."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, runs in histories.items():
        n = min(len(r) for r in runs)
        values = np.array([[row[key] for row in r[:n]] for r in runs])
        epochs = np.arange(1, n + 1)
        line, = ax.plot(epochs, values.mean(0), marker="o", markersize=3,
                        label=f"{name} (mean of {len(runs)} seed{'s' if len(runs) > 1 else ''})")
        if len(runs) > 1:
            ax.fill_between(epochs, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    """Write ``fig`` to ``path`` (format from the suffix) through a temporary file beside
    it, so a killed stage never leaves a half-written image."""
    from pathlib import Path

    from .files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=Path(path).suffix[1:] or "png")
    plt.close(fig)


METRIC_TITLES = {"accuracy": "pixel accuracy", "dice": "Dice (standard: nucleus classes, macro)",
                 "paper_dice": "Dice (paper: softmax >= 0.1, raw channels, pooled)", "jaccard": "Jaccard (standard)",
                 "paper_jaccard": "Jaccard (paper)"}


def _err(std: dict | None, key: str):
    """Error-bar lengths (a std table's column), or None; n/a (one seed) draws no bar."""
    return None if std is None else np.nan_to_num(std[key])


def metric_bars(t1: dict, t2: dict, metrics=("accuracy", "dice", "paper_dice"), title: str | None = None,
                std1: dict | None = None, std2: dict | None = None):
    """Grouped bars: each model's clean and attacked value of a few metrics; with ``std1``/``std2``
    (tables of the same shape) the bars are means over seeds with +-1 std error bars."""
    models = t1["model"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.9), squeeze=False)
    x = np.arange(len(models))
    for ax, key in zip(axes[0], metrics):
        ax.bar(x - 0.2, np.nan_to_num(t1[key]), 0.4, yerr=_err(std1, key), capsize=3, label="clean test split",
               color="#4c72b0")
        ax.bar(x + 0.2, np.nan_to_num(t2[key]), 0.4, yerr=_err(std2, key), capsize=3, label="under attack",
               color="#dd8452")
        ax.set_xticks(x, models, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(METRIC_TITLES.get(key, key), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False, fontsize=9)
    fig.suptitle(title or "the four models, clean and under attack")
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    return fig


def per_class_bars(t1: dict, t2: dict, title: str | None = None, std1: dict | None = None,
                   std2: dict | None = None):
    """Per-class Dice of every model, clean (left) and under attack (right), in the
    class colours of every other figure; n/a classes have no bar; ``std1``/``std2``: +-1 std
    error bars over seeds."""
    models, classes = t1["model"], CLASS_NAMES
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), squeeze=False, sharey=True)
    width = 0.8 / len(classes)
    x = np.arange(len(models))
    for ax, tab, std, name in zip(axes[0], (t1, t2), (std1, std2), ("clean test split", "under attack")):
        for c, (cls, colour) in enumerate(zip(classes, CLASS_COLOURS)):
            ax.bar(x - 0.4 + width * (c + 0.5), tab[f"dice/{cls}"], width, yerr=_err(std, f"dice/{cls}"),
                   capsize=2, color=colour, edgecolor="grey", linewidth=0.5)
        ax.set_xticks(x, models, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_ylabel("Dice per class")
    fig.suptitle(title or "per-class Dice of the four models")
    _legend(fig)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    return fig


def robust_radius(rows: list[dict], models: list[str], title: str, metrics=("dice", "accuracy")):
    """Worst-case metrics against the L-inf radius (x: r of eps = r/255; 0 = clean), one line
    per model with +-1 std error bars over seeds; ``rows`` as report.robust_radius_rows."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.9), squeeze=False)
    radius = [r["radius"] for r in rows]
    for ax, key in zip(axes[0], metrics):
        for m in models:
            ax.errorbar(radius, [r[f"{m}_{key}"] for r in rows], yerr=np.nan_to_num([r[f"{m}_{key}_std"] for r in rows]),
                        marker="o", markersize=4, capsize=3, label=m)
        ax.set_xlabel("L-inf radius r (eps = r/255; 0 = clean)")
        ax.set_ylabel(f"worst-case {METRIC_TITLES.get(key, key)}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def robust_steps(curves: dict[str, dict[str, dict]], title: str, labels: dict[str, str] | None = None):
    """Dice against the attack's steps, one panel per curve (each attack, and "worst": per
    image the worst of the attacks at each step), one line per model (mean over seeds) with a
    band from the lowest to the highest seed; ``curves[name][model]`` = {"steps", "mean",
    "lo", "hi"} (report.build_robust); ``labels``: each attack's name with its strength."""
    names = list(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.6), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        for m, c in curves[name].items():
            line, = ax.plot(c["steps"], c["mean"], marker="o", markersize=3, label=m)
            ax.fill_between(c["steps"], c["lo"], c["hi"], color=line.get_color(), alpha=0.15)
        ax.set_title("worst of the attacks" if name == "worst" else (labels or {}).get(name, name), fontsize=9)
        ax.set_xlabel("attack step")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("Dice (standard)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def cross_heatmap(mean: dict, std: dict, columns: list[str], rows: list[str], title: str, metric: str = "dice"):
    """The cross-evaluation as a heat map: a row per model (``rows``: their labels, in the
    tables' order), a column per perturbation (``columns``: report.build_cross's labels), the
    cell's colour and text the mean over seeds of ``metric`` with its std under it (``mean``,
    ``std``: report.build_cross's tables); no score: grey, "n/a"."""
    values = np.array([mean[f"{c} {metric}"] for c in columns], dtype=float).T  # (models, columns)
    spread = np.array([std[f"{c} {metric}"] for c in columns], dtype=float).T
    fig, ax = plt.subplots(figsize=(1.5 * len(columns) + 2.6, 0.55 * len(rows) + 1.9))
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("#dddddd")
    ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        text = "n/a" if np.isnan(v) else f"{v:.3f}" + ("" if np.isnan(spread[i, j]) else f"\n± {spread[i, j]:.3f}")
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black" if np.isnan(v) or v > 0.6 else "white")
    ax.set_xticks(range(len(columns)), [c.replace(" transfer", "\n(transfer)").replace(" eps", "\neps")
                                        for c in columns],
                  fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
