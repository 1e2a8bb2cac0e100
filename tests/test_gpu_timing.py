"""The tuner's GPU timing path on a CUDA GPU (``GpuMeasurer``): audit, correctness, ``do_bench``.

Marked ``gpu``: skipped without CUDA (see conftest.py), run by ``bench/gpu_check.sh``. CPU tests
cover the measurer's inputs and the interpreter measurer; only here do ``do_bench`` and the
target's static audit run on the device they describe.
"""

import math

import pytest

from kgen.build import load_kernel
from kgen.device import detect_gpu
from kgen.space import default_config
from kgen.tune.measure_kernel import GpuMeasurer
from kgen.workload import Workload

pytestmark = pytest.mark.gpu


def _workload(gpu: str, batch: int, context: int) -> Workload:
    return Workload(gpu=gpu, dtype="bf16", head_dim=128, block_size=16, group_size=8, batch=batch,
                    context=context)


def test_gpu_measurer_audits_checks_and_times_a_variant():
    device = detect_gpu()
    measurer = GpuMeasurer(device.name, audit_target=device.audit_target)
    config = default_config(head_dim=128, block_size=16, group_size=8, dtype="bf16", split_k=4)
    result = measurer.measure(config, _workload(device.name, 4, 4096))
    assert result.status == "ok", result.reason
    assert math.isfinite(result.time_ms) and result.time_ms > 0
    assert measurer.calls == 1


def test_gpu_measurer_rejects_a_wrong_kernel():
    """The correctness check runs before timing: a kernel wrong on one head of one sequence
    (0.2 off, several times the bf16 tolerance) is a failure."""
    device = detect_gpu()
    measurer = GpuMeasurer(device.name, audit_target=None)
    config = default_config(head_dim=128, block_size=16, group_size=8, dtype="bf16", split_k=4)
    real = load_kernel(config)

    class Wrong:  # the real kernel, then one head of one sequence shifted
        @staticmethod
        def paged_attention_decode(*args, out, **kwargs):
            real.paged_attention_decode(*args, out=out, **kwargs)
            out[0, 0] += 0.2
            return out

    workload = _workload(device.name, 4, 1024)
    assert measurer.check(real, config, workload) is None
    reason = measurer.check(Wrong, config, workload)
    assert reason and reason.startswith("wrong result"), reason


def test_gpu_timings_grow_with_the_bytes_read():
    """do_bench times the kernel's work, not a launch: 64 x 4096 tokens reads 512x the K/V of
    1 x 512 (a loose 4x bound; the figures themselves belong in bench/, not here)."""
    device = detect_gpu()
    measurer = GpuMeasurer(device.name, audit_target=None)
    config = default_config(head_dim=128, block_size=16, group_size=8, dtype="bf16", split_k=0)
    module = load_kernel(config)
    small = measurer.time(module, config, _workload(device.name, 1, 512))
    big = measurer.time(module, config, _workload(device.name, 64, 4096))
    assert small.ok and big.ok
    assert big.time_ms > 4 * small.time_ms, (small.time_ms, big.time_ms)
