"""vidssl.io.write_video: the one PyAV encode loop (lossless round trip, exact GOP, timestamps, rotation, atomic)."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import av
import numpy as np
import pytest

from vidssl.data.synthetic import SynthConfig, generate_video
from vidssl.io import write_video

from decoded import decode_all  # tests/decoded.py

SMALL = SynthConfig(num_frames=8, height=64, width=64)


@pytest.mark.parametrize("suffix", ["mp4", "mkv", "mov"])
def test_lossless_round_trip_is_exact(tmp_path, suffix):
    frames = generate_video(0, dataclasses.replace(SMALL, height=33, width=47)).frames  # odd size is fine
    path = write_video(tmp_path / f"v.{suffix}", frames, lossless=True)
    decoded, pts, _ = decode_all(path)
    assert len(decoded) == len(frames)
    assert pts == sorted(set(pts))  # explicit, increasing timestamps
    for got, want in zip(decoded, frames):
        np.testing.assert_array_equal(got, want)
    assert [p.name for p in tmp_path.iterdir()] == [f"v.{suffix}"]  # no temp file left


def test_lossy_exact_gop_rate_and_quality(tmp_path):
    frames = generate_video(2, dataclasses.replace(SMALL, num_frames=20)).frames
    path = write_video(tmp_path / "v.mp4", frames, fps=Fraction(30000, 1001), gop=6)
    decoded, _, keys = decode_all(path)
    assert len(decoded) == 20 and decoded[0].shape == frames[0].shape
    assert [i for i, k in enumerate(keys) if k] == [0, 6, 12, 18]  # exactly every gop frames, no scene cuts
    error = np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(decoded, frames)])
    unrelated = np.abs(frames.astype(int) - frames[:, ::-1, ::-1]).mean()
    assert error < 0.5 * unrelated
    with av.open(str(path)) as container:
        assert container.streams.video[0].average_rate == Fraction(30000, 1001)


def test_generator_of_frames_timestamps_rotation_and_options(tmp_path):
    frames = generate_video(1, SMALL).frames
    pts = [0, 40, 80, 200, 240, 280, 400, 440]  # irregular gaps, time base 1/1000
    path = write_video(tmp_path / "v.mkv", (f for f in frames), lossless=True, pts=pts,
                       time_base=Fraction(1, 1000), rotation=90, options={"bframes": "0"})
    decoded, got_pts, _ = decode_all(path)
    assert got_pts == pts
    np.testing.assert_array_equal(np.stack(decoded), frames)
    with av.open(str(path)) as container:
        raw = path.read_bytes()
        assert b"bframes=0" in raw and container.streams.video[0].codec_context.name == "h264"
    with av.open(str(write_video(tmp_path / "r.mp4", frames, lossless=True, rotation=90))) as container:
        assert next(container.decode(video=0)).rotation == 90


def test_video_frames_are_encoded_as_given(tmp_path):
    frames = generate_video(3, SMALL).frames
    vf = [av.VideoFrame.from_ndarray(f, format="rgb24") for f in frames]
    for i, f in enumerate(vf):
        f.pts = 10 * i  # kept
    path = write_video(tmp_path / "v.mp4", vf, lossless=True, time_base=Fraction(1, 250))
    with av.open(str(path)) as container:
        decoded = [(f.time, f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    assert [t for t, _ in decoded] == pytest.approx([0.04 * i for i in range(len(frames))])  # 10 ticks of 1/250
    np.testing.assert_array_equal(np.stack([f for _, f in decoded]), frames)


def test_bad_input_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 33, 48, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", [np.zeros((32, 32), dtype=np.uint8)])
    with pytest.raises(ValueError, match="suffix"):
        write_video(tmp_path / "f.gif", np.zeros((2, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="no frames"):
        write_video(tmp_path / "empty.mp4", [])
    with pytest.raises(ValueError, match="first frame"):
        write_video(tmp_path / "sizes.mp4", [np.zeros((32, 32, 3), np.uint8), np.zeros((16, 32, 3), np.uint8)])
    with pytest.raises(ValueError, match="gop"):
        write_video(tmp_path / "g.mp4", np.zeros((2, 32, 32, 3), dtype=np.uint8), gop=0)
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_the_previous_file(tmp_path):
    path = write_video(tmp_path / "v.mp4", np.zeros((2, 32, 32, 3), dtype=np.uint8))
    before = path.read_bytes()

    def broken():
        yield np.zeros((32, 32, 3), dtype=np.uint8)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        write_video(path, broken())
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["v.mp4"]
