"""The audit worker: a child process that compiles variants for a GPU target on request.

A process that imported Triton with ``TRITON_INTERPRET=1`` (the CPU test suite) cannot compile
(see :mod:`kgen.audit.compile`), so :class:`AuditWorker` runs ``python -m kgen.audit.worker``
without that variable. The child reads one ``KEY TARGET`` request per line and answers one JSON
line per request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kgen.audit.compile import audit_here
from kgen.audit.result import AuditResult, parse_target
from kgen.variant_attention import config_from_key


class AuditWorker:
    """A child process that audits variants on request (started lazily, reused, closed at exit)."""

    def __init__(self):
        self._proc = None

    def _start(self):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self._proc = subprocess.Popen([sys.executable, "-m", "kgen.audit.worker"], env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True, bufsize=1)

    def audit(self, config, target: str) -> AuditResult:
        """Audit in the child; a compile failure there raises RuntimeError here with its message."""
        if self._proc is None or self._proc.poll() is not None:
            self.close()  # a child that died: release its pipes
            self._start()
        self._proc.stdin.write(f"{config.key} {parse_target(target)}\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            self.close()
            raise RuntimeError(f"audit worker exited ({code}) while auditing {config.key}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(f"{config.key} on {target}: {reply['error']}")
        return AuditResult.from_dict(reply["result"])

    def close(self):
        """End the child (EOF on its stdin; killed if it does not exit in 30 s), close its pipes."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def main() -> int:  # pragma: no cover - exercised through AuditWorker in the tests
    """Worker loop: ``KEY TARGET`` lines in, one JSON line out; stdout kept for replies only."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed by Triton or tools goes to stderr, not into the protocol
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            key, target = line.split()
            result = audit_here(config_from_key(key), target)
            reply = {"ok": True, "result": result.to_dict()}
        except Exception as exc:  # noqa: BLE001 - every failure is reported to the parent
            reply = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
        replies.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
