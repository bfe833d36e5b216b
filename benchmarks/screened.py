"""The screened method two against the exact search, on trained models: how often is the
screened winner the exact optimum, by how much does its score miss, how much faster.

    OMP_NUM_THREADS=2 python benchmarks/screened.py --data data/clean.h5 \
        --weights models/seed0/model1.pt models/seed1/model1.pt models/seed2/model1.pt
    python benchmarks/screened.py --images 60     # trains one U-Net on the default data first

With --weights, the pipeline's own models (params.yaml's model section) on the training
split of --data, the images method two augments; without, the default synthetic data is
built the way `mlsys prepare` builds it in a temporary folder and one U-Net is trained
with the default training settings (mlsys.train.train_model). For each model and image:
  exact          all 3^C candidates scored in fp32 (the paper's search; the reference);
  screened       the library's local search (mlsys.method2.screened_scores) for each
                 screen_k of --ks: one-sign neighbours of a centre, a separable guess of
                 every candidate's logits, the best-guessed scored, the best scored the
                 next centre;
  first-order*   (not in the library: the earlier proposal it replaced) the k best of
                 score(x) + <grad_x score(x), x_s - x> from one forward + backward at x;
  amp            all candidates scored in bf16 autocast, the fp32 winner among the best
                 exact_top of them (the `amp` fast path of the exact search).
Accuracy is read from each image's exact table; the timed searches are the library's
own (mlsys.method2.search_image), checked against that table first (validate, then time).
Cost is counted in forward passes (a backward counts as two) and timed per image
(perf_counter, the fastest of three runs; CPU threads as set). Imports neither mlflow nor dvc.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from mlsys import data, method2, ops, prepare  # noqa: E402
from mlsys.method2 import class_directions, screened_scores, search_image  # noqa: E402
from mlsys.model import build_model  # noqa: E402
from mlsys.params import DataParams, ModelParams, TrainParams, load_params  # noqa: E402
from mlsys.train import train_model  # noqa: E402
from mlsys.weights import load_weights

ROOT = Path(__file__).resolve().parent.parent


def trained_model(epochs: int, seed: int):
    """(model in eval mode, training images, masks) on the default synthetic data."""
    with tempfile.TemporaryDirectory() as tmp:
        prepare.prepare(DataParams(), Path(tmp) / "clean.h5", progress=False)
        train = data.load_split(Path(tmp) / "clean.h5", "train")
        valid = data.load_split(Path(tmp) / "clean.h5", "valid")
    torch.manual_seed(seed)
    model = build_model(ModelParams())
    train_model(model, train, valid, TrainParams(epochs=epochs), epochs, progress=False)
    return model.eval(), train[0], train[1]


def first_order_scores(model, x, dirs, mask, chunk: int = 243) -> torch.Tensor:
    """The replaced proposal: score(x_s) ~ score(x) + <grad_x score(x), x_s - x> (L1 score)
    for every candidate, from one fp32 forward + backward at x. Returns (3^C,)."""
    xg = x.detach().float()[None].requires_grad_(True)
    with torch.enable_grad():
        s0 = ops.score_ref(model(xg), mask, "l1")[0][0]
        (g,) = torch.autograd.grad(s0, xg)
    total = 3 ** dirs.shape[0]
    steps = [(ops.candidates(x, dirs, s, min(chunk, total - s)) - x).flatten(1) @ g.flatten()
             for s in range(0, total, chunk)]
    return s0.detach() + torch.cat(steps)


def timed(fn, reps: int = 3) -> float:
    """Fewest seconds of ``reps`` calls after one warm-up (the least disturbed run on a
    shared machine)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(model, x, y, ks: list[int], exact_tops: list[int], eps: float, time_images: int) -> list[dict]:
    """Rows (search, k, per-image exact flags, gaps, forwards, ms per image) of one model."""
    dirs = class_directions(model, x, eps)
    C = dirs.shape[1]
    total = 3**C
    with torch.no_grad():
        exact = torch.stack([method2._scores(model, x[i], dirs[i], y[i], None, "l1", "argmin", 243, False, False)
                             for i in range(len(x))])
        bf16 = torch.stack([method2._scores(model, x[i], dirs[i], y[i], None, "l1", "argmin", 243, True, False)
                            for i in range(len(x))])
    first = torch.stack([first_order_scores(model, x[i], dirs[i], y[i]) for i in range(len(x))])
    best = exact.min(1).values

    def per_image(**kw) -> tuple[float, list[tuple[int, float]]]:
        picks: list[tuple[int, float]] = []

        def run():
            picks.clear()
            picks.extend(search_image(model, x[i], dirs[i], y[i], **kw) for i in range(time_images))
        return timed(run) / time_images * 1e3, list(picks)

    def row(search, k, got, forwards, ms):
        gap = got - best
        return {"search": search, "k": k, "exact": (gap <= 1e-7).tolist(), "gap": gap.tolist(),
                "forwards": forwards, "ms_per_image": ms}

    ms, picks = per_image()
    for i, (_, value) in enumerate(picks):  # validate: the library's exact search is the table's
        assert abs(value - float(best[i])) <= 1e-6, f"image {i}: exact search {value} != table {best[i]}"
    rows = [row("exact fp32", total, best, [total] * len(x), ms)]
    for k in ks:
        found, counts = [], []
        for i in range(len(x)):
            s = screened_scores(model, x[i], dirs[i], y[i], "l1", "argmin", 243, screen_k=k)
            j = int(s.argmin())
            assert abs(float(s[j]) - float(exact[i, j])) <= 1e-6, f"k={k}, image {i}: not the table's score"
            found.append(float(exact[i, j]))
            counts.append(int(s.isfinite().sum()))
        ms, picks = per_image(search="screened", screen_k=k)
        for i, (_, value) in enumerate(picks):
            assert abs(value - found[i]) <= 1e-6, f"k={k}, image {i}: search {value} != {found[i]}"
        rows.append(row("screened", k, torch.tensor(found, dtype=exact.dtype), counts, ms))
    for k in ks:
        top = torch.argsort(first, dim=1, stable=True)[:, :k]
        rows.append(row("first-order*", k, exact.gather(1, top).min(1).values, [k + 3] * len(x), None))
    for top in exact_tops:
        got = exact.gather(1, torch.argsort(bf16, dim=1, stable=True)[:, :top]).min(1).values
        ms, picks = per_image(amp=True, exact_top=top)
        for i, (_, value) in enumerate(picks):
            assert abs(value - float(got[i])) <= 1e-6, f"amp top {top}, image {i}: {value} != {got[i]}"
        rows.append(row("exact, bf16 screen", top, got, [total + top] * len(x), ms))
    return rows


def summarise(per_model: list[list[dict]], total: int) -> list[dict]:
    """Pool each row over the models: exact share (and its range over models), gaps, forwards."""
    out = []
    for rows in zip(*per_model):
        exact = [e for r in rows for e in r["exact"]]
        gap = [g for r in rows for g in r["gap"]]
        forwards = sum(f for r in rows for f in r["forwards"]) / len(exact)
        shares = [sum(r["exact"]) / len(r["exact"]) for r in rows]
        ms = [r["ms_per_image"] for r in rows if r["ms_per_image"] is not None]
        out.append({"search": rows[0]["search"], "k": rows[0]["k"], "images": len(exact),
                    "exact_share": sum(exact) / len(exact), "exact_share_per_model": shares,
                    "mean_gap": sum(gap) / len(gap), "max_gap": max(gap), "forwards": forwards,
                    "speedup_forwards": total / forwards,
                    "ms_per_image": sum(ms) / len(ms) if ms else None})
    exact_ms = out[0]["ms_per_image"]
    for r in out:
        r["speedup_time"] = exact_ms / r["ms_per_image"] if r["ms_per_image"] else None
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=Path, nargs="*", default=[], help="trained U-Nets (params.yaml's model)")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "clean.h5", help="with --weights: their data")
    p.add_argument("--images", type=int, default=0, help="training images per model (0: all)")
    p.add_argument("--time-images", type=int, default=4, help="of those, images timed")
    p.add_argument("--epochs", type=int, default=TrainParams().epochs, help="without --weights: training epochs")
    p.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16], help="screen_k values")
    p.add_argument("--exact-tops", type=int, nargs="+", default=[4, 16], help="amp fp32 rescoring")
    p.add_argument("--eps", type=float, default=0.01, help="size of each class direction")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "screened_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.weights:
        mp = load_params(ROOT / "params.yaml").model
        x, y = data.load_split(args.data, "train")
        models = [(str(w), load_weights(w, mp).eval(), x, y) for w in args.weights]
    else:
        models = [(f"trained {args.epochs} epochs", *trained_model(args.epochs, 0))]
    per_model = []
    for name, model, x, y in models:
        n = args.images or len(x)
        per_model.append(measure(model, x[:n], y[:n], args.ks, args.exact_tops, args.eps, args.time_images))
        print(f"# {name}: {n} images, {x.shape[-1]}x{x.shape[-1]}, {time.perf_counter() - t0:.0f} s so far",
              flush=True)
    total = 3 ** models[0][1].head.out_channels
    rows = summarise(per_model, total)
    print(f"# {torch.get_num_threads()} thread(s); torch {torch.__version__}; ops {ops.backend()}")
    print(f"{'search':20s} {'k':>4s} {'forwards':>8s} {'exact winners':>13s} {'per model':>20s} "
          f"{'mean gap':>10s} {'max gap':>10s} {'ms/image':>9s} {'x fwd':>6s} {'x time':>6s}")
    for r in rows:
        per = "/".join(f"{100 * s:.1f}" for s in r["exact_share_per_model"])
        print(f"{r['search']:20s} {r['k']:4d} {r['forwards']:8.1f} {100 * r['exact_share']:12.1f}% {per:>20s} "
              f"{r['mean_gap']:10.2e} {r['max_gap']:10.2e} {_num(r['ms_per_image'], 9)} "
              f"{r['speedup_forwards']:6.1f} {_num(r['speedup_time'], 6)}")
    print("(k: screen_k, or the first-order short list, or exact_top of the bf16 screen; forwards: mean"
          " candidates scored, a backward counts as two; * not in the library, read off the exact tables)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"models": [m[0] for m in models], "threads": torch.get_num_threads(),
                                     "torch": torch.__version__, "backend": ops.backend(), "eps": args.eps,
                                     "rows": rows}, indent=2))
    print(f"# wrote {args.json}")


def _num(v: float | None, width: int) -> str:
    return f"{v:{width}.1f}" if v is not None else f"{'-':>{width}s}"


if __name__ == "__main__":
    main()
