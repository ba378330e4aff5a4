"""Data layer: clip samplers, video index (manifest), clip datasets, clip-consistent transforms and loaders.

Imports point down only (``vidssl.io`` below); nothing here has import-time side effects.
"""

from vidssl.data import samplers
from vidssl.data.config import DataConfig, StreamConfig
from vidssl.data.datasets import ClipDataset
from vidssl.data.images import ImageFolderDataset, scan_image_folder
from vidssl.data.loader import ClipLoader, build_loader, collate, resolve_entries, synthetic_root
from vidssl.data.manifest import VideoEntry, build_manifest, load_manifest, scan_root
from vidssl.data.shot_detect import ContentParams
from vidssl.data.shots import PySceneDetectParams, detect_video, load_shots_file, read_scenedetect_csv, run_shots
from vidssl.data.samplers import (
    ClipSpec,
    clip_at,
    clip_span,
    consecutive_clips,
    effective_stride,
    num_clip_starts,
    random_clip,
    random_pair,
    shot_frames,
    uniform_clips,
)
from vidssl.data.transforms import BatchClipAugment, ClipParams, ClipTransform

__all__ = [
    "BatchClipAugment",
    "ClipDataset",
    "ClipLoader",
    "ClipParams",
    "ClipSpec",
    "ClipTransform",
    "ContentParams",
    "DataConfig",
    "ImageFolderDataset",
    "PySceneDetectParams",
    "StreamConfig",
    "VideoEntry",
    "build_loader",
    "build_manifest",
    "collate",
    "detect_video",
    "scan_image_folder",
    "clip_at",
    "clip_span",
    "consecutive_clips",
    "effective_stride",
    "load_manifest",
    "load_shots_file",
    "num_clip_starts",
    "random_clip",
    "random_pair",
    "read_scenedetect_csv",
    "resolve_entries",
    "run_shots",
    "samplers",
    "scan_root",
    "shot_frames",
    "synthetic_root",
    "uniform_clips",
]
