"""Writing a benchmark's result files: ``<stem>.json`` and ``<stem>.md`` side by side."""

from __future__ import annotations

import datetime
import json
from pathlib import Path


def stem(name: str, quick: bool = False) -> str:
    """``<name>_<date>[_quick]``: the file name every result of one run shares."""
    return f"{name}_{datetime.date.today().isoformat()}{'_quick' if quick else ''}"


def write(doc: dict, markdown: str, out: Path, name: str) -> Path:
    """Write ``doc`` as JSON and ``markdown`` next to it under ``out``; print both paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out / name}.json and .md")
    return out / f"{name}.json"
