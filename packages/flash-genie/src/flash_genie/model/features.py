"""Genie's input feature nets: single (per-residue) and pair features.

Attribute names follow the original so that its ``state_dict`` loads unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from flash_genie.model.encodings import relative_position_bins, sinusoidal_encoding


class SingleFeatureNet(nn.Module):
    """``s_i = Linear([pos_enc(i) · m_i, time_enc(s) · m_i])``.

    The residue-index encoding is scaled by the *padded* length ``N`` (so the
    padding length changes the features, as in Genie) unless ``position_scale``
    fixes the scale (a length-independent encoding: residue ``i`` gets the same
    features whatever the padding, as long chains trained through a length
    curriculum need); the timestep encoding is scaled by ``n_timestep``.
    """

    def __init__(self, c_s: int, n_timestep: int, c_pos_emb: int, c_timestep_emb: int,
                 position_scale: int | None = None):
        super().__init__()
        self.position_scale = position_scale
        self.n_timestep = n_timestep
        self.c_pos_emb = c_pos_emb
        self.c_timestep_emb = c_timestep_emb
        self.linear = nn.Linear(c_pos_emb + c_timestep_emb, c_s)

    def forward(self, timesteps: torch.Tensor, mask: torch.Tensor, padded_length: int | None = None) -> torch.Tensor:
        """``timesteps`` ``[B]`` int, ``mask`` ``[B, N]`` -> single features ``[B, N, c_s]``.

        ``padded_length`` (default ``N``) is the length the chains count as padded to,
        for Genie's encoding scale: the first ``N`` positions of a batch padded to
        ``padded_length`` get exactly these features."""
        batch, n_res = mask.shape
        dtype = self.linear.weight.dtype
        m = mask.to(dtype).unsqueeze(-1)
        pos = torch.arange(n_res, device=mask.device)
        scale = (padded_length or n_res) if self.position_scale is None else self.position_scale
        pos_emb = sinusoidal_encoding(pos, scale, self.c_pos_emb, dtype).expand(batch, -1, -1)
        time_emb = sinusoidal_encoding(timesteps, self.n_timestep, self.c_timestep_emb, dtype)
        time_emb = time_emb.unsqueeze(1).expand(-1, n_res, -1)
        return self.linear(torch.cat([pos_emb * m, time_emb * m], dim=-1))


class PairFeatureNet(nn.Module):
    """``p_ij = (Lin_i(s_i) + Lin_j(s_j) + Lin_relpos(onehot(clip(i-j)+k)) + Lin_template(d_ij)) · m_ij``.

    ``d_ij = sqrt(1e-10 + |x_i - x_j|²)`` is the raw Cα distance (Å) of the noisy
    input (Genie's ``v1`` template). The one-hot Linear is evaluated as a column
    gather of its weight, which is the same number without the ``[N, N, 2k+1]``
    one-hot tensor.
    """

    def __init__(self, c_s: int, c_p: int, relpos_k: int, template_type: str = "v1"):
        super().__init__()
        if template_type != "v1":
            raise ValueError(f"template_type must be 'v1' (the only one Genie defines), got {template_type!r}")
        self.relpos_k = relpos_k
        self.linear_s_p_i = nn.Linear(c_s, c_p)
        self.linear_s_p_j = nn.Linear(c_s, c_p)
        self.linear_relpos = nn.Linear(2 * relpos_k + 1, c_p)
        self.linear_template = nn.Linear(1, c_p)

    def relpos(self, n_res: int, device: torch.device, rows: slice | None = None) -> torch.Tensor:
        """Relative-position features ``[N, N, c_p]`` (shared by the batch); ``rows``: only those rows."""
        bins = relative_position_bins(n_res, self.relpos_k, device, rows)
        return self.linear_relpos.weight.t()[bins] + self.linear_relpos.bias

    def forward(
        self, s: torch.Tensor, x: torch.Tensor, pair_mask: torch.Tensor, rows: slice | None = None
    ) -> torch.Tensor:
        """``s`` ``[B, N, c_s]``, Cα ``x`` ``[B, N, 3]``, ``pair_mask`` ``[B, N, N]`` -> ``[B, N, N, c_p]``.

        ``rows`` computes only those rows ``i`` (sequence parallelism): ``pair_mask`` is then
        ``[B, len(rows), N]`` and so is the result's leading part.
        """
        s_i, x_i = (s, x) if rows is None else (s[:, rows], x[:, rows])
        p = self.linear_s_p_i(s_i).unsqueeze(2) + self.linear_s_p_j(s).unsqueeze(1)
        p = p + self.relpos(s.shape[1], s.device, rows)
        dist = torch.sqrt(1e-10 + torch.sum((x_i.unsqueeze(2) - x.unsqueeze(1)) ** 2, dim=-1))
        p = p + self.linear_template(dist.unsqueeze(-1).to(p.dtype))
        return p * pair_mask.unsqueeze(-1).to(p.dtype)
