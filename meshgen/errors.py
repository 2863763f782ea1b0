"""Every error meshgen raises on purpose, and the exit code the CLI maps it to.

```
MeshgenError                 base class; catch this to handle anything meshgen raises on purpose
├── PolicyError              the policy file is wrong: the user fixes it            exit 1
│                            .problems: tuple[Problem, ...], sorted by line, one per mistake
├── OutputDriftError         `meshgen build --check`: generated/ differs from       exit 3
│                            what the policy builds; .paths lists the files
└── RenderError              a renderer produced something invalid: our bug         exit 70 (EX_SOFTWARE)
```

A `Problem` is one mistake in the policy file, printed the one way users see it:

    policies/lab.yaml:14: models.gpt-4o.failover[1]: unknown model 'claude-sonet'
        (did you mean 'claude-sonnet'?) [MG101]      ← one line when printed

Its `code` is stable across releases so that docs and CI logs can link to it. The table of codes lives in the
docstring of `meshgen.policy.checks`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

__all__ = ["MeshgenError", "OutputDriftError", "PolicyError", "Problem", "RenderError"]


@dataclass(frozen=True)
class Problem:
    """One mistake in a policy file: where it is, what is wrong, how to fix it."""

    file: str
    """The policy file's path as the user gave it."""
    line: int
    """1-based line of the YAML node the problem is about (for a missing field: its parent)."""
    yaml_path: str
    """``models.gpt-4o.failover[1]``; ``(root)`` for the document itself."""
    message: str
    hint: str | None
    code: str
    """``MGnnn``, see the table in ``meshgen.policy.checks``."""

    def __str__(self) -> str:
        hint = f" ({self.hint})" if self.hint else ""
        return f"{self.file}:{self.line}: {self.yaml_path}: {self.message}{hint} [{self.code}]"


class MeshgenError(Exception):
    """Base class of every error meshgen raises on purpose. ``exit_code`` is what the CLI exits with."""

    exit_code: ClassVar[int] = 1


class PolicyError(MeshgenError):
    """The policy file is invalid. Holds every problem found in one run, in line order."""

    exit_code: ClassVar[int] = 1

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        if not self.problems:
            raise ValueError("PolicyError needs at least one Problem")
        super().__init__("\n".join(str(p) for p in self.problems))


class OutputDriftError(MeshgenError):
    """``meshgen build --check``: the files on disk differ from what the policy builds."""

    exit_code: ClassVar[int] = 3

    def __init__(self, paths: Iterable[str | os.PathLike[str]], *, root: str | None = None) -> None:
        self.paths: tuple[str, ...] = tuple(sorted(os.fspath(p) for p in paths))
        self.root = root
        where = f"{root}/" if root else "generated output"
        listing = "".join(f"\n  {p}" for p in self.paths)
        super().__init__(
            f"{where} is out of date in {len(self.paths)} file(s); run `meshgen build` and commit:{listing}"
        )


class RenderError(MeshgenError):
    """A renderer could not render the IR or produced something invalid: a bug in meshgen, not the policy."""

    exit_code: ClassVar[int] = 70

    def __init__(self, message: str, *, target: str | None = None, path: str | None = None) -> None:
        self.target = target
        self.path = path
        where = ": ".join(part for part in (target, path) if part)
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}{message} (this is a bug in meshgen, please report it)")
