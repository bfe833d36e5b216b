"""How the native ops (csrc/) are compiled: the one place for the compiler flags and for the
content digest that ties a build to its sources. Read by setup.py (without importing torch
or the rest of the package) and by mlsys.ops (JIT build, stale-build check)."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

# -fno-trapping-math lets GCC vectorise the branch-free exp/log of ops_cpu.cpp; torch adds -std
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
NVCC_FLAGS = ["-O3"]
LD_FLAGS = ["-fopenmp"]
CUDA_DEFINE = "-DMLSYS_WITH_CUDA"
# GPU architectures (TORCH_CUDA_ARCH_LIST syntax): native code for A100 (8.0) and H100/H200
# (9.0), plus PTX of the newest, which the driver JIT-compiles for newer GPUs. setup.py's
# default and benchmarks/cuda_check.py both read it.
CUDA_ARCHS = "8.0;9.0+PTX"


def gencode_flags(archs: str = CUDA_ARCHS) -> list[str]:
    """nvcc's -gencode flags for an arch list such as "8.0;9.0+PTX" (as torch's build helper
    reads TORCH_CUDA_ARCH_LIST): sm_XY code per entry, compute_XY PTX where "+PTX"."""
    flags = []
    for entry in archs.replace(" ", ";").split(";"):
        if not entry:
            continue
        num = entry.removesuffix("+PTX").replace(".", "")
        if not re.fullmatch(r"\d+[af]?", num):
            raise ValueError(f"CUDA arch list {archs!r}: bad entry {entry!r}")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if entry.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def csrc_digest(folder: str | Path) -> str:
    """sha256 (first 16 hex digits) of every source file in ``folder`` (names and bytes):
    compiled into the extension, so a build can tell whether csrc/ changed since."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.suffix in (".cpp", ".cu", ".h", ".cuh"):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def digest_define(folder: str | Path) -> str:
    return f'-DMLSYS_CSRC_DIGEST="{csrc_digest(folder)}"'
