"""Load a Llama-family checkpoint from a local Hugging Face folder.

The folder holds ``config.json`` and either ``model.safetensors`` or sharded safetensors with a
``model.safetensors.index.json``; weights in fp32, fp16 or bf16. An optional ``tokenizer.json``
is loaded with the ``tokenizers`` library so that text prompts work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from runtime.config import ModelConfig, parse_dtype
from runtime.model.llama import LlamaModel

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadedModel:
    """A model ready for the engine: the network, its config and an optional tokenizer."""

    model: LlamaModel
    config: ModelConfig
    tokenizer: object | None = None  # tokenizers.Tokenizer
    path: Path | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape, for every weight the model needs."""
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        layer = {
            "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
            "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
            "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        }
        if config.attention_bias:
            layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                          "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (h,)})
        if config.mlp_bias:
            layer.update({"mlp.gate_proj.bias": (i,), "mlp.up_proj.bias": (i,), "mlp.down_proj.bias": (h,)})
        shapes.update({p + k: v for k, v in layer.items()})
    return shapes


def read_config(path) -> ModelConfig:
    """Parse ``<path>/config.json``; raises FileNotFoundError / ValueError naming the problem."""
    folder = Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"model path {str(folder)!r} has no config.json")
    with open(cfg_file) as f:
        return ModelConfig.from_dict(json.load(f))


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index.name} in {str(folder)!r} has no 'weight_map' object")
        files = {name: folder / fname for name, fname in weight_map.items()}
        for fpath in set(files.values()):
            if not fpath.is_file():
                raise FileNotFoundError(f"shard {fpath.name!r} named in {index.name} is missing in {str(folder)!r}")
        return files
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"model path {str(folder)!r} has neither model.safetensors nor "
                                f"model.safetensors.index.json")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def load_weights(folder: Path, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read and check every weight; ValueError names a missing, unexpected or mis-shaped tensor."""
    shapes = expected_shapes(config)
    files = _weight_files(folder)
    names = {n for n in files if not n.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        names.discard("lm_head.weight")  # tied: the embedding is used
    missing = sorted(set(shapes) - names)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"weight {missing[0]!r} is missing from the checkpoint in {str(folder)!r}{more}")
    unexpected = sorted(names - set(shapes))
    if unexpected:
        raise ValueError(f"weight {unexpected[0]!r} in the checkpoint is not part of a "
                         f"{config.architecture} with this config.json")
    weights: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in shapes:
        by_file.setdefault(files[name], []).append(name)
    for fpath, fnames in by_file.items():
        with safe_open(fpath, framework="pt") as f:
            for name in fnames:
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != shapes[name]:
                    raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected "
                                     f"{shapes[name]} from config.json")
                if not tensor.is_floating_point():
                    raise ValueError(f"weight {name!r} has dtype {tensor.dtype}, expected a float dtype")
                weights[name] = tensor.to(dtype)
    return weights


def load_tokenizer(folder: Path):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json``, or None when the folder has none."""
    tok_file = Path(folder) / "tokenizer.json"
    if not tok_file.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_file))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(device) -> torch.device:
    """``"cpu"`` / ``"cuda"`` / ``"cuda:1"`` / a torch.device -> torch.device, checked: a device
    string torch does not know, or CUDA where torch has none, is a ValueError naming the value."""
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a device torch knows (use 'cpu' or 'cuda'): {err}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device={device!r} but CUDA is not available ({why}; torch {torch.__version__}); "
                             f"use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise ValueError(f"device={device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def load_model(path, *, dtype=None, device=None) -> LoadedModel:
    """Load a Llama-family model from a local Hugging Face folder.

    Parameters
    ----------
    path : str or Path
        Folder with ``config.json`` and safetensors weights (single file or sharded with an index).
    dtype : torch.dtype or str, optional
        Compute dtype (fp32, fp16, bf16); default: the checkpoint's ``torch_dtype``.
    device : str or torch.device, optional
        Default: ``cuda`` when available, else ``cpu``.

    Returns
    -------
    LoadedModel
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model path {str(folder)!r} is not a folder")
    config = read_config(folder)
    torch_dtype = config.torch_dtype if dtype is None else parse_dtype(dtype)
    dev = default_device() if device is None else parse_device(device)
    weights = load_weights(folder, config, torch_dtype)
    model = LlamaModel(config, weights, device=dev, dtype=torch_dtype)
    return LoadedModel(model=model, config=config, tokenizer=load_tokenizer(folder), path=folder)
