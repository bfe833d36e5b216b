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
    assert "Table 2: under attack (faithful attack, 2 steps" in page
    assert page.count("<table>") == 4 and "(part 2 of 2)" in page          # 16 columns: too wide for one
    assert page.count('<div class="table-scroll"><table>') == 4          # every table scrolls, never the page
    assert "mean ± std over 3 seeds" in page
    assert "data:image/png;base64,iVBORyBmYWtl" in page and "A &lt;figure&gt;" in page
    assert "<b>Champion: model2</b>" in page and "<td>n/a</td>" in page


def test_table_titles_say_which_data_and_protocol():
    t1, t2 = report.table_titles("faithful attack", 3, "PanNuke official split 2 (train fold 2, valid fold 1, test fold 3)")
    assert t1 == ("Table 1: clean test split of PanNuke official split 2 (train fold 2, valid fold 1, test fold 3) "
                  "(mean ± std over 3 seeds)")
    assert "test split of PanNuke official split 2 (" in t2 and t2.startswith("Table 2: under attack (faithful attack;")
    assert report.table_titles("a", 1) == ("Table 1: clean test split (mean ± std over 1 seed)",
                                           "Table 2: under attack (a; mean ± std over 1 seed)")


def seeds_of(values: dict[str, list[float]]) -> dict[int, dict[str, dict]]:
    """Evaluation JSONs of three seeds whose attack Dice per model are ``values[model]``."""
    return {s: {m: {"clean": {"dice": 0.5, "accuracy": 0.9},
                    "attack": {"dice": values[m][s], "accuracy": 0.8}} for m in values} for s in range(3)}


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


# --------------------------------------------------------------------------- the robustness protocol
def robust_eval(worst: dict[str, tuple[float, float]], tissue_dice: dict[str, tuple[float, float]],
                curve: list[float]) -> dict:
    """An evaluation JSON with a "robust" section: worst[radius] = (dice, accuracy),
    tissue_dice[tissue] = (clean, worst at 8), the worst curve's Dice at eps 8 over steps 0, 2, 4."""
    def curve_of(dice):
        return {"steps": [0, 2, 4], "dice": dice, "accuracy": [0.9, 0.8, 0.7]}
    return {"clean": {"dice": 0.6, "accuracy": 0.95}, "attack": {"dice": 0.1, "accuracy": 0.8},
            "robust": {"radii": [1.0, 8.0], "attacks": ["segpgd", "sea"],
                       "worst": {r: {"dice": d, "accuracy": a, "jaccard": 0.0, "miou": d / 2, "nmiou": 0.1,
                                     "miou_image": 0.2} for r, (d, a) in worst.items()},
                       "tissue": {t: {"clean": {"dice": c}, "worst": {"1": {"dice": 0.5}, "8": {"dice": w}}}
                                  for t, (c, w) in tissue_dice.items()},
                       "curves": {name: {"1": curve_of([0.6, 0.5, 0.5]), "8": curve_of(curve)}
                                  for name in ("sea", "segpgd", "worst")}}}    # sorted, as the JSON file


def robust_seeds() -> dict[int, dict[str, dict]]:
    from mlsys.params import MODELS

    out = {}
    for s, (d8, null) in enumerate(((0.2, 0.3), (0.4, None))):
        out[s] = {m: robust_eval({"1": (0.5 + 0.1 * i, 0.9), "8": (d8 + 0.1 * i, null)},
                                 {"Breast": (0.6, 0.1 * (s + 1)), **({"Colon": (0.7, 0.3)} if s == 0 else {})},
                                 [0.6, 0.3 + 0.1 * s, d8 + 0.1 * i])
                  for i, m in enumerate(MODELS)}
    return out


def test_robustness_tables_read_the_json_mean_and_std_over_seeds():
    rob = report.build_tables(robust_seeds())["robust"]
    assert rob["radii"] == [1.0, 8.0] and rob["top"] == "8"
    assert rob["table"]["model"] == ["model1", "model2", "model3", "model4"]
    shown = [report.robust_columns(rob["radii"], ms) for ms in report.ROBUST_SHOWN]
    assert shown == [["eps 1/255 dice", "eps 1/255 accuracy", "eps 8/255 dice", "eps 8/255 accuracy"],
                     ["eps 1/255 miou", "eps 1/255 nmiou", "eps 1/255 miou_image",
                      "eps 8/255 miou", "eps 8/255 nmiou", "eps 8/255 miou_image"]]
    assert sorted(report.robust_columns(rob["radii"])) == sorted(sum(shown, []))  # the table has them all
    assert rob["table"]["eps 8/255 miou"][1] == pytest.approx((0.3 + 0.5) / 4)       # the worst case's miou
    assert rob["table"]["eps 8/255 dice"][1] == pytest.approx((0.3 + 0.5) / 2)          # model 2: 0.2+0.1, 0.4+0.1
    assert rob["table_std"]["eps 8/255 dice"][1] == pytest.approx(math.sqrt(2 * 0.1 ** 2))
    assert rob["table"]["eps 8/255 accuracy"][0] == pytest.approx(0.3)                  # null (no score) left out
    assert math.isnan(rob["table_std"]["eps 8/255 accuracy"][0])
    cells = report.mean_std_table(rob["table"], rob["table_std"], report.robust_columns(rob["radii"]))
    assert cells["eps 1/255 dice"][0] == "0.5000 ± 0.0000" and cells["eps 8/255 dice"][0] == "0.3000 ± 0.1414"
    # per tissue: rows tissues, clean and worst Dice at the largest radius, mean over the seeds that have it
    t = rob["tissue"]
    assert t["tissue"] == ["Breast", "Colon"] and t["model1 eps 8/255 dice"] == pytest.approx([0.15, 0.3])
    assert t["model3 clean dice"] == pytest.approx([0.6, 0.7])
    c = rob["curves"]["worst"]["model1"]
    assert c["steps"] == [0, 2, 4] and c["mean"] == pytest.approx([0.6, 0.35, 0.3])
    assert c["lo"] == pytest.approx([0.6, 0.3, 0.2]) and c["hi"] == pytest.approx([0.6, 0.4, 0.4])


def test_robustness_summary_and_plot_rows():
    per_seed = robust_seeds()
    tabs = report.build_tables(per_seed)
    summ = report.summary(per_seed, tabs)
    assert summ["robust"]["model2"]["eps8"]["dice"] == {"mean": 0.4, "std": round(math.sqrt(0.02), 6)}
    assert summ["robust"]["model1"]["eps8"]["accuracy"] == {"mean": 0.3, "std": None}
    rows = report.robust_radius_rows(tabs["robust"])
    assert [r["radius"] for r in rows] == [0.0, 1.0, 8.0]               # 0: the clean split
    assert rows[0]["model1_dice"] == pytest.approx(0.6) and rows[2]["model2_dice"] == pytest.approx(0.4)
    assert rows[2]["model2_dice_std"] == pytest.approx(math.sqrt(0.02))
    assert rows[2]["model2_miou"] == pytest.approx(0.2) and rows[1]["model1_nmiou"] == pytest.approx(0.1)
    assert summ["robust"]["model2"]["eps8"]["miou"]["mean"] == pytest.approx(0.2)
    assert math.isnan(rows[0]["model1_miou"])  # the fixture's clean results carry no mIoU
    steps = report.robust_steps_rows(tabs["robust"])
    assert [r["step"] for r in steps] == [0, 2, 4] and steps[2]["model1_worst"] == pytest.approx(0.3)
    assert set(steps[0]) == {"step"} | {f"model{i}_{n}" for i in range(1, 5) for n in ("segpgd", "sea", "worst")}


def test_no_robust_section_no_robustness_view():
    per_seed = seeds_of({m: [0.3] * 3 for m in ("model1", "model2", "model3", "model4")})
    tabs = report.build_tables(per_seed)
    assert tabs["robust"] is None and "robust" not in report.summary(per_seed, tabs)


def test_robustness_figures_draw(tmp_path):
    from mlsys import figures

    rob = report.build_tables(robust_seeds())["robust"]
    figures.save(figures.robust_radius(report.robust_radius_rows(rob), rob["table"]["model"], "t"), tmp_path / "r.png")
    fig = figures.robust_steps(rob["curves"], "t")
    assert [ax.get_title() for ax in fig.axes] == ["segpgd", "sea", "worst of the attacks"]
    assert len(fig.axes[2].lines) == 4                    # one line per model
    figures.save(fig, tmp_path / "s.png")
    assert (tmp_path / "r.png").stat().st_size > 1000 and (tmp_path / "s.png").stat().st_size > 1000


def test_protocol_names_carry_the_strength_the_evaluations_recorded():
    from mlsys.report import protocol_names, robust_titles

    rob = {"attacks": ["segpgd", "sea"], "labels": {"segpgd": "SegPGD, 4 steps",
                                                    "sea": "SEA-style, 4 steps (reduced from 300)"},
           "n_seeds": 3, "top": "8"}
    assert protocol_names(rob) == "SegPGD, 4 steps, SEA-style, 4 steps (reduced from 300)"
    assert all("SEA-style, 4 steps (reduced from 300)" in t for t in robust_titles(rob)[:2])
    assert "mIoU" in robust_titles(rob)[1] and "Per tissue" in robust_titles(rob)[2]
    assert protocol_names({"attacks": ["sea"]}) == "sea"  # an evaluation written before the labels


def test_tables_1_and_2_carry_the_miou_family():
    """Tables 1 and 2 show miou, nmiou and miou_image beside Dice and accuracy, read from the
    evaluation JSON's keys (and the metrics note says what each is)."""
    from mlsys.metrics import SegMetrics

    keys = set(SegMetrics().result())
    assert {"miou", "miou_nuclei", "nmiou", "miou_image"} <= keys
    assert {"miou", "nmiou", "miou_image"} <= set(report.COLUMNS) <= keys | {"loss"}
    assert report.COLUMNS.index("miou") > report.COLUMNS.index("dice")
    evals = {"model1": {"clean": {"dice": 0.5, "accuracy": 0.9, "miou": 0.4, "nmiou": 0.8, "miou_image": 0.45}}}
    t = report.table({m: e["clean"] for m, e in evals.items()})
    assert t["miou"] == [0.4] and t["nmiou"] == [0.8] and t["miou_image"] == [0.45]
    assert "| miou | nmiou | miou_image |" in report.to_markdown(t, "T")
    assert all(w in report.METRICS_NOTE for w in ("miou", "nmiou", "miou_image", "RSE", "SEA"))


# --------------------------------------------------------------------------- the adversarial-training baselines
def test_paired_differences_from_model1_and_from_pgdat_with_the_baselines_labelled():
    from mlsys.params import EXPERIMENT, AdversarialParams

    values = {m: [0.3] * 3 for m in EXPERIMENT}
    values["pgdat"] = [0.40, 0.50, 0.60]
    values["model3"] = [0.45, 0.56, 0.64]                                   # pgdat + 0.05, 0.06, 0.04
    per_seed = seeds_of(values)
    tabs = report.build_tables(per_seed)
    assert tabs["table2"]["model"] == list(EXPERIMENT)
    rows = {(r["model"], r["baseline"], r["split"], r["metric"]): r for r in tabs["paired"]}
    n = len(EXPERIMENT) - 1
    assert len(tabs["paired"]) == 2 * n * 2 * 3                          # from model 1 and from PGD-AT
    assert rows[("model3", "pgdat", "attack", "dice")]["mean"] == pytest.approx(0.05)
    assert rows[("pgdat", "model1", "attack", "dice")]["mean"] == pytest.approx(0.2)
    assert ("pgdat", "pgdat", "attack", "dice") not in rows
    cells = report.labelled(report.paired_table(tabs["paired"]), report.model_labels(AdversarialParams()),
                            ("model", "from"))
    i = next(k for k, (m, b) in enumerate(zip(cells["model"], cells["from"]))
             if m == "model3" and b.startswith("PGD-AT"))
    assert cells["from"][i] == "PGD-AT (2 steps, 4/255, half clean)" and cells["attack dice"][i].endswith(" *")
    assert "TRADES (beta 6, 2 steps, 4/255)" in cells["model"]
    summ = report.summary(per_seed, tabs)
    assert summ["paired_pgdat"]["model3"]["attack_dice"]["mean"] == pytest.approx(0.05)
    assert summ["paired"]["pgdat"]["attack_dice"]["mean"] == pytest.approx(0.2)
    t1 = report.labelled(report.mean_std_table(tabs["table1"], tabs["table1_std"]), report.model_labels(
        AdversarialParams(steps=1, half_clean=False)))
    assert t1["model"][:4] == ["model1", "model2", "model3", "model4"] and t1["model"][4] == "PGD-AT (1 step, 4/255)"
    assert "pgdat = PGD-AT (2 steps, 4/255, half clean)" in report.baselines_note(AdversarialParams())


# --------------------------------------------------------------------------- the findings
def test_findings_state_each_effect_with_its_interval_and_conclusion():
    """Better beyond the interval, worse beyond it, within it, one seed; from model 1 and PGD-AT."""
    from mlsys.params import EXPERIMENT

    values = {m: [0.30, 0.31, 0.29] for m in EXPERIMENT}
    values["model2"] = [0.20, 0.22, 0.21]                   # model 1 - 0.10, 0.09, 0.08: worse
    values["model3"] = [0.35, 0.36, 0.34]                   # model 1 + 0.05 each: better
    values["model4"] = [0.40, 0.20, 0.32]                   # +0.10, -0.11, +0.03: within
    said = report.findings(report.build_tables(seeds_of(values)))
    lines = {x.split(":")[0]: x for x in said}
    assert lines["Model 3 (method2) vs model 1 (clean), under the paper's attack"] == (
        "Model 3 (method2) vs model 1 (clean), under the paper's attack: Dice +0.050 [+0.050, +0.050], "
        "better beyond the 95% interval; accuracy +0.000 [+0.000, +0.000], within the interval: no conclusion.")
    d = [-0.10, -0.09, -0.08]                               # by hand: mean -0.09, sd 0.01
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert lines["Model 2 (method1) vs model 1 (clean), under the paper's attack"].startswith(
        f"Model 2 (method1) vs model 1 (clean), under the paper's attack: Dice {sum(d) / 3:+.3f} "
        f"[{-0.09 - half:+.3f}, {-0.09 + half:+.3f}], worse beyond the 95% interval;")
    assert "Dice +0.007 [" in lines["Model 4 (clean + method1 + method2) vs model 1 (clean), under the paper's attack"]
    assert "within the interval: no conclusion; accuracy" in \
        lines["Model 4 (clean + method1 + method2) vs model 1 (clean), under the paper's attack"]
    assert said[0] == ("The paper's question, Dice under its attack, models 2-4 vs model 1 (clean): better beyond the "
                       "95% interval: model 3 (method2); worse beyond the 95% interval: model 2 (method1); "
                       "no conclusion: model 4 (clean + method1 + method2).")
    assert said[1].startswith("The paper's question, Dice under its attack, models 2-4 vs PGD-AT: ")
    one = report.findings(report.build_tables({0: seeds_of(values)[0]}))
    assert "Dice -0.100, one seed: no interval, no conclusion" in one[2]
    assert all("beyond" not in x for x in one)


def test_findings_answer_the_papers_question_first_then_baselines_clean_worst_case():
    per_seed = robust_seeds()
    for s, evals in per_seed.items():                      # PGD-AT beside models 1-4: its worst Dice 0.1 higher
        evals["pgdat"] = {**evals["model4"], "robust": {**evals["model4"]["robust"], "worst": {
            r: {**v, "dice": v["dice"] + 0.1} for r, v in evals["model4"]["robust"]["worst"].items()}}}
    tabs = report.build_tables(per_seed)
    sections = report.finding_sections(tabs)
    assert [h for h, _ in sections] == [
        "The paper's question: do models 2-4 resist its attack better than model 1 and than PGD-AT?",
        "The baselines under the paper's attack", "Clean test split",
        "The field's worst case at eps 1/255", "The field's worst case at eps 8/255"]
    question = sections[0][1]
    assert [x.split(":")[0] for x in question] == [
        "The paper's question, Dice under its attack, models 2-4 vs model 1 (clean)",
        "The paper's question, Dice under its attack, models 2-4 vs PGD-AT",
        *[f"{m} vs {b}, under the paper's attack" for b in ("model 1 (clean)", "PGD-AT")
          for m in ("Model 2 (method1)", "Model 3 (method2)", "Model 4 (clean + method1 + method2)")]]
    assert sections[1][1][0].startswith("PGD-AT vs model 1 (clean), under the paper's attack: Dice")
    said = report.findings(tabs)
    assert said == [x for _, ss in sections for x in ss]
    assert not any(x.startswith("Model 1 (clean) vs PGD-AT") for x in said)   # said once, as PGD-AT vs model 1
    # the worst case per radius, paired by seed with the same routine: model 3 is 0.2 above model 1 at
    # every seed and radius, model 4 0.1 below PGD-AT; the accuracy at eps 8 has no score
    worst8 = sections[4][1]
    assert ("Model 3 (method2) vs model 1 (clean), worst case at eps 8/255: Dice +0.200 [+0.200, +0.200], better "
            "beyond the 95% interval; accuracy n/a (no score).") in worst8
    assert any(x.startswith("Model 4 (clean + method1 + method2) vs PGD-AT, worst case at eps 8/255: Dice -0.100 "
                            "[-0.100, -0.100], worse beyond") for x in worst8)
    rows = {(r["model"], r["baseline"], r["split"], r["metric"]): r for r in tabs["robust"]["paired"]}
    assert rows[("model3", "model1", "eps 1/255", "dice")]["per_seed"] == pytest.approx([0.2, 0.2])
    assert set(k[3] for k in rows) == {"dice", "accuracy"}


def test_findings_go_to_the_metrics_json_and_open_the_report(tmp_path):
    per_seed = seeds_of({"model1": [0.1, 0.2, 0.3], "model2": [0.2, 0.3, 0.41], "model3": [0.3] * 3,
                         "model4": [0.3] * 3})
    tabs = report.build_tables(per_seed)
    summ = report.summary(per_seed, tabs)
    assert summ["findings"] == report.findings(tabs) and summ["findings"][0].startswith("The paper's question")
    import json
    assert json.loads(json.dumps(summ))["findings"] == summ["findings"]
    sections = report.finding_sections(tabs)
    t1 = report.mean_std_table(tabs["table1"], tabs["table1_std"])
    md = report.markdown_report([("Table 1", t1)], [], ("a note",), sections)
    assert md.index("## Findings") < md.index(report.METRICS_NOTE) < md.index("**Table 1**")
    assert f"- {summ['findings'][0]}" in md
    page = report.html_report([("Table 1", t1)], [], tmp_path, ("a note",), sections)
    assert page.index("<h2>Findings</h2>") < page.index("<table>")
    assert "<details><summary><b>Clean test split</b> (3 comparisons)</summary>" in page


def test_wide_tables_are_split_for_the_page_and_complete_elsewhere(tmp_path):
    cols = {f"column {i:02d}": [0.123456, 0.5] for i in range(40)}
    t = {"model": ["model1", "model2"], "from": ["model1", "pgdat"], **cols}
    parts = report.split_wide(t)
    assert len(parts) > 1 and all(list(p)[:2] == ["model", "from"] for p in parts)   # the keys in every part
    assert [c for p in parts for c in list(p)[2:]] == list(cols)                      # every column once, in order
    widths = [sum(max([len(c), *(len(report._fmt(v, 4)) for v in p[c])]) + 2 for c in p) for p in parts]
    assert max(widths) <= report.PAGE_CHARS and max(widths) - min(widths) <= 2 * 11   # about equal parts
    assert report.split_wide({"model": ["m"], "dice": [0.5]}) == [{"model": ["m"], "dice": [0.5]}]
    page = report.html_report([("Wide", t)], [], tmp_path)
    assert f"Wide (part 1 of {len(parts)})" in page and page.count('<div class="table-scroll">') == len(parts)
    assert report.to_markdown(t, "Wide").count("column") == 40                        # the Markdown keeps it whole


# --------------------------------------------------------------------------- the cross-evaluation
def cross_seeds() -> dict[int, dict[str, dict]]:
    """robust_seeds with the transfer sets: model k's Dice on method one's set 0.1 k + 0.01 seed,
    on method two's 0.5 - 0.1 k (models 1-4, k = 0..3)."""
    per_seed = robust_seeds()
    for s, evals in per_seed.items():
        for k, e in enumerate(evals.values()):
            e["transfer_method1"] = {"dice": 0.1 * k + 0.01 * s, "accuracy": 0.9}
            e["transfer_method2"] = {"dice": 0.5 - 0.1 * k, "accuracy": None}
    return per_seed


def test_cross_evaluation_puts_every_model_against_every_perturbation():
    per_seed = cross_seeds()
    tabs = report.build_tables(per_seed)
    cross = tabs["cross"]
    assert cross["columns"] == ["clean", "method one transfer", "method two transfer",
                                "paper's attack", "worst case eps 1/255", "worst case eps 8/255"]
    t, sd = cross["table"], cross["table_std"]
    assert t["model"] == ["model1", "model2", "model3", "model4"]
    assert t["method one transfer dice"] == pytest.approx([0.005, 0.105, 0.205, 0.305])
    assert sd["method one transfer dice"] == pytest.approx([0.01 / math.sqrt(2)] * 4)
    assert t["method two transfer dice"] == pytest.approx([0.5, 0.4, 0.3, 0.2])
    assert all(math.isnan(v) for v in t["method two transfer accuracy"])   # no score
    assert t["worst case eps 8/255 dice"] == pytest.approx([0.3, 0.4, 0.5, 0.6])           # (0.2, 0.4) + 0.1 k
    assert t["paper's attack dice"] == pytest.approx([0.1] * 4) and t["clean dice"] == pytest.approx([0.6] * 4)
    shown = report.cross_shown(cross)
    assert list(shown) == ["model", *cross["columns"]]
    assert shown["method one transfer"][1] == "0.1050 ± 0.0071"

    # paired differences on the transfer sets, and their findings, from model 1 only
    rows = {(r["model"], r["baseline"], r["split"], r["metric"]): r for r in tabs["paired"]}
    assert rows[("model3", "model1", "transfer_method1", "dice")]["mean"] == pytest.approx(0.2)
    sections = dict(report.finding_sections(tabs))
    heads = list(sections)                                 # no baselines here: no section of theirs
    assert heads[heads.index("Clean test split"):][:3] == ["Clean test split",
                                   "Transferred: the test split perturbed by method one with model 1 "
                                   "(white-box for model 1)",
                                   "Transferred: the test split perturbed by method two with model 1 "
                                   "(white-box for model 1)"]
    two = sections["Transferred: the test split perturbed by method two with model 1 (white-box for model 1)"]
    assert two[0] == ("Model 2 (method1) vs model 1 (clean), on the test split perturbed by method two with "
                      "model 1: Dice -0.100 [-0.100, -0.100], worse beyond the 95% interval; accuracy n/a (no score).")

    # placed before the per-seed rows, titled with what each column is
    titles = report.table_titles("faithful attack", 2)
    shown_all = report.shown_tables(tabs, titles, report.MODEL_LABELS, "faithful attack, 2 steps")
    title, table = shown_all[-3]
    assert title.startswith("Cross-evaluation: Dice") and "over 2 seeds" in title
    assert "faithful attack, 2 steps" in title and "segpgd, sea" in title
    assert table["model"] == ["model1", "model2", "model3", "model4"]
    assert [t for t, _ in shown_all[-2:]] == ["Table 1 per seed", "Table 2 per seed"]


def test_no_transfer_sets_no_cross_evaluation():
    """Evaluations of an older pipeline (no transfer sets): no cross table, paired as before."""
    tabs = report.build_tables(robust_seeds())
    assert tabs["cross"] is None and {r["split"] for r in tabs["paired"]} == {"clean", "attack"}
    assert not any(t.startswith("Cross") for t, _ in report.shown_tables(tabs, ("T1", "T2"), report.MODEL_LABELS))


def test_cross_evaluation_heat_map_draws(tmp_path):
    from mlsys import figures

    cross = report.build_tables(cross_seeds())["cross"]
    fig = figures.cross_heatmap(cross["table"], cross["table_std"], cross["columns"], cross["table"]["model"], "T")
    ax = fig.axes[0]
    assert len(ax.get_xticks()) == len(cross["columns"]) and len(ax.get_yticks()) == 4
    texts = [t.get_text() for t in ax.texts]
    assert "0.105\n± 0.007" in texts and len(texts) == 4 * len(cross["columns"])
    figures.save(fig, tmp_path / "cross.png")
    assert (tmp_path / "cross.png").stat().st_size > 0
