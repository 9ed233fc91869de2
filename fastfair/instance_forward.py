"""Give layers another ``forward`` for the length of a ``with`` block, and their own back after it."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, List

from torch import nn


@contextlib.contextmanager
def forwards_replaced(layers: Iterable[nn.Module],
                      make_forward: Callable[[nn.Module], Callable]) -> Iterator[List[nn.Module]]:
    """Within, each of ``layers`` runs ``make_forward(layer)`` as its forward (an instance attribute, which
    ``nn.Module.__call__`` prefers to the class's); on exit, exceptions included, each gets its own back. A layer
    that already has an instance ``forward`` (someone else's wrapper, or an enclosing block's) is left alone.
    Yields the layers replaced."""
    replaced: List[nn.Module] = []
    try:  # set inside: a make_forward that raises part way leaves none of the earlier layers replaced
        for layer in [layer for layer in layers if "forward" not in layer.__dict__]:
            layer.forward = make_forward(layer)
            replaced.append(layer)
        yield replaced
    finally:
        for layer in replaced:
            layer.__dict__.pop("forward", None)
