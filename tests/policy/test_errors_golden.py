"""Invalid policies → the exact text users see: ``tests/golden/errors/<case>.yaml`` + ``<case>.txt``.

``pytest --update-golden`` rewrites the ``.txt`` files from current output and deletes those without a case.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from meshgen.errors import PolicyError
from meshgen.policy import load_policy

ROOT = Path(__file__).resolve().parents[2]
ERRORS = Path("tests/golden/errors")
CASES = sorted(p.stem for p in (ROOT / ERRORS).glob("*.yaml"))


def test_enough_cases() -> None:
    assert len(CASES) >= 18


@pytest.mark.parametrize("case", CASES)
def test_error_golden(case: str, update_golden: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # problems name the file as given: the path relative to the repository
    with pytest.raises(PolicyError) as caught:
        load_policy(ERRORS / f"{case}.yaml")
    actual = str(caught.value) + "\n"
    assert actual == "\n".join(str(p) for p in caught.value.problems) + "\n"
    expected_file = ROOT / ERRORS / f"{case}.txt"
    if update_golden:
        expected_file.write_text(actual, encoding="utf-8")
        return
    assert expected_file.exists(), f"no {expected_file.name}: run pytest --update-golden"
    assert actual == expected_file.read_text(encoding="utf-8")


def test_no_stale_expectations(update_golden: bool) -> None:
    stale = [p for p in (ROOT / ERRORS).glob("*.txt") if p.stem not in CASES]
    if update_golden:
        for path in stale:
            path.unlink()
        return
    assert not stale, f"expected output without a case (pytest --update-golden deletes it): {stale}"
