"""The vLLM plugin: kgen's decode kernels inside vLLM's attention backends.

Installing kgen next to vLLM is enough: ``pyproject.toml`` declares the entry point
``kgen = kgen.integrations.vllm:register`` in the group ``vllm.general_plugins``, which vLLM loads
in every engine and worker process before it builds a model. :func:`register` then

- on a GPU, registers :class:`kgen.integrations.vllm_gpu.KgenAttentionBackend` as vLLM's
  ``CUSTOM`` backend, used when selected (``--attention-backend CUSTOM``);
- on the CPU, where vLLM's platform always picks ``CPU_ATTN`` whatever is selected, overrides what
  ``CPU_ATTN`` resolves to with :class:`kgen.integrations.vllm_cpu.KgenCPUAttentionBackend`, only
  when ``KGEN_VLLM_BACKEND`` is on (``1``, ``true``, ``yes`` or ``on``: :func:`switch_on`);
  without it the plugin changes nothing.

Both wrap the stock backend: prefill and mixed batches, cache writes and every layer kgen does not
cover run vLLM's own kernels (see :mod:`kgen.integrations.vllm_attention` for what falls back and how
it is logged). The backend modules import vLLM's backends, so they are named here by class path
only and imported by vLLM when it builds the first attention layer.
"""

from __future__ import annotations

import logging
import os

ENV_SWITCH = "KGEN_VLLM_BACKEND"
CPU_BACKEND = "kgen.integrations.vllm_cpu.KgenCPUAttentionBackend"
GPU_BACKEND = "kgen.integrations.vllm_gpu.KgenAttentionBackend"

logger = logging.getLogger("vllm.kgen")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("", "0", "false", "no", "off")
_warned: set = set()


def switch_on() -> bool:
    """Whether ``KGEN_VLLM_BACKEND`` asks for kgen's CPU backend: ``1``, ``true``, ``yes`` or
    ``on`` (any case) mean on; unset, ``0``, ``false``, ``no`` or ``off`` mean off; anything else
    is off with one warning per value and process (it is read in every vLLM worker)."""
    value = os.environ.get(ENV_SWITCH, "").strip().lower()
    if value in TRUE_WORDS:
        return True
    if value not in FALSE_WORDS and value not in _warned:
        _warned.add(value)
        logger.warning("kgen: %s=%r is not one of %s (on) or %s (off); kgen's backend stays off",
                       ENV_SWITCH, os.environ.get(ENV_SWITCH), "/".join(TRUE_WORDS), "/".join(FALSE_WORDS[1:]))
    return False


def register() -> str | None:
    """vLLM's plugin hook. Returns the class path registered, or None when nothing was changed."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        if not switch_on():
            return None
        # must happen before the first layer asks for its backend (vLLM caches the choice)
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
        logger.info("kgen: CPU_ATTN decodes with kgen's kernels (%s=1)", ENV_SWITCH)
        return CPU_BACKEND
    if AttentionBackendEnum.CUSTOM.is_overridden():
        if AttentionBackendEnum.CUSTOM.get_path() == GPU_BACKEND:  # loaded twice in one process
            return GPU_BACKEND
        logger.warning("kgen: vLLM's CUSTOM attention backend is already registered (%s); "
                       "kgen's backend is not registered", AttentionBackendEnum.CUSTOM.get_path())
        return None
    register_backend(AttentionBackendEnum.CUSTOM, GPU_BACKEND)
    logger.debug("kgen: registered %s as the CUSTOM attention backend", GPU_BACKEND)
    return GPU_BACKEND
