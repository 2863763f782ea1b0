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


def test_one_letter_yaml11_booleans_are_quoted() -> None:
    # Envoy's YAML 1.1 parser reads a bare y or n as a boolean: a model or tenant named "n" must stay a string.
    text = output.dump(Document("x.yaml", {"exact": "n", "other": "y", "fine": "no-n"}), source="p", version="v")
    assert "exact: 'n'" in text and "other: 'y'" in text and "fine: no-n" in text
