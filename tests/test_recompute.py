"""fastfair.recompute: recomputing the decoder's and judges' activations gives the plain backward's gradients
while keeping fewer bytes (counted exactly), in slices of rows one slice's activations at a time, and
loss.recompute_judges / loss.judge_images leave a trainer iteration unchanged."""
import copy

import pytest
import torch
from torch import nn

from fastfair.config import load_config
from fastfair.memory_budget import saved_tensor_bytes
from fastfair.models import LatentDecoder
from fastfair.recompute import Recomputed, recompute_decoder, recompute_semantics
from fastfair.trainer import Trainer
from test_trainer_world import world, write_config  # noqa: F401 (world: a fixture)


class Judge(nn.Module):
    input_size = 12

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)


def _frozen(module):
    return module.double().eval().requires_grad_(False)


def test_recomputed_module_same_gradient_fewer_saved_bytes():
    torch.manual_seed(0)
    judge = _frozen(Judge())
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64, requires_grad=True)
    plain = torch.autograd.grad(judge(x).square().sum(), x)[0]
    wrapped = Recomputed(judge)
    recomputed = torch.autograd.grad(wrapped(x).square().sum(), x)[0]
    torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)
    params = list(judge.parameters())
    kept_plain = saved_tensor_bytes(lambda: judge(x), params)
    kept_recomputed = saved_tensor_bytes(lambda: wrapped(x), params)
    assert kept_recomputed < kept_plain / 3  # the input (and output) instead of every activation
    assert wrapped.input_size == 12  # the wrapped module's attributes show through
    with torch.no_grad():
        assert wrapped(x).grad_fn is None
    with pytest.raises(ValueError, match="already wrapped"):
        Recomputed(wrapped)


def test_recomputed_decoder_same_gradient_fewer_saved_bytes():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = _frozen(AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                sample_size=16))
    z = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    decode = lambda: vae.decode(z).sample  # noqa: E731
    plain = torch.autograd.grad(decode().sin().sum(), z)[0]
    kept_plain = saved_tensor_bytes(decode, list(vae.parameters()))
    recompute_decoder(vae)
    recomputed = torch.autograd.grad(decode().sin().sum(), z)[0]
    torch.testing.assert_close(recomputed, plain, rtol=1e-12, atol=1e-12)
    assert saved_tensor_bytes(decode, list(vae.parameters())) < kept_plain / 2
    with pytest.raises(ValueError, match="loss.recompute_judges"):
        recompute_decoder(nn.Linear(2, 2))


def test_recompute_semantics_wraps_each_encoder_once():
    from fastfair.losses import SemanticsLoss

    torch.manual_seed(0)
    semantics = SemanticsLoss({"a": _frozen(Judge()), "b": _frozen(Judge())})
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, requires_grad=True)
    originals = semantics.embed_originals(torch.randn(2, 3, 12, 12, dtype=torch.float64))
    plain = torch.autograd.grad(sum(semantics(x, originals).values()).sum(), x)[0]
    assert recompute_semantics(semantics) is semantics
    assert all(isinstance(e, Recomputed) for e in semantics.encoders.values())
    recompute_semantics(semantics)  # idempotent: no wrapper around a wrapper
    assert all(not isinstance(e.module, Recomputed) for e in semantics.encoders.values())
    recomputed = torch.autograd.grad(sum(semantics(x, originals).values()).sum(), x)[0]
    torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)
    other = _frozen(Judge())
    assert isinstance(recompute_semantics(other), Recomputed)  # no `encoders`: wrapped whole
    # and unsliced under judge_images: its forward takes the originals' embeddings beside the images
    whole = recompute_semantics(_frozen(Judge()), rows=2)
    assert whole.rows is None and torch.equal(whole(x), whole.module(x))


@pytest.mark.parametrize("judge_images", [None, 3])
def test_trainer_iteration_is_the_same_with_and_without_recompute(tmp_path, world, judge_images):
    """Recomputed judges (and with judge_images=3, 4 images judged in slices of 3 and 1) give the iteration of
    judges that keep everything."""
    results = {}
    for recompute in (False, True):
        sliced = judge_images if recompute else None
        cfg = load_config(write_config(tmp_path / str(recompute), world, "text_lora", face_loss=True),
                          [f"loss.recompute_judges={str(recompute).lower()}",
                           f"loss.judge_images={'null' if sliced is None else sliced}"])
        trainer = Trainer(cfg)
        assert isinstance(trainer.judges.semantics.encoders["clip"], Recomputed) == recompute
        assert trainer.vae.decoder.gradient_checkpointing == recompute  # block-wise, inside each slice too
        assert isinstance(trainer.decoder, Recomputed) == (sliced is not None)
        if sliced is not None:
            assert trainer.decoder.rows == trainer.judges.semantics.encoders["clip"].rows == 3
            assert trainer.judges.face_embedder.rows == 3
        parts = trainer.iteration(0)
        # the gradient the step used (left in .grad; Adam's first step would hide a scale error in the weights)
        results[recompute] = (parts, {n: p.grad.clone() for n, p in trainer.model.trainable.items()})
    (parts_off, grads_off), (parts_on, grads_on) = results[False], results[True]
    assert parts_on["loss"] == pytest.approx(parts_off["loss"], rel=1e-6)
    assert parts_on["face"] > 0
    assert any(g.abs().max() > 0 for g in grads_off.values())
    for name, g in grads_off.items():
        torch.testing.assert_close(grads_on[name], g, rtol=1e-4, atol=1e-7)


def test_recompute_judges_shares_one_wrapper_per_module():
    from diffusers import AutoencoderKL

    from fastfair.losses import SemanticsLoss
    from fastfair.recompute import recompute_judges

    vae = AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=4)
    shared = Judge()
    decoder = LatentDecoder(vae)
    same, semantics, judges = recompute_judges(decoder, SemanticsLoss({"a": Judge()}),
                                               {"gender": shared, "age": shared, "face": None})
    assert same is decoder and vae.decoder.gradient_checkpointing  # block-wise, in place
    assert isinstance(semantics.encoders["a"], Recomputed) and semantics.encoders["a"].rows is None
    assert judges["gender"] is judges["age"] and judges["gender"].module is shared
    assert judges["face"] is None
    # in slices: the decoder checkpointed per slice, and block-wise inside each slice's rebuild
    vae = AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=4)
    sliced, semantics, judges = recompute_judges(LatentDecoder(vae), SemanticsLoss({"a": Judge()}),
                                                 {"gender": shared, "age": shared}, rows=2)
    assert isinstance(sliced, Recomputed) and sliced.rows == 2 and vae.decoder.gradient_checkpointing
    assert semantics.encoders["a"].rows == judges["gender"].rows == 2 and judges["gender"] is judges["age"]
    # a decoder already sliced is not wrapped again (Recomputed refuses a wrapper around a wrapper)
    again, semantics_again, _ = recompute_judges(sliced, semantics, {}, rows=2)
    assert again is sliced and semantics_again is semantics


class Probe(torch.autograd.Function):
    """Identity that logs ('forward', rows) and ('backward', rows) to EVENTS: the order autograd runs them in."""

    @staticmethod
    def forward(ctx, x):
        EVENTS.append(("forward", x.shape[0]))
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        EVENTS.append(("backward", grad.shape[0]))
        return grad


EVENTS: list = []


class ProbedJudge(Judge):
    def forward(self, x):
        return self.net(Probe.apply(x))


def test_recomputed_in_slices_rebuilds_one_slice_at_a_time():
    """rows=2 over 5 images: three checkpoints; the backward rebuilds a slice only after the later slice's
    backward is done (so one slice's activations exist at a time), and the gradient is the plain one."""
    torch.manual_seed(0)
    judge = _frozen(ProbedJudge())
    x = torch.randn(5, 3, 12, 12, dtype=torch.float64, requires_grad=True)
    plain_out = judge(x)
    plain = torch.autograd.grad(plain_out.square().sum(), x)[0]
    wrapped = Recomputed(judge, rows=2)
    EVENTS.clear()
    out = wrapped(x)
    assert EVENTS == [("forward", 2), ("forward", 2), ("forward", 1)]
    torch.testing.assert_close(out, plain_out, rtol=1e-13, atol=1e-13)
    EVENTS.clear()
    sliced = torch.autograd.grad(out.square().sum(), x)[0]
    assert EVENTS == [("forward", 1), ("backward", 1), ("forward", 2), ("backward", 2), ("forward", 2),
                      ("backward", 2)]
    torch.testing.assert_close(sliced, plain, rtol=1e-13, atol=1e-13)
    # the whole-batch wrapper for contrast: one rebuild of all five
    EVENTS.clear()
    torch.autograd.grad(Recomputed(judge)(x).square().sum(), x)
    assert EVENTS == [("forward", 5), ("forward", 5), ("backward", 5)]
    # no graph: plain calls per slice, the same values
    EVENTS.clear()
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), plain_out.detach(), rtol=1e-13, atol=1e-13)
    assert EVENTS == [("forward", 2), ("forward", 2), ("forward", 1)]


def test_recomputed_in_slices_refuses_what_it_cannot_slice():
    judge = _frozen(Judge())
    for rows in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"rows=.*expected a positive integer or None"):
            Recomputed(judge, rows=rows)
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"slices one tensor argument \[N, \.\.\.\]"):
        Recomputed(judge, rows=2)(x, x)
    with pytest.raises(TypeError, match="slices one tensor argument"):
        Recomputed(judge, rows=2)(x=x)
    with pytest.raises(TypeError, match="slices one tensor argument"):
        Recomputed(judge, rows=2)(x, scale=2.0)

    class Pooled(nn.Module):  # mixes the rows: a slice's output has one row, not one per image
        def forward(self, x):
            return x.mean(0, keepdim=True)

    with pytest.raises(TypeError, match=r"Pooled must return a tensor with one row per input row \(2\), got "
                                        r"\(1, 3, 12, 12\)"):
        Recomputed(Pooled(), rows=2)(x)
    assert Recomputed(judge, rows=2)(x[:0]).shape[0] == 0  # no rows: the module's own answer, not a cat error


def test_a_forward_that_cannot_be_made_leaves_no_layer_replaced():
    from fastfair.instance_forward import forwards_replaced

    layers = [nn.Linear(2, 2) for _ in range(3)]

    def make(layer):
        if layer is layers[2]:
            raise RuntimeError("cannot")
        return lambda x: x * 0

    with pytest.raises(RuntimeError, match="cannot"):
        with forwards_replaced(layers, make):
            pass
    assert all("forward" not in layer.__dict__ for layer in layers)


def test_decoder_in_slices_same_gradient_and_images():
    """LatentDecoder under Recomputed(rows=1), with and without the decoder's own block-wise checkpointing inside:
    the images and dL/dz of the plain decode (float64)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = _frozen(AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                sample_size=16))
    z = torch.randn(3, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    decoder = LatentDecoder(vae, clamp=False)
    images = decoder(z)
    assert images.dtype == torch.float64 and images.shape == (3, 3, 16, 16) and images.abs().max() > 1
    assert LatentDecoder(vae)(z).abs().max() == 1  # clamped
    half = copy.deepcopy(vae).half()
    assert LatentDecoder(half)(z.detach().half()).dtype == torch.float32  # a low-precision VAE: float32 images
    plain = torch.autograd.grad(images.sin().sum(), z)[0]
    for blockwise in (False, True):  # the slice's rebuild plain, then itself checkpointed block by block (nested)
        if blockwise:
            recompute_decoder(vae)
        sliced_images = Recomputed(decoder, rows=1)(z)
        sliced = torch.autograd.grad(sliced_images.sin().sum(), z)[0]
        torch.testing.assert_close(sliced_images, images, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sliced, plain, rtol=1e-12, atol=1e-12)



def test_recomputed_without_a_graph_to_build_is_a_plain_call(monkeypatch):
    """No checkpoint (its bookkeeping and RNG stashing) where no graph is built: grad disabled, or no input that
    requires grad (a frozen judge scoring the originals with grad on)."""
    import fastfair.recompute as recompute

    calls, real = [], recompute.checkpoint
    monkeypatch.setattr(recompute, "checkpoint", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    judge = _frozen(Judge())
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, requires_grad=True)
    wrapped = Recomputed(judge)
    with torch.no_grad():
        wrapped(x)
    wrapped(x.detach())
    assert calls == []
    assert wrapped(x).grad_fn is not None and calls == [1]  # a graph to build: checkpointed
