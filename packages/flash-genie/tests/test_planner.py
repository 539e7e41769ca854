"""The memory planner: predictions against measured peaks, the auto policy, ``plan``."""

from __future__ import annotations

import pytest
import torch

from flash_genie import Config, Denoiser
from flash_genie.cli import main
from flash_genie.diffusion import make_schedule, training_loss
from flash_genie.memtrack import TensorMemoryTracker
from flash_genie.model.options import MemoryOptions
from flash_genie.planner import checkpoint_policy, estimate, format_bytes, plan

# Small, but every part present (triangle attention too) and no two widths equal.
SMALL = """\
singleFeatureDimension 32
pairFeatureDimension 32
positionalEmbeddingDimension 16
timestepEmbeddingDimension 16
relativePositionK 8
numPairTransformLayers 2
includeTriangularAttention True
triangularMultiplicativeHiddenDimension 24
triangularAttentionHiddenDimension 8
triangularAttentionNumHeads 2
pairTransitionN 2
numStructureLayers 2
ipaHiddenDimension 8
ipaNumHeads 4
ipaNumQkPoints 2
ipaNumVPoints 3
numTimesteps 100
"""
CONFIGURATIONS = {
    "everything off": MemoryOptions(pair_stack_backend="reference"),
    "torch backend": MemoryOptions(pair_stack_backend="torch"),
    "chunked": MemoryOptions(pair_stack_backend="torch", ipa_chunk_size=8, pair_transition_chunk_size=8, inplace=True),
    "long sequence": MemoryOptions.long_sequence(checkpointing="all", ipa_chunk_size=8, pair_transition_chunk_size=8),
}


def _measured_peak(options, batch, length, autocast=False) -> tuple[int, Denoiser]:
    torch.manual_seed(0)
    model = Denoiser.from_config(Config.from_text(SMALL)).set_memory_options(options).train()
    x0, mask = torch.randn(batch, length, 3) * 10, torch.ones(batch, length)
    schedule = make_schedule(100, "cosine")
    with TensorMemoryTracker() as tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = training_loss(model, x0, mask, schedule, timesteps=torch.full((batch,), 5),
                                 noise=torch.randn(batch, length, 3))
        loss.backward()
    return tracker.peak, model


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_prediction_within_15_percent_of_measured(name):
    options = CONFIGURATIONS[name]
    measured, model = _measured_peak(options, 2, 48)
    parameters = sum(p.numel() for p in model.parameters())
    predicted = estimate(model.dims, options, 2, 48, parameters=parameters).activations
    print(f"{name}: measured {format_bytes(measured)}, predicted {format_bytes(predicted)} "
          f"({100 * (predicted / measured - 1):+.1f}%)")
    assert abs(predicted / measured - 1) <= 0.15


def test_bfloat16_prediction_within_15_percent_of_measured():
    options = CONFIGURATIONS["chunked"]
    measured, model = _measured_peak(options, 1, 64, autocast=True)
    predicted = estimate(model.dims, options, 1, 64, dtype=torch.bfloat16,
                         parameters=sum(p.numel() for p in model.parameters())).activations
    print(f"bf16: measured {format_bytes(measured)}, predicted {format_bytes(predicted)}")
    assert abs(predicted / measured - 1) <= 0.15


def _genie():
    with torch.device("meta"):
        model = Denoiser.from_config(Config())
    return model.dims, sum(p.numel() for p in model.parameters())


def test_auto_policy_checkpoints_more_as_memory_shrinks_or_chains_grow():
    dims, parameters = _genie()
    options = MemoryOptions.long_sequence()

    def policy(budget, length):
        return checkpoint_policy(dims, MemoryOptions.long_sequence(memory_budget=budget), 1, length,
                                 parameters=parameters)

    assert policy(2**50, 256) == (0, 0)
    assert policy(1, 256) == (5, 5)
    counts = [policy(budget * 2**30, 1024)[0] for budget in (40, 20, 12, 10, 8)]
    print("pair layers checkpointed at L=1024 for 40..8 GiB:", counts)
    assert counts == sorted(counts) and counts[0] < counts[-1]
    by_length = [policy(16 * 2**30, length)[0] for length in (512, 1024, 1536)]
    assert by_length == sorted(by_length) and by_length[0] < by_length[-1]
    # What the policy picks fits; one layer fewer does not.
    k, _ = policy(10 * 2**30, 1024)
    fits = estimate(dims, options, 1, 1024, checkpoint=(k, 0), parameters=parameters, include_optimizer=True)
    tight = estimate(dims, options, 1, 1024, checkpoint=(k - 1, 0), parameters=parameters, include_optimizer=True)
    assert fits.peak <= 10 * 2**30 < tight.peak


def test_plan_proposes_the_first_configuration_that_fits():
    dims, parameters = _genie()
    candidates, chosen = plan(dims, parameters, 1024, 1, 10 * 2**30, precision="bf16")
    assert candidates[0].name.startswith("Genie") and candidates[0].precision == "fp32"
    assert chosen is not None and chosen.fits and chosen.cost is not None
    earlier = candidates[: candidates.index(chosen)]
    assert all(not c.fits for c in earlier if c.cost is not None)
    peaks = [c.estimate.peak for c in candidates]
    assert peaks == sorted(peaks, reverse=True)
    keys = chosen.config_keys()
    config = Config().replace(**keys)  # the proposal is a valid configuration
    assert config["precision"] == "bf16" and config["memoryBudget"] == 10 * 2**30
    assert config["activationCheckpointing"] == "auto" and chosen.estimate.checkpoint[0] > 0
    assert plan(dims, parameters, 8192, 1, 2**30)[1] is None


def test_plan_command(capsys):
    assert main(["plan", "--length", "2048", "--batch", "1", "--memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "Genie: everything off, fp32" in out and "proposed:" in out and "pairTransitionChunkSize" in out
    assert main(["plan", "--length", "8192", "--memory", "8GiB"]) == 1
    assert "nothing fits" in capsys.readouterr().out


@pytest.mark.parametrize("keys", ["zFactorRank 2", "useSparseKNN True", "useAxialAttention True"])
def test_plan_command_refuses_what_it_does_not_model(keys, tmp_path, capsys):
    path = tmp_path / "approx.config"
    path.write_text(f"name approx\n{keys}\n")
    assert main(["plan", "--length", "4096", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert "not this approximate mode" in captured.err and "proposed" not in captured.out
    # Layer sharing is planned (it changes the weights only, which the parameter count carries).
    path.write_text("name shared\nuseModelCompression True\n")
    assert main(["plan", "--length", "1024", "--config", str(path)]) == 0
    assert "proposed:" in capsys.readouterr().out
