"""`meshgen.output`: one canonical text per document, however it is produced."""

from __future__ import annotations

from pathlib import Path

import yaml

from meshgen import output
from meshgen.compile import compile_policy
from meshgen.render.document import Document

LAB = Path(__file__).resolve().parents[1] / "policies/lab.yaml"


def test_dumping_on_several_processes_gives_the_same_bytes() -> None:
    docs = compile_policy(LAB)
    sequential = output.serialize(docs, source="lab.yaml", version="t")
    assert output.serialize(docs, source="lab.yaml", version="t", processes=2) == sequential


def test_lean_dumper_matches_pyyaml_safe_dump() -> None:
    data = {"a": [1, 2.5, True, None, "yes", "1.0", "", {"nested": []}], "b": {}, "c": "x: y", "d": "multi\nline"}
    text = output.dump(Document("x.yaml", data), source="p", version="v")
    expected = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=120)
    assert text.split("\n", 1)[1] == expected
    assert yaml.safe_load(text) == data
