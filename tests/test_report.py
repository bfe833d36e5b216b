"""The report's pure parts: the champion criterion, the per-class rows for `dvc plots`,
the self-contained HTML page."""
from __future__ import annotations

import math

import pytest

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
    t1 = report.table({m: e["clean"] for m, e in evals.items()})
    t2 = report.table({m: e["attack"] for m, e in evals.items()})
    titles = report.table_titles(report.attack_name(evals["model1"]["attack_settings"]), 3)
    page = report.html_report([(titles[0], t1), (titles[1], t2)], [("A <figure>", "f.png")], tmp_path,
                              ("Champion: model2",))
    assert page.count("<table>") == 2 and "Table 2: under attack (faithful attack, 2 steps" in page
    assert "mean ± std over 3 seeds" in page
    assert "data:image/png;base64,iVBORyBmYWtl" in page and "A &lt;figure&gt;" in page
    assert "<b>Champion: model2</b>" in page and "<td>n/a</td>" in page


def seeds_of(values: dict[str, list[float]]) -> dict[int, dict[str, dict]]:
    """Evaluation JSONs of three seeds whose attack Dice per model are ``values[model]``."""
    from mlsys.params import MODELS

    return {s: {m: {"clean": {"dice": 0.5, "accuracy": 0.9},
                    "attack": {"dice": values[m][s], "accuracy": 0.8}} for m in MODELS} for s in range(3)}


def test_tables_over_seeds_give_mean_and_sample_std():
    per_seed = seeds_of({"model1": [0.1, 0.2, 0.6], "model2": [0.3] * 3, "model3": [0.3] * 3, "model4": [0.3] * 3})
    tabs = report.build_tables(per_seed)
    assert tabs["table2"]["dice"][0] == pytest.approx(0.3)
    assert tabs["table2_std"]["dice"][0] == pytest.approx(math.sqrt(((0.2) ** 2 + 0.1 ** 2 + 0.3 ** 2) / 2))
    assert tabs["table2_std"]["dice"][1] == pytest.approx(0)
    assert tabs["table2_seeds"]["model"][:3] == ["model1 seed 0", "model1 seed 1", "model1 seed 2"]
    one = report.build_tables({0: per_seed[0]})
    assert math.isnan(one["table2_std"]["dice"][0])   # one seed: no spread, shown without +-


def test_paired_differences_use_the_t_interval_of_the_per_seed_differences():
    per_seed = seeds_of({"model1": [0.10, 0.20, 0.30], "model2": [0.15, 0.26, 0.34],
                         "model3": [0.3, 0.1, 0.2], "model4": [0.1, 0.2, 0.3]})
    rows = {(r["model"], r["split"], r["metric"]): r for r in report.paired_differences(per_seed)}
    r = rows[("model2", "attack", "dice")]
    d = [0.05, 0.06, 0.04]                  # by hand: mean 0.05, sd 0.01, t(0.975, 2) = 4.302653
    assert r["mean"] == pytest.approx(0.05) and r["std"] == pytest.approx(0.01)
    assert r["lo"] == pytest.approx(0.05 - 4.302653 * 0.01 / math.sqrt(3), abs=1e-6)
    assert r["per_seed"] == pytest.approx(d)
    cells = report.paired_table(report.paired_differences(per_seed))
    assert cells["attack dice"][0].endswith(" *")          # model 2: the interval excludes 0
    assert not cells["attack dice"][1].endswith(" *")      # model 3: +0.0 +- a lot
    assert rows[("model4", "attack", "dice")]["mean"] == pytest.approx(0)
