"""Object motion statistics of DAVIS annotations and of the synthetic generator, side by side.

Two per-frame statistics of every annotated object, over consecutive frame pairs ``(t, t+1)`` where the object is
visible in both frames:

* ``disp``: displacement of the visible mask's centroid, as a fraction of the frame diagonal (so it transfers
  between resolutions: at 96x96 one percent of the diagonal is 1.36 px, at 854x480 9.8 px);
* ``iou``: intersection over union of the object's mask in frame ``t`` and frame ``t+1`` (no motion compensation),
  which falls with motion, deformation, scaling and occlusion.

For each source it prints the 10th, 50th and 90th percentiles of both over all pairs (``--json`` prints them as JSON).

    python tools/davis_motion_stats.py                          # DAVIS-2016 sample vs the demo recipe's generator
    python tools/davis_motion_stats.py --json
    python tools/davis_motion_stats.py --config configs/mast_sample.yaml   # another recipe's synth settings

DAVIS masks are read from ``<davis-root>/Annotations/480p/<seq>/*.png``; any non-zero value is the (single) object
in DAVIS-2016 binary masks, and each palette index its own object in DAVIS-2017 masks (``--per-id``).
The synthetic side uses the recipe's ``data.synth_*`` settings (frames, size, seed) through the same
:class:`vidssl.data.synthetic.SynthConfig` the loader builds, and both splits of its video indices.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PERCENTILES = (10, 50, 90)


def pair_stats(masks: np.ndarray, ids: list[int]) -> tuple[list[float], list[float]]:
    """Centroid displacements (fraction of the diagonal) and IoUs of consecutive frames.

    Args:
        masks: ``(T, H, W)`` integer labels.
        ids: object labels to follow (each separately).
    Returns:
        ``(disp, iou)``: one value per (object, pair) where the object is visible in both frames.
    """
    T, H, W = masks.shape  # (T, H, W)
    diag = float(np.hypot(H, W))
    ys, xs = np.mgrid[0:H, 0:W]  # (H, W) each
    disp: list[float] = []
    iou: list[float] = []
    for k in ids:
        obj = masks == k  # (T, H, W) bool
        area = obj.sum(axis=(1, 2))  # (T,)
        cx = (obj * xs).sum(axis=(1, 2)) / np.maximum(area, 1)  # (T,)
        cy = (obj * ys).sum(axis=(1, 2)) / np.maximum(area, 1)  # (T,)
        for t in range(T - 1):
            if area[t] == 0 or area[t + 1] == 0:
                continue
            disp.append(float(np.hypot(cx[t + 1] - cx[t], cy[t + 1] - cy[t]) / diag))
            inter = np.logical_and(obj[t], obj[t + 1]).sum()
            union = np.logical_or(obj[t], obj[t + 1]).sum()
            iou.append(float(inter / union))
    return disp, iou


def summarize(disp: list[float], iou: list[float]) -> dict:
    """Percentiles (``PERCENTILES``) of both statistics and the number of pairs."""
    if not disp:
        raise ValueError("no object is visible in two consecutive frames; nothing to measure")
    return {"pairs": len(disp),
            "disp": {f"p{p}": float(np.percentile(disp, p)) for p in PERCENTILES},
            "iou": {f"p{p}": float(np.percentile(iou, p)) for p in PERCENTILES}}


def davis_stats(root: Path, sequences: list[str] | None = None, per_id: bool = False) -> dict:
    """Statistics over the annotated sequences under ``root/Annotations/480p``."""
    ann = root / "Annotations" / "480p"
    if not ann.is_dir():
        raise FileNotFoundError(f"--davis-root: {ann} is not a folder; expected DAVIS Annotations/480p/<sequence>/")
    seqs = sequences or sorted(p.name for p in ann.iterdir() if p.is_dir())
    disp: list[float] = []
    iou: list[float] = []
    per_seq = {}
    for seq in seqs:
        files = sorted((ann / seq).glob("*.png"))
        if len(files) < 2:
            raise FileNotFoundError(f"{ann / seq}: fewer than 2 mask PNGs; expected one per frame")
        masks = np.stack([np.asarray(Image.open(f)) for f in files])  # (T, H, W)
        if masks.ndim == 4:
            masks = masks[..., 0]  # (T, H, W): an RGB-saved binary mask
        if per_id:
            ids = sorted(int(v) for v in np.unique(masks) if 0 < v < 255)
        else:
            masks = (masks > 0).astype(np.uint8)  # (T, H, W)
            ids = [1]
        d, i = pair_stats(masks, ids)
        per_seq[seq] = {"disp_p50": float(np.median(d)), "iou_p50": float(np.median(i)), "pairs": len(d)}
        disp += d
        iou += i
    return {**summarize(disp, iou), "sequences": per_seq}


def synthetic_stats(synth_cfg, num_videos: int) -> dict:
    """Statistics over videos ``0..num_videos-1`` of ``synth_cfg`` (every object id separately)."""
    from vidssl.data.synthetic import generate_video

    disp: list[float] = []
    iou: list[float] = []
    for index in range(num_videos):
        video = generate_video(index, synth_cfg)
        d, i = pair_stats(video.masks, list(range(1, video.num_objects + 1)))
        disp += d
        iou += i
    return summarize(disp, iou)


def recipe_synth_config(config: str | None):
    """The :class:`SynthConfig` the loader builds for a recipe's ``data:`` (``None``: the demo recipe, the one
    ``vidssl pretrain`` runs without arguments) and a video count covering both splits' generator indices."""
    from vidssl.data.loader import synth_counts
    from vidssl.data.synthetic import SynthConfig
    from vidssl.cli import DEMO_CONFIG, find_config
    from vidssl.engine import resolve_run_config

    cfg = resolve_run_config(find_config(config or DEMO_CONFIG), [])
    d = cfg.data
    if d.source != "synthetic":
        raise ValueError(f"--config: data.source is {d.source!r}; expected synthetic")
    num_train, num_val = synth_counts(d)
    return SynthConfig(num_frames=d.synth_frames, height=d.synth_size[0], width=d.synth_size[1],
                       seed=d.synth_seed), 2 * max(num_train, num_val)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--davis-root", default="../shared/data/davis2016-sample")
    ap.add_argument("--sequences", default=None, help="comma-separated (default: every annotated sequence)")
    ap.add_argument("--per-id", action="store_true", help="DAVIS-2017 masks: follow each palette index separately")
    ap.add_argument("--config", default=None, help="recipe whose data.synth_* settings to measure (default: the demo)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)

    davis = davis_stats(Path(args.davis_root), args.sequences.split(",") if args.sequences else None, args.per_id)
    scfg, n = recipe_synth_config(args.config)
    synth = synthetic_stats(scfg, n)
    out = {"davis": davis, "synthetic": {**synth, "config": {"num_frames": scfg.num_frames, "height": scfg.height,
                                                             "width": scfg.width, "seed": scfg.seed, "videos": n}}}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'source':28s} {'pairs':>6s}  centroid disp (% of diagonal) p10/p50/p90   IoU(t,t+1) p10/p50/p90")
    rows = [(f"DAVIS {args.davis_root}", davis)] + [(f"synthetic {scfg.height}x{scfg.width}x{scfg.num_frames}", synth)]
    for label, s in rows:
        d, i = s["disp"], s["iou"]
        print(f"{label[-28:]:28s} {s['pairs']:6d}  {100 * d['p10']:8.2f} {100 * d['p50']:6.2f} {100 * d['p90']:6.2f}"
              f"                     {i['p10']:6.3f} {i['p50']:6.3f} {i['p90']:6.3f}")
    print("per DAVIS sequence (median disp %, median IoU):")
    for seq, s in davis["sequences"].items():
        print(f"  {seq:18s} {100 * s['disp_p50']:6.2f} {s['iou_p50']:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
