"""Benchmark label propagation at 480p: stride-8 ResNet-18 features, CRW preset, sparse vs dense reference.

Reports, for the same frames and first-frame mask:

* feature extraction seconds per frame;
* propagation seconds per target frame and peak memory of the memory-bounded (sparse/windowed) core and of the
  dense reference (full ``(h*w) x (N*h*w)`` affinity with an additive -inf mask);
* the affinity step's achieved FLOP/s (matmul FLOPs actually computed by the windowed core, and the "useful" FLOPs
  of the window entries only) as a share of this machine's matmul throughput, measured in the same run;
* the speed-up of sparse over dense and whether the final masks (upsampled to 480p, argmax) are identical.

Frames: the first ``--frames`` frames of a DAVIS sequence when ``--davis-root`` (default: ``$VIDSSL_DAVIS_ROOT`` or
``../shared/data/davis2016-sample``) exists, else synthetic 854x480 frames with a moving textured square.

Peak memory: CPU = peak resident set size of this process during the step (Linux ``VmHWM``, reset before each step
through ``/proc/self/clear_refs``), GPU = ``torch.cuda.max_memory_allocated``.

``--cli-compare`` (issue #15) instead times the real command, ``vidssl propagate --device D --preset P`` (random-init
``resnet18`` for crw, ``mast_resnet18`` for mast), for every preset and device in one run, on one 480p sequence
(``--davis-root``, else a synthetic 854x480 DAVIS-layout sequence generated with ``--frames`` frames): seconds per
frame and peak memory from each run's metrics.json, whether the CUDA masks equal the CPU masks (pixel agreement), and
the time of one full DAVIS-2017 val pass (30 sequences, 1,999 frames) at the measured rate.

Examples::

    .venv/bin/python tools/bench_propagate.py                 # CPU, 6 frames (~3 minutes on 2 cores)
    .venv/bin/python tools/bench_propagate.py --device cuda --frames 20 --chunk-size 8192
    python tools/bench_propagate.py --cli-compare --devices cpu,cuda --presets crw,mast --frames 8
    python tools/bench_propagate.py --cli-compare --devices cpu --presets crw --frames 3 --size 64x96  # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

#: DAVIS-2017 val: 30 sequences, 1,999 frames (the first frame of each is given, not propagated).
DAVIS17_VAL = {"sequences": 30, "frames": 1999}


def _default_root() -> Path | None:
    env = os.environ.get("VIDSSL_DAVIS_ROOT")
    cand = Path(env) if env else Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "davis2016-sample"
    return cand if (cand / "JPEGImages" / "480p").is_dir() else None


def load_frames(root: Path | None, seq: str, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(frames uint8 (n, 3, 480, W), first ids (480, W) int64, description)``."""
    if root is not None:
        from vidssl.data.davis import frame_paths, load_annotations
        from vidssl.io.images import read_image

        paths = frame_paths(root, seq)[:n]
        frames = torch.stack([read_image(p) for p in paths])
        year = "2016" if (root / "ImageSets" / "2016").is_dir() else "2017"
        ids = load_annotations(root, seq, year=year, first_only=True).ids[0]
        return frames, torch.from_numpy(ids.astype(np.int64)), f"{root}/{seq} (first {len(paths)} frames)"
    g = torch.Generator().manual_seed(0)
    h, w = 480, 854
    base = (torch.rand(3, h // 8, w // 8, generator=g) * 255)
    base = F.interpolate(base[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    tex = torch.rand(3, 120, 120, generator=g) * 255
    frames, ids0 = [], None
    for t in range(n):
        img = base.clone()
        y0, x0 = 150 + 4 * t, 200 + 10 * t
        img[:, y0:y0 + 120, x0:x0 + 120] = tex
        frames.append(img.round().clamp(0, 255).to(torch.uint8))
        if t == 0:
            ids0 = torch.zeros(h, w, dtype=torch.int64)
            ids0[y0:y0 + 120, x0:x0 + 120] = 1
    return torch.stack(frames), ids0, f"synthetic {w}x{h} moving square ({n} frames)"


class PeakMemory:
    """Peak memory of a block (see module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.scope = "cuda max_memory_allocated"
        else:
            self.scope = "process peak RSS (since start)"
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")
                self.scope = "process peak RSS (reset before the step)"
            self.base = _rss("VmRSS:")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _rss("VmHWM:")


def _rss(field: str) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def matmul_throughput(device: torch.device, dtype: torch.dtype, *, seconds: float = 2.0) -> dict[str, float]:
    """FLOP/s of large matmuls on this machine: a square 2048^3 and the affinity-like (4096x256)@(256x4096)."""
    out = {}
    for name, (m, k, n) in {"square_2048": (2048, 2048, 2048), "affinity_like": (4096, 256, 4096)}.items():
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        for _ in range(2):
            a @ b
        _sync(device)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            a @ b
            reps += 1
            if device.type == "cuda" and reps % 10:
                continue
            _sync(device)
        _sync(device)
        out[name] = 2 * m * k * n * reps / (time.perf_counter() - t0)
    out["best"] = max(out.values())
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cli_compare(args) -> dict:
    """``vidssl propagate`` for every preset x device on one sequence; timings, peak memory, mask equality."""
    import subprocess

    from PIL import Image

    repo = Path(__file__).resolve().parents[1]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    root = args.davis_root or (None if args.synthetic else _default_root())
    if root is None:
        from vidssl.data.synthetic import SynthConfig, write_davis

        h, w = (int(v) for v in args.size.lower().split("x"))
        root = write_davis(work / f"davis-synth-{h}x{w}-{args.frames}", SynthConfig(num_frames=args.frames, height=h,
                                                                                     width=w), num_train=1, num_val=1)
        year, sequences = "2017", None
    else:
        year = "2016" if (Path(root) / "ImageSets" / "2016").is_dir() else "2017"
        sequences = args.sequence
    report: dict = {"davis_root": str(root), "runs": {}, "masks": {}}
    encoders = {"crw": "resnet18", "mast": "mast_resnet18", "corrflow": "mast_resnet18", "dino": "resnet18"}
    for preset in args.presets.split(","):
        outs = {}
        for dev in args.devices.split(","):
            if dev.startswith("cuda") and not torch.cuda.is_available():
                report["runs"][f"{preset}-{dev}"] = {"skipped": "no CUDA GPU visible"}
                continue
            out = work / f"prop-{preset}-{dev.replace(':', '')}"
            cmd = [sys.executable, "-m", "vidssl", "propagate", "--encoder", encoders[preset], "--seed", "0",
                   "--davis-root", str(root), "--year", year, "--out", str(out), "--preset", preset, "--device", dev,
                   "--no-eval", "--force"]
            if sequences:
                cmd += ["--sequences", sequences]
            else:
                cmd += ["--split", "val"]
            env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            key = f"{preset}-{dev}"
            if proc.returncode:
                report["runs"][key] = {"error": (proc.stderr or proc.stdout)[-800:]}
                print(f"{key}: failed: {report['runs'][key]['error'][-300:]}", flush=True)
                continue
            metrics = json.loads((out / "metrics.json").read_text())
            seqs = list(metrics["per_sequence"].values())
            spf = float(np.mean([q["seconds_per_frame"] for q in seqs]))
            peak = max(int(q["peak_memory_bytes"]) for q in seqs)
            per_pass = spf * (DAVIS17_VAL["frames"] - DAVIS17_VAL["sequences"])
            report["runs"][key] = {"seconds_per_frame": round(spf, 4), "peak_memory_bytes": peak,
                                   "peak_memory_scope": seqs[0].get("peak_memory_scope"),
                                   "davis17_val_pass_minutes": round(per_pass / 60, 1),
                                   "wall_s": round(time.perf_counter() - t0, 1)}
            print(f"{key}: {spf:.3f} s/frame, peak {peak / 2**20:.0f} MiB ({seqs[0].get('peak_memory_scope')}); "
                  f"one DAVIS-2017 val pass ~{per_pass / 60:.1f} min", flush=True)
            outs[dev] = out
        if "cpu" in outs and len(outs) > 1:
            ref = sorted(p.relative_to(outs["cpu"]) for p in outs["cpu"].rglob("*.png"))
            for dev, out in outs.items():
                if dev == "cpu":
                    continue
                same = total = differ = 0
                for rel in ref:
                    a = np.asarray(Image.open(outs["cpu"] / rel))
                    b = np.asarray(Image.open(out / rel))
                    same += int((a == b).sum())
                    total += a.size
                    differ += int((a != b).any())
                report["masks"][f"{preset}-{dev}"] = {"pngs": len(ref), "pngs_differing": differ,
                                                      "pixel_agreement": same / max(1, total),
                                                      "identical": differ == 0}
                print(f"{preset}: masks on {dev} vs cpu: {len(ref) - differ}/{len(ref)} PNGs identical, pixel "
                      f"agreement {same / max(1, total):.6%}", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=6, help="frames to propagate (first one is the GT)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--davis-root", type=Path, default=None, help="DAVIS root with JPEGImages/480p (default: sample)")
    ap.add_argument("--sequence", default="dog-agility")
    ap.add_argument("--synthetic", action="store_true", help="use synthetic frames even if DAVIS data exists")
    ap.add_argument("--chunk-size", type=int, default=None, help="queries per chunk (default: preset)")
    ap.add_argument("--tile", type=int, default=None, help="query tile side (default: preset)")
    ap.add_argument("--bf16", action="store_true", help="bf16 affinities (top-k/softmax stay fp32)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense reference")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--cli-compare", action="store_true", help="time `vidssl propagate` per preset and device")
    ap.add_argument("--presets", default="crw,mast", help="--cli-compare: presets")
    ap.add_argument("--devices", default="cpu,cuda", help="--cli-compare: devices (cpu first: the reference masks)")
    ap.add_argument("--size", default="480x854", help="--cli-compare: HxW of the synthetic sequence")
    ap.add_argument("--workdir", default="/tmp/vidssl_bench_propagate", help="--cli-compare: results folder")
    args = ap.parse_args(argv)
    if args.cli_compare:
        report = cli_compare(args)
        if args.json:
            from vidssl.io.atomic import atomic_write_text

            atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        return 0

    from vidssl.evaluation.features import build_encoder_features
    from vidssl.evaluation.presets import get_preset
    from vidssl.evaluation.propagation import propagate_video, window_offsets
    from vidssl.evaluation.runner import downsample_labels, labels_to_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base = get_preset("crw")
    cfg = dataclasses.replace(base, device=str(device), chunk_size=args.chunk_size or base.chunk_size,
                              tile=args.tile or base.tile, bf16=bool(args.bf16))
    root = None if args.synthetic else (args.davis_root or _default_root())
    frames, ids0, source = load_frames(root, args.sequence, args.frames)
    n, _, height, width = frames.shape
    report: dict = {"source": source, "device": str(device), "frames": int(n), "size": [int(height), int(width)],
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "preset": "crw",
                    "chunk_size": cfg.chunk_size, "tile": cfg.tile, "bf16": cfg.bf16}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    print(f"bench_propagate: {source}, device {device}, {torch.get_num_threads()} threads", flush=True)

    ext = build_encoder_features("resnet18", seed=0, cfg=cfg)
    ext(frames[:1])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    feats = torch.cat([ext(frames[i:i + cfg.feature_batch]) for i in range(0, n, cfg.feature_batch)])
    _sync(device)
    t_feat = (time.perf_counter() - t0) / n
    feats = F.normalize(feats, p=2, dim=1)
    h, w = feats.shape[-2:]
    labels0 = downsample_labels(ids0, num_classes=int(ids0.max()) + 1, size=(h, w), mode=cfg.label_down).to(device)
    report["feature_seconds_per_frame"] = round(t_feat, 4)
    report["feature_size"] = [int(h), int(w)]
    print(f"features: resnet18 layer3 stride 8 -> {tuple(feats.shape)}; {t_feat:.3f} s/frame", flush=True)

    mm = matmul_throughput(device, torch.bfloat16 if cfg.bf16 else torch.float32)
    report["matmul_flops"] = {k: round(v / 1e9, 2) for k, v in mm.items()}
    print(f"matmul throughput: {mm['best'] / 1e9:.1f} GFLOP/s (square {mm['square_2048'] / 1e9:.1f}, "
          f"affinity-like {mm['affinity_like'] / 1e9:.1f})", flush=True)

    kw = cfg.propagation_kwargs()
    # Sparse, memory-bounded core.
    stats: dict = {}
    with PeakMemory(device) as mem_s:
        t0 = time.perf_counter()
        sparse = propagate_video(feats, labels0, stats=stats, **kw)
        _sync(device)
        t_sparse = (time.perf_counter() - t0) / max(1, n - 1)
    n_off = window_offsets(radius=cfg.radius, shape=cfg.restrict_shape).shape[0]
    # CRW context: frame 0 unrestricted (h*w keys) + `context` restricted frames (n_off window keys each).
    useful = (n - 1) * 2 * h * w * feats.shape[1] * (h * w + cfg.context * n_off)
    aff_rate = stats["affinity_flop"] / stats["affinity_s"]
    report["sparse"] = {
        "seconds_per_frame": round(t_sparse, 4), "peak_memory_bytes": int(mem_s.peak),
        "memory_scope": mem_s.scope, "affinity_seconds": round(stats["affinity_s"], 3),
        "select_seconds": round(stats["select_s"], 3),
        "affinity_gflops_computed": round(aff_rate / 1e9, 2),
        "affinity_share_of_matmul": round(aff_rate / mm["best"], 3),
        "memory_base_bytes": int(mem_s.base),
        "affinity_gflops_useful": round(useful / stats["affinity_s"] / 1e9, 2),
        "useful_share_of_matmul": round(useful / stats["affinity_s"] / mm["best"], 3),
        "candidates_per_query": int(h * w + cfg.context * n_off),
    }
    print(f"sparse: {t_sparse:.3f} s/frame, peak {mem_s.peak / 2**30:.2f} GiB ({mem_s.scope}); affinity step "
          f"{aff_rate / 1e9:.1f} GFLOP/s computed = {aff_rate / mm['best']:.1%} of matmul peak "
          f"({useful / stats['affinity_s'] / 1e9:.1f} GFLOP/s useful window FLOPs)", flush=True)

    ids_sparse = [labels_to_ids(sparse[t], size=(height, width)) for t in range(1, n)]
    if not args.no_dense:
        with PeakMemory(device) as mem_d:
            t0 = time.perf_counter()
            dense = propagate_video(feats, labels0, impl="dense", **{k: v for k, v in kw.items()
                                                                      if k not in ("chunk_size", "tile")})
            _sync(device)
            t_dense = (time.perf_counter() - t0) / max(1, n - 1)
        ids_dense = [labels_to_ids(dense[t], size=(height, width)) for t in range(1, n)]
        same = sum(int((a == b).sum()) for a, b in zip(ids_sparse, ids_dense))
        total = sum(a.numel() for a in ids_sparse)
        report["dense"] = {"seconds_per_frame": round(t_dense, 4), "peak_memory_bytes": int(mem_d.peak),
                           "memory_scope": mem_d.scope}
        report["speedup_dense_over_sparse"] = round(t_dense / t_sparse, 2)
        report["masks_identical"] = same == total
        report["mask_pixel_agreement"] = same / total
        report["soft_label_max_abs_diff"] = float((sparse - dense).abs().max())
        print(f"dense:  {t_dense:.3f} s/frame, peak {mem_d.peak / 2**30:.2f} GiB", flush=True)
        print(f"speed-up {t_dense / t_sparse:.1f}x; masks identical: {same == total} "
              f"({same / total:.6%} of pixels); max |soft label diff| {report['soft_label_max_abs_diff']:.2e}",
              flush=True)
    if args.json:
        from vidssl.io.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
