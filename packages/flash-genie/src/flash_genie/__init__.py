"""flash-genie: Genie (SE(3) diffusion of Cα traces) on genie-tk's triangle kernels.

Public surface::

    model = flash_genie.load_genie(config, weights)      # eval mode
    model, config = flash_genie.load_builtin()           # the built-in trained model
    eps = model.predict_noise(xt, timesteps, mask)        # [B, N, 3]
    out = flash_genie.sample(model, mask, flash_genie.make_schedule())
"""

from flash_genie.checkpoint import load_checkpoint, load_genie, save_checkpoint
from flash_genie.config import Config, ConfigError
from flash_genie.diffusion import (
    Samples,
    Schedule,
    genie_loss,
    make_schedule,
    p_step,
    q_sample,
    sample,
    training_loss,
)
from flash_genie.model import Denoiser, Rigid, frenet_frames
from flash_genie.pretrained import load_builtin

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "Denoiser",
    "Rigid",
    "Samples",
    "Schedule",
    "frenet_frames",
    "genie_loss",
    "load_builtin",
    "load_checkpoint",
    "load_genie",
    "make_schedule",
    "p_step",
    "q_sample",
    "sample",
    "save_checkpoint",
    "training_loss",
]
