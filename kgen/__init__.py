"""kgen: a kernel generator and autotuner for PagedAttention decode (and any query length).

The public pieces:

- :class:`kgen.variant.VariantConfig` -- one point of the decode kernel space, with a readable key.
- :class:`kgen.variant_attention.AttentionVariantConfig` -- one point of the ``paged_attention``
  family (any query length per sequence); :func:`kgen.variant_attention.config_from_key` parses
  a key of either family.
- :func:`kgen.build.load_kernel` -- render, load and cache the module of a variant.
- :mod:`kgen.dispatch` -- (workload) -> best compiled kernel, the door the runtime uses.
"""

__version__ = "0.1.0"

from kgen.variant import VariantConfig  # noqa: E402
from kgen.variant_attention import AttentionVariantConfig  # noqa: E402

__all__ = ["AttentionVariantConfig", "VariantConfig", "__version__"]
