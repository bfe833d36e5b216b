"""The field's robustness protocol at full strength: what one step of each attack costs per
image, and what the whole protocol costs per model and seed.

    python benchmarks/protocol.py --config default   # params.yaml's U-Net and image size, the evaluate batch
    python benchmarks/protocol.py --config paper     # 256x256, base 64, the authors' U-Net (2 images, 2 steps)
    python benchmarks/protocol.py --quick            # 16x16, 2 images, 2 steps: the test's size

Every attack of mlsys.robust.ATTACKS runs through mlsys.robust.untargeted, with the evaluate
stage's fast paths (evaluate.attack: channels-last, fp32 on a CPU), on random images whose
labels are the model's own clean prediction (clean accuracy 1 by construction, so any working
attack lowers it; cost does not depend on the weights). Validation first (llm.c dev/cuda style):
each result lies in the eps-ball and in [0, 1], lowers the accuracy, and runs exactly `steps`
forward+backward passes (SEA: 3 x steps), counted by a forward hook; those runs, of every attack
before any is timed, are the warm-up (timed in turn, the first attack paid for it).
Then each attack is timed; a step's cost per image is the attack's time less its counted
no-grad forwards (timed alone), over its forward+backward passes. Last, mlsys.evaluate.robust_chunk
(the protocol as the evaluate stage runs it) on one radius: its passes must be the sum of the
attacks' and its time is compared with the cost model's prediction.

Totals, per model and seed: test images x radii x (sum over attacks of steps x step cost, SEA
3 x steps) plus the forwards, at params.yaml's evaluate.robust, at full strength (mlsys.presets.PAPER's
radii; SEA 300 steps per loss and PAdam 200 as their authors run them, 100 for the others; fold 2's
561 test images), for every attack, and at PAPER as written (steps 300 for every attack). In
hours on this machine, and in GPU-minutes from an H100 yardstick (an estimate, not measured).
Prints a table, writes benchmarks/results/protocol_<config>_<cpu>.json. Imports neither mlflow nor dvc.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout
from method2 import matmul_peak, timed  # noqa: E402  (benchmarks/method2.py: one way to time and peak)
from pipeline import FOLD2  # noqa: E402  (fold 2's split: 561 test images)
from mlsys import hardware  # noqa: E402
from mlsys.attacks import fast  # noqa: E402
from mlsys.evaluate import robust_chunk  # noqa: E402
from mlsys.metrics import pixel_accuracy  # noqa: E402
from mlsys.model import build_model  # noqa: E402
from mlsys.params import ModelParams, load_params  # noqa: E402
from mlsys.prepare import split_indices  # noqa: E402
from mlsys.presets import PAPER  # noqa: E402
from mlsys.robust import ATTACKS, SEA_LOSSES, TITLES, class_weights, label, untargeted  # noqa: E402

# A PGD step of the paper-scale U-Net (256x256, base 64) on one H100, bf16 autocast, channels-last,
# batch 64, eager PyTorch: seconds per image, as the project measured it on a lent GPU (params.yaml's
# evaluate.robust comment). Not measured by this benchmark: GPU totals are estimates from it.
H100_STEP_S = 0.62e-3
FIELD_STEPS = 100  # iterations of an attack whose authors fix none (the field runs 100-300)
PROTOCOL_FORWARDS = 2  # forwards of the protocol per attack and radius: its final images, the worst case
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")  # the CPU flags that decide fp32/bf16 speed


@dataclass
class Config:
    size: int = 32               # image side in pixels
    base: int = 8                # U-Net filters of the first section
    depth: int = 3               # pooling steps
    variant: str = "original"    # U-Net variant (model.variant)
    images: int = 32             # images per attack call (the evaluate stage's chunk: evaluate.attack.batch_size)
    steps: int = 4               # attack steps timed (SEA: per loss)
    repeat: int = 3              # timed runs per attack (the median is kept)
    amp: bool | str = False      # bf16 autocast (evaluate.attack.amp; "auto": never on a CPU)
    channels_last: bool | str = "auto"  # channels-last inputs (evaluate.attack.channels_last)


def _default(**over) -> Config:
    p = load_params(ROOT / "params.yaml")
    a = p.evaluate.attack
    return replace(Config(size=p.data.image_size, base=p.model.base, depth=p.model.depth, variant=p.model.variant,
                          images=a.batch_size, steps=p.evaluate.robust.steps, amp=a.amp,
                          channels_last=a.channels_last), **over)


CONFIGS = {
    "default": _default,
    # fits 2 CPU cores in minutes: ~1 GB and ~1.5 s per image and step there
    "paper": lambda: Config(size=256, base=64, depth=3, variant="original", images=2, steps=2, repeat=1,
                            amp=PAPER["evaluate.attack.amp"], channels_last=PAPER["evaluate.attack.channels_last"]),
    "quick": lambda: _default(size=16, images=2, steps=2, repeat=1),
}


# --------------------------------------------------------------------------- the machine

def cpu_flags(names: tuple[str, ...] = FLAGS) -> dict[str, bool]:
    """Which of ``names`` the first CPU of /proc/cpuinfo lists (all false where it is unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            have = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        have = set()
    return {n: n in have for n in names}


def machine_tag(device: torch.device) -> str:
    """A file-name tag of the machine: "amd-epyc", "intel-xeon-platinum-8481c", "nvidia-h100-80gb-hbm3"."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else hardware.cpu_name()
    name = re.sub(r"\((r|tm)\)|cpu|processor|@.*$", " ", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or device.type


# --------------------------------------------------------------------------- validate

def losses(attack: str) -> int:
    """Runs of the loop an attack makes per call: SEA one APGD run per loss, the others one."""
    return len(SEA_LOSSES) if attack == "sea" else 1


class Passes:
    """Counts the model's forwards: with grad (each one of an attack step's forward+backward
    passes) and without (start points, worst cases, the final images)."""

    def __init__(self, model: torch.nn.Module):
        self.grad = self.nograd = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        if torch.is_grad_enabled():
            self.grad += 1
        else:
            self.nograd += 1

    def reset(self) -> None:
        self.grad = self.nograd = 0


def _noop(*_) -> None:
    """An on_step callback: the protocol passes one (its curves), which adds a final forward."""


def run_attack(net, x, y, attack: str, eps: float, steps: int, weights: torch.Tensor, amp: bool) -> torch.Tensor:
    """One call of ``attack`` as the evaluate stage makes it (with an on_step callback)."""
    g = torch.Generator().manual_seed(0)
    return untargeted(net, x, y, attack, eps, steps, generator=g, on_step=_noop, amp=amp, weights=weights)


def validate(net, passes: Passes, x, y, attack: str, eps: float, steps: int, weights, amp: bool) -> dict:
    """Run ``attack`` once (the warm-up) and check it; raises naming the attack where it fails.
    Returns the clean and adversarial accuracy, the distance, and the forwards counted."""
    passes.reset()
    adv = run_attack(net, x, y, attack, eps, steps, weights, amp)
    grad, nograd = passes.grad, passes.nograd
    with torch.no_grad():
        clean = float(pixel_accuracy(net(x), y).mean())
        acc = float(pixel_accuracy(net(adv), y).mean())
    dist = float((adv - x).abs().max())
    assert dist <= eps + 1e-6, f"{attack}: ||adv - x||_inf = {dist} is outside the eps-ball {eps}"
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1, f"{attack}: adversarial images outside [0, 1]"
    assert acc < clean, f"{attack}: accuracy {acc} under attack is not below the clean {clean}"
    want = steps * losses(attack)
    assert grad == want, f"{attack}: {grad} forward+backward passes, expected {want} ({steps} steps)"
    return {"clean_accuracy": clean, "accuracy": acc, "linf": dist, "grad_forwards": grad, "nograd_forwards": nograd}


def step_flops(net, x, y) -> float:
    """FLOPs of one attack step per image: a forward and the backward to the input only (the
    weights need no gradient), counted by FlopCounterMode on the pixel cross-entropy."""
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            z = x.detach().clone().requires_grad_(True)
            torch.nn.functional.cross_entropy(net(z), y).backward()
    finally:
        for p in params:
            p.requires_grad_(True)
    return counter.get_total_flops() / len(x)


# --------------------------------------------------------------------------- the cost model

def protocol_rows(step_s: dict[str, float], nograd: dict[str, int], forward_s: float, per_attack_forwards: int,
                  images: int, radii: list[float], steps: dict[str, int]) -> dict:
    """Seconds of the protocol on one model: ``images`` x radii x (per attack: steps x losses x
    its step cost + its no-grad forwards) + per attack and radius ``per_attack_forwards`` of the
    protocol (its final images and the worst case) + one clean forward per image."""
    r = len(radii)
    rows = {a: images * r * (n * losses(a) * step_s[a] + nograd[a] * forward_s) for a, n in steps.items()}
    forwards = images * (r * per_attack_forwards * len(steps) + 1) * forward_s
    image_steps = images * r * sum(n * losses(a) for a, n in steps.items())
    return {"attacks": list(steps), "radii": list(radii), "steps": dict(steps), "images": images,
            "labels": [label(a, n) for a, n in steps.items()], "image_steps": image_steps,
            "attack_hours": {a: s / 3600 for a, s in rows.items()}, "protocol_forward_hours": forwards / 3600,
            "hours": (sum(rows.values()) + forwards) / 3600,
            "gpu_minutes_estimate": image_steps * H100_STEP_S / 60}


def settings() -> dict[str, dict]:
    """The protocols costed: params.yaml's, at full strength (its attacks, then every attack),
    and mlsys.presets.PAPER as written. images: the test split's size."""
    p = load_params(ROOT / "params.yaml")
    rc = p.evaluate.robust
    n_test = len(split_indices(p.data.n_images, p.data.split, p.data.split_seed)["test"])
    full = {a: (TITLES.get(a, (a, None))[1] or FIELD_STEPS) for a in ATTACKS}  # SEA 300, PAdam 200, others 100
    radii = list(PAPER["evaluate.robust.radii"])
    return {
        "params.yaml": {"images": n_test, "radii": list(rc.radii), "steps": {a: rc.steps for a in rc.attacks}},
        "full strength": {"images": FOLD2["test"], "radii": radii, "steps": {a: full[a] for a in rc.attacks}},
        "full strength, every attack": {"images": FOLD2["test"], "radii": radii, "steps": full},
        "PAPER preset": {"images": FOLD2["test"], "radii": radii,
                         "steps": {a: PAPER["evaluate.robust.steps"] for a in rc.attacks}},
    }


# --------------------------------------------------------------------------- the benchmark

def measure(cfg: Config, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(ModelParams(base=cfg.base, depth=cfg.depth, variant=cfg.variant)).to(device).eval()
    passes = Passes(model)
    amp = hardware.use_bf16(cfg.amp, device, cpu=False)
    net = fast(model, hardware.use_channels_last(cfg.channels_last, device))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(cfg.images, 3, cfg.size, cfg.size, generator=g).to(device)
    with torch.no_grad():
        y = net(x).max(1).indices  # the model's own prediction: clean accuracy 1
    weights = class_weights(y, model.head.out_channels)  # SEA's Mask-CE-Bal: the "dataset's" class frequencies
    p = load_params(ROOT / "params.yaml")
    eps = max(p.evaluate.robust.radii) / 255  # the default's largest radius (cost does not depend on it)
    n = cfg.images

    with torch.no_grad():
        forward_s = timed(lambda: net(x), device, reps=max(cfg.repeat, 5)) / n
    flops = step_flops(net, x, y)
    peak, peak_name = matmul_peak(device)
    valid, step_s, raw_s, nograd, noisy = {}, {}, {}, {}, {}
    for attack in ATTACKS:  # every attack validated first: the warm-up of all of them, before any is timed
        valid[attack] = v = validate(net, passes, x, y, attack, eps, cfg.steps, weights, amp)
        print(f"    valid {attack:10s} accuracy {v['clean_accuracy']:.3f} -> {v['accuracy']:.3f}, "
              f"||adv - x|| {v['linf'] * 255:.2f}/255 <= {eps * 255:.0f}/255, "
              f"{v['grad_forwards']} forward+backward, {v['nograd_forwards']} forwards", flush=True)
    for attack in ATTACKS:
        v = valid[attack]
        t = timed(lambda: run_attack(net, x, y, attack, eps, cfg.steps, weights, amp), device, reps=cfg.repeat,
                  warmup=0)
        nograd[attack] = v["nograd_forwards"]
        raw_s[attack] = t / (n * v["grad_forwards"])
        step_s[attack] = (t / n - nograd[attack] * forward_s) / v["grad_forwards"]
        if step_s[attack] <= 0:  # its forwards timed longer than the whole attack: the machine is busy
            print(f"# {attack}: noisy timing (forwards alone took longer than the attack); its raw cost is used")
            step_s[attack], noisy[attack] = raw_s[attack], True

    # the protocol as the evaluate stage runs it, on one radius: the attacks' passes, and the model's time
    ecfg = p.evaluate
    ecfg = replace(ecfg, attack=replace(ecfg.attack, amp=cfg.amp, channels_last=cfg.channels_last),
                   robust=replace(ecfg.robust, radii=[max(ecfg.robust.radii)], steps=cfg.steps))
    attacks = ecfg.robust.attacks
    tissue = torch.zeros(n, dtype=torch.int64)

    def chunk():
        robust_chunk(model, x, y, None, tissue, 1, 0, ecfg, weights)

    passes.reset()
    start = time.perf_counter()
    chunk()  # counted; the warm-up where the configuration times more than once
    chunk_s = time.perf_counter() - start
    grad, nograd_all = passes.grad, passes.nograd
    if cfg.repeat > 1:
        chunk_s = timed(chunk, device, reps=cfg.repeat, warmup=0)
    want_grad = sum(valid[a]["grad_forwards"] for a in attacks)
    assert grad == want_grad, f"robust_chunk ran {grad} forward+backward passes, the attacks {want_grad}"
    # the protocol's own forwards per attack and radius (its final images, the worst case), and the clean one
    extra = nograd_all - 1 - sum(nograd[a] for a in attacks)
    assert extra == PROTOCOL_FORWARDS * len(attacks), \
        f"robust_chunk ran {extra} forwards beside the attacks', expected {PROTOCOL_FORWARDS} per attack"
    predicted = protocol_rows(step_s, nograd, forward_s, PROTOCOL_FORWARDS, n, ecfg.robust.radii,
                              {a: cfg.steps for a in attacks})["hours"] * 3600
    check = {"attacks": attacks, "radius": ecfg.robust.radii[0], "steps": cfg.steps, "images": n,
             "measured_s": chunk_s, "predicted_s": predicted, "grad_forwards": grad,
             "nograd_forwards": nograd_all}

    per_attack = {a: {"label": label(a, cfg.steps), "s_per_image_step": step_s[a],
                      "raw_s_per_image_step": raw_s[a], "nograd_forwards": nograd[a], "noisy": a in noisy,
                      "gflops": flops / step_s[a] / 1e9, "percent_of_peak": 100 * flops / step_s[a] / peak}
                  for a in ATTACKS}
    totals = {name: protocol_rows(step_s, nograd, forward_s, PROTOCOL_FORWARDS, **s)
              for name, s in settings().items()}
    return {"forward_s_per_image": forward_s, "step_gflop_per_image": flops / 1e9,
            "peak_gflops": peak / 1e9, "peak": peak_name, "validation": valid, "attacks": per_attack,
            "protocol_check": check, "totals": totals}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="default")
    ap.add_argument("--quick", action="store_true", help="= --config quick (16x16, 2 images, 2 steps)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, help="images per attack call (default: the configuration's)")
    ap.add_argument("--steps", type=int, help="attack steps timed (default: the configuration's)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--seeds", type=int, help="seeds of the experiment (default: params.yaml's); 4 models each")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    name = "quick" if args.quick else args.config
    cfg = CONFIGS[name]()
    cfg = replace(cfg, **{k: v for k, v in (("images", args.images), ("steps", args.steps)) if v})
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    flags = cpu_flags()
    seeds = args.seeds or len(load_params(ROOT / "params.yaml").seeds)
    machine = hardware.describe(device) + ("" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
    print(f"# the field's protocol per attack step: {name} ({cfg.size}x{cfg.size}, base {cfg.base}, {cfg.variant} "
          f"U-Net, {cfg.images} images x {cfg.steps} steps) on {machine}; CPU {hardware.cpu_name()}, flags "
          f"{', '.join(f for f, on in flags.items() if on) or 'none of ' + ', '.join(FLAGS)}; "
          f"torch {torch.__version__}; load average before {load:.2f}")
    res = measure(cfg, device)
    print(f"# one step = {res['step_gflop_per_image']:.3f} GFLOP per image (forward + backward to the input); "
          f"peak {res['peak_gflops']:.0f} GFLOP/s ({res['peak']}); a forward {1e3 * res['forward_s_per_image']:.3f} ms "
          f"per image")
    print(f"{'attack':10s} {'ms/image/step':>14s} {'(raw)':>9s} {'GFLOP/s':>9s} {'% peak':>7s}")
    for a, r in res["attacks"].items():
        print(f"{a:10s} {1e3 * r['s_per_image_step']:14.3f} {1e3 * r['raw_s_per_image_step']:9.3f} "
              f"{r['gflops']:9.1f} {r['percent_of_peak']:7.1f}")
    c = res["protocol_check"]
    print(f"# check: robust_chunk ({', '.join(c['attacks'])}; radius {c['radius']:g}, {c['steps']} steps, "
          f"{c['images']} images) {c['measured_s']:.2f} s measured, {c['predicted_s']:.2f} s from the step costs "
          f"(ratio x{c['measured_s'] / c['predicted_s']:.2f}; above 1: the protocol's own curves and metrics)")
    print(f"# per model and seed, from these step costs; GPU: {H100_STEP_S * 1e3:.2f} ms per image-step "
          f"(H100, bf16, paper scale), an ESTIMATE, not measured")
    factor = c["measured_s"] / c["predicted_s"]
    print(f"{'protocol':28s} {'images':>6s} {'radii':>5s} {'steps':>28s} {'image-steps':>12s} {'CPU h':>8s} "
          f"{'as run':>8s} {'x4x' + str(seeds) + ' h':>8s} {'H100 min':>9s}")
    for s, t in res["totals"].items():
        steps = "+".join(f"{n}{'x3' if a == 'sea' else ''}" for a, n in t["steps"].items())
        print(f"{s:28s} {t['images']:6d} {len(t['radii']):5d} {steps:>28s} {t['image_steps']:12,d} "
              f"{t['hours']:8.2f} {t['hours'] * factor:8.2f} {t['hours'] * 4 * seeds:8.1f} "
              f"{t['gpu_minutes_estimate']:9.1f}")
    print(f"# CPU h: the step costs and forwards; as run: x{factor:.2f}, the check's ratio (robust_chunk's "
          f"curves and metrics); x4x{seeds}: 4 models, {seeds} seeds")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"protocol_{name}_{machine_tag(device)}.json"
    out = {"config": name, "settings": asdict(cfg), "device": machine, "cpu": hardware.cpu_name(),
           "cpu_flags": flags, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "load_average_before": load, "seeds": seeds, "models": 4, "h100_step_s_estimate": H100_STEP_S, **res}
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
