"""MobileNetV3-Large in plain torch, with torchvision's module tree and state-dict keys.

torchvision does not import beside this project's CPU torch, so the architecture is defined here;
parameter names (``features.N.block.M...``, ``classifier.0/3``) and shapes equal torchvision's
``mobilenet_v3_large`` (width 1.0, no reduced tail, no dilation), so its ImageNet weights and the
public code's classifiers (``classifier[3]`` replaced by ``Linear(1280, K)``) load as they are.
"""
from functools import partial
from typing import NamedTuple

import torch
from torch import nn

# BatchNorm settings of torchvision's MobileNetV3
BatchNorm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)


class Bneck(NamedTuple):
    """One inverted-residual block: input, kernel, expanded and output channels, SE, activation, stride."""

    inp: int
    kernel: int
    expanded: int
    out: int
    squeeze_excite: bool
    hardswish: bool
    stride: int


LARGE = [Bneck(*row) for row in [
    (16, 3, 16, 16, False, False, 1), (16, 3, 64, 24, False, False, 2), (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2), (40, 5, 120, 40, True, False, 1), (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2), (80, 3, 200, 80, False, True, 1), (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1), (80, 3, 480, 112, True, True, 1), (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2), (160, 5, 960, 160, True, True, 1), (160, 5, 960, 160, True, True, 1),
]]


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's _make_divisible: round to a multiple of divisor, never below 90 % of value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvNormActivation(nn.Sequential):
    """conv (no bias) -> BatchNorm -> optional activation; keys ``0.weight``, ``1.*`` as torchvision's."""

    def __init__(self, inp, out, kernel=3, stride=1, groups=1, activation=nn.Hardswish):
        layers = [nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), BatchNorm(out)]
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """x * hardsigmoid(fc2(relu(fc1(avgpool(x))))) with 1x1 convs ``fc1``/``fc2``."""

    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class InvertedResidual(nn.Module):
    """expand 1x1 (if widened) -> depthwise kxk -> SE (optional) -> project 1x1; residual when shapes allow."""

    def __init__(self, config: Bneck):
        super().__init__()
        activation = nn.Hardswish if config.hardswish else nn.ReLU
        layers = []
        if config.expanded != config.inp:
            layers.append(ConvNormActivation(config.inp, config.expanded, 1, activation=activation))
        layers.append(ConvNormActivation(config.expanded, config.expanded, config.kernel, config.stride,
                                         groups=config.expanded, activation=activation))
        if config.squeeze_excite:
            layers.append(SqueezeExcitation(config.expanded, make_divisible(config.expanded // 4)))
        layers.append(ConvNormActivation(config.expanded, config.out, 1, activation=None))
        self.block = nn.Sequential(*layers)
        self.use_residual = config.stride == 1 and config.inp == config.out

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_residual else out


class MobileNetV3Large(nn.Module):
    """[N, 3, H, W] -> logits [N, num_outputs]; torchvision's ``mobilenet_v3_large(num_classes=num_outputs)``."""

    def __init__(self, num_outputs: int = 1000, dropout: float = 0.2):
        super().__init__()
        blocks = [ConvNormActivation(3, 16, 3, stride=2)] + [InvertedResidual(config) for config in LARGE]
        blocks.append(ConvNormActivation(160, 960, 1))
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(960, 1280), nn.Hardswish(), nn.Dropout(dropout),
                                        nn.Linear(1280, num_outputs))
        self.reset_parameters()

    def reset_parameters(self):
        """torchvision's initialization."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
