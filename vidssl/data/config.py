"""Data configuration (the ``data:`` section of a recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vidssl.config import ConfigError


@dataclass
class DataConfig:
    """Where clips come from and how they are cut and augmented.

    ``source`` picks the dataset: ``synthetic`` (built-in demo videos, generated into ``root`` or a cache folder),
    ``frames`` (folders of JPEG/PNG frames: DAVIS, YouTube-VOS, Kinetics-as-frames), ``video`` (encoded videos),
    ``images`` (an image folder with one subfolder per class: items are 1-frame clips with a ``label``) or
    ``manifest`` (every entry of ``manifest``, frame folders and encoded videos alike).
    """

    source: Literal["synthetic", "frames", "video", "images", "manifest"] = "synthetic"
    root: str = ""  #: dataset root (frames: folder of per-video frame folders or a DAVIS root; video: folder of files)
    manifest: str = ""  #: optional manifest (JSONL) listing the videos; built and cached when empty
    split: str = ""  #: DAVIS-style split name (reads ImageSets/<year>/<split>.txt) or empty for every video
    sequences: list[str] = field(default_factory=list)  #: explicit subset of video names (empty = all)
    clip_len: int = 4  #: frames per clip (T)
    stride: int = 1  #: frame step inside a clip
    #: random / uniform / consecutive clips, ``pair`` (two frames 1..stride apart, clip_len 2) or ``shots``
    #: (``num_shots`` consecutive shots of the manifest's ``shots``, ``clip_len`` frames each)
    sampler: Literal["random", "uniform", "consecutive", "pair", "shots"] = "random"
    num_shots: int = 1  #: sampler shots: shots per item (a video without shots is one shot)
    #: sampler shots: frames per second read inside a shot (videos with a known fps: frame step round(fps /
    #: shot_fps)); 0 uses ``stride`` as the frame step (frame folders always do)
    shot_fps: float = 0.0
    min_shot_len: int = 1  #: sampler shots: shots with fewer frames (source frames) are left out
    #: sampler shots, a shot with fewer than ``clip_len`` frames (at the frame step) or a video with fewer than
    #: ``num_shots`` shots: ``repeat`` frames / the last shot, ``skip`` it (counted, logged) or ``error``
    shot_policy: Literal["repeat", "skip", "error"] = "repeat"
    #: draw flip and colour jitter independently per frame (VIVI's frames of a shot) instead of once per clip
    per_frame_jitter: bool = False
    clips_per_video: int = 1  #: clips drawn from each video per epoch
    crop_size: int = 256  #: output side of the (square) random resized crop
    crop_scale: tuple[float, float] = (0.8, 0.95)
    crop_ratio: tuple[float, float] = (0.7, 1.3)
    per_frame_crop: bool = True  #: draw the crop independently per frame (CRW) instead of once per clip
    flip: float = 0.0  #: probability of a clip-consistent horizontal flip
    color_jitter: float = 0.0  #: brightness/contrast/saturation strength, clip-consistent
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    #: backend for encoded video (``pynvvideocodec``: data.device=cuda only)
    decoder: Literal["auto", "torchcodec", "pyav", "decord", "pynvvideocodec"] = "auto"
    decode_threads: int = 1  #: decoder threads per worker
    device: Literal["cpu", "cuda"] = "cpu"  #: where decoding and augmentation run (cuda: main process, batched)
    num_workers: int = 0
    max_retries: int = 3  #: decode attempts on a failing file before it is skipped and counted
    #: GPU path only: idle decoders kept open per process (LRU) instead of one per item; an NVDEC decoder costs
    #: ~160 ms to open on an H200 (a CPU one ~25 ms), so reuse pays (CPU workers always open one per item)
    reader_cache: int = 64
    #: GPU path only: concurrent decode sessions (threads of the main process, each with its own decoders and CUDA
    #: stream; NVDEC / nvjpeg engines run in parallel: one per engine or more); clips of one file are decoded together
    gpu_decode_threads: int = 4
    #: GPU path only: batches decoded and augmented ahead of the training step (bounded queue)
    gpu_prefetch: int = 2
    #: random clips start only on keyframes of encoded videos: nothing before the clip is decoded (faster), but the
    #: sampling distribution changes (starts every keyframe interval only); off by default
    keyframe_aligned: bool = False
    # synthetic source
    synth_videos: int = 16
    synth_frames: int = 16
    synth_size: tuple[int, int] = (128, 128)  #: (H, W) of generated frames
    synth_seed: int = 0

    def validate(self, prefix: str = "data") -> None:
        p = f"{prefix}." if prefix else ""
        if self.clip_len < 1:
            raise ConfigError(f"{p}clip_len: must be >= 1, got {self.clip_len}")
        if self.stride < 1:
            raise ConfigError(f"{p}stride: must be >= 1, got {self.stride}")
        if self.num_shots < 1:
            raise ConfigError(f"{p}num_shots: must be >= 1, got {self.num_shots}")
        if self.shot_fps < 0:
            raise ConfigError(f"{p}shot_fps: must be >= 0 (0: use stride), got {self.shot_fps}")
        if self.min_shot_len < 1:
            raise ConfigError(f"{p}min_shot_len: must be >= 1, got {self.min_shot_len}")
        if self.shot_policy not in ("repeat", "skip", "error"):
            raise ConfigError(f"{p}shot_policy: expected repeat, skip or error, got {self.shot_policy!r}")
        if self.sampler == "pair" and self.clip_len != 2:
            raise ConfigError(f"{p}clip_len: sampler 'pair' returns 2 frames, got clip_len={self.clip_len}")
        if self.clips_per_video < 1:
            raise ConfigError(f"{p}clips_per_video: must be >= 1, got {self.clips_per_video}")
        if self.crop_size < 8:
            raise ConfigError(f"{p}crop_size: must be >= 8, got {self.crop_size}")
        if not (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            raise ConfigError(f"{p}crop_scale: need 0 < lo <= hi <= 1, got {self.crop_scale}")
        if not (0 < self.crop_ratio[0] <= self.crop_ratio[1]):
            raise ConfigError(f"{p}crop_ratio: need 0 < lo <= hi, got {self.crop_ratio}")
        if not 0 <= self.flip <= 1:
            raise ConfigError(f"{p}flip: must be a probability in [0, 1], got {self.flip}")
        if self.source == "images" and not self.root:
            raise ConfigError(f"{p}root: required for source='images' (a folder with one subfolder per class)")
        if self.source == "manifest" and not self.manifest:
            raise ConfigError(f"{p}manifest: required for source='manifest' (a JSONL manifest of frame folders and/or "
                              "video files)")
        if self.source in ("frames", "video") and not self.root and not self.manifest:
            raise ConfigError(f"{p}root: required for source={self.source!r} (a dataset folder)")
        if self.num_workers < 0:
            raise ConfigError(f"{p}num_workers: must be >= 0")
        if self.keyframe_aligned and self.sampler != "random":
            raise ConfigError(f"{p}keyframe_aligned: applies to sampler 'random' only, got sampler={self.sampler!r}")
        if self.gpu_decode_threads < 1:
            raise ConfigError(f"{p}gpu_decode_threads: must be >= 1, got {self.gpu_decode_threads}")
        if self.gpu_prefetch < 1:
            raise ConfigError(f"{p}gpu_prefetch: must be >= 1, got {self.gpu_prefetch}")
        if self.decoder == "pynvvideocodec" and self.device != "cuda":
            raise ConfigError(f"{p}decoder: 'pynvvideocodec' decodes on the GPU only; set {p}device=cuda")
        if self.reader_cache < 0:
            raise ConfigError(f"{p}reader_cache: must be >= 0 (0 opens a decoder per item), got {self.reader_cache}")


@dataclass
class StreamConfig:
    """A further named data stream (``streams: {name: {data: {...}, batch_size: N, weight: w}}`` in a recipe).

    Each stream has its own loader. On every step it contributes a batch of ``batch_size`` items (global, split over
    processes) with probability ``weight`` (1: every step), drawn from a generator seeded by ``train.seed`` and the
    step, identical on every process, so resume and DDP see the same schedule.
    """

    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 0  #: global items per step (0: train.batch_size)
    weight: float = 1.0  #: fraction of steps that draw a batch from this stream

    def validate(self, prefix: str = "stream") -> None:
        if self.batch_size < 0:
            raise ConfigError(f"{prefix}.batch_size: must be >= 0, got {self.batch_size}")
        if not 0 < self.weight <= 1:
            raise ConfigError(f"{prefix}.weight: must lie in (0, 1], got {self.weight}")
