"""What the evaluations of one process share in memory: a sweep over a run's checkpoints
(`fastfair.select_checkpoint`) evaluates each against the same base model with the same judges, so it loads the
base model, the classifiers, the face detector, CLIP and DINOv2 once, and measures the shared base images once
(labels, embeddings, FID features), instead of once per checkpoint.

Each held thing is kept with the settings it was made from and made anew (the old one dropped first, to free
its memory) when an evaluation asks for it with other settings; settings are compared with ``==`` (a function
or model object by identity; model files by path and fingerprint, `fastfair.evaluation.cache.weight_fingerprint`).
So sharing changes no result, only the time and disk reads spent. A thing that is part of another's settings
(the classifiers in the scorer's) stays in memory until that other is made anew too; a sweep asks with one set
of settings throughout, so nothing is made twice there.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple, TypeVar

T = TypeVar("T")


class SharedLoads:
    """{kind: (settings, thing)}: one thing of each kind held at a time (a sweep asks for the same ones)."""

    def __init__(self):
        self._held: Dict[str, Tuple[Any, Any]] = {}

    def get(self, kind: str, settings, make: Callable[[], T]) -> T:
        """The held `kind` if it was made with these settings, else ``make()`` (held from now on)."""
        if kind in self._held and _same(self._held[kind][0], settings):
            return self._held[kind][1]
        self._held.pop(kind, None)  # before make(): the old and the new (e.g. two base models) never both held
        thing = make()
        self._held[kind] = (settings, thing)
        return thing


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # e.g. settings holding arrays: an ambiguous truth value
        return False
