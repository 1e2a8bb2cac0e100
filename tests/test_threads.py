"""generate()'s thread count: a documented default, restored afterwards; OpenMP's wait policy."""

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
    other = 1 if before != 1 else 2
    with torch_threads(other) as used:
        assert used == other == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads=0"), torch_threads(0):
        pass
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("torch_first,env,expected", [
    (False, None, "passive"), (True, None, "active"), (False, "ACTIVE", "active"), (True, "PASSIVE", "passive")])
def test_import_sets_a_passive_wait_policy_only_when_it_can(torch_first, env, expected):
    code = ("import torch\n" if torch_first else "") + (
        "import os, runtime, runtime.threads\n"
        "print(runtime.threads.wait_policy(), os.environ.get('OMP_WAIT_POLICY'))\n")
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env:
        environ["OMP_WAIT_POLICY"] = env
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, check=True)
    policy, value = out.stdout.split()
    assert policy == expected
    assert value == (env or ("None" if torch_first else "PASSIVE"))
