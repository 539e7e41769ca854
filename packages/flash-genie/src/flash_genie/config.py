"""Genie's plain-text configuration: one ``key value`` pair per line.

Every key of the original ``genie.config.Config`` is accepted with its original
default, and :class:`Config` exposes the same five sections (``io``,
``diffusion``, ``model``, ``training``, ``optimization``) as dicts with the
original names, so ``Config.model`` plus ``n_timestep`` are the keyword
arguments of the denoiser.

Unlike the original parser, which silently drops any line that does not split
into exactly two tokens and keeps unknown keys, this one raises
:class:`ConfigError` naming the line (and, for an unknown key, the nearest valid
key). Blank lines and ``#`` comments are allowed. Later features add their keys
to :data:`KEYS`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["KEYS", "Config", "ConfigError", "parse_bytes"]


class ConfigError(ValueError):
    """A configuration line that cannot be accepted (unknown key, malformed line, bad value)."""


@dataclass(frozen=True)
class Key:
    """One configuration key: where it lands and how its text is read."""

    name: str  # the key as written in the file, e.g. ``pairFeatureDimension``
    section: str  # ``io``, ``diffusion``, ``model``, ``training`` or ``optimization``
    field: str  # name inside the section, e.g. ``c_p``
    default: Any
    parse: Callable[[str], Any]
    kind: str  # human-readable type for error messages
    check: Callable[[Any], bool] | None = None
    requirement: str = ""  # what ``check`` demands, for error messages
    show: Callable[[Any], str] | None = None  # value -> text, where ``str`` is not the inverse of ``parse``


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("expected an integer") from None


def _int_or_auto(text: str) -> int | str:
    if str(text) == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise ValueError("expected an integer or auto") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("expected a number") from None


def _bool(text: str) -> bool:
    # The original maps exactly these two spellings; anything else stayed a
    # (truthy) string there, which is the silent failure this parser removes.
    if text == "True":
        return True
    if text == "False":
        return False
    raise ValueError("expected True or False")


def _str_list(text: str) -> list[str]:
    items = text.strip().split(",")
    if any(not item for item in items):
        raise ValueError("expected a comma-separated list without empty items")
    return items


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """A memory size: ``80GiB``, ``80GB`` (10⁹ bytes), ``512MiB``, ``1.5TiB`` or plain bytes."""
    body = text.strip()
    digits = body.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = body[len(digits):].strip().upper()
    if unit not in _UNITS:
        raise ValueError(f"expected a size such as 80GiB, 80GB or 512MiB, got {text!r}")
    try:
        value = float(digits)
    except ValueError:
        raise ValueError(f"expected a size such as 80GiB, 80GB or 512MiB, got {text!r}") from None
    if value < 0:
        raise ValueError(f"a size cannot be negative, got {text!r}")
    return int(value * _UNITS[unit])


def _curriculum(text: str) -> list[tuple[int, int]]:
    """``128:1000,256:3000``: train at 128 residues until step 1000, then at 256 until step
    3000, then at ``maximumNumResidues``; ``none`` for no curriculum."""
    if text == "none":
        return []
    stages = []
    for item in text.split(","):
        length, sep, until = item.partition(":")
        try:
            stage = (int(length), int(until))
        except ValueError:
            stage = None
        if not sep or stage is None or stage[0] < 1 or stage[1] < 1:
            raise ValueError(f"expected length:until_step items such as 128:1000,256:3000, got {item!r}")
        if stages and (stage[0] <= stages[-1][0] or stage[1] <= stages[-1][1]):
            raise ValueError("lengths and step thresholds must both increase from one stage to the next")
        stages.append(stage)
    return stages


def _format_curriculum(stages: list[tuple[int, int]]) -> str:
    return ",".join(f"{length}:{until}" for length, until in stages) or "none"


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return text

    return parse


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


def _probability(v: float) -> bool:
    return 0.0 <= v < 1.0


def _k(name, section, field, default, parse, kind, check=None, requirement="", show=None):
    return Key(name, section, field, default, parse, kind, check, requirement, show)


_POS = (_positive, "must be > 0")
_NONNEG = (_non_negative, "must be >= 0")
_PROB = (_probability, "must be in [0, 1)")

#: Every accepted key, in the original's order, with the original defaults.
KEYS: tuple[Key, ...] = (
    # io
    _k("name", "io", "name", None, str, "string"),
    _k("maximumNumResidues", "io", "max_n_res", None, _int, "integer", *_POS),
    _k("minimumNumResidues", "io", "min_n_res", None, _int, "integer", *_NONNEG),
    _k("logDirectory", "io", "log_dir", "runs", str, "string"),
    _k("dataDirectory", "io", "data_dir", "data", str, "string"),
    _k("datasetNames", "io", "dataset_names", ["scope"], _str_list, "comma-separated list"),
    _k("datasetSize", "io", "dataset_size", None, _int, "integer", *_POS),
    _k("datasetClasses", "io", "dataset_classes", None, _str_list, "comma-separated list"),
    # diffusion
    _k("numTimesteps", "diffusion", "n_timestep", 1000, _int, "integer", *_POS),
    _k("schedule", "diffusion", "schedule", "cosine", _choice("cosine", "linear"), "schedule name"),
    # model: general
    _k("singleFeatureDimension", "model", "c_s", 128, _int, "integer", *_POS),
    _k("pairFeatureDimension", "model", "c_p", 128, _int, "integer", *_POS),
    # model: single feature network
    _k("positionalEmbeddingDimension", "model", "c_pos_emb", 128, _int, "integer", *_POS),
    _k("timestepEmbeddingDimension", "model", "c_timestep_emb", 128, _int, "integer", *_POS),
    # model: pair feature network
    _k("relativePositionK", "model", "relpos_k", 32, _int, "integer", *_NONNEG),
    _k("templateType", "model", "template_type", "v1", _choice("v1"), "template type"),
    # model: pair transform network
    _k("numPairTransformLayers", "model", "n_pair_transform_layer", 5, _int, "integer", *_NONNEG),
    _k("includeTriangularMultiplicativeUpdate", "model", "include_mul_update", True, _bool, "boolean"),
    _k("includeTriangularAttention", "model", "include_tri_att", False, _bool, "boolean"),
    _k("triangularMultiplicativeHiddenDimension", "model", "c_hidden_mul", 128, _int, "integer", *_POS),
    _k("triangularAttentionHiddenDimension", "model", "c_hidden_tri_att", 32, _int, "integer", *_POS),
    _k("triangularAttentionNumHeads", "model", "n_head_tri", 4, _int, "integer", *_POS),
    _k("triangularDropout", "model", "tri_dropout", 0.25, _float, "number", *_PROB),
    _k("pairTransitionN", "model", "pair_transition_n", 4, _int, "integer", *_POS),
    # model: structure network
    _k("numStructureLayers", "model", "n_structure_layer", 5, _int, "integer", *_NONNEG),
    _k("numStructureBlocks", "model", "n_structure_block", 1, _int, "integer", *_NONNEG),
    _k("ipaHiddenDimension", "model", "c_hidden_ipa", 16, _int, "integer", *_POS),
    _k("ipaNumHeads", "model", "n_head_ipa", 12, _int, "integer", *_POS),
    _k("ipaNumQkPoints", "model", "n_qk_point", 4, _int, "integer", *_POS),
    _k("ipaNumVPoints", "model", "n_v_point", 8, _int, "integer", *_POS),
    _k("ipaDropout", "model", "ipa_dropout", 0.1, _float, "number", *_PROB),
    _k("numStructureTransitionLayers", "model", "n_structure_transition_layer", 1, _int, "integer", *_NONNEG),
    _k("structureTransitionDropout", "model", "structure_transition_dropout", 0.1, _float, "number", *_PROB),
    # training
    _k("seed", "training", "seed", 100, _int, "integer"),
    _k("numEpoches", "training", "n_epoch", 1, _int, "integer", *_POS),
    _k("batchSize", "training", "batch_size", 32, _int, "integer", *_POS),
    _k("logEverySteps", "training", "log_every_n_step", 1000, _int, "integer", *_POS),
    _k("checkpointEveryEpoches", "training", "checkpoint_every_n_epoch", 500, _int, "integer", *_POS),
    # optimization
    _k("learningRate", "optimization", "lr", 1e-4, _float, "number", *_POS),
    # flash-genie's own training keys (not in the original Genie): section "trainer"
    _k("dataset", "trainer", "dataset", "builtin", str, "string"),
    _k("padToMaximumNumResidues", "trainer", "pad_to_max", True, _bool, "boolean"),
    _k("maximumSteps", "trainer", "max_steps", 0, _int, "integer", *_NONNEG),
    _k("accumulateGradBatches", "trainer", "accumulate", 1, _int, "integer", *_POS),
    _k("checkpointEverySteps", "trainer", "checkpoint_every_n_step", 0, _int, "integer", *_NONNEG),
    _k("precision", "trainer", "precision", "auto", _choice("auto", "fp32", "bf16", "fp16"), "precision"),
    _k("warmupEpochs", "trainer", "warmup_epochs", 0, _int, "integer", *_NONNEG),
    _k("warmupSteps", "trainer", "warmup_steps", 0, _int, "integer", *_NONNEG),
    _k("gradientClipVal", "trainer", "gradient_clip_val", 0.0, _float, "number", *_NONNEG),
    _k("emaDecay", "trainer", "ema_decay", 0.0, _float, "number", *_PROB),
    # flash-genie's memory options (exact: none changes a number): section "memory"
    _k("pairStackBackend", "memory", "pair_stack_backend", "auto",
       _choice("auto", "torch", "reference", "tk"), "genie-tk backend"),
    _k("activationCheckpointing", "memory", "checkpointing", "none",
       _choice("none", "auto", "all"), "checkpointing policy"),
    _k("memoryBudget", "memory", "memory_budget", 0, parse_bytes, "size"),
    _k("ipaChunkSize", "memory", "ipa_chunk_size", 0, _int_or_auto, "integer or auto",
       lambda v: v == "auto" or v >= 0, "must be >= 0 or auto"),
    _k("pairTransitionChunkSize", "memory", "pair_transition_chunk_size", 0, _int, "integer", *_NONNEG),
    _k("triangleAttentionChunkSize", "memory", "triangle_attention_chunk_size", 0, _int, "integer", *_NONNEG),
    _k("sparseChunkSize", "memory", "sparse_chunk_size", 0, _int, "integer", *_NONNEG),
    _k("inplaceResidual", "memory", "inplace", False, _bool, "boolean"),
    _k("lossChunkSize", "memory", "loss_chunk_size", 0, _int, "integer", *_NONNEG),
    # flash-genie's long-chain training options: section "longseq"
    _k("positionalEncoding", "longseq", "positional_encoding", "genie",
       _choice("genie", "absolute"), "encoding"),
    _k("lengthCurriculum", "longseq", "length_curriculum", [], _curriculum, "length curriculum",
       show=_format_curriculum),
    _k("auxDistanceLossWeight", "longseq", "aux_distance_weight", 0.0, _float, "number", *_NONNEG),
    _k("auxDistanceCutoff", "longseq", "aux_distance_cutoff", 6.0, _float, "number", *_POS),
    _k("auxDistanceTimeFraction", "longseq", "aux_distance_time_fraction", 0.25, _float, "number",
       lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    _k("useProgressiveTraining", "longseq", "progressive", False, _bool, "boolean"),
    _k("progressiveStartLength", "longseq", "progressive_start_length", 128, _int, "integer", *_POS),
    _k("progressiveStageSteps", "longseq", "progressive_stage_steps", 1000, _int, "integer", *_POS),
    _k("useChunkedLoss", "longseq", "chunked_loss", False, _bool, "boolean"),
    # flash-genie's approximate modes for very long chains (they change the computation): "approx"
    _k("zFactorRank", "approx", "z_factor_rank", 0, _int, "integer", *_NONNEG),
    _k("useSparseKNN", "approx", "sparse_knn", False, _bool, "boolean"),
    _k("kNeighbors", "approx", "k_neighbors", 32, _int, "integer", *_POS),
    _k("knnSelection", "approx", "knn_selection", "hybrid", _choice("hybrid", "coordinates", "sequence"),
       "neighbour selection"),
    _k("useAxialAttention", "approx", "axial_attention", False, _bool, "boolean"),
    _k("useModelCompression", "approx", "compression", False, _bool, "boolean"),
    _k("compressionStrategy", "approx", "compression_strategy", "universal",
       _choice("universal", "pair", "structure"), "compression strategy"),
    # flash-genie's distributed training keys (torchrun): section "parallel"
    _k("sequenceParallelSize", "parallel", "sequence_parallel_size", 1, _int, "integer", *_POS),
    _k("ddpBackend", "parallel", "backend", "auto", _choice("auto", "gloo", "nccl"), "backend"),
    _k("findUnusedParameters", "parallel", "find_unused_parameters", False, _bool, "boolean"),
)

_BY_NAME: dict[str, Key] = {key.name: key for key in KEYS}
SECTIONS = ("io", "diffusion", "model", "training", "optimization", "trainer", "memory", "longseq", "approx",
            "parallel")

#: Defaults that follow from another key when the text does not set them: ``key: (switch, value)``.
#: ``useProgressiveTraining`` trains through growing lengths, which needs residue-index features
#: that do not depend on the padded length; ``useChunkedLoss`` turns on the auxiliary pairwise
#: distance loss (FrameDiff's weight, 1.0) and computes it in blocks of 128 rows.
_IMPLIED = {
    "positionalEncoding": ("useProgressiveTraining", "absolute"),
    "auxDistanceLossWeight": ("useChunkedLoss", 1.0),
    "lossChunkSize": ("useChunkedLoss", 128),
}
#: Keys that only mean something when a switch is on: setting them with the switch off is an error.
_NEEDS = {
    "kNeighbors": "useSparseKNN",
    "knnSelection": "useSparseKNN",
    "compressionStrategy": "useModelCompression",
    "progressiveStartLength": "useProgressiveTraining",
    "progressiveStageSteps": "useProgressiveTraining",
}


def _format(key: Key, value: Any) -> str:
    if key.show is not None:
        return key.show(value)
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


class Config:
    """A parsed Genie configuration.

    Build it with :meth:`from_file`, :meth:`from_text` or ``Config()`` (all
    defaults). ``config.model`` etc. are fresh dicts in the original's layout;
    ``config["pairFeatureDimension"]`` reads one value by its file key;
    ``config.explicit`` holds the keys the text set.
    """

    def __init__(self, values: Mapping[str, Any] | None = None, *, source: str = "<dict>"):
        values = dict(values or {})
        for name in values:
            if name not in _BY_NAME:
                raise ConfigError(f"{source}: unknown key '{name}'{_suggest(name)}")
        values = {n: _coerce(_BY_NAME[n], v, f"{source}: key '{n}'") for n, v in values.items()}
        self.source = source
        self.explicit: dict[str, Any] = values
        self._values = {key.name: values.get(key.name, key.default) for key in KEYS}
        for name, (switch, value) in _IMPLIED.items():
            if self._values[switch] and name not in values:
                self._values[name] = value
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Reject keys that contradict each other or that their switch leaves without effect."""
        v, where = self._values, self.source
        for name, switch in _NEEDS.items():
            if name in self.explicit and not v[switch]:
                raise ConfigError(f"{where}: '{name}' only acts with '{switch} True'")
        if v["useAxialAttention"] and (v["zFactorRank"] or v["useSparseKNN"]):
            raise ConfigError(f"{where}: 'useAxialAttention' acts on the dense pair tensor; it cannot be combined "
                              "with 'zFactorRank' or 'useSparseKNN'")
        if v["useProgressiveTraining"] and v["lengthCurriculum"] and (
                "progressiveStartLength" in self.explicit or "progressiveStageSteps" in self.explicit):
            raise ConfigError(f"{where}: give either 'lengthCurriculum' or 'progressiveStartLength' / "
                              "'progressiveStageSteps', not both")
        longest, shortest = v["maximumNumResidues"], v["minimumNumResidues"]
        if longest is not None and shortest is not None and longest < shortest:
            raise ConfigError(f"{where}: 'maximumNumResidues' ({longest}) must be at least "
                              f"'minimumNumResidues' ({shortest})")
        too_long = [length for length, _ in v["lengthCurriculum"] if longest is not None and length > longest]
        if too_long:
            raise ConfigError(f"{where}: 'lengthCurriculum' length {too_long[0]} exceeds 'maximumNumResidues' "
                              f"({longest}); every stage must be at most that long")
        if v["useChunkedLoss"] and not v["auxDistanceLossWeight"]:
            raise ConfigError(f"{where}: 'useChunkedLoss True' chunks the auxiliary pairwise distance loss, which "
                              "'auxDistanceLossWeight 0' turns off")

    def curriculum(self) -> list[tuple[int, int]]:
        """The length curriculum's stages ``[(length, until_step), ...]``: ``lengthCurriculum`` if
        given; with ``useProgressiveTraining`` otherwise lengths ``progressiveStartLength``, twice
        that, ... below ``maximumNumResidues``, ``progressiveStageSteps`` steps each."""
        v = self._values
        if v["lengthCurriculum"] or not v["useProgressiveTraining"]:
            return list(v["lengthCurriculum"])
        final = v["maximumNumResidues"]
        if final is None:
            raise ConfigError(f"{self.source}: 'useProgressiveTraining' grows the length up to "
                              "'maximumNumResidues', which is not set")
        stages, length = [], v["progressiveStartLength"]
        while length < final:
            stages.append((length, (len(stages) + 1) * v["progressiveStageSteps"]))
            length *= 2
        return stages

    # -- construction -------------------------------------------------------
    @classmethod
    def from_text(cls, text: str, source: str = "<text>") -> Config:
        """Parse configuration text; raises :class:`ConfigError` naming the bad line."""
        values: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        for lineno, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            where = f"{source}, line {lineno} ('{raw.strip()}')"
            tokens = line.split()
            if len(tokens) != 2:
                raise ConfigError(
                    f"{where}: malformed line, expected exactly two tokens 'key value', got {len(tokens)}"
                )
            name, text_value = tokens
            key = _BY_NAME.get(name)
            if key is None:
                raise ConfigError(f"{where}: unknown key '{name}'{_suggest(name)}")
            if name in first_line:
                raise ConfigError(f"{where}: key '{name}' already set on line {first_line[name]}")
            values[name] = _coerce(key, text_value, where)
            first_line[name] = lineno
        return cls(values, source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Config:
        """Read a configuration file (Genie's ``configuration`` files load unchanged)."""
        with open(path, encoding="utf-8") as handle:
            return cls.from_text(handle.read(), source=os.fspath(path))

    @classmethod
    def coerce(cls, config: Config | str | os.PathLike) -> Config:
        """A :class:`Config`, a path to a configuration file, or configuration text.

        A string with a newline is text. One without is a file if there is one; otherwise it
        is read as text when it has the shape of a ``key value`` line with a known key, and
        anything else (a mistyped path) raises ``FileNotFoundError`` naming it.
        """
        if isinstance(config, Config):
            return config
        if isinstance(config, os.PathLike):
            return cls.from_file(config)
        if not isinstance(config, str):
            raise TypeError(f"config must be a Config, a path or config text, got {type(config).__name__}")
        if "\n" in config:
            return cls.from_text(config)
        if os.path.isfile(config):
            return cls.from_file(config)
        tokens = config.split("#", 1)[0].split()
        if tokens and (len(tokens) != 2 or tokens[0] not in _BY_NAME):
            kind = "is a folder, not a configuration file" if os.path.isdir(config) else "does not exist"
            raise FileNotFoundError(f"config file {config!r} {kind} (and it is not 'key value' configuration text)")
        return cls.from_text(config)

    def replace(self, **values: Any) -> Config:
        """A copy with some keys (file names, e.g. ``pairFeatureDimension=32``) changed."""
        return Config({**self.explicit, **values}, source=self.source)

    # -- access -------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        if name not in self._values:
            raise KeyError(f"unknown config key '{name}'{_suggest(name)}")
        value = self._values[name]
        return list(value) if isinstance(value, list) else value

    def section(self, name: str) -> dict[str, Any]:
        if name not in SECTIONS:
            raise KeyError(f"unknown section '{name}', expected one of {SECTIONS}")
        return {key.field: self[key.name] for key in KEYS if key.section == name}

    io = property(lambda self: self.section("io"))
    diffusion = property(lambda self: self.section("diffusion"))
    model = property(lambda self: self.section("model"))
    training = property(lambda self: self.section("training"))
    optimization = property(lambda self: self.section("optimization"))
    trainer = property(lambda self: self.section("trainer"))
    memory = property(lambda self: self.section("memory"))
    longseq = property(lambda self: self.section("longseq"))
    approx = property(lambda self: self.section("approx"))
    parallel = property(lambda self: self.section("parallel"))

    def denoiser_kwargs(self) -> dict[str, Any]:
        """``model`` plus ``n_timestep``: the keyword arguments of the denoiser."""
        return {**self.model, "n_timestep": self["numTimesteps"]}

    def to_text(self, full: bool = True) -> str:
        """Configuration text that :meth:`from_text` reads back to an equal config.

        ``full=True`` writes every key that has a value (defaults included), so the
        text stays correct even if a default changes later.
        """
        names: Iterable[str] = (k.name for k in KEYS) if full else self.explicit
        lines = [f"{n} {_format(_BY_NAME[n], self._values[n])}" for n in names
                 if self._values[n] is not None and (n in self.explicit or self._values.get(_NEEDS.get(n), True))]
        return "\n".join(lines) + "\n"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self._values == other._values

    def __repr__(self) -> str:
        set_keys = ", ".join(f"{k}={v!r}" for k, v in self.explicit.items())
        return f"Config({set_keys})"


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, list(_BY_NAME), n=1, cutoff=0.0)
    return f"; did you mean '{close[0]}'?" if close else ""


def _coerce(key: Key, value: Any, where: str) -> Any:
    """Parse text (or check an already typed value) for ``key``; ConfigError on failure."""
    if isinstance(value, str):
        try:
            value = key.parse(value)
        except ValueError as err:
            raise ConfigError(f"{where}: bad value for '{key.name}': {err}") from None
    elif not _has_type(key, value):
        article = "an" if key.kind[0] in "aeiou" else "a"
        raise ConfigError(f"{where}: bad value {value!r} for '{key.name}': expected {article} {key.kind}")
    elif key.show is not None:  # typed values with a text form are checked through it
        return _coerce(key, key.show(value), where)
    if key.check is not None and value is not None and not key.check(value):
        raise ConfigError(f"{where}: bad value {value!r} for '{key.name}': {key.requirement}")
    return value


def _has_type(key: Key, value: Any) -> bool:
    if value is None:
        return key.default is None
    expected = {"integer": int, "number": (int, float), "boolean": bool, "comma-separated list": list,
                "size": int, "length curriculum": list, "integer or auto": (int, str)}
    kind = expected.get(key.kind, str)
    return isinstance(value, kind) and (key.kind == "boolean" or not isinstance(value, bool))
