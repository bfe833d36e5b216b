"""The fast paths chosen from what the machine computes natively ("auto" settings):
detection against /proc/cpuinfo, both branches through MLSYS_CPU_BF16, the rules for each
kind of work, and that a stage computes with and records the resolved values."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlsys import hardware
from mlsys.params import AttackParams, AugmentParams, Method1Params, Method2Params, ParamsError, _build

CPU = torch.device("cpu")


def cpuinfo_flags() -> set[str] | None:
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def test_detection_agrees_with_the_cpu_flags(monkeypatch):
    """Without the override, bf16 is native exactly where the kernel lists amx_tile or
    avx512_bf16 (an independent reading of CPUID)."""
    monkeypatch.delenv(hardware.CPU_BF16_ENV, raising=False)
    flags = cpuinfo_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    assert hardware.cpu_bf16_native() == bool({"amx_tile", "avx512_bf16"} & flags)
    assert hardware.bf16_native(CPU) == hardware.cpu_bf16_native()


@pytest.mark.parametrize("value, native", [("1", True), ("0", False)])
def test_the_override_picks_either_branch(monkeypatch, value, native):
    monkeypatch.setenv(hardware.CPU_BF16_ENV, value)
    assert hardware.cpu_bf16_native() is native
    # method two's screen follows the CPU; attack loops never take bf16 on a CPU by "auto"
    assert hardware.use_bf16("auto", CPU, cpu=True) is native
    assert hardware.use_bf16("auto", CPU, cpu=False) is False
    # explicit settings force it either way
    assert hardware.use_bf16(True, CPU, cpu=False) is True
    assert hardware.use_bf16(False, CPU, cpu=True) is False
    assert ("native" if native else "emulated") in hardware.describe(CPU)


def test_a_bad_override_is_one_line(monkeypatch):
    monkeypatch.setenv(hardware.CPU_BF16_ENV, "yes")
    with pytest.raises(ParamsError, match=r"^MLSYS_CPU_BF16 = 'yes' is invalid; expected 0 or 1"):
        hardware.cpu_bf16_native()


def test_channels_last_auto_and_forced():
    assert hardware.use_channels_last("auto", CPU) is True
    assert hardware.use_channels_last(False, CPU) is False
    assert hardware.use_channels_last(True, CPU) is True


@pytest.mark.parametrize("value", ["auto", True, False])
def test_params_take_auto_true_false(value):
    cfg = _build(Method2Params, {"amp": value, "channels_last": value}, "augment.method2.")
    assert cfg.amp == value and cfg.channels_last == value


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_params_refuse_other_switch_values(value):
    with pytest.raises(ParamsError, match=r"^params: augment.method2.amp = .* is invalid; "
                                          r"expected true, false or \"auto\"$"):
        _build(Method2Params, {"amp": value}, "augment.method2.")


@pytest.mark.parametrize("value, native", [("1", True), ("0", False)])
def test_resolve_gives_each_kind_of_work_its_rule(monkeypatch, value, native):
    monkeypatch.setenv(hardware.CPU_BF16_ENV, value)
    m2 = hardware.resolve(Method2Params(), CPU, bf16_on_cpu=True)
    assert (m2.amp, m2.channels_last) == (native, True)
    for section in (Method1Params(amp="auto"), AttackParams(amp="auto")):
        resolved = hardware.resolve(section, CPU, bf16_on_cpu=False)
        assert (resolved.amp, resolved.channels_last) == (False, True)
    assert hardware.resolve(m2, CPU, bf16_on_cpu=True) == m2  # resolving again changes nothing
    assert hardware.resolved_params("augment.method2", m2) == {
        "augment.method2.amp.resolved": native, "augment.method2.channels_last.resolved": True}


@pytest.mark.parametrize("value, native", [("1", True), ("0", False)])
def test_the_method_two_set_records_the_resolved_precision(tmp_path, monkeypatch, value, native):
    """build_set computes with the resolved settings and records them in the dataset's
    provenance (the resume fingerprint hashes the same settings)."""
    import json

    from test_data import fake_fold, write_fold

    from mlsys import data, prepare
    from mlsys.augment import build_set
    from mlsys.method2 import METHOD as METHOD2
    from mlsys.model import UNet
    from mlsys.params import DataParams

    monkeypatch.setenv(hardware.CPU_BF16_ENV, value)
    images, masks, types = fake_fold(9, 16)
    clean = tmp_path / "clean.h5"
    prepare.prepare(DataParams(source="pannuke", pannuke_path=str(write_fold(tmp_path / "src", 2, images, masks, types)),
                            fold=2), clean, progress=False)
    torch.manual_seed(0)
    model = UNet(n_classes=6, base=2, depth=2).eval()
    cfg = AugmentParams(method2=Method2Params(batch_size=3, chunk=729))
    out = tmp_path / "method2.h5"
    build_set(METHOD2, model, clean, out, cfg, CPU, {}, progress=False)
    settings = json.loads(data.read_attrs(out)["settings"])
    assert settings["amp"] is native and settings["channels_last"] is True
