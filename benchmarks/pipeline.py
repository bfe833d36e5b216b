"""What the whole experiment costs: every compute stage timed per image at a named
configuration with the stages' own functions, then extrapolated to PanNuke fold 2.

    python benchmarks/pipeline.py --config cpu-small        # 32x32, base 8 (this CPU)
    python benchmarks/pipeline.py --config default          # the sizes of params.yaml
    python benchmarks/pipeline.py --config paper            # 256x256, base 64, the authors' U-Net

Timed, each after a warm-up call, on random images of the configuration's size and a
randomly initialised U-Net (cost does not depend on the weights):
  train step    mlsys.train.train_model, one epoch over `images` images (per image)
  PGD step      mlsys.attacks.attack_from_params, `steps` faithful targeted steps (per image and step)
  method one    mlsys.method1.method_one, C classes x `steps` steps (per image, scaled to 100 steps)
  method two    mlsys.method2.method_two, C backward + 3^C forward passes (per image)
  screened      (beyond the paper, not in the total) method two with search "screened", screen_k 8
  evaluation    mlsys.attacks.attack_from_params, the 100-step evaluation attack (scaled) + one forward
Fold 2 (docs/data.md): 1682 training, 280 validation and 561 test images, 60 epochs, 100 attack
steps, four models (models 1-3: 60 epochs on 1682 images; model 4: 20 epochs on 3 x 1682),
both sets built once per seed, four evaluations per seed. Prints a table, writes JSON under
benchmarks/results/. Imports neither mlflow nor dvc (GPU machines lack them).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout
from mlsys import method1, method2, ops  # noqa: E402
from mlsys.hardware import describe, resolve, use_bf16, use_channels_last  # noqa: E402
from mlsys.attacks import attack_from_params  # noqa: E402
from mlsys.model import build_model  # noqa: E402
from mlsys.params import (AttackParams, Method1Params, Method2Params, ModelParams, TrainParams,  # noqa: E402
                          load_params)
from mlsys.train import train_model  # noqa: E402

FOLD2 = {"train": 1682, "valid": 280, "test": 561, "epochs": 60, "steps": 100, "models": 4}


@dataclass
class Config:
    size: int = 32               # image side in pixels
    base: int = 8                # U-Net filters of the first section
    depth: int = 3               # pooling steps
    variant: str = "standard"    # U-Net variant (model.variant)
    images: int = 18             # images per timed call (one training batch: train.batch_size)
    steps: int = 4               # attack steps timed (scaled to 100)
    chunk: int = 243             # method two: candidates per forward
    # the attack loops (PGD step, method one, evaluation) and training (CUDA only, as train.*);
    # "auto" resolves as the stages resolve it (mlsys.hardware): no bf16 attack loops on a CPU
    amp: bool | str = False      # bf16 autocast
    channels_last: bool | str = "auto"  # channels-last inputs
    compile: bool = False        # torch.compile
    # method two's search (augment.method2.*): "auto" = the bf16 screen where bf16 is native
    search_amp: bool | str = "auto"  # bf16 screen, the fp32 winner among the best 16
    search_channels_last: bool | str = "auto"
    search_compile: bool = False


def _default() -> Config:
    p = load_params(ROOT / "params.yaml")
    a, m2 = p.augment.method1, p.augment.method2
    return Config(size=p.data.image_size, base=p.model.base, depth=p.model.depth, variant=p.model.variant,
                  images=p.train.batch_size, chunk=m2.chunk, amp=a.amp, channels_last=a.channels_last,
                  compile=a.compile, search_amp=m2.amp, search_channels_last=m2.channels_last,
                  search_compile=m2.compile)


CONFIGS = {
    "cpu-small": lambda: Config(size=32, base=8, images=8, steps=2),
    "default": _default,
    # the settings of params.PAPER (`mlsys paper`)
    "paper": lambda: Config(size=256, base=64, variant="original", images=18, steps=4, amp="auto",
                            channels_last="auto", compile=False, search_amp="auto", search_channels_last="auto",
                            search_compile=True),
}


def timed(fn, device: torch.device, repeat: int = 1) -> float:
    """Seconds of ``fn()`` after one warm-up call (the best of ``repeat``), synchronised."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def measure(cfg: Config, device: torch.device, repeat: int = 1) -> dict[str, float]:
    """Seconds per image of each compute stage (see the module docstring)."""
    g = torch.Generator().manual_seed(0)
    n, s = cfg.images, cfg.size
    x = torch.rand(n, 3, s, s, generator=g).to(device)
    y = torch.randint(0, 6, (n, s, s), generator=g).to(device)
    mcfg = ModelParams(base=cfg.base, depth=cfg.depth, variant=cfg.variant)
    torch.manual_seed(0)
    model = build_model(mcfg).to(device).eval()
    if use_channels_last(cfg.channels_last, device) and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    tcfg = TrainParams(epochs=1, batch_size=n, device=str(device), amp=use_bf16(cfg.amp, device, cpu=False),
                       channels_last=use_channels_last(cfg.channels_last, device))  # both: CUDA only
    valid = (x[:1].cpu(), y[:1].cpu())

    def train_epoch():
        train_model(model, (x.cpu(), y.cpu()), valid, tcfg, 1, progress=False)

    fast = dict(amp=cfg.amp, channels_last=cfg.channels_last, compile=cfg.compile)
    acfg = AttackParams(mode="faithful", steps=cfg.steps, eps=0.01, target=0, **fast)
    m1 = Method1Params(steps=cfg.steps, batch_size=n, **fast)
    m2 = Method2Params(chunk=cfg.chunk, batch_size=n, amp=cfg.search_amp, channels_last=cfg.search_channels_last,
                       compile=cfg.search_compile)
    per = {}
    per["train step"] = timed(train_epoch, device, repeat) / n
    model.eval()
    per["PGD step"] = timed(lambda: attack_from_params(model, x, acfg, 0), device, repeat) / (n * cfg.steps)
    per["method one"] = timed(lambda: method1.method_one(model, x, m1), device, repeat) / n * FOLD2["steps"] / cfg.steps
    per["method two"] = timed(lambda: method2.method_two(model, x, y, m2), device, repeat) / n
    screened = replace(m2, search="screened", screen_k=8)
    per["method two, screened"] = timed(lambda: method2.method_two(model, x, y, screened), device, repeat) / n
    with torch.no_grad():
        forward = timed(lambda: model(x), device, repeat) / n
    per["evaluation"] = timed(lambda: attack_from_params(model, x, acfg, 0), device, repeat) / n \
        * FOLD2["steps"] / cfg.steps + forward
    per["forward"] = forward
    return per


def extrapolate(per: dict[str, float], seeds: int = 1) -> list[dict]:
    """Fold-2 wall time of each stage kind, in minutes, for ``seeds`` seeds."""
    f = FOLD2
    rows = [
        ("training (4 models x 60 epochs)", per["train step"], f["models"] * f["epochs"] * f["train"]),
        ("validation passes", per["forward"], f["models"] * f["epochs"] * f["valid"]),
        ("method one (6 classes x 100 steps)", per["method one"], f["train"]),
        ("method two (729 candidates)", per["method two"], f["train"]),
        ("evaluation (clean + 100-step attack)", per["evaluation"], f["models"] * f["test"]),
    ]
    return [{"stage": name, "ms_per_image": 1e3 * t, "images": count * seeds,
             "minutes": t * count * seeds / 60} for name, t, count in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu-small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, help="images per timed call (default: the configuration's)")
    ap.add_argument("--seeds", type=int, default=1, help="seeds the experiment runs (multiplies every stage)")
    ap.add_argument("--repeat", type=int, default=1, help="timed repetitions (the best is kept)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    cfg = CONFIGS[args.config]()
    if args.images:
        cfg = replace(cfg, images=args.images)
    device = torch.device(args.device)
    per = measure(cfg, device, args.repeat)
    rows = extrapolate(per, args.seeds)
    machine = describe(device) + ("" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
    m2 = resolve(Method2Params(amp=cfg.search_amp, channels_last=cfg.search_channels_last), device, bf16_on_cpu=True)
    at = resolve(AttackParams(amp=cfg.amp, channels_last=cfg.channels_last), device, bf16_on_cpu=False)
    print(f"fold-2 pipeline extrapolated from {args.config} ({cfg.size}x{cfg.size}, base {cfg.base}, "
          f"{cfg.variant} U-Net) on {machine}, torch {torch.__version__}, ops {ops.backend()}; "
          f"attack loops {'bf16' if at.amp else 'fp32'}{' channels-last' if at.channels_last else ''}, "
          f"method two {'bf16 screen' if m2.amp else 'fp32'}{' channels-last' if m2.channels_last else ''}")
    print(f"{'stage':40s} {'ms/image':>10s} {'images':>9s} {'minutes':>9s}")
    for r in rows:
        print(f"{r['stage']:40s} {r['ms_per_image']:10.2f} {r['images']:9d} {r['minutes']:9.2f}")
    total = sum(r["minutes"] for r in rows)
    print(f"{'total':40s} {'':10s} {'':9s} {total:9.2f}")
    screened = per["method two, screened"]
    print(f"{'(method two screened, k 8: not in total)':40s} {1e3 * screened:10.2f} {FOLD2['train'] * args.seeds:9d} "
          f"{screened * FOLD2['train'] * args.seeds / 60:9.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"pipeline_{args.config}_{device.type}.json"
    path.write_text(json.dumps({"config": args.config, "settings": asdict(cfg), "device": machine,
                                "torch": torch.__version__, "ops": ops.backend(), "seeds": args.seeds,
                                "per_image_s": per, "fold2": rows, "total_minutes": total}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
