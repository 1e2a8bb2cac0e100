"""(workload) -> compiled decode kernel: the one door the runtime uses.

Interim version: always the heuristic default variant. The tuning issue extends this with the
database lookup and its fallbacks, keeping the signature of :meth:`Dispatcher.kernel_for`.
"""

from __future__ import annotations

import functools
from typing import Callable


class Dispatcher:
    """Picks and caches a compiled kernel per workload.

    Parameters
    ----------
    gpu : str or None
        Normalized GPU name whose tuning records to use; None means the device present.
    db_dir : path or None
        Tuning database folder; None means the default one.
    """

    def __init__(self, gpu: str | None = None, db_dir=None) -> None:
        self.gpu = gpu
        self.db_dir = db_dir

    @functools.lru_cache(maxsize=1024)
    def kernel_for(self, *, dtype: str, head_dim: int, block_size: int, group_size: int,
                   num_seqs: int, max_context: int) -> Callable:
        """The ``paged_attention_decode`` callable to use for this decode step's shape."""
        from kgen.build import load_kernel
        from kgen.space import default_config

        config = default_config(head_dim=head_dim, block_size=block_size,
                                group_size=group_size, dtype=dtype)
        return load_kernel(config).paged_attention_decode
