"""The paper's Tables 1 and 2 and its figures, from the evaluation metrics.

Table 1: the four models on the clean test split; Table 2: the same models under
their own evaluation attack. Columns: loss, pixel accuracy, Dice and Jaccard in the
standard variant (argmax, macro over the nucleus classes present) and the paper
variant (softmax > 0.1, pooled over all channels), then per-class Dice.
"""
from __future__ import annotations

import math

from .params import CLASS_NAMES

MODEL_LABELS = {
    "model1": "model 1 (clean)",
    "model2": "model 2 (method one)",
    "model3": "model 3 (method two)",
    "model4": "model 4 (all three sets)",
}
COLUMNS = ["loss", "accuracy", "dice", "jaccard", "paper_dice", "paper_jaccard"] + \
    [f"dice/{c}" for c in CLASS_NAMES]


def table(results: dict[str, dict[str, float]]) -> dict[str, list]:
    """{model: metrics} -> column-oriented table (for CSV, Markdown and mlflow.log_table)."""
    out: dict[str, list] = {"model": list(results)}
    for col in COLUMNS:
        out[col] = [results[m].get(col, math.nan) for m in results]
    return out


def to_csv(tab: dict[str, list]) -> str:
    cols = list(tab)
    rows = zip(*(tab[c] for c in cols))
    return ",".join(cols) + "\n" + "".join(",".join(_fmt(v, 6) for v in r) + "\n" for r in rows)


def to_markdown(tab: dict[str, list], title: str) -> str:
    cols = list(tab)
    lines = [f"**{title}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in zip(*(tab[c] for c in cols)):
        lines.append("| " + " | ".join(_fmt(v, 4) for v in r) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v, digits: int) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def tables_from_eval(evals: dict[str, dict]) -> tuple[dict, dict, str]:
    """Per-model evaluation JSON (metrics/eval/<model>.json) -> Table 1, Table 2 and
    a sentence naming the attack used."""
    t1 = table({m: e["clean"] for m, e in evals.items()})
    t2 = table({m: e["attack"] for m, e in evals.items()})
    s = next(iter(evals.values()))["attack_settings"]
    attack = (f"{s['mode']} attack, {s['steps']} steps, eps {s['eps']}"
              + (f", alpha {s['alpha']}" if s["mode"] == "standard" else "")
              + f", target full-area class {s['target']} ({CLASS_NAMES[s['target']]})")
    return t1, t2, attack


def markdown_report(t1: dict, t2: dict, attack: str, figures: list[tuple[str, str]]) -> str:
    """One page: both tables and the figures (relative paths)."""
    parts = ["# mlsys report: four models, clean and under attack", "",
             "Standard metrics: argmax, per class, macro mean over the nucleus classes present "
             "(absent classes: n/a, excluded). Paper metrics: softmax > 0.1 per channel, "
             "TP/FP/FN pooled over all channels including background (original code).", "",
             to_markdown(t1, "Table 1: clean test split"), "",
             to_markdown(t2, f"Table 2: under attack ({attack})"), ""]
    for title, path in figures:
        parts += [f"## {title}", "", f"![{title}]({path})", ""]
    return "\n".join(parts)
