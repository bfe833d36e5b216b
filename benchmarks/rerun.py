"""Do the findings survive a re-run? Two reports' findings side by side, conclusion by conclusion.

    python benchmarks/rerun.py A/metrics/report.json B/metrics/report.json
    python benchmarks/rerun.py A.json B.json --names "default" "channels-last off, bf16 screen" \
        --json benchmarks/results/rerun_<n>seeds_<cpu>.json

A finding is one sentence of a report's "findings" (mlsys.report.findings): a comparison
("Model 2 (method1) vs model 1 (clean), under the paper's attack") and, per metric, its paired
difference with a 95% interval and a conclusion: "better" or "worse" beyond the interval, or
"no conclusion". This script matches the two reports' comparisons and metrics and says, for
each, whether the conclusion is the same. A finding that "survives" reads the same in both;
one whose conclusion flips (better or worse in one, no conclusion or the opposite in the
other) does not. The summary lines give the counts and list every flip, with both effects and
the number of seeds at which each run's effect would clear its 95% interval, if the mean and
the spread over seeds stayed as measured (the t-interval's half-width t(0.975, n-1) sd / sqrt(n)
below |mean|): a rough guide for choosing `seeds`, not a power analysis.

Typical use (issue: conclusions that flip between machines): run the default, then the same
experiment with another float order and precision (e.g. `channels_last: false` everywhere,
method two's bf16 screen forced on, another thread count) in a second checkout, and compare.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

# "<metric> <effect>, <conclusion words>" inside a finding; effect: "+0.031 [+0.004, +0.058]",
# "+0.031, one seed: no interval" or "n/a (no score)"
PART = re.compile(r"(?P<metric>\w+) (?P<effect>n/a \(no score\)|[+-]\d\.\d+(?: \[[^\]]*\])?(?:, one seed: no interval)?)"
                  r"(?:, (?P<words>better beyond the 95% interval|worse beyond the 95% interval|"
                  r"within the interval: no conclusion|no conclusion))?")


def seeds_to_resolve(effect: str, n: int, most: int = 50) -> int | None:
    """The smallest number of seeds m (2 <= m <= most) at which an effect "+0.031 [+0.004,
    +0.058]" measured over n seeds would have a 95% t-interval excluding 0, its mean and
    per-seed sd as measured; None where no interval was given or m > most."""
    from scipy import stats

    nums = [float(v) for v in re.findall(r"[+-]\d\.\d+", effect)]
    if len(nums) != 3 or n < 2:
        return None
    mean, lo, hi = nums
    sd = (hi - lo) / 2 * math.sqrt(n) / stats.t.ppf(0.975, n - 1)
    if sd == 0:
        return n if mean else None
    return next((m for m in range(2, most + 1) if stats.t.ppf(0.975, m - 1) * sd / math.sqrt(m) < abs(mean)), None)


def conclusion(words: str | None) -> str:
    """The conclusion of a finding's part: "better", "worse" or "no conclusion"."""
    if words and words.startswith(("better", "worse")):
        return words.split()[0]
    return "no conclusion"


def parse(findings: list[str]) -> dict[tuple[str, str], tuple[str, str]]:
    """{(comparison, metric): (effect, conclusion)} of a report's findings; the summary
    sentences of the paper's question (no effects) are left out: their parts are the
    per-model findings after them."""
    out = {}
    for sentence in findings:
        if sentence.startswith("The paper's question"):
            continue
        head, _, rest = sentence.partition(": ")
        for part in rest.rstrip(".").split("; "):
            m = PART.fullmatch(part.strip())
            if m is None:
                raise ValueError(f"cannot read the finding part {part!r} of {sentence!r}")
            out[(head, m["metric"])] = (m["effect"], conclusion(m["words"]))
    return out


def compare(a: list[str], b: list[str], n_a: int = 0, n_b: int = 0) -> dict:
    """The two reports' findings matched: rows (comparison, metric, effect and conclusion in
    each, same or not, and for a flip the seeds each effect would need: ``seeds_to_resolve``
    with the runs' seed counts ``n_a``, ``n_b``) and counts; comparisons only one report makes
    are listed apart."""
    pa, pb = parse(a), parse(b)
    rows = [{"comparison": k[0], "metric": k[1], "a": pa[k][0], "a_conclusion": pa[k][1],
             "b": pb[k][0], "b_conclusion": pb[k][1], "same": pa[k][1] == pb[k][1]}
            for k in pa if k in pb]
    for r in rows:
        if not r["same"]:
            r["seeds_needed"] = [seeds_to_resolve(r["a"], n_a), seeds_to_resolve(r["b"], n_b)]
    resolved = [r for r in rows if r["a_conclusion"] != "no conclusion" or r["b_conclusion"] != "no conclusion"]
    return {"rows": rows, "only_a": [" / ".join(k) for k in pa if k not in pb],
            "only_b": [" / ".join(k) for k in pb if k not in pa],
            "counts": {"findings": len(rows), "same": sum(r["same"] for r in rows),
                       "flipped": sum(not r["same"] for r in rows),
                       "resolved_in_either": len(resolved),
                       "resolved_in_both_alike": sum(r["same"] for r in resolved)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="the first run's metrics/report.json")
    ap.add_argument("b", type=Path, help="the second run's metrics/report.json")
    ap.add_argument("--names", nargs=2, default=["A", "B"], metavar=("A", "B"), help="what each run was")
    ap.add_argument("--json", type=Path, help="also write the comparison here")
    args = ap.parse_args(argv)
    reports, seeds = [], []
    for path in (args.a, args.b):
        try:
            report = json.loads(path.read_text())
            reports.append(report["findings"])
            seeds.append(len(report.get("seeds", [])))
        except (OSError, ValueError, KeyError) as err:
            print(f"rerun: error: {path} is no report with findings ({type(err).__name__}: {err})", file=sys.stderr)
            return 2
    try:
        res = compare(*reports, *seeds)
    except ValueError as err:
        print(f"rerun: error: {err}", file=sys.stderr)
        return 2
    c = res["counts"]
    print(f"A = {args.names[0]} ({args.a}, {seeds[0]} seeds)\nB = {args.names[1]} ({args.b}, {seeds[1]} seeds)")
    print(f"{c['findings']} findings in both: {c['same']} read the same, {c['flipped']} flipped; "
          f"{c['resolved_in_either']} resolved (better or worse) in either run, "
          f"{c['resolved_in_both_alike']} of them alike in both")
    for r in res["rows"]:
        mark = "same   " if r["same"] else "FLIPPED"
        if not r["same"] or r["a_conclusion"] != "no conclusion":
            need = "" if r["same"] else "; seeds to clear the interval, as measured: " + ", ".join(
                f"{side} {m or 'over 50'}" for side, m in zip("AB", r["seeds_needed"]))
            print(f"{mark} {r['comparison']} / {r['metric']}: A {r['a']} ({r['a_conclusion']}); "
                  f"B {r['b']} ({r['b_conclusion']}){need}")
    for side, keys in (("A", res["only_a"]), ("B", res["only_b"])):
        if keys:
            print(f"only in {side}: {len(keys)} ({'; '.join(keys[:3])}{' ...' if len(keys) > 3 else ''})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"a": {"name": args.names[0], "path": str(args.a)},
                                         "b": {"name": args.names[1], "path": str(args.b)}, **res}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
