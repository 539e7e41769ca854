"""The model memory benchmark end to end on a small architecture (a few seconds)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "model_memory.py"
# Genie's layout at a tenth of its widths.
SMALL = """\
singleFeatureDimension 16
pairFeatureDimension 16
positionalEmbeddingDimension 8
timestepEmbeddingDimension 8
triangularMultiplicativeHiddenDimension 16
numPairTransformLayers 2
numStructureLayers 1
"""


def _load():
    spec = importlib.util.spec_from_file_location("model_memory", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_model_memory_benchmark(tmp_path):
    bench = _load()
    config = tmp_path / "small.config"
    config.write_text(SMALL)
    status = bench.main(["--lengths", "40", "--all-configs-at", "--config", str(config), "--out", str(tmp_path),
                         "--name", "smoke"])
    assert status == 0
    doc = json.loads((tmp_path / "smoke.json").read_text())
    assert doc["schema"] == "flash-genie-model-memory/1"
    rows = {r["configuration"]: r for r in doc["results"]}
    assert set(rows) == {bench.OFF, bench.LONG}
    for row in rows.values():
        assert row["status"] == "ok" and row["peak_rss_mib"] > 0 and row["peak_tensor_mib"] > 0
        assert abs(row["prediction_error_tensor"]) < 0.25
        assert len(row["source"]["hash"]) == 40 and isinstance(row["source"]["changed"], list)
    assert 0 < doc["summary"]["40"]["ratio"] < 1
    text = (tmp_path / "smoke.md").read_text()
    assert "| all off | 40 |" in text and "Long-sequence configuration against everything off" in text
    # --report writes the same markdown again from the result file, measuring nothing
    (tmp_path / "smoke.md").unlink()
    assert bench.main(["--report", str(tmp_path / "smoke.json"), "--config", str(config)]) == 0
    assert (tmp_path / "smoke.md").read_text() == text


def test_source_trees_tell_edited_trees_apart():
    bench = _load()
    head = bench.source()["hash"]
    rows = [{"source": {"hash": head, "changed": []}}, {"source": {"hash": head, "changed": []}},
            {"source": {"hash": head, "changed": ["packages/flash-genie/src/flash_genie/model/ipa.py"]}}, {}]
    trees, commits = bench.source_trees(rows)
    assert commits == [head]
    assert [t["changed"] for t in trees] == [[], ["packages/flash-genie/src/flash_genie/model/ipa.py"]]
