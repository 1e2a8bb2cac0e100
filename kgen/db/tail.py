"""Line-oriented logs after a kill: a last line cut short is set aside before anything is appended.

A process killed in the middle of appending leaves a last line without its newline. Appending
after it would glue the next record onto the half line and spoil both. :func:`repair_tail`
(called with the file's writers locked out) cuts the file back to its last whole line: a tail
that is still one whole JSON object only lacked its newline and is kept; anything else is moved to
``<file>.damaged-<time>-<pid>`` beside it. Standard library only.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def _last_line_start(handle, size: int) -> int:
    end, block = size, 1 << 16
    while end > 0:
        begin = max(0, end - block)
        handle.seek(begin)
        cut = handle.read(end - begin).rfind(b"\n")
        if cut >= 0:
            return begin + cut + 1
        end = begin
    return 0


def _whole_json_object(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError):
        return False


def repair_tail(path) -> str | None:
    """Make ``path`` end with a whole line; returns a message saying what was done, or None.

    Parameters
    ----------
    path : path
        A JSON-lines file (``trials.jsonl``, an Optuna journal). Missing or empty: nothing to do.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    with open(path, "rb+") as handle:
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return None
        start = _last_line_start(handle, size)
        handle.seek(start)
        tail = handle.read()
        if _whole_json_object(tail):
            handle.seek(size)
            handle.write(b"\n")
            action = "it is a whole record, so only the newline was added"
        else:
            aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-"
                                   f"{os.getpid()}")
            aside.write_bytes(tail)
            handle.truncate(start)
            action = f"moved those bytes to {aside.name} and kept the {start} bytes before them"
        handle.flush()
        os.fsync(handle.fileno())
    return f"{path}: the last line was cut short ({len(tail)} bytes without a newline); {action}"
