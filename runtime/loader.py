"""Load a checkpoint of a supported family from a local Hugging Face folder.

The folder holds ``config.json`` and either ``model.safetensors`` or sharded safetensors with a
``model.safetensors.index.json``; weights in fp32, fp16 or bf16. The architecture comes from
``config.json``'s ``architectures`` (:mod:`runtime.model.families`). An optional
``tokenizer.json`` is loaded with the ``tokenizers`` library so that text prompts work; one that
cannot be read leaves token-id prompts working (a warning names the file, and text prompts get
an error naming it).

Unreadable files (truncated or non-object JSON, truncated or empty safetensors) are ValueErrors
naming the file.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from runtime.config import ModelConfig, parse_dtype
from runtime.model.decoder import DecoderModel
from runtime.model.weights import expected_shapes

__all__ = ["LoadedModel", "load_model", "read_config", "load_weights", "load_tokenizer", "expected_shapes"]

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_EMBED = "model.embed_tokens.weight"


@dataclass
class LoadedModel:
    """A model ready for the engine: the network, its config and an optional tokenizer."""

    model: DecoderModel
    config: ModelConfig
    tokenizer: object | None = None  # tokenizers.Tokenizer
    path: Path | None = None
    tokenizer_error: str | None = None  # why tokenizer.json could not be used (text prompts say it)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype


def read_config(path) -> ModelConfig:
    """Parse ``<path>/config.json``; raises FileNotFoundError / ValueError naming the problem."""
    folder = Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"model path {str(folder)!r} has no config.json")
    data = _read_json(cfg_file)
    if not isinstance(data, dict):
        raise ValueError(f"{str(cfg_file)!r} must hold a JSON object, got a JSON {type(data).__name__}")
    try:
        return ModelConfig.from_dict(data)
    except ValueError as err:
        raise ValueError(f"{str(cfg_file)!r}: {err}") from None


def _read_json(path: Path):
    """Parse a JSON file; ValueError names the file when it is not valid JSON (e.g. truncated)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); is the file truncated?") from None


@contextmanager
def _open_safetensors(path: Path):
    """``safe_open`` whose errors (empty, truncated or corrupt file) are ValueErrors naming it."""
    try:
        handle = safe_open(path, framework="pt")
    except SafetensorError as err:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file ({err}); "
                         f"is it truncated or empty?") from None
    with handle as f:
        try:
            yield f
        except SafetensorError as err:
            raise ValueError(f"{str(path)!r}: reading a tensor failed ({err}); is the file truncated?") from None


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
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
    with _open_safetensors(single) as f:
        return {name: single for name in f.keys()}


def load_weights(folder: Path, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read and check every weight; ValueError names a missing, unexpected or mis-shaped tensor.

    With ``tie_word_embeddings`` the head and the embedding are tied as transformers 5 ties them
    when loading: a checkpoint holding only one of ``model.embed_tokens.weight`` and
    ``lm_head.weight`` uses it for both; one holding both keeps both when they differ (a warning
    says the config is wrong) and ties them when they are equal.
    """
    shapes = expected_shapes(config)
    files = _weight_files(folder)
    names = {n for n in files if not n.endswith(_IGNORED_SUFFIXES)}
    stored = {name: name for name in shapes}  # weight -> the checkpoint tensor it is read from
    if config.tie_word_embeddings and "lm_head.weight" in names:
        if _EMBED in names:  # both stored: both read, tied below only when equal
            shapes = {**shapes, "lm_head.weight": shapes[_EMBED]}
            stored["lm_head.weight"] = "lm_head.weight"
        else:  # only the head stored: transformers ties the embedding to it
            names = (names - {"lm_head.weight"}) | {_EMBED}
            stored[_EMBED] = "lm_head.weight"
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
        by_file.setdefault(files[stored[name]], []).append(name)
    for fpath, fnames in by_file.items():
        with _open_safetensors(fpath) as f:
            for name in fnames:
                tensor = f.get_tensor(stored[name])
                if tuple(tensor.shape) != shapes[name]:
                    raise ValueError(f"weight {stored[name]!r} has shape {tuple(tensor.shape)}, expected "
                                     f"{shapes[name]} from config.json")
                if not tensor.is_floating_point():
                    raise ValueError(f"weight {stored[name]!r} has dtype {tensor.dtype}, expected a float dtype")
                weights[name] = tensor.to(dtype)
    head = weights.get("lm_head.weight") if config.tie_word_embeddings else None
    if head is not None and torch.equal(head, weights[_EMBED]):
        del weights["lm_head.weight"]  # equal: tied, as transformers ties them
    elif head is not None:
        warnings.warn(f"config.json in {str(folder)!r} sets tie_word_embeddings, but the checkpoint holds an "
                      f"lm_head.weight that differs from {_EMBED}: both are kept (not tied), as transformers "
                      f"does; set tie_word_embeddings to false to silence this", RuntimeWarning, stacklevel=3)
    return weights


def load_tokenizer(folder: Path):
    """``(tokenizer, error)``: a ``tokenizers.Tokenizer`` from ``tokenizer.json`` and None; or
    None and None when the folder has none; or None and a message naming the file when it cannot
    be read (a warning says so too: token-id prompts still work)."""
    tok_file = Path(folder) / "tokenizer.json"
    if not tok_file.is_file():
        return None, None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(tok_file)), None
    except Exception as err:  # tokenizers raises a plain Exception for any parse failure
        msg = f"{str(tok_file)!r} could not be read as a tokenizer ({err})"
        warnings.warn(f"{msg}; text prompts will fail, token-id prompts still work", RuntimeWarning,
                      stacklevel=3)
        return None, msg


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
    """Load a model of a supported family from a local Hugging Face folder.

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
    model = DecoderModel(config, weights, device=dev, dtype=torch_dtype)
    tokenizer, tokenizer_error = load_tokenizer(folder)
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, path=folder,
                       tokenizer_error=tokenizer_error)
