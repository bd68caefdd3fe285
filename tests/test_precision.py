"""Precision by capability: ``auto`` picks bf16 only where the device runs it natively, and every path uses it."""

from __future__ import annotations

import pytest
import torch

from vl import precision as precision_module
from vl.errors import UserError
from vl.precision import accelerate_mixed_precision, autocast, resolve_precision
from vl.train.loop import TrainConfig, make_accelerator


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Set whether the CPU 'has' native bf16, and forget which choices were already printed."""

    def set_native(native: bool) -> None:
        def probe() -> bool:
            return native

        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", probe)
        monkeypatch.setattr(precision_module, "_announced", set())

    return set_native


def test_auto_follows_the_capability_probe(cpu_bf16, capsys):
    cpu_bf16(True)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") == "bf16"
    printed = capsys.readouterr().err
    assert printed.count("precision: auto -> bf16 (native bf16 on ") == 1  # said once per process
    cpu_bf16(False)
    assert resolve_precision("auto", "cpu") == "fp32"
    assert "precision: auto -> fp32 (no native bf16 on " in capsys.readouterr().err


def test_explicit_choices_and_a_slow_bf16_warning(cpu_bf16, capsys):
    cpu_bf16(False)
    assert resolve_precision("fp32") == "fp32" and resolve_precision("no") == "fp32"
    assert capsys.readouterr().err == ""
    assert resolve_precision("bf16", what="--precision") == "bf16"  # honoured, with a warning
    err = capsys.readouterr().err
    assert err.startswith("warning: --precision=bf16 on ") and "no native bf16: this will be slow" in err
    assert err.count("\n") == 1
    cpu_bf16(True)
    assert resolve_precision("bf16") == "bf16" and capsys.readouterr().err == ""
    with pytest.raises(UserError, match="train.precision must be one of auto, fp32, bf16, fp16, got 'half'"):
        resolve_precision("half")


def test_autocast_dtype_and_accelerate_words():
    with autocast("bf16", "cpu"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    assert [accelerate_mixed_precision(p) for p in ("fp32", "bf16", "fp16")] == ["no", "bf16", "fp16"]


def test_training_defaults_to_auto_and_resolves_it(cpu_bf16):
    assert TrainConfig().precision == "auto"
    cpu_bf16(False)
    assert make_accelerator("auto", cpu=True).mixed_precision == "no"
    cpu_bf16(True)
    assert make_accelerator("auto", cpu=True).mixed_precision == "bf16"
    assert make_accelerator("fp32", cpu=True).mixed_precision == "no"


def test_detector_and_extraction_default_to_auto():
    import inspect

    from region_features.extract import extract_features
    from vl.train.detector import DetectorRunConfig

    assert DetectorRunConfig().train.precision == "auto"
    assert inspect.signature(extract_features).parameters["precision"].default == "auto"


def test_machine_info_names_the_cpu_and_its_bf16(monkeypatch):
    from vl import precision

    monkeypatch.setattr(precision, "bf16_native", lambda device="cpu": False)
    info = precision.machine_info()
    assert info["bf16_native"] is False and isinstance(info["cpu"], str) and info["cpu"]
    assert info["bf16"] == "not native" and info["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX")
