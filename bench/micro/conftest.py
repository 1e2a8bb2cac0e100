"""Micro-benchmarks of kgen's CPU hot paths (pytest-benchmark); not part of the test suite.

Run from the repository root::

    pytest bench/micro --benchmark-only --benchmark-json=bench/results/micro.json
    python bench/micro/report.py bench/results/micro.json      # -> bench/results/micro.md

``pytest`` / ``pytest tests`` never collect these (``testpaths = ["tests"]``). The load of the
machine (``os.getloadavg()`` and ``uptime``) before and after the run goes into the JSON's
``machine_info``: on a shared machine, compare figures only between runs at a similar load. The
JSON's ``provenance`` (commit, dirty, date, machine, command) is bench/_common.py's, as for every
other results file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run from a checkout without installing kgen
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import _common  # noqa: E402  (bench/_common.py: provenance of results files)

_LOAD_AT_START: dict = {}


def _load() -> dict:
    one, five, fifteen = os.getloadavg()
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        uptime = f"unavailable: {exc}"
    return {"loadavg_1_5_15": [one, five, fifteen], "uptime": uptime}


def pytest_sessionstart(session):
    _LOAD_AT_START.update(_load())


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["load_at_start"] = dict(_LOAD_AT_START)
    machine_info["load_at_end"] = _load()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    command = " ".join(["pytest", *config.invocation_params.args])
    output_json["provenance"] = _common.provenance(command=command)


@pytest.fixture(autouse=True)
def _describe(request, benchmark):
    """Record each benchmark's docstring (first paragraph) as ``extra_info["what"]``."""
    doc = (request.function.__doc__ or "").strip().split("\n\n")[0]
    benchmark.extra_info["what"] = " ".join(doc.split())
