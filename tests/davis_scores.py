"""An independent check of the DAVIS region score the runner reports, shared by the propagation end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vidssl.data.davis import load_annotations


def rescored_j_mean(root: Path, results: Path, sequences: list[str], *, year: str = "2017") -> float:
    """J-Mean of the result PNGs recomputed from scratch: per object, the IoU with the ground truth (void pixels
    excluded, an empty union counting 1) averaged over frames 1 .. T-2 (DAVIS scores neither the first nor the last
    frame), then averaged over all objects of all sequences."""
    per_object = []
    for seq in sequences:
        gt = load_annotations(root, seq, year=year)
        pred = np.stack([np.array(Image.open(results / seq / p.name)) for p in gt.paths])
        for k in range(1, gt.num_objects + 1):
            scores = []
            for t in range(1, gt.num_frames - 1):
                g, p, keep = gt.ids[t] == k, pred[t] == k, ~gt.void[t]
                union = ((g | p) & keep).sum()
                scores.append(1.0 if union == 0 else ((g & p) & keep).sum() / union)
            per_object.append(np.mean(scores))
    return float(np.mean(per_object))
