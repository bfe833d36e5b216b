"""What adversarial training costs per epoch against clean training, on the default configuration.

    nice -n 19 python benchmarks/adversarial.py                      # params.yaml's settings
    nice -n 19 python benchmarks/adversarial.py --json benchmarks/results/adversarial_default_cpu.json

Builds the default synthetic data (data.*) in a temporary folder, then trains the default
U-Net (model.*, train.*: batch, lr, threads as the stage runs them) with the one training
loop (mlsys.train.train_model) for ``--epochs`` epochs each way:
  clean        the four models' loss (pixel CE of the clean batch)
  pgdat        PGD-AT with adversarial.* (default: 2 steps, half of each batch attacked)
  pgdat-full   the same, every image attacked (adversarial.half_clean false)
  trades       TRADES with adversarial.* (2 KL-ascent steps, one forward of clean + adversarial)
Validation (every epoch, as the stage) is inside each epoch's time. Checks first that the
PGD-AT examples stay in the radius. Prints the CPU model (lscpu), the per-epoch seconds
(median of the epochs after the first), the ratio to clean, and the training compute of a
baseline's stage (adversarial.epochs epochs) next to model 1's (train.epochs). Times on a
machine shared with other work are upper bounds: say so beside them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout
from mlsys import adversarial, data, prepare  # noqa: E402
from mlsys.hardware import machine  # noqa: E402
from mlsys.model import build_model  # noqa: E402
from mlsys.params import load_params  # noqa: E402
from mlsys.train import clean_loss, train_model  # noqa: E402


def lscpu_model() -> str:
    """The CPU model as `lscpu` prints it ("Model name:")."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


def epoch_seconds(p, train, valid, loss, epochs: int) -> list[float]:
    """Wall seconds of each epoch (training + validation) of the default model with ``loss``."""
    cfg = dataclasses.replace(p.train, seed=0, device="cpu")
    torch.manual_seed(0)
    model = build_model(p.model)
    stamps = [time.perf_counter()]
    train_model(model, train, valid, cfg, epochs, on_epoch=lambda e, r: stamps.append(time.perf_counter()),
                progress=False, batch_loss=loss)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--epochs", type=int, default=4, help="epochs timed per way (the first is a warm-up)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's; on a busy shared 2-core machine "
                                                "1 avoids two threads fighting over one core)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--note", default="the machine was shared with other engineers' jobs (2 cores)",
                    help="how the machine was used while timing, recorded with the numbers")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    p = load_params(args.params)
    a = p.adversarial
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clean.h5"
        prepare.prepare(p.data, path, progress=False)
        train, valid = data.load_split(path, "train"), data.load_split(path, "valid", channels=True)

    # validate first: the inner attack stays in its ball
    torch.manual_seed(0)
    probe = build_model(p.model)
    x, y = train[0][:4], train[1][:4]
    adv = adversarial.pgd_examples(probe, x, y, a.radius / 255, a.step_size / 255, a.steps)
    assert (adv - x).abs().max() <= a.radius / 255 + 1e-6, "PGD-AT examples left the radius"

    ways = {"clean": clean_loss, "pgdat": adversarial.batch_loss("pgdat", a),
            "pgdat-full": adversarial.batch_loss("pgdat", dataclasses.replace(a, half_clean=False)),
            "trades": adversarial.batch_loss("trades", a)}
    cpu = lscpu_model()
    print(f"CPU: {cpu}; {machine()}; {args.note}")
    print(f"data: {len(train[0])} training, {len(valid[0])} validation images of {p.data.image_size}px; "
          f"batch {p.train.batch_size}; adversarial: {a}")
    rows = []
    for name, loss in ways.items():
        secs = epoch_seconds(p, train, valid, loss, args.epochs)
        rows.append({"way": name, "epoch_s": statistics.median(secs[1:] or secs), "epochs_s": secs})
    clean = rows[0]["epoch_s"]
    print(f"{'way':<12}{'s/epoch':>10}{'x clean':>10}{'stage compute s':>18}")
    for r in rows:
        r["ratio"] = r["epoch_s"] / clean
        r["stage_epochs"] = p.train.epochs if r["way"] == "clean" else a.epochs
        r["stage_compute_s"] = r["epoch_s"] * r["stage_epochs"]
        print(f"{r['way']:<12}{r['epoch_s']:>10.3f}{r['ratio']:>10.2f}{r['stage_compute_s']:>18.1f}"
              f"  ({r['stage_epochs']} epochs)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "cpu": cpu, "machine": machine(), "note": args.note, "torch_threads": torch.get_num_threads(),
            "config": {"data": dataclasses.asdict(p.data), "model": dataclasses.asdict(p.model),
                       "batch_size": p.train.batch_size, "adversarial": dataclasses.asdict(a)},
            "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
