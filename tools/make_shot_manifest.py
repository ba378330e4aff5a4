"""Write a manifest (JSONL, :mod:`vidssl.data.manifest`) whose entries carry a ``shots`` field, for VIVI-style
shot-structured training on small real data:

* DAVIS frame folders (``--davis-root`` + ``--sequences``) have no cuts; each sequence is cut into consecutive
  segments of ``--segment`` frames that stand in for shots (a tail shorter than a segment is dropped);
  ``--offsets 0,2,4,6`` writes one entry per offset (``name@offset``), its first segment starting there, so a
  short held-out set gives more distinct shot order sequences. The entries of one sequence overlap in frames but are
  separate videos to the data layer: do not use them where other videos' shots are negatives (VIVI's L_S with
  ``shot_negatives: other_videos``), and an offset leaving no whole segment is left out with a message;
* encoded videos with known cuts (``--video PATH:CUT,CUT,...``, the frame indices where a new shot starts), e.g.
  ``../shared/data/videos/bikes.mp4`` with its hard cuts at frames 30, 76, 137, 187 and 242 (6 shots).

The manifest is written atomically to ``--out`` (keep it in a run or temp folder, never in the repository). The
recipe ``configs/vivi_sample.yaml`` reads it as ``data.manifest``. Example::

    python tools/make_shot_manifest.py --out /tmp/vivi/train.jsonl --davis-root ../shared/data/davis2016-sample \\
        --sequences drift-turn,tennis,swing,hockey,scooter-gray,kite-walk,paragliding,motocross-bumps \\
        --segment 8 --video ../shared/data/videos/bikes.mp4:30,76,137,187,242
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vidssl.data.manifest import VideoEntry, davis_frames_dir, write_manifest
from vidssl.io.readers import probe


def segment_shots(num_frames: int, segment: int, offset: int = 0) -> list[tuple[int, int]]:
    """Consecutive ``[start, end)`` segments of ``segment`` frames from frame ``offset`` on (the head before
    ``offset`` and a tail shorter than a segment are dropped)."""
    if segment < 1:
        raise ValueError(f"--segment: must be >= 1, got {segment}")
    if offset < 0:
        raise ValueError(f"--offsets: must be >= 0, got {offset}")
    return [(a, a + segment) for a in range(offset, num_frames - segment + 1, segment)]


def cut_shots(num_frames: int, cuts: list[int], where: str) -> list[tuple[int, int]]:
    """Shots between cut frames (each cut starts a new shot); errors name ``where`` and the bad cut."""
    bad = [c for c in cuts if not 0 < c < num_frames]
    if bad or sorted(set(cuts)) != cuts:
        raise ValueError(f"{where}: cuts must be increasing frame indices in (0, {num_frames}), got {cuts}")
    bounds = [0, *cuts, num_frames]
    return list(zip(bounds[:-1], bounds[1:]))


def entry(name: str, path: Path, shots_of) -> VideoEntry:
    """A manifest entry of ``path`` (probed) with ``shots = shots_of(num_frames)``."""
    info = probe(path)
    return VideoEntry(name=name, path=str(path.resolve()), kind=info["kind"], num_frames=int(info["num_frames"]),
                      fps=info["fps"], height=int(info["height"]), width=int(info["width"]),
                      codec=str(info["codec"]), duration=info["duration"],
                      shots=shots_of(int(info["num_frames"])))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="manifest to write (a run or temp folder, not the repository)")
    ap.add_argument("--davis-root", help="DAVIS root (JPEGImages/480p/<seq>/)")
    ap.add_argument("--sequences", default="", help="comma-separated DAVIS sequences (default: all)")
    ap.add_argument("--segment", type=int, default=8, help="frames per segment of a DAVIS sequence (default 8)")
    ap.add_argument("--offsets", default="0", help="comma-separated first-segment offsets, one entry per offset "
                    "(default 0: one entry per sequence, named as the sequence)")
    ap.add_argument("--video", action="append", default=[], metavar="PATH:CUT,CUT,...",
                    help="an encoded video and the frames where its shots start (repeatable)")
    args = ap.parse_args(argv)
    entries: list[VideoEntry] = []
    try:
        offsets = sorted({int(o) for o in args.offsets.split(",") if o.strip()})
    except ValueError:
        ap.error(f"--offsets: expected comma-separated integers, got {args.offsets!r}")
    if not offsets or offsets[0] < 0 or offsets[-1] >= args.segment:
        ap.error(f"--offsets: expected integers in [0, --segment={args.segment}), got {args.offsets!r}")
    if args.davis_root:
        frames_dir = davis_frames_dir(args.davis_root)
        if frames_dir is None:
            ap.error(f"--davis-root: {args.davis_root} has no JPEGImages/ folder")
        names = [s for s in args.sequences.split(",") if s] or sorted(p.name for p in frames_dir.iterdir()
                                                                       if p.is_dir())
        for name in names:
            path = frames_dir / name
            if not path.is_dir():
                ap.error(f"--sequences: {name} is not a folder of {frames_dir}")
            for off in offsets:
                label = name if offsets == [0] else f"{name}@{off}"
                e = entry(label, path, lambda n, o=off: segment_shots(n, args.segment, o))
                if not e.shots:  # an empty list would read as one whole-sequence shot
                    print(f"{label}: no whole segment of {args.segment} frames from frame {off}; left out",
                          file=sys.stderr)
                    continue
                entries.append(e)
    for spec in args.video:
        path_s, sep, cuts_s = spec.rpartition(":")
        if not sep or not path_s:
            ap.error(f"--video: expected PATH:CUT,CUT,..., got {spec!r}")
        try:
            cuts = [int(c) for c in cuts_s.split(",") if c]
        except ValueError:
            ap.error(f"--video: cuts must be integers, got {cuts_s!r}")
        path = Path(path_s)
        entries.append(entry(path.stem, path, lambda n, c=cuts, w=spec: cut_shots(n, c, f"--video {w}")))
    if not entries:
        ap.error("nothing to write: give --davis-root and/or --video")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(out, entries)
    for e in entries:
        print(f"{e.name}: {e.num_frames} frames, {len(e.shots or [])} shots {e.shots}", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
