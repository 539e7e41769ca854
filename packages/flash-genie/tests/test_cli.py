"""The flash-genie command line, end to end on tiny configurations."""

from __future__ import annotations

import pytest
import torch

from flash_genie import Config, Denoiser, save_checkpoint
from flash_genie.cli import QUICKSTART, main
from flash_genie.data import Dataset, builtin_dataset, write_ca_pdb

# The shared training config (conftest.TINY_TRAINING) with shorter runs and a 20-step schedule,
# so that sampling stays quick.
CLI = {"batchSize": 2, "maximumSteps": 3, "checkpointEverySteps": 1, "numTimesteps": 20}


@pytest.fixture
def config_file(tmp_path, training_config):
    path = tmp_path / "tiny.config"
    path.write_text(training_config(**CLI).to_text(full=False))
    return path


def test_quickstart_preset_is_a_valid_config():
    config = Config.from_text(QUICKSTART)
    assert config["dataset"] == "builtin" and config["maximumSteps"] > 0


def test_train_resume_sample_evaluate(tmp_path, config_file, training_config, capsys):
    run = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(run), "--device", "cpu", "--no-progress"]) == 0
    final = run / "checkpoints" / "final.pt"
    assert final.is_file() and (run / "metrics.jsonl").is_file() and (run / "loss.png").is_file()
    # a second train into the same folder refuses; --resume with more steps continues
    assert main(["train", str(config_file), "--out", str(run), "--device", "cpu", "--no-progress"]) == 2
    assert "pass resume=True" in capsys.readouterr().err
    assert main(["train", str(config_file), "--out", str(run), "--device", "cpu", "--no-progress",
                 "--resume", "--max-steps", "4"]) == 0  # a longer run continues
    assert torch.load(final, weights_only=True)["step"] == 4
    config_file.write_text(training_config(**{**CLI, "batchSize": 3}).to_text(full=False))
    assert main(["train", str(config_file), "--out", str(run), "--device", "cpu", "--no-progress",
                 "--resume", "--max-steps", "5"]) == 2  # another config: refused
    assert "different configuration" in capsys.readouterr().err
    samples = tmp_path / "samples"
    assert main(["sample", str(final), "--lengths", "20", "24", "--num", "2", "--out", str(samples),
                 "--no-progress", "--seed", "3"]) == 0
    pdbs = sorted(p.name for p in (samples / "pdbs").iterdir())
    assert pdbs == ["20_0.pdb", "20_1.pdb", "24_0.pdb", "24_1.pdb"]
    assert len(list((samples / "coords").iterdir())) == 4
    assert (samples / "evaluation" / "metrics.csv").is_file()
    assert main(["evaluate", str(samples), "--overwrite", "--mpnn-sequences", "0", "--reference-per-bin", "2"]) == 0


def test_sample_rejects_lengths_beyond_the_model(tmp_path, config_file, capsys):
    run = tmp_path / "run"
    main(["train", str(config_file), "--out", str(run), "--device", "cpu", "--no-progress", "--max-steps", "1"])
    assert main(["sample", str(run / "checkpoints" / "final.pt"), "--lengths", "25", "--out",
                 str(tmp_path / "s"), "--no-progress"]) == 2
    assert "length 25 is outside" in capsys.readouterr().err


def test_bad_inputs_give_one_line_errors(tmp_path, tiny_config, capsys):
    bad = tmp_path / "bad.config"
    bad.write_text("maximumNumResidues 64\npairFeatureDimenson 32\n")
    assert main(["train", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "pairFeatureDimenson" in err and "pairFeatureDimension" in err
    assert main(["sample", str(tmp_path / "missing.pt"), "--lengths", "10", "--out", str(tmp_path / "s")]) == 2
    assert "does not exist" in capsys.readouterr().err
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, Denoiser.from_config(tiny_config), tiny_config)
    assert main(["sample", str(checkpoint), "--config", "missing", "--lengths", "10", "--out",
                 str(tmp_path / "s1")]) == 2
    assert capsys.readouterr().err == "flash-genie sample: error: config file 'missing' does not exist " \
        "(and it is not 'key value' configuration text)\n"
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert main(["sample", str(corrupt), "--lengths", "10", "--out", str(tmp_path / "s2")]) == 2
    assert capsys.readouterr().err.startswith("flash-genie sample: error:")
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2


def test_data_build_from_pdb_files(tmp_path, capsys):
    src = tmp_path / "pdbs"
    src.mkdir()
    ds = builtin_dataset()
    for i in range(3):
        coords, name, seq = ds[i]
        write_ca_pdb(src / f"{name}.pdb", coords, seq)
    (src / "broken.pdb").write_text("ATOM      1  CA  ALA A   1      garbage\n")
    out = tmp_path / "dataset"
    assert main(["data", "build", str(src), "--out", str(out), "--min-length", "40"]) == 0
    report = capsys.readouterr().out
    assert "broken.pdb" in report
    built = Dataset.open(out)
    assert len(built) == 3
    assert torch.allclose(torch.as_tensor(built[0][0]), torch.as_tensor(ds[0][0]), atol=1e-3)
    # nothing is overwritten without --overwrite
    assert main(["data", "build", str(src), "--out", str(out)]) == 2
    assert main(["data", "build", str(tmp_path / "empty_missing"), "--out", str(tmp_path / "d2")]) == 2


def test_designability_hook_says_what_is_missing(tmp_path, capsys):
    folder = tmp_path / "s"
    folder.mkdir()
    write_ca_pdb(folder / "a.pdb", builtin_dataset()[0][0])
    assert main(["evaluate", str(folder), "--designability", "--proteinmpnn-dir", str(tmp_path)]) == 2
    assert "designability needs ProteinMPNN and ESMFold" in capsys.readouterr().err
