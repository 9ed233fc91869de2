"""A small CNN: a cheap, architecturally different classifier for independent evaluation (seed 0124).

Four conv-BN-ReLU stages (stride 2 from the second), global average pooling, a linear head. Works at
any input size >= 8.
"""
import torch
from torch import nn


class SmallCNN(nn.Module):
    """[N, 3, H, W] in [-1, 1] -> logits [N, num_outputs]; ``width`` scales the channels (w, 2w, 4w, 4w)."""

    def __init__(self, num_outputs: int, width: int = 16):
        super().__init__()
        channels = [3, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for stage in range(4):
            layers += [nn.Conv2d(channels[stage], channels[stage + 1], 3, stride=1 if stage == 0 else 2, padding=1,
                                 bias=False), nn.BatchNorm2d(channels[stage + 1]), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels[-1], num_outputs)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x).mean(dim=(2, 3)), 1))
