"""The decoder that runs over the paged KV cache (:mod:`runtime.model.decoder`) and the model
families it serves (:mod:`runtime.model.families`).

Nothing is imported here: ``runtime.config`` imports the (torch-free) families module, and the
decoder imports ``runtime.config``, so an eager import here would close a cycle.
"""
