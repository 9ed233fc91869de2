"""SFNet, the SphereFace family's plain residual CNN (opensphere's ``sfnet*_deprecated`` layout).

SFNet-20 (seed 0108's face embedding model): four stages, each a stride-2 3x3 conv then
[1, 2, 4, 1] residual blocks of two 3x3 convs (1 + 2 + 1 + 4 + 1 + 8 + 1 + 2 = 20 conv layers),
ReLU, no normalization, then a linear layer from the 7 x 7 map of a 112 x 112 input to 512-d.
Parameter names match opensphere's (``layer1.0.conv.weight``, ``layer1.1.conv1.weight``, ``fc.weight``)
so its checkpoints (e.g. ``backbone_100000.pth``, saved from DataParallel) load as they are.
"""
from typing import Sequence

import torch
from torch import nn

SFNET_DEPTHS = {"sfnet4": (0, 0, 0, 0), "sfnet10": (0, 1, 2, 0), "sfnet20": (1, 2, 4, 1),
                "sfnet36": (2, 4, 8, 2), "sfnet64": (3, 8, 16, 3)}


class ConvBlock(nn.Module):
    """Stride-2 3x3 conv + ReLU that opens a stage."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


class ResidualBlock(nn.Module):
    """x + relu(conv2(relu(conv1(x))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act2 = nn.ReLU()

    def forward(self, x):
        return x + self.act2(self.conv2(self.act1(self.conv1(x))))


class SFNet(nn.Module):
    """SFNet: [N, 3, S, S] in [-1, 1] (RGB, S = 112) -> [N, out_dim] (not normalized).

    depths: residual blocks per stage; channels: per stage; input_size: S (a multiple of 16).
    """

    def __init__(self, depths: Sequence[int] = SFNET_DEPTHS["sfnet20"], channels: Sequence[int] = (64, 128, 256, 512),
                 out_dim: int = 512, input_size: int = 112):
        super().__init__()
        if len(depths) != 4 or len(channels) != 4:
            raise ValueError(f"SFNet needs 4 depths and 4 channel counts, got {depths} and {channels}")
        if input_size % 16:
            raise ValueError(f"SFNet input_size must be a multiple of 16, got {input_size}")
        widths = [3, *channels]
        for stage, depth in enumerate(depths):
            blocks = [ConvBlock(widths[stage], widths[stage + 1])]
            blocks += [ResidualBlock(widths[stage + 1]) for _ in range(depth)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(channels[-1] * (input_size // 16) ** 2, out_dim)
        self.input_size = input_size

    def forward(self, x):
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"SFNet expects {self.input_size}x{self.input_size} aligned faces, got {tuple(x.shape)}")
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(x, 1))


def sfnet(arch: str = "sfnet20", **config) -> SFNet:
    """An SFNet by name (sfnet4/10/20/36/64); ``config`` overrides channels, out_dim, input_size."""
    if arch not in SFNET_DEPTHS:
        raise ValueError(f"unknown SFNet {arch!r}: choose one of {sorted(SFNET_DEPTHS)}")
    return SFNet(SFNET_DEPTHS[arch], **config)
