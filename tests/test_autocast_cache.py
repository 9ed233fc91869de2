"""fastfair.autocast_cache: autocast's weight-cast cache never cuts the trainable weights out of the engine's
graphs, on a torch whose cache serves no-grad casts (forced here) as on one that does not."""
import pytest
import torch

from fastfair import autocast_cache
from fastfair.dft import sample
from fastfair.testing import tiny_scheduler, tiny_unet

SCHED = tiny_scheduler()


def test_probe_matches_what_a_grad_mode_call_gets():
    layer = torch.nn.Linear(3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            layer(torch.ones(2, 3))
        served_stale = not layer(torch.ones(2, 3)).requires_grad
    assert autocast_cache.caches_no_grad_casts() == served_stale


def test_probe_made_under_inference_mode_answers_as_outside_it():
    autocast_cache.caches_no_grad_casts.cache_clear()
    try:
        with torch.inference_mode():  # enable_grad does nothing here: the probe's output never requires grad
            inside = autocast_cache.caches_no_grad_casts()
        autocast_cache.caches_no_grad_casts.cache_clear()
        assert inside == autocast_cache.caches_no_grad_casts()
    finally:
        autocast_cache.caches_no_grad_casts.cache_clear()


def test_probe_leaves_the_global_random_stream_alone():
    """It runs once per process, inside the first U-Net call: a draw there would shift every later global draw
    of a resumed run against the uninterrupted one."""
    autocast_cache.caches_no_grad_casts.cache_clear()
    torch.manual_seed(0)
    autocast_cache.caches_no_grad_casts()
    after_probe = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after_probe, torch.rand(4))


@pytest.mark.parametrize("faulty", [False, True])
def test_no_stale_casts_turns_the_cache_off_only_where_needed(faulty, monkeypatch):
    monkeypatch.setattr(autocast_cache, "caches_no_grad_casts", lambda: faulty)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with autocast_cache.no_stale_casts():
            assert torch.is_autocast_cache_enabled() is not faulty
        assert torch.is_autocast_cache_enabled()  # restored
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        with autocast_cache.no_stale_casts():  # a cache the caller turned off stays off
            assert not torch.is_autocast_cache_enabled()
        assert not torch.is_autocast_cache_enabled()


def test_no_stale_casts_turns_the_cache_back_on_after_an_error(monkeypatch):
    """A U-Net call that raises (e.g. out of memory, caught by the caller) does not leave the region's cache off."""
    monkeypatch.setattr(autocast_cache, "caches_no_grad_casts", lambda: True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="out of memory"), autocast_cache.no_stale_casts():
            raise RuntimeError("out of memory")
        assert torch.is_autocast_cache_enabled()


@pytest.mark.parametrize("force_guard", [False, True])
@pytest.mark.parametrize("keep_graph_steps", [0, 1])
def test_weights_get_their_gradient_after_no_grad_sampling_in_the_same_region(keep_graph_steps, force_guard,
                                                                               monkeypatch):
    """One bf16 autocast region: a preview sample without grad, then a training sample whose backward also runs in
    the region. The U-Net's trainable weights get the gradient a fresh region gives (same casts, same numbers)."""
    if force_guard:
        monkeypatch.setattr(autocast_cache, "caches_no_grad_casts", lambda: True)
    unet = tiny_unet(dtype=torch.float32).requires_grad_(False)
    trainable = [p for name, p in unet.named_parameters() if "to_k" in name or "conv_in" in name]
    for p in trainable:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    z_T = torch.randn(2, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(2, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    kwargs = dict(num_steps=3, guidance_scale=3.0, keep_graph_steps=keep_graph_steps)

    def gradients(preview: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if preview:
                with torch.no_grad():
                    sample(unet, SCHED, z_T, cond, uncond, **kwargs)
            loss = sample(unet, SCHED, z_T, cond, uncond, **kwargs).square().sum()
            return torch.autograd.grad(loss, trainable, allow_unused=True)

    fresh, after_preview = gradients(False), gradients(True)
    assert all(g is not None and g.abs().sum() > 0 for g in after_preview)
    for a, b in zip(after_preview, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
