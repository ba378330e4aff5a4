"""Every frame of a video decoded sequentially by PyAV (an independent reference for the writer tests)."""

from __future__ import annotations

import av
import numpy as np


def decode_all(path) -> tuple[list[np.ndarray], list[int], list[bool]]:
    """``(frames (H, W, 3) uint8 RGB, pts, key_frame flags)`` in decoding order."""
    with av.open(str(path)) as container:
        frames, pts, keys = [], [], []
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            pts.append(frame.pts)
            keys.append(bool(frame.key_frame))
    return frames, pts, keys
