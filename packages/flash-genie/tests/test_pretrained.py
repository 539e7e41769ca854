"""The built-in model: loading it, shipping it, and ``flash-genie sample`` without a checkpoint.

These tests check the mechanics on whatever snapshot is committed, never its sample quality
(``benchmarks/builtin_quality.py`` measures that).
"""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

import pytest
import torch

import flash_genie
from flash_genie import pretrained
from flash_genie.cli import main
from flash_genie.sampling import generate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


SHORT_SCHEDULE = 4  # timesteps of the fast tests instead of the model's 1000


@pytest.fixture(scope="module")
def builtin():
    return flash_genie.load_builtin()


@pytest.fixture(scope="module")
def short_builtin(builtin):
    """The built-in weights in a model built for a 4-step schedule: the mechanics only (the
    timestep encoding depends on the number of steps, so these are not the model's samples)."""
    config = builtin[1].replace(numTimesteps=SHORT_SCHEDULE)
    return flash_genie.load_genie(config, pretrained.BUILTIN_CHECKPOINT), config


def test_load_builtin(builtin):
    model, config = builtin
    assert not model.training and config["name"] == "builtin"
    stored = torch.load(pretrained.BUILTIN_CHECKPOINT, weights_only=True)
    assert stored["weights"] == "ema"
    state = model.state_dict()
    assert state.keys() == stored["state_dict"].keys()
    assert all(torch.equal(state[k], stored["state_dict"][k]) for k in state)
    # the shipped recipe is the configuration the weights were trained with
    recipe = flash_genie.Config.from_file(pretrained.BUILTIN_CONFIG)
    assert recipe.denoiser_kwargs() == config.denoiser_kwargs()


def test_builtin_samples_with_a_short_schedule(short_builtin):
    model, config = short_builtin
    out = generate(model, config, [30], 2, progress=False, seed=1)
    assert [(b.length, b.index, b.coords.shape) for b in out] == [(30, 0, (30, 3)), (30, 1, (30, 3))]
    assert all(torch.isfinite(torch.as_tensor(b.coords)).all() for b in out)
    assert not (out[0].coords == out[1].coords).all()


def test_pretrained_files_ship_in_the_wheel():
    patterns = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-data"]["flash_genie"]
    files = [p for p in pretrained.FOLDER.iterdir() if p.is_file() and p.suffix != ".py"]
    assert {"builtin.pt", "builtin.config"} <= {p.name for p in files}
    for path in files:
        assert any(fnmatch.fnmatch(f"pretrained/{path.name}", pat) for pat in patterns), path.name


def test_sample_without_checkpoint_uses_the_builtin_model(tmp_path, short_builtin, monkeypatch, capsys):
    calls = []

    def load(device="cpu"):
        calls.append(device)
        return short_builtin

    monkeypatch.setattr(pretrained, "load_builtin", load)
    out = tmp_path / "samples"
    assert main(["sample", "--lengths", "24", "30", "--num", "1", "--out", str(out), "--no-progress"]) == 0
    assert calls == ["cpu"]
    assert sorted(p.name for p in (out / "pdbs").iterdir()) == ["24_0.pdb", "30_0.pdb"]
    assert (out / "evaluation" / "summary.json").is_file()
    assert "built-in model (builtin)" in capsys.readouterr().out
    assert main(["sample", "--config", "x.config", "--lengths", "24", "--out", str(tmp_path / "s")]) == 2
    assert "--config and --ema apply to a CHECKPOINT" in capsys.readouterr().err


def test_missing_builtin_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrained, "BUILTIN_CHECKPOINT", tmp_path / "builtin.pt")
    with pytest.raises(FileNotFoundError, match=r"built-in model is missing.*reinstall flash-genie"):
        flash_genie.load_builtin()
    assert main(["sample", "--lengths", "24", "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    assert "built-in model is missing" in capsys.readouterr().err
