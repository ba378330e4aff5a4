"""Frame encoders: torchvision ResNets with the correspondence-learning modifications.

The stride-8 modification (CRW, TimeCycle, UVC, VFS) sets the stride of the first block of ``layer3`` and
``layer4`` to 1, so ``layer3`` and ``layer4`` keep the ``layer2`` resolution (output stride 8). CRW trains from
scratch with every convolution's zero padding replaced by ``reflect`` padding.

Module names follow torchvision (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so any torchvision ResNet
``state_dict`` loads with :meth:`ResNetEncoder.load_torchvision_state_dict`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

_LAYERS = ("layer1", "layer2", "layer3", "layer4")
_CHANNELS = {
    "resnet18": {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
    "resnet34": {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
    "resnet50": {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
}


class ResNetEncoder(nn.Module):
    """ResNet trunk returning a dense feature map.

    Args:
        arch: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        out_layer: last stage kept (``"layer1"`` .. ``"layer4"``); later stages are not built.
        stride8: set ``layer3``/``layer4`` first-block strides to 1 (output stride 8 instead of 16/32).
        padding_mode: ``"zeros"`` (torchvision) or ``"reflect"`` (CRW ``scratch``) for every padded convolution.

    Shapes: ``forward(x)`` maps ``(B, 3, H, W)`` to ``(B, C, H/s, W/s)`` with ``s = self.stride`` and
    ``C = self.out_channels`` (spatial sizes rounded up like the convolutions do).
    """

    def __init__(self, arch: str = "resnet18", *, out_layer: str = "layer4", stride8: bool = True,
                 padding_mode: str = "reflect") -> None:
        super().__init__()
        if arch not in _CHANNELS:
            raise ValueError(f"arch: unknown encoder {arch!r}; expected one of {sorted(_CHANNELS)}")
        if out_layer not in _LAYERS:
            raise ValueError(f"out_layer: {out_layer!r}; expected one of {list(_LAYERS)}")
        if padding_mode not in ("zeros", "reflect"):
            raise ValueError(f"padding_mode: {padding_mode!r}; expected 'zeros' or 'reflect'")
        self.arch, self.out_layer, self.stride8, self.padding_mode = arch, out_layer, stride8, padding_mode
        net = getattr(torchvision.models, arch)(weights=None)
        if stride8:
            for name in ("layer3", "layer4"):
                block = getattr(net, name)[0]
                for conv in (block.conv1, getattr(block, "conv2", None)):
                    if conv is not None and conv.stride == (2, 2):
                        conv.stride = (1, 1)
                if block.downsample is not None:
                    block.downsample[0].stride = (1, 1)
        if padding_mode != "zeros":
            for m in net.modules():
                if isinstance(m, nn.Conv2d) and m.padding != (0, 0):
                    m.padding_mode = padding_mode
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        keep = _LAYERS[: _LAYERS.index(out_layer) + 1]
        for name in keep:
            setattr(self, name, getattr(net, name))
        self._layers = keep
        self.out_channels = _CHANNELS[arch][out_layer]
        down = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}[out_layer]
        self.stride = min(down, 8) if stride8 else down

    def forward(self, x: torch.Tensor, *, upto: str | None = None) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, C, h, w)``; ``upto`` stops at an earlier stage (e.g. ``"layer3"`` for CRW eval)."""
        stop = upto or self.out_layer
        if stop not in self._layers:
            raise ValueError(f"upto: {stop!r} is not built in this encoder (has {list(self._layers)})")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # b 64 h/4 w/4
        for name in self._layers:
            x = getattr(self, name)(x)
            if name == stop:
                break
        return x

    def channels_at(self, layer: str) -> int:
        """Feature channels after ``layer``."""
        return _CHANNELS[self.arch][layer]

    def stride_at(self, layer: str) -> int:
        """Output stride after ``layer``."""
        down = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}[layer]
        return min(down, 8) if self.stride8 else down

    def load_torchvision_state_dict(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Load a torchvision ResNet ``state_dict`` (``fc.*`` and stages not built are ignored).

        Returns the names of encoder parameters the file did not provide (an error if any is missing).
        """
        own = self.state_dict()
        state = {k.removeprefix("module."): v for k, v in state.items()}
        picked = {k: v for k, v in state.items() if k in own}
        missing = sorted(set(own) - set(picked))
        if missing:
            raise ValueError(f"weights: the state_dict lacks {len(missing)} encoder tensors, e.g. {missing[:3]}; "
                             f"expected a torchvision {self.arch} state_dict")
        for k, v in picked.items():
            if own[k].shape != v.shape:
                raise ValueError(f"weights: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        self.load_state_dict(picked, strict=True)
        return missing


def build_encoder(name: str = "resnet18", *, out_layer: str = "layer4", stride8: bool = True,
                  padding_mode: str = "reflect") -> ResNetEncoder:
    """Build a frame encoder by name (see :class:`ResNetEncoder`)."""
    return ResNetEncoder(name, out_layer=out_layer, stride8=stride8, padding_mode=padding_mode)


ENCODERS = tuple(_CHANNELS)
