"""generate()'s thread count: a documented default, restored afterwards; the wait policy reported."""

import os
import subprocess
import sys

import pytest
import torch

from runtime.threads import default_num_threads, torch_threads


def test_default_is_omp_num_threads_else_the_cpus_we_may_use(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_num_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_num_threads() == len(os.sched_getaffinity(0))


def test_threads_are_set_for_the_body_and_restored():
    before = torch.get_num_threads()
    other = 1 if before != 1 else min(2, len(os.sched_getaffinity(0)))
    with torch_threads(other) as used:
        assert used == other == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads=0"), torch_threads(0):
        pass
    assert torch.get_num_threads() == before


def test_the_wait_policy_is_left_to_the_environment():
    code = "import runtime, runtime.threads, os; print(runtime.threads.wait_policy(), os.environ.get('OMP_WAIT_POLICY'))"
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, check=True)
    assert out.stdout.split() == ["default", "None"]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert out.stdout.split() == ["passive", "PASSIVE"]
