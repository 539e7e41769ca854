"""The training loop: it learns, checkpoints atomically and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from flash_genie.training import Trainer, read_metrics


class Killed(Exception):
    pass


def test_resume_continues_the_same_trajectory(tmp_path, training_config):
    config = training_config()
    full = [log.loss for log in Trainer(config, tmp_path / "full", device="cpu", progress=False).fit()]
    assert len(full) == 6

    def kill_after_step_3(log):  # dies after the step-2 checkpoint and one more step
        if log.step == 3:
            raise Killed

    run = tmp_path / "killed"
    with pytest.raises(Killed):
        Trainer(config, run, device="cpu", progress=False).fit(on_step=kill_after_step_3)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    resumed = Trainer(config, run, device="cpu", progress=False).fit(resume=True)
    assert [log.step for log in resumed] == [3, 4, 5, 6]
    print("uninterrupted", full, "resumed", [log.loss for log in resumed])
    assert [log.loss for log in resumed] == full[2:]
    assert [row["loss"] for row in read_metrics(run / "metrics.jsonl")] == full
    assert (run / "loss.png").stat().st_size > 0 and (run / "checkpoints" / "final.pt").is_file()


def test_loss_goes_down_on_a_fixed_dataset(tmp_path, training_config):
    config = training_config(maximumSteps=60, checkpointEverySteps=0, learningRate=3e-3, batchSize=4)
    logs = Trainer(config, tmp_path, device="cpu", progress=False).fit()
    first, last = [sum(log.loss for log in part) / 10 for part in (logs[:10], logs[-10:])]
    print(f"mean loss of the first 10 steps {first:.3f}, last 10 {last:.3f}")
    assert last < 0.9 * first


def test_refuses_to_overwrite_a_run_and_to_resume_nothing(tmp_path, training_config):
    config = training_config(maximumSteps=1)
    Trainer(config, tmp_path, device="cpu", progress=False).fit()
    with pytest.raises(FileExistsError, match="pass resume=True"):
        Trainer(config, tmp_path, device="cpu", progress=False).fit()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(config, tmp_path / "empty", device="cpu", progress=False).fit(resume=True)
    other = training_config(maximumSteps=2, learningRate=5e-4)
    with pytest.raises(ValueError, match="different configuration"):
        Trainer(other, tmp_path, device="cpu", progress=False).fit(resume=True)


def test_accumulation_and_metrics(tmp_path, training_config):
    config = training_config(maximumSteps=2, accumulateGradBatches=2, checkpointEverySteps=0)
    trainer = Trainer(config, tmp_path, device="cpu", progress=False)
    trainer.fit()
    assert trainer.sampler.position == 4 or trainer.sampler.epoch > 0  # two micro-batches per step
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["grad_norm"] > 0 for r in rows)
