"""Loading original Genie weights and saving/loading flash-genie checkpoints.

Accepted weights:

* a PyTorch-Lightning ``.ckpt`` of the original ``Genie`` module (weights under
  ``state_dict`` with the ``model.`` prefix; everything else is ignored),
* a ``state_dict`` with the original key names, prefixed ``model.`` or not,
* a flash-genie checkpoint written by :func:`save_checkpoint`, which also
  carries the configuration text.

Files are read with ``torch.load(weights_only=True)``: nothing in them is executed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from flash_genie.config import Config
from flash_genie.model.denoiser import Denoiser

FORMAT = "flash-genie-checkpoint"
FORMAT_VERSION = 1
_LIGHTNING_PREFIX = "model."

Weights = str | os.PathLike | Mapping[str, Any]


def _read(path: str | os.PathLike) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # unpickling refused or a corrupt file
        raise ValueError(
            f"cannot read {os.fspath(path)!r} with torch.load(weights_only=True): {err}. If the file "
            "is trusted (e.g. an old Lightning checkpoint), load it yourself and pass its "
            "'state_dict' as weights."
        ) from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"{os.fspath(path)!r} holds a {type(obj).__name__}, not a checkpoint or state_dict")
    return dict(obj)


def unpack_weights(weights: Weights) -> tuple[dict[str, torch.Tensor], str | None]:
    """``(state_dict with Denoiser keys, embedded config text or None)`` from any accepted form."""
    obj = _read(weights) if isinstance(weights, (str, os.PathLike)) else dict(weights)
    config_text = None
    if obj.get("format") == FORMAT:
        config_text = obj["config"]
        obj = obj["state_dict"]
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):  # Lightning
        obj = obj["state_dict"]
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"weights is not a state_dict of tensors (e.g. entry {bad[0]!r})")
    if obj and all(k.startswith(_LIGHTNING_PREFIX) for k in obj):
        obj = {k[len(_LIGHTNING_PREFIX) :]: v for k, v in obj.items()}
    return dict(obj), config_text


def load_genie(
    config: Config | str | os.PathLike | None,
    weights: Weights,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Denoiser:
    """A :class:`Denoiser` with the given weights, in eval mode.

    Args:
        config: a :class:`Config`, a configuration file path or configuration text;
            ``None`` to use the config stored in a flash-genie checkpoint.
        weights: a Lightning ``.ckpt`` path, a flash-genie checkpoint path, or a
            ``state_dict`` (original key names, ``model.`` prefix optional).
        dtype: parameter dtype (the original weights are float32; float64 upcasts exactly).
        device: where to put the model.

    Raises ``ValueError`` if keys are missing or unexpected, naming them.
    """
    state_dict, embedded = unpack_weights(weights)
    if config is None:
        if embedded is None:
            raise ValueError("config is None but the weights carry no configuration; pass the config")
        config = Config.from_text(embedded, source="<checkpoint>")
    model = Denoiser.from_config(Config.coerce(config)).to(dtype=dtype)
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"weights do not match the configuration: {err}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            "weights do not match the configuration: "
            f"{len(result.missing_keys)} missing keys (first: {result.missing_keys[:5]}), "
            f"{len(result.unexpected_keys)} unexpected keys (first: {result.unexpected_keys[:5]})"
        )
    return model.to(device).eval()


def save_checkpoint(path: str | os.PathLike, model: Denoiser, config: Config, **extra: Any) -> None:
    """Write ``model``'s weights with ``config``'s full text (and ``extra`` entries, e.g.
    ``step``) atomically: a temporary file in the same folder, then ``os.replace``."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_text(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw contents of a flash-genie checkpoint (``config`` text, ``state_dict``, extras)."""
    obj = _read(path)
    if obj.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a flash-genie checkpoint (use load_genie for Genie weights)")
    return obj
