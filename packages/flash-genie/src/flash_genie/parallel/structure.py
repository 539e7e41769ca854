"""The structure net with its residues split over a process group.

Each rank holds its query rows of the single representation ``s`` ``[B, I_r, c_s]``, of the
frames and of the pair tensor ``[B, I_r, N, c_p]``. Per layer, the IPA's keys and values need
every residue: ``s`` and the frames are all-gathered (``c_s + 12`` numbers per residue) and
every rank projects keys, values and their points for all residues, its queries for its own
rows; the attention logits ``[B, H, I_r, N]``, the pair bias and the attended pair features
come from the local pair rows. The rest of the layer (dropout, LayerNorm, transition,
backbone update) is per residue and runs on the local rows. Dropout draws the full-size mask
of the single-process layer and keeps this rank's rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flash_genie.model.rigid import Rigid
from flash_genie.model.structure import StructureLayer, StructureNet, StructureTransition
from flash_genie.parallel.comm import SequenceShard, gather_rows

__all__ = ["structure_layer", "structure_net"]


def _dropout(module: nn.Dropout, x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """``module`` applied to rows ``shard.rows`` of a ``[B, N, C]`` tensor, with the same mask."""
    if not module.training or module.p == 0.0:
        return x
    keep = F.dropout(x.new_ones((x.shape[0], shard.n, *x.shape[2:])), module.p, training=True)
    return x * keep[:, shard.rows]


def _transition(module: StructureTransition, s: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    for layer in module.layers:
        s = layer(s)
    return module.layer_norm(_dropout(module.dropout, s, shard))


def structure_layer(layer: StructureLayer, s: torch.Tensor, p: torch.Tensor, frames: Rigid,
                    mask: torch.Tensor, mask_all: torch.Tensor, shard: SequenceShard):
    """:class:`StructureLayer` on this rank's rows: ``s`` ``[B, I_r, c_s]``, ``p``
    ``[B, I_r, N, c_p]``, ``frames`` ``[B, I_r]``, ``mask`` ``[B, I_r]``; ``mask_all`` ``[B, N]``.
    Returns the new ``(s, frames)`` rows."""
    keys = (gather_rows(s, 1, shard),
            Rigid(gather_rows(frames.rots, 1, shard), gather_rows(frames.trans, 1, shard)),
            mask_all)
    s = layer.ipa_layer_norm(_dropout(layer.ipa_dropout, s + layer.ipa(s, p, frames, mask, keys=keys), shard))
    s = _transition(layer.transition, s, shard)
    return s, frames.compose(layer.bb_update(s))


def structure_net(net: StructureNet, s: torch.Tensor, p: torch.Tensor, frames: Rigid,
                  mask_all: torch.Tensor, shard: SequenceShard) -> Rigid:
    """:class:`StructureNet` on this rank's rows (shapes as :func:`structure_layer`); returns
    the refined frames of those rows."""
    mask = mask_all[:, shard.rows]
    for layer in net.calls():
        s, frames = structure_layer(layer, s, p, frames, mask, mask_all, shard)
    return frames
