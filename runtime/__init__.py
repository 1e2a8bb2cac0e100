"""kgen's minimal serving runtime: paged KV memory, continuous batching and ``generate()``."""
