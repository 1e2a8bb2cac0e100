"""Static audit of a variant without a GPU: compile for sm_80 / sm_90 and read the binary.

One package, arrows one way: ``api`` (cache, entry points) -> ``worker`` (child process) ->
``compile`` (triton.compile + cuobjdump) -> ``capture`` (launch recording) and ``asm`` (PTX/SASS
text parsing) -> ``result`` (the dataclasses and the pruning rule).
"""

from kgen.audit.api import audit_many, audit_variant
from kgen.audit.result import (TARGETS, VECTOR_DTYPES, AuditResult, KernelAudit, failures,
                               parse_target, passes)

__all__ = ["TARGETS", "VECTOR_DTYPES", "AuditResult", "KernelAudit", "audit_many", "audit_variant",
           "failures", "parse_target", "passes"]
