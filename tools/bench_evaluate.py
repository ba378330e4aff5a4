"""Time the vectorised DAVIS evaluator against the straightforward per-frame reference on the same folders.

Two workloads, each run by both implementations in this one process (same inputs, same machine state):

1. ``synthetic``: a DAVIS-like tree made in a temp dir (854x480, 1-3 moving ellipses per sequence, palette PNGs)
   scored against perturbed copies of itself.
2. ``davis2016-sample``: ``../shared/data/davis2016-sample`` (or ``$VIDSSL_DAVIS_ROOT``) scored with ``year=2016``
   against the GT shifted by a few pixels (written to a temp dir), when present.

For each: end-to-end ``evaluate_results`` seconds (PNG decoding included, identical for both) and metric-only
seconds (masks preloaded, :func:`vidssl.evaluation.evaluate.score_sequence`), the speed-up ratios, and an assertion
that every per-frame J/F array and the global row are identical. When ``cv2`` and ``skimage`` are importable a third
metric-only column times an upstream-style per-frame implementation (``cv2.dilate`` with ``skimage`` disks).

Usage: ``python tools/bench_evaluate.py [--quick] [--no-real] [--davis-root PATH]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vidssl.data.davis import load_annotations, read_sequence_list
from vidssl.evaluation import metrics as M
from vidssl.evaluation import metrics_reference as R
from vidssl.evaluation.evaluate import (
    GLOBAL_COLUMNS,
    EvalResult,
    evaluate_results,
    read_result_masks,
    score_sequence,
)
from vidssl.io.images import write_label_png


def make_synthetic_tree(root: Path, *, num_seqs: int, num_frames: int, size: tuple[int, int], seed: int) -> None:
    """DAVIS-like GT (``Annotations/480p``, ``ImageSets/2017/bench.txt``) with 1-3 moving ellipses per sequence."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    names = []
    for s in range(num_seqs):
        name = f"synth-{s:02d}"
        names.append(name)
        k = int(rng.integers(1, 4))
        centre = rng.uniform([0.25 * h, 0.2 * w], [0.75 * h, 0.8 * w], size=(k, 2))
        radii = rng.uniform([0.08 * h, 0.06 * w], [0.25 * h, 0.2 * w], size=(k, 2))
        vel = rng.uniform(-3, 3, size=(k, 2))
        for t in range(num_frames):
            ids = np.zeros((h, w), np.uint8)
            for o in range(k):
                cy, cx = centre[o] + t * vel[o]
                ry, rx = radii[o] * (1 + 0.1 * np.sin(t / 5 + o))
                ids[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = o + 1
            write_label_png(root / "Annotations" / "480p" / name / f"{t:05d}.png", ids)
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / "bench.txt").write_text("".join(n + "\n" for n in names))


def _shift(ids: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate ``(H, W)`` ids by (dy, dx) with zero fill (no wrap-around)."""
    out = np.zeros_like(ids)
    h, w = ids.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = ids[max(-dy, 0):h - max(dy, 0),
                                                                     max(-dx, 0):w - max(dx, 0)]
    return out


def write_predictions(davis_root: Path, out: Path, seqs: list[str], *, year: str, seed: int) -> None:
    """Shifted GT (a few px, varying per frame) with a few erased blocks, as palette PNGs named like the GT."""
    rng = np.random.default_rng(seed)
    for s in seqs:
        gt = load_annotations(davis_root, s, year=year)
        for t, (stem, ids) in enumerate(zip(gt.stems, gt.ids, strict=True)):
            pred = _shift(ids, int(rng.integers(-4, 5)), int(rng.integers(-6, 7)))
            if t % 3 == 0:
                y, x = int(rng.integers(0, ids.shape[0] - 40)), int(rng.integers(0, ids.shape[1] - 40))
                pred[y:y + 40, x:x + 40] = 0
            write_label_png(out / s / f"{stem}.png", pred)


def _official_style_f(gt: np.ndarray, pred: np.ndarray, cv2, disk) -> np.ndarray:
    """Upstream-style per-frame F: cv2.dilate with a skimage disk (for timing and an extra equality check)."""
    se = disk(M.bound_pix(gt.shape[1], gt.shape[2])).astype(np.uint8)
    out = np.zeros(len(gt))
    for t in range(len(gt)):
        fg_b, gt_b = R.boundary_frame(pred[t]), R.boundary_frame(gt[t])
        fg_dil = cv2.dilate(fg_b.astype(np.uint8), se) > 0
        gt_dil = cv2.dilate(gt_b.astype(np.uint8), se) > 0
        n_fg, n_gt = int(fg_b.sum()), int(gt_b.sum())
        if n_fg == 0 or n_gt == 0:  # (P, R) = (1, 0), (0, 1) or (1, 1)
            p, rc = (1.0 if n_fg == 0 else 0.0), (1.0 if n_gt == 0 else 0.0)
        else:
            p = int(np.sum(fg_b & gt_dil)) / n_fg
            rc = int(np.sum(gt_b & fg_dil)) / n_gt
        out[t] = 0.0 if p + rc == 0 else 2 * p * rc / (p + rc)
    return out


def _assert_equal(a: EvalResult, b: EvalResult) -> None:
    assert list(a.per_object) == list(b.per_object)
    for key, rec in a.per_object.items():
        assert np.array_equal(rec["J"], b.per_object[key]["J"]), key
        assert np.array_equal(rec["F"], b.per_object[key]["F"]), key
    for c in GLOBAL_COLUMNS:
        assert abs(a.global_row[c] - b.global_row[c]) <= 1e-12, c


def bench(name: str, davis_root: Path, results: Path, *, year: str, split: str, seqs: list[str] | None) -> None:
    kw = dict(year=year, split=split, sequences=seqs, progress=False)
    t0 = time.perf_counter()
    fast = evaluate_results(davis_root, results, **kw)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = evaluate_results(davis_root, results, implementation="reference", **kw)
    t_ref = time.perf_counter() - t0
    _assert_equal(fast, ref)

    # metric-only: masks preloaded once, then scored by each implementation
    names = read_sequence_list(davis_root, year=year, split=split, sequences=seqs)
    loaded = []
    for s in names:
        gt = load_annotations(davis_root, s, year=year)
        pred = read_result_masks(results, s, gt.stems[1:-1], size=gt.size, num_objects=gt.num_objects, year=year)
        loaded.append((gt.ids[1:-1], pred, gt.num_objects))
    timings = {}
    outputs = {}
    for impl in ("vectorised", "reference"):
        t0 = time.perf_counter()
        outputs[impl] = [score_sequence(g, p, num_objects=k, implementation=impl) for g, p, k in loaded]
        timings[impl] = time.perf_counter() - t0
    for (jf, ff), (jr, fr) in zip(outputs["vectorised"], outputs["reference"], strict=True):
        assert np.array_equal(jf, jr) and np.array_equal(ff, fr)
    cv_line = ""
    try:
        import cv2
        from skimage.morphology import disk
    except ImportError:
        cv2 = None
    if cv2 is not None:
        t0 = time.perf_counter()
        for (g, p, k), (_, ff) in zip(loaded, outputs["vectorised"], strict=True):
            for o in range(1, k + 1):
                gm, pm = g == o, p == o
                R.db_eval_iou(gm, pm)
                f_cv = _official_style_f(gm, pm, cv2, disk)
                assert np.array_equal(f_cv, ff[o - 1])
        t_cv = time.perf_counter() - t0
        cv_line = (f"\n  metric-only, upstream-style cv2.dilate per frame: {t_cv:7.2f} s  "
                   f"(vectorised is {t_cv / timings['vectorised']:.1f}x faster; identical F)")
    frames = fast.num_scored_frames
    print(f"[{name}] {len(names)} sequences, {len(fast.per_object)} objects, {frames} scored frames, "
          f"J&F-Mean {fast.global_row['J&F-Mean']:.6f}\n"
          f"  end-to-end evaluate_results: vectorised {t_fast:7.2f} s, reference {t_ref:7.2f} s "
          f"-> {t_ref / t_fast:.1f}x\n"
          f"  metric-only (masks preloaded): vectorised {timings['vectorised']:7.2f} s "
          f"({1e3 * timings['vectorised'] / frames:.2f} ms/frame), reference {timings['reference']:7.2f} s "
          f"-> {timings['reference'] / timings['vectorised']:.1f}x{cv_line}\n"
          f"  per-frame J/F arrays and global row identical: yes")


def _default_sample_root() -> Path | None:
    env = os.environ.get("VIDSSL_DAVIS_ROOT")
    candidates = ([Path(env) / "davis2016-sample", Path(env)] if env else []) + [
        Path(__file__).resolve().parents[2] / "shared" / "data" / "davis2016-sample"]
    return next((c for c in candidates if (c / "Annotations" / "480p").is_dir()), None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller workloads (3 synthetic / 3 real sequences)")
    ap.add_argument("--no-real", action="store_true", help="skip the davis2016-sample workload")
    ap.add_argument("--davis-root", type=Path, default=None, help="davis2016-sample root (default: auto)")
    args = ap.parse_args(argv)
    print(f"numpy {np.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="vidssl-bench-") as tmp:
        tmp = Path(tmp)
        n_seq = 3 if args.quick else 6
        make_synthetic_tree(tmp / "synth", num_seqs=n_seq, num_frames=40, size=(480, 854), seed=0)
        seqs = read_sequence_list(tmp / "synth", year="2017", split="bench")
        write_predictions(tmp / "synth", tmp / "synth-res", seqs, year="2017", seed=1)
        bench("synthetic", tmp / "synth", tmp / "synth-res", year="2017", split="bench", seqs=None)
        root = None if args.no_real else (args.davis_root or _default_sample_root())
        if root is not None:
            real = read_sequence_list(root, year="2016", split="sample")
            if args.quick:
                real = ["dog-agility", "rollerblade", "motorbike"]
            write_predictions(root, tmp / "real-res", real, year="2016", seed=2)
            bench("davis2016-sample", root, tmp / "real-res", year="2016", split="sample", seqs=real)
        elif not args.no_real:
            print("[davis2016-sample] not found: skipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
