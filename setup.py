"""Build and install mlsys; compiles the native ops in csrc/ when present.

Install torch FIRST, then this package WITHOUT build isolation (the Makefile does both):
    pip install torch==2.13.0
    pip install --no-build-isolation --use-pep517 -e .
so the extension builds against the torch that is already installed instead of a
freshly downloaded (CUDA, several GB) one. CUDA sources (csrc/*.cu) are compiled
only when that torch has CUDA, for mlsys._build.CUDA_ARCHS (A100, H100/H200, and PTX for
newer GPUs) unless TORCH_CUDA_ARCH_LIST selects other architectures.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def native_extensions() -> tuple[list, dict]:
    """The extension mlsys._C from csrc/ (CPU always; CUDA kernels when torch has CUDA).

    MLSYS_NO_EXTENSION=1 skips it (mlsys.ops then JIT-compiles or uses the references);
    MLSYS_NO_CUDA=1 builds the CPU kernels only. The CUDA architectures come from
    TORCH_CUDA_ARCH_LIST (torch's build helper reads it), default mlsys._build.CUDA_ARCHS
    (torch's own default would be the visible GPUs only, or all of them without one).
    """
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp or os.environ.get("MLSYS_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sys.path.insert(0, ROOT)
    from mlsys._build import CUDA_ARCHS, CUDA_DEFINE, CXX_FLAGS, LD_FLAGS, NVCC_FLAGS, digest_define

    stamp = digest_define(os.path.join(ROOT, "csrc"))  # checked at load: a stale build is refused
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    with_cuda = bool(cu) and torch.version.cuda is not None and CUDA_HOME is not None \
        and os.environ.get("MLSYS_NO_CUDA") != "1"
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # torch reads an empty one as unset too
            os.environ["TORCH_CUDA_ARCH_LIST"] = CUDA_ARCHS
        ext = CUDAExtension("mlsys._C", cpp + cu,
                            extra_compile_args={"cxx": CXX_FLAGS + [CUDA_DEFINE, stamp],
                                                "nvcc": NVCC_FLAGS + [CUDA_DEFINE, stamp]},
                            extra_link_args=LD_FLAGS)
    else:
        ext = CppExtension("mlsys._C", cpp, extra_compile_args={"cxx": CXX_FLAGS + [stamp]},
                           extra_link_args=LD_FLAGS)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()

setup(
    name="mlsys",
    version="0.1.0",
    description="Robust U-Net segmentation of histology: adversarial training sets, DVC + MLflow",
    python_requires=">=3.11",
    packages=find_packages(include=["mlsys", "mlsys.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["mlsys = mlsys.cli:main"]},
    # torch is deliberately not listed: it is installed first, pinned (see Makefile).
    install_requires=[],
)
