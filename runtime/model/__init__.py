"""Model implementations that run over the paged KV cache."""

from runtime.model.llama import LlamaModel

__all__ = ["LlamaModel"]
