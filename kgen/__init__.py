"""kgen: a kernel generator and autotuner for PagedAttention decode.

The public pieces:

- :class:`kgen.variant.VariantConfig` -- one point of the kernel space, with a readable key.
- :func:`kgen.build.load_kernel` -- render, load and cache the module of a variant.
- :mod:`kgen.dispatch` -- (workload) -> best compiled kernel, the door the runtime uses.
"""

__version__ = "0.1.0"

from kgen.variant import VariantConfig  # noqa: E402

__all__ = ["VariantConfig", "__version__"]
