"""The trainer under torchrun (2 processes, gloo): DDP with exact resume from a checkpoint that
rank 0 wrote, and sequence parallelism reproducing the single-process run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from flash_genie.training import Trainer, read_metrics

# The shared training config (conftest.TINY_TRAINING) in batches of 2 chains, 2 accumulated per step,
# with triangle attention (its sequence-parallel all-to-alls).
DDP = {"batchSize": 2, "accumulateGradBatches": 2, "maximumSteps": 4, "includeTriangularAttention": True}

# Runs in each of the 2 processes torchrun starts: argv = output folder, config file.
WORKER = """
import json, sys
from pathlib import Path

from flash_genie import Config
from flash_genie.training import Trainer

out, config = Path(sys.argv[1]), Config.from_file(sys.argv[2])


class Killed(Exception):
    pass


def kill_after_step_3(log):  # every rank dies after the step-2 checkpoint and one more step
    if log.step == 3:
        raise Killed


def losses(logs):
    return [log.loss for log in logs]


full = Trainer(config, out / "ddp", device="cpu", progress=False)
results = {"ddp": losses(full.fit()), "layout": full.dist.grid.describe()}
try:
    Trainer(config, out / "killed", device="cpu", progress=False).fit(on_step=kill_after_step_3)
except Killed:
    pass
resumed = Trainer(config, out / "killed", device="cpu", progress=False).fit(resume=True)
results["resumed"] = losses(resumed)
results["resumed_steps"] = [log.step for log in resumed]
sp = Trainer(config.replace(sequenceParallelSize=2), out / "sp", device="cpu", progress=False)
results["sp"] = losses(sp.fit())
results["sp_layout"] = sp.dist.grid.describe()
if sp.dist.is_main:
    (out / "results.json").write_text(json.dumps(results))
sp.dist.close()
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, training_config):
    """The worker's results and output folder (one torchrun launch for the module)."""
    out = tmp_path_factory.mktemp("distributed")
    (out / "worker.py").write_text(WORKER)
    (out / "tiny.config").write_text(training_config(**DDP).to_text(full=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0",
           str(out / "worker.py"), str(out), str(out / "tiny.config")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads((out / "results.json").read_text()), out


def test_ddp_resume_continues_the_same_trajectory(runs):
    results, out = runs
    print(results)
    assert results["layout"] == "2 processes = data 2 × sequence 1"
    assert results["resumed_steps"] == [3, 4]
    assert results["resumed"] == results["ddp"][2:]
    # Rank 0 alone wrote the metrics (one line a step, the data ranks' mean loss) and checkpoints.
    assert [row["loss"] for row in read_metrics(out / "killed" / "metrics.jsonl")] == results["ddp"]
    ckpt = torch.load(out / "ddp" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["layout"] == {"world": 2, "sequence_parallel": 1} and len(ckpt["rank_states"]) == 2
    # Data rank 1 draws from its own streams.
    assert not torch.equal(ckpt["rank_states"][0]["generator"], ckpt["rank_states"][1]["generator"])
    assert (out / "ddp" / "loss.png").stat().st_size > 0


def test_sequence_parallel_training_is_the_single_process_run(runs, training_config, tmp_path):
    results, _ = runs
    assert results["sp_layout"] == "2 processes = data 1 × sequence 2"
    single = [log.loss for log in Trainer(training_config(**DDP), tmp_path, device="cpu", progress=False).fit()]
    print("single process", single, "sequence parallel", results["sp"])
    assert results["sp"] == pytest.approx(single, rel=1e-5)


def test_one_process_refuses_a_distributed_checkpoint_and_a_sequence_group(runs, training_config):
    _, out = runs
    config = training_config(**DDP)
    with pytest.raises(ValueError, match="written by 2 processes"):
        Trainer(config.replace(maximumSteps=6), out / "ddp", device="cpu", progress=False).fit(resume=True)
    with pytest.raises(ValueError, match="sequenceParallelSize 2 needs a multiple of 2 processes"):
        Trainer(config.replace(sequenceParallelSize=2), out / "other", device="cpu", progress=False)
