"""The Genie denoiser: features -> pair stack -> structure net.

Attribute names follow the original ``Denoiser`` so that its ``state_dict``
(Lightning keys without ``model.``) loads unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from flash_genie.config import Config, ConfigError
from flash_genie.model.approx import Approximations, FactorStack, PairIPA, approximate_pair_stack
from flash_genie.model.factorized import FactorizedPairFeatureNet, FactorizedPairTransformLayer
from flash_genie.model.features import PairFeatureNet, SingleFeatureNet
from flash_genie.model.frames import frenet_frames
from flash_genie.model.ipa import InvariantPointAttention
from flash_genie.model.options import MemoryOptions
from flash_genie.model.pair_stack import PairTransformNet
from flash_genie.model.rigid import Rigid
from flash_genie.model.structure import StructureNet


class Denoiser(nn.Module):
    """Genie's noise-prediction network. The constructor takes exactly the
    keyword arguments of the original (``Config.denoiser_kwargs()``).

    ``forward(frames, timesteps, mask)`` maps the noisy frames to refined frames;
    :meth:`predict_noise` is the public entry point on plain Cα coordinates.

    ``position_scale`` (keyword only, default ``None``: Genie's scale, the padded
    length) fixes the scale of the residue-index encoding. :attr:`memory` holds the
    memory options (:class:`~flash_genie.model.options.MemoryOptions`, set with
    :meth:`set_memory_options`), none of which changes a number. ``approx`` (keyword only,
    default: none) selects the approximate long-chain modes
    (:class:`~flash_genie.model.approx.Approximations`: factorized or sparse pairs, axial
    attention, layer sharing), which do change the computation.
    """

    def __init__(
        self,
        c_s: int,
        c_p: int,
        n_timestep: int,
        c_pos_emb: int,
        c_timestep_emb: int,
        relpos_k: int,
        template_type: str,
        n_pair_transform_layer: int,
        include_mul_update: bool,
        include_tri_att: bool,
        c_hidden_mul: int,
        c_hidden_tri_att: int,
        n_head_tri: int,
        tri_dropout: float,
        pair_transition_n: int,
        n_structure_layer: int,
        n_structure_block: int,
        c_hidden_ipa: int,
        n_head_ipa: int,
        n_qk_point: int,
        n_v_point: int,
        ipa_dropout: float,
        n_structure_transition_layer: int,
        structure_transition_dropout: float,
        *,
        position_scale: int | None = None,
        approx: Approximations | None = None,
    ):
        super().__init__()
        self.approx = approx = approx or Approximations()
        mode = approx.pair_mode
        self.n_timestep = n_timestep
        #: The architecture (the original's keyword arguments), for the memory planner.
        self.dims = {
            "c_s": c_s, "c_p": c_p, "c_pos_emb": c_pos_emb, "c_timestep_emb": c_timestep_emb,
            "n_pair_transform_layer": n_pair_transform_layer, "include_mul_update": include_mul_update,
            "include_tri_att": include_tri_att, "c_hidden_mul": c_hidden_mul,
            "c_hidden_tri_att": c_hidden_tri_att, "n_head_tri": n_head_tri,
            "pair_transition_n": pair_transition_n, "n_structure_layer": n_structure_layer,
            "n_structure_block": n_structure_block, "c_hidden_ipa": c_hidden_ipa, "n_head_ipa": n_head_ipa,
            "n_qk_point": n_qk_point, "n_v_point": n_v_point,
            "n_structure_transition_layer": n_structure_transition_layer,
        }
        self.memory = MemoryOptions()
        self.single_feature_net = SingleFeatureNet(c_s, n_timestep, c_pos_emb, c_timestep_emb, position_scale)
        self.pair_feature_net = PairFeatureNet(c_s, c_p, relpos_k, template_type) if mode != "factorized" else None
        self.pair_transform_net = (
            PairTransformNet(
                c_p,
                n_pair_transform_layer,
                shared=approx.share_pair,
                axial=approx.axial_attention,
                include_mul_update=include_mul_update,
                include_tri_att=include_tri_att,
                c_hidden_mul=c_hidden_mul,
                c_hidden_tri_att=c_hidden_tri_att,
                n_head_tri=n_head_tri,
                tri_dropout=tri_dropout,
                pair_transition_n=pair_transition_n,
            )
            if n_pair_transform_layer > 0 and mode != "factorized"
            else None
        )
        self.structure_net = StructureNet(
            c_s,
            c_p,
            n_structure_layer,
            n_structure_block,
            shared=approx.share_structure,
            ipa_class=InvariantPointAttention if mode == "dense" else PairIPA,
            c_hidden_ipa=c_hidden_ipa,
            n_head_ipa=n_head_ipa,
            n_qk_point=n_qk_point,
            n_v_point=n_v_point,
            ipa_dropout=ipa_dropout,
            n_structure_transition_layer=n_structure_transition_layer,
            structure_transition_dropout=structure_transition_dropout,
        )
        self.factor_feature_net = self.factor_transform_net = None
        if approx.z_factor_rank:
            rank = approx.z_factor_rank
            self.factor_feature_net = FactorizedPairFeatureNet(c_s, c_p, rank)
            if n_pair_transform_layer > 0:
                self.factor_transform_net = FactorStack(
                    n_pair_transform_layer,
                    lambda: FactorizedPairTransformLayer(c_p, rank, c_hidden_mul, pair_transition_n, tri_dropout),
                    shared=approx.share_pair,
                )

    @classmethod
    def from_config(cls, config: Config | str) -> Denoiser:
        """Build (with fresh, Genie-style initial weights) from a config, path or text,
        with the config's positional encoding and memory options. A factorized or sparse pair
        mode also gets ``ipaChunkSize auto`` and ``activationCheckpointing auto`` unless the
        config sets them (:meth:`MemoryOptions.for_approximate_pairs`): linear memory by default."""
        config = Config.coerce(config)
        scale = None
        if config["positionalEncoding"] == "absolute":
            scale = config["maximumNumResidues"]
            if scale is None:
                raise ConfigError(f"{config.source}: positionalEncoding absolute scales the residue index by "
                                  "maximumNumResidues, which is not set")
        model = cls(**config.denoiser_kwargs(), position_scale=scale, approx=Approximations.from_config(config))
        options = MemoryOptions.from_config(config)
        if model.approx.pair_mode != "dense":
            # Linear memory as the user switches the mode on (the keys they set win).
            options = options.for_approximate_pairs(config.explicit)
        model.set_memory_options(options)
        return model

    def set_memory_options(self, options: MemoryOptions) -> Denoiser:
        """Apply memory options (see :mod:`flash_genie.model.options`); returns ``self``."""
        self.memory = options
        if self.pair_transform_net is not None:
            net = self.pair_transform_net
            net.chunk_size = options.triangle_attention_chunk_size
            net.transition_chunk_size = options.pair_transition_chunk_size
            net.inplace = options.inplace
            for layer in net.net:
                for name in ("tri_mul_out", "tri_mul_in", "tri_att_start", "tri_att_end"):
                    module = getattr(layer, name)
                    if module is not None:
                        module.backend = options.pair_stack_backend
        for layer in self.structure_net.net:
            layer.ipa.chunk_size = options.ipa_chunk_size
        return self

    def checkpoint_plan(self, batch: int, n_res: int) -> tuple[int, int]:
        """``(pair layers, structure layer calls)`` to recompute in backward for a batch
        of ``batch`` chains padded to ``n_res``, under :attr:`memory`'s policy."""
        policy = self.memory.checkpointing
        nets = (self.pair_transform_net, self.factor_transform_net)
        n_pair = max((net.n_layer for net in nets if net is not None), default=0)
        n_struct = len(self.structure_net.calls())
        if policy == "none" or not torch.is_grad_enabled():
            return 0, 0
        if policy == "all" or self.approx.pair_mode != "dense" or self.approx.axial_attention:
            # The planner models the exact dense model; approximate modes checkpoint every layer.
            return n_pair, n_struct
        from flash_genie.planner import checkpoint_policy  # the planner models this class

        weight = self.single_feature_net.linear.weight
        device = weight.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        parameters = sum(p.numel() for p in self.parameters())
        return checkpoint_policy(self.dims, self.memory, batch, n_res, dtype=dtype, device=weight.device,
                                 parameters=parameters)

    @property
    def dtype(self) -> torch.dtype:
        return self.single_feature_net.linear.weight.dtype

    def forward(self, frames: Rigid, timesteps: torch.Tensor, mask: torch.Tensor, *,
                padded_length: int | None = None) -> Rigid:
        """Refined frames from noisy ones.

        Args:
            frames: ``Rigid`` with ``rots`` ``[B, N, 3, 3]`` and ``trans`` ``[B, N, 3]``
                (noisy Cα coordinates in Å).
            timesteps: ``[B]`` int64 timestep indices in ``[0, n_timestep)``.
            mask: ``[B, N]`` 1 for residues, 0 for padding.

            padded_length: the length the chains count as padded to (default ``N``): the
                scale of Genie's residue-index encoding (see :meth:`predict_noise`).

        Returns:
            ``Rigid`` ``[B, N]``; ``frames.trans - returned.trans`` is the noise estimate.
        """
        mask = mask.to(frames.trans.dtype)
        ckpt_pair, ckpt_struct = self.checkpoint_plan(*mask.shape)
        s = self.single_feature_net(timesteps, mask, padded_length)
        if self.approx.pair_mode != "dense":
            p = approximate_pair_stack(self, s, frames.trans, mask, checkpoint_layers=ckpt_pair)
            return self.structure_net(s, p, frames, mask, checkpoint_layers=ckpt_struct)
        pair_mask = mask.unsqueeze(2) * mask.unsqueeze(1)
        p = self.pair_feature_net(s, frames.trans, pair_mask)
        if self.pair_transform_net is not None:
            p = self.pair_transform_net(p, pair_mask, checkpoint_layers=ckpt_pair)
        return self.structure_net(s, p, frames, mask, checkpoint_layers=ckpt_struct)

    def predict_noise(self, xt: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor, *,
                      padded_length: int | None = None) -> torch.Tensor:
        """Predicted noise ``[B, N, 3]`` for noisy Cα coordinates, as Genie's loss and sampler use it.

        Args:
            xt: ``[B, N, 3]`` noisy Cα coordinates (Å), in the model's dtype.
            timesteps: ``[B]`` integer timestep indices in ``[0, n_timestep)``.
            mask: ``[B, N]`` prefix mask (real residues first), float or bool.

        The Frenet frames of ``xt`` are built inside, as Genie does; the result is
        ``xt - forward(frames(xt), timesteps, mask).trans``. Only real residues
        are meaningful.

        ``padded_length`` runs a batch padded to that length without its padding: ``xt``
        and ``mask`` hold only the first ``N`` positions (every chain fits), and the
        real residues get the padded batch's noise estimate up to rounding (padded
        residues enter every layer only through the masks; Genie's residue-index
        encoding is the one place the padded length shows, and it is scaled by it).
        """
        timesteps, mask = check_inputs(xt, timesteps, mask, self.n_timestep, self.dtype)
        out = self(Rigid(frenet_frames(xt, mask), xt), timesteps, mask, padded_length=padded_length)
        return xt - out.trans


def check_inputs(
    xt: torch.Tensor, timesteps: torch.Tensor | int, mask: torch.Tensor, n_timestep: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the denoiser inputs; returns ``timesteps`` as ``[B]`` int64 and ``mask`` in ``xt.dtype``."""
    if not isinstance(xt, torch.Tensor) or xt.dim() != 3 or xt.shape[-1] != 3:
        shape = tuple(xt.shape) if isinstance(xt, torch.Tensor) else type(xt).__name__
        raise ValueError(f"xt must be a [B, N, 3] tensor of Cα coordinates, got {shape}")
    if xt.dtype != dtype:
        raise TypeError(f"xt is {xt.dtype} but the model is {dtype}; cast one to the other")
    batch, n_res = xt.shape[:2]
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, n_res):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must have shape [B, N] = {(batch, n_res)}, got {shape}")
    if mask.device != xt.device:
        raise ValueError(f"mask is on {mask.device} but xt is on {xt.device}")
    if isinstance(timesteps, int):
        timesteps = torch.full((batch,), timesteps, dtype=torch.long, device=xt.device)
    if not isinstance(timesteps, torch.Tensor) or timesteps.shape != (batch,):
        shape = tuple(timesteps.shape) if isinstance(timesteps, torch.Tensor) else type(timesteps).__name__
        raise ValueError(f"timesteps must have shape [B] = ({batch},), got {shape}")
    if timesteps.dtype.is_floating_point or timesteps.dtype.is_complex or timesteps.dtype == torch.bool:
        raise TypeError(f"timesteps must be an integer tensor of indices, got {timesteps.dtype}")
    if batch and (int(timesteps.min()) < 0 or int(timesteps.max()) >= n_timestep):
        raise ValueError(
            f"timesteps must lie in [0, {n_timestep}), got values from {int(timesteps.min())} "
            f"to {int(timesteps.max())}"
        )
    return timesteps.to(device=xt.device, dtype=torch.long), mask.to(xt.dtype)
