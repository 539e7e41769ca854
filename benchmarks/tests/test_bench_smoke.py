"""The benchmark suite runs end to end at tiny sizes, so that its code cannot rot.

One CLI run (N=8, float32, CPU, timing cut to one call) into a temporary folder,
then checks on what it wrote: the JSON against ``result.schema.json``, the
markdown, the plots (where matplotlib is installed), and the README section.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the genie_bench package

from genie_bench import cases, readme, schema
from genie_bench.__main__ import main

STEM = "smoke"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--device", "cpu", "--quick", "--n", "8", "--dtypes", "float32", "--out", str(out),
            "--name", STEM, "--warmup-s", "0", "--rep-s", "0", "--min-runs", "2"]
    assert main(argv) == 0
    return out, json.loads((out / f"{STEM}.json").read_text())


def test_json_matches_schema(run):
    _, doc = run
    assert schema.problems(doc) == []


def test_jsonschema_agrees(run):
    import jsonschema  # a test dependency (noxfile.py): CI must not skip this

    jsonschema.validate(run[1], schema.load())
    with pytest.raises(jsonschema.ValidationError):  # and it does check: a row without its method
        broken = json.loads(json.dumps(run[1]))
        del broken["results"][0]["method"]
        jsonschema.validate(broken, schema.load())


def test_schema_catches_a_broken_row(run):
    doc = json.loads(json.dumps(run[1]))
    doc["results"][0]["status"] = "fine"
    del doc["results"][0]["method"]
    found = schema.problems(doc)
    assert any("status" in p for p in found) and any("missing 'method'" in p for p in found)


def test_every_case_ran_and_matches_the_reference(run):
    _, doc = run
    rows = doc["results"]
    for op in cases.OPS:
        for pass_ in cases.PASSES:
            for method in ("torch", "reference"):
                (row,) = [r for r in rows if (r["op"], r["pass"], r["method"]) == (op, pass_, method)]
                assert row["status"] == "ok", row
                assert row["time_ms"]["median"] > 0 and row["time_ms"]["runs"] >= 2
                assert row["flop"] == cases.OPS[op].flop(8, pass_)
                errors = row["errors"]["tensors"]
                expected = 1 + (len(cases.OPS[op].diff) if pass_ == "fwd+bwd" else 0)
                assert len(errors) == expected
                worst = max(e["rel_fro"] for e in errors.values())
                print(op, pass_, method, f"worst rel err {worst:.1e}")
                assert worst < 1e-5


def test_missing_methods_are_recorded_with_a_reason(run):
    methods = run[1]["methods"]
    for name in ("tk", "triton", "cuequivariance", "trifast"):  # no GPU here, so none of them can run
        assert methods[name]["status"] == "unavailable" and methods[name]["reason"], methods[name]
    assert not any(r["method"] in ("cuequivariance", "trifast") for r in run[1]["results"])


def test_markdown_written(run):
    out, _ = run
    text = (out / f"{STEM}.md").read_text()
    for op in cases.OPS:
        assert f"## {op}:" in text
    assert "| 8 | float32 | fwd+bwd | torch |" in text


def test_plots_written(run):
    pytest.importorskip("matplotlib")
    out, _ = run
    pngs = sorted(out.glob(f"{STEM}_*.png"))
    assert len(pngs) == len(cases.OPS)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_readme_section_is_generated_and_stable(run, tmp_path):
    out, _ = run
    page = tmp_path / "README.md"
    page.write_text("# project\n\ntext\n")
    args = ["--readme", str(page), "--results", str(out)]
    assert readme.main(args) == 0
    text = page.read_text()
    assert text.startswith("# project\n\ntext\n\n## Performance\n\n" + readme.START)
    assert "| tri_mul_in | float32 | fwd+bwd | 8 |" in text
    assert readme.main([*args, "--check"]) == 0  # regenerating changes nothing
    assert readme.main(args) == 0 and page.read_text() == text


def test_flop_counts():
    att, mul = cases.OPS["tri_att_start"], cases.OPS["tri_mul_out"]
    assert att.flop(256, "fwd") == 4 * 256**3 * 4 * 32
    assert att.flop(256, "fwd+bwd") == 3.5 * att.flop(256, "fwd")
    assert mul.flop(256, "fwd") == 2 * 256**3 * 128 + 2 * 256**2 * 128 * (5 * 128 + 128)
    assert mul.flop(256, "fwd+bwd") == 3 * mul.flop(256, "fwd")
