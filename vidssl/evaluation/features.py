"""Feature extractors for label propagation: frames ``uint8 (N, 3, H, W)`` -> features ``(N, C, h, w)``.

Every extractor declares ``name`` and ``stride`` and applies the preset's preprocessing itself: the resize policy
(exact integer sizes from :func:`resized_size`, bilinear without antialiasing like OpenCV's ``INTER_LINEAR``) and,
for encoders, the RGB/255 mean/std normalisation. The engine never assumes a ResNet; anything that satisfies
:class:`FeatureExtractor` can be propagated.

Built-ins:

* :class:`EncoderFeatures` -- a :class:`~vidssl.models.encoders.ResNetEncoder` cut at a stage (CRW: ``layer3``,
  stride 8); :func:`build_encoder_features` makes a seeded random-init or torchvision-weights ResNet-18/34/50.
* :class:`LabFeatures` -- raw-pixel CIE Lab (:func:`vidssl.models.lab.rgb_to_lab`, the conversion MAST trains with)
  averaged over ``stride x stride`` cells (a learning-free baseline).
* :class:`WindowFeatures` -- the stride-4 CorrFlow/MAST encoder (or normalised Lab pixels) with the window
  protocols' cropping and colour space (:mod:`vidssl.evaluation.mast_propagation`).

Output size of the first two: ``(ceil(H'/s), ceil(W'/s))`` for a resized frame ``(H', W')`` and stride ``s``.

:class:`FrameFeatures` reads a sequence's frames and encodes them in batches, once each: the frame provider of both
propagation families.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Protocol, Sequence, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from vidssl.data.davis import DavisLayoutError
from vidssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from vidssl.io.images import read_image
from vidssl.models.encoders import ENCODERS, ResNetEncoder, build_encoder
from vidssl.models.lab import normalise_lab, rgb_to_lab

if TYPE_CHECKING:
    from vidssl.evaluation.presets import PropagationConfig

ResizePolicy = Literal["native", "short_floor"]

__all__ = [
    "EncoderFeatures",
    "FeatureExtractor",
    "FrameFeatures",
    "LabFeatures",
    "WindowFeatures",
    "crop_to_multiple",
    "build_encoder_features",
    "infer_resnet_arch",
    "load_weights_file",
    "resize_frames",
    "resized_size",
]


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the propagation runner needs from a feature extractor.

    Attributes:
        name: short description recorded in metrics.json.
        stride: input pixels per feature cell.
    """

    name: str
    stride: int

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """Size ``(H', W')`` frames of size ``(height, width)`` are resized to before feature extraction."""
        ...

    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """Feature-map size ``(h, w)`` for original frames of size ``(height, width)``."""
        ...

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """``frames: uint8 (N, 3, H, W)`` RGB at original size -> ``float32 (N, C, h, w)`` on the extractor device."""
        ...


def resized_size(height: int, width: int, *, resize: ResizePolicy = "native", short_side: int = 480,
                 multiple: int = 64) -> tuple[int, int]:
    """Input size under a resize policy.

    ``native`` keeps ``(height, width)``. ``short_floor`` (DINO, UVC) scales the short side to ``short_side`` and
    floors the proportionally scaled long side to a multiple of ``multiple`` (854x480 -> 832x480, 910 -> 896,
    1152 -> 1152).

    Returns:
        ``(H', W')`` integers.
    """
    if height < 1 or width < 1:
        raise ValueError(f"frame size: expected positive height and width, got {height}x{width}")
    if resize == "native":
        return height, width
    if resize != "short_floor":
        raise ValueError(f"resize: {resize!r}; expected 'native' or 'short_floor'")
    if width > height:
        long_side = int((short_side * width / height) // multiple * multiple)
        out = (short_side, long_side)
    else:
        long_side = int((short_side * height / width) // multiple * multiple)
        out = (long_side, short_side)
    if min(out) < 1:
        raise ValueError(f"resize: {height}x{width} frames give an empty size {out} with short_side={short_side}, "
                         f"multiple={multiple}")
    return out


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``uint8 (N, 3, H, W)`` -> ``float32 (N, 3, H', W')`` in ``[0, 1]``, bilinear to the exact ``size``.

    No antialiasing and ``align_corners=False`` (OpenCV ``INTER_LINEAR`` convention). Frames already at ``size`` are
    only converted.
    """
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames: expected (N, 3, H, W), got shape {tuple(frames.shape)}")
    x = frames.float() / 255.0
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False,
                          antialias=False)
    return x


class _Preprocessing:
    """Resize policy shared by the built-in extractors."""

    stride: int
    resize: ResizePolicy
    short_side: int
    size_multiple: int

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        return resized_size(height, width, resize=self.resize, short_side=self.short_side,
                            multiple=self.size_multiple)

    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        h, w = self.input_size(height, width)
        return math.ceil(h / self.stride), math.ceil(w / self.stride)


class EncoderFeatures(_Preprocessing):
    """Dense features from a :class:`ResNetEncoder` stage.

    Args:
        encoder: the network (put in eval mode and moved to ``device``).
        layer: stage whose output is returned (``"layer3"`` for CRW: 256-d for ResNet-18 at stride 8).
        mean, std: normalisation of RGB/255 inputs (``colour="imagenet"``).
        colour: the input the encoder was trained on: ``"imagenet"`` (RGB normalised with ``mean``/``std``, the
            ResNets), ``"rgb"`` (RGB in [0, 1], CorrFlow) or ``"lab"`` (normalised Lab, MAST), so a stride-4
            CorrFlow/MAST encoder can be evaluated under the common top-k presets too.
        resize, short_side, size_multiple: resize policy (see :func:`resized_size`).
        device: where the encoder runs and the features are returned.
        name: description (default ``"<arch>.<layer>"``).

    ``__call__``: ``uint8 (N, 3, H, W)`` -> ``float32 (N, C, ceil(H'/8), ceil(W'/8))``.

    Example::

        ext = EncoderFeatures(build_encoder("resnet18", out_layer="layer3"), layer="layer3")
        feats = ext(torch.zeros(2, 3, 480, 854, dtype=torch.uint8))  # (2, 256, 60, 107)
    """

    def __init__(self, encoder: ResNetEncoder, *, layer: str = "layer3",
                 mean: tuple[float, float, float] = IMAGENET_MEAN, std: tuple[float, float, float] = IMAGENET_STD,
                 resize: ResizePolicy = "native", short_side: int = 480, size_multiple: int = 64,
                 device: str | torch.device = "cpu", name: str | None = None,
                 colour: Literal["imagenet", "rgb", "lab"] = "imagenet") -> None:
        if colour not in ("imagenet", "rgb", "lab"):
            raise ValueError(f"colour: {colour!r}; expected 'imagenet', 'rgb' or 'lab'")
        self.colour = colour
        if layer not in getattr(encoder, "layers", ()):
            raise ValueError(f"layer: {layer!r} is not built in this encoder (has {list(encoder.layers)})")
        resized_size(8, 8, resize=resize, short_side=short_side, multiple=size_multiple)  # validates the policy
        self.encoder = encoder.to(device).eval()
        self.layer = layer
        self.stride = encoder.stride_at(layer)
        self.channels = encoder.channels_at(layer)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.resize, self.short_side, self.size_multiple = resize, short_side, size_multiple
        self.device = torch.device(device)
        self.name = name or f"{encoder.arch}.{layer}"

    @classmethod
    def from_config(cls, encoder: ResNetEncoder, cfg: PropagationConfig, *, name: str | None = None,
                    layer: str | None = None, colour: str = "imagenet") -> "EncoderFeatures":
        """Extractor with the preprocessing, layer (unless given) and device of a propagation config."""
        return cls(encoder, layer=layer or cfg.layer, mean=cfg.mean, std=cfg.std, resize=cfg.resize,
                   short_side=cfg.short_side, size_multiple=cfg.size_multiple, device=cfg.device, name=name,
                   colour=colour)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        size = self.input_size(int(frames.shape[-2]), int(frames.shape[-1]))
        x = resize_frames(frames.to(self.device), size)  # (N, 3, H', W') in [0, 1]
        if self.colour == "imagenet":
            mean = torch.tensor(self.mean, device=self.device)[None, :, None, None]
            std = torch.tensor(self.std, device=self.device)[None, :, None, None]
            x = (x - mean) / std
        elif self.colour == "lab":
            x = normalise_lab(rgb_to_lab(x.clamp(0, 1)))
        with torch.inference_mode():
            feats = self.encoder(x, upto=self.layer)
        expected = self.feature_size(int(frames.shape[-2]), int(frames.shape[-1]))
        if tuple(feats.shape[-2:]) != expected:
            raise RuntimeError(f"{self.name}: feature map {tuple(feats.shape[-2:])} differs from the declared "
                               f"size {expected} for {tuple(frames.shape[-2:])} frames")
        return feats.float().clone()

    def info(self) -> dict[str, Any]:
        """Description for metrics.json."""
        return {"kind": "encoder", "name": self.name, "arch": self.encoder.arch, "layer": self.layer,
                "stride": self.stride, "channels": self.channels, "padding_mode": self.encoder.padding_mode,
                "colour": self.colour, "mean": list(self.mean), "std": list(self.std), "resize": self.resize}


class LabFeatures(_Preprocessing):
    """Raw-pixel CIE Lab features, area-averaged over ``stride x stride`` cells.

    Channels are scaled to comparable ranges like MAST's input (:func:`vidssl.models.lab.normalise_lab`):
    ``((L - 50) / 50, a / 127, b / 127)``.

    ``__call__``: ``uint8 (N, 3, H, W)`` -> ``float32 (N, 3, ceil(H'/s), ceil(W'/s))`` (adaptive area pooling to the
    exact size, so odd sizes give partial border cells like the stride-8 ResNet).
    """

    def __init__(self, *, stride: int = 8, resize: ResizePolicy = "native", short_side: int = 480,
                 size_multiple: int = 64, device: str | torch.device = "cpu") -> None:
        if stride < 1:
            raise ValueError(f"stride: must be >= 1, got {stride}")
        resized_size(8, 8, resize=resize, short_side=short_side, multiple=size_multiple)
        self.stride = int(stride)
        self.channels = 3
        self.resize, self.short_side, self.size_multiple = resize, short_side, size_multiple
        self.device = torch.device(device)
        self.name = f"lab.stride{self.stride}"

    @classmethod
    def from_config(cls, cfg: PropagationConfig, *, stride: int = 8) -> "LabFeatures":
        """Extractor with the resize policy and device of a propagation config."""
        return cls(stride=stride, resize=cfg.resize, short_side=cfg.short_side, size_multiple=cfg.size_multiple,
                   device=cfg.device)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        height, width = int(frames.shape[-2]), int(frames.shape[-1])
        x = resize_frames(frames.to(self.device), self.input_size(height, width))
        return F.adaptive_avg_pool2d(normalise_lab(rgb_to_lab(x)), self.feature_size(height, width))

    def info(self) -> dict[str, Any]:
        """Description for metrics.json."""
        return {"kind": "lab", "name": self.name, "stride": self.stride, "channels": 3, "resize": self.resize}


def crop_to_multiple(height: int, width: int, multiple: int) -> tuple[int, int]:
    """``(H - H % m, W - W % m)``: CorrFlow's right/bottom crop."""
    return height - height % multiple, width - width % multiple


class WindowFeatures:
    """Stride-4 feature extractor of the MAST / CorrFlow protocols (the ``FeatureExtractor`` interface).

    Args:
        encoder: a :class:`~vidssl.models.mast_encoder.MASTEncoder` (eval mode is set), or ``None`` for raw
            normalised Lab pixels averaged over 4x4 cells (baseline).
        colour: ``"lab"`` (MAST: ``((L - 50) / 50, a / 127, b / 127)``) or ``"rgb"`` (CorrFlow: RGB/255).
        crop_multiple: crop frames right/bottom to a multiple of it before encoding (CorrFlow 8).
        short_side: 0 = native size (official); else the (cropped) frames are resized bilinearly (exact integer size)
            so that their short side has this length -- a CPU-budget deviation, recorded in ``info()``.
        device: where the encoder runs.

    ``__call__``: ``uint8 (N, 3, H, W)`` -> ``float32 (N, C, ceil(H'/4), ceil(W'/4))`` for the input size
    ``(H', W') = input_size(H, W)``.
    """

    def __init__(self, encoder: nn.Module | None, *, colour: Literal["lab", "rgb"] = "lab", crop_multiple: int = 1,
                 short_side: int = 0, device: str | torch.device = "cpu", name: str | None = None) -> None:
        if colour not in ("lab", "rgb"):
            raise ValueError(f"colour: {colour!r}; expected 'lab' or 'rgb'")
        if crop_multiple < 1:
            raise ValueError(f"crop_multiple: must be >= 1, got {crop_multiple}")
        if short_side < 0:
            raise ValueError(f"short_side: must be >= 0 (0 = native), got {short_side}")
        self.short_side = int(short_side)
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device).eval() if encoder is not None else None
        if self.encoder is not None and getattr(self.encoder, "stride", 4) != 4:
            raise ValueError(f"encoder: MAST/CorrFlow protocols need an output stride of 4, got {self.encoder.stride}")
        self.stride = 4
        self.colour, self.crop_multiple = colour, int(crop_multiple)
        self.channels = getattr(encoder, "out_channels", 3) if encoder is not None else 3
        self.name = name or (f"{getattr(encoder, 'arch', type(encoder).__name__)}[{colour}]" if encoder is not None
                             else "lab_pixels.stride4")

    def cropped_size(self, height: int, width: int) -> tuple[int, int]:
        """Frame size after the right/bottom crop (before any resize)."""
        return crop_to_multiple(height, width, self.crop_multiple)

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """Encoder input size for ``height x width`` frames (crop, then optional short-side resize)."""
        h, w = self.cropped_size(height, width)
        if not self.short_side or min(h, w) == self.short_side:
            return h, w
        if h <= w:
            return self.short_side, int(round(w * self.short_side / h))
        return int(round(h * self.short_side / w)), self.short_side

    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        h, w = self.input_size(height, width)
        return math.ceil(math.ceil(h / 2) / 2), math.ceil(math.ceil(w / 2) / 2)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """``uint8 (N, 3, H, W)`` -> cropped encoder input ``float32 (N, 3, H', W')``."""
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames: expected uint8 (N, 3, H, W), got shape {tuple(frames.shape)}")
        hc, wc = self.cropped_size(int(frames.shape[-2]), int(frames.shape[-1]))
        h, w = self.input_size(int(frames.shape[-2]), int(frames.shape[-1]))
        x = frames[..., :hc, :wc].to(self.device).float() / 255.0
        if (h, w) != (hc, wc):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        return normalise_lab(rgb_to_lab(x)) if self.colour == "lab" else x

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(frames)
        size = self.feature_size(int(frames.shape[-2]), int(frames.shape[-1]))
        if self.encoder is None:
            lab = x if self.colour == "lab" else normalise_lab(rgb_to_lab(x))
            return F.adaptive_avg_pool2d(lab, size)
        with torch.inference_mode():
            feats = self.encoder(x)
        if tuple(feats.shape[-2:]) != tuple(size):
            raise RuntimeError(f"{self.name}: features {tuple(feats.shape[-2:])} differ from the declared {size}")
        return feats.float().clone()

    def info(self) -> dict[str, Any]:
        return {"kind": "window" if self.encoder is not None else "lab_pixels", "name": self.name, "stride": 4,
                "channels": self.channels, "colour": self.colour, "crop_multiple": self.crop_multiple,
                "short_side": self.short_side}


@contextlib.contextmanager
def recalibrating_batchnorm(encoder: nn.Module) -> Iterator[int]:
    """Re-estimate the running statistics of every BatchNorm of ``encoder`` (that keeps them) from what passes
    through it inside the block: statistics reset, train mode, cumulative average (``momentum=None``); on exit the
    encoder is in eval mode with the new statistics and the old momenta (weights untouched). Yields the layer count.

    For a fair random-init baseline: a trained checkpoint carries statistics of real frames, a fresh network mean 0 /
    variance 1, and that difference alone changes frozen features.
    """
    bns = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    encoder.train()
    try:
        yield len(bns)
    finally:
        encoder.eval()
        for m, mom in zip(bns, momenta):
            m.momentum = mom


class FrameFeatures:
    """The frame provider of both propagation families: ``provider(t) -> (C, h, w)`` features of frame ``t``.

    Frames are read (files through :func:`~vidssl.io.images.read_image`, or rows of a ``uint8 (T, 3, H, W)`` tensor)
    and encoded ``batch`` at a time starting at the requested frame; a frame is computed exactly once (``computed``
    counts them) as long as frames are requested in increasing order, which both propagation loops do (their
    :class:`~vidssl.evaluation.propagation.FeatureCache` keeps what they read again).

    Args:
        extractor: any :class:`FeatureExtractor` (:class:`EncoderFeatures`, :class:`LabFeatures`,
            :class:`WindowFeatures`, ...).
        frames: the sequence's frame files or ``uint8 (T, 3, H, W)``.
        size: ``(H, W)`` every frame must have (the first annotation's); a frame of another size raises a
            :class:`~vidssl.data.davis.DavisLayoutError` naming it.
        batch: frames per extractor call.
        l2: L2-normalise the features over channels.
        device: move the features there as float32 (default: leave them where the extractor returns them).
    """

    def __init__(self, extractor: FeatureExtractor, frames: Sequence[str | os.PathLike] | torch.Tensor, *,
                 size: tuple[int, int], batch: int = 4, l2: bool = False,
                 device: str | torch.device | None = None) -> None:
        if batch < 1:
            raise ValueError(f"batch: must be >= 1, got {batch}")
        self.extractor, self.frames, self.size = extractor, frames, (int(size[0]), int(size[1]))
        self.feat_size = tuple(extractor.feature_size(*self.size))
        self.batch, self.l2 = int(batch), bool(l2)
        self.device = torch.device(device) if device is not None else None
        self.buffer: dict[int, torch.Tensor] = {}
        self.computed = 0

    def __len__(self) -> int:
        return len(self.frames)

    def read(self, i: int) -> torch.Tensor:
        """Frame ``i`` as ``uint8 (3, H, W)``, checked against ``size``."""
        img = self.frames[i] if isinstance(self.frames, torch.Tensor) else read_image(self.frames[i])
        if tuple(img.shape[-2:]) != self.size:
            name = f"frame {i}" if isinstance(self.frames, torch.Tensor) else str(self.frames[i])
            raise DavisLayoutError(f"{name}: frame is {img.shape[-1]}x{img.shape[-2]} (WxH) but the sequence's first "
                                   f"annotation is {self.size[1]}x{self.size[0]}")
        return img

    def __call__(self, t: int) -> torch.Tensor:
        if t not in self.buffer:
            idx = list(range(t, min(len(self), t + self.batch)))
            feats = self.extractor(torch.stack([self.read(i) for i in idx]))
            if tuple(feats.shape[-2:]) != self.feat_size:
                raise RuntimeError(f"{self.extractor.name}: features {tuple(feats.shape[-2:])} differ from the "
                                   f"declared size {self.feat_size}")
            if self.device is not None:
                feats = feats.to(self.device, torch.float32)
            if self.l2:
                feats = F.normalize(feats, p=2, dim=1)
            self.computed += len(idx)
            self.buffer = {i: f for i, f in zip(idx, feats)}
        return self.buffer.pop(t)


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.pth``/``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors``.

    A checkpoint that wraps the weights under ``state_dict`` or ``model`` is unwrapped. Errors name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read weights ({exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    return state


def build_encoder_features(name: str, *, seed: int = 0, weights: str | os.PathLike | None = None,
                           cfg: PropagationConfig | None = None) -> EncoderFeatures:
    """A stride-8 ResNet feature extractor: random init from ``seed``, or a local torchvision ``state_dict``.

    Args:
        name: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        seed: initialisation seed (used in a forked RNG, the global torch RNG is left untouched).
        weights: optional torchvision ResNet state_dict file (``.pth``/``.pt``/``.safetensors``); with weights the
            torchvision zero padding is kept, random init uses CRW's reflect padding.
        cfg: propagation config giving layer, normalisation, resize policy and device (default: ``crw``).
    """
    if name not in ENCODERS:
        raise ValueError(f"encoder: unknown name {name!r}; expected one of {', '.join(ENCODERS)}, 'lab' or "
                         f"'identity'")
    if cfg is None:
        from vidssl.evaluation.presets import PropagationConfig  # presets imports this module

        cfg = PropagationConfig()
    padding = "zeros" if weights is not None else "reflect"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        encoder = build_encoder(name, out_layer=cfg.layer, stride8=True, padding_mode=padding)
    if weights is not None:
        state = load_weights_file(weights)
        try:
            encoder.load_torchvision_state_dict(state)
        except ValueError as exc:
            raise ValueError(f"{weights}: {exc}") from exc
        label = f"{name}.{cfg.layer}[{Path(weights).name}]"
    else:
        label = f"{name}.{cfg.layer}[random seed={seed}]"
    return EncoderFeatures.from_config(encoder, cfg, name=label)


def infer_resnet_arch(state: dict[str, torch.Tensor]) -> str:
    """``resnet18`` / ``resnet34`` / ``resnet50`` from the keys of a torchvision ResNet state_dict."""
    keys = {k.removeprefix("module.") for k in state}
    if "conv1.weight" not in keys or "layer3.0.conv1.weight" not in keys:
        raise ValueError("not a torchvision ResNet state_dict (no conv1.weight / layer3.0.conv1.weight)")
    bottleneck = "layer1.0.conv3.weight" in keys
    blocks3 = len({k.split(".")[1] for k in keys if k.startswith("layer3.")})
    if bottleneck:
        if blocks3 == 6:
            return "resnet50"
        raise ValueError(f"bottleneck ResNet with {blocks3} layer3 blocks; only resnet50 (6) is supported")
    if blocks3 == 2:
        return "resnet18"
    if blocks3 == 6:
        return "resnet34"
    raise ValueError(f"basic-block ResNet with {blocks3} layer3 blocks; expected resnet18 (2) or resnet34 (6)")
