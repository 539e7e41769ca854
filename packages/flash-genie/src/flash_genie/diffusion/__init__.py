"""Genie's diffusion: schedules, forward noising, loss and the ancestral sampler."""

from flash_genie.diffusion.loss import (
    genie_loss,
    loss_options,
    pairwise_distance_loss,
    training_loss,
)
from flash_genie.diffusion.noising import q_sample, sample_timesteps
from flash_genie.diffusion.sampler import Samples, p_step, sample
from flash_genie.diffusion.schedule import Schedule, make_schedule

__all__ = [
    "Samples",
    "Schedule",
    "genie_loss",
    "loss_options",
    "make_schedule",
    "p_step",
    "pairwise_distance_loss",
    "q_sample",
    "sample",
    "sample_timesteps",
    "training_loss",
]
