"""The paper's Tables 1 and 2 and its figures, from the evaluation metrics.

Table 1: the four models on the clean test split; Table 2: the same models under
their own evaluation attack. Columns: loss, pixel accuracy, Dice and Jaccard in the
standard variant (argmax, macro over the nucleus classes present) and the paper
variant (softmax > 0.1, pooled over all channels), then per-class Dice.
The champion (registered in MLflow by the report stage) is chosen by CHAMPION_CRITERION.
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


TITLE = "mlsys report: four models, clean and under attack"
METRICS_NOTE = ("Standard metrics: argmax, per class, macro mean over the nucleus classes present "
                "(absent classes: n/a, excluded). Paper metrics: softmax > 0.1 per channel, "
                "TP/FP/FN pooled over all channels including background (original code).")
CHAMPION_CRITERION = ("highest standard Dice under the evaluation attack (attack/dice); ties go to the "
                      "higher clean Dice (clean/dice), then to the lower model number")


def champion(evals: dict[str, dict]) -> str:
    """The best model by CHAMPION_CRITERION (n/a scores count as lowest)."""
    def score(v) -> float:
        return -math.inf if v is None or math.isnan(v) else v
    order = list(evals)
    return max(order, key=lambda m: (score(evals[m]["attack"].get("dice")), score(evals[m]["clean"].get("dice")),
                                     -order.index(m)))


def champion_line(evals: dict[str, dict], name: str, version: str | int, alias: str) -> str:
    best = champion(evals)
    return (f"Champion: {MODEL_LABELS.get(best, best)}, registered as {name} version {version} with the alias "
            f"'{alias}' (criterion: {CHAMPION_CRITERION}).")


def per_class_rows(evals: dict[str, dict]) -> list[dict]:
    """Long table of per-class Dice for `dvc plots`: one row per (model, class) with a
    score clean and under attack; classes without a score (n/a) are left out."""
    rows = []
    for m, e in evals.items():
        for c in CLASS_NAMES:
            clean, attack = e["clean"].get(f"dice/{c}", math.nan), e["attack"].get(f"dice/{c}", math.nan)
            if not (math.isnan(clean) or math.isnan(attack)):
                rows.append({"label": f"{m} {c}", "model": m, "class": c, "clean_dice": round(clean, 6),
                             "attack_dice": round(attack, 6)})
    return rows


def table_titles(attack: str) -> tuple[str, str]:
    """Titles of Table 1 and Table 2; ``attack`` as :func:`tables_from_eval` names it."""
    return "Table 1: clean test split", f"Table 2: under attack ({attack})"


def markdown_report(t1: dict, t2: dict, attack: str, figures: list[tuple[str, str]],
                    notes: tuple[str, ...] = ()) -> str:
    """One page: both tables and the figures (relative paths)."""
    parts = [f"# {TITLE}", "", METRICS_NOTE, "", *[x for n in notes for x in (n, "")],
             *[x for t, title in zip((t1, t2), table_titles(attack)) for x in (to_markdown(t, title), "")]]
    for title, path in figures:
        parts += [f"## {title}", "", f"![{title}]({path})", ""]
    return "\n".join(parts)


def html_report(t1: dict, t2: dict, attack: str, figures: list[tuple[str, str]], folder,
                notes: tuple[str, ...] = ()) -> str:
    """The same page as one self-contained HTML file (figures embedded), which the MLflow
    artifact viewer renders."""
    import base64
    import html
    from pathlib import Path

    def tab(t: dict, title: str) -> str:
        cols = list(t)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v, 4))}</td>" for v in r) + "</tr>"
                       for r in zip(*(t[c] for c in cols)))
        return f"<table><caption>{html.escape(title)}</caption><tr>{head}</tr>{body}</table>"

    parts = [f"<h1>{html.escape(TITLE)}</h1>", f"<p>{html.escape(METRICS_NOTE)}</p>",
             *[f"<p><b>{html.escape(n)}</b></p>" for n in notes],
             *[tab(t, title) for t, title in zip((t1, t2), table_titles(attack))]]
    for title, path in figures:
        data = base64.b64encode((Path(folder) / path).read_bytes()).decode()
        parts += [f"<h2>{html.escape(title)}</h2>",
                  f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">']
    style = ("body{font-family:sans-serif;margin:1.5em;max-width:1300px}table{border-collapse:collapse;"
             "margin:1em 0;font-size:13px}caption{font-weight:bold;text-align:left;padding:4px 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(TITLE)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
