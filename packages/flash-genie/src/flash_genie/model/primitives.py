"""Linear layers with Genie's (OpenFold's) initialisers, and shared-mask dropout."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Standard deviation of a unit normal truncated to [-2, 2].
_TRUNC_STD = 0.87962566103423978


class Linear(nn.Linear):
    """``nn.Linear`` initialised as in Genie: ``default`` (LeCun truncated normal),
    ``relu`` (He truncated normal) or ``final`` (zeros); biases start at zero.

    Initialisation only matters for training from scratch: loaded weights
    overwrite it.
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, init: str = "default"):
        if init not in ("default", "relu", "final"):
            raise ValueError(f"init must be 'default', 'relu' or 'final', got {init!r}")
        self.init = init
        super().__init__(in_dim, out_dim, bias=bias)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "final":
                self.weight.zero_()
            else:
                scale = (2.0 if self.init == "relu" else 1.0) / max(1, self.in_features)
                std = math.sqrt(scale) / _TRUNC_STD
                nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std)
            if self.bias is not None:
                self.bias.zero_()


class SharedDropout(nn.Module):
    """Dropout whose mask is shared along one axis (AF2 §1.11.6).

    ``shared_dim=-3`` is Genie's row-wise dropout on ``[B, I, J, C]`` pair updates
    (mask ``[B, 1, J, C]``), ``-2`` the column-wise one (mask ``[B, I, 1, C]``).
    Identity in eval mode.
    """

    def __init__(self, rate: float, shared_dim: int):
        super().__init__()
        self.rate = rate
        self.shared_dim = shared_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        shape = list(x.shape)
        shape[self.shared_dim] = 1
        return x * F.dropout(x.new_ones(shape), self.rate, training=True)

    def extra_repr(self) -> str:
        return f"rate={self.rate}, shared_dim={self.shared_dim}"
