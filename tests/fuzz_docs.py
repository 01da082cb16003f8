"""Fuzzing helpers shared by the bad-input tests: mutate a valid document at chosen paths."""

from __future__ import annotations

import copy
from typing import Any, Iterable


def mutated(doc: Any, mutations: Iterable[tuple[tuple, Any]]) -> Any:
    """A deep copy of ``doc`` with each ``(path, value)`` set; paths that no longer exist after an earlier
    mutation (or index past a list's end) are skipped."""
    out = copy.deepcopy(doc)
    for path, value in mutations:
        node = out
        try:
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    return out
