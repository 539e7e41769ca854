"""Progressive training: the length curriculum changes the batches' length, and the
length-independent positional encoding."""

from __future__ import annotations

import json

import pytest
import torch

from flash_genie.data import LengthCurriculum
from flash_genie.training import Trainer

TRAINING = {"name": "tiny_curriculum", "maximumNumResidues": 24, "minimumNumResidues": 20, "batchSize": 3,
            "learningRate": 1e-3, "seed": 5, "maximumSteps": 6, "checkpointEverySteps": 3, "precision": "fp32",
            "lengthCurriculum": "16:2,20:4"}


def test_stages():
    c = LengthCurriculum([(128, 1000), (256, 3000)], 512)
    assert [c.length_at(s) for s in (0, 999, 1000, 2999, 3000, 10**6)] == [128, 128, 256, 256, 512, 512]
    assert c.switches() == [(0, 128), (1000, 256), (3000, 512)]
    assert LengthCurriculum([], 64).length_at(5) == 64
    with pytest.raises(ValueError, match="exceeds maximumNumResidues"):
        LengthCurriculum([(128, 10)], 64)
    with pytest.raises(ValueError, match="increase"):
        LengthCurriculum([(64, 10), (32, 20)], 128)


def test_batches_change_length_at_the_switch_points(tiny_config, tmp_path):
    config = tiny_config.replace(**TRAINING)
    trainer = Trainer(config, tmp_path, device="cpu", progress=False)
    seen = []
    trainer.model.register_forward_pre_hook(lambda module, args: seen.append(args[2].shape[1]))
    trainer.fit()
    print("padded lengths per step:", seen)
    assert seen == [16, 16, 20, 20, 24, 24]
    assert trainer.length_switches == [(0, 16), (2, 20), (4, 24)]
    logged = [json.loads(line) for line in (tmp_path / "curriculum.jsonl").read_text().splitlines()]
    assert logged == [{"step": 0, "length": 16}, {"step": 2, "length": 20}, {"step": 4, "length": 24}]


def test_resume_inside_a_stage_keeps_the_log(tiny_config, tmp_path):
    config = tiny_config.replace(**TRAINING)
    Trainer(config.replace(maximumSteps=3), tmp_path, device="cpu", progress=False).fit()
    resumed = Trainer(config, tmp_path, device="cpu", progress=False)
    resumed.fit(resume=True)
    assert resumed.length_switches == [(4, 24)]  # step 3 continues the 20-residue stage
    logged = [json.loads(line)["length"] for line in (tmp_path / "curriculum.jsonl").read_text().splitlines()]
    assert logged == [16, 20, 24]


def _noise(model, n_pad, x, mask):
    pad = n_pad - x.shape[1]
    xp = torch.cat([x, torch.zeros(x.shape[0], pad, 3, dtype=x.dtype)], dim=1)
    mp = torch.cat([mask, torch.zeros(mask.shape[0], pad, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        return model.predict_noise(xp, torch.tensor([40]), mp)[:, : x.shape[1]]


@pytest.mark.parametrize("encoding", ["genie", "absolute"])
def test_absolute_encoding_does_not_depend_on_the_padding(tiny_config, helpers, encoding):
    config = tiny_config.replace(positionalEncoding=encoding, maximumNumResidues=32)
    model = helpers.random_model(config)
    assert model.single_feature_net.position_scale == (32 if encoding == "absolute" else None)
    x, mask = helpers.random_chain(1, 14, [14], seed=4)
    short, long = _noise(model, 16, x, mask), _noise(model, 24, x, mask)
    diff = helpers.report(f"{encoding}: padding 16 vs 24", long, short)
    if encoding == "absolute":
        assert diff <= 1e-10
    else:  # Genie scales the index by the padded length
        assert diff > 1e-3


def test_absolute_encoding_needs_a_maximum_length(tiny_config, helpers):
    from flash_genie import ConfigError

    with pytest.raises(ConfigError, match="maximumNumResidues"):
        helpers.random_model(tiny_config.replace(positionalEncoding="absolute"))
