"""Genie's structure net: IPA layers that refine residue frames.

One layer: ``s = LN(dropout(s + IPA(s, p, T)))``, then the transition, then
``T = T ∘ BackboneUpdate(s)``. ``n_structure_block`` re-runs the same layers
with the same weights. Attribute names follow the original's ``state_dict``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flash_genie.model.ipa import InvariantPointAttention
from flash_genie.model.primitives import Linear
from flash_genie.model.rigid import Rigid, quaternion_to_rotation


class StructureTransitionLayer(nn.Module):
    """Residual ``s + Linear(ReLU(Linear(ReLU(Linear(s)))))``, all widths ``c``."""

    def __init__(self, c: int):
        super().__init__()
        self.linear_1 = Linear(c, c, init="relu")
        self.linear_2 = Linear(c, c, init="relu")
        self.linear_3 = Linear(c, c, init="final")

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return s + self.linear_3(torch.relu(self.linear_2(torch.relu(self.linear_1(s)))))


class StructureTransition(nn.Module):
    """``num_layers`` residual blocks, then dropout and LayerNorm."""

    def __init__(self, c: int, num_layers: int, dropout_rate: float):
        super().__init__()
        self.layers = nn.ModuleList(StructureTransitionLayer(c) for _ in range(num_layers))
        self.dropout = nn.Dropout(dropout_rate)
        self.layer_norm = nn.LayerNorm(c)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            s = layer(s)
        return self.layer_norm(self.dropout(s))


class BackboneUpdate(nn.Module):
    """AF2 Algorithm 23: ``Linear(c_s, 6)`` -> quaternion ``(1, b, c, d)/norm`` and translation."""

    def __init__(self, c_s: int):
        super().__init__()
        self.linear = Linear(c_s, 6)

    def forward(self, s: torch.Tensor) -> Rigid:
        """``s`` ``[*, c_s]`` -> update frames ``[*]``."""
        vec, trans = self.linear(s).split(3, dim=-1)
        quat = torch.cat([torch.ones_like(vec[..., :1]), vec], dim=-1)
        quat = quat / torch.sqrt(torch.sum(vec**2, dim=-1, keepdim=True) + 1)
        return Rigid(quaternion_to_rotation(quat), trans)


class StructureLayer(nn.Module):
    """IPA, dropout, LayerNorm, transition, backbone update."""

    def __init__(
        self,
        c_s: int,
        c_p: int,
        c_hidden_ipa: int,
        n_head_ipa: int,
        n_qk_point: int,
        n_v_point: int,
        ipa_dropout: float,
        n_structure_transition_layer: int,
        structure_transition_dropout: float,
        ipa_class: type[InvariantPointAttention] = InvariantPointAttention,
    ):
        super().__init__()
        self.ipa = ipa_class(c_s, c_p, c_hidden_ipa, n_head_ipa, n_qk_point, n_v_point)
        self.ipa_dropout = nn.Dropout(ipa_dropout)
        self.ipa_layer_norm = nn.LayerNorm(c_s)
        self.transition = StructureTransition(c_s, n_structure_transition_layer, structure_transition_dropout)
        self.bb_update = BackboneUpdate(c_s)

    def forward(
        self, s: torch.Tensor, p: torch.Tensor, frames: Rigid, mask: torch.Tensor
    ) -> tuple[torch.Tensor, Rigid]:
        """``s`` ``[B, N, c_s]``, ``p`` ``[B, N, N, c_p]``, frames ``[B, N]``, ``mask`` ``[B, N]``
        -> new ``(s, frames)``."""
        # Dropout acts on the sum, not on the IPA update: that is Genie's order.
        s = self.ipa_layer_norm(self.ipa_dropout(s + self.ipa(s, p, frames, mask)))
        s = self.transition(s)
        return s, frames.compose(self.bb_update(s))


class StructureNet(nn.Module):
    """``n_structure_block`` passes over ``n_structure_layer`` weight-shared layers.

    ``shared=True`` (model compression) keeps one layer (``net.0.*``) and runs it
    ``n_structure_layer · n_structure_block`` times.
    """

    def __init__(self, c_s: int, c_p: int, n_structure_layer: int, n_structure_block: int, *,
                 shared: bool = False, **layer_kwargs):
        """``layer_kwargs`` are :class:`StructureLayer`'s remaining arguments."""
        super().__init__()
        self.n_structure_block = n_structure_block
        self.n_layer = n_structure_layer
        n_modules = min(1, n_structure_layer) if shared else n_structure_layer
        self.net = nn.ModuleList(StructureLayer(c_s, c_p, **layer_kwargs) for _ in range(n_modules))

    def calls(self) -> list[StructureLayer]:
        """The layer calls in execution order (``n_structure_block`` passes over the layers)."""
        if not len(self.net):
            return []
        return [self.net[i % len(self.net)] for _ in range(self.n_structure_block) for i in range(self.n_layer)]

    def forward(
        self, s: torch.Tensor, p: torch.Tensor, frames: Rigid, mask: torch.Tensor, checkpoint_layers: int = 0
    ) -> Rigid:
        """Refined frames ``[B, N]`` starting from the input ``frames``; the first
        ``checkpoint_layers`` layer calls (in execution order) are recomputed in backward."""
        for index, layer in enumerate(self.calls()):
            if index < checkpoint_layers and torch.is_grad_enabled():
                s, frames = checkpoint(layer, s, p, frames, mask, use_reentrant=False)
            else:
                s, frames = layer(s, p, frames, mask)
        return frames
