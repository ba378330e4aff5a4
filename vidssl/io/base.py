"""The reader protocol every frame source implements (video files through any backend, frame folders).

A reader is opened per ``__getitem__`` (never shared between DataLoader workers) and returns exactly the frames
asked for, as ``uint8`` tensors ``(T, 3, H, W)`` RGB on the reader's device.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch


class DecodeError(RuntimeError):
    """A file could not be opened or decoded; the message names the file and the reason."""


@runtime_checkable
class FrameReader(Protocol):
    """Random access to the frames of one video.

    Attributes:
        path: the file or folder read.
        num_frames: number of frames (exact for frame folders; from the container or a scan for video files).
        fps: frames per second, or ``None`` when unknown (frame folders).
        height, width: frame size in pixels (after rotation metadata is applied).
    """

    path: str
    num_frames: int
    fps: float | None
    height: int
    width: int

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames at ``indices`` (any order, repeats allowed) as ``uint8 (len(indices), 3, H, W)`` RGB."""
        ...

    def close(self) -> None:
        """Release the decoder."""
        ...
