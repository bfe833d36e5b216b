"""CUDA build check without a GPU: compile csrc/ the way the GPU build does, fail on our warnings.

    python benchmarks/cuda_check.py              # what `make cuda-check` and .ci/run run
    python benchmarks/cuda_check.py --dry-run    # print the commands only (no download, no compile)

Fetches with pip, into a cache OUTSIDE the repository (--cache, default $MLSYS_CUDA_CACHE or
~/.cache/mlsys/cuda-check): the CUDA wheel of the torch pinned in constraints.txt, of which
only the headers are unpacked (it is never installed nor imported), and nvcc with the CUDA
headers from the `cuda-toolkit` release that torch's metadata pins (nvcc, crt, runtime, nvvm,
cccl), plus cuobjdump. Then compiles csrc/ops.cpp, csrc/ops_cpu.cpp (g++) and csrc/ops_cuda.cu
(nvcc, mlsys._build.CUDA_ARCHS: sm_80, sm_90 and compute_90 PTX) with the flags of
mlsys/_build.py and those torch's build helper adds, links the shared object, lists the
architectures in it with cuobjdump and checks them against CUDA_ARCHS.

Fails (exit 1, one line `cuda-check: error: ...` at the end) on a compile error, on any
warning from csrc/ or ptxas, on architectures other than CUDA_ARCHS, and when a download
fails (naming what could not be fetched). Warnings from torch's or CUDA's headers are shown,
not counted. Nothing in the repository or in .venv is touched; the build lands in CACHE/build.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mlsys import _build  # noqa: E402  (flags and architectures: the one place)

CSRC = ROOT / "csrc"
# the cuda-toolkit extras that give nvcc (with crt, runtime, nvvm) and cccl's headers
TOOLKIT_EXTRAS = "nvcc,cccl"
# CUDA 13.0 has no cuobjdump wheel; 13.2 is the oldest, and it reads 13.0's objects
CUOBJDUMP = "nvidia-cuda-cuobjdump==13.2.86"
# what torch's build helper (BuildExtension) adds for `mlsys._C`, besides its COMMON_NVCC_FLAGS
TORCH_DEFINES = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
# a compiler's warning line: `...: warning: ...`, `...: warning #177-D: ...`, `ptxas warning : ...`
WARNING = re.compile(r"\bwarning(?: #[\w-]+)? ?:")
# ours: g++ `csrc/x.cpp:12:3: warning:`, nvcc `csrc/x.cu(12): warning #177-D:`, and every
# ptxas/nvlink/nvcc driver warning (they concern our kernels and our flags)
OURS = re.compile(r"^(?:\./)?csrc/[^\s:(]+(?::\d+|\(\d+\)).*\bwarning\b|^(?:ptxas|nvlink|nvcc|fatbinary) warning")


class CheckError(Exception):
    """A failed check: one line for the user."""


def say(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- fetch
def torch_pin() -> str:
    """The torch version pinned in constraints.txt (the CPU set-up's torch)."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.fullmatch(r"\s*torch\s*==\s*([\w.]+)\s*(#.*)?", line)
        if m:
            return m.group(1)
    raise CheckError("constraints.txt pins no torch==VERSION")


def default_cache() -> Path:
    return Path(os.environ.get("MLSYS_CUDA_CACHE") or Path.home() / ".cache/mlsys/cuda-check")


def pip_download(dest: Path, reqs: list[str], deps: bool) -> None:
    """``pip download`` from the configured index (PIP_INDEX_URL, else pip's default) only:
    no pip.conf, find-links, extra indexes nor constraints, which on a CPU machine point at the
    local +cpu torch (and the Makefile's PIP_CONSTRAINT pins the CPU set-up). PIP_CERT,
    proxies, timeouts and retries from the environment still apply."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT", "PIP_NO_INDEX")}
    env["PIP_CONFIG_FILE"] = os.devnull  # pip then reads no configuration file at all
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-cache-dir",
           "--progress-bar", "off", "--disable-pip-version-check", "-d", str(dest),
           *([] if deps else ["--no-deps"]), *reqs]
    say(f"   pip {shlex.join(cmd[3:])}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        errors = [ln.strip() for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] \
            or proc.stderr.strip().splitlines()[-1:] or [f"pip exited {proc.returncode}"]
        none = "(from versions: none)" in proc.stderr
        why = " (index unreachable, or no such release for this Python)" if none else ""
        raise CheckError(f"could not fetch {' '.join(reqs)} with pip{why}: {errors[-1]}")


def toolkit_pin(wheel: Path) -> str:
    """The cuda-toolkit version that the torch wheel's metadata requires (e.g. 13.0.3)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    m = re.search(r"^Requires-Dist: cuda-toolkit\[[^\]]*\]\s*==\s*([\d.]+)", text, re.M)
    if not m:
        raise CheckError(f"{wheel.name}: its metadata requires no cuda-toolkit==VERSION")
    return m.group(1)


def unpack(wheel: Path, prefix: str, dest: Path, strip: str = "") -> int:
    """Extract the members of ``wheel`` under ``prefix`` into ``dest`` (less ``strip``),
    keeping their executable bits; returns how many files."""
    n = 0
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if not info.filename.startswith(prefix) or info.is_dir():
                continue
            target = dest / info.filename[len(strip):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            mode = info.external_attr >> 16
            if mode & 0o111:
                target.chmod(0o755)
            n += 1
    return n


def tools_dir(cache: Path) -> Path:
    """Where the tools for this torch pin and this Python are unpacked: CACHE/torch-V-cpXY."""
    return cache / f"torch-{torch_pin()}-cp{sys.version_info.major}{sys.version_info.minor}"


def fetch(cache: Path) -> Path:
    """The unpacked tools, :func:`tools_dir` with torch/ (headers) and cuda/ (a CUDA_HOME),
    fetched when missing into a temporary folder beside it, renamed only when complete."""
    home = tools_dir(cache)
    version, py = torch_pin(), f"cp{sys.version_info.major}{sys.version_info.minor}"
    if (home / "fetched.json").is_file():
        say(f"== fetch: cached in {home}")
        return home
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{home.name}.", dir=cache))
    try:
        wheels = tmp / "wheels"
        say(f"== fetch torch=={version} (CUDA wheel, headers only) into {home}")
        pip_download(wheels, [f"torch=={version}"], deps=False)
        found = sorted(wheels.glob("torch-*.whl"))
        name = found[0].name if found else "nothing"
        if len(found) != 1 or "+" in name or not name.startswith(f"torch-{version}-{py}-"):
            raise CheckError(f"pip fetched {name}, not torch {version}'s CUDA wheel for {py} (a +cpu or other build)")
        with zipfile.ZipFile(found[0]) as z:
            if "torch/include/c10/cuda/CUDAStream.h" not in z.namelist():
                raise CheckError(f"{name} has no torch/include/c10/cuda/ headers: not a CUDA build of torch")
        toolkit = toolkit_pin(found[0])
        unpack(found[0], "torch/include/", tmp / "torch", strip="torch/")
        unpack(found[0], "torch/utils/cpp_extension.py", tmp / "torch", strip="torch/")
        fetched_mb = found[0].stat().st_size / 1e6
        found[0].unlink()  # ~0.5 GB, no longer needed
        say(f"== fetch cuda-toolkit[{TOOLKIT_EXTRAS}]=={toolkit} (torch {version}'s pin) and {CUOBJDUMP}")
        pip_download(wheels, [f"cuda-toolkit[{TOOLKIT_EXTRAS}]=={toolkit}", CUOBJDUMP], deps=True)
        names = sorted(w.name for w in wheels.glob("*.whl"))
        fetched_mb += sum(w.stat().st_size for w in wheels.glob("*.whl")) / 1e6
        for wheel in sorted(wheels.glob("nvidia_*.whl")):
            with zipfile.ZipFile(wheel) as z:
                top = {m.group(0) for n in z.namelist() if (m := re.match(r"nvidia/cu\d+/", n))}
            for prefix in top:  # nvidia/cu13/{bin,include,lib,nvvm}: one CUDA_HOME
                unpack(wheel, prefix, tmp / "cuda", strip=prefix)
        shutil.rmtree(wheels)
        if not (tmp / "cuda/bin/nvcc").is_file():
            raise CheckError(f"no nvcc in the wheels fetched ({', '.join(names)})")
        (tmp / "fetched.json").write_text(json.dumps({"torch": found[0].name, "cuda_toolkit": toolkit,
                                                      "wheels": names, "MB": round(fetched_mb)}, indent=1) + "\n")
        tmp.rename(home)
        kept_mb = sum(f.stat().st_size for f in home.rglob("*") if f.is_file()) / 1e6
        say(f"   fetched {fetched_mb:.0f} MB of wheels, kept {kept_mb:.0f} MB unpacked")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return home


# --------------------------------------------------------------------------- compile
def common_nvcc_flags(torch_root: Path) -> list[str]:
    """torch's COMMON_NVCC_FLAGS, read from the fetched release's cpp_extension.py (not imported)."""
    tree = ast.parse((torch_root / "utils/cpp_extension.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COMMON_NVCC_FLAGS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise CheckError("torch/utils/cpp_extension.py defines no COMMON_NVCC_FLAGS")


def commands(home: Path, out: Path, jobs: int, torch_nvcc_flags: list[str]
             ) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """The compile commands [(source, argv)] and the link command, as setup.py's build
    would run them (torch's BuildExtension: -std=c++20, -fPIC, its defines and nvcc flags)."""
    torch_root, cuda = home / "torch", home / "cuda"
    includes = [f"-I{torch_root / 'include'}", f"-I{torch_root / 'include/torch/csrc/api/include'}",
                f"-I{cuda / 'include'}", f"-I{sysconfig.get_paths()['include']}"]
    stamp = _build.digest_define(CSRC)
    # setuptools compiles C++ with Python's CFLAGS (-Wall among them), then the extension's own
    py_cflags = shlex.split(sysconfig.get_config_var("CFLAGS") or "")
    cxx = ["g++", *py_cflags, "-fPIC", *includes]
    cxx_post = [*_build.CXX_FLAGS, _build.CUDA_DEFINE, stamp, *TORCH_DEFINES, "-std=c++20"]
    nvcc = [str(cuda / "bin/nvcc"), *includes]
    nvcc_post = [*torch_nvcc_flags, "--compiler-options", "-fPIC", *_build.NVCC_FLAGS,
                 _build.CUDA_DEFINE, stamp, *TORCH_DEFINES, *_build.gencode_flags(), "-std=c++20",
                 # our additions: the host side of the .cu with -Wall too (as the .cpp files
                 # get from Python's CFLAGS), the architectures compiled in parallel
                 "-Xcompiler", "-Wall", f"--threads={jobs}"]
    compile_cmds = []
    for src in sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.cu")):
        rel, obj = src.relative_to(ROOT), out / f"{src.name}.o"
        if src.suffix == ".cu":
            compile_cmds.append((str(rel), [*nvcc, "-c", str(rel), "-o", str(obj), *nvcc_post]))
        else:
            compile_cmds.append((str(rel), [*cxx, "-c", str(rel), "-o", str(obj), *cxx_post]))
    cudart = sorted((cuda / "lib").glob("libcudart.so*")) or [cuda / "lib/libcudart.so"]
    # torch's own libraries are not fetched (headers only): their symbols stay undefined, as
    # in any extension, and resolve when torch loads it
    link = ["g++", "-shared", *(str(out / f"{Path(s).name}.o") for s, _ in compile_cmds), *_build.LD_FLAGS,
            str(cudart[0]), f"-Wl,-rpath,{cuda / 'lib'}", "-o", str(out / "_C.so")]
    return compile_cmds, link


def run_parallel(cmds: list[tuple[str, list[str]]], jobs: int) -> dict[str, tuple[int, str, float]]:
    """Run the compiles, at most ``jobs`` at once, the longest (nvcc) first:
    source -> (exit status, output, seconds)."""
    todo = sorted(cmds, key=lambda c: not c[0].endswith(".cu"))
    running, done = {}, {}
    while todo or running:
        while todo and len(running) < jobs:
            src, argv = todo.pop(0)
            log = tempfile.TemporaryFile("w+")
            running[src] = (subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True),
                            log, time.monotonic())
        time.sleep(0.2)
        for src, (proc, log, t0) in list(running.items()):
            if proc.poll() is not None:
                log.seek(0)
                done[src] = (proc.returncode, log.read(), time.monotonic() - t0)
                log.close()
                del running[src]
    return done


def expected_archs() -> tuple[set[str], set[str]]:
    """(cubin archs, PTX archs) that CUDA_ARCHS asks for, named as cuobjdump names them."""
    elf, ptx = set(), set()
    for flag in _build.gencode_flags():
        code = flag.rsplit("code=", 1)[1]
        (elf if code.startswith("sm_") else ptx).add(code.replace("compute_", "sm_"))
    return elf, ptx


def cuobjdump(tool: Path, what: str, so: Path) -> str:
    proc = subprocess.run([str(tool), what, str(so)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckError(f"cuobjdump {what} {so.name} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return proc.stdout


def stack_frames(tool: Path, so: Path) -> dict[str, list[int]]:
    """arch -> the STACK bytes of each kernel that has a stack frame (register spills, mostly),
    from ``cuobjdump --dump-resource-usage``: shown, not failed on (ptxas chooses them)."""
    frames, arch = {}, "?"
    for line in cuobjdump(tool, "--dump-resource-usage", so).splitlines():
        if m := re.match(r"\s*arch = (\S+)", line):
            arch = m.group(1)
        elif (m := re.search(r"\bSTACK:(\d+)", line)) and int(m.group(1)) > 0:
            frames.setdefault(arch, []).append(int(m.group(1)))
    return frames


def archs_in(listing: str) -> tuple[set[str], set[str]]:
    """(cubin archs, PTX archs) of ``cuobjdump --list-elf`` / ``--list-ptx`` output
    (`ELF file    1: _C.1.sm_80.cubin`, `PTX file    1: _C.1.sm_90.ptx`)."""
    return tuple(set(re.findall(rf"\.(sm_\d+[af]?)\.{kind}\b", listing)) for kind in ("cubin", "ptx"))


def check(home: Path, jobs: int) -> None:
    out = home.parent / "build"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    compile_cmds, link = commands(home, out, jobs, common_nvcc_flags(home / "torch"))
    t0 = time.monotonic()
    say(f"== compile {', '.join(s for s, _ in compile_cmds)} ({jobs} jobs; CUDA_ARCHS {_build.CUDA_ARCHS})")
    done = run_parallel(compile_cmds, jobs)
    ours, failed = [], []
    for src, argv in compile_cmds:
        rc, log, secs = done[src]
        # nvcc's front end reports a host-code warning once per pass: each distinct line counts once
        warnings = list(dict.fromkeys(ln for ln in log.splitlines() if WARNING.search(ln)))
        mine = [ln for ln in warnings if OURS.search(ln)]
        say(f"   {src}: {'ok' if rc == 0 else f'exit {rc}'} in {secs:.0f} s, {len(mine)} warning(s) from csrc/"
            + (f", {len(warnings) - len(mine)} from headers (not counted)" if len(warnings) > len(mine) else ""))
        if rc != 0 or warnings:
            print(f"   $ {shlex.join(argv)}\n{log.rstrip()}", flush=True)
        ours += mine
        if rc != 0:
            errors = [ln for ln in log.splitlines() if re.search(r"\berror\b", ln)] or log.strip().splitlines()[-1:]
            failed.append(f"{src} does not compile: {errors[0] if errors else f'exit {rc}'}")
    if failed:
        raise CheckError(failed[0] + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""))
    proc = subprocess.run(link, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout + proc.stderr, flush=True)
        raise CheckError(f"linking {out / '_C.so'} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    say(f"== compiled and linked {out / '_C.so'} ({(out / '_C.so').stat().st_size / 1e6:.1f} MB) "
        f"in {time.monotonic() - t0:.0f} s")
    tool = home / "cuda/bin/cuobjdump"
    listing = "".join(cuobjdump(tool, what, out / "_C.so") for what in ("--list-elf", "--list-ptx"))
    elf, ptx = archs_in(listing)
    say("== cuobjdump --list-elf / --list-ptx\n" + listing.rstrip())
    frames = stack_frames(tool, out / "_C.so")
    say("   kernels with a stack frame (spills; not counted): "
        + ("; ".join(f"{a}: {len(b)} ({min(b)}-{max(b)} bytes)" for a, b in sorted(frames.items())) or "none"))
    want_elf, want_ptx = expected_archs()
    if (elf, ptx) != (want_elf, want_ptx):
        raise CheckError(f"_C.so holds cubins {sorted(elf)} and PTX {sorted(ptx)}; CUDA_ARCHS "
                         f"{_build.CUDA_ARCHS!r} asks for cubins {sorted(want_elf)} and PTX {sorted(want_ptx)}")
    if ours:
        say("== warnings from csrc/:\n" + "\n".join(f"   {w}" for w in ours))
        raise CheckError(f"{len(ours)} warning(s) from csrc/, the first: {ours[0]}")
    say(f"cuda-check: ok: cubins {' '.join(sorted(elf))}, PTX {' '.join(sorted(ptx)).replace('sm_', 'compute_')}, "
        f"no warning from csrc/")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cuda_check.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=None,
                    help="folder for the fetched tools and the build, outside the repository "
                         "(default $MLSYS_CUDA_CACHE or ~/.cache/mlsys/cuda-check)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="compiles at once, and nvcc's --threads (default: the CPU count)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands; fetch and compile nothing")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs should be at least 1, got {args.jobs}")
    cache = (args.cache or default_cache()).expanduser().resolve()
    if cache == ROOT or ROOT in cache.parents:
        ap.error(f"--cache {cache} lies inside the repository; give a folder outside it")
    t0 = time.monotonic()
    try:
        if args.dry_run:
            home = tools_dir(cache)
            fetched = (home / "torch/utils/cpp_extension.py").is_file()
            flags = common_nvcc_flags(home / "torch") if fetched else ["<torch's COMMON_NVCC_FLAGS>"]
            compile_cmds, link = commands(home, cache / "build", args.jobs, flags)
            for _, argv_ in compile_cmds:
                print(shlex.join(argv_))
            print(shlex.join(link))
            return 0
        check(fetch(cache), args.jobs)
    except CheckError as err:
        print(f"cuda-check: error: {err}", file=sys.stderr, flush=True)
        return 1
    say(f"cuda-check: {time.monotonic() - t0:.0f} s; cache {cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
