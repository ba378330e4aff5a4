"""Clip samplers as pure functions: video length in, frame indices out.

Every function returns plain ``list[int]`` frame indices (or lists of them) and takes an explicit
``torch.Generator`` when it is random, so it is reproducible and testable without any video. Decoders then read
exactly these frames (indices first, decode second).

Short videos: when ``(clip_len - 1) * stride + 1`` frames do not fit, the stride is reduced to the largest that
fits (videowalk's behaviour); when even ``clip_len`` consecutive frames do not fit, the last frame is repeated.
:func:`clip_span` reports the stride actually used.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class ClipSpec(NamedTuple):
    """What one clip is: ``clip_len`` frames, ``stride`` frames apart."""

    clip_len: int
    stride: int = 1


def _check(num_frames: int, clip_len: int, stride: int) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if clip_len < 1:
        raise ValueError(f"clip_len must be >= 1, got {clip_len}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")


def effective_stride(num_frames: int, clip_len: int, stride: int) -> int:
    """The stride used for a video of ``num_frames``: ``stride``, or the largest smaller one that fits (>= 1)."""
    _check(num_frames, clip_len, stride)
    if clip_len == 1:
        return stride
    return max(1, min(stride, (num_frames - 1) // (clip_len - 1)))


def clip_span(num_frames: int, clip_len: int, stride: int) -> int:
    """Frames covered by one clip, ``(clip_len - 1) * stride' + 1`` with the effective stride."""
    s = effective_stride(num_frames, clip_len, stride)
    return (clip_len - 1) * s + 1


def num_clip_starts(num_frames: int, clip_len: int, stride: int) -> int:
    """How many distinct start frames a clip can have (at least 1)."""
    return max(1, num_frames - clip_span(num_frames, clip_len, stride) + 1)


def clip_at(num_frames: int, start: int, clip_len: int, stride: int) -> list[int]:
    """The clip starting at ``start``: ``clip_len`` indices, clamped to the last frame for too-short videos."""
    s = effective_stride(num_frames, clip_len, stride)
    if not 0 <= start < num_frames:
        raise ValueError(f"start {start} outside a video of {num_frames} frames")
    return [min(start + i * s, num_frames - 1) for i in range(clip_len)]


def random_clip(num_frames: int, clip_len: int, stride: int, generator: torch.Generator | None = None) -> list[int]:
    """One clip with a uniformly random start."""
    n = num_clip_starts(num_frames, clip_len, stride)
    start = int(torch.randint(n, (1,), generator=generator))
    return clip_at(num_frames, start, clip_len, stride)


def keyframe_clip(num_frames: int, clip_len: int, stride: int, keyframes: Sequence[int] | None,
                  generator: torch.Generator | None = None) -> list[int]:
    """One clip whose start is a uniformly drawn keyframe (among those a whole clip fits after).

    A different sampling distribution from :func:`random_clip`: starts fall only on keyframes (every 30th frame
    of a video encoded with a keyframe interval of 30), in exchange for decoding no frames before the clip. Without
    keyframe information (``None``: frame folders, untimed streams), or when no keyframe leaves room for a clip,
    this is :func:`random_clip`.
    """
    n = num_clip_starts(num_frames, clip_len, stride)
    starts = [k for k in (keyframes or []) if 0 <= k < n]
    if not starts:
        return random_clip(num_frames, clip_len, stride, generator)
    start = starts[int(torch.randint(len(starts), (1,), generator=generator))]
    return clip_at(num_frames, start, clip_len, stride)


def uniform_clips(num_frames: int, clip_len: int, stride: int, num_clips: int) -> list[list[int]]:
    """``num_clips`` clips with starts spread evenly over the video (deterministic; evaluation)."""
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    n = num_clip_starts(num_frames, clip_len, stride)
    if num_clips == 1:
        starts = [(n - 1) // 2]
    else:
        starts = [round(i * (n - 1) / (num_clips - 1)) for i in range(num_clips)]
    return [clip_at(num_frames, s, clip_len, stride) for s in starts]


def consecutive_clips(num_frames: int, clip_len: int, stride: int) -> list[list[int]]:
    """All non-overlapping clips from frame 0 on (a tail shorter than one clip is dropped, except for 1 clip)."""
    span = clip_span(num_frames, clip_len, stride)
    starts = list(range(0, max(1, num_frames - span + 1), span))
    return [clip_at(num_frames, s, clip_len, stride) for s in starts]


def random_pair(num_frames: int, max_gap: int, generator: torch.Generator | None = None,
                min_gap: int = 1) -> list[int]:
    """Two frames ``g`` apart, ``g`` uniform in ``[min_gap, max_gap]`` (clamped to the video); returns ``[i, i+g]``."""
    _check(num_frames, 2, 1)
    if min_gap < 0 or max_gap < min_gap:
        raise ValueError(f"need 0 <= min_gap <= max_gap, got {min_gap}, {max_gap}")
    hi = min(max_gap, num_frames - 1)
    lo = min(min_gap, hi)
    gap = int(torch.randint(lo, hi + 1, (1,), generator=generator))
    start = int(torch.randint(num_frames - gap, (1,), generator=generator))
    return [start, start + gap]


def shot_frames(shots: Sequence[tuple[int, int]], frames_per_shot: int, num_shots: int,
                generator: torch.Generator | None = None, consecutive_shots: bool = True) -> list[list[int]]:
    """Frames from shots: ``num_shots`` shots (consecutive in time, or any), ``frames_per_shot`` sorted random frames each.

    ``shots`` lists ``(first, last_exclusive)`` frame ranges. Returns one sorted index list per chosen shot, shots
    in temporal order.
    """
    if not shots:
        raise ValueError("shots: empty shot list")
    if num_shots < 1 or frames_per_shot < 1:
        raise ValueError("num_shots and frames_per_shot must be >= 1")
    for a, b in shots:
        if b <= a:
            raise ValueError(f"shots: empty or reversed range ({a}, {b})")
    k = min(num_shots, len(shots))
    if consecutive_shots:
        first = int(torch.randint(len(shots) - k + 1, (1,), generator=generator))
        chosen = list(range(first, first + k))
    else:
        chosen = sorted(torch.randperm(len(shots), generator=generator)[:k].tolist())
    out = []
    for si in chosen:
        a, b = shots[si]
        n = b - a
        if n >= frames_per_shot:
            idx = sorted(torch.randperm(n, generator=generator)[:frames_per_shot].tolist())
        else:
            idx = sorted(int(torch.randint(n, (1,), generator=generator)) for _ in range(frames_per_shot))
        out.append([a + i for i in idx])
    return out
