"""The GPU-less CUDA build check (benchmarks/cuda_check.py, `make cuda-check`), without its
0.63 GB download and its compile (.ci/run runs those): the architectures agree with setup.py's
default and with torch's reading of them, the commands carry the project's flags, warnings
are told apart by file, and a refused wheel or an unreachable index ends in one line naming
what could not be fetched (a local index only: no network)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mlsys import _build

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks/cuda_check.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import cuda_check  # noqa: E402

PIN = cuda_check.torch_pin()  # constraints.txt's torch


def run_check(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_architectures_are_those_of_setup_py_and_torch(monkeypatch):
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    # torch's build helper reads setup.py's default (TORCH_CUDA_ARCH_LIST = CUDA_ARCHS) into
    # the same -gencode flags that the check compiles with
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", _build.CUDA_ARCHS)
    assert set(_get_cuda_arch_flags([])) == set(_build.gencode_flags())
    assert 'os.environ["TORCH_CUDA_ARCH_LIST"] = CUDA_ARCHS' in (ROOT / "setup.py").read_text()
    # A100, H100/H200 natively, PTX of the newest for later GPUs (what docs/native-ops.md promises)
    assert cuda_check.expected_archs() == ({"sm_80", "sm_90"}, {"sm_90"})
    listing = ("ELF file    1: _C.1.sm_80.cubin\nELF file    2: _C.2.sm_90.cubin\n"
               "PTX file    1: _C.1.sm_90.ptx\n")
    assert cuda_check.archs_in(listing) == cuda_check.expected_archs()
    with pytest.raises(ValueError, match="9.x"):
        _build.gencode_flags("8.0;9.x")


def test_dry_run_compiles_with_the_project_flags(tmp_path):
    proc = run_check("--dry-run", "--cache", str(tmp_path), "--jobs", "2")
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(line) for line in proc.stdout.splitlines()]
    by_source = {argv[argv.index("-c") + 1]: argv for argv in lines if "-c" in argv}
    assert set(by_source) == {"csrc/ops.cpp", "csrc/ops_cpu.cpp", "csrc/ops_cuda.cu"}
    stamp = _build.digest_define(ROOT / "csrc")
    tools = cuda_check.tools_dir(tmp_path)
    for src, argv in by_source.items():
        assert "-w" not in argv and stamp in argv and _build.CUDA_DEFINE in argv, src
        assert f"-I{tools / 'torch/include'}" in argv and f"-I{tools / 'cuda/include'}" in argv, src
        if src.endswith(".cu"):
            assert argv[0] == str(tools / "cuda/bin/nvcc")
            assert set(_build.NVCC_FLAGS + _build.gencode_flags()) <= set(argv) and "--threads=2" in argv
        else:
            assert argv[0] == "g++" and set(_build.CXX_FLAGS) <= set(argv) and "-Wall" in argv
    link = lines[-1]
    assert link[:2] == ["g++", "-shared"] and link[-1] == str(tmp_path / "build/_C.so")
    assert not list(tmp_path.iterdir()), "a dry run fetches nothing"


def test_only_warnings_from_csrc_count():
    def ours(line):
        return bool(cuda_check.WARNING.search(line) and cuda_check.OURS.search(line))

    assert ours('csrc/ops_cuda.cu(253): warning #177-D: variable "n" was declared but never referenced')
    assert ours("csrc/ops.cpp:12:7: warning: unused variable 'n' [-Wunused-variable]")
    assert ours("ptxas warning : Registers are spilled to local memory in function 'k'")
    assert not ours("/cache/torch/include/c10/util/Half.h:3:1: warning: something in torch")
    assert not ours('Remark: The warnings can be suppressed with "-diag-suppress <warning-number>"')
    assert not ours("csrc/ops.cpp:14:10: note: in expansion of a warning-free macro")


@pytest.mark.parametrize("args, message", [
    (["--jobs", "0"], "--jobs should be at least 1, got 0"),
    (["--cache", "build/cuda"], "lies inside the repository"),
    (["--nope"], "unrecognized arguments: --nope"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, message):
    proc = run_check(*args)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_names_the_cache_and_the_dry_run():
    proc = run_check("--help")
    assert proc.returncode == 0 and "MLSYS_CUDA_CACHE" in proc.stdout and "--dry-run" in proc.stdout


def local_index(folder: Path, wheel_name: str, files: dict[str, str]) -> str:
    """A file:// package index holding one fake torch wheel (metadata and ``files``)."""
    version = wheel_name.split("-")[1]
    (folder / "torch").mkdir(parents=True)
    with zipfile.ZipFile(folder / "torch" / wheel_name, "w") as z:
        info = f"torch-{version}.dist-info"
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: false\n")
        z.writestr(f"{info}/RECORD", "")
        for name, text in files.items():
            z.writestr(name, text)
    (folder / "torch/index.html").write_text(f'<a href="{wheel_name}">{wheel_name}</a>\n')
    return folder.as_uri()


def pip_env(index_url: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(PIP_INDEX_URL=index_url, PIP_RETRIES="0", PIP_DEFAULT_TIMEOUT="5")
    return env


def wheel_tag() -> str:
    from packaging import tags

    return str(next(iter(tags.sys_tags())))  # the interpreter's best tag, e.g. cp311-cp311-manylinux_2_36_x86_64


@pytest.mark.parametrize("local, files, message", [
    ("+cpu", {}, f"not torch {PIN}'s CUDA wheel"),  # what this machine's own pip config would pick
    ("", {"torch/include/ATen/ATen.h": ""}, "has no torch/include/c10/cuda/ headers"),
])
def test_a_cpu_torch_wheel_is_refused(tmp_path, local, files, message):
    name = f"torch-{PIN}{local}-{wheel_tag()}.whl"
    index = local_index(tmp_path / "index", name, files)
    proc = run_check("--cache", str(tmp_path / "cache"), env=pip_env(index))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("cuda-check: error: ") and message in last, proc.stderr
    assert name in last or "headers" in message
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [], "nothing half-fetched is left"


def test_an_unreachable_index_names_what_it_could_not_fetch(tmp_path):
    proc = run_check("--cache", str(tmp_path / "cache"), env=pip_env("http://127.0.0.1:9/simple"))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith(f"cuda-check: error: could not fetch torch=={PIN}"), proc.stderr
    assert "Traceback" not in proc.stderr
