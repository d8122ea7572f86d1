"""Levenshtein distance, the one both CORD's tree edit distance and DocVQA's ANLS are built on."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1 << 16)  # zss asks for the same label pairs many times
def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit costs, no transpositions), as ``nltk.edit_distance``."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]
