"""flash-genie's built-in model: a small Genie trained on the built-in real chains.

    model, config = flash_genie.load_builtin()       # eval mode, EMA weights
    flash-genie sample --lengths 64 100 --num 8 --out samples/

The files ship inside the package: ``builtin.config`` (the training recipe: Genie's
architecture and config keys, trained with ``flash-genie train
packages/flash-genie/src/flash_genie/pretrained/builtin.config --out runs/builtin``) and
``builtin.pt`` (a flash-genie checkpoint holding the EMA weights and that config, written by
``packages/flash-genie/tools/export_builtin.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from flash_genie.config import Config
from flash_genie.model import Denoiser

FOLDER = Path(__file__).resolve().parent
BUILTIN_CHECKPOINT = FOLDER / "builtin.pt"
BUILTIN_CONFIG = FOLDER / "builtin.config"


def builtin_checkpoint() -> Path:
    """Path of the built-in model's checkpoint; ``FileNotFoundError`` with the fix if missing."""
    if not BUILTIN_CHECKPOINT.is_file():
        raise FileNotFoundError(
            f"the built-in model is missing: {BUILTIN_CHECKPOINT} does not exist (flash-genie's wheel ships "
            "flash_genie/pretrained/builtin.pt; reinstall flash-genie, or pass a checkpoint: "
            "flash-genie sample CHECKPOINT ...)"
        )
    return BUILTIN_CHECKPOINT


def load_builtin(device: str | torch.device = "cpu") -> tuple[Denoiser, Config]:
    """``(model, config)`` of the built-in model, the model in eval mode on ``device``.

    Raises:
        FileNotFoundError: the checkpoint is not installed (see :func:`builtin_checkpoint`).
    """
    from flash_genie.sampling import load_model

    return load_model(builtin_checkpoint(), device=device)
