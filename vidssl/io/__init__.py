"""Lowest layer: reading and writing frames, masks and files. Nothing here imports other vidssl layers."""

from vidssl.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from vidssl.io.base import DecodeError, FrameReader
from vidssl.io.frames import FrameFolderReader
from vidssl.io.readers import open_reader
from vidssl.io.images import (
    DAVIS_PALETTE,
    read_image,
    read_label_png,
    write_label_png,
)
from vidssl.io.writer import CONTAINER_FORMATS, write_video
from vidssl.io.video import (
    AUTO_ORDER,
    BACKENDS,
    BackendUnavailableError,
    DecordReader,
    PyAVReader,
    TorchCodecReader,
    available_backends,
    open_video,
    probe_video,
    resolve_backend,
)

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "BackendUnavailableError",
    "CONTAINER_FORMATS",
    "DecodeError",
    "DecordReader",
    "FrameFolderReader",
    "FrameReader",
    "PyAVReader",
    "TorchCodecReader",
    "available_backends",
    "open_reader",
    "open_video",
    "probe_video",
    "resolve_backend",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "DAVIS_PALETTE",
    "read_image",
    "read_label_png",
    "write_label_png",
    "write_video",
]
