"""Keep autocast's weight-cast cache from cutting trainable weights out of the graph on older torch.

Inside a ``torch.autocast`` region, autocast casts each trainable fp32 weight to the low-precision dtype once and
caches the copy for the rest of the region. In older torch (2.4.1 has it, 2.11 and 2.13 do not; pytorch#112583) a
copy cast under ``no_grad`` is cached without autograd history and then served to later grad-mode ops of the same
region: the weight gets no gradient, silently. The engine makes exactly that sequence: its sampling calls run with
grad off (inside an autograd Function's forward), then kept steps and the backward's recompute build graphs,
possibly still inside the caller's region. Where this torch has the fault, ``no_stale_casts`` turns the cache off
around those calls; the price is one cast of the trainable weights per U-Net call (LoRA: a few MB).
"""
from __future__ import annotations

import contextlib
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def caches_no_grad_casts() -> bool:
    """Whether this torch's autocast serves a grad-mode op a weight copy it cast and cached under no_grad (a copy
    with no autograd history). Probed once on a 2x2 CPU Linear, in a fresh region with the cache on."""
    with torch.random.fork_rng(devices=[]):  # the probe's init must not move the caller's random stream
        layer = torch.nn.Linear(2, 2)
    x = torch.ones(1, 2)
    # out of inference mode, where enable_grad does nothing and every output would read as cut from the graph
    with torch.inference_mode(False), torch.enable_grad(), \
            torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=True):
        with torch.no_grad():
            layer(x)
        out = layer(x)
    return not out.requires_grad


@contextlib.contextmanager
def _cache_off():
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(True)


def no_stale_casts():
    """A context with autocast's cast cache off where it is on and this torch would serve stale no-grad casts
    (``caches_no_grad_casts``); else a no-op. Enter it inside any ``torch.autocast`` it should cover: entering
    an autocast region turns the cache back on."""
    if not torch.is_autocast_cache_enabled() or not caches_no_grad_casts():
        return contextlib.nullcontext()
    return _cache_off()
