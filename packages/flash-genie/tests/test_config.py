"""Config: Genie's key/value format, defaults, strict errors."""

from __future__ import annotations

import pytest

from flash_genie import Config, ConfigError
from flash_genie.config import KEYS

# The original's defaults, section by section (genie/config.py at 42e4c996).
ORIGINAL_DEFAULTS = {
    "io": {
        "name": None, "max_n_res": None, "min_n_res": None, "log_dir": "runs", "data_dir": "data",
        "dataset_names": ["scope"], "dataset_size": None, "dataset_classes": None,
    },
    "diffusion": {"n_timestep": 1000, "schedule": "cosine"},
    "model": {
        "c_s": 128, "c_p": 128, "c_pos_emb": 128, "c_timestep_emb": 128, "relpos_k": 32,
        "template_type": "v1", "n_pair_transform_layer": 5, "include_mul_update": True,
        "include_tri_att": False, "c_hidden_mul": 128, "c_hidden_tri_att": 32, "n_head_tri": 4,
        "tri_dropout": 0.25, "pair_transition_n": 4, "n_structure_layer": 5, "n_structure_block": 1,
        "c_hidden_ipa": 16, "n_head_ipa": 12, "n_qk_point": 4, "n_v_point": 8, "ipa_dropout": 0.1,
        "n_structure_transition_layer": 1, "structure_transition_dropout": 0.1,
    },
    "training": {"seed": 100, "n_epoch": 1, "batch_size": 32, "log_every_n_step": 1000, "checkpoint_every_n_epoch": 500},
    "optimization": {"lr": 1e-4},
}


def test_defaults_are_the_originals():
    config = Config()
    for section, expected in ORIGINAL_DEFAULTS.items():
        assert getattr(config, section) == expected, section
    original = [key for key in KEYS if key.section in ORIGINAL_DEFAULTS]
    assert len(original) == sum(len(v) for v in ORIGINAL_DEFAULTS.values())


@pytest.mark.parametrize("name", ["scope_l_128", "tiny", "tiny_triatt"])
def test_fixture_configs_resolve_like_the_original(genie_reference, name):
    ref = genie_reference(name)
    config = Config.from_text(ref["config_text"])
    for section, expected in ref["config_resolved"].items():
        assert getattr(config, section) == expected, section
    assert config.denoiser_kwargs() == {**ref["config_resolved"]["model"], "n_timestep": 1000}


def test_from_file_and_coerce(tmp_path):
    path = tmp_path / "configuration"
    path.write_text("name x\npairFeatureDimension 32\nincludeTriangularAttention True\n")
    config = Config.from_file(path)
    assert config.model["c_p"] == 32 and config.model["include_tri_att"] is True
    assert Config.coerce(path) == config
    assert Config.coerce(str(path)) == config
    assert Config.coerce(path.read_text()) == config
    assert Config.coerce(config) is config
    with pytest.raises(TypeError, match="config must be"):
        Config.coerce(3)


def test_coerce_reads_a_mistyped_path_as_a_missing_file(tmp_path):
    """One line that is not 'key value' text with a known key is a path, never config text."""
    for path in ("weights/scope_l_128/configuration", str(tmp_path / "configuraton"), "my runs/genie config"):
        with pytest.raises(FileNotFoundError, match=f"config file '{path}' does not exist"):
            Config.coerce(path)
    with pytest.raises(FileNotFoundError, match="is a folder, not a configuration file"):
        Config.coerce(str(tmp_path))
    # A single line of real config text is still text, and its errors stay config errors.
    assert Config.coerce("pairFeatureDimension 32").model["c_p"] == 32
    assert Config.coerce("") == Config()
    with pytest.raises(ConfigError, match="pairFeatureDimension"):
        Config.coerce("pairFeatureDimension many")


def test_round_trip_and_replace():
    config = Config.from_text("datasetNames a,b\nlearningRate 3e-4\nseed 7\n")
    assert config.io["dataset_names"] == ["a", "b"]
    assert Config.from_text(config.to_text()) == config
    assert Config.from_text(config.to_text(full=False)) == config
    changed = config.replace(seed=8, pairFeatureDimension="16")
    assert changed.training["seed"] == 8 and changed.model["c_p"] == 16
    assert config.training["seed"] == 7


def test_comments_and_blank_lines():
    config = Config.from_text("# a comment\n\nseed 5   # trailing\n   \n")
    assert config.training["seed"] == 5


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("pairFeatureDim 32", r"line 1 .*unknown key 'pairFeatureDim'; did you mean 'pairFeatureDimension'"),
        ("seed 1\nnumTimestep 10", r"line 2 .*'numTimestep 10'.*did you mean 'numTimesteps'"),
        ("pairFeatureDimension", r"line 1 .*malformed line"),
        ("name a b", r"line 1 .*malformed line"),
        ("pairFeatureDimension 3.5", r"line 1 .*'pairFeatureDimension'.*expected an integer"),
        ("learningRate fast", r"expected a number"),
        ("includeTriangularAttention true", r"expected True or False"),
        ("schedule quadratic", r"expected one of cosine, linear"),
        ("templateType v2", r"expected one of v1"),
        ("pairFeatureDimension 0", r"must be > 0"),
        ("triangularDropout 1.5", r"must be in \[0, 1\)"),
        ("seed 1\nseed 2", r"line 2 .*already set on line 1"),
        ("datasetNames a,,b", r"comma-separated"),
    ],
)
def test_errors_name_the_line(text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Config.from_text(text)


def test_error_is_value_error_and_names_source(tmp_path):
    path = tmp_path / "cfg"
    path.write_text("seed 1\nbogusKey 3\n")
    with pytest.raises(ValueError, match=rf"{path.name}, line 2"):
        Config.from_file(path)


def test_dict_values_are_checked():
    with pytest.raises(ConfigError, match="unknown key 'c_p'; did you mean"):
        Config({"c_p": 3})
    with pytest.raises(ConfigError, match="expected an integer"):
        Config({"pairFeatureDimension": 2.5})
    with pytest.raises(ConfigError, match="expected a boolean"):
        Config({"includeTriangularAttention": 1})
    with pytest.raises(KeyError, match="did you mean 'seed'"):
        Config()["sed"]


def test_length_keys_must_agree():
    """Lengths that no chain could satisfy are rejected when the config is read, naming both keys."""
    with pytest.raises(ConfigError, match=r"'maximumNumResidues' \(40\) must be at least 'minimumNumResidues' \(50\)"):
        Config.from_text("maximumNumResidues 40\nminimumNumResidues 50")
    with pytest.raises(ConfigError, match=r"'lengthCurriculum' length 128 exceeds 'maximumNumResidues' \(64\)"):
        Config.from_text("maximumNumResidues 64\nlengthCurriculum 32:10,128:20")
    with pytest.raises(ConfigError, match="'minimumNumResidues'"):  # replace() checks the merged keys
        Config.from_text("maximumNumResidues 64\nminimumNumResidues 50").replace(maximumNumResidues=32)
    ok = Config.from_text("maximumNumResidues 64\nminimumNumResidues 64\nlengthCurriculum 32:10,64:20")
    assert ok["lengthCurriculum"] == [(32, 10), (64, 20)]
