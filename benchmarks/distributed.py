"""Wall time of the stages with 1 process and with N processes (torchrun, gloo or nccl).

    python benchmarks/distributed.py                        # micro: 27 images 16x16, base 4
    python benchmarks/distributed.py --config default       # params.yaml's default sizes
    python benchmarks/distributed.py --nproc 4 --device cuda

In a scratch project (its own params.yaml and MLflow store), `python -m mlsys prepare`,
then each stage twice, as a user runs it: `mlsys train model1`, `mlsys augment method2`
and `mlsys evaluate model1`, with ``distributed.nproc.<stage>`` = 1 and = N. Reported:
the command's wall time (process start, torchrun rendezvous and MLflow logging
included: what the user waits for), and the checks that make the timing meaningful:
the N-process weights and final validation loss/Dice against the 1-process ones
(dropout 0 here, so the runs are comparable; over many steps at a high learning rate float
summation order alone makes weights drift apart, as 1 versus 2 threads of one process do) and the N-process method-two set and metrics against the 1-process ones
(byte-identical). On CPU the 1-process run has torch's default threads and each of the N
workers one thread (torchrun's default), so both use the machine's cores.
Results go to benchmarks/results/distributed_<config>_<device>_<N>proc.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "micro": {"data": {"n_images": 27, "image_size": 16}, "model": {"base": 4, "depth": 2},
              "train": {"epochs": 10, "batch_size": 6},
              "evaluate": {"attack": {"steps": 2}}, "augment": {"method2": {"chunk": 243}}},
    "default": {},  # params.yaml as shipped (each result records the settings it ran under "settings")
}


def run(cwd: Path, env: dict, *args: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mlsys", *args], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"mlsys {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall


def params_file(work: Path, base: dict, stage: str, nproc: int) -> str:
    params = json.loads(json.dumps(base))
    params.setdefault("distributed", {}).setdefault("nproc", {})[stage] = nproc
    name = f"params-{stage}-{nproc}.yaml"
    (work / name).write_text(yaml.safe_dump(params))
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="micro")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu", help='"cpu" (gloo) or "cuda" (nccl, one GPU per process)')
    ap.add_argument("--stages", default="train,augment,evaluate", help="comma-separated subset to time")
    args = ap.parse_args()

    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in CONFIGS[args.config].items():
        for k, v in values.items():
            base[section][k] = {**base[section][k], **v} if isinstance(v, dict) else v
    base["model"]["dropout"] = 0.0            # comparable weights (dropout masks are drawn per rank)
    base["train"]["device"] = base["augment"]["device"] = args.device
    base["tracking"]["log_model"] = False     # time the work, not the model export
    bs = base["train"]["batch_size"]
    if bs % args.nproc:
        base["train"]["batch_size"] = bs = bs - bs % args.nproc or args.nproc

    work = Path(tempfile.mkdtemp(prefix="mlsys-bench-dist-"))
    try:
        (work / "dvc.yaml").write_text("stages: {}\n")   # marks the project root (MLflow store here)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MLSYS_PROGRESS": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("OMP_NUM_THREADS", None)
        (work / "params.yaml").write_text(yaml.safe_dump(base))
        run(work, env, "prepare")
        rows, checks = [], {}
        for stage, cmd, out in (("train", ("train", "model1"), "models/model1.pt"),
                                ("augment", ("augment", "method2"), "data/method2.h5"),
                                ("evaluate", ("evaluate", "model1"), "metrics/eval/model1.json")):
            if stage not in args.stages.split(","):
                continue
            walls, outputs = {}, {}
            for n in (1, args.nproc):
                walls[n] = run(work, env, "--params", params_file(work, base, stage, n), *cmd)
                outputs[n] = (work / out).read_bytes()
                if stage == "train":
                    summary = json.loads((work / "metrics/train/model1.json").read_text())
                    checks[f"train_final_valid_loss_{n}proc"] = summary["final/valid_loss"]
                    checks[f"train_final_valid_dice_{n}proc"] = summary["final/valid_dice"]
                shutil.copy(work / out, work / f"{n}-{Path(out).name}")
            rows.append({"stage": " ".join(cmd), "one_process_s": round(walls[1], 2),
                         f"{args.nproc}_processes_s": round(walls[args.nproc], 2),
                         "speedup": round(walls[1] / walls[args.nproc], 3)})
            if stage == "train":
                a = torch.load(work / "1-model1.pt", weights_only=True)["state_dict"]
                b = torch.load(work / f"{args.nproc}-model1.pt", weights_only=True)["state_dict"]
                checks["train_max_abs_weight_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
            elif stage == "augment":
                checks["method2_set_identical"] = outputs[1] == outputs[args.nproc]
            else:
                m = [json.loads(outputs[n]) for n in (1, args.nproc)]
                for x in m:
                    x.pop("mlflow_run_id")
                checks["eval_metrics_identical"] = m[0] == m[1]
            # the next stage starts from the 1-process outputs
            shutil.copy(work / f"1-{Path(out).name}", work / out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {"config": args.config, "nproc": args.nproc, "device": args.device,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores"
                         + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
              "torch": torch.__version__, "settings": {k: base[k] for k in ("data", "model", "train")},
              "rows": rows, "checks": checks}
    print(f"{args.config} on {result['machine']}, {args.device}, 1 vs {args.nproc} processes (wall s)")
    print(f"{'stage':<18}{'1 proc':>9}{f'{args.nproc} procs':>10}{'speed-up':>10}")
    for r in rows:
        print(f"{r['stage']:<18}{r['one_process_s']:>9.1f}{r[f'{args.nproc}_processes_s']:>10.1f}{r['speedup']:>9.2f}x")
    print("checks:", json.dumps(checks))
    tag = "" if args.stages == ap.get_default("stages") else "_" + args.stages.replace(",", "+")
    out = ROOT / "benchmarks/results" / f"distributed_{args.config}_{args.device}_{args.nproc}proc{tag}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
