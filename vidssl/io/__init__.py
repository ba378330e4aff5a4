"""Lowest layer: reading and writing frames, masks and files. Nothing here imports other vidssl layers."""

from vidssl.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from vidssl.io.images import (
    DAVIS_PALETTE,
    read_image,
    read_label_png,
    write_label_png,
)

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "DAVIS_PALETTE",
    "read_image",
    "read_label_png",
    "write_label_png",
]
