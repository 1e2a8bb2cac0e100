"""Turn a pytest-benchmark JSON of ``bench/micro`` into a small Markdown table (beside it, .md).

    python bench/micro/report.py bench/results/micro.json

Times are per call, in microseconds: median, interquartile range, min, and rounds. The header
records the machine and its load (``uptime``) before and after the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common  # noqa: E402  (bench/_common.py: the provenance line)


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f}"


def render(data: dict) -> str:
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {}).get("brand_raw") or info.get("processor") or "?"
    start = info.get("load_at_start", {})
    end = info.get("load_at_end", {})
    lines = [
        "# Micro-benchmarks (`bench/micro`, pytest-benchmark)", "",
        f"Made by `pytest bench/micro --benchmark-only --benchmark-json=...` on {cpu} "
        f"({info.get('cpu_count', '?')} CPUs), Python {info.get('python_version', '?')}, "
        f"{data.get('datetime', '?')}.", "",
        f"Load before: `{start.get('uptime', '?')}`", "",
        f"Load after: `{end.get('uptime', '?')}`", "",
        "The machine is shared: figures move with its load; compare runs at a similar load.", "",
        "| benchmark | what | median us | IQR us | min us | rounds |",
        "|---|---|---|---|---|---|",
    ]
    for bench in data["benchmarks"]:
        stats = bench["stats"]
        doc = (bench.get("extra_info") or {}).get("what") or "-"
        lines.append(f"| `{bench['name']}` | {doc} | {_us(stats['median'])} | {_us(stats['iqr'])} "
                     f"| {_us(stats['min'])} | {stats['rounds']} |")
    if data.get("provenance"):
        lines += ["", _common.provenance_line(data["provenance"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--md", type=Path, default=None, help="output (default: beside, .md)")
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text())
    # pytest-benchmark keeps every timed round (megabytes): the committed JSON keeps the summary
    # statistics only, so the raw samples are dropped here, in place
    raw = sum(len(b["stats"].pop("data", ())) for b in data["benchmarks"])
    if raw:
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    out = args.md or args.json.with_suffix(".md")
    out.write_text(render(data))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
