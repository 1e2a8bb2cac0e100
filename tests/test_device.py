"""Device names, families, audit targets, and the --gpu check against the device present."""

import pytest

from kgen import device as dev
from kgen.cli import main


@pytest.mark.parametrize("raw, short, family", [
    ("NVIDIA H100 80GB HBM3", "h100", "hopper"),
    ("NVIDIA H100 PCIe", "h100", "hopper"),
    ("NVIDIA H200", "h200", "hopper"),
    ("NVIDIA GH200 480GB", "gh200", "hopper"),
    ("NVIDIA A100-SXM4-80GB", "a100", "ampere"),
    ("NVIDIA A100-PCIE-40GB", "a100", "ampere"),
    ("NVIDIA A10G", "a10g", "ampere"),
    ("NVIDIA A10", "a10", "ampere"),
    ("NVIDIA L40S", "l40s", "ada"),
    ("NVIDIA L40", "l40", "ada"),
    ("NVIDIA L4", "l4", "ada"),
    ("NVIDIA GeForce RTX 4090", "rtx4090", "ada"),
    ("NVIDIA RTX A6000", "rtxa6000", "ampere"),
    ("Tesla V100-SXM2-16GB", "v100", "volta"),
    ("Tesla T4", "t4", "turing"),
    ("NVIDIA B200", "b200", "blackwell"),
    ("h100", "h100", "hopper"),
    ("A100", "a100", "ampere"),
    ("interpreter", "interpreter", "interpreter"),
])
def test_normalize_and_family(raw, short, family):
    assert dev.normalize_gpu_name(raw) == short
    assert dev.family_of(raw) == family


def test_unknown_device_is_slugged_and_family_comes_from_compute_capability():
    assert dev.normalize_gpu_name("NVIDIA Foo X-9") == "foo-x-9"
    assert dev.family_of("NVIDIA Foo X-9") is None
    assert dev.family_of("NVIDIA Foo X-9", (9, 0)) == "hopper"
    assert dev.audit_target("NVIDIA Foo X-9", (8, 6)) == "sm_80"


@pytest.mark.parametrize("bad", ["", "   ", None, "---"])
def test_bad_names_raise_naming_the_value(bad):
    with pytest.raises(ValueError, match="gpu="):
        dev.normalize_gpu_name(bad)


def test_audit_targets():
    assert dev.audit_target("h100") == "sm_90"
    assert dev.audit_target("a100") == "sm_80"
    assert dev.audit_target("l40s") == "sm_80"
    assert dev.audit_target("v100") is None
    assert dev.pseudo_device("interpreter").audit_target is None


def _fake_h100():
    return dev.DeviceInfo(name="h100", full_name="NVIDIA H100 80GB HBM3", family="hopper",
                          compute_capability=(9, 0), sm_count=132, driver_version="550.54",
                          cuda_version="12.4")


def test_resolve_gpu_mismatch_says_what_was_found(monkeypatch):
    monkeypatch.setattr(dev, "detect_device", lambda index=0: _fake_h100())
    with pytest.raises(ValueError, match=r"'a100'.*NVIDIA H100 80GB HBM3"):
        dev.resolve_gpu("a100")
    found = dev.resolve_gpu("NVIDIA H100 80GB HBM3")
    assert found.name == "h100" and found.sm_count == 132
    assert found.to_dict()["compute_capability"] == "9.0"


def test_resolve_gpu_without_device(monkeypatch):
    monkeypatch.setattr(dev, "detect_device", lambda index=0: None)
    with pytest.raises(ValueError, match="no CUDA device was found"):
        dev.resolve_gpu("h100")
    assert dev.resolve_gpu("interpreter").is_pseudo
    assert dev.resolve_gpu("synthetic").family == "synthetic"


def test_default_gpu_name(monkeypatch):
    monkeypatch.delenv("KGEN_GPU", raising=False)
    monkeypatch.setattr(dev, "detect_device", lambda index=0: None)
    assert dev.default_gpu_name() == "interpreter"
    monkeypatch.setattr(dev, "detect_device", lambda index=0: _fake_h100())
    assert dev.default_gpu_name() == "h100"
    monkeypatch.setenv("KGEN_GPU", "NVIDIA A100-SXM4-80GB")
    assert dev.default_gpu_name() == "a100"


def test_cli_tune_refuses_a_gpu_that_is_not_there(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(dev, "detect_device", lambda index=0: None)
    code = main(["tune", "--gpu", "a100", "--db", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "a100" in err and "no CUDA device" in err and err.count("\n") == 1
    assert not (tmp_path / "a100").exists()
