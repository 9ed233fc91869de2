"""fastfair.recompute: recomputing the decoder's and judges' activations gives the plain backward's gradients
while keeping fewer bytes (counted exactly), and loss.recompute_judges leaves a trainer iteration unchanged."""
import pytest
import torch
from torch import nn

from fastfair.config import load_config
from fastfair.memory_budget import saved_tensor_bytes
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


def test_trainer_iteration_is_the_same_with_and_without_recompute(tmp_path, world):
    results = {}
    for recompute in (False, True):
        cfg = load_config(write_config(tmp_path / str(recompute), world, "text_lora", face_loss=True),
                          [f"loss.recompute_judges={str(recompute).lower()}"])
        trainer = Trainer(cfg)
        assert isinstance(trainer.judges.semantics.encoders["clip"], Recomputed) == recompute
        assert trainer.vae.decoder.gradient_checkpointing == recompute
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
    semantics, judges = recompute_judges(vae, SemanticsLoss({"a": Judge()}),
                                         {"gender": shared, "age": shared, "face": None})
    assert vae.decoder.gradient_checkpointing
    assert isinstance(semantics.encoders["a"], Recomputed)
    assert judges["gender"] is judges["age"] and judges["gender"].module is shared
    assert judges["face"] is None
