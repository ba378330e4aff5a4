"""tools/prepare_videos.py: re-encoding to short side 256 with a fixed GOP, JPEG frames, resuming, failures."""

from __future__ import annotations

import importlib
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vidssl.io import write_video
from vidssl.io.video import PyAVReader

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prep():
    # importable by name (not from a file spec) so that the tool's spawned worker processes can import it too
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        yield importlib.import_module("prepare_videos")
    finally:
        sys.path.remove(str(ROOT / "tools"))


def _frame(i: int, h: int, w: int) -> np.ndarray:
    """Frame ``i``: a bright square whose horizontal position encodes ``i`` over a dark gradient."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 200 // w, yy * 200 // h, np.full_like(xx, 40)], axis=-1).astype(np.uint8)
    x0 = 4 + 6 * i
    img[h // 2 - 6: h // 2 + 6, x0: x0 + 12] = 255
    return img


def write_source(path: Path, n: int, *, h: int = 96, w: int = 160, gop: int = 250, rotation: int | None = None,
                 rate: Fraction = Fraction(25)) -> Path:
    return write_video(path, np.stack([_frame(i, h, w) for i in range(n)]), fps=rate, gop=gop, crf=10,
                       preset="ultrafast", rotation=rotation)


def square_x(frame_chw: torch.Tensor) -> float:
    """Horizontal centre of the bright square, as a fraction of the width."""
    bright = frame_chw.float().mean(0) > 235
    cols = bright.nonzero(as_tuple=True)[1].float()
    return float(cols.mean()) / frame_chw.shape[-1]


def test_scaled_size(prep):
    assert prep.scaled_size(480, 854, short_side=256) == (256, 456)
    assert prep.scaled_size(720, 1280, short_side=256) == (256, 456)
    assert prep.scaled_size(1280, 720, short_side=256) == (456, 256)  # portrait
    assert prep.scaled_size(144, 176, short_side=256) == (144, 176)  # never upscaled
    assert prep.scaled_size(145, 177, short_side=256) == (144, 176)  # even sizes for yuv420p
    assert prep.scaled_size(480, 854, short_side=256, align=32) == (256, 448)
    assert prep.scaled_size(480, 854, short_side=0) == (480, 854)


def test_reencode_short_side_and_gop(prep, tmp_path):
    src = write_source(tmp_path / "in" / "a.mp4", 40, h=300, w=500)
    dst = tmp_path / "out" / "a.mp4"
    res = prep.reencode_video(src, dst, short_side=128, gop=8, crf=18, preset="ultrafast")
    assert res == {"frames": 40, "height": 128, "width": 214}
    with PyAVReader(dst) as r:
        assert (r.num_frames, r.height, r.width) == (40, 128, 214)
        assert r.fps == pytest.approx(25)
        assert r.keyframe_indices == [0, 8, 16, 24, 32]
        with PyAVReader(src) as s:  # same content, frame for frame (the square moves 6 px per frame)
            for i in [0, 13, 39]:
                assert square_x(r.get_frames([i])[0]) == pytest.approx(square_x(s.get_frames([i])[0]), abs=0.01)
    assert not list(dst.parent.glob(".*"))  # no temporary file left behind


def test_reencode_applies_rotation(prep, tmp_path):
    src = write_source(tmp_path / "rot.mp4", 6, h=64, w=128, rotation=90)
    dst = tmp_path / "rot_out.mp4"
    prep.reencode_video(src, dst, short_side=0, gop=4, preset="ultrafast")
    with PyAVReader(src) as a, PyAVReader(dst) as b:
        assert (b.height, b.width) == (128, 64) and b.rotation == 0  # upright pixels, no display matrix
        x, y = a.get_frames([3]).float(), b.get_frames([3]).float()
        assert (x - y).abs().mean() < 4


def test_extract_frames(prep, tmp_path):
    src = write_source(tmp_path / "v.mp4", 12, h=96, w=160)
    dst = tmp_path / "frames" / "v"
    res = prep.extract_frames(src, dst, short_side=64, quality=95)
    assert res == {"frames": 12, "height": 64, "width": 106}
    names = sorted(p.name for p in dst.iterdir())
    assert names == [f"{i:05d}.jpg" for i in range(12)]
    with PyAVReader(src) as r:
        for i in [0, 7, 11]:
            img = torch.from_numpy(np.array(Image.open(dst / f"{i:05d}.jpg").convert("RGB"))).permute(2, 0, 1)
            assert img.shape == (3, 64, 106)
            assert square_x(img) == pytest.approx(square_x(r.get_frames([i])[0]), abs=0.02)
    assert not list(dst.parent.glob(".*"))


def test_prepare_folder_resumes_and_lists_failures(prep, tmp_path):
    src = tmp_path / "src"
    write_source(src / "cls1" / "a.mp4", 10)
    write_source(src / "cls2" / "b.mkv", 10)
    (src / "cls2" / "broken.mp4").write_bytes(b"not a video at all" * 10)
    (src / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    res = prep.prepare(src, out, mode="videos", workers=2, progress=False, short_side=64, gop=5, preset="ultrafast")
    assert res["done"] == 2 and res["skipped"] == 0
    assert [Path(p).name for p, _ in res["failed"]] == ["broken.mp4"]
    for name in ("cls1/a.mp4", "cls2/b.mp4"):  # 10 frames, short side 64, a keyframe every 5 frames
        with PyAVReader(out / name) as r:
            assert (r.num_frames, r.height, r.width, r.keyframe_indices) == (10, 64, 106, [0, 5]), name
    assert "broken.mp4" in (out / "failures.txt").read_text()
    mtime = (out / "cls1" / "a.mp4").stat().st_mtime_ns
    res2 = prep.prepare(src, out, mode="videos", workers=1, progress=False, short_side=64, gop=5, preset="ultrafast")
    assert res2["done"] == 0 and res2["skipped"] == 2 and len(res2["failed"]) == 1  # finished outputs are skipped
    assert (out / "cls1" / "a.mp4").stat().st_mtime_ns == mtime

    frames = tmp_path / "frames"
    (src / "cls2" / "broken.mp4").unlink()
    res3 = prep.prepare(src, frames, mode="frames", workers=1, progress=False, short_side=0, quality=80)
    assert res3["done"] == 2 and not res3["failed"]
    assert len(list((frames / "cls2" / "b").glob("*.jpg"))) == 10
    assert not (frames / "failures.txt").exists()


def test_cli_errors_and_strict(prep, tmp_path, capsys):
    assert prep.main(["videos", str(tmp_path / "missing"), str(tmp_path / "o"), "--no-progress"]) == 1
    assert "missing" in capsys.readouterr().err
    src = tmp_path / "s"
    src.mkdir()
    (src / "bad.mp4").write_bytes(b"\x00" * 100)
    assert prep.main(["frames", str(src), str(tmp_path / "o"), "--no-progress", "--workers", "1"]) == 0
    assert prep.main(["frames", str(src), str(tmp_path / "o"), "--no-progress", "--workers", "1", "--strict"]) == 2
    assert "bad.mp4" in capsys.readouterr().err
