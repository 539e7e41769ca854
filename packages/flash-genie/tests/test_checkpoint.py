"""load_genie on Lightning checkpoints and state_dicts; flash-genie's own checkpoints."""

from __future__ import annotations

import os

import pytest
import torch

from flash_genie import Config, load_checkpoint, load_genie, save_checkpoint


def test_lightning_checkpoint_reproduces_tiny(genie_reference, helpers):
    ref = genie_reference("tiny")
    model = load_genie(ref["config_text"], genie_reference.folder / "tiny.ckpt", dtype=torch.float64)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == ref["n_parameters"]
    inputs, mask = ref["inputs"], ref["inputs"]["mask"]
    with torch.no_grad():
        eps = model.predict_noise(inputs["xt"], inputs["timesteps"], mask)
    real = mask.bool()
    helpers.assert_close("tiny.ckpt eps_pred", eps[real], ref["outputs"]["eps_pred"][real], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", ["scope_l_128", "tiny", "tiny_triatt"])
def test_state_dict_forms_and_parameter_counts(genie_reference, name):
    ref = genie_reference(name)
    prefixed = ref["state_dict"]
    bare = {k.removeprefix("model."): v for k, v in prefixed.items()}
    a = load_genie(Config.from_text(ref["config_text"]), prefixed)
    b = load_genie(ref["config_text"], bare)
    assert sum(p.numel() for p in a.parameters()) == ref["n_parameters"]
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert set(a.state_dict()) == set(bare)


def test_config_from_a_file(genie_reference, tmp_path):
    ref = genie_reference("tiny")
    path = tmp_path / "configuration"
    path.write_text(ref["config_text"])
    model = load_genie(path, ref["state_dict"])
    assert model.dtype == torch.float32


def test_own_checkpoint_round_trip(tiny_config, helpers, tmp_path):
    model = helpers.random_model(tiny_config, dtype=torch.float32)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, tiny_config, step=12)
    assert os.listdir(tmp_path) == ["model.pt"]  # no temporary file left behind
    raw = load_checkpoint(path)
    assert raw["step"] == 12 and Config.from_text(raw["config"]) == tiny_config
    loaded = load_genie(None, path)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    # Saving over an existing file replaces it.
    save_checkpoint(path, model, tiny_config, step=13)
    assert load_checkpoint(path)["step"] == 13


def _save(path, obj):
    torch.save(obj, path)
    return path


def test_mismatched_or_missing_inputs(tiny_config, helpers, tmp_path):
    weights = helpers.random_model(tiny_config).state_dict()
    with pytest.raises(ValueError, match=r"\d+ missing keys \(first: \['pair_transform_net.net.1"):
        load_genie(tiny_config.replace(numPairTransformLayers=2), weights)
    with pytest.raises(ValueError, match="size mismatch"):
        load_genie(tiny_config.replace(pairFeatureDimension=8), weights)
    with pytest.raises(ValueError, match="carry no configuration"):
        load_genie(None, weights)
    with pytest.raises(FileNotFoundError, match="config file 'weights/scope_l_128/configuration' does not exist"):
        load_genie("weights/scope_l_128/configuration", weights)
    bad = tmp_path / "bad.pt"
    torch.save([1, 2], bad)
    with pytest.raises(ValueError, match="not a checkpoint or state_dict"):
        load_genie(tiny_config, bad)
    with pytest.raises(ValueError, match="not a flash-genie checkpoint"):
        load_checkpoint(_save(tmp_path / "plain.pt", weights))
    with pytest.raises(ValueError, match="not a state_dict of tensors"):
        load_genie(tiny_config, {"a": 1})
    with pytest.raises(FileNotFoundError):
        load_genie(tiny_config, tmp_path / "absent.ckpt")
