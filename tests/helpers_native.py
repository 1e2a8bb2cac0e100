"""Whether the native CPU kernels serve a shape here, for tests that fall back when they cannot.

Only a shape the kernel does not take (a head dim that is not a multiple of 16, ...) is a reason
for a test to use another backend. The kernels themselves missing is not: tests must not quietly
skip or switch backends over a kernel that could not be built. Without a C compiler (or with
``KGEN_NATIVE=0``) the tests that need the kernels fail, saying how to get one (``tests/run.sh``
installs ``gcc`` where ``cc`` is missing); a failed build with a compiler raises.
"""

import os
import shutil

import pytest
import torch

from runtime.decode_native import native_lacks
from runtime.native_build import load_native, why_unavailable

GET_A_COMPILER = ("the native CPU kernels need a C compiler: install one (Debian/Ubuntu: "
                  "'apt-get install -y gcc'; tests/run.sh installs it where 'cc' is missing) or point "
                  "CC at one")


def require_native() -> None:
    """Fail the calling test (or the collecting module) unless the native kernels are built here,
    saying why and how to get them; never a skip."""
    if load_native() is not None:
        return
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if os.environ.get("KGEN_NATIVE", "1") == "0":
        pytest.fail("KGEN_NATIVE=0 hides the native kernels from the tests; unset it", pytrace=False)
    if compiler is None:
        pytest.fail(f"no C compiler ({os.environ.get('CC', 'cc')!r} is not on PATH): {GET_A_COMPILER}",
                    pytrace=False)
    raise AssertionError(f"the native kernels did not build with {compiler}: {why_unavailable()}")


def native_missing(num_heads: int, head_dim: int) -> str | None:
    """Why the native decode kernel cannot serve fp32 ``num_heads x head_dim`` (None: it can).
    Only the shape counts: kernels that are not built here fail the caller (:func:`require_native`)."""
    require_native()
    return native_lacks(torch.float32, num_heads, head_dim, torch.device("cpu"))
