"""The result format: ``result.schema.json`` (JSON Schema 2020-12) and a checker.

The checker covers the keywords that file uses (``type``, ``const``, ``enum``,
``required``, ``properties``, ``additionalProperties``, ``items``, ``minimum``,
local ``$ref``), so CI validates result files without extra packages; where
``jsonschema`` is installed (a test dependency, see noxfile.py) the tests validate with it too.

    python -m genie_bench.schema benchmarks/results/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCHEMA_PATH = Path(__file__).with_name("result.schema.json")

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def load() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def _check(value, schema: dict, root: dict, path: str, problems: list[str]) -> None:
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        _check(value, root["$defs"][name], root, path, problems)
        return
    types = schema.get("type")
    if types is not None:
        allowed = [types] if isinstance(types, str) else types
        if not any(_TYPES[t](value) for t in allowed):
            problems.append(f"{path}: {value!r:.60} is not of type {types}")
            return
    if "const" in schema and value != schema["const"]:
        problems.append(f"{path}: {value!r:.60} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: {value!r:.60} is not one of {schema['enum']}")
    if "minimum" in schema and _TYPES["number"](value) and value < schema["minimum"]:
        problems.append(f"{path}: {value} is below {schema['minimum']}")
    if isinstance(value, dict):
        _check_object(value, schema, root, path, problems)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], root, f"{path}[{i}]", problems)


def _check_object(value: dict, schema: dict, root: dict, path: str, problems: list[str]) -> None:
    problems.extend(f"{path}: missing {key!r}" for key in schema.get("required", ()) if key not in value)
    props = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in props:
            _check(item, props[key], root, f"{path}.{key}", problems)
        elif extra is False:
            problems.append(f"{path}: unexpected key {key!r}")
        elif isinstance(extra, dict):
            _check(item, extra, root, f"{path}.{key}", problems)


def problems(doc: dict) -> list[str]:
    """Every way ``doc`` departs from the schema (empty when it conforms)."""
    root = load()
    found: list[str] = []
    _check(doc, root, root, "$", found)
    return found


def main(argv: list[str] | None = None) -> int:
    bad = 0
    for name in argv if argv is not None else sys.argv[1:]:
        found = problems(json.loads(Path(name).read_text()))
        bad += bool(found)
        print(f"{name}: " + ("ok" if not found else "\n  ".join(["invalid", *found[:20]])))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
