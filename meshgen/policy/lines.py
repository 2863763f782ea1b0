"""Where each part of a policy file sits: YAML paths → line numbers, and the keys each mapping holds.

A path is a tuple of mapping keys (str) and sequence indexes (int): ``("models", "gpt-4o", "failover", 1)``,
shown to users as ``models.gpt-4o.failover[1]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from meshgen.errors import Problem

__all__ = ["ROOT", "LineIndex", "YamlPath", "format_path"]

YamlPath = tuple[str | int, ...]
ROOT = "(root)"
"""How the document itself is shown where a YAML path is expected."""


def format_path(path: Sequence[str | int]) -> str:
    """``("models", "gpt-4o", "failover", 1)`` → ``models.gpt-4o.failover[1]``; ``()`` → ``(root)``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or ROOT


@dataclass(frozen=True)
class LineIndex:
    """Line numbers of every mapping key and sequence item of one policy file."""

    file: str
    lines: Mapping[YamlPath, int] = field(default_factory=dict)
    """1-based line of the key (mapping entries) or of the item (sequence entries)."""
    keys: Mapping[YamlPath, tuple[str, ...]] = field(default_factory=dict)
    """The keys of every mapping in the file, in file order (the root mapping under ``()``)."""

    def _find(self, path: Sequence[str | int]) -> YamlPath | None:
        """The indexed path for ``path``, accepting an int for a mapping key spelled as a number."""
        found: YamlPath = ()
        for part in path:
            candidates = (part, str(part)) if isinstance(part, int) else (part,)
            for candidate in candidates:
                if (*found, candidate) in self.lines:
                    found = (*found, candidate)
                    break
            else:
                return None
        return found

    def resolve(self, path: Sequence[str | int]) -> YamlPath:
        """``path`` with mapping keys spelled as in the file (pydantic reports a key ``1`` as an int)."""
        resolved: list[str | int] = []
        for part in path:
            found = self._find((*resolved, part))
            resolved.append(found[-1] if found is not None else part)
        return tuple(resolved)

    def line(self, path: Sequence[str | int]) -> int:
        """Line of ``path``, or of its deepest ancestor in the file; 1 for the document itself."""
        for depth in range(len(path), 0, -1):
            found = self._find(path[:depth])
            if found is not None:
                return self.lines[found]
        return 1

    def has(self, path: Sequence[str | int]) -> bool:
        return self._find(path) is not None

    def is_mapping(self, path: Sequence[str | int]) -> bool:
        """Whether the file holds a mapping at ``path``."""
        found = self._find(path) if path else ()
        return found is not None and found in self.keys

    def children(self, path: Sequence[str | int]) -> tuple[str, ...]:
        """Keys of the mapping at ``path`` in file order; empty if there is no mapping there."""
        found = self._find(path) if path else ()
        return self.keys.get(found, ()) if found is not None else ()

    def as_dict(self) -> dict[str, int]:
        """``{"models.gpt-4o.failover[1]": 14, …}``."""
        return {format_path(path): line for path, line in self.lines.items()}

    def problem(
        self,
        path: Sequence[str | int],
        message: str,
        *,
        code: str,
        hint: str | None = None,
        line: int | None = None,
    ) -> Problem:
        """A Problem at ``path`` (its line unless ``line`` is given)."""
        return Problem(
            file=self.file,
            line=self.line(path) if line is None else line,
            yaml_path=format_path(path),
            message=message,
            hint=hint,
            code=code,
        )
