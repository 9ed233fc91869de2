"""Face embeddings for the face realism loss and the face bank.

``FaceEmbedder`` wraps any embedding network or callable (the hook for other models) and applies
the public code's recipe: emb(x) = normalize(f(x) + f(flip(x))), flip = horizontal mirror.
``load_sfnet`` builds an SFNet whose shape it reads from the checkpoint itself.
"""
import math
import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastfair.files import load_state_dict
from fastfair.faces.sfnet import SFNet


class FaceEmbedder(nn.Module):
    """aligned faces [N, 3, S, S] in [-1, 1] -> unit embeddings [N, D] (float32).

    network: an nn.Module or any callable [N, 3, S, S] -> [N, D]; flip: add the mirrored image's features.
    """

    def __init__(self, network: Callable, flip: bool = True, input_size: int = 112):
        super().__init__()
        if not callable(network):
            raise TypeError(f"FaceEmbedder needs a module or callable, got {type(network).__name__}")
        self.network, self.flip, self.input_size = network, flip, input_size

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        if faces.dim() != 4 or faces.shape[1] != 3 or faces.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"faces must be aligned crops [N, 3, {self.input_size}, {self.input_size}], "
                             f"got {tuple(faces.shape)}")
        features = self.network(faces)
        if self.flip:
            features = features + self.network(torch.flip(faces, dims=[3]))
        return F.normalize(features.float(), dim=-1)


def as_face_embedder(network: Callable, flip: bool):
    """What a factory gave, ready to embed as a bank's faces were: a bare network [N, 3, S, S] -> [N, D] wrapped in
    a FaceEmbedder at its ``input_size`` (112 if it names none) with ``flip``; an embedder with its own ``flip``
    setting (it flip-sums and normalizes itself) as it is, whose flip the caller compares."""
    if hasattr(network, "flip"):
        return network
    return FaceEmbedder(network, flip=flip, input_size=getattr(network, "input_size", 112))


def sfnet_config_from_state(state) -> dict:
    """Read SFNet's depths, channels, out_dim and input_size off its state dict's shapes."""
    try:
        channels = [state[f"layer{s}.0.conv.weight"].shape[0] for s in range(1, 5)]
        depths = [len({int(m.group(1)) for k in state for m in [re.match(rf"layer{s}\.(\d+)\.conv1\.", k)] if m})
                  for s in range(1, 5)]
        out_dim, fc_in = state["fc.weight"].shape
    except KeyError as missing:
        raise ValueError(f"not an SFNet state dict (opensphere sfnet*_deprecated layout): no key {missing}") from None
    side = math.isqrt(fc_in // channels[-1])
    return dict(depths=depths, channels=channels, out_dim=out_dim, input_size=16 * side)


def load_sfnet(path: str) -> SFNet:
    """An SFNet (e.g. opensphere's SFNet-20 ``backbone_*.pth``) from a local file, in eval mode, frozen."""
    state = load_state_dict(path)
    network = SFNet(**sfnet_config_from_state(state))
    network.load_state_dict(state)
    return network.eval().requires_grad_(False)


def load_face_embedder(path: str, flip: bool = True) -> FaceEmbedder:
    """``FaceEmbedder`` around ``load_sfnet(path)``."""
    network = load_sfnet(path)
    return FaceEmbedder(network, flip=flip, input_size=network.input_size)
