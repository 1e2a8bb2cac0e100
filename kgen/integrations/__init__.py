"""Adapters that put kgen's kernels into other engines (each imports its engine only inside itself)."""
