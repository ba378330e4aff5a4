"""Labelled images as a data stream: a folder with one subfolder per class (torchvision ``ImageFolder`` layout).

Items are 1-frame clips so the clip transforms and the collate apply unchanged: ``{"video": float32 (1, 3, S, S),
"label": int, "index": int, "frames": int64 (1,), "skipped": 0, "video_index": int}``. Classes are the sorted
subfolder names; ``classes`` and ``class_to_idx`` are kept on the dataset.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from vidssl.data.datasets import item_generator
from vidssl.data.transforms import ClipTransform
from vidssl.io.images import read_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def scan_image_folder(root: str | os.PathLike, *, min_classes: int = 1) -> tuple[list[tuple[Path, int]], list[str]]:
    """``([(image path, class index)], class names)`` of ``root/<class>/<image>``; errors name the path.

    An empty class folder is an error (a silently missing class changes every label after it), and so is a root
    with fewer than ``min_classes`` classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found (expected one subfolder per class)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < min_classes:
        raise ValueError(f"{root}: {len(classes)} class folder(s), at least {min_classes} needed "
                         "(expected root/<class>/<image>)")
    samples = []
    for i, name in enumerate(classes):
        files = sorted(f for f in (root / name).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{root / name}: empty class folder (no {'/'.join(IMAGE_SUFFIXES)} images)")
        samples += [(f, i) for f in files]
    return samples, classes


class ImageFolderDataset(Dataset):
    """Images with class labels as 1-frame clips (see the module docstring).

    Args:
        root: folder with one subfolder per class.
        transform: the clip transform (random resized crop, flip, jitter, normalisation), or ``None`` for the
            decoded ``uint8 (1, 3, H, W)``.
        seed: base seed of the per-item generators (same scheme as :class:`~vidssl.data.ClipDataset`).
    """

    def __init__(self, root: str | os.PathLike, *, transform: ClipTransform | None = None, seed: int = 0) -> None:
        self.root = Path(root)
        self.samples, self.classes = scan_image_folder(self.root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        path, label = self.samples[index]
        image = read_image(path)[None]  # 1 3 H W uint8
        if self.transform is not None:
            g = item_generator(self.seed, self.epoch, index)
            _, _, h, w = image.shape
            image = self.transform.apply(image, self.transform.sample_params(1, h, w, generator=g))
        return {"video": image, "label": label, "index": index, "frames": torch.zeros(1, dtype=torch.int64),
                "skipped": 0, "video_index": index}


__all__ = ["IMAGE_SUFFIXES", "ImageFolderDataset", "scan_image_folder"]
