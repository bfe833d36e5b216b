"""The report stage: the paper's Tables 1 and 2 over several seeds, the paired differences
from model 1 and from PGD-AT, the figures, the champion model, and `mlsys compare`.

Table 1: the four models and the two adversarial-training baselines (PGD-AT, TRADES;
params.BASELINES) on the clean test split; Table 2: the same models under their own
evaluation attack. Columns: loss, pixel accuracy, Dice and Jaccard in the
standard variant (argmax, macro over the nucleus classes present) and the paper
variant (softmax >= 0.1, pooled over all channels), the mIoU family (miou over all six
classes, nmiou as RSE's code pools it, miou_image per image; mlsys.metrics), then per-class
Dice. Every cell is
the mean +- the standard deviation over the seeds (sample std, n - 1), with the per-seed
rows beside; "paired" gives, for every other model, the per-seed difference from model 1
of the same seed, and from PGD-AT (the field's baseline), its mean and a 95% t-interval
(mean +- t(0.975, n-1) * sd / sqrt(n)): an effect is shown only where the interval excludes 0;
the same for the field's worst case at each radius and for the transfer sets. The
cross-evaluation (build_cross) puts every model against every perturbation the experiment
makes: clean, the test split perturbed by method one and method two with model 1 (the
augment stage's transfer sets: transferred, white-box for model 1 only), the paper's attack
and the field's worst case against the model itself. The findings (finding_sections) say these
in sentences, the paper's question first, on top of report.md and report.html and as
metrics/report.json's "findings".
The report shows the models its evaluations hold (``mlsys compare`` on runs of an older
pipeline: the four only).
The champion (registered in MLflow by the report stage) is chosen by CHAMPION_CRITERION.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from . import entry
from .params import BASELINES, CLASS_NAMES, EXPERIMENT, MODELS, AdversarialParams, baseline_label
from .results import radius_key

MODEL_LABELS = {**{m: f"model {m[5:]} ({'clean' if sets == ('clean',) else ' + '.join(sets)})"
                   for m, sets in MODELS.items()}, "pgdat": "PGD-AT", "trades": "TRADES"}
PAIRED = ("accuracy", "dice", "paper_dice")  # the metrics whose paired differences are reported
PAIRED_BASELINES = ("model1", "pgdat")     # the paired differences are from each of these (where evaluated)


def model_labels(adv: AdversarialParams) -> dict[str, str]:
    """MODEL_LABELS with the baselines' settings: "PGD-AT (2 steps, 4/255, half clean)", ..."""
    return {**MODEL_LABELS, **{b: baseline_label(b, adv) for b in BASELINES}}


def models_of(per_seed: dict[int, dict[str, dict]]) -> list[str]:
    """The models the evaluations hold, in EXPERIMENT's order (all seeds hold the same)."""
    held = next(iter(per_seed.values()))
    return [m for m in EXPERIMENT if m in held]


def labelled(tab: dict[str, list], labels: dict[str, str], columns: tuple[str, ...] = ("model",)) -> dict[str, list]:
    """A display copy of ``tab`` whose ``columns`` name the baselines by their labels (the
    CSVs and metrics keep the short names: pgdat, trades)."""
    return {c: [labels[v] if c in columns and v in BASELINES else v for v in vals] for c, vals in tab.items()}
COLUMNS = ["loss", "accuracy", "dice", "jaccard", "miou", "nmiou", "miou_image", "paper_dice", "paper_jaccard"] + \
    [f"dice/{c}" for c in CLASS_NAMES]


def table(results: dict[str, dict[str, float]], columns: list[str] = COLUMNS) -> dict[str, list]:
    """{model: metrics} -> column-oriented table (for CSV, Markdown and mlflow.log_table);
    a missing or null cell is NaN."""
    out: dict[str, list] = {"model": list(results)}
    for col in columns:
        out[col] = [math.nan if results[m].get(col) is None else results[m][col] for m in results]
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


def over_seeds(tables: list[dict], columns: list[str] = COLUMNS) -> tuple[dict, dict]:
    """Tables of the same models and columns, one per seed -> (mean table, std table); the
    std is the sample standard deviation (NaN for one seed); NaN cells are left out."""
    mean, std = {"model": list(tables[0]["model"])}, {"model": list(tables[0]["model"])}
    for col in columns:
        values = np.array([t[col] for t in tables], dtype=float)  # (seeds, models)
        mean[col] = _nan_stat(np.nanmean, values).tolist()
        std[col] = (_nan_stat(np.nanstd, values, ddof=1) if len(tables) > 1
                    else np.full(values.shape[1], np.nan)).tolist()
    return mean, std


def _nan_stat(stat, values, **kw) -> np.ndarray:
    """``stat`` (np.nanmean, np.nanstd, np.nanmin, np.nanmax) over axis 0 of ``values`` (an
    array, or nested lists with None for no number), NaN where a column has no number (a
    class absent in every seed), without numpy's warning about it. The one NaN-aware
    reduction of the report."""
    values = np.array(values, dtype=float)  # None -> NaN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return stat(values, 0, **kw)


def per_seed_table(per_seed: dict[int, dict[str, dict]], key: str) -> dict[str, list]:
    """The rows of every (model, seed): ``per_seed[seed][model]`` is an evaluation JSON,
    ``key`` "clean" or "attack"."""
    return table({f"{m} seed {seed}": evals[m][key] for m in models_of(per_seed) for seed, evals in per_seed.items()})


def paired_differences(per_seed: dict[int, dict[str, dict]], baseline: str = "model1",
                       splits: tuple[str, ...] = ("clean", "attack"),
                       metrics: tuple[str, ...] = PAIRED) -> list[dict]:
    """For each other model and each of ``metrics`` in each of ``splits`` (keys of the
    evaluation JSON: clean and under attack; :func:`robust_paired` passes the worst case per
    radius): the differences from ``baseline`` paired by seed, their mean, std and the 95%
    t-interval of the mean (NaN bounds for one seed). An effect beyond noise is one whose
    interval excludes 0; a missing or null score gives NaN."""
    from scipy import stats

    def value(scores: dict, metric: str) -> float:
        v = scores.get(metric)
        return math.nan if v is None else v

    rows = []
    seeds = list(per_seed)
    for m in models_of(per_seed):
        if m == baseline:
            continue
        for key in splits:
            for metric in metrics:
                d = np.array([value(per_seed[s][m][key], metric) - value(per_seed[s][baseline][key], metric)
                              for s in seeds])
                n, mean = len(d), float(np.mean(d))
                sd = float(np.std(d, ddof=1)) if n > 1 else math.nan
                half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else math.nan
                rows.append({"model": m, "baseline": baseline, "split": key, "metric": metric, "mean": mean, "std": sd,
                             "lo": mean - half, "hi": mean + half, "n_seeds": n,
                             "per_seed": [float(v) for v in d]})
    return rows


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def mean_std_table(mean: dict, std: dict, columns: list[str] = COLUMNS) -> dict[str, list]:
    """Cells "mean ± std" (the display form of Tables 1 and 2)."""
    return {"model": mean["model"], **{c: [_pm(a, b) for a, b in zip(mean[c], std[c])] for c in columns}}


def paired_table(rows: list[dict]) -> dict[str, list]:
    """Display form of :func:`paired_differences` (of one or more baselines): one row per
    (model, baseline) -- "model", "from" -- one cell per (split, metric): "mean [lo, hi]",
    marked * where the interval excludes 0."""
    out: dict[str, list] = {"model": [], "from": []}
    pairs: list[tuple[str, str]] = []
    for r in rows:
        pair = (r["model"], r.get("baseline", "model1"))
        if pair not in pairs:
            pairs.append(pair)
            out["model"].append(pair[0])
            out["from"].append(pair[1])
        col = f"{r['split']} {r['metric']}"
        sig = "" if math.isnan(r["lo"]) or r["lo"] <= 0 <= r["hi"] else " *"
        cell = f"{r['mean']:+.4f}" + ("" if math.isnan(r["lo"]) else f" [{r['lo']:+.4f}, {r['hi']:+.4f}]") + sig
        out.setdefault(col, []).append(cell)
    return out


# --------------------------------------------------------------------------- the field's protocol
# (evaluate.robust: per image the worst of untargeted L-inf attacks at several radii)
ROBUST_METRICS = ("dice", "accuracy", "miou", "nmiou", "miou_image")  # per radius, worst case (SegMetrics.result)
ROBUST_SHOWN = (("dice", "accuracy"), ("miou", "nmiou", "miou_image"))  # one table each: readable at many radii


def robust_columns(radii: list[float], metrics: tuple[str, ...] = ROBUST_METRICS) -> list[str]:
    """Columns of the robustness table: "eps <r>/255 <metric>" per radius and metric."""
    return [f"eps {radius_key(r)}/255 {m}" for r in radii for m in metrics]


def robust_rows(evals: dict[str, dict]) -> dict[str, dict[str, float]]:
    """{model: evaluation JSON} -> {model: {robust column: worst-case value}} (one seed)."""
    return {m: {f"eps {k}/255 {metric}": v.get(metric) for k, v in e["robust"]["worst"].items()
                for metric in ROBUST_METRICS} for m, e in evals.items()}


def build_robust(per_seed: dict[int, dict[str, dict]]) -> dict | None:
    """The report's view of the "robust" sections, or None where an evaluation has none:
    "radii"; "table"/"table_std" (rows models, columns ``robust_columns``: the worst case
    per radius, mean and std over seeds, as ``over_seeds``); "tissue" (rows tissues,
    columns "<model> clean dice" and "<model> eps <R>/255 dice" at the largest radius R,
    means over seeds); "curves" {curve (attack or "worst"): {model: {"steps", "mean",
    "lo", "hi"}}} Dice over the steps at R (lo/hi: lowest/highest seed); "clean"
    {model: (mean, std)} of the clean Dice and accuracy."""
    evals = [e for s in per_seed.values() for e in s.values()]
    if not evals or any("robust" not in e for e in evals):
        return None
    radii = evals[0]["robust"]["radii"]
    if any(e["robust"]["radii"] != radii for e in evals):
        raise ValueError(f"evaluations ran different radii: {sorted({tuple(e['robust']['radii']) for e in evals})}")
    cols = robust_columns(radii)
    mean, std = over_seeds([table(robust_rows(s), cols) for s in per_seed.values()], cols)
    clean_cols = [f"clean {m}" for m in ROBUST_METRICS]
    cmean, cstd = over_seeds([table({m: {f"clean {k}": e["clean"].get(k) for k in ROBUST_METRICS}
                                     for m, e in s.items()}, clean_cols) for s in per_seed.values()], clean_cols)
    top = radius_key(max(radii))
    tissues = sorted({t for e in evals for t in e["robust"]["tissue"]})
    tissue: dict[str, list] = {"tissue": tissues}
    for m in models_of(per_seed):
        for label, get in (("clean dice", lambda e, t: e["robust"]["tissue"][t]["clean"]["dice"]),
                           (f"eps {top}/255 dice", lambda e, t: e["robust"]["tissue"][t]["worst"][top]["dice"])):
            tissue[f"{m} {label}"] = [float(_nan_stat(np.nanmean, [get(s[m], t) for s in per_seed.values()
                                                                   if t in s[m]["robust"]["tissue"]]))
                                      for t in tissues]
    curves: dict[str, dict] = {}
    for name in [*evals[0]["robust"]["attacks"], "worst"]:  # the protocol's order (the JSON's keys are sorted)
        for m in models_of(per_seed):
            runs = [s[m]["robust"]["curves"][name][top] for s in per_seed.values()]
            values = [r["dice"] for r in runs]  # (seeds, points)
            curves.setdefault(name, {})[m] = {"steps": runs[0]["steps"],
                                              **{k: _nan_stat(stat, values).tolist() for k, stat in
                                                 (("mean", np.nanmean), ("lo", np.nanmin), ("hi", np.nanmax))}}
    clean = {m: {k: (cmean[f"clean {k}"][i], cstd[f"clean {k}"][i]) for k in ROBUST_METRICS}
             for i, m in enumerate(cmean["model"])}
    return {"radii": radii, "top": top, "table": mean, "table_std": std, "tissue": tissue, "curves": curves,
            "clean": clean, "attacks": evals[0]["robust"]["attacks"], "labels": evals[0]["robust"].get("labels", {}),
            "n_seeds": len(per_seed), "paired": robust_paired(per_seed, radii)}


# --------------------------------------------------------------------------- cross-evaluation
# the evaluation JSON's keys of the transfer sets (one per augment method: params.METHODS), in words
TRANSFER_SPLITS = {"transfer_method1": "method one", "transfer_method2": "method two"}
CROSS_METRICS = ("dice", "accuracy")
CROSS_NOTE = ("Cross-evaluation: Dice of every model against every perturbation the experiment makes (mean ± std "
              "over {n} seeds): clean; the test split perturbed by method one and by method two with model 1 of "
              "the same seed, as the training sets were (transferred to the other models; white-box for model 1); "
              "the paper's attack against the model itself ({attack}); the field's worst case against the model "
              "itself at each radius ({protocol}). A model that resists only what it was trained on stands out "
              "in its own method's column alone.")


def has_transfer(per_seed: dict[int, dict[str, dict]]) -> bool:
    """Whether every evaluation holds the transfer sets' results (older pipelines' do not)."""
    return all(k in e for evals in per_seed.values() for e in evals.values() for k in TRANSFER_SPLITS)


def cross_columns(per_seed: dict[int, dict[str, dict]]) -> list[tuple[str, str]]:
    """(column label, evaluation JSON path "key" or "robust/<radius>") of the cross-evaluation,
    in order: clean, the transfer sets, the paper's attack, the worst case per radius."""
    e = next(iter(next(iter(per_seed.values())).values()))
    cols = [("clean", "clean"), *[(f"{w} transfer", k) for k, w in TRANSFER_SPLITS.items()],
            ("paper's attack", "attack")]
    if "robust" in e:
        cols += [(f"worst case eps {k}/255", f"robust/{k}") for k in e["robust"]["worst"]]
    return cols


def build_cross(per_seed: dict[int, dict[str, dict]]) -> dict | None:
    """The cross-evaluation (rows models, columns ``"<column label> <metric>"`` for each of
    :func:`cross_columns` and CROSS_METRICS): {"table", "table_std"} as :func:`over_seeds`, and
    "columns" (the labels). None where an evaluation lacks the transfer sets."""
    if not has_transfer(per_seed):
        return None
    cols = cross_columns(per_seed)

    def scores(e: dict, where: str) -> dict:
        return e["robust"]["worst"][where[7:]] if where.startswith("robust/") else e[where]

    names = [f"{label} {metric}" for label, _ in cols for metric in CROSS_METRICS]
    mean, std = over_seeds([table({m: {f"{label} {metric}": scores(e, where).get(metric)
                                       for label, where in cols for metric in CROSS_METRICS}
                                   for m, e in evals.items()}, names) for evals in per_seed.values()], names)
    return {"table": mean, "table_std": std, "columns": [label for label, _ in cols], "n_seeds": len(per_seed)}


def cross_shown(cross: dict, metric: str = "dice") -> dict[str, list]:
    """The display form of the cross-evaluation: one metric, cells "mean ± std", columns named
    by their labels."""
    cols = [f"{label} {metric}" for label in cross["columns"]]
    shown = mean_std_table(cross["table"], cross["table_std"], cols)
    return {"model": shown["model"], **{label: shown[c] for label, c in zip(cross["columns"], cols)}}


def robust_paired(per_seed: dict[int, dict[str, dict]], radii: list[float]) -> list[dict]:
    """The paired differences (:func:`paired_differences`) of the worst-case Dice and accuracy
    at each radius, from model 1 and from PGD-AT (where evaluated); "split" is "eps <r>/255"."""
    worst = {s: {m: {f"eps {k}/255": v for k, v in e["robust"]["worst"].items()} for m, e in evals.items()}
             for s, evals in per_seed.items()}
    splits = tuple(f"eps {radius_key(r)}/255" for r in radii)
    return [r for b in PAIRED_BASELINES if b in models_of(per_seed)
            for r in paired_differences(worst, b, splits, ROBUST_SHOWN[0])]


def robust_summary(rob: dict) -> dict:
    """metrics/report.json's "robust": {model: {"eps<r>": {metric: {"mean", "std"}}}} (worst case)."""
    out: dict = {}
    for i, m in enumerate(rob["table"]["model"]):
        for r in rob["radii"]:
            k = radius_key(r)
            out.setdefault(m, {})[f"eps{k}"] = {
                metric: {"mean": _num(rob["table"][f"eps {k}/255 {metric}"][i]),
                         "std": _num(rob["table_std"][f"eps {k}/255 {metric}"][i])} for metric in ROBUST_METRICS}
    return out


def robust_radius_rows(rob: dict) -> list[dict]:
    """`dvc plots` rows, one per radius (0 = clean): radius, then per model the worst-case
    mean and std over seeds of each of ROBUST_METRICS ("<model>_dice", "<model>_dice_std", ...)."""
    models = rob["table"]["model"]
    rows = [{"radius": 0.0, **{f"{m}_{k}{suffix}": rob["clean"][m][k][j] for m in models for k in ROBUST_METRICS
                               for j, suffix in ((0, ""), (1, "_std"))}}]
    for r in rob["radii"]:
        col = f"eps {radius_key(r)}/255"
        rows.append({"radius": float(r), **{f"{m}_{k}{suffix}": t[f"{col} {k}"][i] for i, m in enumerate(models)
                                            for k in ROBUST_METRICS
                                            for suffix, t in (("", rob["table"]), ("_std", rob["table_std"]))}})
    return rows


def robust_steps_rows(rob: dict) -> list[dict]:
    """`dvc plots` rows, one per recorded step at the largest radius: step, then the mean Dice
    over seeds per model and curve ("<model>_<attack or worst>")."""
    curves = rob["curves"]
    first = next(iter(curves.values()))
    steps = next(iter(first.values()))["steps"]
    return [{"step": t, **{f"{m}_{name}": c[m]["mean"][i] for name, c in curves.items() for m in c}}
            for i, t in enumerate(steps)]


def protocol_names(rob: dict) -> str:
    """The attacks of the protocol with their strength, as the evaluations named them
    ("SEA-style, 4 steps (reduced from 300)"); plain names from evaluations that gave none."""
    labels = rob.get("labels") or {}
    return ", ".join(labels.get(a, a) for a in rob["attacks"])


def robust_titles(rob: dict) -> tuple[str, str, str]:
    """Titles of the robustness tables: Dice and accuracy, the mIoU family, per tissue."""
    over = f"mean ± std over {rob['n_seeds']} seed{'s' if rob['n_seeds'] > 1 else ''}"
    worst = f"worst case per image of {protocol_names(rob)} at L-inf radius eps (r/255)"
    return (f"Robustness: {worst}, standard Dice and pixel accuracy ({over})",
            f"Robustness, mIoU: {worst}; miou over all six classes, nmiou pooled (RSE), miou_image "
            f"per image ({over})",
            f"Per tissue: clean and worst-case Dice at eps {rob['top']}/255 (mean over seeds)")


def attack_name(settings: dict) -> str:
    """The evaluation attack in words, from an evaluation JSON's ``attack_settings``."""
    s = settings
    return (f"{s['mode']} attack, {s['steps']} steps, eps {s['eps']}"
            + (f", alpha {s['alpha']}" if s["mode"] == "standard" else "")
            + f", target full-area class {s['target']} ({CLASS_NAMES[int(s['target'])]})")


TITLE = "mlsys report: four models and the adversarial-training baselines, clean and under attack"
METRICS_NOTE = ("Standard metrics: argmax, per class, macro mean over the nucleus classes present "
                "(absent classes: n/a, excluded); jaccard is the mIoU over the five nucleus classes. "
                "miou: per-class IoU pooled over the split, mean over all six classes present (background "
                "included; SEA's mIoU); nmiou: RSE's NmIoU as its code computes it (IoU pooled over classes and "
                "split, = acc / (2 - acc)); miou_image: per-image mIoU (classes absent from image and "
                "prediction left out), mean over images. Paper metrics: softmax >= 0.1 per channel, "
                "TP/FP/FN pooled over all channels including background (original code). "
                "Cells: mean ± sample standard deviation over the seeds.")
PAIRED_NOTE = ("Paired differences from model 1 and from PGD-AT (column \"from\"; same seed): mean [95% "
               "t-interval]; * marks an interval that excludes 0, i.e. a difference beyond the spread over seeds.")
CHAMPION_CRITERION = ("highest mean over seeds of the standard Dice under the evaluation attack (attack/dice); "
                      "ties go to the higher clean Dice, then to the lower model number")


def mean_evals(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """{model: {"clean": means, "attack": means}} over the seeds (what the champion is chosen by)."""
    out: dict[str, dict] = {m: {} for m in models_of(per_seed)}
    for m in out:
        for key in ("clean", "attack"):
            names = sorted({k for s in per_seed.values() for k in s[m][key]})
            values = np.array([[s[m][key].get(k, math.nan) for k in names] for s in per_seed.values()], dtype=float)
            out[m][key] = dict(zip(names, _nan_stat(np.nanmean, values).tolist()))
    return out


def champion(evals: dict[str, dict]) -> str:
    """The best model by CHAMPION_CRITERION (n/a scores count as lowest); ``evals`` as
    :func:`mean_evals` returns."""
    def score(v) -> float:
        return -math.inf if v is None or math.isnan(v) else v
    order = list(evals)
    return max(order, key=lambda m: (score(evals[m]["attack"].get("dice")), score(evals[m]["clean"].get("dice")),
                                     -order.index(m)))


def champion_line(name: str, registered: str, version: str | int, alias: str, seed: int,
                  labels: dict[str, str] = MODEL_LABELS) -> str:
    return (f"Champion: {labels.get(name, name)}, the weights of seed {seed} registered as {registered} "
            f"version {version} with the alias '{alias}' (criterion: {CHAMPION_CRITERION}).")


def per_class_rows(evals: dict[str, dict]) -> list[dict]:
    """Long table of per-class Dice for `dvc plots`: one row per (model, class) with a
    score clean and under attack (means over seeds); classes without a score are left out."""
    rows = []
    for m, e in evals.items():
        for c in CLASS_NAMES:
            clean, attack = e["clean"].get(f"dice/{c}", math.nan), e["attack"].get(f"dice/{c}", math.nan)
            if not (math.isnan(clean) or math.isnan(attack)):
                rows.append({"label": f"{m} {c}", "model": m, "class": c, "clean_dice": round(clean, 6),
                             "attack_dice": round(attack, 6)})
    return rows


def baselines_note(adv: AdversarialParams) -> str:
    """The report's line on the baselines: what pgdat and trades are, with their settings."""
    return ("Adversarial-training baselines, trained on the clean set for "
            f"{adv.epochs} epochs: " + "; ".join(f"{b} = {baseline_label(b, adv)}" for b in BASELINES)
            + f" (inner step {adv.step_size:g}/255; TRADES' start N(0, {adv.trades_start:g}^2)).")


def table_titles(attack: str, n_seeds: int, split: str | None = None) -> tuple[str, str]:
    """Titles of Table 1 and Table 2; ``attack`` as :func:`attack_name` names it, ``split``
    the data and protocol of the test split as mlsys.data.describe_split words it."""
    over = f"mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''}"
    if not split:
        return f"Table 1: clean test split ({over})", f"Table 2: under attack ({attack}; {over})"
    return (f"Table 1: clean test split of {split} ({over})",
            f"Table 2: under attack ({attack}; test split of {split}; {over})")


# --------------------------------------------------------------------------- findings
FINDING_METRICS = (("dice", "Dice"), ("accuracy", "accuracy"))  # what the findings state, higher is better
FINDINGS_NOTE = ("Paired differences over the seeds (same seed; higher is better): mean [95% t-interval]. "
                 "A model is called better or worse only where the interval excludes 0. A call whose interval "
                 "ends near 0 may flip on a re-run with another float order: on the default, 16 of 110 did at "
                 "five seeds (docs/reproducibility.md); the effect and its interval are what carry over. The "
                 "answer to the paper's question comes first; the tables below hold every number.")


def side(row: dict) -> str:
    """A paired difference's conclusion: "better" or "worse" where its 95% interval excludes 0,
    else "no conclusion" (within the interval, one seed, or no score)."""
    lo, hi = row["lo"], row["hi"]
    return "better" if lo > 0 else "worse" if hi < 0 else "no conclusion"  # NaN compares False


def verdict(row: dict) -> str:
    """One paired difference in words: "+0.031 [+0.004, +0.058], better beyond the 95% interval"."""
    mean, lo, hi = row["mean"], row["lo"], row["hi"]
    if math.isnan(mean):
        return "n/a (no score)"
    if math.isnan(lo):
        return f"{mean:+.3f}, one seed: no interval, no conclusion"
    s = side(row)
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}], " + (f"{s} beyond the 95% interval" if s != "no conclusion"
                                                       else "within the interval: no conclusion")


def finding_sections(tabs: dict, labels: dict[str, str] = MODEL_LABELS) -> list[tuple[str, list[str]]]:
    """The report's answer as (heading, sentences), from the paired differences of ``tabs``
    (:func:`build_tables`; the worst case per radius from ``tabs["robust"]["paired"]``), in
    this order: the paper's question (one summary per baseline of the Dice of models 2-4 under
    its attack from model 1 and from PGD-AT, then each of them with Dice and accuracy), the
    baselines under the paper's attack, the clean test split, the transfer sets (differences
    from model 1 only), the field's worst case at each radius. Each sentence gives the mean
    difference, its 95% interval and its conclusion (:func:`verdict`); model 1 from PGD-AT is
    said once, as PGD-AT from model 1."""
    rows = list(tabs["paired"]) + list((tabs.get("robust") or {}).get("paired", []))
    by = {(r["model"], r.get("baseline", "model1"), r["split"], r["metric"]): r for r in rows}
    pairs = list(dict.fromkeys((r["model"], r.get("baseline", "model1")) for r in rows))
    pairs = sorted([(m, b) for m, b in pairs if not (m in PAIRED_BASELINES and (b, m) in pairs
                                                     and PAIRED_BASELINES.index(m) < PAIRED_BASELINES.index(b))],
                   key=lambda mb: (mb[0] not in MODELS, PAIRED_BASELINES.index(mb[1]), list(EXPERIMENT).index(mb[0])))
    asked = [(m, b) for m, b in pairs if m in MODELS]  # models 2-4 (the paper's models) from each baseline

    def name(m: str) -> str:
        return labels.get(m, m)

    def sentences(split: str, words: str, of: list[tuple[str, str]]) -> list[str]:
        out = []
        for m, b in of:
            said = [f"{w} {verdict(by[(m, b, split, k)])}" for k, w in FINDING_METRICS if (m, b, split, k) in by]
            if said:
                line = f"{name(m)} vs {name(b)}, {words}: " + "; ".join(said) + "."
                out.append(line[0].upper() + line[1:])
        return out

    question = []
    for b in dict.fromkeys(b for _, b in asked):
        diffs = [by[(m, b, "attack", "dice")] for m, bb in asked if bb == b and (m, b, "attack", "dice") in by]
        groups = {s: [name(r["model"]) for r in diffs if side(r) == s] for s in ("better", "worse", "no conclusion")}
        question.append(f"The paper's question, Dice under its attack, models 2-4 vs {name(b)}: "
                        + "; ".join(f"{s}{' beyond the 95% interval' if s != 'no conclusion' else ''}: "
                                    f"{', '.join(ms)}" for s, ms in groups.items() if ms) + ".")
    radii = list(dict.fromkeys(r["split"] for r in rows if r["split"].startswith("eps ")))
    sections = [("The paper's question: do models 2-4 resist its attack better than model 1 and than PGD-AT?",
                 question + sentences("attack", "under the paper's attack", asked)),
                ("The baselines under the paper's attack",
                 sentences("attack", "under the paper's attack", [mb for mb in pairs if mb not in asked])),
                ("Clean test split", sentences("clean", "clean", pairs)),
                *[(f"Transferred: the test split perturbed by {w} with model 1 (white-box for model 1)",
                   sentences(k, f"on the test split perturbed by {w} with model 1",
                             [mb for mb in pairs if mb[1] == "model1"]))
                  for k, w in TRANSFER_SPLITS.items()],
                *[(f"The field's worst case at {r}", sentences(r, f"worst case at {r}", pairs)) for r in radii]]
    return [(h, ss) for h, ss in sections if ss]


def findings(tabs: dict, labels: dict[str, str] = MODEL_LABELS) -> list[str]:
    """The sentences of :func:`finding_sections`, in order (metrics/report.json's "findings",
    MLflow's findings.md)."""
    return [x for _, ss in finding_sections(tabs, labels) for x in ss]


def findings_markdown(sections: list[tuple[str, list[str]]]) -> str:
    """The findings section of report.md (and MLflow's findings.md)."""
    parts = ["## Findings", "", FINDINGS_NOTE, ""]
    for heading, ss in sections:
        parts += [f"**{heading}**", "", *[f"- {x}" for x in ss], ""]
    return "\n".join(parts)


def markdown_report(tables: list[tuple[str, dict]], figures: list[tuple[str, str]],
                    notes: tuple[str, ...] = (), findings: list[tuple[str, list[str]]] = ()) -> str:
    """One page: the findings (:func:`finding_sections`), the notes, the titled tables (complete,
    however wide) and the figures (relative paths)."""
    parts = [f"# {TITLE}", "", *([findings_markdown(findings)] if findings else []), METRICS_NOTE, "",
             *[x for n in notes for x in (n, "")], *[x for title, t in tables for x in (to_markdown(t, title), "")]]
    for title, path in figures:
        parts += [f"## {title}", "", f"![{title}]({path})", ""]
    return "\n".join(parts)


PAGE_CHARS = 180  # the characters of table text a row of report.html may hold: fits a 1400-pixel window
KEY_COLUMNS = ("model", "from", "tissue")  # repeated in every part of a split table


def split_wide(t: dict[str, list], width: int = PAGE_CHARS) -> list[dict[str, list]]:
    """``t`` in parts of at most ``width`` characters a row (a column counts its longest cell or
    header, plus 2 for the padding), each part with the key columns (KEY_COLUMNS) first; one
    part where ``t`` fits, else parts of about equal width. A column wider than ``width`` on
    its own gets a part to itself."""
    def chars(c: str) -> int:
        return max([len(c), *(len(_fmt(v, 4)) for v in t[c])]) + 2

    def fill(room: int) -> list[list[str]]:  # left to right, a new part where the next column does not fit
        parts: list[list[str]] = [[]]
        used = 0
        for c in rest:
            if parts[-1] and used + chars(c) > room:
                parts.append([])
                used = 0
            parts[-1].append(c)
            used += chars(c)
        return parts

    keys = [c for c in t if c in KEY_COLUMNS]
    rest = [c for c in t if c not in keys]
    room = width - sum(chars(c) for c in keys)
    parts = fill(room)
    even = -(-sum(map(chars, rest)) // len(parts))  # the same number of parts, balanced
    while len(balanced := fill(even)) > len(parts):
        even += 1
    return [{c: t[c] for c in keys + p} for p in balanced]


def html_report(tables: list[tuple[str, dict]], figures: list[tuple[str, str]], folder,
                notes: tuple[str, ...] = (), findings: list[tuple[str, list[str]]] = ()) -> str:
    """The same page as one self-contained HTML file (figures embedded), which the MLflow
    artifact viewer renders. It opens on the findings (the paper's question shown, the rest
    folded in <details>); a table wider than a 1400-pixel window is split into parts
    (:func:`split_wide`, "part 1 of 2"), and every table sits in a horizontally scrollable
    container (class "table-scroll") in case a browser's font is wider."""
    import base64
    import html
    from pathlib import Path

    def tab(t: dict, title: str) -> str:
        cols = list(t)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v, 4))}</td>" for v in r) + "</tr>"
                       for r in zip(*(t[c] for c in cols)))
        return (f'<div class="table-scroll"><table><caption>{html.escape(title)}</caption><tr>{head}</tr>{body}'
                "</table></div>")

    def tabs(t: dict, title: str) -> list[str]:
        parts = split_wide(t)
        return [tab(p, title if len(parts) == 1 else f"{title} (part {i} of {len(parts)})")
                for i, p in enumerate(parts, 1)]

    def items(ss: list[str]) -> str:
        return f"<ul>{''.join(f'<li>{html.escape(x)}</li>' for x in ss)}</ul>"

    # the answer to the paper's question open; the other findings one click away, to keep the top short
    found = ([f"<h2>Findings</h2><p>{html.escape(FINDINGS_NOTE)}</p>",
              f"<h3>{html.escape(findings[0][0])}</h3>{items(findings[0][1])}",
              *[f"<details><summary><b>{html.escape(h)}</b> ({len(ss)} comparisons)</summary>{items(ss)}</details>"
                for h, ss in findings[1:]]] if findings else [])
    parts = [f"<h1>{html.escape(TITLE)}</h1>", *found, f"<p>{html.escape(METRICS_NOTE)}</p>",
             *[f"<p><b>{html.escape(n)}</b></p>" for n in notes],
             *[x for title, t in tables for x in tabs(t, title)]]
    for title, path in figures:
        data = base64.b64encode((Path(folder) / path).read_bytes()).decode()
        parts += [f"<h2>{html.escape(title)}</h2>",
                  f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">']
    style = ("body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;"
             "margin:1em 0;font-size:13px}caption{font-weight:bold;text-align:left;padding:4px 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}img{max-width:100%}"
             ".table-scroll{max-width:100%;overflow-x:auto}li{margin:0.2em 0}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(TITLE)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


# --------------------------------------------------------------------------- the report stage
def read_evals(seeds: list[int]) -> dict[int, dict[str, dict]]:
    """Every evaluation JSON of the pipeline: {seed: {model: metrics}}."""
    import json
    from pathlib import Path

    from . import paths
    from .files import require

    out = {}
    for seed in seeds:
        out[seed] = {}
        for m in EXPERIMENT:
            path = paths.eval_metrics(m, seed)
            require(path, paths.stage_name("evaluate", m, seed))
            out[seed][m] = json.loads(Path(path).read_text())
    return out


def build_tables(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Everything the report shows, as tables: means and stds of Tables 1-2, their per-seed
    rows, the paired differences (see the module docstring) and the robustness view
    (:func:`build_robust`, None without the protocol)."""
    out = {}
    for name, key in (("table1", "clean"), ("table2", "attack")):
        mean, std = over_seeds([table({m: e[key] for m, e in evals.items()}) for evals in per_seed.values()])
        out[name], out[f"{name}_std"], out[f"{name}_seeds"] = mean, std, per_seed_table(per_seed, key)
    splits = ("clean", "attack", *(TRANSFER_SPLITS if has_transfer(per_seed) else ()))
    out["paired"] = [r for b in PAIRED_BASELINES if b in models_of(per_seed)
                     for r in paired_differences(per_seed, b, splits)]
    out["robust"] = build_robust(per_seed)
    out["cross"] = build_cross(per_seed)
    return out


def summary(per_seed: dict[int, dict[str, dict]], tabs: dict) -> dict:
    """The numbers of metrics/report.json (`dvc metrics show`, `dvc exp show`): per model the
    mean and std over seeds of accuracy, Dice and paper Dice, clean and attacked, the
    paired differences with their intervals: "paired" from model 1, "paired_pgdat" from PGD-AT,
    and the report's "findings" in sentences (:func:`findings`)."""
    out: dict = {"seeds": list(per_seed)}
    for name, key in (("table1", "clean"), ("table2", "attack")):
        for i, m in enumerate(tabs[name]["model"]):
            for metric in PAIRED:
                out.setdefault(key, {}).setdefault(m, {})[metric] = {
                    "mean": _num(tabs[name][metric][i]), "std": _num(tabs[f"{name}_std"][metric][i])}
    for r in tabs["paired"]:
        key = "paired" if r.get("baseline", "model1") == "model1" else f"paired_{r['baseline']}"
        out.setdefault(key, {}).setdefault(r["model"], {})[f"{r['split']}_{r['metric']}"] = {
            "mean": _num(r["mean"]), "lo": _num(r["lo"]), "hi": _num(r["hi"])}
    if tabs.get("robust") is not None:
        out["robust"] = robust_summary(tabs["robust"])
    out["findings"] = findings(tabs)
    return out


def _num(v: float) -> float | None:
    return None if v is None or math.isnan(v) else round(float(v), 6)


def main(p) -> None:
    """DVC stage ``report``: ``reports/`` (the findings, Tables 1-2 with mean +- std over ``seeds``,
    per-seed rows, paired differences, figures, report.md/html), ``metrics/report.json``,
    ``plots/report/*.csv``, one MLflow run (also on the pipeline run) and the champion in
    the MLflow model registry."""
    import mlflow

    from . import data, files, paths, tracking

    seeds = list(p.seeds)
    per_seed = read_evals(seeds)
    attack = attack_name(next(iter(per_seed[seeds[0]].values()))["attack_settings"])
    tabs = build_tables(per_seed)
    means = mean_evals(per_seed)
    # which data and protocol produced every number: said in the header and the table titles
    split = data.describe_split(data.read_attrs(paths.CLEAN))
    labels = model_labels(p.adversarial)
    shown = shown_tables(tabs, table_titles(attack, len(seeds), split), labels, attack)
    machines = sorted({e.get("machine", "unknown") for evals in per_seed.values() for e in evals.values()})
    notes = [f"Data: {split}.", f"Seeds: {', '.join(map(str, seeds))}. Machine: {'; '.join(machines)}. "
             "Reproducibility: CPU results are bit-identical only on the same CPU model with the same thread count.",
             baselines_note(p.adversarial)]
    # reports/ is a DVC out dir written file by file: build it beside and rename it when complete
    with tracking.stage_run(paths.stage_name("report"), {"seeds": ",".join(map(str, seeds))}, p.tracking.experiment,
                            {"mlsys.stage": "report"}) as run, files.atomic_dir(paths.REPORT) as out:
        write_tables(out, tabs, shown)
        figs = draw_figures(out, p, tabs, means, models_of(per_seed), labels, seeds, attack)
        # "data_split", not "data": `dvc exp show` nests every metrics file under a "data" key
        result = {**summary(per_seed, tabs), "data_split": split, "machine": machines,
                  "mlflow": {"pipeline_run_id": run.data.tags.get("mlflow.parentRunId", ""),
                             "report_run_id": run.info.run_id}}
        mlflow.log_metrics({f"{key}/{m}/{metric}_{stat}": v for key in ("clean", "attack")
                            for m, ms in result[key].items() for metric, st in ms.items()
                            for stat, v in st.items() if v is not None})
        mlflow.log_metrics({f"robust/{m}/{r}/{metric}_{stat}": v for m, per_r in result.get("robust", {}).items()
                            for r, ms in per_r.items() for metric, st in ms.items()
                            for stat, v in st.items() if v is not None})
        if p.tracking.log_model:  # the champion joins the model registry
            result["champion"] = champion_to_registry(means, seeds[0], p)
            notes.append(champion_line(result["champion"]["model"], result["champion"]["registered_model"],
                                       result["champion"]["version"], tracking.CHAMPION_ALIAS, seeds[0], labels))
            print(notes[-1])
        files.write_json(paths.REPORT_METRICS, result)
        sections = finding_sections(tabs)
        (out / "report.md").write_text(markdown_report(shown, figs, tuple(notes), sections))
        (out / "report.html").write_text(html_report(shown, figs, out, tuple(notes), sections))
        mlflow.log_artifacts(str(out), "report")
        mlflow.log_text(findings_markdown(sections), "findings.md")
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent:  # the pipeline run carries the report too, where users look first
            mlflow.MlflowClient().log_artifacts(parent, str(out), "report")
            mlflow.MlflowClient().log_text(parent, findings_markdown(sections), "findings.md")
        for title, t in shown[:3]:
            print(to_markdown(t, title))
        print(findings_markdown(sections[:1]))  # the answer to the paper's question, last on the terminal


def shown_tables(tabs: dict, titles: tuple[str, str], labels: dict[str, str],
                 attack: str = "the evaluation attack") -> list[tuple[str, dict]]:
    """The tables of the pages, titled, in order: Tables 1-2 (mean +- std), the paired
    differences, the robustness tables and the per-tissue one (where evaluated), the
    cross-evaluation (where the transfer sets were evaluated; ``attack`` names the paper's
    attack in its title), the per-seed rows; the baselines named by their labels."""
    shown = [(titles[0], labelled(mean_std_table(tabs["table1"], tabs["table1_std"]), labels)),
             (titles[1], labelled(mean_std_table(tabs["table2"], tabs["table2_std"]), labels)),
             (PAIRED_NOTE, labelled(paired_table(tabs["paired"]), labels, ("model", "from"))),
             ("Table 1 per seed", tabs["table1_seeds"]), ("Table 2 per seed", tabs["table2_seeds"])]
    rob = tabs["robust"]
    if rob is not None:  # after Tables 1-2 and the paired differences, before the per-seed rows
        rtitles = robust_titles(rob)
        shown[3:3] = [*[(title, labelled(mean_std_table(rob["table"], rob["table_std"], robust_columns(rob["radii"], ms)),
                                         labels)) for title, ms in zip(rtitles, ROBUST_SHOWN)],
                      (rtitles[2], rob["tissue"])]
    cross = tabs.get("cross")
    if cross is not None:  # just before the per-seed rows
        title = CROSS_NOTE.format(n=cross["n_seeds"], attack=attack, protocol=protocol_names(rob) if rob else "not run")
        shown.insert(len(shown) - 2, (title, labelled(cross_shown(cross), labels)))
    return shown


PAIRED_COLUMNS = ("model", "baseline", "split", "metric", "mean", "std", "lo", "hi", "n_seeds")


def write_tables(out, tabs: dict, shown: list[tuple[str, dict]]) -> None:
    """Every table into ``out`` (CSV whole, Markdown as shown) and into the MLflow run."""
    import mlflow

    for name in ("table1", "table1_std", "table1_seeds", "table2", "table2_std", "table2_seeds"):
        (out / f"{name}.csv").write_text(to_csv(tabs[name]))
        mlflow.log_table(tabs[name], f"tables/{name}.json")
    paired_cols = {k: [r[k] for r in tabs["paired"]] for k in PAIRED_COLUMNS}
    (out / "paired.csv").write_text(to_csv(paired_cols))
    mlflow.log_table(paired_cols, "tables/paired.json")
    for (title, t), name in zip(shown[:2], ("table1", "table2")):
        (out / f"{name}.md").write_text(to_markdown(t, title))
    (out / "paired.md").write_text(to_markdown(shown[2][1], shown[2][0]))
    rob = tabs["robust"]
    if rob is not None:
        robust_paired_cols = {k: [r[k] for r in rob["paired"]] for k in PAIRED_COLUMNS}
        for name, t in (("robust", rob["table"]), ("robust_std", rob["table_std"]), ("tissue", rob["tissue"]),
                        ("robust_paired", robust_paired_cols)):
            (out / f"{name}.csv").write_text(to_csv(t))
            mlflow.log_table(t, f"tables/{name}.json")
        for (title, t), name in zip(shown[3:6], ("robust", "robust_miou", "tissue")):
            (out / f"{name}.md").write_text(to_markdown(t, title))
    cross = tabs.get("cross")
    if cross is not None:  # the shown table is the one before the per-seed rows
        for name in ("table", "table_std"):
            (out / f"cross{name[5:]}.csv").write_text(to_csv(cross[name]))
            mlflow.log_table(cross[name], f"tables/cross{name[5:]}.json")
        (out / "cross.md").write_text(to_markdown(shown[-3][1], shown[-3][0]))


def draw_figures(out, p, tabs: dict, means: dict, models: list[str], labels: dict[str, str], seeds: list[int],
                 attack: str) -> list[tuple[str, str]]:
    """The report's figures into ``out/figures`` and the `dvc plots` CSVs into plots/report;
    returns (title, relative path) of each figure, in page order."""
    import csv
    import shutil
    from pathlib import Path

    import torch

    from . import data, figures, files, paths
    from .metrics import predict
    from .weights import load_weights

    (out / "figures").mkdir(parents=True, exist_ok=True)
    figs: list[tuple[str, str]] = []
    histories = {m: [] for m in models}
    for m in models:
        for seed in seeds:
            with open(paths.train_plot(m, seed)) as f:
                histories[m].append([{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)])
    figures.save(figures.loss_bands(histories, f"validation loss of the models (band: lowest to highest "
                                               f"of {len(seeds)} seeds)"), out / "figures/validation_loss.png")
    figs.append(("Validation loss", "figures/validation_loss.png"))
    figures.save(figures.metric_bars(tabs["table1"], tabs["table2"], std1=tabs["table1_std"],
                                     std2=tabs["table2_std"],
                                     title=f"clean test split vs {attack} (mean ± std, {len(seeds)} seeds)"),
                 out / "figures/clean_vs_attack.png")
    figs.append(("Clean vs attacked", "figures/clean_vs_attack.png"))
    figures.save(figures.per_class_bars(tabs["table1"], tabs["table2"], std1=tabs["table1_std"],
                                        std2=tabs["table2_std"]), out / "figures/per_class_dice.png")
    figs.append(("Per-class Dice", "figures/per_class_dice.png"))
    files.write_csv(f"{paths.REPORT_PLOTS}/per_class_dice.csv", per_class_rows(means))
    rob = tabs["robust"]
    if rob is not None:
        figures.save(figures.robust_radius(robust_radius_rows(rob), rob["table"]["model"],
                                           f"worst case of {protocol_names(rob)} against the L-inf radius "
                                           f"(mean ± std, {len(seeds)} seeds)"), out / "figures/robust_radius.png")
        figs.append(("Robustness against the radius", "figures/robust_radius.png"))
        figures.save(figures.robust_steps(rob["curves"], f"Dice along the attacks at eps {rob['top']}/255 "
                                                         f"(mean; band: lowest to highest of {len(seeds)} seeds)",
                                          rob["labels"]), out / "figures/robust_steps.png")
        figs.append(("Robustness along the attack steps", "figures/robust_steps.png"))
        files.write_csv(f"{paths.REPORT_PLOTS}/robust_radius.csv", robust_radius_rows(rob))
        files.write_csv(f"{paths.REPORT_PLOTS}/robust_steps.csv", robust_steps_rows(rob))
    cross = tabs.get("cross")
    if cross is not None:
        figures.save(figures.cross_heatmap(cross["table"], cross["table_std"], cross["columns"],
                                           [labels.get(m, m) for m in cross["table"]["model"]],
                                           f"Cross-evaluation: Dice of each model (rows) against each perturbation "
                                           f"(mean ± std, {len(seeds)} seeds)"), out / "figures/cross_evaluation.png")
        figs.append(("Cross-evaluation", "figures/cross_evaluation.png"))
    for m, runs in histories.items():  # `dvc plots`: the mean curve over seeds of each model
        n = min(len(r) for r in runs)
        files.write_csv(f"{paths.REPORT_PLOTS}/{m}_loss.csv", [
            {"epoch": e, **{k: float(np.mean([r[e][k] for r in runs])) for k in ("train_loss", "valid_loss")}}
            for e in range(n)])
    first = seeds[0]
    for m in models:
        shutil.copy(Path(paths.eval_figures(m, first)) / "attack_panel.png", out / f"figures/{m}_attack_panel.png")
        figs.append((f"{labels[m]} under attack (seed {first})", f"figures/{m}_attack_panel.png"))
    model1 = load_weights(paths.weights("model1", first), p.model).eval()
    clean, _ = data.head(paths.CLEAN, "train", p.evaluate.n_panel)
    for method in ("method1", "method2"):
        pert, masks = data.head(paths.dataset(method, first), "train", p.evaluate.n_panel)
        logits = predict(model1, pert, len(pert), torch.device("cpu"))
        fig = figures.perturbation_panel(clean, pert, masks, logits,
                                         f"{method} training images (seed {first}; prediction: model 1)")
        figures.save(fig, out / f"figures/{method}_perturbation.png")
        figs.append((f"{method} perturbations", f"figures/{method}_perturbation.png"))
    return figs


def champion_to_registry(means: dict[str, dict], seed: int, p) -> dict:
    """Register the best of the models, baselines included (CHAMPION_CRITERION, on the means over seeds),
    its weights of ``seed``, as the ``champion`` of the MLflow registered model; returns
    what metrics/report.json says about it."""
    import os

    import mlflow

    from . import data, paths, tracking
    from .weights import load_weights

    best = champion(means)
    weights = paths.weights(best, seed)
    dice = {k: means[best][k]["dice"] for k in ("clean", "attack")}
    tags = {"mlsys.criterion": CHAMPION_CRITERION, "dvc.experiment": os.environ.get("DVC_EXP_NAME", "workspace"),
            "mlsys.seed": str(seed), "clean/dice": f"{dice['clean']:.6g}", "attack/dice": f"{dice['attack']:.6g}"}

    def log_model():  # where the store has no training run of these weights
        return tracking.log_model(load_weights(weights, p.model).eval(), data.head(paths.CLEAN, "test", 2)[0])

    version = tracking.register_champion(best, weights, log_model, tags)
    mlflow.set_tags({"mlsys.champion": best, "mlsys.champion_version": version.version})
    return {"model": best, "seed": seed, "registered_model": version.name, "version": int(version.version),
            "attack_dice": dice["attack"], "clean_dice": dice["clean"]}


# --------------------------------------------------------------------------- mlsys compare
def compare(p, parent: str | None = None) -> str:
    """The data and protocol line, Tables 1-2 (mean +- std over seeds), the paired differences
    and the cross-evaluation (where the runs have it) from the MLflow runs of the latest
    pipeline (or ``parent``), as Markdown; stages that pipeline took from the
    DVC cache are filled in by the latest finished run of the same model and seed."""
    from mlflow.tracking import MlflowClient

    from . import tracking

    exp_id = tracking.setup(p.tracking.experiment)
    client = MlflowClient()
    if parent is None:
        found = client.search_runs([exp_id], "tags.`mlsys.kind` = 'pipeline'", max_results=1,
                                   order_by=["attributes.start_time DESC"])
        parent = found[0].info.run_id if found else None
    flt = "attributes.status = 'FINISHED' and tags.`mlsys.stage` = 'evaluate'"
    runs = client.search_runs([exp_id], flt, order_by=["attributes.start_time DESC"], max_results=5000)
    runs.sort(key=lambda r: r.data.tags.get("mlflow.parentRunId") != parent)  # the pipeline's own runs first
    latest = {}
    for r in runs:
        seed = r.data.tags.get("mlsys.seed")
        if seed is not None and int(seed) in p.seeds:
            latest.setdefault((r.data.tags.get("mlsys.model"), int(seed)), r)
    missing = [f"{m} seed {s}" for s in p.seeds for m in EXPERIMENT if (m, s) not in latest]
    if len(missing) == len(EXPERIMENT) * len(p.seeds):
        raise ConnectionError(f"no finished evaluate runs in experiment {p.tracking.experiment!r} "
                              f"at {tracking.redact(tracking.tracking_uri())}; run `dvc repro` first")
    seeds = [s for s in p.seeds if all((m, s) in latest for m in MODELS)]
    # the baselines where every such seed has them (runs of a pipeline before them: the four only)
    models = [*MODELS, *(b for b in BASELINES if all((b, s) in latest for s in seeds))]
    per_seed = {}
    for s in seeds:
        per_seed[s] = {}
        for m in models:
            r = latest[(m, s)]
            met, prm = r.data.metrics, r.data.params
            per_seed[s][m] = {key: {k[len(key) + 1:]: v for k, v in met.items() if k.startswith(f"{key}/")}
                              for key in ("clean", "attack", *TRANSFER_SPLITS)}
            per_seed[s][m]["attack_settings"] = {k: prm.get(f"evaluate.attack.{k}") for k in
                                                 ("mode", "steps", "eps", "alpha", "target")}
            for key in TRANSFER_SPLITS:  # runs of a pipeline before the transfer sets: no cross-evaluation
                if not per_seed[s][m][key]:
                    del per_seed[s][m][key]
    tabs = build_tables(per_seed)
    attack = attack_name(next(iter(per_seed.values()))["model1"]["attack_settings"])
    # which data and protocol produced the numbers, as the evaluate runs recorded it (older runs: unsaid)
    splits = sorted({latest[(m, s)].data.tags.get("mlsys.data_split", "") for s in per_seed for m in models} - {""})
    split = "; ".join(splits) or None
    titles = table_titles(attack, len(per_seed), split)
    lines = [f"runs: {len(latest)} evaluations of seeds {', '.join(map(str, per_seed))}"
             + (f" (missing: {', '.join(missing)})" if missing else ""),
             f"Data: {split or 'not recorded by these runs'}."]
    labels = model_labels(p.adversarial)
    shown = [(titles[0], labelled(mean_std_table(tabs["table1"], tabs["table1_std"]), labels)),
             (titles[1], labelled(mean_std_table(tabs["table2"], tabs["table2_std"]), labels)),
             ("Paired differences from model 1 and from PGD-AT",
              labelled(paired_table(tabs["paired"]), labels, ("model", "from")))]
    if tabs["cross"] is not None:
        shown.append((CROSS_NOTE.format(n=len(per_seed), attack=attack, protocol="not shown here"),
                       labelled(cross_shown(tabs["cross"]), labels)))
    lines += [to_markdown(t, title) for title, t in shown]
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    """``python -m mlsys.report``: the stage as DVC runs it."""
    ap = entry.parser("python -m mlsys.report", "Write Tables 1 and 2 and the figures to reports/ (DVC stage report).")
    return entry.main("mlsys report", "mlsys.report", ap, lambda a, p: main(p), argv)


if __name__ == "__main__":
    entry.finish(cli())
