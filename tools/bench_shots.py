#!/usr/bin/env python
"""Shot-boundary benchmark: precision/recall of the cuts and detector throughput, vidssl vs PySceneDetect.

    python tools/bench_shots.py --out shots_bench.json      # ~6 min on one core (videos written)
    python tools/bench_shots.py --workdir DIR ...            # keeps (and reuses) the videos in DIR
    python tools/bench_shots.py --no-pyscenedetect --grid size=32,64 --grid k=2,3   # tuning

Datasets (all videos written to a temporary folder, never into the repository):

(a) ``synthetic``: 6 videos from :func:`vidssl.data.synthetic.generate_multishot` (5 shots each, 160x128, camera
    pan 3 px/frame, moving textured objects), H.264 at 25 fps (x264 preset veryfast). In every video the 2nd and 4th
    boundaries are turned into fades through black (6 frames out, 0-3 black frames, 6 frames in; the new shot starts
    after the black), and one single-frame white flash is put inside a shot (a detection there is a false positive).
(b) ``bikes``: ``../shared/data/videos/bikes.mp4`` (new shots at 30, 76, 137, 187, 242) -- held out, never tuned on;
    plus the no-cut controls ``bigbuckbunny.mp4``, ``carphone_*.mp4`` (every detection is a false positive).
(c) ``davis``: the 12 DAVIS-2016 sample sequences concatenated in 3 random orders (4 sequences per video, 854x480
    JPEG frames -> H.264 25 fps, x264 preset veryfast), hard cuts at the joins; ``davis-fade``: the same joins as
    fades through black (8 frames out, 0-3 black, 8 in).

Matching: a detected cut matches a true hard cut within +-``tolerance`` frames (1), a fade anywhere in its span
(first faded frame .. last faded frame + 1); each true cut is matched at most once (nearest detection first).
Precision = matched / detected, recall = matched / true.

Throughput: every video is decoded once (vidssl's reader) into memory; then only the detection is timed, on the same
frames, for both detectors: vidssl ``content`` from the uint8 ``(B, 3, H, W)`` batches (features + decision), and
PySceneDetect's ``ContentDetector`` from the frames as BGR ``(H, W, 3)`` arrays (what its OpenCV backend decodes to;
the RGB->BGR copy is done before the clock starts), downscaled as its SceneManager does. One thread each
(``torch.set_num_threads(1)``; OpenCV ``cv2.setNumThreads(1)``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from vidssl.config import apply_overrides, from_dict, to_dict
from vidssl.data.shot_detect import Boundaries, ContentParams, detect_boundaries
from vidssl.data.shots import PySceneDetectParams, rgb_to_bgr_frames, scenedetect_bgr_cuts
from vidssl.data.synthetic import SynthConfig, generate_multishot
from vidssl.io import atomic_write_text, open_reader, read_image, write_video

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
BIKES_CUTS = [30, 76, 137, 187, 242]
DAVIS_SEQUENCES = ["drift-turn", "tennis", "swing", "hockey", "scooter-gray", "kite-walk", "paragliding",
                   "motocross-bumps", "dog-agility", "rollerblade", "motorbike", "surf"]


# ------------------------------------------------------------------------------------------------- the videos

def fade_join(a: np.ndarray, b: np.ndarray, fade: int, hold: int) -> tuple[np.ndarray, tuple[int, int], int]:
    """``a`` then ``b`` joined by a fade through black: the last ``fade`` frames of ``a`` fade out, ``hold`` black
    frames, the first ``fade`` frames of ``b`` fade in. Returns (frames, span of the fade in the joined video
    (start, end exclusive), first frame of ``b``)."""
    a, b = a.astype(np.float32), b.astype(np.float32)                         # (Ta, H, W, 3), (Tb, H, W, 3)
    ramp = np.linspace(1.0, 0.0, fade + 2)[1:-1, None, None, None]            # (fade, 1, 1, 1) strictly inside
    a[len(a) - fade:] *= ramp
    b[:fade] *= ramp[::-1]
    black = np.zeros((hold, *a.shape[1:]), np.float32)                        # (hold, H, W, 3)
    out = np.concatenate([a, black, b]).round().clip(0, 255).astype(np.uint8)  # (Ta + hold + Tb, H, W, 3)
    return out, (len(a) - fade, len(a) + hold + fade), len(a) + hold


def join(parts: list[np.ndarray], fades: set[int], fade: int, rng: np.random.Generator
         ) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Concatenate shots; join ``i`` (between parts i and i+1) is a fade when ``i in fades``, else a hard cut.
    Returns (frames, truth spans): a hard cut at ``c`` is the span ``(c, c + 1)``, a fade its own span."""
    frames, truth = parts[0], []
    for i, nxt in enumerate(parts[1:]):
        if i in fades:
            start = len(frames) - fade
            joined, (s, e), _ = fade_join(frames[start:], nxt, fade, int(rng.integers(0, 4)))
            frames = np.concatenate([frames[:start], joined])
            truth.append((start + s, start + e))
        else:
            truth.append((len(frames), len(frames) + 1))
            frames = np.concatenate([frames, nxt])
    return frames, truth


def cached(workdir: Path, name: str, make) -> dict:
    """The video ``name`` in ``workdir`` with its truth sidecar, made by ``make(path) -> info`` when missing."""
    path, side = workdir / f"{name}.mp4", workdir / f"{name}.truth.json"
    if path.is_file() and side.is_file():
        info = json.loads(side.read_text())
    else:
        info = make(path)
        atomic_write_text(side, json.dumps(info) + "\n")
    return {**info, "path": str(path), "truth": [tuple(t) for t in info["truth"]]}


def synthetic_videos(workdir: Path, num_videos: int = 6) -> list[dict]:
    cfg = SynthConfig(num_frames=40, height=128, width=160, camera_pan=3.0, seed=13)

    def make(i: int, path: Path) -> dict:
        rng = np.random.default_rng([13, i])
        video = generate_multishot(i, cfg, num_shots=5)
        edges = [0] + video.cuts + [video.num_frames]
        parts = [video.frames[a:b] for a, b in zip(edges[:-1], edges[1:])]
        frames, truth = join(parts, {1, 3}, fade=6, rng=rng)
        shot = int(rng.integers(0, len(parts)))  # a one-frame white flash in the middle of a shot
        starts = [0] + [e for _, e in truth]  # first frame after each cut or fade
        flash = starts[shot] + 9
        frames[flash] = np.clip(frames[flash].astype(np.int16) + 160, 0, 255).astype(np.uint8)
        write_video(path, frames, fps=25, preset="veryfast")
        return {"dataset": "synthetic", "truth": truth, "flash": flash}

    return [cached(workdir, f"synth-{i}", lambda path, i=i: make(i, path)) for i in range(num_videos)]


def davis_videos(workdir: Path, root: Path, orders: int = 3, per_video: int = 4, fade: bool = False) -> list[dict]:
    frames_of: dict[str, np.ndarray] = {}

    def sequence(seq: str) -> np.ndarray:
        if seq not in frames_of:
            files = sorted((root / "JPEGImages" / "480p" / seq).glob("*.jpg"))
            frames_of[seq] = np.stack([read_image(f).permute(1, 2, 0).numpy() for f in files])  # (T, H, W, 3)
        return frames_of[seq]

    def make(seqs: list[str], rng: np.random.Generator, path: Path) -> dict:
        frames, truth = join([sequence(s) for s in seqs], set(range(per_video - 1)) if fade else set(), fade=8,
                             rng=rng)
        write_video(path, frames, fps=25, preset="veryfast")
        return {"dataset": "davis-fade" if fade else "davis", "truth": truth, "sequences": seqs}

    out = []
    rng = np.random.default_rng(2016)
    for o in range(orders):
        order = [DAVIS_SEQUENCES[j] for j in rng.permutation(len(DAVIS_SEQUENCES))]
        for v in range(len(order) // per_video):
            seqs = order[v * per_video:(v + 1) * per_video]
            hold_rng = np.random.default_rng([2016, o, v])
            out.append(cached(workdir, f"davis{'-fade' if fade else ''}-{o}-{v}",
                              lambda path, seqs=seqs, r=hold_rng: make(seqs, r, path)))
    return out


def real_videos() -> list[dict]:
    vids = SHARED / "videos"
    out = [{"dataset": "bikes", "path": str(vids / "bikes.mp4"), "truth": [(c, c + 1) for c in BIKES_CUTS]}]
    for name in ("bigbuckbunny", "carphone_pristine", "carphone_distorted"):
        out.append({"dataset": "no-cut controls", "path": str(vids / f"{name}.mp4"), "truth": []})
    return out


# ---------------------------------------------------------------------------------------------------- scoring

def match(detected: Sequence[int], truth: Sequence[tuple[int, int]], tolerance: int = 1) -> int:
    """How many true cuts are matched (each at most once; each detection used at most once).

    A true hard cut ``(c, c + 1)`` accepts detections in ``[c - tolerance, c + tolerance]``; a fade span ``(s, e)``
    (longer than one frame) accepts ``[s, e]``.
    """
    free = sorted(detected)
    hits = 0
    for s, e in sorted(truth):
        lo, hi = (s - tolerance, s + tolerance) if e - s == 1 else (s, e)
        inside = [d for d in free if lo <= d <= hi]
        if inside:
            centre = s if e - s == 1 else (s + e) / 2
            free.remove(min(inside, key=lambda d: abs(d - centre)))
            hits += 1
    return hits


def decode(path: str) -> tuple[torch.Tensor, float | None]:
    reader = open_reader(path)
    try:
        return reader.get_frames(list(range(reader.num_frames))), reader.fps   # (N, 3, H, W)
    finally:
        reader.close()


def grid_configs(base: ContentParams, grid: Sequence[str]) -> dict[str, ContentParams]:
    """``{"vidssl": base}``, or one config per combination of ``--grid KEY=v1,v2`` values."""
    if not grid:
        return {"vidssl": base}
    axes = []
    for g in grid:
        key, _, values = g.partition("=")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return {"vidssl " + " ".join(combo): from_dict(ContentParams, apply_overrides(to_dict(base), list(combo)),
                                                   prefix="detector") for combo in itertools.product(*axes)}


def margins(found: Boundaries, truth: Sequence[tuple[int, int]], flash: int | None = None) -> dict:
    """How far from the decision the vidssl detector was: distance / adaptive threshold at every true hard cut
    (``cuts``), and its largest value on frames more than 2 frames away from any true cut or fade and not at the
    planted flash (``non_cut``; the flash rule, not the threshold, handles the flash)."""
    ratio = (found.distances / found.thresholds).tolist()                     # (N,)
    away = [True] * len(ratio)
    for s, e in [*truth, *([(flash, flash + 1)] if flash is not None else [])]:
        for i in range(max(s - 2, 0), min(e + 2, len(ratio))):
            away[i] = False
    return {"cuts": [ratio[s] for s, e in truth if e - s == 1],
            "non_cut": max((r for r, a in zip(ratio, away) if a), default=0.0)}


def run_detectors(videos: list[dict], content: dict[str, ContentParams], psd: PySceneDetectParams | None,
                  batch_size: int) -> None:
    """Decode each video once, then time each detector on the same frames (fills ``det``, ``time``)."""
    for v in videos:
        frames, fps = decode(v["path"])
        v["num_frames"] = int(frames.shape[0])
        v["size"] = [int(frames.shape[2]), int(frames.shape[3])]
        v["det"], v["time"] = {}, {}
        v["margin"] = {}
        for name, params in content.items():
            t0 = time.perf_counter()
            found = detect_boundaries(frames.split(batch_size), params)
            v["time"][name] = time.perf_counter() - t0
            v["det"][name] = found.cuts
            v["margin"][name] = margins(found, v["truth"], v.get("flash"))
        if psd is not None:
            bgr = list(rgb_to_bgr_frames(frames.split(batch_size)))          # (H, W, 3) each, before the clock
            t0 = time.perf_counter()
            v["det"]["pyscenedetect"] = scenedetect_bgr_cuts(bgr, psd, fps)
            v["time"]["pyscenedetect"] = time.perf_counter() - t0


def table(videos: list[dict], detectors: list[str]) -> list[dict]:
    rows = []
    for ds in dict.fromkeys(v["dataset"] for v in videos):
        vs = [v for v in videos if v["dataset"] == ds]
        for det in detectors:
            tp = sum(match(v["det"][det], v["truth"]) for v in vs)
            n_det = sum(len(v["det"][det]) for v in vs)
            n_true = sum(len(v["truth"]) for v in vs)
            frames = sum(v["num_frames"] for v in vs)
            secs = sum(v["time"][det] for v in vs)
            cut_r = [r for v in vs if det in v["margin"] for r in v["margin"][det]["cuts"]]
            rows.append({"dataset": ds, "detector": det, "videos": len(vs), "true_cuts": n_true, "detected": n_det,
                         "matched": tp, "precision": tp / n_det if n_det else (1.0 if n_true == 0 else 0.0),
                         "recall": tp / n_true if n_true else None, "false_positives": n_det - tp,
                         "frames": frames, "size_hw": vs[0]["size"], "frames_per_s": frames / secs,
                         "weakest_cut_ratio": min(cut_r) if cut_r else None,
                         "strongest_non_cut_ratio": max((v["margin"][det]["non_cut"] for v in vs
                                                         if det in v["margin"]), default=None)})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| dataset | detector | videos | true cuts | detected | precision | recall | FP | frames/s (size) | "
             "d/thr weakest cut | d/thr max non-cut |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def num(x: float | None, fmt: str = ".2f") -> str:
        return "-" if x is None else format(x, fmt)

    for r in rows:
        lines.append(f"| {r['dataset']} | {r['detector']} | {r['videos']} | {r['true_cuts']} | {r['detected']} | "
                     f"{r['precision']:.3f} | {num(r['recall'], '.3f')} | {r['false_positives']} | "
                     f"{r['frames_per_s']:.0f} ({r['size_hw'][0]}x{r['size_hw'][1]}) | "
                     f"{num(r['weakest_cut_ratio'])} | {num(r['strongest_non_cut_ratio'])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="content-detector parameter")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="tuning: run the vidssl detector for every combination of these values (repeatable)")
    p.add_argument("--datasets", default="synthetic,davis,davis-fade,bikes",
                   help="comma-separated subset of synthetic, davis, davis-fade, bikes")
    p.add_argument("--no-pyscenedetect", action="store_true", help="only the vidssl detector")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workdir", help="keep the generated videos here (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    content = from_dict(ContentParams, apply_overrides(to_dict(ContentParams()), args.set), prefix="detector")
    psd = None
    if not args.no_pyscenedetect:
        try:
            import cv2
            import scenedetect

            cv2.setNumThreads(1)
            psd = PySceneDetectParams()
            print(f"PySceneDetect {scenedetect.__version__}, OpenCV {cv2.__version__}", flush=True)
        except ImportError as exc:
            print(f"PySceneDetect not installed ({exc}); vidssl only", flush=True)
    wanted = args.datasets.split(",")
    with tempfile.TemporaryDirectory(prefix="bench_shots_") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        videos = []
        if "synthetic" in wanted:
            videos += synthetic_videos(work)
        if "davis" in wanted:
            videos += davis_videos(work, SHARED / "davis2016-sample")
        if "davis-fade" in wanted:
            videos += davis_videos(work, SHARED / "davis2016-sample", fade=True)
        if "bikes" in wanted:
            videos += real_videos()
        print(f"{len(videos)} videos ready in {time.time() - t0:.1f} s", flush=True)
        configs = grid_configs(content, args.grid)
        run_detectors(videos, configs, psd, args.batch_size)
    detectors = list(configs) + (["pyscenedetect"] if psd is not None else [])
    rows = table(videos, detectors)
    print(format_rows(rows))
    print("d/thr: the vidssl detector's distance over its adaptive threshold (> 1 fires) at the true hard cuts and "
          "at most on frames > 2 away from any true boundary")
    for v in videos:
        misses = {d: v["det"][d] for d in detectors if match(v["det"][d], v["truth"]) != len(v["truth"])
                  or len(v["det"][d]) != len(v["truth"])}
        if misses:
            print(f"  {Path(v['path']).name}: truth {v['truth']}; " + "; ".join(f"{d} {c}" for d, c in misses.items()))
    if args.out:
        result = {"command": "python tools/bench_shots.py " + " ".join(sys.argv[1:]), "content_params":
                  to_dict(content), "pyscenedetect_params": to_dict(psd) if psd else None, "rows": rows,
                  "videos": [{k: v[k] for k in ("dataset", "path", "truth", "num_frames", "det", "time", "margin")}
                             for v in videos], "torch_threads": torch.get_num_threads()}
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
