"""Screened method two against the exact search, on a briefly trained model: how often is
the screened winner the exact optimum, by how much does its score miss, how much faster.

    OMP_NUM_THREADS=1 python benchmarks/screened.py                 # synthetic 32x32, base 8
    python benchmarks/screened.py --images 60 --epochs 8 --json benchmarks/results/x.json

The default data is built the way `mlsys prepare` builds it (synthetic patches, the
default split) in a temporary folder; a U-Net (params.yaml's model defaults) is trained
for a few epochs with mlsys.train.train_model, then for each of the first training
images:
  exact     all 3^C candidates scored in fp32 (the paper's search; the reference);
  screened  candidates ranked by the first-order prediction
            score(x) + <grad_x score(x), x_s - x> (one fp32 forward + backward at x),
            only the best k scored exactly in fp32, for k in --ks;
  amp       all candidates scored in bf16 autocast, the fp32 winner among the best
            exact_top of them (the `amp` fast path of the exact search);
  descent*  (not in the library, a measured proposal) screened, then from its winner a
            greedy descent over the 2C one-sign neighbours, simulated on the exact tables.
Accuracy is read from the exact table of every image (which of its fp32 scores the short
list holds); the timed searches are the library's own (mlsys.augment.search_image), and
their winners are checked against that table first (llm.c dev/cuda style: validate,
then time). Cost is counted in forward passes (a backward counts as two) and timed per
image (perf_counter, the fastest of three runs; CPU threads as set). Imports neither mlflow nor dvc.
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
from mlsys import augment, data, ops  # noqa: E402
from mlsys.augment import class_directions, first_order_scores, search_image  # noqa: E402
from mlsys.model import build_model  # noqa: E402
from mlsys.params import DataParams, ModelParams, TrainParams  # noqa: E402
from mlsys.train import train_model  # noqa: E402


def trained_model(images: int, epochs: int, seed: int):
    """(model in eval mode, training images (N, 3, H, W), their masks (N, H, W)) on the
    default synthetic data, trained ``epochs`` epochs."""
    with tempfile.TemporaryDirectory() as tmp:
        data.prepare(DataParams(), Path(tmp) / "clean.h5", progress=False)
        train = data.load_split(Path(tmp) / "clean.h5", "train")
        valid = data.load_split(Path(tmp) / "clean.h5", "valid")
    torch.manual_seed(seed)
    model = build_model(ModelParams())
    train_model(model, train, valid, TrainParams(epochs=epochs, seed=seed), epochs, progress=False)
    return model.eval(), train[0][:images], train[1][:images]


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


def run(images: int, epochs: int, ks: list[int], exact_tops: list[int], eps: float, seed: int,
        time_images: int) -> dict:
    t0 = time.perf_counter()
    model, x, y = trained_model(images, epochs, seed)
    print(f"# trained {epochs} epochs in {time.perf_counter() - t0:.0f} s; {images} training images, "
          f"{x.shape[-1]}x{x.shape[-1]}, base {ModelParams().base}; "
          f"{torch.get_num_threads()} thread(s); torch {torch.__version__}; ops {ops.backend()}")
    dirs = class_directions(model, x, eps)
    C = dirs.shape[1]
    total = 3**C
    exact, pred, bf16 = [], [], []
    with torch.no_grad():
        for i in range(images):
            exact.append(augment._scores(model, x[i], dirs[i], y[i], None, "l1", "argmin", 243, False, False))
            bf16.append(augment._scores(model, x[i], dirs[i], y[i], None, "l1", "argmin", 243, True, False))
    for i in range(images):
        pred.append(first_order_scores(model, x[i], dirs[i], y[i], "l1"))
    exact, pred, bf16 = torch.stack(exact), torch.stack(pred), torch.stack(bf16)
    best = exact.min(1).values
    rank = ((pred < pred.gather(1, exact.argmin(1, keepdim=True))).sum(1))
    spread = (exact.max(1).values - best).mean()
    print(f"# exact: mean best score {best.mean():.5f}, clean {exact[:, 0].mean():.5f}, "
          f"mean range over candidates {spread:.5f}; winner is the clean image for "
          f"{int((exact.argmin(1) == 0).sum())} of {images}; rank of the optimum in the first-order "
          f"order: median {int(rank.median())}, max {int(rank.max())}")

    def descent(i: int, k: int) -> tuple[float, int]:
        """Not in the library (a measured proposal): from the best of the first-order top k,
        move to the best of its 2C one-sign neighbours while that improves, on image i's
        exact table. Returns (final score, candidates evaluated)."""
        seen = set(torch.argsort(pred[i], stable=True)[:k].tolist())
        b = min(seen, key=lambda j: float(exact[i, j]))
        while True:
            digits = [(b // 3**c) % 3 for c in range(C)]
            seen.update(b + (v - digits[c]) * 3**c for c in range(C) for v in range(3) if v != digits[c])
            nb = min(seen, key=lambda j: (float(exact[i, j]), j))
            if nb == b or float(exact[i, nb]) >= float(exact[i, b]):
                return float(exact[i, b]), len(seen)
            b = nb

    def short_best(order_scores: torch.Tensor, k: int) -> torch.Tensor:
        top = torch.argsort(order_scores, dim=1, stable=True)[:, :k]
        return exact.gather(1, top).min(1).values

    # timing: the library's searches on the first time_images images
    def per_image(**kw) -> tuple[float, list[tuple[int, float]]]:
        picks: list[tuple[int, float]] = []

        def all_images():
            picks.clear()
            for i in range(time_images):
                picks.append(search_image(model, x[i], dirs[i], y[i], **kw))
        return timed(all_images) / time_images, list(picks)

    t_exact, picks = per_image()
    for i, (idx, value) in enumerate(picks):  # validate: the library's exact search is the table's
        assert abs(value - float(best[i])) <= 1e-6, f"image {i}: exact search {value} != table {best[i]}"
    rows = [{"search": "exact fp32", "k": total, "forwards": total, "exact_share": 1.0, "mean_gap": 0.0,
             "max_gap": 0.0, "ms_per_image": t_exact * 1e3, "speedup_forwards": 1.0, "speedup_time": 1.0}]
    for k in ks:
        got = short_best(pred, k)
        gap = got - best
        t, picks = per_image(search="screened", screen_k=k)
        for i, (_, value) in enumerate(picks):
            assert abs(value - float(got[i])) <= 1e-6, f"k={k}, image {i}: search {value} != table {got[i]}"
        cost = k + 1 + 2  # k scored, plus the forward and the backward (two forwards' worth) at x
        rows.append({"search": "screened fp32", "k": k, "forwards": cost,
                     "exact_share": float((gap <= 1e-7).float().mean()), "mean_gap": float(gap.mean()),
                     "max_gap": float(gap.max()), "ms_per_image": t * 1e3,
                     "speedup_forwards": total / cost, "speedup_time": t_exact / t})
    for k in ks:
        if k >= total:
            continue
        final, counts = zip(*(descent(i, k) for i in range(images)))
        gap = torch.tensor(final, dtype=exact.dtype) - best
        cost = sum(counts) / images + 3
        rows.append({"search": "screened + descent*", "k": k, "forwards": round(cost),
                     "exact_share": float((gap <= 1e-7).float().mean()), "mean_gap": float(gap.mean()),
                     "max_gap": float(gap.max()), "ms_per_image": None,
                     "speedup_forwards": total / cost, "speedup_time": None})
    for top in exact_tops:
        got = short_best(bf16, top)
        gap = got - best
        t, picks = per_image(amp=True, exact_top=top)
        for i, (_, value) in enumerate(picks):
            assert abs(value - float(got[i])) <= 1e-6, f"amp top {top}, image {i}: {value} != {got[i]}"
        rows.append({"search": "exact, bf16 screen", "k": top, "forwards": total + top,
                     "exact_share": float((gap <= 1e-7).float().mean()), "mean_gap": float(gap.mean()),
                     "max_gap": float(gap.max()), "ms_per_image": t * 1e3,
                     "speedup_forwards": total / (total + top), "speedup_time": t_exact / t})

    print(f"{'search':20s} {'k':>4s} {'forwards':>8s} {'exact winners':>13s} {'mean gap':>10s} "
          f"{'max gap':>10s} {'ms/image':>9s} {'x fwd':>6s} {'x time':>6s}")
    for r in rows:
        print(f"{r['search']:20s} {r['k']:4d} {r['forwards']:8d} {100 * r['exact_share']:12.1f}% "
              f"{r['mean_gap']:10.2e} {r['max_gap']:10.2e} {_num(r['ms_per_image'], 9)} "
              f"{r['speedup_forwards']:6.1f} {_num(r['speedup_time'], 6)}")
    print("(k: screened short list, or exact_top of the bf16 screen; a backward counts as two forwards;"
          f" accuracy over {images} images, times over the first {time_images}; * not in the library:"
          " simulated on the exact tables, forwards = mean candidates evaluated + 3)")
    return {"images": images, "time_images": time_images, "epochs": epochs, "eps": eps, "seed": seed,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "backend": ops.backend(),
            "mean_best_score": float(best.mean()), "mean_clean_score": float(exact[:, 0].mean()),
            "first_order_rank_of_optimum": rank.tolist(), "rows": rows}


def _num(v: float | None, width: int) -> str:
    return f"{v:{width}.1f}" if v is not None else f"{'-':>{width}s}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=60, help="training images measured for accuracy")
    p.add_argument("--time-images", type=int, default=4, help="of those, images timed")
    p.add_argument("--epochs", type=int, default=8, help="training epochs of the model")
    p.add_argument("--ks", type=int, nargs="+", default=[9, 27, 54, 81, 243],
                   help="screened short lists (54: about 10x fewer forwards)")
    p.add_argument("--exact-tops", type=int, nargs="+", default=[4, 8, 16], help="amp fp32 rescoring")
    p.add_argument("--eps", type=float, default=0.01, help="size of each class direction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "screened_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.images, args.epochs, args.ks, args.exact_tops, args.eps, args.seed, args.time_images)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
