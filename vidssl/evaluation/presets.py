"""Propagation protocol presets (spec: propagation_and_davis.md §1.2 and the preset sheet §1.6).

A preset is a :class:`PropagationConfig` with the values the official code uses (not the paper text). Every key is a
plain typed field, so ``vidssl.config.from_dict`` builds and checks it and ``--set propagate.topk=5`` overrides it.

>>> cfg = preset_config("crw", ["propagate.topk=5"])
>>> cfg.topk, cfg.context, cfg.radius
(5, 20, 12.0)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, Mapping

from vidssl.config import ConfigError, apply_overrides, from_dict, to_dict
from vidssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from vidssl.evaluation.mast_propagation import WindowPropagationConfig, corrflow_preset, mast_preset

#: The keys of :class:`PropagationConfig` a window preset (mast, corrflow) reads; the others belong to the top-k
#: protocol (crw, dino), and changing them under a window preset is an error.
WINDOW_PRESET_KEYS = ("preset", "device", "feature_batch", "window")


@dataclass(frozen=True)
class PropagationConfig:
    """Every hyperparameter of a label-propagation run (the ``propagate:`` section).

    Frozen (the official presets are shared values): derive variants with ``dataclasses.replace`` or
    :func:`preset_config`.

    Frame preprocessing (``resize*``, ``mean``/``std``, ``layer``) is used by the feature extractors; the rest by the
    propagation core and the DAVIS runner.
    """

    preset: str = "crw"  # name of the preset these values started from (recorded in metrics.json)
    resize: Literal["native", "short_floor"] = "native"  # native size, or short side -> short_side, long side floored
    short_side: int = 480  # target short side for resize=short_floor (DINO: 480)
    size_multiple: int = 64  # long side floored to a multiple of this for resize=short_floor (DINO: 64)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel mean of RGB/255 inputs to the encoder
    std: tuple[float, float, float] = IMAGENET_STD  # per-channel std (DINO ships 0.228 for red, a typo kept)
    layer: str = "layer3"  # encoder stage whose output is the feature map (CRW: layer3, stride 8)
    l2: bool = True  # L2-normalise features over channels (cosine affinity)
    temperature: float = 0.05  # affinities divided by this before the softmax (CRW README: 0.05)
    context: int = 20  # number of preceding frames in each target's context (CRW --videoLen 20)
    use_first: bool = True  # frame 0 (with its ground-truth labels) is in every context
    pad_prev_with_first: bool = True  # CRW pads the history with copies of frame 0 (always `context` previous frames)
    restrict_shape: Literal["circle", "square", "none"] = "circle"  # circle dy²+dx²<r², square max|d|<=r, or none
    radius: float = 12.0  # restriction radius in feature cells (CRW 12, DINO 12 = 25x25 window)
    first_frame_restricted: bool = False  # whether the radius also applies to frame 0 (CRW: no, DINO/VFS: yes)
    topk: int = 10  # affinities kept per query, over all context frames jointly
    label_down: Literal["bilinear", "nearest"] = "bilinear"  # first-frame labels -> feature size: soft / PIL nearest
    feedback: Literal["soft", "hard"] = "soft"  # context labels: propagated soft labels or their one-hot argmax
    norm_mask: bool = False  # per-channel min-max normalisation after upsampling, before the argmax (DINO, VFS)
    upsample_to: Literal["original", "resized"] = "original"  # bilinear target; resized: then nearest to original
    bf16: bool = False  # compute affinity matmuls in bfloat16 (top-k/softmax stay float32)
    chunk_size: int = 1024  # query positions per propagation chunk (bounds peak memory)
    tile: int = 12  # query tile side for the windowed (restricted) affinity
    feature_batch: int = 4  # frames per feature-extractor batch
    device: str = "cpu"  # torch device for features and propagation ("cpu", "cuda", "cuda:1", ...)
    # MAST / CorrFlow protocols (hard feedback, window softmax, memory + ROI): set -> the runner uses
    # vidssl.evaluation.mast_propagation and the keys above except device/feature_batch do not apply
    window: WindowPropagationConfig | None = None

    def validate(self, prefix: str = "propagate") -> None:
        """Check value ranges; errors name the key."""
        p = f"{prefix}." if prefix else ""
        if self.temperature <= 0:
            raise ConfigError(f"{p}temperature: must be > 0, got {self.temperature}")
        if self.topk < 1:
            raise ConfigError(f"{p}topk: must be >= 1, got {self.topk}")
        if self.context < 0:
            raise ConfigError(f"{p}context: must be >= 0, got {self.context}")
        if self.context == 0 and not self.use_first:
            raise ConfigError(f"{p}context: 0 with use_first=false leaves an empty context")
        if self.restrict_shape == "circle" and self.radius <= 0:
            raise ConfigError(f"{p}radius: must be > 0 for a circle restriction, got {self.radius}")
        if self.restrict_shape == "square" and self.radius < 0:
            raise ConfigError(f"{p}radius: must be >= 0 for a square restriction, got {self.radius}")
        for name in ("short_side", "size_multiple", "chunk_size", "tile", "feature_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{p}{name}: must be >= 1, got {getattr(self, name)}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"{p}std: every value must be > 0, got {self.std}")
        if not (self.device == "cpu" or self.device.startswith("cuda") or self.device == "mps"):
            raise ConfigError(f"{p}device: {self.device!r}; expected 'cpu', 'cuda', 'cuda:N' or 'mps'")
        self._check_protocol_keys(p)

    def _check_protocol_keys(self, p: str) -> None:
        """A key of the other protocol family, changed from the official preset, is an error (it would be ignored).

        Window presets (mast, corrflow) read only ``device``, ``feature_batch`` and ``window.*``; the top-k presets
        (crw, dino) have no ``window``. Presets not in :data:`PRESETS` are not checked.
        """
        base = PRESETS.get(self.preset)
        if base is None:
            return
        if base.window is None:
            if self.window is not None:
                raise ConfigError(f"{p}window: does not apply to preset {self.preset!r} (top-k protocol); the window "
                                  f"protocols are --preset mast or corrflow")
            return
        if self.window is None:
            raise ConfigError(f"{p}window: preset {self.preset!r} (window protocol) needs its window section")
        for f in dataclasses.fields(self):
            if f.name not in WINDOW_PRESET_KEYS and getattr(self, f.name) != getattr(base, f.name):
                raise ConfigError(f"{p}{f.name}: does not apply to preset {self.preset!r} (window protocol); its keys "
                                  f"are {p}window.* (and {p}device, {p}feature_batch)")

    def propagation_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`vidssl.evaluation.propagation.propagate_video` for this config."""
        import torch

        return dict(
            topk=self.topk,
            temperature=self.temperature,
            context=self.context,
            radius=None if self.restrict_shape == "none" else self.radius,
            restrict_shape="circle" if self.restrict_shape == "none" else self.restrict_shape,
            first_frame_restricted=self.first_frame_restricted,
            pad_prev_with_first=self.pad_prev_with_first,
            use_first=self.use_first,
            feedback=self.feedback,
            chunk_size=self.chunk_size,
            tile=self.tile,
            dtype=torch.bfloat16 if self.bf16 else None,
        )


def _crw() -> PropagationConfig:
    # ajabri/videowalk test.py with the README command (--cropSize -1 --videoLen 20 --radius 12 --temperature 0.05
    # --topk 10): native 480p, ImageNet norm, layer3 (stride 8), frame 0 unrestricted, history padded with frame 0.
    return PropagationConfig(preset="crw")


def _dino() -> PropagationConfig:
    # facebookresearch/dino eval_video_segmentation.py defaults: short side 480 / long side floored to x64, std 0.228
    # typo, tau 0.1, 7 previous frames (no padding), 25x25 square neighbourhood on all context frames incl. frame 0,
    # top-5, PIL-nearest first-frame labels, norm_mask, upsampling at the resized size then nearest to the original.
    return PropagationConfig(
        preset="dino", resize="short_floor", short_side=480, size_multiple=64, mean=IMAGENET_MEAN,
        std=(0.228, 0.224, 0.225), layer="layer3", l2=True, temperature=0.1, context=7, use_first=True,
        pad_prev_with_first=False, restrict_shape="square", radius=12.0, first_frame_restricted=True, topk=5,
        label_down="nearest", feedback="soft", norm_mask=True, upsample_to="resized")


def _mast() -> PropagationConfig:
    # zlai0/MAST benchmark.py --ref 0: native size, Lab input, memory {0, 5} + {i, i-2, i-4}, 25x25 windows, ROI
    # for references > 15 frames back, one softmax over all windows (raw dot products), hard feedback, C = 7.
    return PropagationConfig(preset="mast", l2=False, temperature=1.0, restrict_shape="square", radius=12.0,
                             label_down="nearest", feedback="hard", window=mast_preset())


def _corrflow() -> PropagationConfig:
    # zlai0/CorrFlow benchmark.py: RGB/255, crop to x8, previous frame only, 13x13 window, hard feedback.
    return PropagationConfig(preset="corrflow", l2=False, temperature=1.0, context=1, use_first=False,
                             restrict_shape="square", radius=6.0, label_down="bilinear", feedback="hard",
                             window=corrflow_preset())


#: Official preset values (read-only mapping of frozen configs).
PRESETS: Mapping[str, PropagationConfig] = MappingProxyType({"crw": _crw(), "dino": _dino(), "mast": _mast(),
                                                             "corrflow": _corrflow()})
#: Names accepted by :func:`get_preset`.
PRESET_NAMES = ("crw", "dino", "mast", "corrflow")


def get_preset(name: str) -> PropagationConfig:
    """A fresh :class:`PropagationConfig` with the official values of preset ``name``."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown propagation preset {name!r}; expected one of {', '.join(PRESET_NAMES)}")
    base = PRESETS[name]
    return dataclasses.replace(base, window=dataclasses.replace(base.window) if base.window is not None else None)


def preset_config(name: str, overrides: list[str] | tuple[str, ...] = (),
                  values: dict[str, Any] | None = None) -> PropagationConfig:
    """Preset ``name`` with ``values`` (a mapping) and ``--set`` ``overrides`` applied, checked by ``from_dict``.

    Overrides are written ``propagate.<key>=<value>`` (the ``propagate.`` prefix may be omitted).
    """
    base = {"propagate": {**to_dict(get_preset(name)), **(values or {})}}
    fixed = [o if o.startswith("propagate.") else f"propagate.{o}" for o in overrides]
    data = apply_overrides(base, fixed)
    extra = sorted(set(data) - {"propagate"})
    if extra:
        raise ConfigError(f"{extra[0]}: unknown section; propagation overrides are propagate.<key>=<value>")
    return from_dict(PropagationConfig, data["propagate"], prefix="propagate")


def config_dict(cfg: PropagationConfig) -> dict[str, Any]:
    """Plain JSON-able dict of ``cfg`` (for metrics.json and the printed header)."""
    return to_dict(cfg)


def describe_config(cfg: PropagationConfig, *, stride: int | None = None) -> list[str]:
    """Header lines listing every hyperparameter (plus the radius in input pixels when ``stride`` is known)."""
    lines = [f"  {f.name} = {to_dict(getattr(cfg, f.name))}" for f in dataclasses.fields(cfg)]
    if stride is not None and cfg.restrict_shape != "none":
        lines.append(f"  (derived) radius in input pixels = {cfg.radius * stride:g}")
    return lines


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "PRESET_NAMES",
    "PropagationConfig",
    "WINDOW_PRESET_KEYS",
    "config_dict",
    "describe_config",
    "get_preset",
    "preset_config",
]
