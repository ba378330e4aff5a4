"""A fast stride-4 stand-in for the CorrFlow/MAST ResNet (same interface), shared by their tests."""

import torch
from torch import nn


class TinyEncoder(nn.Module):
    """``(N, 3, H, W) -> (N, channels, H/4, W/4)``; keeps a copy of every input in ``seen``."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.Conv2d(32, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.Conv2d(32, channels, 3, 1, 1))
        self.stride, self.out_channels = 4, channels
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.net(x)
