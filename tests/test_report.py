"""The report's pure parts: the champion criterion, the per-class rows for `dvc plots`,
the self-contained HTML page."""
from __future__ import annotations

import math

from mlsys import report


def ev(attack: float, clean: float) -> dict:
    return {"clean": {"dice": clean, "dice/dead": math.nan, "dice/neoplastic": 0.5},
            "attack": {"dice": attack, "dice/dead": math.nan, "dice/neoplastic": 0.25},
            "attack_settings": {"mode": "faithful", "steps": 2, "eps": 0.01, "alpha": 0.0025, "target": 0}}


def test_champion_highest_attack_dice_then_clean_dice_then_lower_number():
    assert report.champion({"model1": ev(0.2, 0.9), "model2": ev(0.3, 0.1)}) == "model2"
    assert report.champion({"model1": ev(0.3, 0.5), "model2": ev(0.3, 0.6)}) == "model2"
    assert report.champion({"model1": ev(0.3, 0.6), "model2": ev(0.3, 0.6)}) == "model1"
    assert report.champion({"model1": ev(math.nan, 0.9), "model2": ev(0.0, 0.1)}) == "model2"


def test_per_class_rows_leave_out_classes_without_a_score():
    rows = report.per_class_rows({"model1": ev(0.2, 0.9)})
    assert rows == [{"label": "model1 neoplastic", "model": "model1", "class": "neoplastic", "clean_dice": 0.5,
                     "attack_dice": 0.25}]


def test_html_report_embeds_tables_and_figures(tmp_path):
    (tmp_path / "f.png").write_bytes(b"\x89PNG fake")
    evals = {"model1": ev(0.2, 0.9), "model2": ev(0.3, 0.1)}
    t1, t2, attack = report.tables_from_eval(evals)
    page = report.html_report(t1, t2, attack, [("A <figure>", "f.png")], tmp_path, ("Champion: model2",))
    assert page.count("<table>") == 2 and "Table 2: under attack (faithful attack, 2 steps" in page
    assert "data:image/png;base64,iVBORyBmYWtl" in page and "A &lt;figure&gt;" in page
    assert "<b>Champion: model2</b>" in page and "<td>n/a</td>" in page
