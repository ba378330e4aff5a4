"""Pre-activation ResNet ("ResNet v2"; He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", ECCV
2016) as Google's VTAB / VIVI / BiT papers use it: the trunk of VIVI's ResNet-50 v2 (issue #13).

Layout (He et al.'s and BiT's: a stage's stride in its first block; TF-slim puts it in the last unit instead):

* stem: ``conv1`` 7x7 stride 2 (64 channels) + 3x3 stride-2 max pool, with no BatchNorm or ReLU after it (the first
  block's pre-activation normalises the stem output);
* bottleneck block (``resnet50v2``): ``BN-ReLU-conv1x1``, ``BN-ReLU-conv3x3`` (the stage's stride is in the 3x3),
  ``BN-ReLU-conv1x1`` (4x expansion), added to the identity; where the shape changes (first block of a stage) the
  shortcut is a 1x1 projection of the *pre-activated* input ``relu(bn1(x))``, without BatchNorm;
* basic block (``resnet18v2`` / ``resnet34v2``): ``BN-ReLU-conv3x3`` (stride), ``BN-ReLU-conv3x3``, same shortcut;
* post-norm: v2's residual stream is never normalised inside a stage, so a final ``norm`` (BatchNorm + ReLU over
  ``out_channels``) follows the last built stage (``out_layer``), as at the end of the v2 / BiT trunk.

Stage outputs (``forward(x, upto=...)``): every stage's features are normalised, read where the trained network
itself normalises them. For ``out_layer`` that is the post-norm ``relu(norm(x))``. A stage before ``out_layer``
(e.g. ``eval_layer: layer3`` of a trunk trained to ``layer4``) returns the pre-activation of the next stage's
first block, ``relu(layer{k+1}[0].bn1(x))``: the activation that next stage reads (the input of its 1x1 conv and
of its projection shortcut), the analogue of a v1 ResNet's post-ReLU stage output. No untrained parameter is ever
read: with ``out_layer: layer3`` the same ``layer3`` output goes through that trunk's own (trained) ``norm``.

``stride8`` follows :class:`~vidssl.models.encoders.ResNetEncoder`: the first blocks of ``layer3`` and ``layer4``
get stride 1 (3x3 conv and projection), no dilation, so both keep the ``layer2`` resolution (output stride 8).
``padding_mode: reflect`` replaces the zero padding of every padded convolution (the max pool keeps its own).

Module names: ``conv1``, ``layer1`` .. ``layer4`` (blocks ``bn1, conv1, bn2, conv2[, bn3, conv3], downsample``),
``norm``. Not compatible with torchvision (v1) state dicts: the BatchNorms sit elsewhere.

Example::

    enc = ResNetV2Encoder("resnet50v2", out_layer="layer4", stride8=False, padding_mode="zeros")
    enc(torch.zeros(2, 3, 224, 224)).shape  # (2, 2048, 7, 7)
    enc(torch.zeros(2, 3, 224, 224), upto="layer3").shape  # (2, 1024, 14, 14)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vidssl.config import ConfigError
from vidssl.models.encoders import TRUNK_STAGES as _LAYERS, check_trunk_args, trunk_stride

_WIDTHS = (64, 128, 256, 512)  # bottleneck / basic widths per stage (output: x expansion)
_DEPTHS = {"resnet18v2": (2, 2, 2, 2), "resnet34v2": (3, 4, 6, 3), "resnet50v2": (3, 4, 6, 3)}


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    """``k x k`` convolution, "same" padding, no bias (every conv feeds a BatchNorm or the residual sum)."""
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


class _PreActBlock(nn.Module):
    """What both v2 blocks share: the pre-activation ``relu(bn1(x))`` (also read by the trunk for ``upto``)."""

    bn1: nn.BatchNorm2d

    def preact(self, x: torch.Tensor) -> torch.Tensor:
        """The block's pre-activation ``relu(bn1(x))``, ``(B, cin, H, W)``."""
        return F.relu(self.bn1(x))


class PreActBottleneck(_PreActBlock):
    """v2 bottleneck: ``x + conv1x1(relu(bn3(conv3x3_s(relu(bn2(conv1x1(relu(bn1(x)))))))))``.

    Args:
        cin: input channels; width: bottleneck width (output ``4 * width``); stride: of the 3x3 conv and projection.

    Shapes: ``(B, cin, H, W) -> (B, 4 * width, ceil(H / stride), ceil(W / stride))``.
    """

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv(cin, width, 1)
        self.bn2, self.conv2 = nn.BatchNorm2d(width), _conv(width, width, 3, stride)
        self.bn3, self.conv3 = nn.BatchNorm2d(width), _conv(width, cout, 1)
        self.downsample = _conv(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.preact(x)  # b cin h w
        shortcut = x if self.downsample is None else self.downsample(out)  # b cout h' w' (from the pre-activation)
        out = self.conv1(out)  # b width h w
        out = self.conv2(F.relu(self.bn2(out)))  # b width h' w'
        out = self.conv3(F.relu(self.bn3(out)))  # b cout h' w'
        return out + shortcut  # b cout h' w'


class PreActBasic(_PreActBlock):
    """v2 basic block: ``x + conv3x3(relu(bn2(conv3x3_s(relu(bn1(x))))))``.

    Shapes: ``(B, cin, H, W) -> (B, width, ceil(H / stride), ceil(W / stride))``.
    """

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv(cin, width, 3, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(width), _conv(width, width, 3)
        self.downsample = _conv(cin, width, 1, stride) if stride != 1 or cin != width else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.preact(x)  # b cin h w
        shortcut = x if self.downsample is None else self.downsample(out)  # b width h' w'
        out = self.conv1(out)  # b width h' w'
        out = self.conv2(F.relu(self.bn2(out)))  # b width h' w'
        return out + shortcut  # b width h' w'


class ResNetV2Encoder(nn.Module):
    """Pre-activation ResNet trunk returning a dense, normalised feature map (the :class:`Encoder` interface).

    Args:
        arch: ``"resnet50v2"`` (bottleneck, [3, 4, 6, 3]), ``"resnet34v2"`` (basic, [3, 4, 6, 3]) or
            ``"resnet18v2"`` (basic, [2, 2, 2, 2]).
        out_layer: last stage built (``"layer1"`` .. ``"layer4"``); the post-norm follows it.
        stride8: ``layer3``/``layer4`` first-block strides set to 1 (output stride 8 instead of 16/32).
        padding_mode: ``"zeros"`` or ``"reflect"`` for every padded convolution.

    Shapes: ``forward(x)`` maps ``(B, 3, H, W)`` to ``(B, C, H/s, W/s)`` with ``s = self.stride``,
    ``C = self.out_channels`` (sizes rounded up like the convolutions do); ``upto`` an earlier stage gives that
    stage's features, normalised by the next stage's pre-activation (module docstring).
    """

    def __init__(self, arch: str = "resnet50v2", *, out_layer: str = "layer4", stride8: bool = True,
                 padding_mode: str = "reflect") -> None:
        super().__init__()
        if arch not in _DEPTHS:
            raise ValueError(f"arch: unknown ResNet v2 {arch!r}; expected one of {sorted(_DEPTHS)}")
        check_trunk_args(out_layer, padding_mode)
        self.arch, self.out_layer, self.stride8, self.padding_mode = arch, out_layer, stride8, padding_mode
        block = PreActBottleneck if arch == "resnet50v2" else PreActBasic
        self._channels = {name: w * block.expansion for name, w in zip(_LAYERS, _WIDTHS)}
        self.conv1 = _conv(3, 64, 7, stride=2)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layers: tuple[str, ...] = _LAYERS[: _LAYERS.index(out_layer) + 1]  #: stages built, in order
        cin = 64
        for i, name in enumerate(self.layers):
            stride = 1 if i == 0 or (stride8 and name in ("layer3", "layer4")) else 2
            width = _WIDTHS[i]
            blocks = [block(cin, width, stride)] + [block(width * block.expansion, width)
                                                    for _ in range(_DEPTHS[arch][i] - 1)]
            setattr(self, name, nn.Sequential(*blocks))
            cin = width * block.expansion
        self.out_channels = self._channels[out_layer]
        self.norm = nn.BatchNorm2d(self.out_channels)  # v2 post-norm (with a ReLU) after the last built stage
        self.stride = self.stride_at(out_layer)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
                if padding_mode != "zeros" and m.padding != (0, 0):
                    m.padding_mode = padding_mode

    def forward(self, x: torch.Tensor, *, upto: str | None = None) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, C, h, w)``; ``upto`` stops at an earlier stage (e.g. ``"layer3"`` for eval)."""
        stop = upto or self.out_layer
        if stop not in self.layers:
            raise ValueError(f"upto: {stop!r} is not built in this encoder (has {list(self.layers)})")
        x = self.maxpool(self.conv1(x))  # b 64 h/4 w/4 (no BN/ReLU: the first block pre-activates)
        for name in self.layers:
            x = getattr(self, name)(x)  # b c h' w' (residual stream, not normalised)
            if name == stop:
                break
        if stop == self.out_layer:
            return F.relu(self.norm(x))  # b c h' w' (post-norm)
        nxt = getattr(self, self.layers[self.layers.index(stop) + 1])
        return nxt[0].preact(x)  # b c h' w': what the next stage reads

    def channels_at(self, layer: str) -> int:
        """Feature channels after ``layer``."""
        return self._channels[layer]

    def stride_at(self, layer: str) -> int:
        """Output stride after ``layer``."""
        return trunk_stride(layer, self.stride8)


def resnet_v2_from_config(cfg) -> ResNetV2Encoder:
    """Registry factory (``model.encoder: resnet50v2 | resnet34v2 | resnet18v2``; ``out_layer``, ``stride8`` and
    ``padding_mode`` apply)."""
    if cfg.encoder not in _DEPTHS:
        raise ConfigError(f"model.encoder: {cfg.encoder!r} is not a ResNet v2; expected one of {sorted(_DEPTHS)}")
    return ResNetV2Encoder(cfg.encoder, out_layer=cfg.out_layer, stride8=cfg.stride8, padding_mode=cfg.padding_mode)
