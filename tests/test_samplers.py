"""Index arithmetic of the pure clip samplers (vidssl/data/samplers.py)."""

from __future__ import annotations

import pytest
import torch

from vidssl.data import samplers as S


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- stride and span

@pytest.mark.parametrize("n,clip_len,stride,expected", [
    (100, 4, 5, 5),   # fits: (4-1)*5+1 = 16 <= 100
    (16, 4, 5, 5),    # exactly fits
    (15, 4, 5, 4),    # one frame short: largest fitting stride is (15-1)//3 = 4
    (7, 4, 5, 2),     # (7-1)//3 = 2
    (4, 4, 5, 1),     # only consecutive frames fit
    (3, 4, 5, 1),     # not even consecutive frames fit: stride 1 (+ repeats)
    (1, 4, 3, 1),
    (10, 1, 7, 7),    # single-frame clips keep the stride
])
def test_effective_stride(n, clip_len, stride, expected):
    assert S.effective_stride(n, clip_len, stride) == expected


def test_span_and_starts_follow_effective_stride():
    for n in range(1, 40):
        for clip_len in range(1, 6):
            for stride in range(1, 8):
                s = S.effective_stride(n, clip_len, stride)
                span = S.clip_span(n, clip_len, stride)
                assert span == (clip_len - 1) * s + 1
                assert S.num_clip_starts(n, clip_len, stride) == max(1, n - span + 1)
                if clip_len <= n:  # a fitting stride exists: the span fits in the video
                    assert span <= n
                    # and it is the largest stride <= requested that fits
                    if s < stride:
                        assert (clip_len - 1) * (s + 1) + 1 > n


@pytest.mark.parametrize("bad", [(0, 4, 1), (10, 0, 1), (10, 4, 0), (-3, 4, 1)])
def test_invalid_arguments_raise(bad):
    with pytest.raises(ValueError):
        S.effective_stride(*bad)


# ---------------------------------------------------------------------------------------------------- clip_at

def test_clip_at_regular_and_clamped():
    assert S.clip_at(20, 3, 4, 2) == [3, 5, 7, 9]
    # short video: stride shrinks to 1 and the last frame repeats
    assert S.clip_at(3, 0, 5, 2) == [0, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="outside"):
        S.clip_at(10, 10, 2, 1)


def test_every_start_gives_in_range_clips():
    for n in (1, 2, 5, 9, 17):
        for clip_len in (1, 2, 4, 8):
            for stride in (1, 2, 3, 10):
                for start in range(S.num_clip_starts(n, clip_len, stride)):
                    c = S.clip_at(n, start, clip_len, stride)
                    assert len(c) == clip_len
                    assert all(0 <= i < n for i in c)
                    assert c == sorted(c)
                    if clip_len <= n:  # no repeats when the clip fits
                        assert len(set(c)) == clip_len


def test_stride_larger_than_video():
    # 6 frames, clip of 3 at stride 10: stride becomes (6-1)//2 = 2, span 5, 2 possible starts
    assert S.effective_stride(6, 3, 10) == 2
    assert S.num_clip_starts(6, 3, 10) == 2
    assert S.clip_at(6, 1, 3, 10) == [1, 3, 5]


# ------------------------------------------------------------------------------------------------ random_clip

def test_random_clip_reproducible_and_covers_all_starts():
    n, clip_len, stride = 12, 3, 2  # span 5 -> 8 starts
    starts = {S.random_clip(n, clip_len, stride, gen(s))[0] for s in range(300)}
    assert starts == set(range(8))
    assert S.random_clip(n, clip_len, stride, gen(7)) == S.random_clip(n, clip_len, stride, gen(7))


def test_random_clip_single_start_video():
    for s in range(5):
        assert S.random_clip(4, 4, 3, gen(s)) == [0, 1, 2, 3]
        assert S.random_clip(2, 4, 1, gen(s)) == [0, 1, 1, 1]


# ----------------------------------------------------------------------------------------------- uniform_clips

def test_uniform_clips_spread_and_count():
    clips = S.uniform_clips(20, 4, 1, 3)  # 17 starts -> 0, 8, 16
    assert [c[0] for c in clips] == [0, 8, 16]
    assert clips[-1][-1] == 19
    assert S.uniform_clips(20, 4, 1, 1) == [[8, 9, 10, 11]]  # the middle start (16 // 2)
    assert len(S.uniform_clips(5, 4, 1, 7)) == 7  # more clips than starts: starts repeat
    with pytest.raises(ValueError):
        S.uniform_clips(20, 4, 1, 0)


# ------------------------------------------------------------------------------------------- consecutive_clips

@pytest.mark.parametrize("n,clip_len,stride", [(10, 4, 1), (8, 4, 1), (30, 3, 2), (31, 4, 3), (7, 8, 1), (50, 1, 3)])
def test_consecutive_clips_exact_count_and_disjoint(n, clip_len, stride):
    clips = S.consecutive_clips(n, clip_len, stride)
    span = S.clip_span(n, clip_len, stride)
    assert len(clips) == max(1, n // span)
    assert clips[0][0] == 0
    seen: set[int] = set()
    for c in clips:
        assert len(c) == clip_len and all(0 <= i < n for i in c)
        assert not seen & set(c)
        seen |= set(c)


def test_consecutive_clips_values():
    assert S.consecutive_clips(10, 4, 1) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert S.consecutive_clips(3, 4, 1) == [[0, 1, 2, 2]]


# ------------------------------------------------------------------------------------------------- random_pair

def test_random_pair_gaps_and_bounds():
    gaps = set()
    for s in range(300):
        a, b = S.random_pair(10, 4, gen(s))
        assert 0 <= a < b < 10
        gaps.add(b - a)
    assert gaps == {1, 2, 3, 4}
    for s in range(50):  # max gap clamped to the video
        a, b = S.random_pair(3, 10, gen(s))
        assert 0 <= a < b <= 2
    assert S.random_pair(1, 5, gen(0)) == [0, 0]
    with pytest.raises(ValueError):
        S.random_pair(10, 2, gen(0), min_gap=3)


# ------------------------------------------------------------------------------------------------- shot_frames

def test_shot_frames_consecutive_shots_sorted_and_inside():
    shots = [(0, 10), (10, 25), (25, 26), (26, 40)]
    for s in range(100):
        groups = S.shot_frames(shots, 3, 2, gen(s))
        assert len(groups) == 2
        starts = [next(k for k, (a, b) in enumerate(shots) if a <= g[0] < b) for g in groups]
        assert starts[1] == starts[0] + 1  # consecutive shots
        for g, k in zip(groups, starts):
            a, b = shots[k]
            assert g == sorted(g) and all(a <= i < b for i in g)
            if b - a >= 3:
                assert len(set(g)) == 3  # distinct frames when the shot is long enough


def test_shot_frames_more_shots_than_available_and_errors():
    groups = S.shot_frames([(0, 5)], 2, 3, gen(0))
    assert len(groups) == 1
    with pytest.raises(ValueError):
        S.shot_frames([], 2, 1, gen(0))
    with pytest.raises(ValueError):
        S.shot_frames([(5, 5)], 2, 1, gen(0))


def test_shot_frames_any_order_sorted_in_time():
    shots = [(i * 5, i * 5 + 5) for i in range(6)]
    for s in range(30):
        groups = S.shot_frames(shots, 2, 3, gen(s), consecutive_shots=False)
        firsts = [g[0] for g in groups]
        assert firsts == sorted(firsts) and len({f // 5 for f in firsts}) == 3


def test_keyframe_clip_starts_only_on_keyframes_that_leave_room():
    g = torch.Generator().manual_seed(0)
    keys = [0, 30, 60, 90]
    starts = {S.keyframe_clip(100, 8, 2, keys, g)[0] for _ in range(200)}
    assert starts == {0, 30, 60}  # 90 + 15 > 100: no room for 8 frames at stride 2
    clip = S.keyframe_clip(100, 8, 2, keys, torch.Generator().manual_seed(1))
    assert clip == list(range(clip[0], clip[0] + 16, 2))
    # the same generator state gives the same clip
    a = S.keyframe_clip(100, 8, 2, keys, torch.Generator().manual_seed(5))
    assert a == S.keyframe_clip(100, 8, 2, keys, torch.Generator().manual_seed(5))
    # no keyframe information, or none that fits: the ordinary random clip (same draw)
    for none in (None, [], [95]):
        assert S.keyframe_clip(100, 8, 2, none, torch.Generator().manual_seed(3)) == \
            S.random_clip(100, 8, 2, torch.Generator().manual_seed(3))
