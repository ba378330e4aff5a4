"""Pictures of propagated masks: per-frame overlays (JPEG) and one mp4 per sequence.

Layout written by :func:`write_sequence_viz`::

    <viz_dir>/<seq>/<stem>.jpg     frame blended with the palette colour of each object, object contours drawn
    <viz_dir>/<seq>.mp4            the overlays as an H.264 (or MPEG-4 Part 2) video, even width/height

Every file is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from vidssl.io.atomic import atomic_path
from vidssl.io.images import DAVIS_PALETTE, read_image, read_label_png
from vidssl.io.writer import write_video

__all__ = ["contours", "overlay", "write_sequence_viz"]


def contours(ids: torch.Tensor, *, thickness: int = 1) -> torch.Tensor:
    """Pixels on an object boundary (where a 4-neighbour has another id), thickened by ``thickness - 1``.

    Args:
        ids: ``(H, W)`` integer object ids.

    Returns:
        ``(H, W)`` bool; background-only regions and the image border are never boundaries.
    """
    if ids.ndim != 2:
        raise ValueError(f"ids: expected (H, W), got shape {tuple(ids.shape)}")
    edge = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    dy = ids[1:, :] != ids[:-1, :]
    dx = ids[:, 1:] != ids[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    if thickness > 1:
        k = 2 * (thickness - 1) + 1
        edge = F.max_pool2d(edge[None, None].float(), k, stride=1, padding=k // 2)[0, 0] > 0
    return edge


def overlay(frame: torch.Tensor, ids: torch.Tensor | np.ndarray, *, palette: Sequence[int] | None = None,
            alpha: float = 0.5, thickness: int = 2) -> torch.Tensor:
    """Blend object colours into a frame and draw the object contours.

    Args:
        frame: ``uint8 (3, H, W)`` RGB.
        ids: ``(H, W)`` object ids (0 = background, left unchanged except for contours).
        palette: 768 ints (RGB triples); default :data:`~vidssl.io.images.DAVIS_PALETTE`.
        alpha: opacity of the object colour.
        thickness: contour thickness in pixels (0 = no contours).

    Returns:
        ``uint8 (3, H, W)``.
    """
    ids_t = torch.as_tensor(np.asarray(ids)).long()
    if frame.ndim != 3 or frame.shape[0] != 3 or tuple(frame.shape[1:]) != tuple(ids_t.shape):
        raise ValueError(f"overlay: frame {tuple(frame.shape)} and ids {tuple(ids_t.shape)} must be (3, H, W) and "
                         f"(H, W) of the same size")
    pal = torch.tensor(list(palette if palette is not None else DAVIS_PALETTE), dtype=torch.float32)
    pal = rearrange(F.pad(pal, (0, max(0, 768 - pal.numel())))[:768], "(n c) -> n c", c=3)  # (256, 3)
    colour = rearrange(pal[ids_t.clamp(0, 255)], "h w c -> c h w")
    img = frame.float()
    fg = (ids_t > 0)[None]
    out = torch.where(fg, (1 - alpha) * img + alpha * colour, img)
    if thickness > 0:
        edge = contours(ids_t, thickness=thickness)[None]
        # Contours take the colour of the object they belong to; background-side pixels take the neighbour's
        # colour via a max-pooled id map (ids > 0 win over background).
        near = F.max_pool2d(ids_t[None, None].float(), 3, stride=1, padding=1)[0, 0].long()
        edge_colour = rearrange(pal[torch.where(ids_t > 0, ids_t, near).clamp(0, 255)], "h w c -> c h w")
        out = torch.where(edge, edge_colour, out)
    return out.round().clamp(0, 255).to(torch.uint8)


def _even(img: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` -> even height and width by repeating the last row/column (yuv420p needs even sizes)."""
    h, w = img.shape[:2]
    return np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def write_sequence_viz(frame_files: Sequence[str | os.PathLike], mask_files: Sequence[str | os.PathLike],
                       viz_dir: str | os.PathLike, seq: str, *, palette: Sequence[int] | None = None,
                       fps: int = 24, alpha: float = 0.5, jpeg_quality: int = 90) -> dict[str, object]:
    """Write overlays ``<viz_dir>/<seq>/<stem>.jpg`` and ``<viz_dir>/<seq>.mp4`` for one sequence.

    Args:
        frame_files: the sequence's frames, in order.
        mask_files: the predicted label PNGs (same count and order; stems name the JPEGs).
        palette: colours (default: each mask file's own palette, else DAVIS_PALETTE).

    Returns:
        ``{"overlays": folder, "video": mp4 path, "frames": count}``.
    """
    if len(frame_files) != len(mask_files):
        raise ValueError(f"viz {seq}: {len(frame_files)} frames but {len(mask_files)} masks")
    out_dir = Path(viz_dir) / seq

    def images():
        for fpath, mpath in zip(frame_files, mask_files):
            frame = read_image(fpath)
            ids, own_palette = read_label_png(mpath)
            if tuple(frame.shape[1:]) != ids.shape:
                raise ValueError(f"{mpath}: mask is {ids.shape[1]}x{ids.shape[0]} but frame {fpath} is "
                                 f"{frame.shape[2]}x{frame.shape[1]}")
            img = rearrange(overlay(frame, ids, palette=palette or own_palette, alpha=alpha),
                            "c h w -> h w c").numpy()
            with atomic_path(out_dir / f"{Path(mpath).stem}.jpg") as tmp:
                Image.fromarray(img).save(tmp, format="JPEG", quality=jpeg_quality)
            yield img

    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    quality = {"crf": 20, "preset": "veryfast"} if codec == "libx264" else {}
    video = write_video(Path(viz_dir) / f"{seq}.mp4", (_even(img) for img in images()), fps=fps, codec=codec,
                        **quality)
    return {"overlays": str(out_dir), "video": str(video), "frames": len(frame_files)}
