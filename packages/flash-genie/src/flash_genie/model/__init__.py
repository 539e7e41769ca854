"""The Genie denoiser, piece by piece: frames, features, pair stack, IPA, structure net."""

from flash_genie.model.denoiser import Denoiser
from flash_genie.model.frames import frenet_frames
from flash_genie.model.rigid import Rigid

__all__ = ["Denoiser", "Rigid", "frenet_frames"]
