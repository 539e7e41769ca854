"""The denoiser under sequence parallelism: one forward split over a process group."""

from __future__ import annotations

import torch
from torch import nn

from flash_genie.model.denoiser import Denoiser, check_inputs
from flash_genie.model.frames import frenet_frames
from flash_genie.model.rigid import Rigid
from flash_genie.parallel.comm import SequenceShard, gather_rows
from flash_genie.parallel.pair_stack import pair_stack
from flash_genie.parallel.structure import structure_net

__all__ = ["NoisePredictor", "sequence_parallel_forward"]


def sequence_parallel_forward(model: Denoiser, frames: Rigid, timesteps: torch.Tensor, mask: torch.Tensor,
                              shard: SequenceShard) -> Rigid:
    """``model(frames, timesteps, mask)`` split over ``shard``'s group; returns this rank's rows.

    Every rank of the group passes the same full inputs (``frames`` ``[B, N]``, ``timesteps``
    ``[B]``, ``mask`` ``[B, N]``). The single features (``O(N)``) are computed whole and
    split; the pair features are built for the local rows only, so no rank ever holds the
    whole ``[B, N, N, c_p]`` pair tensor.
    """
    if model.approx.pair_mode != "dense" or model.approx.axial_attention:
        raise ValueError("sequence parallelism splits the dense pair tensor with triangle updates and attention; "
                         f"this model uses the approximate pair mode {model.approx.describe()!r}")
    rows = shard.rows
    mask = mask.to(frames.trans.dtype)
    pair_mask = mask[:, rows, None] * mask[:, None, :]
    s = model.single_feature_net(timesteps, mask)
    p = model.pair_feature_net(s, frames.trans, pair_mask, rows=rows)
    if model.pair_transform_net is not None:
        p = pair_stack(model.pair_transform_net, p, pair_mask, shard)
    local = Rigid(frames.rots[:, rows], frames.trans[:, rows])
    return structure_net(model.structure_net, s[:, rows], p, local, mask, shard)


class NoisePredictor(nn.Module):
    """``forward(xt, timesteps, mask)`` = ``model.predict_noise``, split over ``group``.

    The module that DDP wraps in training: its only parameters are the denoiser's (keys
    ``model.*``). Every rank of the sequence group passes the same batch and gets the whole
    ``[B, N, 3]`` prediction back; with ``group=None`` (or a group of one) it is
    ``model.predict_noise`` itself.
    """

    def __init__(self, model: Denoiser, group=None):
        super().__init__()
        self.model = model
        self.group = group

    def forward(self, xt: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        shard = SequenceShard.of(xt.shape[1], self.group)
        if shard.world == 1:
            return self.model.predict_noise(xt, timesteps, mask)
        timesteps, mask = check_inputs(xt, timesteps, mask, self.model.n_timestep, self.model.dtype)
        out = sequence_parallel_forward(self.model, Rigid(frenet_frames(xt, mask), xt), timesteps, mask, shard)
        return xt - gather_rows(out.trans, 1, shard)

    def predict_noise(self, xt: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self(xt, timesteps, mask)
