"""The machine a stage runs on: which device it uses, and which fast paths ("auto"
settings) that device computes well.

bf16 autocast is fast only where the hardware has bf16 units: CUDA GPUs with native bf16
(Ampere and newer) and CPUs with AMX or AVX512-BF16 (recent Xeons). Elsewhere, e.g. on an
AVX2-only AMD EPYC or a laptop, PyTorch emulates bf16 and the same search runs ~8x slower
than in fp32 (docs/native-ops.md, "Fast paths chosen from the machine"). ``auto`` settings resolve here,
once per stage, to true or false; the resolved values are what results record (MLflow
params, metrics JSON, HDF5 provenance, resume fingerprints), while DVC sees ``auto``.

MLSYS_CPU_BF16=1 / 0 overrides the CPU detection (tests, or a CPU the queries misjudge).
Imports no mlflow, dvc or yaml (the GPU machines lack them).
"""
from __future__ import annotations

import dataclasses
import os
import platform

import torch

from .params import AUTO, ParamsError

CPU_BF16_ENV = "MLSYS_CPU_BF16"


def pick_device(name: str) -> torch.device:
    """"auto" (cuda if available), "cpu" or "cuda[:i]"; an unavailable GPU is a params error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise ParamsError(f"params: device {name!r} (train.device / augment.device) is not available "
                          f"on this machine ({torch.cuda.device_count()} CUDA devices); "
                          'expected "auto" or "cpu"')
    return device


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 matmuls and convolutions in hardware (AMX tiles or
    AVX512-BF16), as PyTorch's own CPUID queries see it; MLSYS_CPU_BF16=0/1 overrides."""
    override = os.environ.get(CPU_BF16_ENV)
    if override is not None:
        if override not in ("0", "1"):
            raise ParamsError(f"{CPU_BF16_ENV} = {override!r} is invalid; expected 0 or 1 (or unset: detect)")
        return override == "1"
    # private queries (torch/cpu/__init__.py), present since 2.3: a torch without them has
    # no way to tell, and emulated bf16 is the costly mistake, so the answer is then no
    queries = (getattr(torch.cpu, "_is_amx_tile_supported", None),
               getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(q is not None and bool(q()) for q in queries)


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU with bf16 units, or a CPU with
    AMX or AVX512-BF16 (:func:`cpu_bf16_native`)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_bf16_native()
    return False


def use_bf16(setting: bool | str, device: torch.device, cpu: bool) -> bool:
    """bf16 autocast: true/false force it; "auto" turns it on where ``device`` computes bf16
    natively, and on a CPU only where ``cpu`` allows (the attack loops keep fp32 on CPUs:
    bf16 changes their gradients, so conclusions would differ between CPUs)."""
    if setting != AUTO:
        return bool(setting)
    return bf16_native(device) and (device.type != "cpu" or cpu)


def use_channels_last(setting: bool | str, device: torch.device) -> bool:
    """Channels-last (NHWC) inputs: true/false force it; "auto" turns it on for CUDA and
    for CPUs (measured faster on both CPU kinds for this U-Net in fp32: docs/native-ops.md)."""
    if setting != AUTO:
        return bool(setting)
    return device.type in ("cuda", "cpu")


def resolve(cfg, device: torch.device, bf16_on_cpu: bool):
    """A copy of a params section whose ``amp`` and ``channels_last`` ("auto", true or false)
    are resolved for ``device``; the copy is what a stage computes with and records.
    ``bf16_on_cpu``: whether "auto" may choose bf16 on a CPU with bf16 units (method two's
    screen, whose winner fp32 decides) or not (attack loops, training)."""
    return dataclasses.replace(cfg, amp=use_bf16(cfg.amp, device, bf16_on_cpu),
                               channels_last=use_channels_last(cfg.channels_last, device))


def cpu_name() -> str:
    """The CPU model, as /proc/cpuinfo names it (elsewhere: what platform knows)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def machine() -> str:
    """The machine a result came from, in words: CPU model (and GPU when one is used), torch
    version and thread count. CPU results are bit-identical only for the same CPU model and
    thread count (docs/reproducibility.md)."""
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu_name()} ({os.cpu_count()} cores){gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def describe(device: torch.device) -> str:
    """The device and its bf16 support in words, for logs and results, e.g.
    "AMD EPYC (AVX2): bf16 emulated"."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}: bf16 {'native' if bf16_native(device) else 'emulated'}"
    caps = torch.backends.cpu.get_cpu_capability()
    forced = f", {CPU_BF16_ENV}={os.environ[CPU_BF16_ENV]}" if CPU_BF16_ENV in os.environ else ""
    return f"{cpu_name()} ({caps}): bf16 {'native' if cpu_bf16_native() else 'emulated'}{forced}"


def resolved_params(prefix: str, cfg) -> dict[str, bool]:
    """MLflow params of a resolved section's fast paths, ``<prefix>.amp.resolved`` and
    ``<prefix>.channels_last.resolved`` (beside the logged setting, possibly "auto")."""
    return {f"{prefix}.{k}.resolved": bool(getattr(cfg, k)) for k in ("amp", "channels_last")}
