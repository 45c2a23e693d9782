"""The index kinds' scorers: the workers' side of the registry in ``latentsieve.index.kinds``
(one module here per kind there)."""

from __future__ import annotations

from latentsieve.workers.kinds import flat, ivf
from latentsieve.workers.kinds.base import Scorer

SCORERS: dict[str, Scorer] = {scorer.name: scorer for scorer in (flat.SCORER, ivf.SCORER)}


def scorer_of(kind: str) -> Scorer:
    """The scorer of index kind ``kind`` (a registered one: the store opens no other)."""
    return SCORERS[kind]


__all__ = ["SCORERS", "Scorer", "scorer_of"]
