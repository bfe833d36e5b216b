"""Method two's signed-combination search, per image: validate, then time each setting.

    python benchmarks/method2.py --config cpu-small      # 32x32, base 8, chunks of 243
    python benchmarks/method2.py --config paper          # 256x256, base 64, chunks of 243

For one image x and its true mask, C = 6 class directions (mlsys.method2.class_directions,
one batched backward) give the 3^6 = 729 candidates, which are run through the U-Net and
scored (L1, argmin). Only this search is timed (the directions are shared by all ways):
  (a) per-candidate loop: one candidate per forward (the original code's approach);
  (b)-(g) the stage's own search, mlsys.method2.search_image (native ops when built,
      chunks of candidates per forward, one host sync per image) in fp32, with
      channels-last candidates, with the bf16-autocast screen (the best ``exact_top``
      rescored in fp32), and under torch.compile (see WAYS).
Printed: ms per image, speed-up over (a), achieved TFLOP/s (FlopCounterMode count of one
forward x 729) and its share of a measured matmul peak, the fastest way; the candidates
and score ops alone in GB/s against a measured device copy
(`torch.empty_like(x).copy_(x)`). Checks come first (llm.c dev/cuda style): native
candidates and scores against the references, and every way must find the fp32
optimum's score (all decide in fp32). Imports neither mlflow nor dvc (nor yaml, tqdm).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from mlsys import hardware, ops  # noqa: E402
from mlsys.method2 import class_directions, search_image  # noqa: E402
from mlsys.model import UNet  # noqa: E402


@dataclass
class Config:
    size: int = 32          # image side in pixels
    base: int = 8           # U-Net filters of the first section (paper: 64)
    chunk: int = 243        # candidates per forward in the batched searches (divides 729)
    images: int = 2         # images timed (times are per image)
    eps: float = 0.01       # FGSM step of each class direction
    classes: int = 6        # U-Net output classes = number of directions (3^6 candidates)
    exact_top: int = 16     # bf16 screen: the best candidates rescored in fp32


CONFIGS = {
    "cpu-small": Config(size=32, base=8, chunk=243, images=2),
    # chunks of 243: fp32 activations of all 729 at once would need ~60 GB
    "paper": Config(size=256, base=64, chunk=243, images=2),
}


# --------------------------------------------------------------------------- timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, reps: int = 3, warmup: int = 1) -> float:
    """Median seconds of fn() after warm-up; CUDA events on the GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """Measured dense matmul FLOP/s: bf16 8192^3 on a GPU (whatever ``dtype``: the card's
    peak), ``dtype`` 2048^3 on the CPU (bf16 has its own units on AMX CPUs)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, dtype)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ b, device, reps=5, warmup=2)
    return 2 * n**3 / t, f"{str(dtype).removeprefix('torch.')} matmul {n}^3"


def copy_bandwidth(device: torch.device) -> float:
    """Measured bytes/s of a device-to-device copy (read + write) of 256 MiB:
    `torch.empty_like(x).copy_(x)` on a GPU (the caching allocator makes the allocation
    free); into a preallocated tensor on the CPU, where each fresh 256 MiB allocation
    would be timed with its page faults."""
    x = torch.empty(64 * 2**20, device=device, dtype=torch.float32).uniform_()
    if device.type == "cuda":
        t = timed(lambda: torch.empty_like(x).copy_(x), device, reps=5, warmup=2)
    else:
        y = torch.empty_like(x)
        t = timed(lambda: y.copy_(x), device, reps=5, warmup=2)
    return 2 * x.numel() * 4 / t


# --------------------------------------------------------------------------- method two

Forward = Callable[[torch.Tensor], torch.Tensor]


def search_loop(forward: Forward, x, dirs, mask) -> tuple[int, float]:
    """(a) one candidate per forward (the original code's approach), fp32 reference ops."""
    total = 3 ** dirs.shape[0]
    scores = []
    for i in range(total):
        cand = ops.candidates_ref(x, dirs, i, 1)
        scores.append(ops.score_ref(forward(cand), mask)[0])
    scores = torch.cat(scores)
    best = int(scores.argmin())  # the one host sync
    return best, float(scores[best])


# The library's search (mlsys.method2.search_image, the one the stage runs) in each of its
# precision / layout / compile settings: label -> keyword arguments.
WAYS = {
    "(b) fp32": {},
    "(c) fp32 channels-last": {"channels_last": True},
    "(d) bf16 screen": {"amp": True},
    "(e) bf16 screen channels-last": {"amp": True, "channels_last": True},
    "(f) fp32 compiled": {"compile": True},
    "(g) bf16 screen channels-last compiled": {"amp": True, "channels_last": True, "compile": True},
}


# --------------------------------------------------------------------------- the benchmark

def validate(x, dirs, mask, model, dtype, channels_last, chunk: int) -> dict:
    """Native ops against the references on this image; raises if they disagree."""
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    total = 3 ** dirs.shape[0]
    cand = ops.candidates(x, dirs, 0, total, 0.0, 1.0, dtype, channels_last)
    want = ops.candidates_ref(x, dirs, 0, total, 0.0, 1.0, dtype, channels_last)
    cand_err = float((cand.double() - want.double()).abs().max())
    assert cand_err <= tol, f"candidates differ from the reference by {cand_err}"
    with torch.autocast(x.device.type, torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = model(want[:chunk])
    scores, best = ops.score(logits, mask)
    scores_ref, _ = ops.score_ref(logits, mask)
    score_err = float((scores - scores_ref).abs().max())
    assert score_err <= 1e-5, f"scores differ from the reference by {score_err}"
    assert float(scores_ref[best] - scores_ref.min()) <= 1e-5, "native best is not the minimum"
    return {"candidates_max_abs_err": cand_err, "scores_max_abs_err": score_err}


def op_bandwidth(x, dirs, mask, dtype, channels_last, count: int, device, copy_bw: float) -> dict:
    """GB/s of the native ops alone (bytes that must move at least once)."""
    out = {}
    item = torch.empty((), dtype=dtype).element_size()
    n_px = x[0].numel()
    cand_bytes = count * 3 * n_px * item + (dirs.shape[0] + 1) * 3 * n_px * 4
    t = timed(lambda: ops.candidates(x, dirs, 0, count, 0.0, 1.0, dtype, channels_last), device)
    out["candidates"] = (t, cand_bytes / t)
    logits = torch.randn(count, dirs.shape[0], *x.shape[1:], device=device).to(dtype)
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last)
    score_bytes = logits.numel() * item + mask.numel() * 8
    t = timed(lambda: ops.score(logits, mask), device)
    out["score"] = (t, score_bytes / t)
    for name, (t, bw) in out.items():
        print(f"    op {name:10s} {count} candidates {str(dtype).removeprefix('torch.')}"
              f"{' channels-last' if channels_last else ''}: {t * 1e3:8.3f} ms  {bw / 1e9:7.1f} GB/s "
              f"({100 * bw / copy_bw:5.1f}% of copy)")
    return {k: {"ms": t * 1e3, "GB/s": bw / 1e9} for k, (t, bw) in out.items()}


def run(cfg: Config, device: torch.device, compile_model: bool, naive: bool, all_ways: bool = False) -> dict:
    torch.manual_seed(0)
    model = UNet(in_channels=3, n_classes=cfg.classes, base=cfg.base, depth=3, dropout=0.2)
    model = model.to(device).eval()
    images = torch.rand(cfg.images, 3, cfg.size, cfg.size, device=device)
    masks = torch.randint(0, cfg.classes, (cfg.images, cfg.size, cfg.size), device=device)
    dirs = class_directions(model, images, cfg.eps)
    total = 3**cfg.classes

    with FlopCounterMode(display=False) as counter:
        model(images[:1])
    fwd_flops = counter.get_total_flops()
    search_flops = total * fwd_flops
    # bf16 where the device only emulates it (an AVX2-only CPU) takes ~8x the fp32 time, and
    # the stage's "auto" never picks it there: those ways are skipped unless asked for
    bf16 = all_ways or hardware.bf16_native(device)
    if not bf16:
        print(f"# skipping the bf16 ways (d), (e), (g) and the bf16 probes: {hardware.describe(device)} "
              f"(the stage's amp: auto runs fp32 here); --all-ways times them anyway")
    peak, peak_name = matmul_peak(device)
    peak_bf16, peak_bf16_name = matmul_peak(device, torch.bfloat16) if bf16 else (float("nan"), "not measured")
    copy_bw = copy_bandwidth(device)
    print(f"# method two, {cfg.size}x{cfg.size}, U-Net base {cfg.base}, {total} candidates, "
          f"chunk {cfg.chunk}, {cfg.images} images; device {device}"
          f"{'' if device.type == 'cuda' else f' ({torch.get_num_threads()} threads)'}; "
          f"torch {torch.__version__}; ops backend {ops.backend()}; bf16 screen rescores the best "
          f"{cfg.exact_top} in fp32")
    print(f"# one forward {fwd_flops / 1e9:.3f} GFLOP -> search {search_flops / 1e12:.4f} TFLOP "
          f"per image; peak {peak / 1e12:.2f} TFLOP/s ({peak_name}) -> floor "
          f"{search_flops / peak * 1e3:.2f} ms/image; bf16 ways against {peak_bf16 / 1e12:.2f} TFLOP/s "
          f"({peak_bf16_name}); copy {copy_bw / 1e9:.1f} GB/s")
    result = {"config": asdict(cfg), "device": str(device), "machine": hardware.describe(device),
              "torch": torch.__version__,
              "backend": ops.backend(), "forward_gflop": fwd_flops / 1e9,
              "peak_tflops": peak / 1e12, "peak_bf16_tflops": peak_bf16 / 1e12,
              "copy_GBps": copy_bw / 1e9, "runs": {}}

    info = {}
    with torch.inference_mode():
        for dtype, cl in ((torch.float32, False), (torch.bfloat16, True))[:2 if bf16 else 1]:
            info[f"{str(dtype).removeprefix('torch.')}{' channels-last' if cl else ''}"] = v = validate(
                images[0], dirs[0], masks[0], model, dtype, cl, cfg.chunk)
            print(f"    valid {str(dtype).removeprefix('torch.')}: candidates max|native-ref| "
                  f"{v['candidates_max_abs_err']:.2e}, scores {v['scores_max_abs_err']:.2e}")

    def per_image(search) -> tuple[float, list]:
        picks = []

        def all_images():
            picks.clear()
            for x, d, m in zip(images, dirs, masks):
                picks.append(search(x, d, m))
        t = timed(all_images, device, reps=2 if device.type == "cpu" else 3)
        return t / len(images), list(picks)

    ways = {}
    if naive:
        ways["(a) per-candidate loop"] = lambda x, d, m: search_loop(model, x, d, m)
    for label, kw in WAYS.items():
        if (kw.get("compile") and not compile_model) or (kw.get("amp") and not bf16):
            continue
        ways[label] = (lambda kw: lambda x, d, m: search_image(
            model, x, d, m, "l1", "argmin", cfg.chunk, exact_top=cfg.exact_top, **kw))(kw)
    timings, picks = {}, {}
    with torch.no_grad():
        for label, search in ways.items():
            timings[label], picks[label] = per_image(search)

    # every way decides in fp32: all must find the fp32 optimum's score
    ref = picks["(b) fp32"]
    for k, p in picks.items():
        for (_, s), (_, s_ref) in zip(p, ref):
            assert abs(s - s_ref) <= 1e-5 * max(1.0, abs(s_ref)), f"{k}: best {s} != {s_ref}"

    base = timings.get("(a) per-candidate loop", timings["(b) fp32"])
    runs = {}
    for k, t in timings.items():
        tflops = search_flops / t / 1e12
        share = 100 * tflops * 1e12 / (peak_bf16 if "bf16" in k else peak)
        print(f"    {k:40s} {t * 1e3:10.2f} ms/image  x{base / t:6.2f}  "
              f"{tflops:7.3f} TFLOP/s ({share:5.1f}% of its peak)")
        runs[k] = {"ms_per_image": t * 1e3, "speedup": base / t, "tflops": tflops, "percent_of_peak": share}
    fastest = min((k for k in timings if not k.startswith("(a)")), key=timings.get)
    print(f"# fastest: {fastest}")
    with torch.inference_mode():
        bw = {name: op_bandwidth(images[0].to(dtype), dirs[0], masks[0], dtype, cl, cfg.chunk, device, copy_bw)
              for name, dtype, cl in (("float32", torch.float32, False),
                                      ("bfloat16 channels-last", torch.bfloat16, True))[:2 if bf16 else 1]}
    result["runs"] = {"validation": info, "timings": runs, "fastest": fastest, "ops": bw}
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="cpu-small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, help="images to time (default: the config's)")
    p.add_argument("--chunk", type=int, help="candidates per forward (default: the config's)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd ways (f), (g)")
    p.add_argument("--no-naive", action="store_true", help="skip (a), the per-candidate loop")
    p.add_argument("--all-ways", action="store_true",
                   help="also time the bf16 ways where the device only emulates bf16 (slow)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    cfg = CONFIGS[args.config]
    cfg = Config(**{**asdict(cfg), **{k: v for k, v in (("images", args.images),
                                                        ("chunk", args.chunk)) if v}})
    result = run(cfg, torch.device(args.device), not args.no_compile, not args.no_naive, args.all_ways)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
